"""Consumer groups, seen from the broker: lag in messages and seconds (``lag``), rewinding a
group to backfill (``rewind``), and the operator commands ``status``, ``replay`` and
``lag-exporter`` (``admin``)."""
