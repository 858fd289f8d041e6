"""Real public data sets as kg-streamer input events, in event-time order.

Each loader module has one entry point, ``events(path, limit=None, report=None)``, which
yields plain event dicts that ``streamer.contracts.events.validate_event`` accepts, oldest first; at
equal times a product's upsert comes before the relations and interactions that name it.
Pass a ``LoadReport`` to see what was emitted and what was skipped and why:

    report = LoadReport("online_retail")
    for event in online_retail.events(path, report=report): ...
    print(report.summary())  # a dict: rows read, events per type, skipped per reason

* ``devtools.datasets.online_retail`` -- UCI Online Retail (one CSV, streamed row by row)
* ``devtools.datasets.amazon``        -- Amazon Review Data 2018, one category (meta + ratings)
* ``devtools.datasets.produce``        -- ``produce(events, settings)`` produces them to the input
  topics; ``load_online_retail(...)`` and ``load_amazon(...)`` are the CLI's entry points
  (also importable from this package).

Timestamps are emitted as RFC 3339 strings in UTC (``2010-12-01T08:26:00Z``): readable on the
topic, and exactly what the event schema parses.
"""

from __future__ import annotations

import gzip
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

__all__ = ["LoadReport", "iso_utc", "open_text", "take", "load_online_retail", "load_amazon", "ProduceStats"]


@dataclass
class LoadReport:
    """What one loader run read, emitted and skipped (reason -> count).

    With a ``limit``, Online Retail counts the rows read until the limit was reached; the Amazon
    loader reads both files whole before it yields anything, so its rows/skipped cover them all.
    """

    source: str
    rows: Counter[str] = field(default_factory=Counter)  # input records read, per input file kind
    events: Counter[str] = field(default_factory=Counter)  # events emitted, per event type
    skipped: Counter[str] = field(default_factory=Counter)  # records (or list items) dropped, per reason
    notes: Counter[str] = field(default_factory=Counter)  # records used after a documented fix-up

    def summary(self) -> dict[str, Any]:
        """JSON-ready counts, largest first."""

        def ordered(counter: Counter[str]) -> dict[str, int]:
            return dict(counter.most_common())

        return {
            "source": self.source,
            "rows": ordered(self.rows),
            "events": sum(self.events.values()),
            "events_by_type": ordered(self.events),
            "skipped": ordered(self.skipped),
            "notes": ordered(self.notes),
        }


def iso_utc(epoch_s: float) -> str:
    """Unix seconds -> ``YYYY-MM-DDTHH:MM:SSZ``."""
    return datetime.fromtimestamp(epoch_s, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def open_text(path: Path) -> IO[str]:
    """Open a text file, gunzipping when the name ends in ``.gz``."""
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8", newline="")
    return open(path, encoding="utf-8", newline="")


def take(events: Iterable[dict[str, Any]], limit: int | None, report: LoadReport) -> Iterator[dict[str, Any]]:
    """Yield at most ``limit`` events (all when None), counting them per type in ``report``."""
    if limit is not None and limit <= 0:
        return
    for emitted, event in enumerate(events, start=1):
        report.events[event["type"]] += 1
        yield event
        if limit is not None and emitted >= limit:
            return


def __getattr__(name: str) -> Any:
    # The CLI-facing functions live in .produce (which imports kafka-python); load it on first use.
    if name in ("load_online_retail", "load_amazon", "ProduceStats"):
        from devtools.datasets import produce

        return getattr(produce, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
