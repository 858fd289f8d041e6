"""Backpressure and graceful shutdown of the ingest consumer, with the real ArcadeDB.

The graph DB is taken away with a TCP proxy (tests/helpers_proxy.py) between the consumer and
ArcadeDB's Bolt port: ``cut("refuse")`` (connection refused, as when the server is gone) or
``cut("drop")`` (accepted, then closed before a byte is forwarded), and ``restore()``. The
broker is the default embedded one; the broker-facing behaviour on both brokers is in
tests/streamer/kafka/test_broker_behaviour.py, whose helpers these tests share.

- an outage while events are pending: the consumer pauses its partitions, commits nothing,
  keeps its group membership for longer than ``max_poll_interval_ms`` (it never blocks the
  poll loop), keeps retrying; once the DB is back it resumes, and the graph equals a clean
  run with every event consumed once and the offsets committed to the log end;
- SIGTERM mid-stream (DB up): exit 0, and the offsets, the graph and kg.changes agree on
  exactly which events were processed (whole batches only);
- SIGTERM while paused (DB down): exit 0 at once, the held batch abandoned (not committed,
  not half written); a restart replays it;
- two writers creating the same node at once (two consumers of a group): the unique-
  constraint race is retried, not dead-lettered.
"""

from __future__ import annotations

import json
import signal
import threading
import time
import urllib.request
import uuid
from urllib.parse import urlsplit

import pytest
from kafka.structs import TopicPartition
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from sinks.graph_db import GraphSink
from streamer.ingest.step import ingest_consumer
from streamer.kafka.consumer import BatchingConsumer
from streamer.settings import Settings
from tests.conftest import free_port, wait_for
from tests.helpers import event_message, produce_events, query, read_topic, sample_events
from tests.helpers_proxy import TcpProxy
from tests.streamer.kafka.test_broker_behaviour import (
    IngestProcess,
    assert_same_graph,
    clean_run,
    committed_offsets,
    derive,
    log_ends,
    topic_counts,
)


# --- fixtures and helpers -----------------------------------------------------------------
@pytest.fixture
def prefix() -> str:
    return f"bp{uuid.uuid4().hex[:8]}-"


@pytest.fixture
def bolt_proxy(settings: Settings):
    uri = urlsplit(settings.bolt_uri)
    with TcpProxy(uri.hostname, uri.port) as proxy:
        yield proxy


@pytest.fixture
def ingest_process():
    started: list[IngestProcess] = []

    def start(settings: Settings, *args: str) -> IngestProcess:
        started.append(IngestProcess(settings, *args))
        return started[-1]

    yield start
    for process in started:
        process.kill()


def through(proxy: TcpProxy, settings: Settings, **overrides) -> Settings:
    """Settings whose graph DB is reached through ``proxy``; quick retries and pauses."""
    values = dict(
        bolt_uri=f"bolt://127.0.0.1:{proxy.port}",
        batch_max_events=5,
        batch_max_wait_s=0.2,
        graph_retry_attempts=2,
        graph_retry_base_s=0.05,
        graph_retry_max_s=0.1,
        backpressure_pause_s=0.5,
    )
    return derive(settings, **{**values, **overrides})


def ends_of(settings: Settings, events: list[dict]):
    return log_ends(settings, topic_counts(settings, (event_message(settings, e) for e in events)))


def products(prefix: str, n: int, start: int = 0) -> list[dict]:
    """Product upserts with distinct ids: the set of ids processed can be read off the graph."""
    return [
        {"type": "product", "id": f"{prefix}p{i:04d}", "title": f"t{i}", "brand": f"{prefix}b{i % 4}", "ts": 1_000 + i}
        for i in range(start, start + n)
    ]


def graph_product_ids(settings: Settings, prefix: str) -> set[str]:
    rows = query(settings, "MATCH (p:Product) WHERE p.id STARTS WITH $p RETURN p.id AS id", p=prefix)
    return {r["id"] for r in rows}


def committed_product_ids(settings: Settings, expect: int) -> set[str]:
    """Ids of the product events below the group's committed offsets."""
    committed = committed_offsets(settings)
    records = read_topic(settings, settings.topic_products, expect=expect)
    assert len(records) == expect
    return {json.loads(r.value)["id"] for r in records if r.offset < committed[TopicPartition(r.topic, r.partition)]}


def sample(name: str, settings: Settings, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, {"group": settings.ingest_group, **labels}) or 0.0


def scrape(port: int, name: str, settings: Settings) -> float | None:
    """One sample of a child process's /metrics, for this group."""
    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2).read().decode()
    except OSError:
        return None
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and s.labels.get("group") == settings.ingest_group:
                return s.value
    return None


class InThread:
    """the ingest consumer's ``run`` in a thread (long-lived mode); ``stop()`` returns its stats."""

    def __init__(self, ingest: BatchingConsumer, max_seconds: float = 150):
        self.ingest = ingest
        self.result: dict = {}
        self.thread = threading.Thread(target=self._run, args=(max_seconds,), name="ingest", daemon=True)
        self.thread.start()

    def _run(self, max_seconds: float) -> None:
        try:
            self.result["stats"] = self.ingest.run(max_seconds=max_seconds)
        except BaseException as exc:
            self.result["error"] = exc

    def alive(self) -> bool:
        assert "error" not in self.result, repr(self.result.get("error"))
        return self.thread.is_alive()

    def stop(self, timeout_s: float = 30):
        self.ingest.stop()
        self.thread.join(timeout_s)
        assert not self.thread.is_alive(), "ingest did not stop"
        if "error" in self.result:
            raise self.result["error"]
        return self.result["stats"]


def membership(ingest: BatchingConsumer) -> tuple[int, str]:
    meta = ingest.consumer.group_metadata()
    return meta.generation_id, meta.member_id


# --- tests --------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["refuse", "drop"])
def test_graph_outage_pauses_partitions_then_resumes_without_loss(settings, prefix, bolt_proxy, mode):
    clean_run(settings, sample_events(prefix + "clean-"))
    events = sample_events(prefix + "run-")
    before, during = events[:50], events[50:]
    max_poll_interval_ms = 3_000
    run = through(bolt_proxy, settings, batch_max_events=10, max_poll_interval_ms=max_poll_interval_ms)
    ingest = ingest_consumer(run)
    runner = InThread(ingest)
    try:
        # 1. the DB answers: the first events go through and are committed
        produce_events(run, before)
        ends_before = ends_of(run, before)
        wait_for(lambda: committed_offsets(run) == ends_before, timeout_s=60, interval_s=0.2, what="the first events committed")
        assert sample("kgs_backpressure_paused", run) == 0
        member, assigned = membership(ingest), set(ingest.consumer.assignment())
        assert member[1] and len(assigned) == 3 * run.input_partitions
        errors = sample("kgs_graph_errors_total", run, outcome="unavailable")

        # 2. the DB goes away while more events arrive: the consumer pauses its partitions
        bolt_proxy.cut(mode)
        produce_events(run, during)
        wait_for(lambda: sample("kgs_backpressure_paused", run) == 1, timeout_s=30, what="the backpressure gauge")
        assert set(ingest.consumer.paused()) == assigned
        assert ingest.pending, "the failed batch is kept, not dropped"
        # ... and stays so, committing nothing, for longer than max.poll.interval.ms: a consumer
        # that blocked its poll loop in retries would have been expelled from the group by now
        held_until = time.monotonic() + max_poll_interval_ms / 1000 + 1.5
        while time.monotonic() < held_until:
            assert committed_offsets(run) == ends_before, "nothing is committed while the DB is down"
            assert sample("kgs_backpressure_paused", run) == 1
            assert runner.alive()
            time.sleep(0.3)
        assert membership(ingest) == member, "kept its group membership (same generation and member id)"
        assert set(ingest.consumer.assignment()) == assigned
        retries = sample("kgs_graph_errors_total", run, outcome="unavailable") - errors
        assert retries >= 3, f"it keeps retrying every backpressure_pause_s ({retries} tries)"

        # 3. the DB is back: resume, finish, commit to the end
        bolt_proxy.restore()
        ends_all = ends_of(run, events)
        wait_for(lambda: committed_offsets(run) == ends_all, timeout_s=60, interval_s=0.2, what="everything committed")
        assert sample("kgs_backpressure_paused", run) == 0
        assert not ingest.consumer.paused()
        assert membership(ingest) == member, "no rebalance through the outage"
    finally:
        stats = runner.stop()
    assert stats.events_in == len(events), "every message consumed once (the held batch was not fetched again)"
    assert stats.events_applied == len(events) and stats.dead_letters == 0
    assert_same_graph(settings, prefix)
    assert bolt_proxy.forwarded > 1, "the consumer reconnected through the proxy"


def test_sigterm_mid_stream_exits_0_and_commits_whole_batches_only(settings, prefix, ingest_process):
    run = derive(settings, batch_max_events=5)
    events = products(prefix, 150)
    produce_events(run, events)
    proc = ingest_process(run, "--until-caught-up", "--max-seconds", "120")
    wait_for(
        lambda: proc.proc.poll() is not None or len(graph_product_ids(settings, prefix)) >= 20,
        timeout_s=90,
        interval_s=0.02,
        what="the first batches in the graph",
    )
    assert proc.proc.poll() is None, "ingest ended before the signal:\n" + proc.tail()
    proc.send(signal.SIGTERM)
    assert proc.wait(30) == 0, proc.tail()

    committed = committed_product_ids(run, expect=len(events))
    assert 0 < len(committed) < len(events), "the signal should land mid-stream"
    # offsets, graph and changelog agree: every committed event is applied, and nothing is
    # applied (or published) whose offset was not committed: the last batch was finished
    assert graph_product_ids(settings, prefix) == committed
    published = {json.loads(r.value)["key"] for r in read_topic(run, run.topic_changes)}
    assert {k for k in published if k.startswith("Product:")} == {f"Product:{i}" for i in committed}
    summary = proc.summary()
    assert summary["events_in"] == summary["events_applied"] == len(committed)


def test_sigterm_while_paused_exits_0_and_abandons_the_held_batch(settings, prefix, bolt_proxy, ingest_process):
    metrics_port = free_port()
    run = through(bolt_proxy, settings, metrics_addr=f"127.0.0.1:{metrics_port}")
    first, later = products(prefix, 40), products(prefix, 40, start=40)
    produce_events(run, first)
    proc = ingest_process(run, "--max-seconds", "120")
    ends_first = ends_of(run, first)
    wait_for(lambda: committed_offsets(run) == ends_first, timeout_s=60, interval_s=0.2, what="the first events committed")

    bolt_proxy.cut("refuse")
    produce_events(run, later)
    wait_for(lambda: scrape(metrics_port, "kgs_backpressure_paused", run) == 1, timeout_s=30, what="backpressure in the child")
    proc.send(signal.SIGTERM)
    sent = time.monotonic()
    assert proc.wait(30) == 0, proc.tail()
    assert time.monotonic() - sent < 10, "a paused consumer stops promptly"
    assert "pausing partitions" in proc.tail(400)

    assert committed_offsets(run) == ends_first, "the held batch is not committed"
    assert graph_product_ids(settings, prefix) == {e["id"] for e in first}, "nor written, in whole or in part"
    summary = proc.summary()
    assert summary["events_applied"] == summary["events_in"] == len(first), "the held batch counts as not taken in"
    assert "records held by backpressure (not committed" in proc.tail(400)

    # the DB is back: a restart replays the abandoned batch and the rest, nothing before
    bolt_proxy.restore()
    restart = ingest_process(derive(run, metrics_addr=""), "--until-caught-up", "--max-seconds", "120")
    assert restart.wait(120) == 0, restart.tail()
    assert restart.summary()["events_in"] == len(later)
    assert committed_offsets(run) == ends_of(run, first + later)
    assert graph_product_ids(settings, prefix) == {e["id"] for e in first + later}


class RacingSink(GraphSink):
    """Before its first commit, another session creates (and commits) the first product of the
    batch: what a second consumer of the group does when both MERGE the same new node."""

    raced = 0

    def _products(self, tx, batch, result):
        super()._products(tx, batch, result)
        if not self.raced and batch.product_upserts:
            self.raced += 1
            with self.driver.session(database=self.database) as other:
                other.execute_write(lambda t: t.run("MERGE (p:Product {id: $id})", id=batch.product_upserts[0]["id"]).consume())


def test_concurrent_create_of_the_same_node_is_retried_not_dead_lettered(settings, prefix):
    # one event per batch: a refusal of a one-event batch is dead-lettered at once (no bisection
    # that would rewrite it and, by luck, succeed)
    run = derive(settings, batch_max_events=1)
    events = products(prefix, 3)
    produce_events(run, events)
    sink = RacingSink(run)
    stats = ingest_consumer(run, graph=sink).run(until_caught_up=True, max_seconds=60)
    assert sink.raced == 1
    assert stats.batches == len(events)
    assert stats.dead_letters == 0, stats.by_error
    assert sample("kgs_graph_retries_total", run) == 1, "the race was retried once"
    assert stats.events_applied == len(events)
    rows = query(settings, "MATCH (p:Product) WHERE p.id STARTS WITH $p RETURN p.id AS id, p.title AS t ORDER BY id", p=prefix)
    assert rows == [{"id": e["id"], "t": e["title"]} for e in events]
