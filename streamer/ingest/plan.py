"""Map a batch of validated events to coalesced graph-write rows.

``plan_batch(events)`` turns the events of one consumer batch into a ``GraphBatch``: the rows
that ``sinks.graph_db.GraphSink.write`` sends as ``UNWIND $rows`` parameters, one statement
per kind, with at most one row per entity so that no statement touches the same node or
relationship twice.

Coalescing rules (an older or repeated event never overwrites newer state):

* products: per product id keep the newest event, ordered by (version, ts); ties keep the
  later offset. An upsert replaces the product's text, price, brand, category path and
  attributes; a delete leaves a tombstone node (``deleted = true``) that still guards against
  stale upserts.
* interactions: per (user, product, action) the sorted distinct event times and the newest
  rating. The relationship counts each distinct event time newer than the last one it saw
  (``count``, ``first_ts``, ``last_ts``), so replays and duplicates change nothing.
* relations: per (src, rel, dst) keep the newest event (upsert or delete by ts).

Graph model built from a product event (docs/design.md, README "Events and the graph"):
  (:Product)-[:HAS_BRAND]->(:Brand {id: brand})
  (:Product)-[:IN_CATEGORY]->(:Category {id: "A > B > C"})   the leaf of the category path
  (:Category {id: "A > B > C"})-[:PARENT]->(:Category {id: "A > B"})   one node per path prefix
  (:Product)-[:HAS_ATTRIBUTE]->(:Attribute {id: "key=value"})   string and boolean attributes
Numeric attributes and the whole attribute map (as JSON text) stay on the product node.
"""

from __future__ import annotations

import json
from typing import Any

from streamer.contracts.events import InteractionEvent, ProductEvent, RelationEvent
from streamer.contracts.graph_batch import GraphBatch

CATEGORY_SEPARATOR = " > "


def category_ids(path: list[str]) -> list[str]:
    """["Books", "Fiction"] -> ["Books", "Books > Fiction"] (one node per path prefix)."""
    return [CATEGORY_SEPARATOR.join(path[: i + 1]) for i in range(len(path))]


def attribute_ids(attributes: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(id, key, value) for the attributes that become Attribute nodes: strings and booleans."""
    out = []
    for key in sorted(attributes):
        value = attributes[key]
        if isinstance(value, bool):
            value = "true" if value else "false"
        elif not isinstance(value, str):
            continue
        out.append((f"{key}={value}", key, value))
    return out


def owned_edges(event: ProductEvent) -> list[list[str]]:
    """The product's outgoing structural edges after an upsert, as [rel, dst node key]."""
    edges: list[list[str]] = []
    if event.brand is not None:
        edges.append(["HAS_BRAND", f"Brand:{event.brand}"])
    if event.categories:
        edges.append(["IN_CATEGORY", f"Category:{category_ids(event.categories)[-1]}"])
    edges.extend(["HAS_ATTRIBUTE", f"Attribute:{attr_id}"] for attr_id, _, _ in attribute_ids(event.attributes))
    return edges


def product_props(event: ProductEvent) -> dict[str, Any]:
    """What a product node stores (and what kg.changes carries to the embedding worker)."""
    return {
        "title": event.title,
        "description": event.description,
        "brand": event.brand,
        "categories": list(event.categories),
        "attributes": dict(event.attributes),
        "price": event.price,
    }


def _product_order(event: ProductEvent) -> tuple[int, int]:
    return (event.version or 0, event.ts_ms)


def plan_batch(events: list) -> GraphBatch:
    """Coalesce events (in offset order) into the rows of one graph transaction."""
    batch = GraphBatch(events=len(events))
    products: dict[str, ProductEvent] = {}
    interactions: dict[tuple[str, str, str], list[InteractionEvent]] = {}
    relations: dict[tuple[str, str, str, str, str], RelationEvent] = {}

    for event in events:
        if isinstance(event, ProductEvent):
            current = products.get(event.id)
            if current is None or _product_order(event) >= _product_order(current):
                products[event.id] = event
        elif isinstance(event, InteractionEvent):
            interactions.setdefault((event.user_id, event.product_id, event.rel_type), []).append(event)
        elif isinstance(event, RelationEvent):
            key: tuple[str, str, str, str, str] = (event.src.label, event.src.id, event.rel, event.dst.label, event.dst.id)
            current_rel = relations.get(key)
            if current_rel is None or event.ts_ms >= current_rel.ts_ms:
                relations[key] = event
        else:  # pragma: no cover - decode_event only returns the three kinds
            raise TypeError(f"not an event: {type(event).__name__}")

    for product_id in sorted(products):
        event = products[product_id]
        row = {"id": product_id, "ts": event.ts_ms, "version": event.version or 0}
        if event.op == "delete":
            batch.product_deletes.append(row)
            continue
        attrs = attribute_ids(event.attributes)
        cats = category_ids(event.categories)
        row.update(
            title=event.title,
            description=event.description,
            brand=event.brand,
            categories=list(event.categories),
            attributes=json.dumps(event.attributes, sort_keys=True, ensure_ascii=False),
            price=event.price,
            owned=[f"{rel}|{dst.partition(':')[2]}" for rel, dst in owned_edges(event)],
            # structure rows, flattened for their own UNWIND statements
            brand_ids=[event.brand] if event.brand is not None else [],
            categories_path=[{"id": cid, "name": name} for cid, name in zip(cats, event.categories)],
            leaf_category=cats[-1:] if cats else [],
            attribute_nodes=[{"id": a, "key": k, "value": v} for a, k, v in attrs],
        )
        batch.product_upserts.append(row)

    for (user_id, product_id, rel), group in sorted(interactions.items()):
        times = sorted({e.ts_ms for e in group})
        rated = [e for e in group if e.rating is not None]
        newest_rating = max(rated, key=lambda e: e.ts_ms) if rated else None
        batch.interactions.setdefault(rel, []).append(
            {
                "user_id": user_id,
                "product_id": product_id,
                "tss": times,
                "rating": newest_rating.rating if newest_rating else None,
                "rating_ts": newest_rating.ts_ms if newest_rating else None,
            }
        )

    # Relationship rows sorted by min(src, dst): a stable lock order across transactions.
    for key in sorted(relations, key=lambda k: (min(k[1], k[4]), k)):
        event = relations[key]
        src_label, src_id, rel, dst_label, dst_id = key
        batch.relations.setdefault((src_label, rel, dst_label), []).append(
            {"src": src_id, "dst": dst_id, "ts": event.ts_ms, "op": event.op, "props": dict(event.props)}
        )
    return batch
