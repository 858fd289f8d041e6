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
        return {k: unprefix(v) for k, v in sorted(props.items()) if k != "id"}

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
    env: dict[str, str] = {}
    for name, value in settings.model_dump().items():
        if value is None:
            continue
        if hasattr(value, "get_secret_value"):
            value = value.get_secret_value()
        env[f"KGS_{name.upper()}"] = str(value)
    return env


def check_valid_and_ordered(events: list[dict]) -> None:
    """Every event passes the event schema, and event times never go backwards."""
    previous = None
    for event in events:
        typed = validate_event(event)
        assert previous is None or typed.ts >= previous, f"out of order: {event}"
        previous = typed.ts
