"""Fixtures of the model tests."""

from __future__ import annotations

import pytest

from tests.training.planted import planted_graph
from training.dataset import GraphData


@pytest.fixture
def graph() -> GraphData:
    return planted_graph()
