"""Helpers shared by the integration tests: produce events, read topics, snapshot the graph."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest
from kafka import KafkaConsumer, KafkaProducer
from neo4j import GraphDatabase

from streamer.contracts.events import validate_event
from streamer.settings import Settings


def full_dataset(*parts: str) -> Path:
    """A file or folder of the full public data sets under ``KGS_DATA_DIR`` (default
    ``../shared/data`` beside the project). Missing: the test fails under CI (``CI=true``)
    with what to do, and is skipped on a developer's machine without the data."""
    path = Settings(_env_file=None).data_dir.joinpath(*parts)
    if path.exists():
        return path
    message = (
        f"the full data set {path} is missing: set KGS_DATA_DIR to the folder that holds "
        "online_retail/ and amazon_magazine_2018/ (see data/sample/README.md)"
    )
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(message)
    pytest.skip(message)


def produce(settings: Settings, messages: Iterable[tuple[str, bytes | None, bytes | None]]) -> int:
    """Send (topic, key, value) messages in order and wait for every ack."""
    producer = KafkaProducer(bootstrap_servers=settings.bootstrap_servers, acks="all", max_in_flight_requests_per_connection=1)
    futures = [producer.send(topic, key=key, value=value) for topic, key, value in messages]
    producer.flush()
    for f in futures:
        f.get(timeout=10)
    producer.close()
    return len(futures)


def event_message(settings: Settings, event: dict) -> tuple[str, bytes, bytes]:
    """The (topic, key, value) a well-behaved producer would send for an event dict."""
    kind = event["type"]
    if kind == "product":
        return settings.topic_products, event["id"].encode(), json.dumps(event).encode()
    if kind == "interaction":
        return settings.topic_interactions, event["user_id"].encode(), json.dumps(event).encode()
    return settings.topic_relations, event["src"]["id"].encode(), json.dumps(event).encode()


def produce_events(settings: Settings, events: Iterable[dict]) -> int:
    return produce(settings, (event_message(settings, e) for e in events))


def read_topic(settings: Settings, topic: str, expect: int | None = None, timeout_s: float = 15.0) -> list:
    """Every record of a topic (all partitions), waiting up to timeout_s for `expect` of them."""
    consumer = KafkaConsumer(
        bootstrap_servers=settings.bootstrap_servers, auto_offset_reset="earliest", enable_auto_commit=False, group_id=None
    )
    partitions = consumer.partitions_for_topic(topic) or set()
    from kafka.structs import TopicPartition

    tps = [TopicPartition(topic, p) for p in sorted(partitions)]
    consumer.assign(tps)
    consumer.seek_to_beginning(*tps)
    records: list = []
    deadline = time.monotonic() + timeout_s
    idle_polls = 0
    while time.monotonic() < deadline:
        batch = consumer.poll(timeout_ms=500)
        got = sum(len(v) for v in batch.values())
        for recs in batch.values():
            records.extend(recs)
        if expect is not None and len(records) >= expect:
            if got == 0:
                break
        elif expect is None:
            idle_polls = idle_polls + 1 if got == 0 else 0
            if idle_polls >= 3:
                break
    consumer.close()
    return records


def graph_snapshot(settings: Settings, prefix: str) -> dict[str, Any]:
    """Nodes and relationships whose node ids start with `prefix`, with all properties, sorted.

    Ids are returned with the prefix stripped so runs in two namespaces can be compared.
    The version counters ``rev`` and ``gen`` (sinks/cypher.py) are left out: they count the
    transactions that wrote an entity, which depend on how events were batched, not on the
    state the events describe.
    """
    driver = GraphDatabase.driver(settings.bolt_uri, auth=(settings.bolt_user, settings.bolt_password.get_secret_value()))
    with driver.session(database=settings.bolt_database) as session:
        nodes = session.run(
            "MATCH (n) WHERE n.id STARTS WITH $p RETURN labels(n)[0] AS label, n.id AS id, properties(n) AS props", p=prefix
        ).data()
        rels = session.run(
            "MATCH (a)-[r]->(b) WHERE a.id STARTS WITH $p OR b.id STARTS WITH $p "
            "RETURN labels(a)[0] AS a_label, a.id AS a, type(r) AS rel, labels(b)[0] AS b_label, b.id AS b, "
            "properties(r) AS props",
            p=prefix,
        ).data()
    driver.close()

    def unprefix(value):
        if isinstance(value, list):
            return [unprefix(v) for v in value]
        return value.replace(prefix, "") if isinstance(value, str) else value

    def clean(props: dict) -> dict:
        return {k: unprefix(v) for k, v in sorted(props.items()) if k not in ("id", "rev", "gen")}

    node_rows = sorted((n["label"], unprefix(n["id"]), json.dumps(clean(n["props"]), sort_keys=True)) for n in nodes)
    rel_rows = sorted(
        (r["a_label"], unprefix(r["a"]), r["rel"], r["b_label"], unprefix(r["b"]), json.dumps(clean(r["props"]), sort_keys=True))
        for r in rels
    )
    return {"nodes": node_rows, "relationships": rel_rows}


def query(settings: Settings, statement: str, **params) -> list[dict]:
    driver = GraphDatabase.driver(settings.bolt_uri, auth=(settings.bolt_user, settings.bolt_password.get_secret_value()))
    with driver.session(database=settings.bolt_database) as session:
        rows = session.run(statement, params).data()
    driver.close()
    return rows


def sample_events(prefix: str, products: int = 20, users: int = 7, ts0: int = 1_300_000_000) -> list[dict]:
    """A small, deterministic stream touching every event kind, ids namespaced by `prefix`."""
    events: list[dict] = []
    for i in range(products):
        events.append(
            {
                "type": "product",
                "id": f"{prefix}P{i}",
                "title": f"Product {i}",
                "description": f"Description of product {i}",
                "brand": f"{prefix}Brand{i % 3}",
                "categories": [f"{prefix}Home", f"{prefix}Kitchen{i % 2}"],
                "attributes": {"colour": ["red", "blue"][i % 2], "size": i},
                "price": 1.5 + i,
                "ts": ts0 + i,
            }
        )
    for j in range(products * 3):
        events.append(
            {
                "type": "interaction",
                "user_id": f"{prefix}U{j % users}",
                "product_id": f"{prefix}P{(j * 7) % products}",
                "action": ["view", "purchase", "rate"][j % 3],
                "rating": (j % 5) + 1 if j % 3 == 2 else None,
                "ts": ts0 + 100 + j,
            }
        )
    for k in range(products - 1):
        events.append(
            {
                "type": "relation",
                "src": {"label": "Product", "id": f"{prefix}P{k}"},
                "rel": "also_bought",
                "dst": {"label": "Product", "id": f"{prefix}P{k + 1}"},
                "props": {"weight": k},
                "ts": ts0 + 500 + k,
            }
        )
    # updates and deletes after the fact
    events.append({"type": "product", "id": f"{prefix}P0", "title": "Product 0 v2", "brand": f"{prefix}BrandX", "ts": ts0 + 1000})
    events.append({"type": "product", "op": "delete", "id": f"{prefix}P1", "ts": ts0 + 1001})
    events.append(
        {
            "type": "relation",
            "op": "delete",
            "src": {"label": "Product", "id": f"{prefix}P2"},
            "rel": "ALSO_BOUGHT",
            "dst": {"label": "Product", "id": f"{prefix}P3"},
            "ts": ts0 + 1002,
        }
    )
    return events


def settings_env(settings: Settings) -> dict[str, str]:
    """Environment variables that reproduce `settings` in a child process (KGS_* overrides)."""
    return settings.to_env()


def check_valid_and_ordered(events: list[dict]) -> None:
    """Every event passes the event schema, and event times never go backwards."""
    previous = None
    for event in events:
        typed = validate_event(event)
        assert previous is None or typed.ts >= previous, f"out of order: {event}"
        previous = typed.ts


def nasty_event_cases(prefix: str = "") -> list[tuple[str, bytes, bool]]:
    """(name, message value, valid?) for the families of bad and nasty input a producer can send.

    The invalid ones must each become one dead letter; the valid ones (odd but legal: NUL,
    emoji, right-to-left text, Cypher in a title, 20k characters) must be stored verbatim.
    ``prefix`` keeps their ids apart between tests."""

    def product(**fields: Any) -> dict[str, Any]:
        return {"type": "product", "id": f"{prefix}nasty-{fields.pop('n')}", "ts": "2011-01-01T00:00:00Z", **fields}

    def raw(doc: Any) -> bytes:
        return json.dumps(doc, ensure_ascii=False).encode()

    deep = "[" * 5000 + "]" * 5000  # 10 KB of valid UTF-8 JSON: deeper than Python's parser goes
    return [
        ("deep_array", deep.encode(), False),
        (
            "deep_object_in_attributes",
            raw(product(n=1))[:-1] + b',"attributes":{"k":' + b'{"a":' * 3000 + b"1" + b"}" * 3000 + b"}}",
            False,
        ),
        ("moderately_deep", raw(product(n=2, attributes={"k": [[[[[[[[[[[[[[[[[[1]]]]]]]]]]]]]]]]]]})), False),
        ("three_megabytes", b'{"type":"product","id":"big","ts":1,"title":"' + b"x" * 3_000_000 + b'"}', False),
        ("not_json", b"\x00\x01\x02 hello \xff", False),
        ("latin1_not_utf8", '{"type":"product","id":"caf\xe9","ts":1}'.encode("latin-1"), False),
        ("empty", b"", False),
        ("json_null", b"null", False),
        ("json_array", b"[1, 2, 3]", False),
        ("json_string", b'"product"', False),
        ("nan", raw(product(n=3))[:-1] + b',"price":NaN}', False),
        ("infinity_in_attributes", raw(product(n=4))[:-1] + b',"attributes":{"w":Infinity}}', False),
        ("overflowing_float", raw(product(n=5))[:-1] + b',"attributes":{"w":1e400}}', False),
        ("int_past_int64_version", raw(product(n=6))[:-1] + b',"version":123456789012345678901234567890}', False),
        (
            "int_below_int64_in_props",
            b'{"type":"relation","src":{"label":"Product","id":"a"},"rel":"also_bought","dst":{"label":"Product","id":"b"},'
            b'"props":{"w":-9223372036854775809},"ts":1}',
            False,
        ),
        ("lone_surrogate_id", b'{"type":"product","id":"\\ud800","ts":1}', False),
        ("lone_surrogate_attribute_key", raw(product(n=7))[:-1] + b',"attributes":{"\\udfff":"x"}}', False),
        ("unknown_type", b'{"type":"order","id":"o1","ts":1}', False),
        (
            "label_injection",
            b'{"type":"relation","src":{"label":"Product {id: 1}) DETACH DELETE n //","id":"a"},"rel":"also_bought",'
            b'"dst":{"label":"Product","id":"b"},"ts":1}',
            False,
        ),
        (
            "relationship_outside_allowlist",
            b'{"type":"relation","src":{"label":"Product","id":"a"},"rel":"OWNS","dst":{"label":"Product","id":"b"},"ts":1}',
            False,
        ),
        ("time_past_year_9999", raw(product(n=8, ts=1e300)), False),
        ("rate_without_rating", b'{"type":"interaction","user_id":"u","product_id":"p","action":"rate","ts":1}', False),
        # nasty but valid: stored verbatim
        ("duplicate_keys_last_wins", raw(product(n=9))[:-1] + b',"title":"first","title":"last"}', True),
        ("nul_and_emoji", raw(product(n=10, title="a\x00b \U0001f600 \u202eevil")), True),
        ("cypher_in_title", raw(product(n=11, title='"}) DETACH DELETE n // MATCH (m) SET m.x = 1')), True),
        ("twenty_thousand_characters", raw(product(n=12, description="é" * 20_000)), True),
        ("utf16_with_bom", json.dumps(product(n=13, title="utf-16")).encode("utf-16"), True),
    ]


NASTY_EVENT_CASES = nasty_event_cases()


class PassStep:
    """A consumer step that does nothing (``streamer.kafka.consumer.Step``); tests override
    ``process`` to stage what a step may do to a batch."""

    stats = None

    def start(self) -> None:
        pass

    def process(self, batch: Any) -> None:
        pass

    def on_revoked(self) -> None:
        pass

    def on_assigned(self, consumer: Any, partitions: Any) -> None:
        pass

    def close(self, finished: bool) -> None:
        pass
