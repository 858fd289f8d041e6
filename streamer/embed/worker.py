"""Embedding worker: kg.changes -> exact incremental GNN embeddings -> kg.embeddings -> commit.

Lifecycle (one thread; kafka-python heartbeats from its own thread, auto-commit off; while metrics
are served, ``streamer.ops.lag`` samples the group's lag from the broker on a thread and
connections of its own, never touching this loop):

1. **start** -- load the text encoder (offline transformers model), the graph encoder
   (checkpoint or seeded init) and, if ``<state_dir>/embed/engine.pt`` exists, the engine
   state (graph replica, every layer's activations and aggregates) with the changelog
   offsets it covers (``offsets.json``). No checkpoint: an empty replica. If the checkpoint
   was made with another model version (``KGS_GRAPH_CHECKPOINT`` names a newly trained model,
   or the fusion settings changed), every cache is recomputed by layer-wise full-graph
   inference with a progress bar (``streamer.model.reembed``) and every live node's vector is
   republished with the new version before the loop starts (a full re-embed); the old vectors
   stay on the compacted topic until each key's new one replaces them, and every record
   names its version.
2. **assign** -- each assigned kg.changes partition is positioned from the *checkpoint*
   (``seek``), or at the beginning when there is none: the replica is a function of the
   changelog, so the worker's own checkpoint decides where it resumes, not the group commit
   (the group commit is kept up to date for lag monitoring and operators).
3. **poll** -- a micro-batch of up to ``embed_batch_max_changes`` records or
   ``embed_batch_max_wait_s``.
4. **apply** -- a product's ``out_edges`` are expanded into edge changes against the replica;
   the engine applies the batch exactly, recomputing only the affected rows per layer, and
   reports the keys whose vectors moved (bitwise) and the deleted keys.
5. **publish** -- those vectors (and tombstones) to kg.embeddings, keyed by node; waits for
   the broker's acknowledgement.
6. **commit** -- the kg.changes offsets after the batch. Every ``embed_checkpoint_every_s`` the
   engine state and those offsets are written to the state dir (atomically) after the commit.

A crash anywhere replays from the last checkpoint: replaying changes the replica already has
moves no row, so nothing is republished twice except vectors of batches after the
checkpoint, which are republished with identical values. Rebalance: the batch in hand is
dropped on revoke (eager protocol) and the partition is re-read from the checkpoint by its
next owner. SIGTERM: the loop finishes the batch in hand, checkpoints, and exits.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from kafka import ConsumerRebalanceListener
from kafka.structs import TopicPartition

from encoders.graph import GraphEncoder
from encoders.text import TextEncoder
from sinks.kafka_producer import KafkaPublisher
from streamer import metrics as m
from streamer.changes import Change, edge_delete, edge_upsert
from streamer.consumer import ConsumerLoop, caught_up, commit_after, make_consumer
from streamer.embed.engine import Featurizer, IncrementalEngine, engine_options
from streamer.embed.vectors import VectorRecord
from streamer.model.reembed import load_engine
from streamer.ops.lag import LagMonitor, start_monitor
from streamer.settings import Settings

log = logging.getLogger(__name__)

OWNED_RELS = {"HAS_BRAND", "IN_CATEGORY", "HAS_ATTRIBUTE"}


def expand_out_edges(changes: list[Change], replica) -> list[Change]:
    """A product's node_upsert carries its complete set of structural out-edges; turn it into
    the edge_delete / edge_upsert records that take the replica from its current set there."""
    out: list[Change] = []
    owned: dict[str, set[tuple[str, str]]] = {}
    for change in changes:
        out.append(change)
        if change.op == "node_delete" and change.key:
            owned[change.key] = set()
        if change.op != "node_upsert" or not change.props or "out_edges" not in change.props:
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
    batches: int = 0
    vectors_published: int = 0
    tombstones_published: int = 0
    rows_recomputed: int = 0
    vectors_suppressed: int = 0   # bounded mode: refreshed vectors under the publish threshold
    full_pass_layers: int = 0     # layers computed by a full pass (large batches)
    affected_max: list[int] = field(default_factory=list)
    affected_sum: list[int] = field(default_factory=list)
    freshness_s: list[float] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)
    apply_seconds: float = 0.0
    full_reembed: bool = False

    def observe_affected(self, affected: list[int]) -> None:
        if not self.affected_sum:
            self.affected_sum = [0] * len(affected)
            self.affected_max = [0] * len(affected)
        for i, n in enumerate(affected):
            self.affected_sum[i] += n
            self.affected_max[i] = max(self.affected_max[i], n)

    def summary(self) -> dict:
        secs = max(time.monotonic() - self.started, 1e-9)
        fresh = np.asarray(self.freshness_s) if self.freshness_s else None
        return {
            "changes_in": self.changes_in,
            "batches": self.batches,
            "vectors_published": self.vectors_published,
            "tombstones_published": self.tombstones_published,
            "rows_recomputed": self.rows_recomputed,
            "vectors_suppressed": self.vectors_suppressed,
            "full_pass_layers": self.full_pass_layers,
            "affected_per_layer_total": self.affected_sum,
            "affected_per_layer_max_batch": self.affected_max,
            "full_reembed": self.full_reembed,
            "apply_seconds": round(self.apply_seconds, 2),
            "seconds": round(secs, 2),
            "freshness_p50_s": round(float(np.percentile(fresh, 50)), 3) if fresh is not None else None,
            "freshness_p99_s": round(float(np.percentile(fresh, 99)), 3) if fresh is not None else None,
        }


class _Rebalance(ConsumerRebalanceListener):
    def __init__(self, worker: "EmbedWorker"):
        self.worker = worker

    def on_partitions_revoked(self, revoked):
        self.worker.pending = []

    def on_partitions_assigned(self, assigned):
        self.worker.position_from_checkpoint(assigned)


class EmbedWorker(ConsumerLoop):
    def __init__(self, settings: Settings, publisher: KafkaPublisher | None = None):
        self.settings = settings
        self.group = settings.embed_group
        if settings.torch_threads > 0:
            torch.set_num_threads(settings.torch_threads)
        self.dir = settings.local_dir("embed")
        self.engine_path = self.dir / "engine.pt"
        self.offsets_path = self.dir / "offsets.json"
        self.text_cache_path = self.dir / "text_cache.safetensors"
        self.stats = EmbedStats()
        self.engine, self.checkpoint_offsets = self._load_engine()
        m.MODEL_INFO.info(
            {"version": self.engine.model_version, "layers": str(self.engine.L), "dim": str(self.engine.out_dim),
             "device": str(self.engine.device)}
        )
        self.publisher = publisher or KafkaPublisher(settings, client_id="kg-embed")
        self.consumer = make_consumer(settings, self.group, "kg-embed", settings.embed_batch_max_changes)
        self.consumer.subscribe([settings.topic_changes], listener=_Rebalance(self))
        self.pending: list = []
        self.batch_started: float | None = None
        self.stopping = False
        self.last_checkpoint = time.monotonic()
        self.positions: dict[TopicPartition, int] = {}
        self.lag_monitor: LagMonitor | None = None  # started by run()

    # --- start-up ---------------------------------------------------------------------
    def _load_engine(self) -> tuple[IncrementalEngine, dict[str, int]]:
        s = self.settings
        text = TextEncoder(s.text_model, device=s.device)
        if self.text_cache_path.exists():
            text.load_cache(self.text_cache_path)
        self.text = text
        model = GraphEncoder.from_settings(s, in_dim=text.dim)
        kwargs = dict(
            fusion=s.fusion, fusion_text_weight=s.fusion_text_weight, featurize=Featurizer(text), text_model_id=text.model_id,
            **engine_options(s),  # exact (default) or bounded mode, drift guard
        )
        if not self.engine_path.exists():
            return IncrementalEngine(model, s.device, **kwargs), {}
        meta = json.loads(self.offsets_path.read_text()) if self.offsets_path.exists() else {}
        # another graph model: layer-wise full re-embed of the replica, with a progress bar
        engine, reembedded = load_engine(self.engine_path, model, s.device, **kwargs)
        if reembedded or (meta.get("model_version") and meta["model_version"] != engine.model_version):
            log.info("model version %s -> %s: full re-embed", meta["model_version"], engine.model_version)
            self.stats.full_reembed = True
        log.info("resumed from checkpoint: %d nodes, offsets %s", engine.replica.num_nodes, meta.get("offsets"))
        return engine, meta.get("offsets", {})

    def position_from_checkpoint(self, assigned) -> None:
        for tp in assigned:
            offset = self.checkpoint_offsets.get(f"{tp.topic}:{tp.partition}")
            if offset is None:
                self.consumer.seek_to_beginning(tp)
            else:
                self.consumer.seek(tp, offset)
        log.info("assigned %s, resuming from checkpoint offsets %s", sorted(map(str, assigned)), self.checkpoint_offsets)

    # --- the loop ---------------------------------------------------------------------
    def run(self, until_caught_up: bool = False, max_seconds: float | None = None) -> EmbedStats:
        deadline = time.monotonic() + max_seconds if max_seconds else None
        self.lag_monitor = start_monitor(self.settings, self.group, [self.settings.topic_changes], role="embed")
        try:
            if self.stats.full_reembed:
                self._publish_all()
            while not self.stopping:
                if deadline and time.monotonic() > deadline:
                    break
                self._poll_once()
                if self._batch_ready():
                    self._process_pending()
                if until_caught_up and not self.pending and self._caught_up():
                    break
            if self.pending:
                self._process_pending()
            self.checkpoint()
        finally:
            self.close()
        return self.stats

    def close(self) -> None:
        if self.lag_monitor is not None:
            self.lag_monitor.stop()
        self.close_quietly(self.consumer.close, self.publisher.close)

    def _poll_once(self) -> None:
        room = self.settings.embed_batch_max_changes - len(self.pending)
        if room <= 0:
            return
        timeout_ms = 2000 if not self.consumer.assignment() else 100
        for records in self.consumer.poll(timeout_ms=timeout_ms, max_records=room).values():
            self.pending.extend(records)
        if self.pending and self.batch_started is None:
            self.batch_started = time.monotonic()

    def _batch_ready(self) -> bool:
        if not self.pending:
            return False
        full = len(self.pending) >= self.settings.embed_batch_max_changes
        return full or self.stopping or time.monotonic() - (self.batch_started or 0) >= self.settings.embed_batch_max_wait_s

    def _caught_up(self) -> bool:
        return caught_up(self.consumer)

    # --- one micro-batch --------------------------------------------------------------
    def _process_pending(self) -> None:
        records, self.pending, self.batch_started = self.pending, [], None
        changes = [Change.from_json(r.value) for r in records]
        source_ms = min((c.source_ms for c in changes if c.source_ms), default=None)
        t0 = time.perf_counter()
        with m.STAGE_SECONDS.labels(self.group, "embed").time():
            report = self.engine.apply(expand_out_edges(changes, self.engine.replica))
        self.stats.apply_seconds += time.perf_counter() - t0
        with m.STAGE_SECONDS.labels(self.group, "publish").time():
            published_ms = int(time.time() * 1000)
            out = [
                VectorRecord(key, vec, self.engine.model_version, ts, source_ms, published_ms).to_kafka()
                for key, vec, ts in zip(report.changed_keys, _numpy(report.vectors), report.changed_ts)
            ]
            out += [VectorRecord(key, None, self.engine.model_version).to_kafka() for key in report.deleted_keys]
            self.publisher.publish(self.settings.topic_embeddings, out)
        acked = time.time()
        with m.STAGE_SECONDS.labels(self.group, "commit").time():
            self._commit(records)
        self._account(records, report, source_ms, acked)
        if time.monotonic() - self.last_checkpoint >= self.settings.embed_checkpoint_every_s:
            self.checkpoint()

    def _publish_all(self) -> None:
        """Full re-embed after a model change: every live node's vector with the new version."""
        from tqdm.auto import tqdm

        slots = self.engine.replica.live_slots()
        keys = [self.engine.replica.keys[int(s)] for s in slots]
        now = int(time.time() * 1000)
        chunk = 10_000
        version = self.engine.model_version
        with tqdm(total=len(keys), desc=f"publish {version}", unit="vector", mininterval=1.0) as bar:
            for i in range(0, len(keys), chunk):
                vectors = _numpy(self.engine.vectors(torch.as_tensor(slots[i:i + chunk], dtype=torch.long)))
                self.publisher.publish(
                    self.settings.topic_embeddings,
                    [VectorRecord(k, v, version, None, None, now).to_kafka() for k, v in zip(keys[i:i + chunk], vectors)],
                )
                bar.update(len(vectors))
        self.stats.vectors_published += len(keys)
        m.VECTORS_PUBLISHED.labels(self.group, "vector").inc(len(keys))
        self.checkpoint()

    def _commit(self, records) -> None:
        # the engine has applied these records whether or not the group accepts the commit
        for r in records:
            tp = TopicPartition(r.topic, r.partition)
            self.positions[tp] = max(self.positions.get(tp, 0), r.offset + 1)
        commit_after(self.consumer, self.group, records)

    def checkpoint(self) -> None:
        """Engine state + the changelog offsets it covers + the text cache, atomically."""
        offsets = dict(self.checkpoint_offsets)
        offsets.update({f"{tp.topic}:{tp.partition}": off for tp, off in self.positions.items()})
        self.engine.save(self.engine_path)
        self.text.save_cache(self.text_cache_path)
        tmp = self.offsets_path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"offsets": offsets, "model_version": self.engine.model_version}))
        tmp.replace(self.offsets_path)
        self.checkpoint_offsets = offsets
        self.last_checkpoint = time.monotonic()

    def _account(self, records, report, source_ms, acked: float) -> None:
        s = self.stats
        s.changes_in += len(records)
        s.batches += 1
        s.vectors_published += len(report.changed_keys)
        s.tombstones_published += len(report.deleted_keys)
        s.rows_recomputed += report.rows_recomputed
        s.vectors_suppressed += report.vectors_suppressed
        s.full_pass_layers += report.full_layers
        s.observe_affected(report.affected)
        m.BATCH_EVENTS.labels(self.group).observe(len(records))
        m.VECTORS_PUBLISHED.labels(self.group, "vector").inc(len(report.changed_keys))
        m.VECTORS_PUBLISHED.labels(self.group, "tombstone").inc(len(report.deleted_keys))
        for layer, n in enumerate(report.affected):
            m.AFFECTED_NODES.labels(self.group, str(layer)).observe(n)
        if report.vectors_suppressed:
            m.VECTORS_SUPPRESSED.labels(self.group).inc(report.vectors_suppressed)
        if report.full_layers:
            m.FULL_PASS_LAYERS.labels(self.group).inc(report.full_layers)
        if source_ms is not None and (report.changed_keys or report.deleted_keys):
            fresh = max(0.0, acked - source_ms / 1000)
            s.freshness_s.append(fresh)
            m.FRESHNESS_VECTOR.labels(self.group).observe(fresh)


def _numpy(t) -> np.ndarray:
    if t is None:
        return np.zeros((0, 0), dtype=np.float32)
    return t.detach().cpu().numpy() if isinstance(t, torch.Tensor) else np.asarray(t)


def load_engine_for_audit(settings: Settings) -> IncrementalEngine:
    """The worker's checkpointed engine (for `kg-streamer verify`)."""
    path = Path(settings.state_dir) / "embed" / "engine.pt"
    if not path.exists():
        raise FileNotFoundError(f"no worker checkpoint at {path}: run `kg-streamer embed` first")
    text = TextEncoder(settings.text_model, device=settings.device)
    model = GraphEncoder.from_settings(settings, in_dim=text.dim)
    return IncrementalEngine.load(path, model, settings.device, fusion=settings.fusion,
                                  fusion_text_weight=settings.fusion_text_weight, text_model_id=text.model_id,
                                  **engine_options(settings))
