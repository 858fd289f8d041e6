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

Versions (optional non-negative integers < 2**62, from the graph transaction that made the
change; ``sinks/cypher.py`` says how the graph keeps them): a node change carries ``rev`` and
``gen``, the product's revision and incarnation after the transaction; an edge change carries
``rev`` (the relationship's revision) and ``src_gen`` / ``dst_gen`` (each endpoint's
incarnation as that transaction saw it). The worker's ``streamer.embed.versions.VersionGuard``
applies a versioned change only when it is newer than what the replica holds, so any
interleaving of the changelog converges to the graph. A record without versions (older logs,
category ``PARENT`` edges, which no delete ever touches) is applied as it comes.

    {"op": "node_delete", "key": "Product:85123A", ..., "rev": 7, "gen": 2}
    {"op": "edge_upsert", "src": "User:17850", ..., "rev": 3, "src_gen": 0, "dst_gen": 2}
"""

from __future__ import annotations

import json
from collections.abc import Iterable
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
    rev: int | None = None  # versions (module docstring)
    gen: int | None = None  # node changes
    src_gen: int | None = None  # edge changes
    dst_gen: int | None = None

    @property
    def partition_key(self) -> str:
        return self.key if self.key is not None else self.src  # type: ignore[return-value]

    def to_json(self) -> bytes:
        doc = {k: v for k, v in self.__dict__.items() if v is not None}
        return json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode()

    @staticmethod
    def from_json(raw: bytes) -> Change:
        """Trusted input (our own records); the worker uses ``decode_change``."""
        return Change(**json.loads(raw))


def node_upsert(
    label: str, node_id: str, ts: int, props: dict[str, Any] | None = None, rev: int | None = None, gen: int | None = None
) -> Change:
    return Change("node_upsert", ts, key=node_key(label, node_id), label=label, id=node_id, props=props or {}, rev=rev, gen=gen)


def node_delete(label: str, node_id: str, ts: int, rev: int | None = None, gen: int | None = None) -> Change:
    return Change("node_delete", ts, key=node_key(label, node_id), label=label, id=node_id, rev=rev, gen=gen)


def edge_upsert(
    src: str, rel: str, dst: str, ts: int, rev: int | None = None, src_gen: int | None = None, dst_gen: int | None = None
) -> Change:
    return Change("edge_upsert", ts, src=src, rel=rel, dst=dst, rev=rev, src_gen=src_gen, dst_gen=dst_gen)


def edge_delete(
    src: str, rel: str, dst: str, ts: int, rev: int | None = None, src_gen: int | None = None, dst_gen: int | None = None
) -> Change:
    return Change("edge_delete", ts, src=src, rel=rel, dst=dst, rev=rev, src_gen=src_gen, dst_gen=dst_gen)


class InvalidChange(Exception):
    """A kg.changes record the embedding worker cannot use. ``error_class`` names why."""

    def __init__(self, error_class: str, message: str):
        super().__init__(message)
        self.error_class = error_class
        self.message = message


_NODE_OPS = ("node_upsert", "node_delete")
_EDGE_OPS = ("edge_upsert", "edge_delete")
_FIELDS = frozenset(Change.__dataclass_fields__)


def decode_change(raw: bytes | None, labels: Iterable[str], max_bytes: int = 1 << 20) -> Change:
    """Bytes of one kg.changes message -> ``Change``, checked so that the engine only ever sees
    well-formed records: a known op with the fields it needs, node keys ``<Label>:<id>`` with an
    allowlisted label, integer times and versions, an object of props (``out_edges`` a list of [rel, key]).
    Raises ``InvalidChange`` and nothing else, whatever the bytes."""
    allowed = set(labels)
    if raw is None or len(raw) == 0:
        raise InvalidChange("EmptyMessage", "empty kg.changes record")
    if len(raw) > max_bytes:
        raise InvalidChange("ChangeTooLarge", f"record is {len(raw)} bytes, the limit is {max_bytes}")
    try:
        doc = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise InvalidChange("NotJson", f"not JSON: {type(exc).__name__}") from None
    if not isinstance(doc, dict):
        raise InvalidChange("NotAnObject", f"a change is a JSON object, got {type(doc).__name__}")
    unknown = set(doc) - _FIELDS
    if unknown:
        raise InvalidChange("UnknownField", f"unknown fields {sorted(map(str, unknown))[:5]}")

    def check_key(name: str, value: Any) -> None:
        label, _, node_id = value.partition(":") if isinstance(value, str) else ("", "", "")
        if label not in allowed or not node_id:
            raise InvalidChange("BadKey", f"{name} must be '<Label>:<id>' with a known label, got {str(value)[:100]!r}")
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise InvalidChange("InvalidUnicode", f"{name} holds a lone surrogate") from None

    op = doc.get("op")
    if op in _NODE_OPS:
        check_key("key", doc.get("key"))
    elif op in _EDGE_OPS:
        check_key("src", doc.get("src"))
        check_key("dst", doc.get("dst"))
        if not isinstance(doc.get("rel"), str) or not doc["rel"]:
            raise InvalidChange("BadRelationship", "an edge change needs a relationship type")
    else:
        raise InvalidChange("UnknownOp", f"unknown op {str(op)[:40]!r}")
    for name in ("ts", "committed_ms", "source_ms"):
        value = doc.get(name)
        if (value is None and name == "ts") or (value is not None and (type(value) is not int or not 0 <= value < 1 << 62)):
            raise InvalidChange("BadTime", f"{name} must be epoch milliseconds, got {str(value)[:40]!r}")
    for name in ("rev", "gen", "src_gen", "dst_gen"):
        value = doc.get(name)
        if value is not None and (type(value) is not int or not 0 <= value < 1 << 62):
            raise InvalidChange("BadVersion", f"{name} must be a non-negative integer below 2**62, got {str(value)[:40]!r}")
    props = doc.get("props")
    if props is not None:
        if not isinstance(props, dict):
            raise InvalidChange("BadProps", "props must be an object")
        edges = props.get("out_edges")
        if edges is not None:
            if not isinstance(edges, list) or not all(
                isinstance(e, list) and len(e) == 2 and all(isinstance(x, str) for x in e) for e in edges
            ):
                raise InvalidChange("BadProps", "out_edges must be a list of [relationship type, node key]")
            for _rel, dst in edges:
                check_key("out_edges", dst)
    return Change(**doc)
