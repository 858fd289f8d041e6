"""The vector record on ``kg.embeddings`` (compacted; key = node key, e.g. ``Product:85123A``).

Value: one JSON object (UTF-8), so any consumer can read it without our code::

    {"key": "Product:85123A", "type": "Product", "model_version": "g1a2b3c...",
     "dim": 512, "dtype": "float32", "vector": "<base64 of dim little-endian float32>",
     "event_ts": 1291191960000, "source_ms": 1795650000000, "published_ms": 1795650000420}

``event_ts`` is the newest source event time (epoch ms) that reached this node's vector;
``source_ms`` when the oldest input of that micro-batch entered Kafka; ``published_ms`` when
the worker sent it. A deleted node gets a tombstone: the same key with a null value and a
``model_version`` header, so compaction removes it. The header ``model_version`` is on every
record so a consumer can filter without parsing the value.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from streamer.contracts.changes import split_key


@dataclass(frozen=True)
class VectorRecord:
    key: str
    vector: np.ndarray | None  # None: tombstone
    model_version: str
    event_ts: int | None = None
    source_ms: int | None = None
    published_ms: int | None = None

    def to_kafka(self) -> tuple[bytes, bytes | None, list[tuple[str, bytes]]]:
        headers = [("model_version", self.model_version.encode())]
        if self.vector is None:
            return self.key.encode(), None, headers
        vec = np.ascontiguousarray(self.vector, dtype="<f4")
        doc = {
            "key": self.key,
            "type": split_key(self.key)[0],
            "model_version": self.model_version,
            "dim": int(vec.shape[0]),
            "dtype": "float32",
            "vector": base64.b64encode(vec.tobytes()).decode("ascii"),
            "event_ts": self.event_ts,
            "source_ms": self.source_ms,
            "published_ms": self.published_ms,
        }
        return self.key.encode(), json.dumps(doc, separators=(",", ":")).encode(), headers


def decode_vector(key: bytes, value: bytes | None, headers: Iterable[tuple[str, bytes]] | None = None) -> VectorRecord:
    """Inverse of ``VectorRecord.to_kafka`` (for consumers, tests and `verify --against-topic`)."""
    header_map = dict(headers or [])
    if value is None:
        return VectorRecord(key.decode(), None, header_map.get("model_version", b"").decode())
    doc = json.loads(value)
    vec = np.frombuffer(base64.b64decode(doc["vector"]), dtype="<f4")
    if vec.shape[0] != doc["dim"]:
        raise ValueError(f"{doc['key']}: vector has {vec.shape[0]} values, dim says {doc['dim']}")
    return VectorRecord(doc["key"], vec, doc["model_version"], doc.get("event_ts"), doc.get("source_ms"), doc.get("published_ms"))
