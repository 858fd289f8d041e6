"""Embedding stage: the graph replica and the exact incremental GNN engine.

The embed worker builds an ``IncrementalEngine`` (``streamer.embed.engine``) from a
``GraphEncoder`` and a ``Featurizer`` (text encoder for products), feeds it micro-batches of
``streamer.changes.Change`` records with ``apply``, and publishes ``report.vectors`` under
``report.changed_keys`` (tombstones for ``report.deleted_keys``). See docs/engine.md.
"""

from streamer.embed.engine import BatchReport, Featurizer, IncrementalEngine
from streamer.embed.replica import Replica

__all__ = ["BatchReport", "Featurizer", "IncrementalEngine", "Replica"]
