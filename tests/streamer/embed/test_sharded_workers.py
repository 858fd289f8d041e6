"""Sharded embedding workers end to end on the real broker and graph DB (docs/scaling.md):
two workers split the output keys through the shard group, together publish what one
unsharded worker publishes (each key by its owner), and when one stops the other takes its
shards over and publishes their vectors, so no key is left with a dead owner."""

from __future__ import annotations

import threading
import time
import uuid

import numpy as np
import pytest

from streamer.embed.shards import shard_of
from streamer.embed.verify import last_vectors
from streamer.embed.worker import embed_consumer
from streamer.groups.lag import LagSampler, pipeline_groups
from streamer.ingest.step import ingest_consumer
from streamer.kafka.topics import ensure_topics, read_to_end
from tests.helpers import produce_events, sample_events

SHARDS = 6


class Worker:
    """One sharded worker's consumer loop in a thread."""

    def __init__(self, settings, member: str):
        self.settings = settings.model_copy(update={"embed_member": member, "state_dir": settings.state_dir / member})
        self.consumer = embed_consumer(self.settings)
        self.thread = threading.Thread(target=self.consumer.run, kwargs={"max_seconds": 300}, daemon=True)

    @property
    def step(self):
        return self.consumer.step

    def settled(self) -> bool:
        return bool(self.step.owned_shards) and not self.step.unpublished_shards and self.step.unpublished is None

    def stop(self) -> None:
        self.consumer.stop()
        self.thread.join(timeout=60)
        assert not self.thread.is_alive()


def wait_until(predicate, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def records_by_key(settings) -> dict[str, tuple[bytes | None, str]]:
    """The last record per key on kg.embeddings, with the worker that published it."""
    out = {}
    for r in read_to_end(settings, settings.topic_embeddings, 60):
        out[r.key.decode()] = (r.value, dict(r.headers or []).get("kgs.member", b"").decode())
    return out


def same_vectors(a: dict, b: dict) -> bool:
    if set(a) != set(b):
        return False
    for k, v in a.items():
        w = b[k]
        if (v.vector is None) != (w.vector is None):
            return False
        if v.vector is not None and not np.allclose(v.vector, w.vector, atol=1e-5):
            return False
    return True


def test_two_sharded_workers_publish_what_one_worker_does_and_take_over_a_leavers_shards(settings):
    prefix = f"s{uuid.uuid4().hex[:6]}-"
    base = settings.model_copy(update={"torch_threads": 1, "embed_mode": "exact"})
    single = base.model_copy(
        update={"topic_embeddings": base.topic_embeddings + ".single", "state_dir": base.state_dir / "single"}
    )
    sharded = base.model_copy(
        update={
            "topic_embeddings": base.topic_embeddings + ".sharded",
            "embed_shards": SHARDS,
            "topic_shards": base.topic_changes + ".shards",
        }
    )
    ensure_topics(single)
    ensure_topics(sharded)
    events = sample_events(prefix, products=30)
    produce_events(base, events[: len(events) // 2])
    ingest_consumer(base).run(until_caught_up=True, max_seconds=120)

    # one unsharded worker: the reference
    embed_consumer(single).run(until_caught_up=True, max_seconds=180)
    want = last_vectors(single)
    assert len(want) > 20

    # two sharded workers: disjoint owners, together exactly the reference
    a, b = Worker(sharded, f"{prefix}a"), Worker(sharded, f"{prefix}b")
    a.thread.start()
    b.thread.start()
    try:
        wait_until(
            lambda: a.settled() and b.settled() and (a.step.owned_shards | b.step.owned_shards) == set(range(SHARDS)),
            120,
            "both workers to own shards",
        )
        assert not a.step.owned_shards & b.step.owned_shards
        wait_until(lambda: same_vectors(last_vectors(sharded), want), 120, "the sharded workers to publish the reference vectors")
        owner = {s: name for w, name in ((a, f"{prefix}a"), (b, f"{prefix}b")) for s in w.step.owned_shards}
        for key, (_value, member) in records_by_key(sharded).items():
            assert member == owner[shard_of(key, SHARDS)], (
                f"{key} last published by {member}, its shard is {owner[shard_of(key, SHARDS)]}'s"
            )
        rows = (a.consumer.stats.rows_recomputed, b.consumer.stats.rows_recomputed)
        # kg-streamer status (no --group) finds each worker's changelog group on the broker
        members = {f"{sharded.embed_group}.{prefix}{m}" for m in "ab"}
        sampler = LagSampler(sharded.bootstrap_servers)
        try:
            groups = pipeline_groups(sharded, sampler.list_groups())
            assert members <= set(groups) and sharded.embed_group not in groups, groups
            assert f"{sharded.embed_group}.shards" not in groups
            wait_until(
                lambda: (
                    {g.group: g.lag_messages for g in sampler.sample({m: groups[m] for m in members})}
                    == dict.fromkeys(members, 0)
                ),
                60,
                "both workers' groups to commit the whole changelog",
            )
        finally:
            sampler.close()

        # b leaves; a takes every shard over, then more changes arrive
        b.stop()
        wait_until(lambda: a.step.owned_shards == set(range(SHARDS)) and a.settled(), 120, "a to own every shard")
        # a started on an empty replica (nothing to refresh) and now refreshed b's shards only: the
        # rebalance handed its own shards straight back without a refresh (it applied no batch
        # while it owned nothing), so fewer rows than the graph has
        nodes = a.step.engine.replica.num_nodes
        assert 0 < a.consumer.stats.shard_rows_refreshed < nodes, (a.consumer.stats.shard_rows_refreshed, nodes)
        produce_events(base, events[len(events) // 2 :])
        ingest_consumer(base).run(until_caught_up=True, max_seconds=120)
        embed_consumer(single).run(until_caught_up=True, max_seconds=180)
        want = last_vectors(single)
        wait_until(lambda: same_vectors(last_vectors(sharded), want), 120, "a to publish the reference vectors alone")
        for key, (_value, member) in records_by_key(sharded).items():
            if shard_of(key, SHARDS) not in {s for s, n in owner.items() if n == f"{prefix}a"}:
                continue
            assert member == f"{prefix}a"
        print("rows recomputed per worker", rows)
    finally:
        for w in (a, b):
            if w.thread.is_alive():
                w.stop()


pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
