"""Sharded last layer (streamer/embed/shards.py, ``IncrementalEngine.set_shards``).

Property: N engines that each own a disjoint set of shards and apply the same stream publish,
together, exactly what one unsharded engine publishes: each key only by its owner, and the
last vector per key equal to the unsharded one. Each keeps its owned rows exact (``verify``),
computes at most its share of the last layer, and a shard that moves to another engine is
brought up to date by ``refresh_last_layer`` on the new owner.

The group protocol part (``ShardMembership`` over a real broker) is in
``test_shard_membership`` below.
"""

from __future__ import annotations

import time

import numpy as np
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from streamer.embed.engine import IncrementalEngine
from streamer.embed.shards import ShardMembership, shard_of
from tests.streamer.embed.test_engine import make_model, stream_st, to_changes

SHARDS = 8


def engines(owners: list[set[int]], layers: int, full_ratio: float) -> tuple[IncrementalEngine, list[IncrementalEngine]]:
    whole = IncrementalEngine(make_model(layers), "cpu", full_ratio=full_ratio)
    parts = []
    for owned in owners:
        e = IncrementalEngine(make_model(layers), "cpu", full_ratio=full_ratio)
        e.set_shards(SHARDS, owned)
        parts.append(e)
    return whole, parts


def split(n: int) -> list[set[int]]:
    return [{s for s in range(SHARDS) if s % n == i} for i in range(n)]


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(stream=stream_st, layers=st.integers(1, 3), n=st.sampled_from([2, 3]), ratio=st.sampled_from([0.0, 1e-9]))
def test_sharded_engines_together_publish_what_one_engine_publishes(stream, layers, n, ratio):
    whole, parts = engines(split(n), layers, ratio)
    last_whole: dict[str, torch.Tensor | None] = {}
    last_parts: dict[str, torch.Tensor | None] = {}
    ts = 1
    for batch in stream:
        changes, features = to_changes(batch, ts)
        ts += len(batch) + 1
        rep = whole.apply(changes, features)
        last_whole.update(zip(rep.changed_keys, rep.vectors))
        last_whole.update((k, None) for k in rep.deleted_keys)
        for owned, e in zip(split(n), parts):
            r = e.apply(changes, features)
            assert all(shard_of(k, SHARDS) in owned for k in [*r.changed_keys, *r.deleted_keys]), (
                "published a key it does not own"
            )
            last_parts.update(zip(r.changed_keys, r.vectors))
            last_parts.update((k, None) for k in r.deleted_keys)
            err, over = e.verify(1e-5)
            assert over == 0, f"owned rows off by {err}"
    assert set(last_parts) == set(last_whole)
    for k, v in last_whole.items():
        got = last_parts[k]
        assert (v is None) == (got is None), k
        if v is not None:
            assert torch.allclose(got, v, atol=1e-5, rtol=0), k


def test_each_engine_computes_its_share_of_the_last_layer_and_a_moved_shard_is_refreshed():
    rng = np.random.default_rng(0)
    users = [f"User:{i}" for i in range(300)]
    products = [f"Product:{i}" for i in range(100)]
    owners = split(2)
    whole, parts = engines(owners, 2, 0.0)
    base = [("edge_upsert", users[u], "A", products[p]) for u, p in rng.integers(0, 100, (600, 2)) if u < 300]
    stream = [base] + [
        [("edge_upsert", users[int(rng.integers(300))], "A", products[int(rng.integers(100))]) for _ in range(5)]
        for _ in range(20)
    ]
    rows_whole, rows_parts = 0, [0, 0]
    ts = 1
    for i, batch in enumerate(stream):
        changes, features = to_changes(batch, ts)
        ts += len(batch) + 1
        rw = whole.apply(changes, features)
        rp = [e.apply(changes, features) for e in parts]
        if i:  # the first batch builds the graph
            rows_whole += rw.affected[-1]
            for j, r in enumerate(rp):
                rows_parts[j] += r.affected[-1]
    assert rows_whole > 0 and sum(rows_parts) == rows_whole
    assert max(rows_parts) < 0.75 * rows_whole, (rows_parts, rows_whole)

    # engine 1 dies; engine 0 takes its shards over: stale last-layer rows until refreshed
    moved = owners[1]
    e0 = parts[0]
    e0.set_shards(SHARDS, owners[0] | moved)
    err, over = e0.verify(1e-5)
    assert over > 0, "the new shard's last layer should be stale before the refresh"
    e0.refresh_last_layer(e0.shard_rows(moved))
    err, over = e0.verify(1e-5)
    assert over == 0, err
    for k in whole.replica.index:
        assert torch.allclose(e0.vector(k), whole.vector(k), atol=1e-5, rtol=0), k


def test_shard_of_is_kafkas_default_partitioner():
    """Java's ``Utils.murmur2`` test vectors (Kafka's UtilsTest), through the default
    partitioner's ``toPositive(murmur2(key)) % partitions``: shard s is partition s of a topic
    with S partitions."""
    for key, java in [("21", -973932308), ("foobar", -790332482), ("a-little-bit-long-string", -985981536), ("abc", 479470107)]:
        for n in (7, 64, 1000):
            assert shard_of(key, n) == (java & 0x7FFFFFFF) % n


def test_shard_membership_splits_the_shards_and_hands_a_leavers_over(settings):
    """Two members of the shard group over a real broker: disjoint owned sets covering every
    shard; when one leaves, the other owns everything."""
    from streamer.kafka.topics import ensure_topics

    unique = settings.embed_group
    s = settings.model_copy(update={"embed_shards": SHARDS, "topic_shards": f"{unique}.shards"})
    ensure_topics(s)
    a = ShardMembership(s.model_copy(update={"group_instance_id": None}), revoke_wait_s=10)
    b = ShardMembership(s.model_copy(update={"group_instance_id": None}), revoke_wait_s=10)
    owned: dict[str, frozenset[int]] = {"a": frozenset(), "b": frozenset()}

    def follow(deadline_s: float, done) -> None:
        end = time.monotonic() + deadline_s
        while time.monotonic() < end and not done():
            for name, m in (("a", a), ("b", b)):
                got = m.take()
                if got is not None:
                    owned[name] = got
            time.sleep(0.05)

    try:
        a.start()
        b.start()
        follow(90, lambda: owned["a"] and owned["b"] and (owned["a"] | owned["b"]) == set(range(SHARDS)))
        assert owned["a"] and owned["b"], owned
        assert not owned["a"] & owned["b"]
        assert owned["a"] | owned["b"] == set(range(SHARDS))
        b.close()
        follow(90, lambda: owned["a"] == set(range(SHARDS)))
        assert owned["a"] == set(range(SHARDS)), owned
    finally:
        a.close()
        b.close()
