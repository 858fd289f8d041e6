"""Fuzzing every input path of the contracts: whatever the bytes, a message becomes a typed
event (or change) or a clear ``InvalidEvent`` (``InvalidChange``), never another exception; a
valid event always plans into graph rows the database can store; a dead letter always fits.

The hand-written cases are the families a producer can send by accident or on purpose (deep
nesting under 16 KB, NaN/Infinity/1e400, integers past int64, lone surrogates, duplicate keys,
other encodings, huge strings); hypothesis adds arbitrary bytes, arbitrary JSON trees and
arbitrary values in every field of the three event kinds.
"""

from __future__ import annotations

import json
import math

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from streamer.contracts.changes import Change, InvalidChange, decode_change
from streamer.contracts.dead_letters import MAX_HEADER_BYTES, MAX_KEY_BYTES, DeadLetter
from streamer.contracts.events import INT64_MAX, INT64_MIN, NODE_LABELS, InvalidEvent, decode_event
from streamer.ingest.plan import plan_batch
from tests.helpers import NASTY_EVENT_CASES

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def decode_or_invalid(raw: bytes | None):
    """The contract: an event or InvalidEvent; anything else propagates and fails the test."""
    try:
        return decode_event(raw)
    except InvalidEvent as exc:
        assert exc.error_class and exc.message
        return None


def assert_storable(value, depth: int = 0) -> None:
    """What Bolt and a graph property can hold: finite floats, int64, valid Unicode, JSON-able."""
    assert depth < 20
    if isinstance(value, dict):
        for k, v in value.items():
            assert_storable(k, depth + 1)
            assert_storable(v, depth + 1)
    elif isinstance(value, list | tuple):
        for v in value:
            assert_storable(v, depth + 1)
    elif isinstance(value, float):
        assert math.isfinite(value)
    elif isinstance(value, int) and not isinstance(value, bool):
        assert INT64_MIN <= value <= INT64_MAX
    elif isinstance(value, str):
        value.encode("utf-8")


def plan_and_check(event) -> None:
    batch = plan_batch([event])
    rows = [
        *batch.product_upserts,
        *batch.product_deletes,
        *(r for v in batch.interactions.values() for r in v),
        *(r for v in batch.relations.values() for r in v),
    ]
    assert rows
    for row in rows:
        assert_storable(row)
        json.dumps(row, allow_nan=False)


def test_the_families_of_nasty_messages_are_each_a_clear_error_or_a_storable_event():
    for name, raw, valid in NASTY_EVENT_CASES:
        event = decode_or_invalid(raw)
        assert (event is not None) == valid, name
        if event is not None:
            plan_and_check(event)


@FUZZ
@given(st.binary(max_size=2048))
def test_arbitrary_bytes(raw):
    event = decode_or_invalid(raw)
    if event is not None:
        plan_and_check(event)


json_leaf = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=40),
    st.text(alphabet=st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF), max_size=3),
)
json_tree = st.recursive(
    json_leaf, lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=8), kids, max_size=4), max_leaves=30
)


@FUZZ
@given(json_tree)
def test_arbitrary_json_trees(doc):
    raw = json.dumps(doc, allow_nan=True).encode("utf-8", "surrogatepass")
    event = decode_or_invalid(raw)
    if event is not None:
        plan_and_check(event)


@FUZZ
@given(depth=st.integers(1, 3000), kind=st.sampled_from("[{"), wrap=st.booleans())
def test_deep_nesting_of_any_depth(depth, kind, wrap):
    inner = ("[" * depth + "]" * depth) if kind == "[" else ('{"a":' * depth + "1" + "}" * depth)
    raw = (f'{{"type":"product","id":"x","ts":1,"attributes":{{"k":{inner}}}}}' if wrap else inner).encode()
    assert decode_or_invalid(raw) is None


ids = st.text(min_size=1, max_size=300) | st.sampled_from(["a", "85123A", "p:1", "\x00", "é", "😀"])
numbers = st.one_of(
    st.integers(), st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([1e400, -1e400, 2**63, -(2**63) - 1])
)
anything = st.one_of(
    json_leaf, numbers, st.lists(json_leaf, max_size=3), st.dictionaries(st.text(max_size=5), json_leaf, max_size=3)
)
good_times = st.integers(0, 4 * 10**12) | st.sampled_from(
    ["2010-12-01T08:26:00Z", "2010-12-01 08:26", "2011-06-30T23:59:59+02:00"]
)
times = st.one_of(good_times, good_times, good_times, numbers, st.sampled_from(["not a time", "99999-01-01T00:00:00Z"]), anything)
labels = st.sampled_from([*NODE_LABELS, "Person", "", "Product {id: 1}) DETACH DELETE n //"])


good_ids = st.text(min_size=1, max_size=60) | st.sampled_from(["85123A", "p:1", "\x00", "é", "😀"])
good_text = st.text(max_size=60)


@st.composite
def event_shaped(draw):
    """An event of one kind with every field drawn from its legal values, except (most of the
    time) one field drawn from anything at all, so that about half the documents are valid."""
    kind = draw(st.sampled_from(["product", "interaction", "relation"]))
    if kind == "product":
        fields = {
            "op": st.sampled_from(["upsert", "delete"]),
            "id": good_ids,
            "title": good_text,
            "description": good_text,
            "brand": good_ids,
            "categories": st.lists(good_ids, max_size=4),
            "attributes": st.dictionaries(
                st.text(min_size=1, max_size=10), st.text(max_size=10) | st.integers(-100, 100) | st.booleans(), max_size=4
            ),
            "price": st.floats(0, 1e6),
            "version": st.integers(0, 2**40),
        }
    elif kind == "interaction":
        fields = {
            "user_id": good_ids,
            "product_id": good_ids,
            "action": st.sampled_from(["view", "click", "cart", "purchase"]),
            "quantity": st.integers(1, 1000),
        }
    else:
        node = st.fixed_dictionaries({"label": st.sampled_from(NODE_LABELS), "id": good_ids})
        fields = {
            "op": st.sampled_from(["upsert", "delete"]),
            "src": node,
            "rel": st.sampled_from(["also_bought", "ALSO_VIEWED", "similar_to"]),
            "dst": node,
            "props": st.dictionaries(st.from_regex(r"\A[a-z_]{1,8}\Z"), st.integers(-9, 9) | st.text(max_size=5), max_size=3),
        }
    fields["ts"] = good_times
    nasty = draw(st.sampled_from([None, *fields]))
    doc = {"type": kind}
    for name, strategy in fields.items():
        if name == nasty:
            doc[name] = draw(st.one_of(anything, numbers, ids, times, labels))
        elif name in ("op", "id", "user_id", "product_id", "action", "src", "rel", "dst", "ts") or draw(st.booleans()):
            doc[name] = draw(strategy)
    return doc


@FUZZ
@given(event_shaped())
def test_arbitrary_values_in_every_field(doc):
    raw = json.dumps(doc, allow_nan=True).encode("utf-8", "surrogatepass")
    event = decode_or_invalid(raw)
    if event is not None:
        plan_and_check(event)


@FUZZ
@given(st.one_of(st.binary(max_size=512), json_tree.map(lambda d: json.dumps(d).encode("utf-8", "surrogatepass"))))
def test_changes_decode_or_are_invalid(raw):
    try:
        change = decode_change(raw, NODE_LABELS)
    except InvalidChange as exc:
        assert exc.error_class
        return
    assert isinstance(change, Change)


@FUZZ
@given(
    st.dictionaries(
        st.sampled_from(
            ["op", "key", "src", "rel", "dst", "ts", "props", "label", "id", "committed_ms", "source_ms", "x"]
            + ["rev", "gen", "src_gen", "dst_gen"]
        ),
        anything | ids | st.sampled_from(["node_upsert", "edge_upsert", "node_delete", "edge_delete", "Product:1", "User:u"]),
        max_size=8,
    )
)
def test_change_shaped_records_decode_to_well_formed_changes_or_are_invalid(doc):
    raw = json.dumps(doc, allow_nan=True).encode("utf-8", "surrogatepass")
    try:
        change = decode_change(raw, NODE_LABELS)
    except InvalidChange:
        return
    keys = [change.key] if change.op.startswith("node") else [change.src, change.dst]
    assert all(isinstance(k, str) and k.split(":", 1)[0] in NODE_LABELS for k in keys)
    assert isinstance(change.ts, int) and change.ts >= 0
    for version in (change.rev, change.gen, change.src_gen, change.dst_gen):
        assert version is None or (type(version) is int and 0 <= version < 1 << 62)


@FUZZ
@given(
    key=st.none() | st.binary(max_size=20_000),
    value=st.none() | st.binary(max_size=3_000_000),
    headers=st.lists(st.tuples(st.text(max_size=30), st.binary(max_size=10_000)), max_size=8),
    message=st.text(max_size=5000),
)
def test_a_dead_letter_always_fits(key, value, headers, message):
    dead = DeadLetter("kg.products", 0, 7, key, value, tuple(headers), "NotJson", message, "decode")
    k, v, h = dead.to_kafka(max_value_bytes=900_000)
    assert k is not None or v is not None, "a producer refuses a record with neither"
    assert k is None or len(k) <= MAX_KEY_BYTES
    assert v is None or len(v) <= 900_000
    assert sum(len(n) + len(x) for n, x in h) <= MAX_HEADER_BYTES + 4 * 1024
    named = dict(h)
    assert named["__connect.errors.offset"] == b"7"
    if value is not None and len(value) > 900_000:
        assert int(named["kgs.original.size"]) == len(value) and len(named["kgs.original.sha256"]) == 64
