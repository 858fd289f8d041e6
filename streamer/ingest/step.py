"""The ingest step: input messages -> one graph transaction -> kg.changes (+ kg.dlq).

It runs on the shared ``BatchingConsumer`` (``streamer.kafka.consumer``, which owns poll,
pause/resume, rebalance and the commit, always the last step). ``IngestStep.process(batch)``
decodes the batch, hands its graph write to the step's **writer thread** and returns
``finish``, the rest of the batch's work. The consumer keeps that batch *in flight*: it polls
and processes the next batch (whose write queues behind this one on the writer thread), then
calls ``finish`` and commits (its lifecycle step 3). So while the graph DB runs batch N+1's
transaction, the consumer's thread publishes batch N's changes, waits for their
acknowledgement, commits N and polls and decodes N+2. Writes run one at a time, in batch order;
commits stay in batch order; an offset is committed only after ``finish`` returned. The work:

1. **decode** (``process``) -- each message is validated (``streamer.contracts.events``); an
   invalid one becomes a dead letter (``streamer.contracts.dead_letters``: original key and
   value, headers naming source topic, partition, offset, error class and message) and the
   rest go on.
2. **write** (the writer thread; ``finish`` waits for it) -- the valid events are coalesced
   (``streamer.ingest.plan``) and written in ONE graph transaction (``sinks.graph_db``), nodes
   before relationships, version-guarded. Transient errors are retried with jitter inside the
   sink. If the DB *refuses* the batch (a non-transient error), the batch is bisected until the
   refused event is isolated; that event is dead-lettered with stage ``write`` and everything
   else is written. If the DB does not answer, ``finish`` raises ``Backpressure``: the consumer
   pauses its partitions and brings the batch (with the next one, already handed to the
   writer) again after ``backpressure_pause_s``.
3. **publish** (``finish``) -- the changes the transaction made current go to ``kg.changes``
   (keyed by node) and the dead letters to ``kg.dlq``; ``finish`` returns once the broker
   acknowledged both. A broker that does not acknowledge is backpressure too: the batch comes
   again, the version guards make the second write a no-op and the "current" reads republish
   its changes. A dead letter already on ``kg.dlq`` for the same source offset (a replayed
   batch) is not sent again (``streamer.kafka.dead_letter_ledger``, loaded after every
   assignment).

Then the consumer commits. A crash anywhere before the commit replays the batch, which the
version guards make harmless (and the changes are republished, so the embedding worker
misses nothing). On a revoke the batch in flight is dropped uncommitted; a write of it still on
the writer thread finishes (harmless, as a replay) before any later write starts.

``ingest_consumer(settings)`` builds the consumer with this step: group ``ingest_group`` over
the input topics.
"""

from __future__ import annotations

import logging
import time
from collections import Counter as Tally
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from kafka.consumer.fetcher import ConsumerRecord

from sinks.graph_db import GraphRejected, GraphSink, GraphUnavailable
from sinks.kafka_publisher import KafkaPublisher, PublishFailed
from streamer import metrics as m
from streamer.contracts.changes import Change
from streamer.contracts.dead_letters import DeadLetter
from streamer.contracts.events import Event, InvalidEvent, decode_event
from streamer.ingest.plan import plan_batch
from streamer.kafka.consumer import Backpressure, Batch, BatchingConsumer, UnreadableRecord, unreadable_reason
from streamer.kafka.dead_letter_ledger import DeadLetterLedger, committed_starts
from streamer.settings import Settings

log = logging.getLogger(__name__)

Decoded = tuple[ConsumerRecord, Event]


@dataclass
class IngestStats:
    events_in: int = 0
    events_applied: int = 0
    dead_letters: int = 0
    dead_letters_not_resent: int = 0  # a replayed batch's dead letters already on kg.dlq
    nodes_written: int = 0
    relationships_written: int = 0
    changes_published: int = 0
    batches: int = 0
    started: float = field(default_factory=time.monotonic)
    by_error: Tally[str] = field(default_factory=Tally)

    @property
    def elapsed_s(self) -> float:
        return time.monotonic() - self.started

    def summary(self) -> dict[str, Any]:
        secs = max(self.elapsed_s, 1e-9)
        return {
            "events_in": self.events_in,
            "events_applied": self.events_applied,
            "dead_letters": self.dead_letters,
            "dead_letters_by_class": dict(self.by_error),
            "dead_letters_not_resent": self.dead_letters_not_resent,
            "nodes_written": self.nodes_written,
            "relationships_written": self.relationships_written,
            "changes_published": self.changes_published,
            "batches": self.batches,
            "seconds": round(secs, 2),
            "events_per_s": round(self.events_in / secs, 1),
            "graph_mutations_per_s": round((self.nodes_written + self.relationships_written) / secs, 1),
        }


def dead_letter(record: ConsumerRecord, error_class: str, message: str, stage: str) -> DeadLetter:
    return DeadLetter(
        record.topic,
        record.partition,
        record.offset,
        record.key,
        record.value,
        tuple(record.headers or ()),
        error_class,
        message,
        stage,
    )


@dataclass
class Written:
    changes: list[Change] = field(default_factory=list)
    dead: list[DeadLetter] = field(default_factory=list)
    nodes: int = 0
    relationships: int = 0


class IngestStep:
    """Decode, write (bisecting refusals), publish changes and dead letters (module docstring)."""

    def __init__(self, settings: Settings, graph: GraphSink | None = None, publisher: KafkaPublisher | None = None):
        self.settings = settings
        self.group = settings.ingest_group
        self.graph = graph or GraphSink(settings)
        self.publisher = publisher or KafkaPublisher(settings, client_id="kg-ingest")
        self.stats = IngestStats()
        self.ledger = DeadLetterLedger(settings)
        self.ledger_for: set[Any] | None = None  # partitions to load the ledger for, before the next batch
        self.consumer: Any = None
        self.timings: dict[str, float] = {}
        # graph writes run here, one at a time and in batch order, while the consumer's thread
        # polls, decodes and publishes around them (module docstring)
        self.writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kg-ingest-write")

    def start(self) -> None:
        m.init_labels(self.group, "ingest")
        self.graph.ensure_schema()

    def process(self, batch: Batch) -> Callable[[], None]:
        """Decode the batch and hand its graph write to the writer thread; return the rest of
        its work (``finish``), which the consumer calls before it commits the batch."""
        records = batch.records
        started = time.monotonic()
        with m.STAGE_SECONDS.labels(self.group, "decode").time():
            valid, dead = self.decode(records)
        source_ms = min(r.timestamp for r in records)
        writing = self.writer.submit(self.timed_write, valid, source_ms)
        decode_s = time.monotonic() - started
        return lambda: self.finish(batch, valid, dead, writing, started, decode_s)

    def timed_write(self, valid: list[Decoded], source_ms: int) -> tuple[Written, float]:
        """The writer thread's job: the batch's graph transaction (``write``) and its seconds."""
        began = time.monotonic()
        with m.STAGE_SECONDS.labels(self.group, "write").time():
            written = self.write(valid, source_ms)
        return written, time.monotonic() - began

    def finish(
        self,
        batch: Batch,
        valid: list[Decoded],
        dead: list[DeadLetter],
        writing: Future[tuple[Written, float]],
        started: float,
        decode_s: float,
    ) -> None:
        """Steps 2 (the wait for the graph write) and 3 of the module docstring: return once the
        batch is written, its dead letters and changes acknowledged; ``Backpressure`` when the
        graph DB or the broker cannot take them."""
        try:
            written, write_s = writing.result()
            began = time.monotonic()
            with m.STAGE_SECONDS.labels(self.group, "publish").time():
                self.publisher.publish(
                    self.settings.topic_changes, ((c.partition_key.encode(), c.to_json(), []) for c in written.changes)
                )
                self.publish_dead_letters(dead + written.dead, batch)
        except GraphUnavailable as exc:
            m.GRAPH_ERRORS.labels(self.group, "unavailable").inc()
            raise Backpressure(f"graph DB unavailable: {exc}", self.settings.backpressure_pause_s) from exc
        except PublishFailed as exc:
            raise Backpressure(f"broker did not acknowledge: {exc}", self.settings.backpressure_pause_s) from exc
        # logged by the consumer when the batch is slow
        self.timings = {
            "decode_s": decode_s,
            "write_s": write_s,
            "publish_s": time.monotonic() - began,
            "changes": len(written.changes),
        }
        self.account(batch.records, valid, dead + written.dead, written, started)

    def on_revoked(self) -> None:
        pass

    def on_assigned(self, consumer: Any, partitions: Any) -> None:
        # runs on kafka-python's IO thread, where nothing may block: the ledger loads before the next batch
        self.consumer, self.ledger_for = consumer, set(partitions)

    def publish_dead_letters(self, dead: list[DeadLetter], batch: Batch) -> None:
        """Send the dead letters not already on kg.dlq (a replay), and remember them. The ledger
        reads kg.dlq only for a batch that has dead letters, the first after an assignment."""
        if not dead:
            return
        if self.ledger_for is not None:
            self.ledger.load(*committed_starts(self.consumer, self.ledger_for))
            self.ledger_for = None
        fresh = self.ledger.unsent(dead, batch.first_offsets())
        self.stats.dead_letters_not_resent += len(dead) - len(fresh)
        max_bytes = self.settings.dlq_max_value_bytes
        self.publisher.publish(self.settings.topic_dlq, (d.to_kafka(max_bytes) for d in fresh))
        self.ledger.add((d.topic, d.partition, d.offset) for d in fresh)

    def close(self, finished: bool) -> None:
        self.writer.shutdown(wait=True)  # a write in progress ends (or fails) before the graph closes
        for close in (self.publisher.close, self.graph.close):
            try:
                close()
            except Exception:  # closing is best effort
                log.exception("error while closing")

    # --- decode -------------------------------------------------------------------------------
    def decode(self, records: list[ConsumerRecord]) -> tuple[list[Decoded], list[DeadLetter]]:
        valid: list[Decoded] = []
        dead: list[DeadLetter] = []
        for record in records:
            if isinstance(record, UnreadableRecord):
                dead.append(dead_letter(record, "CorruptRecord", unreadable_reason(record), "decode"))
                continue
            try:
                valid.append((record, decode_event(record.value, self.settings.max_event_bytes)))
            except InvalidEvent as exc:
                dead.append(dead_letter(record, exc.error_class, exc.message, "decode"))
            except Exception as exc:  # a message our validation did not foresee: it must not stop ingest
                log.exception("unexpected error decoding %s[%d]@%d", record.topic, record.partition, record.offset)
                dead.append(dead_letter(record, f"Unexpected:{type(exc).__name__}", str(exc), "decode"))
        return valid, dead

    # --- write --------------------------------------------------------------------------------
    def write(self, valid: list[Decoded], source_ms: int) -> Written:
        """Write the events; bisect on refusal so one bad event cannot block the batch.

        A refusal (``GraphRejected``: the database refused a statement or a value, or the driver
        refused to pack one) is about the data: the batch is bisected down to the one event that
        causes it, which is dead-lettered (stage ``write``). ``GraphUnavailable``
        (infrastructure) goes up, as backpressure. Anything else is a bug in this code and stops
        the consumer with nothing committed: dead-lettering it would empty the input into kg.dlq.
        """
        if not valid:
            return Written()
        try:
            result = self.graph.write(plan_batch([event for _, event in valid]), source_ms)
        except GraphRejected as exc:
            m.GRAPH_ERRORS.labels(self.group, "rejected").inc()
            error_class, message = f"GraphRejected:{exc.error_class}", exc.message
        else:
            if result.attempts > 1:
                m.GRAPH_RETRIES.labels(self.group).inc(result.attempts - 1)
            return Written(result.changes, [], result.nodes_written, result.relationships_written)
        if len(valid) == 1:
            record = valid[0][0]
            log.error(
                "graph refused %s[%d]@%d (%s): %s", record.topic, record.partition, record.offset, error_class, message[:500]
            )
            return Written(dead=[dead_letter(record, error_class, message, "write")])
        mid = len(valid) // 2
        first, second = self.write(valid[:mid], source_ms), self.write(valid[mid:], source_ms)
        return Written(
            first.changes + second.changes,
            first.dead + second.dead,
            first.nodes + second.nodes,
            first.relationships + second.relationships,
        )

    # --- accounting ---------------------------------------------------------------------------
    def account(
        self, records: list[ConsumerRecord], valid: list[Decoded], dead: list[DeadLetter], written: Written, started: float
    ) -> None:
        s = self.stats
        s.events_in += len(records)
        s.batches += 1
        s.events_applied += len(valid) - len(written.dead)
        s.dead_letters += len(dead)
        s.nodes_written += written.nodes
        s.relationships_written += written.relationships
        s.changes_published += len(written.changes)
        m.GRAPH_WRITES.labels(self.group, "node").inc(written.nodes)
        m.GRAPH_WRITES.labels(self.group, "relationship").inc(written.relationships)
        m.CHANGES_PUBLISHED.labels(self.group).inc(len(written.changes))
        for d in dead:
            s.by_error[d.error_class] += 1
            m.EVENTS_DLQ.labels(self.group, d.topic, d.error_class).inc()
            log.warning("dead-lettered %s[%d]@%d (%s): %s", d.topic, d.partition, d.offset, d.error_class, d.message[:500])
        refused = {(d.topic, d.partition, d.offset) for d in written.dead}
        now = time.time()
        for record, event in valid:
            if (record.topic, record.partition, record.offset) not in refused:
                m.EVENTS_APPLIED.labels(self.group, record.topic, event.type).inc()
                m.FRESHNESS_GRAPH.labels(self.group).observe(max(0.0, now - record.timestamp / 1000))
        log.debug("batch of %d in %.3fs", len(records), time.monotonic() - started)


def ingest_consumer(
    settings: Settings, graph: GraphSink | None = None, publisher: KafkaPublisher | None = None
) -> BatchingConsumer:
    """The ingest consumer: group ``ingest_group`` over the input topics, one ``IngestStep``."""
    step = IngestStep(settings, graph, publisher)
    return BatchingConsumer(
        settings,
        settings.ingest_group,
        settings.input_topics,
        "kg-ingest",
        [step],
        max_batch=settings.batch_max_events,
        max_wait_s=settings.batch_max_wait_s,
    )
