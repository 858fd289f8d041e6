"""Fixtures of the model tests."""

from __future__ import annotations

import pytest

from streamer.model.graph import GraphData
from tests.streamer.model.planted import planted_graph


@pytest.fixture
def graph() -> GraphData:
    return planted_graph()
