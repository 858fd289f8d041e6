"""Produce loader events to the input topics, in order, with a progress bar and a rate cap.

``produce(events, settings)`` sends each event as compact UTF-8 JSON to its topic:

    product     -> settings.topic_products      key = product id
    interaction -> settings.topic_interactions  key = user id
    relation    -> settings.topic_relations     key = src id

Keys pin every product's (and every user's) events to one partition, where Kafka keeps their
order; the ingest relies on that plus the event ``ts``/``version`` guards.

Producer settings and why:
* ``acks="all"``: an event counts as sent only once the broker has it durably.
* ``max_in_flight_requests_per_connection=1`` with a few retries: a retried batch can never
  overtake the one behind it, so per-key order survives transient errors. Idempotence
  (which would allow 5 in flight) is off because the embedded brokers are not known to
  implement InitProducerId; a retry may therefore duplicate a batch, which the idempotent
  ingest absorbs.
* ``linger_ms=20`` and 256 KiB batches: one request carries many events.

The rate cap is a token bucket over all topics (``rate`` events/s, bursts of at most 50 ms
worth): the measured average never exceeds the cap. Sending stops at the first failed
delivery; ``produce`` flushes what is in flight and raises ``ProduceError``. On success it
returns the per-topic counts of events the broker acknowledged.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from devtools.datasets import LoadReport, amazon, online_retail
from streamer.settings import Settings


class ProduceError(RuntimeError):
    """At least one event was not acknowledged by the broker."""


@dataclass
class ProduceStats:
    per_topic: dict[str, int] = field(default_factory=dict)  # acknowledged events per topic
    elapsed_s: float = 0.0
    report: LoadReport | None = None  # what the loader emitted and skipped, when a loader ran

    @property
    def events(self) -> int:
        return sum(self.per_topic.values())

    @property
    def events_per_s(self) -> float:
        return self.events / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def summary(self) -> dict[str, Any]:
        """JSON-ready: events acknowledged per topic, time, rate, and the loader's report."""
        summary: dict[str, Any] = {
            "produced": self.events,
            "per_topic": dict(self.per_topic),
            "elapsed_s": round(self.elapsed_s, 3),
            "events_per_s": round(self.events_per_s, 1),
        }
        if self.report is not None:
            summary["loader"] = self.report.summary()
        return summary


class TokenBucket:
    """``rate`` tokens per second, at most ``burst`` saved up; ``take()`` sleeps when empty."""

    def __init__(
        self,
        rate: float,
        burst: float | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ):
        if not rate > 0:
            raise ValueError(f"rate must be > 0 events/s, got {rate}")
        self.rate = float(rate)
        self.burst = max(1.0, burst if burst is not None else self.rate * 0.05)
        self.tokens = 1.0  # start nearly empty: no initial burst above the cap
        self._clock, self._sleep = clock, sleep
        self._last = clock()

    def take(self, n: float = 1.0) -> None:
        now = self._clock()
        self.tokens = min(self.burst, self.tokens + (now - self._last) * self.rate)
        self._last = now
        self.tokens -= n
        if self.tokens < 0:  # owe time: sleep it off; the debt is repaid by the refill above
            self._sleep(-self.tokens / self.rate)


def route(event: dict[str, Any], settings: Settings) -> tuple[str, str]:
    """(topic, key) of one event."""
    kind = event.get("type")
    if kind == "product":
        return settings.topic_products, event["id"]
    if kind == "interaction":
        return settings.topic_interactions, event["user_id"]
    if kind == "relation":
        return settings.topic_relations, event["src"]["id"]
    raise ValueError(f"cannot route event of type {kind!r}")


def make_producer(settings: Settings) -> Any:
    from kafka import KafkaProducer

    return KafkaProducer(
        bootstrap_servers=[s.strip() for s in settings.bootstrap_servers.split(",") if s.strip()],
        client_id="kg-streamer-load",
        acks="all",
        enable_idempotence=False,
        max_in_flight_requests_per_connection=1,
        retries=5,
        linger_ms=20,
        batch_size=256 * 1024,
        max_request_size=max(1_048_576, settings.max_event_bytes * 2),
    )


def encode(event: dict[str, Any]) -> bytes:
    """Compact UTF-8 JSON, the wire form of an event."""
    return json.dumps(event, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def produce(
    events: Iterable[dict[str, Any]],
    settings: Settings,
    rate: float | None = None,
    progress: bool = True,
    producer: Any = None,
    flush_timeout_s: float = 120.0,
    desc: str = "produce",
) -> ProduceStats:
    """Send every event to its input topic; raise ProduceError if any delivery failed.

    ``producer`` is for tests and callers that manage their own (not closed here); by default a
    KafkaProducer is built from ``settings`` and closed at the end.
    """
    own_producer = producer is None
    producer = make_producer(settings) if own_producer else producer
    bucket = TokenBucket(rate) if rate else None
    acked: dict[str, int] = {}
    failures: list[BaseException] = []
    lock = threading.Lock()

    def on_success(metadata: Any) -> None:
        with lock:
            acked[metadata.topic] = acked.get(metadata.topic, 0) + 1

    def on_error(exc: BaseException) -> None:
        with lock:
            failures.append(exc)

    sent = 0
    start = time.monotonic()
    bar = tqdm(desc=desc, unit=" ev", unit_scale=True, disable=not progress, smoothing=0.1)
    try:
        for event in events:
            if failures:
                break
            if bucket is not None:
                bucket.take()
            topic, key = route(event, settings)
            future = producer.send(topic, key=key.encode("utf-8"), value=encode(event))
            future.add_callback(on_success)
            future.add_errback(on_error)
            sent += 1
            bar.update(1)
        producer.flush(timeout=flush_timeout_s)
    finally:
        bar.close()
        if own_producer:
            producer.close(timeout=10)
    elapsed = time.monotonic() - start
    if failures:
        raise ProduceError(f"{len(failures)} of {sent} sends failed; stopped early; first error: {failures[0]!r}")
    if sum(acked.values()) != sent:
        raise ProduceError(f"only {sum(acked.values())} of {sent} sends were acknowledged after flush")
    return ProduceStats(per_topic=dict(sorted(acked.items())), elapsed_s=elapsed)


def load_online_retail(
    path: str | Path,
    settings: Settings,
    limit: int | None = None,
    rate: float | None = None,
    progress: bool = True,
) -> ProduceStats:
    """``kg-streamer load online-retail PATH``: replay the UCI Online Retail CSV (file or dir)."""
    report = LoadReport("online_retail")
    events = online_retail.events(path, limit=limit, report=report)
    stats = produce(events, settings, rate=rate, progress=progress, desc="online-retail")
    stats.report = report
    return stats


def load_amazon(
    path: str | Path,
    settings: Settings,
    limit: int | None = None,
    rate: float | None = None,
    progress: bool = True,
    keep_external: bool = False,
) -> ProduceStats:
    """``kg-streamer load amazon DIR``: replay one Amazon 2018 category (meta + ratings)."""
    report = LoadReport("amazon")
    events = amazon.events(path, limit=limit, report=report, keep_external=keep_external)
    stats = produce(events, settings, rate=rate, progress=progress, desc="amazon")
    stats.report = report
    return stats
