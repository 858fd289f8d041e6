"""``streamer.contracts.vectors``: every encoding decodes to what was encoded, the binary layout
is the documented one, and ``encode_vectors`` (one numpy pass) writes the same bytes as
``VectorRecord.to_kafka`` one vector at a time."""

from __future__ import annotations

import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streamer.contracts.vectors import VectorRecord, decode_vector, encode_vectors, timing


@pytest.mark.parametrize("encoding,tol", [("json", 0.0), ("f32", 0.0), ("f16", 1e-3)])
def test_each_encoding_decodes_to_what_was_encoded(encoding, tol):
    vec = np.random.default_rng(1).standard_normal(512).astype(np.float32) / 20
    record = VectorRecord("Product:85123A", vec, "g1a2b3c4d5e6", 1291191960000, 1795650000000, None)
    key, value, headers = record.to_kafka(encoding)
    back = decode_vector(key, value, headers)
    assert (back.key, back.model_version, back.event_ts, back.source_ms, back.published_ms) == (
        "Product:85123A",
        "g1a2b3c4d5e6",
        1291191960000,
        1795650000000,
        None,
    )
    assert np.max(np.abs(back.vector - vec)) <= tol
    assert timing(value) == (1795650000000, None)
    tombstone = VectorRecord("Product:85123A", None, "g1").to_kafka(encoding)
    assert tombstone[1] is None and decode_vector(*tombstone).vector is None


def test_binary_layout_is_the_documented_one():
    vec = np.arange(512, dtype=np.float32)
    _, value, headers = VectorRecord("User:7", vec, "g1a2b3c4d5e6", None, 5, 6).to_kafka("f32")
    assert len(value) == 2093  # as the module docstring says
    assert struct.unpack_from("<4sBBHqqqB", value) == (b"KGV1", 1, 0, 512, -1, 5, 6, 12)
    assert value[33:45] == b"g1a2b3c4d5e6"
    assert np.array_equal(np.frombuffer(value, "<f4", offset=45), vec)
    assert dict(headers)["content-type"] == b"application/x-kgs-vector"


@settings(max_examples=120, deadline=None)
@given(
    n=st.integers(0, 40),
    dim=st.integers(1, 70),
    version=st.text(alphabet="0123456789abcdefg", max_size=20),
    encoding=st.sampled_from(["f32", "f16", "json"]),
    source_ms=st.one_of(st.none(), st.integers(0, 2**62)),
    published_ms=st.one_of(st.none(), st.integers(0, 2**62)),
    dtype=st.sampled_from([np.float32, np.float64]),
    seed=st.integers(0, 1000),
)
def test_encode_vectors_writes_the_bytes_of_to_kafka(n, dim, version, encoding, source_ms, published_ms, dtype, seed):
    rng = np.random.default_rng(seed)
    vectors = rng.standard_normal((n, dim)).astype(dtype)
    keys = [f"Product:{rng.integers(1 << 40)}" for _ in range(n)]
    event_ts = [None if rng.random() < 0.3 else int(rng.integers(1 << 50)) for _ in range(n)]
    many = encode_vectors(keys, vectors, version, event_ts, source_ms, published_ms, encoding)
    one_by_one = [
        VectorRecord(k, v, version, t, source_ms, published_ms).to_kafka(encoding)
        for k, v, t in zip(keys, vectors, event_ts, strict=True)
    ]
    assert many == one_by_one


def test_encode_vectors_refuses_mismatched_lengths():
    with pytest.raises(ValueError, match="2 keys, 3 vectors"):
        encode_vectors(["a", "b"], np.zeros((3, 4), np.float32), "g", [1, 2], None, None, "f32")
