"""Ingest consumer against the real embedded broker and graph DB (no mocks)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid

import pytest

from streamer.ingest.step import ingest_consumer
from streamer.kafka.topics import ensure_topics
from tests.helpers import (
    graph_snapshot,
    produce,
    produce_events,
    query,
    read_topic,
    sample_events,
    settings_env,
)


def _ingest(settings, seconds: float = 90):
    return ingest_consumer(settings).run(until_caught_up=True, max_seconds=seconds)


@pytest.fixture
def prefix() -> str:
    return f"t{uuid.uuid4().hex[:8]}-"


def test_events_become_nodes_and_relationships(settings, prefix):
    ensure_topics(settings)
    events = sample_events(prefix)
    produce_events(settings, events)
    stats = _ingest(settings)
    assert stats.events_in == len(events)
    assert stats.dead_letters == 0

    p0 = query(settings, "MATCH (p:Product {id: $id}) RETURN p.title AS title, p.brand AS brand", id=f"{prefix}P0")
    assert p0 == [{"title": "Product 0 v2", "brand": f"{prefix}BrandX"}]
    p5 = query(
        settings,
        "MATCH (p:Product {id: $id}) RETURN p.title AS title, p.price AS price, p.categories AS cats, p.attributes AS attrs",
        id=f"{prefix}P5",
    )[0]
    assert p5["title"] == "Product 5" and p5["price"] == 6.5
    assert p5["cats"] == [f"{prefix}Home", f"{prefix}Kitchen1"]
    assert json.loads(p5["attrs"]) == {"colour": "blue", "size": 5}
    # structure: brand, leaf category with its parent, attribute node
    rels = query(
        settings,
        "MATCH (p:Product {id: $id})-[r]->(x) RETURN type(r) AS rel, x.id AS dst ORDER BY rel, dst",
        id=f"{prefix}P5",
    )
    assert {"rel": "HAS_BRAND", "dst": f"{prefix}Brand2"} in rels
    assert {"rel": "IN_CATEGORY", "dst": f"{prefix}Home > {prefix}Kitchen1"} in rels
    assert {"rel": "HAS_ATTRIBUTE", "dst": "colour=blue"} in rels
    parent = query(
        settings, "MATCH (c:Category {id: $id})-[:PARENT]->(p) RETURN p.id AS id", id=f"{prefix}Home > {prefix}Kitchen1"
    )
    assert parent == [{"id": f"{prefix}Home"}]
    # P0's update replaced its brand and dropped its category and attribute edges
    p0_out = query(settings, "MATCH (:Product {id: $id})-[r]->(x) RETURN type(r) AS rel, x.id AS dst", id=f"{prefix}P0")
    assert [r for r in p0_out if r["rel"] != "ALSO_BOUGHT"] == [{"rel": "HAS_BRAND", "dst": f"{prefix}BrandX"}]
    # delete: a tombstone without relationships
    p1 = query(
        settings,
        "MATCH (p:Product {id: $id}) OPTIONAL MATCH (p)-[r]-() RETURN p.deleted AS deleted, count(r) AS rels",
        id=f"{prefix}P1",
    )
    assert p1 == [{"deleted": True, "rels": 0}]
    # a relation delete is a tombstone on the relationship
    r23 = query(
        settings,
        "MATCH (:Product {id: $a})-[r:ALSO_BOUGHT]->(:Product {id: $b}) RETURN r.deleted AS deleted",
        a=f"{prefix}P2",
        b=f"{prefix}P3",
    )
    assert r23 == [{"deleted": True}]
    rated = query(
        settings,
        "MATCH (u:User)-[r:RATED]->(p:Product) WHERE u.id STARTS WITH $p "
        "RETURN count(r) AS n, min(r.rating) AS lo, max(r.rating) AS hi",
        p=prefix,
    )[0]
    assert rated["n"] > 0 and 1 <= rated["lo"] <= rated["hi"] <= 5
    # the changelog says what was applied
    changes = [json.loads(r.value) for r in read_topic(settings, settings.topic_changes)]
    keys = {c.get("key") for c in changes if c["op"] == "node_upsert"}
    assert f"Product:{prefix}P5" in keys
    assert any(c["op"] == "node_delete" and c["key"] == f"Product:{prefix}P1" for c in changes)
    assert any(c["op"] == "edge_delete" and c["src"] == f"Product:{prefix}P2" for c in changes)


def test_replay_twice_gives_identical_graph(settings, prefix):
    ensure_topics(settings)
    produce_events(settings, sample_events(prefix))
    _ingest(settings)
    first = graph_snapshot(settings, prefix)
    assert first["nodes"] and first["relationships"]
    replay = settings.model_copy(update={"ingest_group": settings.ingest_group + "-replay"})
    stats = _ingest(replay)
    assert stats.events_in > 0 and stats.nodes_written == 0
    assert graph_snapshot(settings, prefix) == first


def test_older_event_after_newer_keeps_newer_state(settings, prefix):
    ensure_topics(settings)
    pid = f"{prefix}P"
    produce_events(
        settings,
        [
            {"type": "product", "id": pid, "title": "new", "brand": f"{prefix}New", "ts": 2_000_000_000},
            {"type": "product", "id": pid, "title": "old", "brand": f"{prefix}Old", "ts": 1_000_000_000},
        ],
    )
    _ingest(settings)
    assert query(settings, "MATCH (p:Product {id: $id}) RETURN p.title AS t", id=pid) == [{"t": "new"}]
    brands = query(settings, "MATCH (:Product {id: $id})-[:HAS_BRAND]->(b) RETURN b.id AS b", id=pid)
    assert brands == [{"b": f"{prefix}New"}]
    # the stale event arrives in a later batch: still ignored
    produce_events(settings, [{"type": "product", "id": pid, "title": "stale", "brand": f"{prefix}Old", "ts": 1_500_000_000}])
    _ingest(settings)
    assert query(settings, "MATCH (p:Product {id: $id}) RETURN p.title AS t", id=pid) == [{"t": "new"}]
    # a higher producer version wins over a newer ts
    produce_events(settings, [{"type": "product", "id": pid, "title": "v2", "version": 2, "ts": 1_000}])
    _ingest(settings)
    assert query(settings, "MATCH (p:Product {id: $id}) RETURN p.title AS t", id=pid) == [{"t": "v2"}]
    # a newer delete wins and then guards against stale upserts
    produce_events(
        settings,
        [
            {"type": "product", "op": "delete", "id": pid, "version": 2, "ts": 2_200_000_000},
            {"type": "product", "id": pid, "title": "zombie", "version": 2, "ts": 2_150_000_000},
        ],
    )
    _ingest(settings)
    assert query(settings, "MATCH (p:Product {id: $id}) RETURN p.deleted AS d, p.title AS t", id=pid) == [{"d": True, "t": None}]
    # interactions: a repeated event is not counted twice
    uid = f"{prefix}U"
    view = {"type": "interaction", "user_id": uid, "product_id": f"{prefix}Q", "action": "view", "ts": 1_000}
    produce_events(settings, [view, view, {**view, "ts": 2_000}])
    _ingest(settings)
    produce_events(settings, [view])
    _ingest(settings)
    counts = query(settings, "MATCH (:User {id: $u})-[r:VIEWED]->() RETURN r.count AS c, r.first_ts AS f, r.last_ts AS l", u=uid)
    assert counts == [{"c": 2, "f": 1_000_000, "l": 2_000_000}]


INVALID = {
    "NotJson": b"{not json",
    "NotAnObject": b"[1, 2, 3]",
    "UnknownEventType": b'{"type": "coupon", "id": "x", "ts": 1}',
    "ValidationError:wrong_type": b'{"type": "product", "id": "x", "price": "cheap", "ts": 1}',
    "ValidationError:missing_id": b'{"type": "interaction", "product_id": "p", "action": "view", "ts": 1}',
    "ValidationError:label": (
        b'{"type": "relation", "src": {"label": "Admin", "id": "a"}, "rel": "ALSO_BOUGHT",'
        b' "dst": {"label": "Product", "id": "b"}, "ts": 1}'
    ),
    "ValidationError:rel": (
        b'{"type": "relation", "src": {"label": "Product", "id": "a"}, "rel": "X]->() DETACH DELETE (n",'
        b' "dst": {"label": "Product", "id": "b"}, "ts": 1}'
    ),
    "EmptyMessage": b"",
}


def test_each_invalid_input_is_dead_lettered_and_the_rest_applied(settings, prefix):
    settings = settings.model_copy(update={"max_event_bytes": 4096})
    ensure_topics(settings)
    cases = dict(INVALID)
    cases["EventTooLarge"] = json.dumps({"type": "product", "id": "big", "title": "x" * 5000, "ts": 1}).encode()
    messages = []
    for i, value in enumerate(cases.values()):
        key = f"{prefix}good{i}".encode()
        good = json.dumps({"type": "product", "id": f"{prefix}good{i}", "ts": 1}).encode()
        messages += [(settings.topic_products, key, good), (settings.topic_products, key, value)]
    produce(settings, messages)
    stats = _ingest(settings)
    assert stats.dead_letters == len(cases)
    dlq = read_topic(settings, settings.topic_dlq, expect=len(cases))
    assert len(dlq) == len(cases)
    by_value = {r.value: dict(r.headers) for r in dlq}
    for name, value in cases.items():
        headers = by_value[value]
        assert headers["__connect.errors.topic"] == settings.topic_products.encode()
        assert headers["__connect.errors.exception.class.name"] == name.split(":")[0].encode()
        assert headers["__connect.errors.exception.message"]
        assert headers["__connect.errors.stage"] == b"decode"
        assert int(headers["__connect.errors.offset"]) >= 0 and int(headers["__connect.errors.partition"]) >= 0
    good = query(settings, "MATCH (p:Product) WHERE p.id STARTS WITH $p RETURN count(p) AS n", p=f"{prefix}good")
    assert good == [{"n": len(cases)}]


NASTY = [
    "'; MATCH (n) DETACH DELETE n; //",
    '"}) DETACH DELETE n //',
    "`Product` {id: 1}",
    "{{$rows}}",
    "MERGE CREATE RETURN UNWIND WITH",
    "\\u0000 \\' \\\" \n \t ünïcødé 🚀",
]


def test_cypher_injection_is_stored_verbatim(settings, prefix):
    ensure_topics(settings)
    before = query(settings, "MATCH (n) RETURN count(n) AS n")[0]["n"]
    events = []
    for i, text in enumerate(NASTY):
        events.append(
            {
                "type": "product",
                "id": f"{prefix}{text}",
                "title": text,
                "description": text,
                "brand": f"{prefix}{text}",
                "categories": [f"{prefix}{text}"],
                "ts": 1000 + i,
            }
        )
        events.append(
            {
                "type": "interaction",
                "user_id": f"{prefix}{text}",
                "product_id": f"{prefix}{text}",
                "action": "view",
                "ts": 2000 + i,
            }
        )
        events.append(
            {
                "type": "relation",
                "src": {"label": "Product", "id": f"{prefix}{text}"},
                "rel": "SIMILAR_TO",
                "dst": {"label": "Product", "id": f"{prefix}{NASTY[0]}"},
                "props": {"note": text},
                "ts": 3000 + i,
            }
        )
    produce_events(settings, events)
    stats = _ingest(settings)
    assert stats.dead_letters == 0
    for text in NASTY:
        row = query(
            settings,
            "MATCH (p:Product {id: $id}) RETURN p.title AS t, p.description AS d, p.brand AS b",
            id=f"{prefix}{text}",
        )
        assert row == [{"t": text, "d": text, "b": f"{prefix}{text}"}]
        viewed = query(
            settings, "MATCH (u:User {id: $id})-[:VIEWED]->(:Product {id: $id}) RETURN count(*) AS n", id=f"{prefix}{text}"
        )
        assert viewed == [{"n": 1}]
        note = query(settings, "MATCH (:Product {id: $id})-[r:SIMILAR_TO]->() RETURN r.note AS note", id=f"{prefix}{text}")
        assert note == [{"note": text}]
    after = query(settings, "MATCH (n) RETURN count(n) AS n")[0]["n"]
    # exactly the nodes these events name were added (products, users, brands, categories), nothing else changed
    ours = query(settings, "MATCH (n) WHERE n.id STARTS WITH $p RETURN count(n) AS n", p=prefix)[0]["n"]
    assert ours == 4 * len(NASTY)
    assert after - before == ours


def _ingest_process(settings) -> subprocess.Popen:
    env = {**os.environ, **settings_env(settings)}
    return subprocess.Popen(
        [sys.executable, "-m", "streamer.cli", "ingest", "--until-caught-up", "--max-seconds", "120"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )


def test_kill_9_mid_stream_then_restart_equals_clean_run(settings, prefix):
    ensure_topics(settings)
    clean_prefix, crash_prefix = prefix + "clean-", prefix + "crash-"
    produce_events(settings, sample_events(clean_prefix, products=40))
    _ingest(settings)
    # the crash run: the same events in another namespace, small batches so the kill lands mid-stream
    crash = settings.model_copy(
        update={
            "ingest_group": settings.ingest_group + "-crash",
            "batch_max_events": 5,
            # noida-db never evicts a member killed with -9: static membership lets the restart take its place
            "group_instance_id": "ingest-0" if settings.local_broker == "noida" else None,
        }
    )
    produce_events(settings, sample_events(crash_prefix, products=40))
    proc = _ingest_process(crash)
    deadline = time.monotonic() + 90
    applied = 0
    while time.monotonic() < deadline and applied < 15:
        applied = query(settings, "MATCH (p:Product) WHERE p.id STARTS WITH $p RETURN count(p) AS n", p=crash_prefix)[0]["n"]
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)
    assert applied > 0, "the kill should land after some batches were written"
    assert graph_snapshot(settings, crash_prefix) != graph_snapshot(settings, clean_prefix), "killed before the end"
    restart = _ingest_process(crash)
    try:
        out, _ = restart.communicate(timeout=150)
    except subprocess.TimeoutExpired:
        restart.kill()
        out, _ = restart.communicate()
        raise AssertionError("restarted ingest did not finish:\n" + out.decode()[-5000:]) from None
    assert restart.returncode == 0, out.decode()[-3000:]
    crashed, clean = graph_snapshot(settings, crash_prefix), graph_snapshot(settings, clean_prefix)
    for part in ("nodes", "relationships"):
        assert sorted(set(crashed[part]) ^ set(clean[part])) == [], part
        assert crashed[part] == clean[part]
