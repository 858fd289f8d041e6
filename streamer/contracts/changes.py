"""The graph changelog record: what the ingest consumer publishes to ``kg.changes``.

One JSON object per Kafka message, keyed by the node key it is about (for an edge: its source
node). Each record says what the graph DB *applied* in a committed transaction, as the state
after the change, so that applying a record twice changes nothing (the embed worker relies on
that: the changelog is replayed at least once).

    {"op": "node_upsert", "key": "Product:85123A", "label": "Product", "id": "85123A",
     "ts": 1291191960000, "props": {"title": ..., "description": ..., "brand": ...,
     "categories": [...], "attributes": {...}, "price": ...,
     "out_edges": [["HAS_BRAND", "Brand:Acme"], ["IN_CATEGORY", "Category:Home > Kitchen"], ...]}}
    {"op": "node_delete", "key": "Product:85123A", "label": "Product", "id": "85123A", "ts": ...}
    {"op": "edge_upsert", "src": "User:17850", "rel": "PURCHASED", "dst": "Product:85123A", "ts": ...}
    {"op": "edge_delete", "src": ..., "rel": ..., "dst": ..., "ts": ...}

A product's ``props.out_edges`` is the complete set of its structural outgoing edges after
the change: the consumer replaces the old set (so edges a product lost need no record of
their own). A ``node_delete`` removes the node and every edge incident to it.
Brand, Category, Attribute and User nodes come into being with the first edge that names them.

``ts`` is the event time (epoch ms) of the newest source event that produced the change; the
worker carries it to the vectors it publishes so freshness can be measured end to end.
``committed_ms`` (wall clock, epoch ms) is when the graph transaction committed, and
``source_ms`` the Kafka timestamp of the oldest input message of that batch (when the event
entered the pipeline): freshness is measured from it, which stays meaningful when historical
data is replayed.
A node key is ``"<Label>:<id>"``; labels never contain ':' so the key splits on the first ':'.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Literal

ChangeOp = Literal["node_upsert", "node_delete", "edge_upsert", "edge_delete"]


def node_key(label: str, node_id: str) -> str:
    return f"{label}:{node_id}"


def split_key(key: str) -> tuple[str, str]:
    label, _, node_id = key.partition(":")
    return label, node_id


@dataclass(frozen=True)
class Change:
    op: ChangeOp
    ts: int
    key: str | None = None  # node changes
    label: str | None = None
    id: str | None = None
    props: dict[str, Any] | None = None
    src: str | None = None  # edge changes
    rel: str | None = None
    dst: str | None = None
    committed_ms: int | None = field(default=None, compare=False)
    source_ms: int | None = field(default=None, compare=False)

    @property
    def partition_key(self) -> str:
        return self.key if self.key is not None else self.src  # type: ignore[return-value]

    def to_json(self) -> bytes:
        doc = {k: v for k, v in self.__dict__.items() if v is not None}
        return json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode()

    @staticmethod
    def from_json(raw: bytes) -> Change:
        return Change(**json.loads(raw))


def node_upsert(label: str, node_id: str, ts: int, props: dict[str, Any] | None = None) -> Change:
    return Change("node_upsert", ts, key=node_key(label, node_id), label=label, id=node_id, props=props or {})


def node_delete(label: str, node_id: str, ts: int) -> Change:
    return Change("node_delete", ts, key=node_key(label, node_id), label=label, id=node_id)


def edge_upsert(src: str, rel: str, dst: str, ts: int) -> Change:
    return Change("edge_upsert", ts, src=src, rel=rel, dst=dst)


def edge_delete(src: str, rel: str, dst: str, ts: int) -> Change:
    return Change("edge_delete", ts, src=src, rel=rel, dst=dst)
