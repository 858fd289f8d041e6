"""The batching consumer both stages run on: poll, process, commit last, rebalance, backpressure.

``BatchingConsumer(settings, group, topics, client_id, steps, max_batch, max_wait_s)`` is a
kafka-python group member (auto-commit off) that runs a chain of **steps** over batches of
records and ends every chain with ``CommitOffsets``. Ingest (``streamer.ingest.step``) and the
embedding worker (``streamer.embed.worker``) are each one step on it.

Lifecycle (one thread; kafka-python heartbeats from its own thread):

1. **start** -- every step's ``start()`` (graph schema, a full re-embed ...).
2. **poll** -- ``consumer.poll`` adds records to the batch in hand until it holds
   ``max_batch`` records, or its oldest has waited as long as the last batches took to process
   (``wait_s``: adaptive, at most ``max_wait_s``), or the loop is stopping. On a broker that
   answers empty fetches at once (noida-db) the poll fetches every ``idle_fetch_interval_s``
   while nothing arrives instead of spinning (``streamer/kafka/paced_poll.py``).
3. **process** -- the batch goes through the steps in order. A step's ``process(batch)``
   returns only when its work is durable (written, acknowledged); the next step sees only a
   batch every earlier step finished. The last step is always ``CommitOffsets``: the offsets
   after the batch's last record per partition, with the commit time in the offset metadata
   (``commit_metadata``; ``kg-streamer status`` reads the last commit age from it).
   **One batch in flight**: the step just before the commit may return instead the rest of
   its work (``finish()``, a callable; ingest's: wait for the graph write it started on its
   writer thread, publish the changes, wait for the broker). The batch is then *in flight*:
   the consumer polls and processes the next batch, then calls ``finish`` and commits the
   batch in flight, then commits or puts in flight the next one. So ingest's graph write of
   batch N+1 runs while the consumer's thread publishes batch N and polls N+2; commits stay in
   batch order, and an offset is committed only after everything before it is durable. When
   no batch is ready to process, the batch in flight is finished at once (a poll takes only
   what has arrived: it is never kept waiting for traffic). A ``finish`` that fails
   (``Backpressure``) puts the batch in flight back in hand, together with the batch after it
   (processed, not committed), and both are held and replayed as one (step 4).
4. **backpressure** -- a step that cannot finish because infrastructure is down (graph DB,
   broker) raises ``Backpressure(reason, retry_after_s)``. The consumer pauses every assigned
   partition, keeps the batch, keeps polling (paused partitions return nothing and the group
   membership stays alive: it never sleeps in the poll loop) and runs the chain again on the
   same batch after ``retry_after_s``; once it goes through, the partitions are resumed. Steps
   are idempotent, so running one again on the same batch is harmless. One message never
   raises ``Backpressure``: a step dead-letters what it cannot use. A batch in flight is
   finished (or, when its ``finish`` fails too, put back in hand with the held batch) before
   the consumer holds a batch, so nothing is in flight while backpressure holds one, and a
   held batch's retry runs whole, ``finish`` included, before the partitions resume.
5. **rebalance** (eager protocol; callbacks run inside ``poll``) -- the consumer subscribes
   with ``subscribe``, which waits for the topics' metadata so that the first join assigns
   once (kafka-python rejoins otherwise). On revoke the batch in
   flight and the batch in hand are dropped uncommitted (the next owner reads them again from
   the committed offsets) and the backpressure state is cleared; on assign, partitions that
   came back to this member are rewound to the dropped batches' first offsets (kafka-python keeps a kept partition's
   position, past the dropped records, so without the rewind they would be skipped and a
   later commit would pass over them), every assigned partition is resumed (kafka-python keeps
   the paused flag of a partition that comes back), and the steps' ``on_assigned`` run (the
   embedding worker seeks to its checkpoint there).
6. **refused commit** -- a commit the group refuses because it rebalanced
   (``CommitFailedError``, ``RebalanceInProgressError``) is logged, and the batch's partitions
   this member still holds are rewound to the batch's first offsets: the work is durable and
   idempotent, so whoever owns a partition next replays it, and ``caught_up`` cannot call a
   partition whose last batch is uncommitted done.
7. **stuck client** -- kafka-python can stay stuck in its group protocol (seen with noida-db,
   after a broker restart and after a static member took a dead one's place): it never
   finishes a rejoin, or never finds the group coordinator again, and fetches nothing while
   the poll loop spins. The consumer rebuilds its client when (a) its partitions were revoked,
   or it subscribed, and no assignment (an empty one counts) has come for ``consumer_stall_s``,
   or (b) no record has arrived for ``consumer_stall_s`` and the coordinator has not answered
   an ``OffsetFetch`` (5 s bound) for another ``consumer_stall_s``, or (c) no record has arrived
   for ``consumer_stall_s``, the coordinator answers, and the broker's log end
   (``ListOffsets``, 5 s bound) is past the position of a partition that is not paused: records
   are there and the client does not fetch them (the embedding worker sat 7 minutes like that
   after a noida-db restart, docs/reliability.md), or that log end cannot be read for another
   ``consumer_stall_s`` (after a noida-db restart every fetch of the worker failed with
   ``InvalidReceiveError: Invalid frame length`` for 5 minutes, and so did the probe on the same
   connection; a new client read on at once). The probes run at most once a second. A rebuild drops the batch
   in hand uncommitted (as on a revoke), closes the old client without a commit and subscribes
   a new one with the same group and instance id, which reads on from the committed offsets
   (``kgs_consumer_client_rebuilds_total``).
8. **stop** -- SIGTERM/SIGINT set the stop flag: the batch in flight and the batch in hand are
   finished through commit (or, while backpressure holds them, abandoned uncommitted), every
   step's ``close(finished)`` runs (``finished`` is False when a batch was abandoned), then the
   clients close.

Health (``streamer.health``, the Kubernetes probes): every turn of the loop is a beat
(liveness); the phase is ``joining`` from the start and after a revoke or a client rebuild,
``member`` from an assignment (readiness), ``stopping`` at the end. A batch that takes
``SLOW_BATCH_S`` or more is logged with where its time went (the steps' ``timings``).

``--until-caught-up`` stops once no batch is in hand or in flight, every assigned partition's
position has reached its high watermark and the group's committed offset equals the position
(``caught_up``).
"""

from __future__ import annotations

import json
import logging
import signal
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from kafka import ConsumerRebalanceListener, KafkaConsumer
from kafka.consumer.fetcher import ConsumerRecord
from kafka.errors import CommitFailedError, CorruptRecordError, KafkaError, RebalanceInProgressError
from kafka.structs import OffsetAndMetadata, TopicPartition

from streamer import metrics as m
from streamer.health import HEALTH
from streamer.kafka import paced_poll
from streamer.settings import Settings

log = logging.getLogger(__name__)


MIN_WAIT_S = 0.005  # a batch waits at least this long for company
SLOW_BATCH_S = 0.5  # a batch whose steps take longer is logged with where its time went
PROBE_EVERY_S = 1.0  # a quiet consumer asks the broker whether it is stuck at most this often


class UnreadableRecord(ConsumerRecord):  # type: ignore[misc]
    """A record the Kafka client could not parse: only where it is and why (``value`` None,
    the reason in the header ``kgs.unreadable``). The steps dead-letter it (``CorruptRecord``)."""

    @classmethod
    def at(cls, tp: TopicPartition, offset: int, reason: str) -> UnreadableRecord:
        now_ms = int(time.time() * 1000)
        return cls(
            tp.topic, tp.partition, -1, offset, now_ms, 0, None, None, [("kgs.unreadable", reason.encode())], None, -1, -1, -1
        )


def unreadable_reason(record: ConsumerRecord) -> str:
    raw: bytes = dict(record.headers or []).get("kgs.unreadable", b"")
    return raw.decode("utf-8", "replace")


class Backpressure(Exception):
    """Infrastructure cannot take the batch now: pause, keep it, try again after ``retry_after_s``."""

    def __init__(self, reason: str, retry_after_s: float):
        super().__init__(reason)
        self.reason = reason
        self.retry_after_s = retry_after_s


@dataclass
class Batch:
    """The records in hand, in poll order (per partition in offset order)."""

    records: list[ConsumerRecord] = field(default_factory=list)
    opened: float = 0.0  # monotonic time of the first record
    polled_age_s: float = 0.0  # how old the first polled records were when they arrived (their broker timestamps)

    def __len__(self) -> int:
        return len(self.records)

    def first_offsets(self) -> dict[TopicPartition, int]:
        return first_offsets(self.records)

    def next_offsets(self) -> dict[TopicPartition, int]:
        """Per partition, the offset after the batch's last record (what a commit stores)."""
        nxt: dict[TopicPartition, int] = {}
        for r in self.records:
            tp = TopicPartition(r.topic, r.partition)
            nxt[tp] = max(nxt.get(tp, 0), r.offset + 1)
        return nxt


@dataclass
class InFlight:
    """A processed batch whose commit waits for ``finish()`` (module docstring, 3)."""

    batch: Batch
    finish: Callable[[], None]
    began: float  # monotonic time its processing began


class Step(Protocol):
    """One stage's work on a batch.

    * ``start()`` -- once, before the first poll.
    * ``process(batch)`` -- do the batch's work and return None only when it is durable, or
      (the step just before the commit only) return ``finish``, a callable that does the rest
      and returns once it is durable, or raises ``Backpressure`` (module docstring, 3);
      raise ``Backpressure`` when infrastructure is unavailable (the same batch comes again
      later). Never raise for one bad message: dead-letter it. Any other exception is a bug:
      it stops the consumer with nothing committed.
    * ``on_revoked()`` -- a rebalance took the partitions; the batch in hand is dropped.
    * ``on_assigned(consumer, partitions)`` -- after a rebalance assigned ``partitions``.
    * ``close(finished)`` -- once, at the end; ``finished`` is False when a batch in hand was
      abandoned (backpressure at shutdown).
    * ``tick()`` (optional) -- every turn of the loop, between batches: quick work that must
      not wait for records (the sharded embedding worker takes over shards there).
    * ``stats`` -- what the step did, with a ``summary()`` dict.
    """

    stats: Any

    def start(self) -> None: ...

    def process(self, batch: Batch) -> Callable[[], None] | None: ...

    def on_revoked(self) -> None: ...

    def on_assigned(self, consumer: KafkaConsumer, partitions: set[TopicPartition]) -> None: ...

    def close(self, finished: bool) -> None: ...


# --- commit metadata: written by every commit, read by `kg-streamer status` ------------------
def commit_metadata(now: float | None = None, by: str | None = None) -> str:
    """The offset-commit metadata kg-streamer writes: the commit's wall-clock time (unix ms)."""
    meta: dict[str, object] = {"ts": int((time.time() if now is None else now) * 1000)}
    if by:
        meta["by"] = by
    return json.dumps(meta, separators=(",", ":"))


def parse_commit_metadata(metadata: str | None) -> float | None:
    """The commit time (unix seconds) from ``commit_metadata()`` text, or None."""
    if not metadata:
        return None
    try:
        value = json.loads(metadata)
        return float(value["ts"]) / 1000 if isinstance(value, dict) and "ts" in value else None
    except (ValueError, TypeError):
        return None


# --- small consumer helpers -------------------------------------------------------------------
def make_consumer(settings: Settings, group: str, client_id: str, max_poll_records: int) -> KafkaConsumer:
    """A group member with auto-commit off and the session settings."""
    return KafkaConsumer(
        bootstrap_servers=settings.bootstrap_servers,
        group_id=group,
        client_id=client_id,
        enable_auto_commit=False,
        auto_offset_reset=settings.auto_offset_reset,
        session_timeout_ms=settings.session_timeout_ms,
        heartbeat_interval_ms=settings.heartbeat_interval_ms,
        max_poll_interval_ms=settings.max_poll_interval_ms,
        max_poll_records=max_poll_records,
        group_instance_id=settings.group_instance_id,
        fetch_max_wait_ms=settings.fetch_max_wait_ms,
    )


def subscribe(consumer: KafkaConsumer, topics: Sequence[str], listener: ConsumerRebalanceListener) -> None:
    """Subscribe, then wait (5 s at most) for a metadata answer about ``topics`` before the first
    poll joins the group. kafka-python's group leader remembers the topic metadata it assigned
    from and rejoins as soon as the latest differs; a client that joins before its first
    metadata answer assigns from an empty snapshot, so every start and every client rebuild ran
    a second rebalance a moment after the first (noida-db sometimes never answered that second
    rebalance's SyncGroup: the member sat unassigned until the stuck-client rebuild, module
    docstring 7). Without the answer in time the join goes on as before."""
    consumer.subscribe(list(topics), listener=listener)
    try:
        consumer.bootstrap(timeout_ms=5000, refresh=True)  # a metadata request for the subscription
    except KafkaError as exc:
        log.warning("no topic metadata before joining the group (%s); the first assignment may be redone", exc)


def caught_up(consumer: KafkaConsumer) -> bool:
    """Nothing left to read and everything read committed, on every assigned partition: the
    position has reached the high watermark (``highwater()``, what the last fetch saw; Tansu's
    ``end_offsets()`` is wrong) and the group's committed offset equals the position. The second
    half is what keeps ``--until-caught-up`` from stopping while a rebalance is pending: a batch
    dropped on revoke and not yet rewound leaves its partition committed behind its position."""
    assigned = consumer.assignment()
    if not assigned:
        return False
    for tp in assigned:
        highwater = consumer.highwater(tp)
        if highwater is None or consumer.position(tp) < highwater:
            return False
    try:
        never = []  # partitions this group never committed on: fine if nothing was ever read there
        for tp in assigned:
            committed = consumer.committed(tp)
            if committed is None:
                never.append(tp)
            elif committed != consumer.position(tp):
                return False
        starts = consumer.beginning_offsets(never) if never else {}
        return all(consumer.position(tp) == starts.get(tp) for tp in never)
    except KafkaError:  # the coordinator is busy (a rebalance): not now
        return False


def first_offsets(records: Sequence[ConsumerRecord]) -> dict[TopicPartition, int]:
    """The lowest offset among ``records``, per partition."""
    first: dict[TopicPartition, int] = {}
    for r in records:
        tp = TopicPartition(r.topic, r.partition)
        first[tp] = min(first.get(tp, r.offset), r.offset)
    return first


def rewind(consumer: KafkaConsumer, first: dict[TopicPartition, int]) -> None:
    """Seek the partitions of ``first`` that this member holds back to those offsets (the first
    of records it dropped uncommitted); the others are read from the committed offsets by
    their new owner."""
    held = consumer.assignment()
    for tp, offset in first.items():
        if tp in held:
            consumer.seek(tp, offset)


def commit_after(consumer: KafkaConsumer, group: str, records: Sequence[ConsumerRecord]) -> dict[TopicPartition, int]:
    """Commit the offset after the last of ``records`` per partition; returns what was committed
    ({} when the group rebalanced and refused the commit: the partitions are rewound)."""
    metadata = commit_metadata()
    offsets = {tp: OffsetAndMetadata(nxt, metadata, -1) for tp, nxt in Batch(list(records)).next_offsets().items()}
    if not offsets:
        return {}
    try:
        consumer.commit(offsets)
    except (CommitFailedError, RebalanceInProgressError) as exc:
        log.warning("%s: commit refused after a rebalance (%s); the batch will be replayed", group, exc)
        rewind(consumer, first_offsets(records))
        return {}
    now = time.time()
    for tp, meta in offsets.items():
        m.COMMITTED_OFFSET.labels(group, tp.topic, str(tp.partition)).set(meta.offset)
        m.LAST_COMMIT_TIMESTAMP.labels(group, tp.topic, str(tp.partition)).set(now)
    return {tp: meta.offset for tp, meta in offsets.items()}


class CommitOffsets:
    """The terminal step: commits the batch every earlier step finished (``commit_after``)."""

    def __init__(self, consumer: KafkaConsumer, group: str):
        self.consumer = consumer
        self.group = group
        self.stats = None

    def start(self) -> None:
        pass

    def process(self, batch: Batch) -> None:
        commit_after(self.consumer, self.group, batch.records)

    def on_revoked(self) -> None:
        pass

    def on_assigned(self, consumer: KafkaConsumer, partitions: set[TopicPartition]) -> None:
        pass

    def close(self, finished: bool) -> None:
        pass


def find_unreadable(settings: Settings, positions: dict[TopicPartition, int], timeout_s: float = 5.0) -> TopicPartition | None:
    """The partition whose record at ``positions[tp]`` the Kafka client cannot parse, read with
    a consumer of its own (no group); None when every one reads or has nothing there."""
    probe = KafkaConsumer(
        bootstrap_servers=settings.bootstrap_servers,
        group_id=None,
        enable_auto_commit=False,
        max_poll_records=1,
        client_id="kgs-probe",
    )
    try:
        for tp, offset in positions.items():
            probe.assign([tp])
            probe.seek(tp, offset)
            deadline = time.monotonic() + timeout_s
            while time.monotonic() < deadline:
                try:
                    if probe.poll(timeout_ms=200, max_records=1):
                        break  # it reads: not this one
                except CorruptRecordError:
                    return tp
                highwater = probe.highwater(tp)
                if highwater is not None and offset >= highwater:
                    break  # nothing there
        return None
    finally:
        probe.close()


# --- the consumer -----------------------------------------------------------------------------
class _Rebalance(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, owner: BatchingConsumer):
        self.owner = owner

    def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        self.owner.drop_batch()

    def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        self.owner.assigned(set(assigned))


class BatchingConsumer:
    """Polls batches from ``topics`` as member of ``group`` and runs ``steps`` + ``CommitOffsets``
    over each (module docstring). ``run()`` returns the first step's stats."""

    def __init__(
        self,
        settings: Settings,
        group: str,
        topics: Sequence[str],
        client_id: str,
        steps: Sequence[Step],
        max_batch: int,
        max_wait_s: float,
        retry_after_s: float | None = None,
        on_close: Sequence[Callable[[], object]] = (),
    ):
        self.settings = settings
        self.group = group
        self.topics = list(topics)
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.consumer = make_consumer(settings, group, client_id, max_batch)
        self.steps: list[Step] = [*steps, CommitOffsets(self.consumer, group)]
        self.on_close = list(on_close)
        self.batch = Batch()
        self.in_flight: InFlight | None = None  # a processed batch whose commit waits for its finish()
        self.held_since: float | None = None  # set while backpressure holds the batch
        self.process_s = 0.0  # moving average of the seconds a batch takes through the steps
        self.retry_at = 0.0
        self.dropped: dict[TopicPartition, int] = {}  # first offsets of a batch dropped on revoke
        self.stopping = False
        self.client_id = client_id
        self.alive_at = time.monotonic()  # the last time records arrived, a batch finished or the probes found nothing wrong
        self.failing: dict[str, float] = {}  # per probe of a quiet consumer: failing since then
        self.probed_at = 0.0  # the last probe (at most one per PROBE_EVERY_S)
        self.joining_since: float | None = None  # subscribed or revoked, and no assignment since
        subscribe(self.consumer, self.topics, _Rebalance(self))

    @property
    def step(self) -> Any:
        """The first step (the stage's own)."""
        return self.steps[0]

    @property
    def stats(self) -> Any:
        return self.steps[0].stats

    @property
    def pending(self) -> list[ConsumerRecord]:
        """The records in flight and in hand (not yet committed)."""
        return (self.in_flight.batch.records if self.in_flight else []) + self.batch.records

    # --- control ------------------------------------------------------------------------------
    def stop(self, *_args: object) -> None:
        self.stopping = True

    def install_signal_handlers(self) -> None:
        signal.signal(signal.SIGTERM, self.stop)
        signal.signal(signal.SIGINT, self.stop)

    def run(self, until_caught_up: bool = False, max_seconds: float | None = None) -> Any:
        deadline = time.monotonic() + max_seconds if max_seconds else None
        finished = False  # stays False when a bug propagates: the steps must not save half-done work
        try:
            for step in self.steps:
                step.start()
            self.joining_since = time.monotonic()  # the group join starts with the first poll
            HEALTH.set_phase("joining")
            ticks = [tick for step in self.steps if (tick := getattr(step, "tick", None)) is not None]
            while not self.stopping and not (deadline and time.monotonic() > deadline):
                HEALTH.beat()  # liveness: the loop turns (streamer/health.py)
                for tick in ticks:
                    tick()
                self.poll_once()
                self.check_client()
                if self.batch_ready():
                    self.process_batch()
                elif self.in_flight is not None:
                    self.settle_in_flight()  # nothing else to do: do not keep it waiting
                if until_caught_up and not self.batch.records and self.in_flight is None and caught_up(self.consumer):
                    break
            if self.batch.records and self.held_since is None:
                self.process_batch()  # shutdown: finish the batch in hand
            self.settle_in_flight()
            finished = not self.batch.records
            if not finished:
                log.warning(
                    "%s: stopping with %d records held by backpressure (not committed; replayed on restart)",
                    self.group,
                    len(self.batch.records),
                )
        finally:
            HEALTH.set_phase("stopping")
            self._close(finished)
        return self.stats

    def _close(self, finished: bool) -> None:
        for close in [*(lambda s=s: s.close(finished) for s in self.steps), self.consumer.close, *self.on_close]:
            try:
                close()
            except Exception:  # closing is best effort
                log.exception("error while closing")

    # --- poll ---------------------------------------------------------------------------------
    def poll_once(self) -> None:
        room = self.max_batch - len(self.batch)
        try:
            if self.held_since is not None:
                self.consumer.poll(timeout_ms=100, max_records=1)  # paused: keeps membership, returns nothing
                return
            if room <= 0:
                return  # full: batch_ready() processes it before the next poll
            timeout_ms = 2000 if not self.consumer.assignment() else 100
            if self.in_flight is not None:
                timeout_ms = 0  # take what has arrived; the batch in flight must not wait for more
            elif self.batch.records:  # wake up when the batch is due, not later
                due = self.batch.opened + self.wait_s() - time.monotonic()
                timeout_ms = int(min(100, max(1, due * 1000)))
            polled = paced_poll.poll(self.consumer, timeout_ms, self.settings.idle_fetch_interval_s, max_records=room)
        except CorruptRecordError as exc:
            self.skip_unreadable(exc)
            return
        self.add(polled)
        self.follow_truncation()

    def follow_truncation(self) -> None:
        """A partition whose log end is now below this member's position lost records the
        broker had acknowledged (an unclean restart: noida-db under load does it, measured in
        docs/reliability.md; Kafka after an unclean leader election). New records will arrive at
        the offsets between, so reading on from the position would skip them: seek back to the
        new log end instead. The records this member already read past it stay processed."""
        for tp in self.consumer.assignment():
            highwater = self.consumer.highwater(tp)
            if highwater is not None and self.consumer.position(tp) > highwater:
                log.error(
                    "%s: %s[%d] log end %d is below the position %d: the broker lost acknowledged records; "
                    "reading on from the log end",
                    self.group,
                    tp.topic,
                    tp.partition,
                    highwater,
                    self.consumer.position(tp),
                )
                m.LOG_TRUNCATIONS.labels(self.group, tp.topic, str(tp.partition)).inc()
                self.consumer.seek(tp, highwater)

    def check_client(self) -> None:
        """Rebuild a Kafka client stuck in its group protocol or its fetches (module docstring, 7)."""
        now = time.monotonic()
        if self.joining_since is not None and now - self.joining_since >= self.settings.consumer_stall_s:
            self.rebuild_client(f"no partitions assigned {now - self.joining_since:.0f}s after the group began (re)joining")
            return
        if now - self.alive_at < self.settings.consumer_stall_s or now - self.probed_at < PROBE_EVERY_S:
            return
        self.probed_at = now
        quiet_s = now - self.alive_at
        try:
            self.consumer.committed(TopicPartition(self.topics[0], 0), timeout_ms=5000)
        except Exception as exc:  # noqa: BLE001 - any failure to reach the coordinator counts
            self.probe_failed("the group coordinator does not answer", exc, quiet_s)
            return
        self.failing.pop("the group coordinator does not answer", None)
        try:
            behind = self.unfetched_partitions()
        except Exception as exc:  # noqa: BLE001 - the coordinator answers, the partitions' broker does not
            self.probe_failed("the log end cannot be read", exc, quiet_s)
            return
        self.failing.pop("the log end cannot be read", None)
        if behind:
            self.rebuild_client(f"no records for {quiet_s:.0f}s while {', '.join(behind)} hold records past the position")
            return
        self.alive_at = time.monotonic()

    def probe_failed(self, what: str, exc: Exception, quiet_s: float) -> None:
        """A probe of a quiet consumer failed: rebuild once it has failed for ``consumer_stall_s``."""
        if what not in self.failing:
            self.failing[what] = time.monotonic()
            log.warning("%s: no records for %.0fs and %s (%s)", self.group, quiet_s, what, exc)
        failing_s = time.monotonic() - self.failing[what]
        if failing_s >= self.settings.consumer_stall_s:
            self.rebuild_client(f"{what}: for {failing_s:.0f}s")

    def unfetched_partitions(self) -> list[str]:
        """The assigned partitions, not paused, whose log end (the broker's ``ListOffsets``;
        Tansu's answer is at most the true end, so never a false alarm) is past this member's
        position (none while backpressure holds the batch: it pauses them all). Raises when the
        broker does not answer."""
        tps = sorted(self.consumer.assignment() - self.consumer.paused())
        if not tps:
            return []
        ends = self.consumer.end_offsets(tps, timeout_ms=5000)
        positions = {tp: self.consumer.position(tp, timeout_ms=5000) or 0 for tp in tps}
        return [f"{tp.topic}[{tp.partition}]" for tp in tps if positions[tp] < ends.get(tp, -1)]

    def rebuild_client(self, why: str) -> None:
        log.error("%s: %s: rebuilding the Kafka client (reading on from the committed offsets)", self.group, why)
        m.CLIENT_REBUILDS.labels(self.group).inc()
        self.drop_batch()
        self.dropped = {}  # the new client starts from the committed offsets
        try:
            self.consumer.close(autocommit=False, timeout_ms=5000)
        except Exception:  # the old client is being thrown away
            log.exception("%s: closing the stuck client", self.group)
        self.consumer = make_consumer(self.settings, self.group, self.client_id, self.max_batch)
        commit = self.steps[-1]
        assert isinstance(commit, CommitOffsets)
        commit.consumer = self.consumer
        subscribe(self.consumer, self.topics, _Rebalance(self))
        self.alive_at = self.joining_since = time.monotonic()
        self.failing = {}

    def add(self, polled: dict[TopicPartition, list[ConsumerRecord]]) -> None:
        if polled:
            self.alive_at = time.monotonic()
        for tp, records in polled.items():
            m.EVENTS_CONSUMED.labels(self.group, tp.topic).inc(len(records))
            if not self.batch.records and records:
                self.batch.opened = time.monotonic()
                self.batch.polled_age_s = max(0.0, time.time() - min(r.timestamp for r in records) / 1000)
            self.batch.records.extend(records)

    def skip_unreadable(self, exc: CorruptRecordError) -> None:
        """kafka-python cannot parse a record it fetched (a header key that is not UTF-8 is the
        one case known: legal on the wire, refused by its parser) and raises at that offset on
        every poll, or busy-loops when polled again at the same position. A throw-away consumer
        without a group reads each assigned partition at this member's position to find the one
        that fails; the record there goes into the batch as an ``UnreadableRecord`` (the steps
        dead-letter it with its offset) and this member moves past it (a seek to another offset
        also makes kafka-python drop the broken fetch). The producer's other records in the same
        record batch after it are unreadable to this client too: each follows the same way.
        Nothing else moves, so nothing else is skipped."""
        positions = {tp: self.consumer.position(tp) for tp in sorted(self.consumer.assignment())}
        culprit = find_unreadable(self.settings, positions)
        if culprit is None:
            log.warning("%s: a fetched record could not be parsed (%s) and was not found again; polling on", self.group, exc)
            return
        offset = positions[culprit]
        log.error(
            "%s: %s[%d]@%d cannot be parsed by the Kafka client (%s): dead-lettered, skipped",
            self.group,
            culprit.topic,
            culprit.partition,
            offset,
            exc,
        )
        self.consumer.seek(culprit, offset + 1)
        self.add({culprit: [UnreadableRecord.at(culprit, offset, str(exc))]})

    def wait_s(self) -> float:
        """How long a batch waits for more records: as long as the last batches took to process
        (an average), within [``MIN_WAIT_S``, ``max_wait_s``]. Waiting longer than processing
        takes no longer pays: under load the records that arrive while a batch is processed
        make the next batch (batches grow with the load by themselves), and a light load is not
        kept waiting for a fixed time."""
        return min(self.max_wait_s, max(MIN_WAIT_S, self.process_s))

    def batch_ready(self) -> bool:
        if not self.batch.records:
            return False
        if self.held_since is not None:
            return time.monotonic() >= self.retry_at
        full = len(self.batch) >= self.max_batch
        return full or self.stopping or time.monotonic() - self.batch.opened >= self.wait_s()

    # --- process ------------------------------------------------------------------------------
    def process_batch(self) -> bool:
        """Run the chain over the batch in hand, then commit the batch in flight and commit this
        one or put it in flight (module docstring, 3); False when backpressure holds it."""
        batch = self.batch
        began = time.monotonic()
        if self.held_since is None:  # a first try: how long its oldest record took to get here
            m.STAGE_SECONDS.labels(self.group, "queue").observe(batch.polled_age_s)
            m.STAGE_SECONDS.labels(self.group, "batch_wait").observe(began - batch.opened)
        *work, commit = self.steps
        finish = None
        try:
            for step in work:
                if finish is not None:  # only the step before the commit may leave work in flight
                    finish()
                finish = step.process(batch)
            if finish is not None and self.held_since is not None:  # a retry goes through whole before resuming
                finish()
                finish = None
        except Backpressure as exc:
            if self.settle_in_flight():
                self._hold(exc)
            return False
        finally:
            self.alive_at = time.monotonic()  # time spent processing is not time without records
        if not self.settle_in_flight():
            return False
        if finish is None:
            commit.process(batch)
            self._committed(batch, began)
        else:
            self.in_flight = InFlight(batch, finish, began)
        self._release()
        m.BATCH_EVENTS.labels(self.group).observe(len(batch))
        self.batch = Batch()
        return True

    def settle_in_flight(self) -> bool:
        """Finish the batch in flight and commit it. When its ``finish`` fails, it goes back in
        hand in front of the batch there (both are replayed as one, step 3) and is held: False."""
        if self.in_flight is None:
            return True
        flight, self.in_flight = self.in_flight, None
        try:
            flight.finish()
        except Backpressure as exc:
            log.warning("%s: the batch in flight could not be finished; holding it with the batch after it", self.group)
            self.batch = Batch(flight.batch.records + self.batch.records, flight.batch.opened, flight.batch.polled_age_s)
            self._hold(exc)
            return False
        finally:
            self.alive_at = time.monotonic()
        self.steps[-1].process(flight.batch)
        self._committed(flight.batch, flight.began)
        return True

    def _committed(self, batch: Batch, began: float) -> None:
        """A batch went through to its commit (its processing began at ``began``, monotonic):
        log it when slow, and feed the moving average the batch wait follows (``wait_s``)."""
        took = time.monotonic() - began
        if took >= SLOW_BATCH_S:
            timings = {k: round(v, 3) for step in self.steps for k, v in getattr(step, "timings", {}).items()}
            log.info("%s: slow batch: %d records in %.2fs %s", self.group, len(batch), took, json.dumps(timings))
        self.process_s += 0.3 * (took - self.process_s)  # moving average

    def _hold(self, exc: Backpressure) -> None:
        if self.held_since is None:
            self.held_since = time.monotonic()
            self.consumer.pause(*self.consumer.assignment())
            m.BACKPRESSURE.labels(self.group).set(1)
            log.warning("%s: %s; pausing partitions, retrying every %.1fs", self.group, exc.reason, exc.retry_after_s)
        self.retry_at = time.monotonic() + exc.retry_after_s

    def _release(self) -> None:
        if self.held_since is not None:
            log.info("%s: going on after %.1fs of backpressure, resuming", self.group, time.monotonic() - self.held_since)
            self.consumer.resume(*self.consumer.paused())
            self.held_since = None
            m.BACKPRESSURE.labels(self.group).set(0)

    # --- rebalance ----------------------------------------------------------------------------
    def drop_batch(self) -> None:
        self.joining_since = time.monotonic()
        HEALTH.set_phase("joining")
        if self.in_flight is not None:  # not finished here: the partitions' next owner replays it
            self.batch = Batch(self.in_flight.batch.records + self.batch.records)
            self.in_flight = None
        if self.batch.records:
            log.info("%s: partitions revoked: dropping %d uncommitted messages", self.group, len(self.batch))
            for tp, offset in self.batch.first_offsets().items():
                self.dropped[tp] = min(offset, self.dropped.get(tp, offset))
        self.batch = Batch()
        if self.held_since is not None:
            self.held_since = None
            m.BACKPRESSURE.labels(self.group).set(0)
        for step in self.steps:
            step.on_revoked()

    def assigned(self, partitions: set[TopicPartition]) -> None:
        self.joining_since = None
        HEALTH.set_phase("member")
        log.info("%s: assigned %s", self.group, sorted(f"{tp.topic}[{tp.partition}]" for tp in partitions))
        if self.dropped:
            rewind(self.consumer, self.dropped)  # only the partitions that came back
        self.dropped = {}
        if self.consumer.paused():
            self.consumer.resume(*self.consumer.paused())
        for step in self.steps:
            step.on_assigned(self.consumer, partitions)
