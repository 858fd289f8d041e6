"""Embedding worker end to end on the real embedded broker and graph DB: events -> ingest ->
kg.changes -> worker -> kg.embeddings."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid

import numpy as np
import pytest

from streamer.embed.verify import last_vectors, verify
from streamer.embed.worker import embed_consumer
from streamer.ingest.step import ingest_consumer
from tests.helpers import produce_events, query, sample_events, settings_env


@pytest.fixture
def prefix() -> str:
    return f"w{uuid.uuid4().hex[:6]}-"


def ingest(settings):
    return ingest_consumer(settings).run(until_caught_up=True, max_seconds=120)


def embed(settings):
    return embed_consumer(settings).run(until_caught_up=True, max_seconds=180)


def k_hop(settings, key: str, hops: int) -> set[str]:
    """Node keys within `hops` undirected hops of `key`, read from the graph DB over Bolt."""
    label, _, node_id = key.partition(":")
    frontier, seen = {(label, node_id)}, {(label, node_id)}
    for _ in range(hops):
        rows = query(
            settings,
            "UNWIND $nodes AS n MATCH (a {id: n[1]})-[r]-(b) WHERE labels(a)[0] = n[0] AND coalesce(r.deleted, false) = false "
            "RETURN DISTINCT labels(b)[0] AS label, b.id AS id",
            nodes=[list(n) for n in frontier],
        )
        frontier = {(r["label"], r["id"]) for r in rows} - seen
        seen |= frontier
    return {f"{label}:{node_id}" for label, node_id in seen}


def test_a_change_publishes_vectors_for_exactly_the_nodes_it_affects(settings, prefix):
    # exact mode: every vector that moved is published (the default holds back moves under 1e-4)
    settings = settings.model_copy(update={"torch_threads": 1, "embed_mode": "exact"})
    produce_events(settings, sample_events(prefix, products=30))
    ingest(settings)
    first = embed(settings)
    assert first.vectors_published > 0
    before = last_vectors(settings)
    live = {k for k, v in before.items() if v.vector is not None}
    graph_nodes = query(settings, "MATCH (n) WHERE coalesce(n.deleted, false) = false RETURN count(n) AS n")[0]["n"]
    assert len(live) == graph_nodes  # every live node has a vector
    versions = {v.model_version for v in before.values()}
    assert len(versions) == 1

    # one product's text changes
    target = f"Product:{prefix}P7"
    produce_events(
        settings,
        [
            {
                "type": "product",
                "id": f"{prefix}P7",
                "title": "A completely different title",
                "brand": f"{prefix}Brand1",
                "categories": [f"{prefix}Home", f"{prefix}Kitchen1"],
                "attributes": {"colour": "blue", "size": 7},
                "price": 8.5,
                "ts": 1_300_001_000,
            }
        ],
    )
    ingest(settings)
    offsets_before = len(before)
    second = embed(settings)
    after = last_vectors(settings)
    moved = {k for k in after if k in before and not np.array_equal(after[k].vector, before[k].vector)}
    reach = k_hop(settings, target, hops=settings.gnn_layers)
    assert target in moved
    assert moved <= reach, f"vectors outside the {settings.gnn_layers}-hop neighbourhood moved: {sorted(moved - reach)[:5]}"
    assert second.vectors_published == len(moved) and len(moved) > 1
    assert len(after) == offsets_before  # no new keys
    assert verify(settings)["ok"]

    # a delete publishes a tombstone for that key
    produce_events(settings, [{"type": "product", "op": "delete", "id": f"{prefix}P9", "ts": 1_300_002_000}])
    ingest(settings)
    third = embed(settings)
    assert third.tombstones_published == 1
    final = last_vectors(settings)
    assert final[f"Product:{prefix}P9"].vector is None
    assert final[f"Product:{prefix}P9"].model_version == next(iter(versions))
    report = verify(settings, against_topic=True)
    assert report["ok"], report


def _worker_process(settings) -> subprocess.Popen:
    env = {**os.environ, **settings_env(settings)}
    return subprocess.Popen(
        [sys.executable, "-m", "streamer.cli", "embed", "--until-caught-up", "--max-seconds", "240"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )


def test_kill_9_of_the_worker_then_restart_equals_a_clean_run(settings, prefix, tmp_path):
    settings = settings.model_copy(update={"torch_threads": 1})
    produce_events(settings, sample_events(prefix, products=120, users=15))
    ingest(settings)
    clean = settings.model_copy(
        update={
            "state_dir": tmp_path / "clean",
            "embed_group": settings.embed_group + "-clean",
            "topic_embeddings": settings.topic_embeddings + "-clean",
        }
    )
    from streamer.kafka.topics import ensure_topics

    ensure_topics(clean)
    embed(clean)
    crash = settings.model_copy(
        update={
            "state_dir": tmp_path / "crash",
            "embed_batch_max_changes": 20,
            "embed_checkpoint_every_s": 0.5,
            "group_instance_id": "embed-0" if settings.local_broker == "noida" else None,
        }
    )
    proc = _worker_process(crash)
    deadline = time.monotonic() + 120
    ckpt = crash.state_dir / "embed" / "offsets.json"
    while time.monotonic() < deadline and not ckpt.exists():
        time.sleep(0.05)
    time.sleep(0.5)
    proc.send_signal(signal.SIGKILL)
    out, _ = proc.communicate(timeout=10)
    assert ckpt.exists(), out.decode()[-3000:]
    assert proc.returncode == -signal.SIGKILL, "the worker should still have been catching up when killed"
    partial = last_vectors(crash)
    restart = _worker_process(crash)
    out, _ = restart.communicate(timeout=300)
    assert restart.returncode == 0, out.decode()[-3000:]
    want, got = last_vectors(clean), last_vectors(crash)
    assert len(partial) < len(want) or any(
        not np.array_equal(partial[k].vector, want[k].vector) for k in want if partial.get(k) is not None
    ), "the kill should land mid-stream"
    assert set(got) == set(want)
    for key, rec in want.items():
        if rec.vector is None:
            assert got[key].vector is None, key
        else:
            assert got[key].model_version == rec.model_version
            np.testing.assert_allclose(got[key].vector, rec.vector, atol=1e-5, err_msg=key)
    assert verify(crash, against_topic=True)["ok"]


class SeekLog:
    """Stands in for the Kafka client in ``on_assigned``: records where the step positions it."""

    def __init__(self) -> None:
        self.seeks: dict = {}

    def seek(self, tp, offset: int) -> None:
        self.seeks[tp] = offset

    def seek_to_beginning(self, *tps) -> None:
        for tp in tps:
            self.seeks[tp] = "beginning"


def test_a_rebalance_that_gives_the_partition_back_resumes_where_the_engine_is(settings, prefix):
    """A group hiccup (the broker forgets the member, it rejoins and gets its partition back)
    must not replay everything since the last checkpoint: the engine in memory has applied
    and published past it. Seen in the soak: a 20 s freshness spike without any fault."""
    from kafka.structs import TopicPartition

    produce_events(settings, sample_events(prefix, products=6, users=3))
    ingest(settings)
    worker = embed_consumer(settings)
    worker.run(until_caught_up=True, max_seconds=240)
    step = worker.step
    tp = TopicPartition(settings.topic_changes, 0)
    applied = step.positions[f"{tp.topic}:{tp.partition}"]
    assert applied > 0
    step.opened.offsets = {}  # as if the last checkpoint were older than what the engine applied
    client = SeekLog()
    step.on_assigned(client, {tp})
    assert client.seeks == {tp: applied}


def test_an_idle_worker_checkpoints_what_it_applied_and_verify_passes_while_it_runs(settings, prefix):
    """A long-lived worker that goes idle after a batch saves the progress its checkpoint does
    not cover yet, so `verify` against the running deployment audits the current state (found
    in a user run: verify failed against a live, caught-up worker whose checkpoint was a batch
    behind, because checkpoints were only written after batches)."""
    import json
    import threading

    from streamer.kafka.topics import read_to_end

    # the batch lands within checkpoint_every_s of the worker's start, so `process` does not
    # checkpoint after it: only the idle worker's tick can
    settings = settings.model_copy(update={"embed_checkpoint_every_s": 6.0, "torch_threads": 1})
    events = sample_events(prefix, products=12, users=5)
    produce_events(settings, events)
    ingest(settings)
    worker = embed_consumer(settings)
    thread = threading.Thread(target=worker.run, kwargs={"max_seconds": 120}, daemon=True)
    thread.start()
    try:
        end = sum(1 for _ in read_to_end(settings, settings.topic_changes, 60))
        offsets = settings.state_dir / "embed" / "offsets.json"
        deadline = time.monotonic() + 25
        while time.monotonic() < deadline:
            saved = json.loads(offsets.read_text())["offsets"] if offsets.exists() else {}
            if saved.get(f"{settings.topic_changes}:0") == end:
                break
            time.sleep(0.2)
        assert saved.get(f"{settings.topic_changes}:0") == end, (saved, end)
        assert thread.is_alive()  # checkpointed by the running worker, not by its shutdown
        report = verify(settings, against_topic=True, against_graph=True)
        assert report["ok"], report
    finally:
        worker.stop()
        thread.join(timeout=60)
