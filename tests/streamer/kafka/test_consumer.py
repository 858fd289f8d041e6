"""``streamer.kafka.consumer`` against BOTH embedded brokers: ``caught_up`` and ``commit_after``.

The case that matters is a commit the group refuses because a rebalance began after the batch
was polled. The batch is durable but uncommitted; ``commit_after`` must rewind the partitions so
that ``caught_up`` (what ``--until-caught-up`` stops on) does not call them done before the
replay is committed. A second member joining the group is what starts the rebalance, as in
production; nothing is mocked.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from kafka import KafkaConsumer
from kafka.structs import TopicPartition

from streamer.kafka.consumer import caught_up, commit_after, make_consumer
from tests.conftest import wait_for
from tests.helpers import PassStep, produce


def _poll_all(consumer: KafkaConsumer, expect: int, timeout_s: float = 30.0) -> list:
    records: list = []
    deadline = time.monotonic() + timeout_s
    while len(records) < expect and time.monotonic() < deadline:
        for batch in consumer.poll(timeout_ms=200).values():
            records.extend(batch)
    assert len(records) == expect, f"polled {len(records)} of {expect}"
    return records


def _produce(settings, n: int) -> str:
    """``n`` small messages on the products topic (3 partitions); returns the topic."""
    produce(settings, ((settings.topic_products, f"k{i}".encode(), b"{}") for i in range(n)))
    return settings.topic_products


def _bounds(records) -> tuple[dict[TopicPartition, int], dict[TopicPartition, int]]:
    """Per partition: the first offset among ``records`` and the offset after the last."""
    first: dict[TopicPartition, int] = {}
    end: dict[TopicPartition, int] = {}
    for r in records:
        tp = TopicPartition(r.topic, r.partition)
        first[tp] = min(first.get(tp, r.offset), r.offset)
        end[tp] = max(end.get(tp, 0), r.offset + 1)
    return first, end


def _committed(settings, group: str, tps: list[TopicPartition]) -> dict[TopicPartition, int | None]:
    reader = KafkaConsumer(bootstrap_servers=settings.bootstrap_servers, group_id=group, enable_auto_commit=False)
    try:
        return {tp: reader.committed(tp) for tp in tps}
    finally:
        reader.close()


def test_caught_up_and_commit_after(settings, broker_kind):
    n = 9
    topic = _produce(settings, n)
    group = settings.ingest_group
    consumer = make_consumer(settings, group, "t-consumer", 100)
    try:
        consumer.subscribe([topic])
        assert not caught_up(consumer), "no assignment yet"
        records = _poll_all(consumer, n)
        assert not caught_up(consumer), "read to the end, but not committed yet"
        _, ends = _bounds(records)
        assert commit_after(consumer, group, records) == ends
        assert caught_up(consumer)
    finally:
        consumer.close()
    assert _committed(settings, group, list(ends)) == ends


# Tansu keeps accepting the commits of a member that does not poll while a newcomer waits to
# join (measured: 60 s of accepted commits, the newcomer unassigned), so the refusal can only be
# staged on noida-db. Both refuse commits from a polling member during a rebalance
# (../shared/reference/environment.md); the ingest tests cover that path on both.
@pytest.mark.parametrize("broker_kind", ["noida"])
def test_refused_commit_rewinds_so_caught_up_waits_for_the_replay(settings, broker_kind):
    n = 12
    topic = _produce(settings, n)
    group = settings.ingest_group
    first = make_consumer(settings, group, "t-first", 100)
    second = make_consumer(settings, group, "t-second", 100)
    stop = threading.Event()
    joiner = None
    try:
        first.subscribe([topic])
        records = _poll_all(first, n)
        assert not caught_up(first), "read to the end, but not committed yet"
        starts, _ = _bounds(records)

        # a second member joins: the group starts rebalancing while `first` holds its batch
        def join() -> None:
            second.subscribe([topic])
            while not stop.is_set():
                second.poll(timeout_ms=100)

        joiner = threading.Thread(target=join, daemon=True)
        joiner.start()
        # `first` does not poll, so it cannot rejoin; once its heartbeat learns of the rebalance
        # the commit is refused (until then each attempt commits the same offsets again)
        wait_for(
            lambda: commit_after(first, group, records) == {}, timeout_s=60, interval_s=0.1, what="the group to refuse the commit"
        )
        # the batch is rewound: the positions are back at the batch's start (and it is not caught up)
        assert {tp: first.position(tp) for tp in starts} == starts
        assert not caught_up(first)
    finally:
        stop.set()
        if joiner is not None:
            joiner.join(timeout=10)
        first.close()
        second.close()


class _Collect(PassStep):
    """A step that keeps what it is given (the chain's contract: ``process`` sees whole batches)."""

    def __init__(self) -> None:
        self.values: list[bytes] = []

    def process(self, batch) -> None:
        self.values.extend(r.value for r in batch.records)


@contextmanager
def collecting_consumer(settings, group: str) -> Iterator[tuple[Any, _Collect, Any]]:
    """A ``BatchingConsumer`` over the products topic running in a thread with a ``_Collect``
    step: yields (consumer, what it collected, its group's client-rebuild counter)."""
    from streamer import metrics as m
    from streamer.kafka.consumer import BatchingConsumer

    collect = _Collect()
    consumer = BatchingConsumer(settings, group, [settings.topic_products], group, [collect], max_batch=50, max_wait_s=0.05)
    thread = threading.Thread(target=consumer.run, daemon=True)
    thread.start()
    try:
        yield consumer, collect, m.CLIENT_REBUILDS.labels(group)
        assert thread.is_alive()
    finally:
        consumer.stop()
        thread.join(60)


def produce_named(settings, prefix: str) -> set[bytes]:
    """Ten messages ``<prefix>0`` .. ``<prefix>9`` on the products topic; returns their values."""
    values = [f"{prefix}{i}".encode() for i in range(10)]
    produce(settings, ((settings.topic_products, v, v) for v in values))
    return set(values)


def test_a_client_cut_off_from_its_coordinator_is_rebuilt_and_reads_on(make_services):
    """The broker goes away for longer than ``consumer_stall_s`` twice over: the consumer rebuilds
    its Kafka client (counted) and, once the broker is back, reads what is produced after, with
    nothing skipped and nothing read twice past the commit."""
    from streamer.kafka.topics import ensure_topics

    services = make_services(("broker",), local_broker="noida")
    settings = services.settings.model_copy(update={"consumer_stall_s": 2.0, "session_timeout_ms": 6000})
    ensure_topics(settings)
    with collecting_consumer(settings, f"stall-{time.monotonic_ns()}") as (_, collect, rebuilds):
        first = produce_named(settings, "a")
        wait_for(lambda: len(collect.values) >= 10, timeout_s=60, what="the first messages")
        before = rebuilds._value.get()
        services.down(("broker",))
        wait_for(lambda: rebuilds._value.get() > before, timeout_s=60, what="a client rebuild while the broker is down")
        services.up(("broker",))
        after = produce_named(settings, "b")
        wait_for(lambda: after <= set(collect.values), timeout_s=90, what="the messages after")
        assert sorted(set(collect.values)) == sorted(first | after)


def test_a_member_left_without_an_assignment_is_rebuilt_and_reads_on(settings):
    """kafka-python can leave a member revoked and never assigned again (noida-db, after a
    static member replaced a dead one: the soak saw a worker idle for minutes with lag
    growing). The staging here is the state itself: the member's rebalance began
    ``consumer_stall_s`` ago with no assignment since. It must rebuild its client, get its
    partitions back and read everything, committed to the log end."""
    run = settings.model_copy(update={"consumer_stall_s": 3.0})
    with collecting_consumer(run, f"joining-{time.monotonic_ns()}") as (consumer, collect, rebuilds):
        first = produce_named(run, "a")
        wait_for(lambda: len(collect.values) >= 10, timeout_s=60, what="the first messages")
        assert rebuilds._value.get() == 0
        consumer.joining_since = time.monotonic() - 10  # revoked 10 s ago, nothing assigned since
        wait_for(lambda: rebuilds._value.get() == 1, timeout_s=30, what="a client rebuild")
        after = produce_named(run, "b")
        wait_for(lambda: after <= set(collect.values), timeout_s=60, what="the messages after")
        assert set(collect.values) == first | after
        assert rebuilds._value.get() == 1, "one rebuild, and the new member was assigned in time"


def test_a_client_that_stops_fetching_is_rebuilt_and_reads_on(settings):
    """kafka-python can stay in its group, heartbeating and answering, while it fetches nothing
    (the embedding worker sat 7 minutes like that after a noida-db restart, lag growing). The
    staging is that state: the client's ``poll`` returns nothing. An idle member is left alone;
    once records wait past its position for ``consumer_stall_s``, it rebuilds its client and
    reads them, nothing skipped."""
    run = settings.model_copy(update={"consumer_stall_s": 2.0})
    with collecting_consumer(run, f"deaf-{time.monotonic_ns()}") as (consumer, collect, rebuilds):
        first = produce_named(run, "a")
        wait_for(lambda: len(collect.values) >= 10, timeout_s=60, what="the first messages")
        time.sleep(3 * run.consumer_stall_s)
        assert rebuilds._value.get() == 0, "an idle member at the log end is not stuck"

        def deaf_poll(timeout_ms: int = 0, **_: Any) -> dict:
            time.sleep(timeout_ms / 1000)
            return {}

        consumer.consumer.poll = deaf_poll  # this client no longer fetches
        time.sleep(0.5)  # a poll already under way ends (100 ms)
        after = produce_named(run, "b")
        time.sleep(run.consumer_stall_s)
        assert not after & set(collect.values), "the staged client reads nothing"
        wait_for(lambda: rebuilds._value.get() == 1, timeout_s=30, what="a client rebuild")
        wait_for(lambda: after <= set(collect.values), timeout_s=60, what="the messages after")
        assert set(collect.values) == first | after


def test_a_client_whose_fetches_and_probes_fail_is_rebuilt_and_reads_on(settings):
    """After a noida-db restart every fetch of the worker failed (``InvalidReceiveError:
    Invalid frame length``) for 5 minutes, and so did the log-end probe on the same connection,
    while the group coordinator answered. The staging: ``poll`` returns nothing and
    ``end_offsets`` raises. Once that lasts ``consumer_stall_s`` past the quiet
    ``consumer_stall_s``, the client is rebuilt and reads everything."""
    from kafka.errors import KafkaError

    run = settings.model_copy(update={"consumer_stall_s": 2.0})
    with collecting_consumer(run, f"garbled-{time.monotonic_ns()}") as (consumer, collect, rebuilds):
        first = produce_named(run, "a")
        wait_for(lambda: len(collect.values) >= 10, timeout_s=60, what="the first messages")

        def deaf_poll(timeout_ms: int = 0, **_: Any) -> dict:
            time.sleep(timeout_ms / 1000)
            return {}

        def garbled(*_: Any, **__: Any) -> dict:
            raise KafkaError("Invalid frame length: 121763269")

        consumer.consumer.poll = deaf_poll
        consumer.consumer.end_offsets = garbled
        time.sleep(0.5)  # a poll already under way ends (100 ms)
        after = produce_named(run, "b")
        wait_for(lambda: rebuilds._value.get() == 1, timeout_s=30, what="a client rebuild")
        wait_for(lambda: after <= set(collect.values), timeout_s=60, what="the messages after")
        assert set(collect.values) == first | after


class _LeavesInFlight(PassStep):
    """A step that leaves each batch in flight (``process`` returns its ``finish``, as ingest
    does) and logs what happens, in order. The ``finish`` of the batch numbered ``fail_at``
    fails once, as a broker that does not acknowledge."""

    def __init__(self, fail_at: int) -> None:
        self.log: list[tuple[str, int]] = []
        self.batches: list[list[bytes]] = []
        self.number: dict[int, int] = {}  # id(batch) -> its number
        self.records: list = []
        self.fail_at = fail_at

    def process(self, batch):
        from streamer.kafka.consumer import Backpressure

        number = len(self.batches)
        self.number[id(batch)] = number
        self.batches.append([r.value for r in batch.records])
        self.records.extend(batch.records)
        self.log.append(("process", number))

        def finish() -> None:
            self.log.append(("finish", number))
            if number == self.fail_at:
                raise Backpressure("staged: not acknowledged", 0.2)

        return finish


def test_a_batch_in_flight_is_committed_after_its_finish_and_replayed_with_the_next_when_finish_fails(settings):
    """The commit of batch N waits for its ``finish``, the next batch is processed before that
    (the overlap), commits stay in batch order, and a failed ``finish`` brings batch N and the
    batch after it back in hand, held, then replayed and committed to the end."""
    from streamer.kafka.consumer import BatchingConsumer

    values = [f"m{i}".encode() for i in range(40)]
    produce(settings, ((settings.topic_products, b"one partition", v) for v in values))  # polls of 5, full
    step = _LeavesInFlight(fail_at=2)
    group = settings.ingest_group
    consumer = BatchingConsumer(settings, group, [settings.topic_products], group, [step], max_batch=5, max_wait_s=0.05)
    commit = consumer.steps[-1]
    real_commit = commit.process
    committed: list[int] = []  # batch numbers, in commit order

    def logged_commit(batch) -> None:  # the real commit, logged
        committed.append(step.number[id(batch)])
        step.log.append(("commit", committed[-1]))
        real_commit(batch)

    commit.process = logged_commit
    consumer.run(until_caught_up=True, max_seconds=90)

    processed = [v for b in step.batches for v in b]
    failed, after, replay = step.batches[2], step.batches[3], step.batches[4]
    assert replay == failed + after, "the batch in flight comes back in front of the batch after it, as one"
    assert sorted(processed) == sorted(values + failed + after), "every message processed; only those two twice"
    order = {event: i for i, event in enumerate(step.log)}
    assert order[("process", 1)] < order[("finish", 0)], f"batch 1 is processed while batch 0 is in flight: {step.log}"
    assert committed == sorted(committed) and 2 not in committed and 3 not in committed, step.log
    assert sorted(v for n in committed for v in step.batches[n]) == sorted(values), "every message committed once"
    for n in committed:
        assert order[("finish", n)] < order[("commit", n)], f"batch {n} committed before its finish: {step.log}"
    assert [n for kind, n in step.log if kind == "finish"].count(2) == 1, "a failed finish is not called again"
    _, ends = _bounds(step.records)
    assert _committed(settings, group, list(ends)) == ends, "committed to the end"


class _Membership(_Collect):
    """``_Collect`` that also records the order of the consumer's revokes and assignments."""

    def __init__(self) -> None:
        super().__init__()
        self.events: list[str] = []

    def on_revoked(self) -> None:
        self.events.append("revoked")

    def on_assigned(self, consumer, partitions) -> None:
        self.events.append("assigned")


def test_a_new_member_is_assigned_once_not_assigned_revoked_and_assigned_again(settings, broker_kind):
    """kafka-python's group leader remembers the topic metadata it assigned from and rejoins as
    soon as the latest differs. A client that joined before its first metadata answer assigned
    from an empty snapshot, so every start (and every client rebuild) ran a second rebalance a
    moment after the first; on noida-db that second rebalance's SyncGroup sometimes never came
    back and the member sat unassigned until the stuck-client rebuild (the short fault soak
    missed its recovery time in CI for it). ``subscribe`` waits for that answer: right after
    the consumer is made, the client's snapshot (kafka-python's ``_metadata_snapshot``, what
    its leader compares) holds the subscribed partitions, and a member alone in its group is
    assigned once and keeps its partitions, and so is the client a rebuild makes."""
    from streamer.kafka.consumer import BatchingConsumer

    topic = settings.topic_products
    first = produce_named(settings, "a")
    step = _Membership()
    group = f"once-{time.monotonic_ns()}"
    consumer = BatchingConsumer(settings, group, [topic], group, [step], max_batch=50, max_wait_s=0.05)
    assert consumer.consumer._coordinator._metadata_snapshot == {topic: {0, 1, 2}}, "joined before the topic metadata"
    thread = threading.Thread(target=consumer.run, daemon=True)
    thread.start()
    try:
        wait_for(lambda: first <= set(step.values), timeout_s=60, what="the first messages")
        time.sleep(3)  # kafka-python rejoined within a metadata refresh of the assignment
        assert step.events.count("assigned") == 1 and step.events[-1] == "assigned", step.events
        consumer.joining_since = time.monotonic() - 2 * settings.consumer_stall_s  # the loop rebuilds its client
        after = produce_named(settings, "b")
        wait_for(lambda: after <= set(step.values), timeout_s=60, what="the messages after the rebuild")
        time.sleep(3)
        assert step.events.count("assigned") == 2 and step.events[-1] == "assigned", step.events
    finally:
        consumer.stop()
        thread.join(60)
