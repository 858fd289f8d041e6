"""Ingest stage: input events -> coalesced graph rows (``plan``) -> one graph transaction,
changelog and dead letters (``step``), on the batching consumer."""
