"""Validation at the edge: what becomes an event and what is dead-lettered, and why."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from streamer.contracts.events import (
    InteractionEvent,
    InvalidEvent,
    ProductEvent,
    RelationEvent,
    decode_event,
    json_schema,
)

SCHEMA_FILE = Path(__file__).resolve().parents[3] / "streamer" / "contracts" / "events.schema.json"


def test_committed_json_schema_is_current():
    assert json.loads(SCHEMA_FILE.read_text()) == json_schema(), (
        "run: kg-streamer schema --out streamer/contracts/events.schema.json"
    )


def test_three_kinds_decode():
    p = decode_event(b'{"type":"product","id":"A","title":"t","categories":["x","y"],"ts":"2011-01-01T10:00:00Z"}')
    i = decode_event(b'{"type":"interaction","user_id":"u","product_id":"A","action":"rate","rating":4,"ts":1300000000}')
    r = decode_event(
        b'{"type":"relation","src":{"label":"Product","id":"A"},"rel":"also_viewed","dst":{"label":"Product","id":"B"},"ts":1}'
    )
    assert isinstance(p, ProductEvent) and p.ts_ms == 1293876000000 and p.op == "upsert"
    assert isinstance(i, InteractionEvent) and i.rel_type == "RATED" and i.ts_ms == 1_300_000_000_000
    assert isinstance(r, RelationEvent) and r.rel == "ALSO_VIEWED"


def test_unix_milliseconds_are_recognised():
    e = decode_event(b'{"type":"product","id":"A","ts":1300000000123}')
    assert e.ts_ms == 1_300_000_000_123


def test_unknown_fields_are_ignored_for_forward_compatibility():
    e = decode_event(b'{"type":"product","id":"A","ts":1,"colour_v2":"new"}')
    assert e.id == "A"


@pytest.mark.parametrize(
    "raw, error_class",
    [
        (None, "EmptyMessage"),
        (b"", "EmptyMessage"),
        (b"\xff\xfe", "NotJson"),
        (b"{", "NotJson"),
        (b'"a string"', "NotAnObject"),
        (b'{"id":"A"}', "UnknownEventType"),
        (b'{"type":"order","id":"A"}', "UnknownEventType"),
        (b'{"type":"product","ts":1}', "ValidationError"),  # missing id
        (b'{"type":"product","id":"","ts":1}', "ValidationError"),  # empty id
        (b'{"type":"product","id":"A"}', "ValidationError"),  # missing ts
        (b'{"type":"product","id":"A","ts":1,"price":-1}', "ValidationError"),
        (b'{"type":"product","id":"A","ts":1,"categories":"x"}', "ValidationError"),
        (b'{"type":"product","id":"A","ts":1,"op":"truncate"}', "ValidationError"),
        (b'{"type":"interaction","user_id":"u","product_id":"p","action":"rate","ts":1}', "ValidationError"),  # no rating
        (b'{"type":"interaction","user_id":"u","product_id":"p","action":"steal","ts":1}', "ValidationError"),
        (
            b'{"type":"relation","src":{"label":"Admin","id":"a"},"rel":"ALSO_BOUGHT","dst":{"label":"Product","id":"b"},"ts":1}',
            "ValidationError",
        ),
        (
            b'{"type":"relation","src":{"label":"Product","id":"a"},"rel":"OWNS","dst":{"label":"Product","id":"b"},"ts":1}',
            "ValidationError",
        ),
        (
            b'{"type":"relation","src":{"label":"Product","id":"a"},"rel":"ALSO_BOUGHT",'
            b'"dst":{"label":"Product","id":"b"},"props":{"bad key":1},"ts":1}',
            "ValidationError",
        ),
    ],
)
def test_invalid_input_names_its_error_class(raw, error_class):
    with pytest.raises(InvalidEvent) as info:
        decode_event(raw)
    assert info.value.error_class == error_class
    assert info.value.message


def test_oversized_message_is_refused_before_parsing():
    with pytest.raises(InvalidEvent) as info:
        decode_event(b'{"type":"product","id":"A","ts":1,"title":"' + b"x" * 2000 + b'"}', max_bytes=1000)
    assert info.value.error_class == "EventTooLarge"
