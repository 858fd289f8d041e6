"""``kg-streamer verify``: is the incremental state what a full recompute gives?

Loads the worker's checkpoint (replica, features and every cached layer), runs the full PyG
forward pass over the whole replica with the same weights and compares: max abs error and
the number of rows over the tolerance. With ``against_topic`` it also reads kg.embeddings
and checks that the last record per key is the engine's current vector (same model version,
equal within the tolerance) and that deleted nodes end in a tombstone.
"""

from __future__ import annotations

import numpy as np
import torch

from streamer.contracts.vectors import decode_vector
from streamer.embed.state import open_checkpoint
from streamer.settings import Settings


def verify(settings: Settings, against_topic: bool = False, tol: float | None = None) -> dict:
    """``tol`` defaults to 1e-5 plus the engine's reported error bound (0 in exact mode)."""
    engine = open_checkpoint(settings, require=True, progress=False).engine
    if tol is None:
        tol = 1e-5 + engine.error_bound
    max_err, rows_over = engine.verify(tol=tol)
    report = {
        "nodes": engine.replica.num_nodes,
        "edges": engine.replica.num_edges,
        "model_version": engine.model_version,
        "max_abs_err": max_err,
        "rows_over_tol": rows_over,
        "tol": tol,
    }
    ok = rows_over == 0
    if against_topic:
        topic = last_vectors(settings)
        slots = engine.replica.live_slots()
        keys = [engine.replica.keys[int(s)] for s in slots]
        current = engine.vectors(torch.as_tensor(slots, dtype=torch.long)).cpu().numpy()
        missing = stale = wrong_version = 0
        worst = 0.0
        for key, vec in zip(keys, current):
            rec = topic.pop(key, None)
            if rec is None or rec.vector is None:
                missing += 1
                continue
            if rec.model_version != engine.model_version:
                wrong_version += 1
            err = float(np.abs(rec.vector - vec).max())
            worst = max(worst, err)
            stale += err > tol
        # what is left on the topic is a key the engine no longer has: it must be a tombstone
        not_tombstoned = sum(1 for rec in topic.values() if rec.vector is not None)
        report["topic"] = {
            "keys_missing": missing,
            "keys_stale": stale,
            "wrong_version": wrong_version,
            "max_abs_err": worst,
            "deleted_without_tombstone": not_tombstoned,
        }
        ok = ok and missing == stale == wrong_version == not_tombstoned == 0
    report["ok"] = ok
    return report


def last_vectors(settings: Settings, timeout_s: float = 10.0) -> dict:
    """The last record per key on kg.embeddings (what compaction converges to)."""
    from kafka import KafkaConsumer
    from kafka.structs import TopicPartition

    consumer = KafkaConsumer(bootstrap_servers=settings.bootstrap_servers, enable_auto_commit=False, group_id=None)
    tps = [
        TopicPartition(settings.topic_embeddings, p)
        for p in sorted(consumer.partitions_for_topic(settings.topic_embeddings) or [])
    ]
    consumer.assign(tps)
    consumer.seek_to_beginning(*tps)
    last: dict = {}
    idle = 0
    import time

    deadline = time.monotonic() + timeout_s
    while idle < 3 and time.monotonic() < deadline + 600:
        batch = consumer.poll(timeout_ms=500)
        if not batch:
            done = all(consumer.highwater(tp) is not None and consumer.position(tp) >= consumer.highwater(tp) for tp in tps)
            idle = idle + 1 if done or time.monotonic() > deadline else 0
            continue
        for records in batch.values():
            for r in records:
                last[r.key.decode()] = decode_vector(r.key, r.value, r.headers)
    consumer.close()
    return last
