"""Coalescing a batch of events into the rows of one graph transaction."""

from __future__ import annotations

import json

from streamer.contracts.events import validate_event
from streamer.ingest.plan import category_ids, owned_edges, plan_batch


def ev(**doc):
    return validate_event(doc)


def test_category_path_becomes_one_node_per_prefix():
    assert category_ids(["Home", "Kitchen", "Mugs"]) == ["Home", "Home > Kitchen", "Home > Kitchen > Mugs"]


def test_newest_product_event_wins_within_a_batch():
    batch = plan_batch(
        [
            ev(type="product", id="A", title="new", ts=20),
            ev(type="product", id="A", title="old", ts=10),
            ev(type="product", id="B", title="v1", version=1, ts=5),
            ev(type="product", id="B", title="v0", version=0, ts=50),
        ]
    )
    titles = {r["id"]: r["title"] for r in batch.product_upserts}
    assert titles == {"A": "new", "B": "v1"}


def test_delete_after_upsert_in_one_batch_is_a_delete():
    batch = plan_batch([ev(type="product", id="A", ts=1), ev(type="product", op="delete", id="A", ts=2)])
    assert [r["id"] for r in batch.product_deletes] == ["A"] and batch.product_upserts == []


def test_interactions_coalesce_to_distinct_times_and_newest_rating():
    batch = plan_batch(
        [
            ev(type="interaction", user_id="u", product_id="p", action="rate", rating=2, ts=3),
            ev(type="interaction", user_id="u", product_id="p", action="rate", rating=5, ts=1),
            ev(type="interaction", user_id="u", product_id="p", action="rate", rating=2, ts=3),
        ]
    )
    assert batch.interactions["RATED"] == [
        {"user_id": "u", "product_id": "p", "tss": [1000, 3000], "rating": 2, "rating_ts": 3000}
    ]


def test_product_rows_carry_structure_and_attributes_as_json():
    event = ev(
        type="product", id="A", brand="Acme", categories=["H", "K"], attributes={"colour": "red", "w": 2, "eco": True}, ts=1
    )
    row = plan_batch([event]).product_upserts[0]
    assert json.loads(row["attributes"]) == {"colour": "red", "w": 2, "eco": True}
    assert row["owned"] == ["HAS_BRAND|Acme", "IN_CATEGORY|H > K", "HAS_ATTRIBUTE|colour=red", "HAS_ATTRIBUTE|eco=true"]
    assert owned_edges(event)[0] == ["HAS_BRAND", "Brand:Acme"]
    assert row["leaf_category"] == ["H > K"]


def test_relation_rows_sorted_by_min_endpoint_for_a_stable_lock_order():
    batch = plan_batch(
        [
            ev(
                type="relation", src={"label": "Product", "id": "z"}, rel="ALSO_BOUGHT", dst={"label": "Product", "id": "b"}, ts=1
            ),
            ev(
                type="relation", src={"label": "Product", "id": "a"}, rel="ALSO_BOUGHT", dst={"label": "Product", "id": "y"}, ts=1
            ),
        ]
    )
    rows = batch.relations[("Product", "ALSO_BOUGHT", "Product")]
    assert [(r["src"], r["dst"]) for r in rows] == [("a", "y"), ("z", "b")]
