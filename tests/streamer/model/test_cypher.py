"""The model tooling's Cypher statements are valid Neo4j 5 (the project's linter harness)."""

from __future__ import annotations

import pytest

from streamer.model import cypher
from tests.sinks.cypher_lint import describe, lint


def test_model_statements_are_valid_neo4j5():
    problems = lint(cypher.statements())
    assert not problems, describe(problems)


def test_write_vectors_refuses_labels_outside_the_allowlist():
    with pytest.raises(ValueError):
        cypher.write_vectors("Product {id: 1}) DETACH DELETE n //")
