"""Embedding stage: the graph replica, the exact incremental GNN engine, its state and the worker.

``streamer.embed.state`` builds, opens and saves an ``IncrementalEngine``
(``streamer.embed.engine``) over a ``Replica`` (``streamer.embed.replica``); the worker step
(``streamer.embed.worker``) feeds it micro-batches of ``streamer.contracts.changes.Change``
records with ``apply`` and publishes ``report.vectors`` under ``report.changed_keys``
(tombstones for ``report.deleted_keys``); ``streamer.embed.verify`` audits it. See docs/engine.md.
"""
