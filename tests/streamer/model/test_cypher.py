"""The model tooling's Cypher statements: allowlisted labels only (they are linted with every
other statement through sinks.cypher.all_statements() in tests/sinks/test_cypher_lint.py)."""

from __future__ import annotations

import pytest

from streamer.model import cypher


def test_model_statements_are_in_the_linted_list():
    from sinks.cypher import all_statements

    linted = {text for _, text in all_statements()}
    assert all(text in linted for _, text in cypher.statements())


def test_write_vectors_refuses_labels_outside_the_allowlist():
    with pytest.raises(ValueError):
        cypher.write_vectors("Product {id: 1}) DETACH DELETE n //")
