"""Input events: the contract with producers, validated at the edge.

Three kinds of JSON event arrive, one per Kafka message:

* ``product``     -- upsert or delete of a product with its text, brand, category path, attributes
* ``interaction`` -- a user viewed / clicked / carted / purchased / rated a product
* ``relation``    -- any other knowledge-graph edge between allowlisted labels (also_bought, ...)

``decode_event(raw_bytes)`` returns a typed event or raises ``InvalidEvent`` with an error class
and a message; the ingest consumer routes those to the dead-letter topic. Nothing in an event
ever becomes a label, relationship type or property *name* in Cypher except through the
allowlists below.

``ts`` is an RFC 3339 timestamp (naive means UTC) or a Unix timestamp number (seconds, or
milliseconds when larger than 2e10: pydantic's rule). It is normalised to epoch milliseconds.
Fields the schema does not know are ignored, so producers can add fields before consumers
upgrade. The JSON Schema is written to ``streamer/contracts/events.schema.json`` by
``kg-streamer schema``.
"""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime
from enum import Enum
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, field_validator, model_validator

# --- allowlists: the only labels and relationship types that can reach Cypher -------------
NODE_LABELS = ("Product", "User", "Brand", "Category", "Attribute")
# Relationship types a `relation` event may write (structural edges are owned by product events).
RELATION_TYPES = (
    "ALSO_BOUGHT",
    "ALSO_VIEWED",
    "BOUGHT_TOGETHER",
    "SIMILAR_TO",
    "SUBSTITUTE_OF",
    "COMPLEMENT_OF",
    "VARIANT_OF",
)
# Relationship types owned by product events.
PRODUCT_EDGE_TYPES = ("HAS_BRAND", "IN_CATEGORY", "HAS_ATTRIBUTE", "PARENT")
# One relationship type per interaction action: User-[:TYPE]->Product.
ACTION_TYPES = {
    "view": "VIEWED",
    "click": "CLICKED",
    "cart": "CARTED",
    "purchase": "PURCHASED",
    "rate": "RATED",
}
ALL_REL_TYPES = RELATION_TYPES + PRODUCT_EDGE_TYPES + tuple(ACTION_TYPES.values())

NodeLabel = Literal["Product", "User", "Brand", "Category", "Attribute"]
Id = Annotated[str, Field(min_length=1, max_length=256)]
Text = Annotated[str, Field(max_length=20_000)]
Scalar = bool | int | float | str


class Action(str, Enum):
    view = "view"
    click = "click"
    cart = "cart"
    purchase = "purchase"
    rate = "rate"


class _Event(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True, str_strip_whitespace=False)

    ts: datetime = Field(description="event time: RFC 3339 string or Unix timestamp")

    @field_validator("ts")
    @classmethod
    def _utc(cls, value: datetime) -> datetime:
        if value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        return value

    @property
    def ts_ms(self) -> int:
        return int(round(self.ts.timestamp() * 1000))


class ProductEvent(_Event):
    type: Literal["product"]
    op: Literal["upsert", "delete"] = "upsert"
    id: Id
    title: Text | None = None
    description: Text | None = None
    brand: Annotated[str, Field(min_length=1, max_length=256)] | None = None
    categories: Annotated[list[Annotated[str, Field(min_length=1, max_length=256)]], Field(max_length=16)] = []
    attributes: Annotated[dict[Annotated[str, Field(min_length=1, max_length=128)], Scalar], Field(max_length=64)] = {}
    price: float | None = Field(None, ge=0)
    version: int | None = Field(None, ge=0, description="producer's version; compared before ts")

    @field_validator("price")
    @classmethod
    def _finite(cls, value: float | None) -> float | None:
        if value is not None and not math.isfinite(value):
            raise ValueError("price must be finite")
        return value


class NodeRef(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    label: NodeLabel
    id: Id


class RelationEvent(_Event):
    type: Literal["relation"]
    op: Literal["upsert", "delete"] = "upsert"
    src: NodeRef
    rel: str = Field(description="one of RELATION_TYPES, case-insensitive (also_bought = ALSO_BOUGHT)")
    dst: NodeRef
    props: Annotated[dict[Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")], Scalar], Field(max_length=32)] = {}

    @field_validator("rel")
    @classmethod
    def _allowlisted(cls, value: str) -> str:
        rel = value.upper()
        if rel not in RELATION_TYPES:
            raise ValueError(f"relationship type {value!r} is not in the allowlist {list(RELATION_TYPES)}")
        return rel


class InteractionEvent(_Event):
    type: Literal["interaction"]
    user_id: Id
    product_id: Id
    action: Action
    rating: float | None = Field(None, ge=0, le=10)
    quantity: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _rating_with_rate(self) -> InteractionEvent:
        if self.action is Action.rate and self.rating is None:
            raise ValueError("action 'rate' needs a rating")
        return self

    @property
    def rel_type(self) -> str:
        return ACTION_TYPES[self.action.value]


Event = Annotated[ProductEvent | InteractionEvent | RelationEvent, Field(discriminator="type")]
_EVENT = TypeAdapter(Event)


class InvalidEvent(Exception):
    """An input message that cannot become a graph mutation. ``error_class`` names why."""

    def __init__(self, error_class: str, message: str):
        super().__init__(message)
        self.error_class = error_class
        self.message = message


MAX_DEPTH = 16  # an event nests 3 levels (relation -> src -> id); anything deeper is not an event
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1  # what a graph property (and Bolt) can hold


def decode_event(raw: bytes | None, max_bytes: int = 256 * 1024) -> Event:
    """Bytes of one Kafka message -> ProductEvent | InteractionEvent | RelationEvent.

    Raises InvalidEvent("EmptyMessage" | "EventTooLarge" | "NotJson" | "TooDeep" |
    "NonFiniteNumber" | "NumberOutOfRange" | "InvalidUnicode" | "NotAnObject" |
    "UnknownEventType" | "ValidationError", message). Nothing else: whatever the bytes, a
    message either becomes an event or an ``InvalidEvent`` (tests/streamer/contracts fuzz it).
    """
    if raw is None or len(raw) == 0:
        raise InvalidEvent("EmptyMessage", "message value is empty (tombstones are not events)")
    if len(raw) > max_bytes:
        raise InvalidEvent("EventTooLarge", f"message is {len(raw)} bytes, the limit is {max_bytes}")
    try:
        doc = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidEvent("NotJson", f"not JSON: {exc}") from None
    except RecursionError:  # the parser's own recursion limit (~1,000 levels of [ or {)
        raise InvalidEvent("TooDeep", f"JSON nested deeper than the parser's limit; an event nests at most {MAX_DEPTH}") from None
    return validate_event(doc)


def check_values(doc: Any) -> None:
    """Every value of a decoded document is one the graph can store, or InvalidEvent: nesting
    at most ``MAX_DEPTH``, finite numbers (JSON has no NaN or Infinity, Python's parser takes
    them, and 1e400 overflows to inf), integers within int64, strings that are valid Unicode
    (a lone surrogate escape such as \\ud800 is not). Iterative: depth costs no recursion."""
    stack: list[tuple[Any, int]] = [(doc, 0)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, dict | list):
            if depth >= MAX_DEPTH:
                raise InvalidEvent("TooDeep", f"JSON nested more than {MAX_DEPTH} levels; an event nests at most 3")
            items = value.items() if isinstance(value, dict) else enumerate(value)
            for key, item in items:
                if isinstance(key, str):
                    _check_text(key)
                stack.append((item, depth + 1))
        elif isinstance(value, str):
            _check_text(value)
        elif isinstance(value, float):
            if not math.isfinite(value):
                raise InvalidEvent("NonFiniteNumber", f"{value!r} is not a number JSON or a graph property can hold")
        elif isinstance(value, int) and not isinstance(value, bool) and not INT64_MIN <= value <= INT64_MAX:
            raise InvalidEvent("NumberOutOfRange", f"integer with {len(str(value))} digits is outside int64")


def _check_text(value: str) -> None:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidEvent("InvalidUnicode", f"string holds a lone surrogate ({exc.reason} at {exc.start})") from None


def validate_event(doc: Any) -> Event:
    """A decoded JSON document -> typed event, or InvalidEvent (``check_values``, then the schema)."""
    check_values(doc)
    if not isinstance(doc, dict):
        raise InvalidEvent("NotAnObject", f"an event is a JSON object, got {type(doc).__name__}")
    kind = doc.get("type")
    if kind not in ("product", "interaction", "relation"):
        raise InvalidEvent("UnknownEventType", f"unknown event type {kind!r}; expected product, interaction or relation")
    try:
        return _EVENT.validate_python(doc)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in err['loc'][1:]) or '<event>'}: {err['msg']}" for err in exc.errors()[:5])
        raise InvalidEvent("ValidationError", problems) from None


def json_schema() -> dict[str, Any]:
    """The JSON Schema of one input event (a oneOf over the three kinds)."""
    schema = _EVENT.json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "kg-streamer input event"
    return schema
