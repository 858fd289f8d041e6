"""Broker-facing behaviour of the ingest consumer, against BOTH embedded brokers.

Every test requests ``broker_kind`` and so runs once on noida-db and once on Tansu, with the
real ArcadeDB behind: consume and commit, restart after SIGTERM resumes, kill -9 and restart,
two consumers sharing a group, dead letters. The point is that the consumer does not lean on
one server's quirks (../shared/reference/environment.md lists them).

How the tests see the broker's side:

- committed offsets are read back with a separate ``KafkaConsumer(group_id=...).committed()``;
- log ends come from reading the topic (the last offset + 1 per partition), not from
  ``end_offsets()``, which Tansu answers wrongly;
- "equals a clean run" compares ``graph_snapshot`` of the events under test with the same
  events ingested once, uninterrupted, on topics and a group of their own (ids namespaced by
  prefix, so both live in the one graph DB).

Batches are small (``batch_max_events=5``) so that a signal lands between batches mid-stream.
"""

from __future__ import annotations

import ast
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest
from kafka import KafkaConsumer, KafkaProducer
from kafka.structs import TopicPartition

from streamer.ingest.step import ingest_consumer
from streamer.kafka.topics import ensure_topics
from streamer.settings import Settings
from tests.conftest import wait_for
from tests.helpers import event_message, graph_snapshot, produce_events, query, read_topic, sample_events, settings_env

REPO = Path(__file__).resolve().parents[3]
BATCH = 5


# --- helpers ------------------------------------------------------------------------------
def derive(settings: Settings, **overrides: Any) -> Settings:
    """A copy of ``settings`` with overrides. Not ``model_copy``: ``input_topics`` is a cached
    property, and a model_copy would keep the old topic names in it."""
    return Settings(_env_file=None, **{**settings.model_dump(), **overrides})


def clean_run(settings: Settings, events: list[dict]) -> None:
    """Ingest ``events`` in one uninterrupted in-process run, on topics and a group of their own."""
    names = ("topic_products", "topic_interactions", "topic_relations", "topic_changes", "topic_embeddings", "topic_dlq")
    clean = derive(
        settings,
        ingest_group=settings.ingest_group + "-clean",
        **{name: getattr(settings, name) + "-clean" for name in names},
    )
    ensure_topics(clean)
    produce_events(clean, events)
    stats = ingest_consumer(clean).run(until_caught_up=True, max_seconds=90)
    assert stats.events_in == len(events) and stats.dead_letters == 0


def committed_offsets(settings: Settings) -> dict[TopicPartition, int]:
    """The group's committed offset of every input partition (0 where nothing was committed)."""
    consumer = KafkaConsumer(
        bootstrap_servers=settings.bootstrap_servers, group_id=settings.ingest_group, enable_auto_commit=False
    )
    try:
        return {
            TopicPartition(topic, p): consumer.committed(TopicPartition(topic, p)) or 0
            for topic in settings.input_topics
            for p in range(settings.input_partitions)
        }
    finally:
        consumer.close()


def log_ends(settings: Settings, counts: dict[str, int]) -> dict[TopicPartition, int]:
    """Offset after the last record of every input partition, read from the topics themselves."""
    ends = {TopicPartition(t, p): 0 for t in settings.input_topics for p in range(settings.input_partitions)}
    for topic in settings.input_topics:
        records = read_topic(settings, topic, expect=counts.get(topic, 0), timeout_s=20)
        assert len(records) == counts.get(topic, 0), topic
        for r in records:
            tp = TopicPartition(r.topic, r.partition)
            ends[tp] = max(ends[tp], r.offset + 1)
    return ends


def topic_counts(settings: Settings, messages: Iterable[tuple[str, Any, Any]]) -> dict[str, int]:
    return dict(Counter(topic for topic, *_ in messages))


def assert_same_graph(settings: Settings, prefix: str) -> None:
    """The graph of the run under test (``<prefix>run-``) equals the clean run's (``<prefix>clean-``).

    Compared as readers see it: tombstoned relationships are left out. A relation delete leaves
    a tombstone only where both ends already exist; when the create and the delete of one
    relation coalesce in a batch that precedes the products (another topic), no relationship is
    written at all, which readers cannot tell from a tombstone. Tombstoned nodes are compared.
    """
    got, want = (live_view(graph_snapshot(settings, prefix + side)) for side in ("run-", "clean-"))
    for part in ("nodes", "relationships"):
        assert {"missing": sorted(set(want[part]) - set(got[part])), "extra": sorted(set(got[part]) - set(want[part]))} == {
            "missing": [],
            "extra": [],
        }, part
    assert got == want


def live_view(snapshot: dict) -> dict:
    """`snapshot` without its tombstoned relationships (props ``{"deleted": true, "ts": …}``)."""
    return {**snapshot, "relationships": [r for r in snapshot["relationships"] if not json.loads(r[-1]).get("deleted")]}


def product_count(settings: Settings, prefix: str) -> int:
    return query(settings, "MATCH (p:Product) WHERE p.id STARTS WITH $p RETURN count(p) AS n", p=prefix)[0]["n"]


class IngestProcess:
    """``python -m streamer.cli ingest ...`` in a child process; stdout (the JSON summary) and
    stderr (the log) are read as they come."""

    def __init__(self, settings: Settings, *args: str):
        env = {**os.environ, **settings_env(settings), "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "streamer.cli", "ingest", *args],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.out: list[str] = []
        self.log: list[str] = []
        self._readers = [
            threading.Thread(target=self._drain, args=(stream, sink), daemon=True)
            for stream, sink in ((self.proc.stdout, self.out), (self.proc.stderr, self.log))
        ]
        for reader in self._readers:
            reader.start()

    @staticmethod
    def _drain(stream, sink: list[str]) -> None:
        for line in stream:
            sink.append(line)

    def assignment(self) -> set[str] | None:
        """The partitions of the last ``assigned [...]`` log line, None before the first."""
        last = None
        for line in list(self.log):
            if ": assigned [" in line:
                last = set(ast.literal_eval(line.split(": assigned ", 1)[1].strip()))
        return last

    def send(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def wait(self, timeout_s: float) -> int:
        try:
            rc = self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"ingest did not exit within {timeout_s}s:\n{self.tail()}") from None
        for reader in self._readers:
            reader.join(timeout=5)
        return rc

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def summary(self) -> dict:
        text = "".join(self.out)
        assert "{" in text, f"no summary on stdout:\n{text}\n{self.tail()}"
        return json.loads(text[text.index("{") :])

    def tail(self, lines: int = 40) -> str:
        return "".join(self.log[-lines:])


@pytest.fixture
def ingest_process():
    """Factory for IngestProcess; whatever is still running after the test is killed."""
    started: list[IngestProcess] = []

    def start(settings: Settings, *args: str) -> IngestProcess:
        process = IngestProcess(settings, *args)
        started.append(process)
        return process

    yield start
    for process in started:
        process.kill()


@pytest.fixture
def prefix() -> str:
    return f"b{uuid.uuid4().hex[:8]}-"


def _interrupted_run(settings, broker_kind, prefix, ingest_process, sig):
    """Start ingest in a child, send ``sig`` once some batches are in the graph, return what we know.
    The stream is long enough (~160 batches) that the child is still running when the test,
    polling the graph and the group's commits, sees the first batches: with 40 products it
    sometimes finished the whole stream between two looks (CI, stop 23)."""
    clean_run(settings, sample_events(prefix + "clean-", products=160))
    events = sample_events(prefix + "run-", products=160)
    run = derive(
        settings,
        batch_max_events=BATCH,
        # noida-db never evicts a member killed with -9: static membership lets the restart take its place
        group_instance_id="ingest-0" if broker_kind == "noida" and sig == signal.SIGKILL else None,
    )
    produce_events(run, events)
    ends = log_ends(run, topic_counts(run, (event_message(run, e) for e in events)))
    first = ingest_process(run, "--until-caught-up", "--max-seconds", "120")
    # some batches in the graph and committed (a batch is committed once the next one is
    # written: one batch in flight, streamer/kafka/consumer.py)
    wait_for(
        lambda: (
            first.proc.poll() is not None
            or (product_count(settings, prefix + "run-") >= 12 and sum(committed_offsets(run).values()) > 0)
        ),
        timeout_s=90,
        interval_s=0.02,
        what="the first batches in the graph and committed",
    )
    assert first.proc.poll() is None, "ingest ended before the signal:\n" + first.tail()
    first.send(sig)
    rc = first.wait(30)
    committed = committed_offsets(run)
    done = sum(committed.values())
    assert 0 < done < len(events), f"the signal should land mid-stream (committed {done} of {len(events)})\n{first.tail()}"
    assert all(committed[tp] <= ends[tp] for tp in ends)
    return run, events, ends, first, rc, done


def _restart_and_check(settings, run, events, ends, done, prefix, ingest_process):
    restart = ingest_process(run, "--until-caught-up", "--max-seconds", "120")
    assert restart.wait(150) == 0, restart.tail()
    # it resumed at the committed offsets: nothing before them is consumed again. (A commit that
    # the group refuses after a rebalance replays that one batch: the bound the design allows.)
    replayed = restart.summary()["events_in"] - (len(events) - done)
    assert 0 <= replayed <= BATCH, f"replayed {replayed}\n{restart.tail(80)}"
    assert committed_offsets(run) == ends, restart.tail(80)
    assert_same_graph(settings, prefix)


# --- tests --------------------------------------------------------------------------------
def test_consume_and_commit_up_to_the_log_end(settings, broker_kind, prefix):
    """--until-caught-up leaves the group's committed offsets at the log end of every partition,
    and a second run of the group consumes only what was produced after the first."""
    run = derive(settings, batch_max_events=BATCH)
    events = sample_events(prefix, products=12)
    produce_events(run, events)
    counts = topic_counts(run, (event_message(run, e) for e in events))
    ends = log_ends(run, counts)
    assert sum(1 for end in ends.values() if end) > 3, "events should spread over the partitions"
    assert committed_offsets(run) == {tp: 0 for tp in ends}

    stats = ingest_consumer(run).run(until_caught_up=True, max_seconds=90)
    assert stats.events_in == len(events) and stats.dead_letters == 0
    assert stats.batches >= len(events) // BATCH
    assert committed_offsets(run) == ends
    assert product_count(settings, prefix) == 12
    changes = read_topic(run, run.topic_changes)
    assert len(changes) == stats.changes_published > 0

    # the same group again: only the new events
    more = [{"type": "product", "id": f"{prefix}late{i}", "title": f"late {i}", "ts": 2_000_000_000 + i} for i in range(7)]
    produce_events(run, more)
    counts[run.topic_products] += len(more)
    ends = log_ends(run, counts)
    stats = ingest_consumer(run).run(until_caught_up=True, max_seconds=90)
    assert stats.events_in == len(more)
    assert committed_offsets(run) == ends
    assert product_count(settings, prefix) == 12 + len(more)
    # and once more: nothing left
    assert ingest_consumer(run).run(until_caught_up=True, max_seconds=90).events_in == 0


def test_restart_after_sigterm_resumes_from_committed_offsets(settings, broker_kind, prefix, ingest_process):
    run, events, ends, first, rc, done = _interrupted_run(settings, broker_kind, prefix, ingest_process, signal.SIGTERM)
    assert rc == 0, first.tail()
    # graceful: the batch in hand was finished through commit, nothing was left uncommitted
    assert first.summary()["events_in"] == done
    _restart_and_check(settings, run, events, ends, done, prefix, ingest_process)


def test_kill_9_mid_stream_then_restart_resumes(settings, broker_kind, prefix, ingest_process):
    run, events, ends, first, rc, done = _interrupted_run(settings, broker_kind, prefix, ingest_process, signal.SIGKILL)
    assert rc == -signal.SIGKILL
    # written but not committed: at most the one batch the kill interrupted (replayed harmlessly)
    _restart_and_check(settings, run, events, ends, done, prefix, ingest_process)


def test_a_rebalance_that_gives_the_partitions_back_replays_the_dropped_batch(settings, broker_kind, prefix, caplog):
    """Eager rebalance with a batch in hand: the batch is dropped on revoke, and here the group
    gives the member all its partitions back. kafka-python keeps their positions (past the
    dropped messages), so the member must rewind them: the group ends at the log end and the
    graph equals a clean run. The rebalance is a real one on the broker; the member asks for it
    itself (``request_rejoin``, kafka-python's own trigger, e.g. on a metadata change), which
    is the one way to get a rebalance that hands back exactly the same partitions."""
    clean_run(settings, sample_events(prefix + "clean-", products=40))
    events = sample_events(prefix + "run-", products=40)
    run = derive(settings, batch_max_events=10_000, batch_max_wait_s=3_600)  # hold everything
    produce_events(run, events)
    ends = log_ends(run, topic_counts(run, (event_message(run, e) for e in events)))
    ingest = ingest_consumer(run)
    caplog.set_level(logging.INFO, logger="streamer.kafka.consumer")
    wait_for(
        lambda: (ingest.poll_once(), len(ingest.pending) == len(events))[1],
        timeout_s=60,
        interval_s=0,
        what="the whole stream in hand, unwritten",
    )
    ingest.consumer._coordinator.request_rejoin()

    def dropped_and_assigned_again() -> bool:
        ingest.poll_once()
        text = caplog.text
        at = text.find(f"dropping {len(events)} uncommitted")
        return at >= 0 and "assigned [" in text[at:]

    wait_for(
        dropped_and_assigned_again,
        timeout_s=60,
        interval_s=0,
        what="the rebalance to drop the batch in hand and assign the partitions again",
    )
    assert ingest.consumer.assignment() == set(ends), "the member got all its partitions back"
    assert product_count(settings, prefix + "run-") == 0, "nothing was written before the rebalance"
    ingest.max_wait_s = 0.2
    stats = ingest.run(until_caught_up=True, max_seconds=90)
    assert stats.events_applied == len(events), caplog.text[-3000:]
    assert committed_offsets(run) == ends
    assert_same_graph(settings, prefix)


def test_two_consumers_in_one_group_share_the_partitions(settings, broker_kind, prefix, ingest_process):
    clean_run(settings, sample_events(prefix + "clean-", products=40))
    events = sample_events(prefix + "run-", products=40)
    run = derive(settings, batch_max_events=BATCH)
    a = ingest_process(run, "--max-seconds", "150")
    b = ingest_process(run, "--max-seconds", "150")
    every = {f"{t}[{p}]" for t in run.input_topics for p in range(run.input_partitions)}

    def split() -> bool:
        sa, sb = a.assignment(), b.assignment()
        return bool(sa and sb and not sa & sb and sa | sb == every)

    wait_for(split, timeout_s=90, interval_s=0.1, what="both consumers to hold a share of the partitions")
    share_a, share_b = a.assignment(), b.assignment()

    produce_events(run, events)
    ends = log_ends(run, topic_counts(run, (event_message(run, e) for e in events)))
    wait_for(lambda: committed_offsets(run) == ends, timeout_s=90, interval_s=0.5, what="the group to commit the log end")
    # (the first to stop leaves the group, and the other may take every partition for its last poll)
    assert (a.assignment(), b.assignment()) == (share_a, share_b), "no rebalance while consuming"
    for process in (a, b):
        process.send(signal.SIGTERM)
    assert a.wait(30) == 0, a.tail()
    assert b.wait(30) == 0, b.tail()

    dead = [(dict(r.headers), r.value) for r in read_topic(run, run.topic_dlq, timeout_s=3)]
    assert (a.summary()["dead_letters"], b.summary()["dead_letters"], dead) == (0, 0, [])
    got_a, got_b = a.summary()["events_in"], b.summary()["events_in"]
    assert got_a > 0 and got_b > 0, (got_a, got_b)
    assert got_a + got_b == len(events), "every event consumed once, by one of the two"
    assert committed_offsets(run) == ends, a.tail(40) + b.tail(40)
    assert_same_graph(settings, prefix)


def _produce_with_headers(settings: Settings, messages: list[tuple[str, bytes, bytes, list]]) -> None:
    producer = KafkaProducer(bootstrap_servers=settings.bootstrap_servers, acks="all", max_in_flight_requests_per_connection=1)
    futures = [producer.send(t, key=k, value=v, headers=h) for t, k, v, h in messages]
    producer.flush()
    for future in futures:
        future.get(timeout=10)
    producer.close()


def test_invalid_messages_land_in_the_dlq_with_source_headers(settings, broker_kind, prefix):
    run = derive(settings, batch_max_events=BATCH)
    bad = {  # value -> expected error class; one or more on every input topic
        (run.topic_products, b"{not json 1"): "NotJson",
        (run.topic_products, b'{"type": "coupon", "id": "x", "ts": 2}'): "UnknownEventType",
        (run.topic_products, b'{"type": "product", "id": "x", "price": "cheap", "ts": 3}'): "ValidationError",
        (run.topic_interactions, b'{"type": "interaction", "product_id": "p", "action": "view", "ts": 4}'): "ValidationError",
        (run.topic_interactions, b"[5]"): "NotAnObject",
        (
            run.topic_relations,
            b'{"type": "relation", "src": {"label": "Admin", "id": "a"}, "rel": "R",'
            b' "dst": {"label": "Product", "id": "b"}, "ts": 6}',
        ): "ValidationError",
        (run.topic_relations, b""): "EmptyMessage",
    }
    messages = []
    for i, (topic, value) in enumerate(bad):
        good = {"type": "product", "id": f"{prefix}good{i}", "ts": 10 + i}
        t, k, v = event_message(run, good)
        messages.append((t, k, v, [("trace-id", f"good-{i}".encode())]))
        messages.append((topic, f"{prefix}bad{i}".encode(), value, [("trace-id", f"bad-{i}".encode())]))
    _produce_with_headers(run, messages)
    ends = log_ends(run, topic_counts(run, messages))

    stats = ingest_consumer(run).run(until_caught_up=True, max_seconds=90)
    assert stats.events_in == len(messages)
    assert stats.dead_letters == len(bad)
    assert product_count(settings, f"{prefix}good") == len(bad), "the valid events around them are applied"
    assert committed_offsets(run) == ends, "dead-lettered messages are committed like the others"

    sources = {}
    for topic in run.input_topics:
        for r in read_topic(run, topic, expect=sum(1 for m in messages if m[0] == topic)):
            sources[(r.topic, r.value)] = r
    dlq = read_topic(run, run.topic_dlq, expect=len(bad))
    assert len(dlq) == len(bad)
    seen = set()
    for record in dlq:
        headers = dict(record.headers)
        source_topic = headers["__connect.errors.topic"].decode()
        src = sources[(source_topic, record.value)]
        seen.add((source_topic, record.value))
        assert record.key == src.key and record.key.startswith(f"{prefix}bad".encode())
        assert headers["trace-id"] == dict(src.headers)["trace-id"], "the original headers are kept"
        assert int(headers["__connect.errors.partition"]) == src.partition
        assert int(headers["__connect.errors.offset"]) == src.offset
        assert headers["__connect.errors.stage"] == b"decode"
        assert headers["__connect.errors.exception.class.name"].decode() == bad[(source_topic, record.value)]
        assert headers["__connect.errors.exception.message"]
    assert seen == set(bad)

    # a restart of the group does not dead-letter them again
    assert ingest_consumer(run).run(until_caught_up=True, max_seconds=90).events_in == 0
    time.sleep(0.5)
    assert len(read_topic(run, run.topic_dlq, expect=len(bad))) == len(bad)
