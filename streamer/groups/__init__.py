"""Operations: consumer lag from the broker (``lag``), rewinding groups to backfill (``replay``)
and their sub-commands ``status``, ``replay`` and ``lag-exporter`` (``cli``)."""
