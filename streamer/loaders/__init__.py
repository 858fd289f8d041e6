"""Real public data sets as kg-streamer input events, in event-time order.

Each loader module has one entry point, ``events(path, limit=None, report=None)``, which
yields plain event dicts that ``streamer.events.validate_event`` accepts, oldest first (ties:
products, then relations, then interactions, so a node's upsert precedes the edges that name
it). Pass a ``LoadReport`` to see what was emitted and what was skipped and why:

    report = LoadReport("online_retail")
    for event in online_retail.events(path, report=report): ...
    print(report.summary())

* ``streamer.loaders.online_retail`` -- UCI Online Retail (one CSV, streamed row by row)
* ``streamer.loaders.amazon``        -- Amazon Review Data 2018, one category (meta + ratings)
* ``streamer.loaders.replay``        -- ``replay(events, settings)`` produces them to the input
  topics; ``load_online_retail(...)`` and ``load_amazon(...)`` are the CLI's entry points
  (also importable from this package).

Timestamps are emitted as RFC 3339 strings in UTC (``2010-12-01T08:26:00Z``): readable on the
topic, and exactly what the event schema parses.
"""

from __future__ import annotations

import gzip
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Any, Iterable, Iterator

__all__ = ["LoadReport", "iso_utc", "open_text", "take", "load_online_retail", "load_amazon", "ReplayStats"]


@dataclass
class LoadReport:
    """What one loader run read, emitted and skipped (reason -> count)."""

    source: str
    rows: Counter[str] = field(default_factory=Counter)  # input records read, per input file kind
    events: Counter[str] = field(default_factory=Counter)  # events emitted, per event type
    skipped: Counter[str] = field(default_factory=Counter)  # records (or list items) dropped, per reason
    notes: Counter[str] = field(default_factory=Counter)  # records used after a documented fix-up

    def summary(self) -> str:
        def fmt(counter: Counter[str]) -> str:
            return ", ".join(f"{k}={v:,}" for k, v in sorted(counter.items())) or "-"

        return (
            f"{self.source}: read {fmt(self.rows)}\n"
            f"  emitted {sum(self.events.values()):,} events: {fmt(self.events)}\n"
            f"  skipped: {fmt(self.skipped)}\n"
            f"  notes: {fmt(self.notes)}"
        )


def iso_utc(epoch_s: float) -> str:
    """Unix seconds -> ``YYYY-MM-DDTHH:MM:SSZ``."""
    return datetime.fromtimestamp(epoch_s, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def open_text(path: Path) -> IO[str]:
    """Open a text file, gunzipping when the name ends in ``.gz``."""
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8", newline="")
    return open(path, "rt", encoding="utf-8", newline="")


def take(events: Iterable[dict[str, Any]], limit: int | None, report: LoadReport) -> Iterator[dict[str, Any]]:
    """Yield at most ``limit`` events (all when None), counting them per type in ``report``."""
    if limit is not None and limit <= 0:
        return
    emitted = 0
    for event in events:
        report.events[event["type"]] += 1
        yield event
        emitted += 1
        if limit is not None and emitted >= limit:
            return


def __getattr__(name: str) -> Any:
    # The CLI-facing functions live in .replay (which imports kafka-python); load it on first use.
    if name in ("load_online_retail", "load_amazon", "ReplayStats"):
        from streamer.loaders import replay as _replay

        return getattr(_replay, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
