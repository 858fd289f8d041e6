"""The embedding worker's input: no kg.changes record stops it, and the replica never disagrees
with the graph DB silently (``verify --against-graph``). Real broker and graph DB."""

from __future__ import annotations

import json
import threading
import uuid

import pytest

from streamer.embed.verify import verify
from streamer.embed.worker import embed_consumer
from streamer.ingest.step import ingest_consumer
from tests.conftest import wait_for
from tests.helpers import produce, produce_events, query, read_topic, sample_events

JUNK = [
    ("not_json", b"\xff\xfe not json"),
    ("empty", b""),
    ("deep", b"[" * 4000 + b"]" * 4000),
    ("array", b"[1,2]"),
    ("unknown_op", b'{"op":"node_merge","key":"Product:x","ts":1}'),
    ("unknown_field", b'{"op":"node_upsert","key":"Product:x","ts":1,"evil":true}'),
    ("label_outside_allowlist", b'{"op":"node_upsert","key":"Person:x","ts":1}'),
    ("key_without_label", b'{"op":"node_delete","key":"x","ts":1}'),
    ("edge_without_rel", b'{"op":"edge_upsert","src":"User:u","dst":"Product:p","ts":1}'),
    ("time_as_text", b'{"op":"edge_upsert","src":"User:u","rel":"VIEWED","dst":"Product:p","ts":"yesterday"}'),
    ("time_negative", b'{"op":"node_upsert","key":"Product:x","ts":-5}'),
    ("out_edges_not_pairs", b'{"op":"node_upsert","key":"Product:x","ts":1,"props":{"out_edges":[["HAS_BRAND"]]}}'),
    ("out_edges_bad_key", b'{"op":"node_upsert","key":"Product:x","ts":1,"props":{"out_edges":[["HAS_BRAND","Nope:b"]]}}'),
    ("props_not_object", b'{"op":"node_upsert","key":"Product:x","ts":1,"props":[1]}'),
    ("lone_surrogate_key", b'{"op":"node_upsert","key":"Product:\\ud800","ts":1}'),
    ("nan_time", b'{"op":"node_upsert","key":"Product:x","ts":NaN}'),
]


@pytest.fixture
def prefix() -> str:
    return f"c{uuid.uuid4().hex[:6]}-"


def test_bad_changelog_records_go_to_the_dlq_and_the_worker_keeps_running(settings, prefix):
    events = sample_events(prefix, products=12)
    produce_events(settings, events[: len(events) // 2])
    ingest_consumer(settings).run(until_caught_up=True, max_seconds=120)
    produce(settings, [(settings.topic_changes, name.encode(), raw) for name, raw in JUNK])
    produce_events(settings, events[len(events) // 2 :])
    ingest_consumer(settings).run(until_caught_up=True, max_seconds=120)

    worker = embed_consumer(settings)
    result: dict = {}
    thread = threading.Thread(target=lambda: result.setdefault("stats", worker.run(max_seconds=240)), daemon=True)
    thread.start()
    try:

        def dead_letters() -> list:
            records = read_topic(settings, settings.topic_dlq, expect=len(JUNK), timeout_s=2)
            return records if len(records) >= len(JUNK) else []

        dlq = wait_for(dead_letters, timeout_s=180, interval_s=0.5, what="every bad record dead-lettered")
        assert thread.is_alive(), f"the worker stopped: {result}"
    finally:
        worker.stop()
        thread.join(120)
    stats = result["stats"]
    assert stats.dead_letters == len(JUNK)
    by_key = {r.key.decode(): dict(r.headers) for r in read_topic(settings, settings.topic_dlq, expect=len(JUNK))}
    assert set(by_key) == {name for name, _ in JUNK} and len(dlq) == len(JUNK)
    assert all(h["__connect.errors.stage"] == b"apply" for h in by_key.values())
    assert by_key["unknown_op"]["__connect.errors.exception.class.name"] == b"UnknownOp"
    assert by_key["deep"]["__connect.errors.exception.class.name"] == b"NotJson"
    report = verify(settings, against_topic=True, against_graph=True)
    assert report["ok"], json.dumps(report, indent=2)


def test_a_relation_to_a_deleted_product_creates_nothing_and_the_replica_agrees(settings, prefix):
    def product(pid: str, ts: int) -> dict:
        return {"type": "product", "id": f"{prefix}{pid}", "title": pid, "brand": f"{prefix}brand", "ts": ts}

    def relation(src: str, dst: str, ts: int) -> dict:
        return {
            "type": "relation",
            "src": {"label": "Product", "id": f"{prefix}{src}"},
            "rel": "also_bought",
            "dst": {"label": "Product", "id": f"{prefix}{dst}"},
            "ts": ts,
        }

    produce_events(settings, [product("A", 1), product("B", 2), {"type": "product", "op": "delete", "id": f"{prefix}B", "ts": 3}])
    ingest_consumer(settings).run(until_caught_up=True, max_seconds=120)
    # later: relations from an existing and from a new product to the deleted one, and a good one
    produce_events(settings, [relation("A", "B", 4), relation("NEW", "B", 5), relation("A", "C", 6)])
    ingest_consumer(settings).run(until_caught_up=True, max_seconds=120)
    ids = {r["id"] for r in query(settings, "MATCH (p:Product) WHERE p.id STARTS WITH $p RETURN p.id AS id", p=prefix)}
    assert ids == {f"{prefix}A", f"{prefix}B", f"{prefix}C"}, "no bare node for NEW"
    assert query(settings, "MATCH (:Product {id: $b})-[r]-() RETURN count(r) AS n", b=f"{prefix}B") == [{"n": 0}]
    embed_consumer(settings).run(until_caught_up=True, max_seconds=180)
    report = verify(settings, against_topic=True, against_graph=True)
    assert report["ok"], json.dumps(report, indent=2)
    assert report["graph"]["edges"] > 0 and report["graph"]["nodes_only_in_graph"] == 0


def test_a_replica_that_missed_changes_is_found_and_repaired(settings, prefix):
    """The broker loses changelog records (an unclean restart): the graph has what the replica
    lacks. ``verify --against-graph`` finds it, ``--repair`` publishes the changes that close the
    gap, and the worker applies them like any others."""
    produce_events(settings, sample_events(prefix, products=8))
    ingest_consumer(settings).run(until_caught_up=True, max_seconds=120)
    embed_consumer(settings).run(until_caught_up=True, max_seconds=180)
    # what a lost change looks like: written to the graph, never published
    query(
        settings,
        "MERGE (p:Product {id: $id}) SET p.title = 'lost', p.ts = 1, p.version = 0, p.deleted = false",
        id=f"{prefix}LOST",
    )
    query(
        settings,
        "MATCH (u:User {id: $u}), (p:Product {id: $p}) MERGE (u)-[r:PURCHASED]->(p) SET r.count = 1, r.first_ts = 1",
        u=f"{prefix}U0",
        p=f"{prefix}LOST",
    )
    dropped = query(settings, "MATCH (:User {id: $u})-[r]->(:Product) WITH r LIMIT 1 DELETE r RETURN 1 AS n", u=f"{prefix}U1")
    assert dropped == [{"n": 1}]
    report = verify(settings, against_graph=True, repair=True)
    graph = report["graph"]
    assert not graph["ok"] and graph["nodes_only_in_graph"] == 1 and graph["edges_only_in_graph"] == 1
    assert graph["edges_only_in_replica"] >= 1 and graph["repair_changes_published"] >= 3
    embed_consumer(settings).run(until_caught_up=True, max_seconds=180)
    after = verify(settings, against_topic=True, against_graph=True)
    assert after["ok"], json.dumps(after, indent=2)
