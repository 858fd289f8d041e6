"""Fixtures of the model tests."""

from __future__ import annotations

import pytest

from training.dataset import GraphData
from tests.training.planted import planted_graph


@pytest.fixture
def graph() -> GraphData:
    return planted_graph()
