"""The embedding worker's step: kg.changes -> exact incremental GNN -> kg.embeddings.

It runs on the shared ``BatchingConsumer`` (``streamer.kafka.consumer``: poll, pause/resume,
rebalance, and the commit, always the last step). ``embed_consumer(settings)`` builds it:
group ``embed_group`` over ``kg.changes`` (sharded: ``<embed_group>.<member>``, below).

Sharded workers (``embed_shards`` = S > 0; streamer/embed/shards.py, docs/scaling.md): every
worker follows the whole changelog in a group of its own and keeps the whole replica, but
keeps the last layer and publishes vectors and tombstones only for the keys of the shards the
group ``<embed_group>.shards`` assigned to it. Between batches (and on every turn of an idle
loop, ``tick``) the worker takes a new owned set from ``ShardMembership``; for each shard it
newly owns it recomputes the shard's last layer from the exact hidden layers and publishes all
of the shard's vectors (the previous owner may have died before publishing some), and only then
goes on. A shard it loses is no longer published from the next batch on; the membership thread
holds the group's rebalance until the worker has taken the loss, so two live workers never
publish one shard at once, and the worker applies no batch until the group has assigned the
shards again (backpressure), so the shards it gets back are still current and cost nothing.
Every vector record then names its worker (header ``kgs.member``).

1. **start** -- ``streamer.embed.state.open_checkpoint``: the text encoder (offline
   transformers model) with its cache, the graph encoder (checkpoint or seeded init) and, when
   ``<state_dir>/embed/engine.pt`` exists, the engine state (replica, every layer's
   activations and sums) with the changelog offsets it covers. If the checkpoint was made with
   another model version, every cache was recomputed layer-wise while opening, and now every
   live node's vector is republished with the new version before the first poll (a full
   re-embed); the old vectors stay on the compacted topic until each key's new one replaces
   them, and every record names its version.
2. **assign** -- each assigned kg.changes partition is positioned where the engine in memory
   is (``seek``): the checkpoint's offsets at start-up (the beginning when there is none) and
   after a revoke that put the engine back to its checkpoint, otherwise the offset after the
   last batch it applied and published (a rebalance that hands the partition back replays
   nothing). The replica is a function of the changelog, so the worker's own state decides
   where it resumes, not the group commit (kept up to date for lag monitoring and operators).
3. **process** -- each record is decoded and checked (``decode_change``); one the worker
   cannot use goes to ``kg.dlq`` with its reason (stage ``apply``) and is counted, and the rest
   go on. The version guard (``streamer.embed.versions``, its state saved in the checkpoint)
   keeps only the changes newer than what the replica holds, so that several ingest
   consumers' interleaving cannot corrupt it. A product's ``out_edges`` are expanded into edge
   changes against the replica; the engine applies the batch exactly, recomputing only the affected rows per
   layer, and reports the keys whose vectors moved (bitwise) and the deleted keys. Those
   vectors (and tombstones) go to kg.embeddings, keyed by node, and the step waits for the
   broker's acknowledgement. Every ``embed_checkpoint_every_s`` the engine state and the
   offsets through this batch are written to the state dir (atomically). Then the consumer
   commits the kg.changes offsets.
4. **backpressure** -- a broker that does not acknowledge the vectors raises ``Backpressure``;
   the engine has applied the batch, so the step keeps the built records and publishes
   exactly those when the same batch comes again (applying it again would move nothing and
   publish nothing). While records are unpublished no checkpoint is written; if the
   partitions are revoked or the worker stops meanwhile, the engine is put back to its last
   checkpoint (revoke) or left unsaved (stop), so the batch is applied and published again
   from the checkpoint.

A crash anywhere replays from the last checkpoint: replaying changes the replica already has
moves no row, so nothing is republished except vectors of batches after the checkpoint, which
are republished with identical values. SIGTERM: the batch in hand is finished, the worker
checkpoints, and exits.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from kafka import KafkaConsumer
from kafka.structs import TopicPartition

from sinks.kafka_publisher import KafkaPublisher, PublishFailed
from streamer import metrics as m
from streamer.contracts.changes import Change, InvalidChange, decode_change, edge_delete, edge_upsert
from streamer.contracts.dead_letters import DeadLetter
from streamer.contracts.events import NODE_LABELS
from streamer.contracts.vectors import Encoding, VectorRecord, encode_vectors
from streamer.embed.engine import BatchReport
from streamer.embed.replica import Replica
from streamer.embed.shards import ShardMembership, member_name, shard_of
from streamer.embed.state import Opened, open_checkpoint, save_checkpoint
from streamer.kafka.consumer import Backpressure, Batch, BatchingConsumer, UnreadableRecord, unreadable_reason
from streamer.kafka.dead_letter_ledger import DeadLetterLedger
from streamer.settings import Settings

log = logging.getLogger(__name__)

OWNED_RELS = {"HAS_BRAND", "IN_CATEGORY", "HAS_ATTRIBUTE"}
KafkaRecord = tuple[bytes, bytes | None, list[tuple[str, bytes]]]


def expand_out_edges(changes: list[Change], replica: Replica) -> list[Change]:
    """A product's node_upsert carries its complete set of structural out-edges; turn it into
    the edge_delete / edge_upsert records that take the replica from its current set there."""
    out: list[Change] = []
    owned: dict[str, set[tuple[str, str]]] = {}
    for change in changes:
        out.append(change)
        if change.op == "node_delete" and change.key:
            owned[change.key] = set()
        if change.op != "node_upsert" or not change.props or "out_edges" not in change.props or not change.key:
            continue
        key = change.key
        current = owned.get(key)
        if current is None:
            current = replica.out_edges(key, OWNED_RELS)
        new = {(rel, dst) for rel, dst in change.props["out_edges"]}
        out += [edge_delete(key, rel, dst, change.ts) for rel, dst in sorted(current - new)]
        out += [edge_upsert(key, rel, dst, change.ts) for rel, dst in sorted(new - current)]
        owned[key] = new
    return out


@dataclass
class EmbedStats:
    changes_in: int = 0
    dead_letters: int = 0
    dead_letters_not_resent: int = 0  # a replayed batch's dead letters already on kg.dlq
    batches: int = 0
    vectors_published: int = 0
    tombstones_published: int = 0
    rows_recomputed: int = 0
    vectors_suppressed: int = 0  # bounded mode: refreshed vectors under the publish threshold
    full_pass_layers: int = 0  # layers computed by a full pass (large batches)
    affected_max: list[int] = field(default_factory=list)
    affected_sum: list[int] = field(default_factory=list)
    freshness_s: list[float] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)
    apply_seconds: float = 0.0
    full_reembed: bool = False
    shard_rows_refreshed: int = 0  # sharded: last-layer rows recomputed for shards taken over

    def observe_affected(self, affected: list[int]) -> None:
        if not self.affected_sum:
            self.affected_sum = [0] * len(affected)
            self.affected_max = [0] * len(affected)
        for i, n in enumerate(affected):
            self.affected_sum[i] += n
            self.affected_max[i] = max(self.affected_max[i], n)

    def summary(self) -> dict[str, Any]:
        secs = max(time.monotonic() - self.started, 1e-9)
        fresh = np.asarray(self.freshness_s) if self.freshness_s else None
        return {
            "changes_in": self.changes_in,
            "dead_letters": self.dead_letters,
            "dead_letters_not_resent": self.dead_letters_not_resent,
            "batches": self.batches,
            "vectors_published": self.vectors_published,
            "tombstones_published": self.tombstones_published,
            "rows_recomputed": self.rows_recomputed,
            "vectors_suppressed": self.vectors_suppressed,
            "full_pass_layers": self.full_pass_layers,
            "affected_per_layer_total": self.affected_sum,
            "affected_per_layer_max_batch": self.affected_max,
            "full_reembed": self.full_reembed,
            "shard_rows_refreshed": self.shard_rows_refreshed,
            "apply_seconds": round(self.apply_seconds, 2),
            "seconds": round(secs, 2),
            "freshness_p50_s": round(float(np.percentile(fresh, 50)), 3) if fresh is not None else None,
            "freshness_p99_s": round(float(np.percentile(fresh, 99)), 3) if fresh is not None else None,
        }


@dataclass
class Unpublished:
    """A batch the engine applied whose vectors (and dead letters) the broker has not
    acknowledged yet."""

    records: list[KafkaRecord]
    report: BatchReport
    source_ms: int | None
    dead: list[DeadLetter] = field(default_factory=list)


class EmbedStep:
    """Apply a batch of changes to the engine, publish what moved (module docstring)."""

    def __init__(self, settings: Settings, publisher: KafkaPublisher | None = None):
        self.settings = settings
        self.group = embed_consumer_group(settings)
        self.stats = EmbedStats()
        self.opened: Opened = open_checkpoint(settings)
        self.stats.full_reembed = self.opened.reembedded
        self.publisher = publisher or KafkaPublisher(settings, client_id="kg-embed")
        self.positions: dict[str, int] = dict(self.opened.offsets)  # "topic:partition" -> next offset applied
        self.unpublished: Unpublished | None = None
        self.timings: dict[str, float] = {}
        self.last_checkpoint = time.monotonic()
        self.checkpointed = dict(self.positions)  # the offsets the checkpoint on disk covers
        self.text_encoded = self.opened.text.encoded_count
        self.ledger = DeadLetterLedger(settings)
        self.ledger_for: dict[TopicPartition, int] | None = None  # replay starts to load the ledger for
        self.member = member_name(settings) if settings.embed_shards else None
        self.shards: ShardMembership | None = ShardMembership(settings) if settings.embed_shards else None
        self.owned_shards: frozenset[int] = frozenset()
        self.unpublished_shards: set[int] = set()  # newly owned shards whose vectors are not all published yet
        self.retry_shards_at = 0.0

    @property
    def engine(self) -> Any:
        return self.opened.engine

    # --- lifecycle ----------------------------------------------------------------------------
    def start(self) -> None:
        m.init_labels(self.group, "embed")
        e = self.engine
        m.MODEL_INFO.info({"version": e.model_version, "layers": str(e.L), "dim": str(e.out_dim), "device": str(e.device)})
        if self.opened.reembedded and self.shards is None:
            self.publish_all()
        if self.shards is not None:  # owns nothing until the group says so
            self.engine.set_shards(self.settings.embed_shards, ())
            self.shards.start()

    def tick(self) -> None:
        """Every turn of the consumer loop, between batches: act on a new owned set of shards,
        and save progress the checkpoint does not cover yet once ``embed_checkpoint_every_s``
        has passed. (``process`` checkpoints only after a batch, so a worker that went idle
        right after one would leave its checkpoint, and what ``verify`` audits, behind for as
        long as it stays idle.)"""
        if self.unpublished is not None:
            return
        if self.shards is not None:
            self.sync_shards()
        every = self.settings.embed_checkpoint_every_s
        if self.positions != self.checkpointed and time.monotonic() - self.last_checkpoint >= every:
            self.checkpoint()

    def sync_shards(self) -> None:
        """Take a new owned set from the shard group; bring newly owned shards up to date and
        publish their vectors (module docstring). A broker that does not acknowledge leaves
        them to the next turn after ``backpressure_pause_s``."""
        assert self.shards is not None
        owned = self.shards.take()
        if owned is not None:
            t0 = time.perf_counter()
            added, rows = self.engine.take_shards(self.settings.embed_shards, owned)
            self.owned_shards = owned
            self.unpublished_shards = (self.unpublished_shards & set(owned)) | added
            if added:
                self.stats.shard_rows_refreshed += rows
                took = time.perf_counter() - t0
                log.info("now owns %d shards (%d new: %d rows refreshed in %.2fs)", len(owned), len(added), rows, took)
            m.SHARDS_OWNED.labels(self.group).set(len(owned))
        if self.unpublished_shards and time.monotonic() >= self.retry_shards_at:
            try:
                self.publish_shards(self.unpublished_shards)
                self.unpublished_shards = set()
            except PublishFailed as exc:
                log.warning("vectors of newly owned shards not acknowledged (%s); trying again", exc)
                self.retry_shards_at = time.monotonic() + self.settings.backpressure_pause_s

    def publish_shards(self, shards: set[int]) -> None:
        """Every live vector of ``shards`` (a shard this worker newly owns), and a tombstone for
        each of their deleted products the version guard knows of (the previous owner may have
        died before publishing it)."""
        rows = self.engine.shard_rows(shards)
        self.publish_rows(rows, f"shards {sorted(shards)[:8]}")
        index, count = self.engine.replica.index, self.settings.embed_shards
        gone = [k for k, gen in self.opened.versions.gens.items() if gen > 0 and k not in index and shard_of(k, count) in shards]
        if gone:
            version = self.engine.model_version
            encoding = self.settings.vector_encoding
            self.publisher.publish(
                self.settings.topic_embeddings,
                [signed_record(VectorRecord(k, None, version).to_kafka(encoding), self.member) for k in gone],
            )
            self.stats.tombstones_published += len(gone)
            m.VECTORS_PUBLISHED.labels(self.group, "tombstone").inc(len(gone))

    def on_assigned(self, consumer: KafkaConsumer, partitions: set[TopicPartition]) -> None:
        starts: dict[TopicPartition, int] = {}
        for tp in partitions:
            # where the engine in memory is: the checkpoint's offsets at start-up and after a
            # revoke that put the engine back to it, else past every batch applied and published
            # (a rebalance that gives the partition back must not replay since the checkpoint)
            offset = self.positions.get(f"{tp.topic}:{tp.partition}")
            if offset is None:
                consumer.seek_to_beginning(tp)
            else:
                consumer.seek(tp, offset)
            starts[tp] = offset or 0
        self.ledger_for = starts  # read kg.dlq before the next batch with dead letters, not here (IO thread)
        log.info("resuming %s from offsets %s", sorted(map(str, partitions)), {str(tp): o for tp, o in starts.items()})

    def on_revoked(self) -> None:
        if self.unpublished is not None:
            log.warning(
                "partitions revoked with %d vectors unpublished: back to the last checkpoint", len(self.unpublished.records)
            )
            self.unpublished = None
            self.opened = open_checkpoint(self.settings)
            self.positions = dict(self.opened.offsets)
        self.ledger_for = None

    def close(self, finished: bool) -> None:
        if finished and self.unpublished is None:
            self.checkpoint()
        else:
            log.warning(
                "stopping with work unfinished: not checkpointing (the batches since the last checkpoint "
                "are applied and published again on restart)"
            )
        if self.shards is not None:
            self.shards.close()
        try:
            self.publisher.close()
        except Exception:  # closing is best effort
            log.exception("error while closing the publisher")

    # --- one micro-batch ----------------------------------------------------------------------
    def process(self, batch: Batch) -> None:
        self.timings = {}  # where this batch's time went (logged by the consumer when it is slow)
        if self.unpublished is None and self.shards is not None:
            self.sync_shards()
            if self.shards.rebalancing:  # apply nothing until the group has assigned the shards
                raise Backpressure("the shard group is rebalancing", 0.2)
        if self.unpublished is None:
            self.unpublished = self.apply(batch)
        pending = self.unpublished
        t0 = time.perf_counter()
        try:
            with m.STAGE_SECONDS.labels(self.group, "publish").time():
                self.publisher.publish(self.settings.topic_embeddings, pending.records)
                self.publish_dead_letters(pending.dead, batch)
        except PublishFailed as exc:
            raise Backpressure(f"broker did not acknowledge vectors: {exc}", self.settings.backpressure_pause_s) from exc
        acked = time.time()
        self.unpublished = None
        for tp, offset in batch.next_offsets().items():
            self.positions[f"{tp.topic}:{tp.partition}"] = offset
        self.timings["publish_s"] = time.perf_counter() - t0
        self.account(len(batch), pending.report, pending.source_ms, acked, pending.dead)
        if time.monotonic() - self.last_checkpoint >= self.settings.embed_checkpoint_every_s:
            t0 = time.perf_counter()
            self.checkpoint()
            self.timings["checkpoint_s"] = time.perf_counter() - t0

    def publish_dead_letters(self, dead: list[DeadLetter], batch: Batch) -> None:
        """Send the dead letters not already on kg.dlq (a replay from the checkpoint), and
        remember them (``streamer.kafka.dead_letter_ledger``: from the checkpoint's offsets and
        save time)."""
        if not dead:
            return
        if self.ledger_for is not None:
            self.ledger.load(self.ledger_for, self.opened.saved_s)
            self.ledger_for = None
        fresh = self.ledger.unsent(dead, batch.first_offsets())
        max_bytes = self.settings.dlq_max_value_bytes
        self.publisher.publish(self.settings.topic_dlq, (d.to_kafka(max_bytes) for d in fresh))
        self.ledger.add((d.topic, d.partition, d.offset) for d in fresh)
        self.stats.dead_letters_not_resent += len(dead) - len(fresh)

    def decode(self, batch: Batch) -> tuple[list[Change], list[DeadLetter]]:
        changes: list[Change] = []
        dead: list[DeadLetter] = []
        for r in batch.records:
            try:
                if isinstance(r, UnreadableRecord):
                    raise InvalidChange("CorruptRecord", unreadable_reason(r))
                changes.append(decode_change(r.value, NODE_LABELS))
            except InvalidChange as exc:
                dead.append(
                    DeadLetter(
                        r.topic,
                        r.partition,
                        r.offset,
                        r.key,
                        r.value,
                        tuple(r.headers or ()),
                        exc.error_class,
                        exc.message,
                        "apply",
                    )
                )
        return changes, dead

    def apply(self, batch: Batch) -> Unpublished:
        changes, dead = self.decode(batch)
        source_ms = min((c.source_ms for c in changes if c.source_ms), default=None)
        guard = self.opened.versions  # only what is newer than the replica (streamer/embed/versions.py)
        changes = guard.admit(changes, self.engine.replica)
        if guard.dropped:
            m.CHANGES_STALE.labels(self.group).inc(guard.dropped)
        t0 = time.perf_counter()
        encoded = self.opened.text.encoded_count
        with m.STAGE_SECONDS.labels(self.group, "embed").time():
            report = self.engine.apply(expand_out_edges(changes, self.engine.replica))
        t1 = time.perf_counter()
        self.stats.apply_seconds += t1 - t0
        records = vector_records(report, self.engine.model_version, self.settings.vector_encoding, source_ms, self.member)
        self.timings.update(
            embed_s=t1 - t0,
            texts_encoded=self.opened.text.encoded_count - encoded,
            full_pass_layers=report.full_layers,
            vectors=len(records),
            serialise_s=time.perf_counter() - t1,
        )
        return Unpublished(records, report, source_ms, dead)

    def publish_all(self) -> None:
        """Full re-embed after a model change: every live node's vector with the new version."""
        from tqdm.auto import tqdm

        self.publish_rows(self.engine.replica.live_slots(), f"publish {self.engine.model_version}", tqdm)
        self.checkpoint()

    def publish_rows(self, slots: np.ndarray, what: str, progress: Any = None) -> None:
        """The current vectors of ``slots``, in chunks, waiting for the broker's acknowledgement."""
        replica = self.engine.replica
        keys = [replica.keys[int(s)] for s in slots]
        now = int(time.time() * 1000)
        chunk = 10_000
        version = self.engine.model_version
        bar = progress(total=len(keys), desc=what, unit="vector", mininterval=1.0) if progress else None
        for i in range(0, len(keys), chunk):
            vectors = _numpy(self.engine.vectors(torch.as_tensor(slots[i : i + chunk], dtype=torch.long)))
            self.publisher.publish(
                self.settings.topic_embeddings,
                [
                    signed_record(
                        VectorRecord(k, v, version, None, None, now).to_kafka(self.settings.vector_encoding), self.member
                    )
                    for k, v in zip(keys[i : i + chunk], vectors, strict=True)
                ],
            )
            if bar is not None:
                bar.update(len(vectors))
        if bar is not None:
            bar.close()
        self.stats.vectors_published += len(keys)
        m.VECTORS_PUBLISHED.labels(self.group, "vector").inc(len(keys))

    def checkpoint(self) -> None:
        """Engine state + the changelog offsets it covers + the text cache, atomically."""
        save_checkpoint(self.opened, self.positions)
        self.checkpointed = dict(self.positions)
        self.last_checkpoint = time.monotonic()

    def account(self, n_records: int, report: BatchReport, source_ms: int | None, acked: float, dead: list[DeadLetter]) -> None:
        s = self.stats
        s.changes_in += n_records
        s.dead_letters += len(dead)
        for d in dead:
            m.EVENTS_DLQ.labels(self.group, d.topic, d.error_class).inc()
            log.warning("dead-lettered %s[%d]@%d (%s): %s", d.topic, d.partition, d.offset, d.error_class, d.message[:500])
        s.batches += 1
        s.vectors_published += len(report.changed_keys)
        s.tombstones_published += len(report.deleted_keys)
        s.rows_recomputed += report.rows_recomputed
        s.vectors_suppressed += report.vectors_suppressed
        s.full_pass_layers += report.full_layers
        s.observe_affected(report.affected)
        m.VECTORS_PUBLISHED.labels(self.group, "vector").inc(len(report.changed_keys))
        m.VECTORS_PUBLISHED.labels(self.group, "tombstone").inc(len(report.deleted_keys))
        for layer, n in enumerate(report.affected):
            m.AFFECTED_NODES.labels(self.group, str(layer)).observe(n)
        if report.vectors_suppressed:
            m.VECTORS_SUPPRESSED.labels(self.group).inc(report.vectors_suppressed)
        if report.full_layers:
            m.FULL_PASS_LAYERS.labels(self.group).inc(report.full_layers)
        encoded = self.opened.text.encoded_count
        if encoded > self.text_encoded:
            m.TEXT_ENCODED.labels(self.group).inc(encoded - self.text_encoded)
        self.text_encoded = encoded
        if source_ms is not None and (report.changed_keys or report.deleted_keys):
            fresh = max(0.0, acked - source_ms / 1000)
            s.freshness_s.append(fresh)
            m.FRESHNESS_VECTOR.labels(self.group).observe(fresh)


def vector_records(
    report: BatchReport, version: str, encoding: Encoding, source_ms: int | None = None, member: str | None = None
) -> list[tuple[bytes, bytes | None, list[tuple[str, bytes]]]]:
    """The ``kg.embeddings`` records of one applied batch, ready for the producer: a vector per
    changed key (``published_ms`` now) and a tombstone per deleted key; a sharded worker's
    records name it (``member``, header ``kgs.member``)."""
    published_ms = int(time.time() * 1000)
    vectors = _numpy(report.vectors)
    n = min(len(report.changed_keys), len(vectors), len(report.changed_ts))  # no vectors: none built
    records = encode_vectors(
        report.changed_keys[:n], vectors[:n], version, report.changed_ts[:n], source_ms, published_ms, encoding
    )
    records += [VectorRecord(key, None, version).to_kafka(encoding) for key in report.deleted_keys]
    return [signed_record(r, member) for r in records] if member else records


def signed_record(record: KafkaRecord, member: str | None) -> KafkaRecord:
    """``record`` with the header ``kgs.member`` naming the sharded worker that published it."""
    if not member:
        return record
    key, value, headers = record
    return key, value, [*headers, ("kgs.member", member.encode())]


def _numpy(t: torch.Tensor | np.ndarray | None) -> np.ndarray:
    if t is None:
        return np.zeros((0, 0), dtype=np.float32)
    return t.detach().cpu().numpy() if isinstance(t, torch.Tensor) else np.asarray(t)


def embed_consumer_group(settings: Settings) -> str:
    """The worker's group over kg.changes: ``embed_group``; a sharded worker follows the whole
    changelog in a group of its own, ``<embed_group>.<member>``."""
    return f"{settings.embed_group}.{member_name(settings)}" if settings.embed_shards else settings.embed_group


def embed_consumer(settings: Settings, publisher: KafkaPublisher | None = None) -> BatchingConsumer:
    """The embedding worker: group ``embed_consumer_group`` over kg.changes, one ``EmbedStep``."""
    step = EmbedStep(settings, publisher)
    return BatchingConsumer(
        settings,
        embed_consumer_group(settings),
        [settings.topic_changes],
        "kg-embed",
        [step],
        max_batch=settings.embed_batch_max_changes,
        max_wait_s=settings.embed_batch_max_wait_s,
    )
