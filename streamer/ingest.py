"""Ingest consumer: input topics -> graph DB -> kg.changes, and only then the offset commit.

Lifecycle (one thread; kafka-python heartbeats from its own thread, auto-commit is off; while
metrics are served, ``streamer.ops.lag`` samples the group's lag from the broker on a thread and
connections of its own, never touching this loop):

1. **poll** -- ``consumer.poll`` until the batch holds ``batch_max_events`` messages or the
   oldest has waited ``batch_max_wait_s``.
2. **decode** -- each message is validated (``streamer.events``); an invalid one becomes a
   dead-letter record (original key and value, headers naming source topic, partition,
   offset, error class and message) and is counted; the valid ones go on.
3. **write** -- the valid events are coalesced (``streamer.mutations``) and written in ONE
   graph transaction (``sinks.graph_db``), nodes before relationships, version-guarded.
   Transient errors are retried with jitter inside the sink. If the DB still does not answer,
   the consumer applies **backpressure**: it pauses every assigned partition, keeps the batch,
   keeps polling (which returns nothing while paused and keeps the group membership alive)
   and retries the write every ``backpressure_pause_s``; it resumes the partitions once the
   write went through. It never sleeps in the poll loop. If the DB *refuses* the batch
   (a non-transient error), the batch is bisected until the refused event is isolated; that
   event is dead-lettered with stage ``write`` and everything else is written.
4. **publish** -- the changes the transaction made current go to ``kg.changes`` (keyed by
   node) and the dead letters to ``kg.dlq``; both wait for the broker's acknowledgement.
5. **commit** -- the offsets after the last message of the batch, per partition. This is the
   last step and only sees finished work: a crash anywhere before it replays the batch,
   which the version guards make harmless (and the changes are republished, so the embedding
   worker misses nothing).

**Rebalance** (eager protocol): when partitions are revoked the un-written batch is dropped
without commit: the new owner reads those messages again from the committed offsets. When
the new assignment gives a partition back to this same member, ``on_partitions_assigned``
rewinds it to the dropped batch's first offset: kafka-python keeps a kept partition's
position, past the dropped messages, so without the rewind they would be skipped and a later
commit on that partition would pass over them.
A commit that fails because the group rebalanced is logged and dropped for the same reason, and
the batch's partitions this member still holds are rewound to the batch's start
(``streamer.consumer.commit_after``), so ``--until-caught-up`` never stops with the last batch
uncommitted: it replays it and commits.

**Shutdown** (SIGTERM/SIGINT): the loop stops polling, finishes the batch in hand through
commit (or abandons it uncommitted if the graph DB is unavailable), then closes.
"""

from __future__ import annotations

import logging
import time
from collections import Counter as Tally
from dataclasses import dataclass, field

from kafka import ConsumerRebalanceListener
from kafka.structs import TopicPartition
from kafka.consumer.fetcher import ConsumerRecord

from sinks.graph_db import GraphRejected, GraphSink, GraphUnavailable
from sinks.kafka_producer import KafkaPublisher
from streamer import metrics as m
from streamer.changes import Change
from streamer.consumer import ConsumerLoop, caught_up, commit_after, first_offsets, make_consumer, rewind
from streamer.events import InvalidEvent, decode_event
from streamer.mutations import plan_batch
from streamer.ops.lag import LagMonitor, start_monitor
from streamer.settings import Settings

log = logging.getLogger(__name__)

@dataclass
class DeadLetter:
    record: ConsumerRecord
    error_class: str
    message: str
    stage: str  # "decode" | "write"

    def to_kafka(self) -> tuple[bytes | None, bytes | None, list[tuple[str, bytes]]]:
        r = self.record
        headers = list(r.headers or []) + [
            ("__connect.errors.topic", r.topic.encode()),
            ("__connect.errors.partition", str(r.partition).encode()),
            ("__connect.errors.offset", str(r.offset).encode()),
            ("__connect.errors.stage", self.stage.encode()),
            ("__connect.errors.exception.class.name", self.error_class.encode()),
            ("__connect.errors.exception.message", self.message[:2000].encode()),
        ]
        return r.key, r.value, headers


@dataclass
class IngestStats:
    events_in: int = 0
    events_applied: int = 0
    dead_letters: int = 0
    nodes_written: int = 0
    relationships_written: int = 0
    changes_published: int = 0
    batches: int = 0
    started: float = field(default_factory=time.monotonic)
    by_error: Tally = field(default_factory=Tally)

    @property
    def elapsed_s(self) -> float:
        return time.monotonic() - self.started

    def summary(self) -> dict:
        secs = max(self.elapsed_s, 1e-9)
        return {
            "events_in": self.events_in,
            "events_applied": self.events_applied,
            "dead_letters": self.dead_letters,
            "dead_letters_by_class": dict(self.by_error),
            "nodes_written": self.nodes_written,
            "relationships_written": self.relationships_written,
            "changes_published": self.changes_published,
            "batches": self.batches,
            "seconds": round(secs, 2),
            "events_per_s": round(self.events_in / secs, 1),
            "graph_mutations_per_s": round((self.nodes_written + self.relationships_written) / secs, 1),
        }


class _Rebalance(ConsumerRebalanceListener):
    def __init__(self, ingest: "IngestConsumer"):
        self.ingest = ingest

    def on_partitions_revoked(self, revoked):
        ingest = self.ingest
        if ingest.pending:
            log.info("partitions revoked: dropping %d uncommitted messages", len(ingest.pending))
            for tp, offset in first_offsets(ingest.pending).items():
                ingest.dropped[tp] = min(offset, ingest.dropped.get(tp, offset))
        ingest.pending = []
        ingest.batch_started = None
        ingest.stuck_since = None

    def on_partitions_assigned(self, assigned):
        log.info("assigned %s", sorted(f"{tp.topic}[{tp.partition}]" for tp in assigned))
        ingest = self.ingest
        if ingest.dropped:
            rewind(ingest.consumer, ingest.dropped)    # only the partitions that came back
        ingest.dropped = {}


class IngestConsumer(ConsumerLoop):
    def __init__(self, settings: Settings, graph: GraphSink | None = None, publisher: KafkaPublisher | None = None):
        self.settings = settings
        self.group = settings.ingest_group
        self.graph = graph or GraphSink(settings)
        self.publisher = publisher or KafkaPublisher(settings, client_id="kg-ingest")
        self.consumer = make_consumer(settings, settings.ingest_group, "kg-ingest", settings.batch_max_events)
        self.consumer.subscribe(settings.input_topics, listener=_Rebalance(self))
        self.pending: list[ConsumerRecord] = []
        self.batch_started: float | None = None
        self.stuck_since: float | None = None  # set while paused for backpressure
        self.dropped: dict[TopicPartition, int] = {}  # first offsets of a batch dropped on revoke
        self.next_retry: float = 0.0
        self.stopping = False
        self.stats = IngestStats()
        self.lag_monitor: LagMonitor | None = None  # started by run()

    # --- the loop -------------------------------------------------------------------
    def run(self, until_caught_up: bool = False, max_seconds: float | None = None) -> IngestStats:
        self.graph.ensure_schema()
        self.lag_monitor = start_monitor(self.settings, self.group, self.settings.input_topics, role="ingest")
        deadline = time.monotonic() + max_seconds if max_seconds else None
        try:
            while not self.stopping:
                if deadline and time.monotonic() > deadline:
                    break
                self._poll_once()
                if self._batch_ready() and not self._process_pending():
                    continue
                if until_caught_up and not self.pending and self._caught_up():
                    break
            if self.pending and self.stuck_since is None:
                self._process_pending()  # shutdown: finish the batch in hand
        finally:
            self.close()
        return self.stats

    def close(self) -> None:
        if self.lag_monitor is not None:
            self.lag_monitor.stop()
        self.close_quietly(self.consumer.close, self.publisher.close, self.graph.close)

    # --- poll -----------------------------------------------------------------------
    def _poll_once(self) -> None:
        room = self.settings.batch_max_events - len(self.pending)
        if self.stuck_since is not None or room <= 0:
            self.consumer.poll(timeout_ms=200, max_records=1)  # paused: keeps membership, returns nothing
            return
        timeout_ms = 2000 if not self.consumer.assignment() else 200
        polled = self.consumer.poll(timeout_ms=timeout_ms, max_records=room)
        for tp, records in polled.items():
            m.EVENTS_CONSUMED.labels(self.group, tp.topic).inc(len(records))
            self.pending.extend(records)
            self.stats.events_in += len(records)
        if self.pending and self.batch_started is None:
            self.batch_started = time.monotonic()

    def _batch_ready(self) -> bool:
        if not self.pending:
            return False
        if self.stuck_since is not None:
            return time.monotonic() >= self.next_retry
        full = len(self.pending) >= self.settings.batch_max_events
        waited = time.monotonic() - (self.batch_started or 0) >= self.settings.batch_max_wait_s
        return full or waited or self.stopping

    def _caught_up(self) -> bool:
        return caught_up(self.consumer)

    # --- process one batch ----------------------------------------------------------
    def _process_pending(self) -> bool:
        """Decode, write, publish, commit the pending batch. False if backpressure holds it."""
        records = self.pending
        started = time.monotonic()
        with m.STAGE_SECONDS.labels(self.group, "decode").time():
            valid, dead = self._decode(records)
        source_ms = min(r.timestamp for r in records)
        try:
            with m.STAGE_SECONDS.labels(self.group, "write").time():
                changes, more_dead, nodes, rels = self._write(valid, source_ms)
        except GraphUnavailable as exc:
            self._hold_for_backpressure(exc)
            return False
        dead += more_dead
        self._release_backpressure()
        with m.STAGE_SECONDS.labels(self.group, "publish").time():
            self.stats.changes_published += self.publisher.publish(
                self.settings.topic_changes, ((c.partition_key.encode(), c.to_json(), []) for c in changes)
            )
            self.publisher.publish(self.settings.topic_dlq, (d.to_kafka() for d in dead))
        with m.STAGE_SECONDS.labels(self.group, "commit").time():
            self._commit(records)
        self._account(records, valid, dead, changes, nodes, rels, started)
        self.pending = []
        self.batch_started = None
        return True

    def _decode(self, records: list[ConsumerRecord]):
        valid, dead = [], []
        for record in records:
            try:
                valid.append((record, decode_event(record.value, self.settings.max_event_bytes)))
            except InvalidEvent as exc:
                dead.append(DeadLetter(record, exc.error_class, exc.message, "decode"))
        return valid, dead

    def _write(self, valid: list, source_ms: int) -> tuple[list[Change], list[DeadLetter], int, int]:
        """Write the events; bisect on refusal so one bad event cannot block the batch."""
        if not valid:
            return [], [], 0, 0
        try:
            result = self.graph.write(plan_batch([event for _, event in valid]), source_ms)
            if result.attempts > 1:
                m.GRAPH_RETRIES.labels(self.group).inc(result.attempts - 1)
            return result.changes, [], result.nodes_written, result.relationships_written
        except GraphRejected as exc:
            m.GRAPH_ERRORS.labels(self.group, "rejected").inc()
            if len(valid) == 1:
                record = valid[0][0]
                log.error("graph refused %s[%d]@%d: %s", record.topic, record.partition, record.offset, exc.message)
                return [], [DeadLetter(record, f"GraphRejected:{exc.error_class}", exc.message, "write")], 0, 0
            mid = len(valid) // 2
            c1, d1, n1, r1 = self._write(valid[:mid], source_ms)
            c2, d2, n2, r2 = self._write(valid[mid:], source_ms)
            return c1 + c2, d1 + d2, n1 + n2, r1 + r2

    def _hold_for_backpressure(self, exc: Exception) -> None:
        m.GRAPH_ERRORS.labels(self.group, "unavailable").inc()
        if self.stuck_since is None:
            self.stuck_since = time.monotonic()
            self.consumer.pause(*self.consumer.assignment())
            m.BACKPRESSURE.labels(self.group).set(1)
            log.warning("graph DB unavailable, pausing partitions: %s", exc)
        self.next_retry = time.monotonic() + self.settings.backpressure_pause_s

    def _release_backpressure(self) -> None:
        if self.stuck_since is not None:
            log.info("graph DB answers again after %.1fs, resuming", time.monotonic() - self.stuck_since)
            self.consumer.resume(*self.consumer.paused())
            self.stuck_since = None
            m.BACKPRESSURE.labels(self.group).set(0)

    def _commit(self, records: list[ConsumerRecord]) -> None:
        commit_after(self.consumer, self.group, records)

    def _account(self, records, valid, dead, changes, nodes, rels, started) -> None:
        self.stats.batches += 1
        self.stats.events_applied += len(valid) - sum(1 for d in dead if d.stage == "write")
        self.stats.dead_letters += len(dead)
        self.stats.nodes_written += nodes
        self.stats.relationships_written += rels
        m.BATCH_EVENTS.labels(self.group).observe(len(records))
        m.GRAPH_WRITES.labels(self.group, "node").inc(nodes)
        m.GRAPH_WRITES.labels(self.group, "relationship").inc(rels)
        m.CHANGES_PUBLISHED.labels(self.group).inc(len(changes))
        for d in dead:
            self.stats.by_error[d.error_class] += 1
            m.EVENTS_DLQ.labels(self.group, d.record.topic, d.error_class).inc()
            log.warning(
                "dead-lettered %s[%d]@%d (%s): %s", d.record.topic, d.record.partition, d.record.offset, d.error_class, d.message
            )
        dead_ids = {id(d.record) for d in dead}
        now = time.time()
        for record, event in valid:
            if id(record) not in dead_ids:
                m.EVENTS_APPLIED.labels(self.group, record.topic, event.type).inc()
                m.FRESHNESS_GRAPH.labels(self.group).observe(max(0.0, now - record.timestamp / 1000))
        log.debug("batch of %d in %.3fs", len(records), time.monotonic() - started)
