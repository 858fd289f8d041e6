"""produce(): topic routing and keys, the rate cap, failure handling.

The broker-facing behaviour is covered against the embedded brokers by the integration tests;
here a recording stand-in for KafkaProducer checks the logic, and one test replays the
committed sample into a real broker when KGS_TEST_BOOTSTRAP_SERVERS names one.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from devtools.datasets import LoadReport, online_retail
from devtools.datasets.produce import ProduceError, TokenBucket, load_amazon, load_online_retail, produce, route
from streamer.settings import Settings

ROOT = Path(__file__).resolve().parents[3]
SAMPLE_RETAIL = ROOT / "data" / "sample" / "online_retail_sample.csv.gz"
SAMPLE_AMAZON = ROOT / "data" / "sample" / "amazon_magazine"


class Future:
    def __init__(self, topic: str, error: Exception | None):
        self.topic, self.error = topic, error
        self.callbacks: list[Callable[[Any], None]] = []
        self.errbacks: list[Callable[[Exception], None]] = []

    def add_callback(self, fn: Callable[[Any], None]) -> Future:
        self.callbacks.append(fn)
        return self

    def add_errback(self, fn: Callable[[Exception], None]) -> Future:
        self.errbacks.append(fn)
        if self.error is not None:  # a failed delivery reports as soon as it is known
            fn(self.error)
        return self

    def complete(self) -> None:
        if self.error is None:
            for fn in self.callbacks:
                fn(SimpleNamespace(topic=self.topic))


class RecordingProducer:
    def __init__(self, fail_at: int | None = None):
        self.sent: list[tuple[str, bytes, bytes]] = []
        self.pending: list[Future] = []
        self.fail_at = fail_at

    def send(self, topic: str, key: bytes, value: bytes) -> Future:
        error = RuntimeError("broker said no") if self.fail_at is not None and len(self.sent) == self.fail_at else None
        self.sent.append((topic, key, value))
        future = Future(topic, error)
        self.pending.append(future)
        return future

    def flush(self, timeout: float | None = None) -> None:
        for future in self.pending:
            future.complete()
        self.pending.clear()


def sample_events(limit: int) -> list[dict]:
    return list(online_retail.events(SAMPLE_RETAIL, limit=limit))


def test_route_and_keys() -> None:
    settings = Settings()
    relation = {
        "type": "relation",
        "src": {"label": "Product", "id": "A"},
        "rel": "ALSO_BOUGHT",
        "dst": {"label": "Product", "id": "B"},
    }
    assert route({"type": "product", "id": "85123A"}, settings) == (settings.topic_products, "85123A")
    assert route({"type": "interaction", "user_id": "17850", "product_id": "85123A"}, settings) == (
        settings.topic_interactions,
        "17850",
    )
    assert route(relation, settings) == (settings.topic_relations, "A")
    with pytest.raises(ValueError):
        route({"type": "nope"}, settings)


def test_produce_sends_in_order_and_counts_acks() -> None:
    events = sample_events(500)
    producer = RecordingProducer()
    stats = produce(events, Settings(), progress=False, producer=producer)
    assert [json.loads(value) for _, _, value in producer.sent] == events
    assert [key.decode() for _, key, _ in producer.sent] == [route(e, Settings())[1] for e in events]
    assert stats.per_topic == {
        "kg.interactions": sum(e["type"] == "interaction" for e in events),
        "kg.products": sum(e["type"] == "product" for e in events),
    }
    assert stats.events == 500 and stats.elapsed_s > 0


def test_produce_stops_and_raises_on_a_failed_send() -> None:
    producer = RecordingProducer(fail_at=10)
    with pytest.raises(ProduceError, match="broker said no"):
        produce(sample_events(500), Settings(), progress=False, producer=producer)
    assert len(producer.sent) == 11  # nothing more is sent after the failure is known


def test_rate_cap_is_honest() -> None:
    events = sample_events(300)
    started = time.monotonic()
    produce(events, Settings(), rate=1000, progress=False, producer=RecordingProducer())
    elapsed = time.monotonic() - started
    assert elapsed >= 299 / 1000  # 300 events at 1,000/s, no initial burst
    assert elapsed < 2.0


def test_token_bucket_with_a_fake_clock() -> None:
    now = [0.0]
    slept: list[float] = []

    def sleep(seconds: float) -> None:
        slept.append(seconds)
        now[0] += seconds

    bucket = TokenBucket(100, burst=5, clock=lambda: now[0], sleep=sleep)
    for _ in range(101):
        bucket.take()
    assert now[0] == pytest.approx(1.0)  # 101 events at 100/s: one free token, then 1 s
    now[0] += 10  # idle: at most `burst` saved up
    for _ in range(5):
        bucket.take()
    assert now[0] == pytest.approx(11.0)
    bucket.take()
    assert now[0] == pytest.approx(11.01)
    with pytest.raises(ValueError):
        TokenBucket(0)


def test_load_samples_into_a_real_broker(settings) -> None:
    """The committed samples replayed into the embedded broker the suite runs (topics per test)."""
    from tests.helpers import read_topic

    retail = load_online_retail(SAMPLE_RETAIL, settings, limit=2000, progress=False)
    amazon = load_amazon(SAMPLE_AMAZON, settings, limit=2000, progress=False)
    assert retail.events == 2000 and amazon.events == 2000
    assert isinstance(retail.report, LoadReport) and sum(retail.report.events.values()) == 2000

    received = [
        json.loads(r.value)
        for r in read_topic(settings, settings.topic_relations, expect=amazon.per_topic[settings.topic_relations])
    ]
    assert len(received) == amazon.per_topic[settings.topic_relations]
    assert all(r["type"] == "relation" for r in received)
    products = read_topic(
        settings,
        settings.topic_products,
        expect=retail.per_topic[settings.topic_products] + amazon.per_topic[settings.topic_products],
    )
    assert all(r.key.decode() == json.loads(r.value)["id"] for r in products)
