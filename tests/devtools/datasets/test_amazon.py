"""Amazon 2018 (Magazine) loader: every event validates, time order holds, odd records are handled."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from devtools.datasets import LoadReport, amazon, iso_utc
from tests.helpers import check_valid_and_ordered, full_dataset

ROOT = Path(__file__).resolve().parents[3]
SAMPLE = ROOT / "data" / "sample" / "amazon_magazine"

P1 = {
    "asin": "P000000001",
    "title": '<span class="a-size-medium a-color-secondary"',
    "description": ["Designed for the <i>rabid</i> PC hobbyist &amp; friends.<br /><br />Page View.", "", ""],
    "brand": "Future &amp; Co ",
    "category": ["Magazine Subscriptions", "Arts, Music &amp; Photography", "", "Music"],
    "price": "$12.99",
    "also_buy": ["P000000002", "XEXTERNAL1", "P000000001", "P000000002"],
    "also_view": ["P000000003"],
    "details": {"Format:": "Print Magazine", "Publisher:": "Future", "ASIN: ": "P000000001", "Shipping: ": "US only"},
    "rank": "1,234 in Magazine Subscriptions (",
    "imageURL": ["https://example.invalid/1.jpg"],
}
P2 = {
    "asin": "P000000002",
    "title": "Time &amp; Life",
    "description": [],
    "brand": "",
    "category": ["Magazine Subscriptions"],
    "price": ".a-box-inner{background-color:#fff}",
    "also_buy": ["P000000001"],
    "also_view": ["RATEDONLY1"],
    "details": {},
    "rank": [],
}
P3 = {
    "asin": "P000000003",
    "title": ' Magazines" />',
    "description": [],
    "brand": "",
    "category": [],
    "price": "",
    "also_buy": [],
    "also_view": [],
    "details": {},
    "rank": [],
}

RATINGS = """\
P000000001,U1,5.0,1000000000
P000000001,U1,5.0,1000000000
P000000001,U1,3.0,1000000000
P000000002,U2,4.0,900000000
RATEDONLY1,U3,2.0,1100000000
P000000001,U1,4.0,1200000000
P000000001,U4,x,1000000000
P000000001,U5,11.0,1000000000
P000000001,U6,5.0
"""


def write(tmp_path: Path, meta_lines: list[str], ratings: str, gz: bool = True) -> Path:
    suffix = ".gz" if gz else ""
    meta, rates = tmp_path / f"meta_Magazine_Subscriptions.json{suffix}", tmp_path / f"Magazine_Subscriptions.csv{suffix}"
    for path, text in ((meta, "".join(meta_lines)), (rates, ratings)):
        data = text.encode("utf-8")
        path.write_bytes(gzip.compress(data) if gz else data)
    return tmp_path


def fixture_dir(tmp_path: Path, gz: bool = True) -> Path:
    lines = [json.dumps(P1) + "\n", json.dumps(P2) + "\n", json.dumps(P1) + "\n", "not json\n", json.dumps(P3) + "\n"]
    return write(tmp_path, lines, RATINGS, gz=gz)


def load(path: Path, **kwargs) -> tuple[list[dict], LoadReport]:
    report = LoadReport("amazon")
    return list(amazon.events(path, report=report, **kwargs)), report


def test_fixture_products(tmp_path: Path) -> None:
    events, report = load(fixture_dir(tmp_path))
    check_valid_and_ordered(events)
    products = {e["id"]: e for e in events if e["type"] == "product"}
    assert list(products) == ["P000000002", "P000000003", "P000000001"]  # by time, then file order

    p1 = products["P000000001"]
    assert p1["title"] is None  # broken HTML -> None, not a fragment
    assert p1["description"] == "Designed for the rabid PC hobbyist & friends.\nPage View."
    assert p1["brand"] == "Future & Co"
    assert p1["categories"] == ["Magazine Subscriptions", "Arts, Music & Photography", "Music"]
    assert p1["price"] == 12.99
    assert p1["attributes"] == {"format": "Print Magazine", "publisher": "Future", "sales_rank": 1234}
    assert p1["ts"] == iso_utc(1_000_000_000)  # its first rating

    p2 = products["P000000002"]
    assert (p2["title"], p2["description"], p2["brand"], p2["price"], p2["attributes"]) == ("Time & Life", None, None, None, {})
    assert p2["ts"] == iso_utc(900_000_000)

    p3 = products["P000000003"]
    assert p3["title"] is None and p3["categories"] == []
    assert p3["ts"] == iso_utc(900_000_000)  # never rated: the start of the stream

    assert report.rows == {"meta_lines": 5, "rating_rows": 9}
    assert report.notes["broken_title"] == 2
    assert report.notes["rated_asin_without_meta"] == 1


def test_fixture_relations(tmp_path: Path) -> None:
    events, report = load(fixture_dir(tmp_path))
    relations = [
        (e["src"]["id"], e["rel"], e["dst"]["id"], e["props"]["position"], e["ts"]) for e in events if e["type"] == "relation"
    ]
    assert relations == [
        ("P000000001", "ALSO_BOUGHT", "P000000002", 0, iso_utc(1_000_000_000)),
        ("P000000001", "ALSO_VIEWED", "P000000003", 0, iso_utc(1_000_000_000)),
        ("P000000002", "ALSO_BOUGHT", "P000000001", 0, iso_utc(1_000_000_000)),  # once both exist
        ("P000000002", "ALSO_VIEWED", "RATEDONLY1", 0, iso_utc(1_100_000_000)),  # rated, no metadata: kept
    ]
    assert report.skipped["edge_to_unknown_asin"] == 1  # XEXTERNAL1
    assert report.skipped["self_or_repeated_edge"] == 2
    # every relation comes after both of its endpoints' product upserts (or first rating)
    present: set[str] = set()
    for event in events:
        if event["type"] == "product":
            present.add(event["id"])
        elif event["type"] == "interaction":
            present.add(event["product_id"])
        elif event["dst"]["id"] != "RATEDONLY1":
            assert {event["src"]["id"], event["dst"]["id"]} <= present

    external, _ = load(tmp_path, keep_external=True)
    assert ("P000000001", "XEXTERNAL1") in {(e["src"]["id"], e["dst"]["id"]) for e in external if e["type"] == "relation"}


def test_fixture_ratings(tmp_path: Path) -> None:
    events, report = load(fixture_dir(tmp_path))
    ratings = [(e["user_id"], e["product_id"], e["rating"], e["ts"]) for e in events if e["type"] == "interaction"]
    assert ratings == [
        ("U2", "P000000002", 4.0, iso_utc(900_000_000)),
        ("U1", "P000000001", 5.0, iso_utc(1_000_000_000)),  # first row of three with the same key
        ("U3", "RATEDONLY1", 2.0, iso_utc(1_100_000_000)),
        ("U1", "P000000001", 4.0, iso_utc(1_200_000_000)),  # a later re-rating is kept
    ]
    assert all(e["action"] == "rate" for e in events if e["type"] == "interaction")
    assert report.skipped["duplicate_rating"] == 1
    assert report.skipped["conflicting_rating"] == 1
    assert report.skipped["malformed_row"] == 3
    assert report.skipped["duplicate_meta"] == 1
    assert report.skipped["malformed_meta"] == 1
    assert dict(report.events) == {"product": 3, "relation": 4, "interaction": 4}


def test_ties_order_products_then_relations_then_interactions(tmp_path: Path) -> None:
    events, _ = load(fixture_dir(tmp_path))
    at_1e9 = [e["type"] for e in events if e["ts"] == iso_utc(1_000_000_000)]
    assert at_1e9 == ["product", "relation", "relation", "relation", "interaction"]


def test_plain_files_and_limit(tmp_path: Path) -> None:
    path = fixture_dir(tmp_path, gz=False)
    everything, _ = load(path)
    first, report = load(path, limit=3)
    assert first == everything[:3] and sum(report.events.values()) == 3


def test_missing_files(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        load(tmp_path)
    (tmp_path / "meta_Magazine_Subscriptions.json.gz").write_bytes(gzip.compress(b""))
    with pytest.raises(FileNotFoundError, match="ratings"):
        load(tmp_path)


def test_helpers() -> None:
    assert amazon.parse_price("$10.00 - $20.00") == 10.0
    assert amazon.parse_price("$1,299.00") == 1299.0
    assert amazon.parse_price("\n\n\n<script") is None
    assert amazon.clean_title("<b>PC World</b>") == "PC World"
    assert amazon.clean_title(None) is None
    assert amazon.clean_description("one <I>two</I>") == "one two"


def test_committed_sample() -> None:
    events, report = load(SAMPLE)
    check_valid_and_ordered(events)
    assert dict(report.events) == {"product": 320, "relation": 7538, "interaction": 17356}
    assert report.rows == {"meta_lines": 512, "rating_rows": 17399}
    assert dict(report.skipped) == {"duplicate_meta": 192, "duplicate_rating": 43, "edge_to_unknown_asin": 25228}
    products = [e for e in events if e["type"] == "product"]
    assert sum(1 for p in products if p["title"]) == 20
    assert all("<" not in (p["title"] or "") and "<" not in (p["description"] or "") for p in products)


def test_full_data_set() -> None:
    events, report = load(full_dataset("amazon_magazine_2018"))
    check_valid_and_ordered(events)
    assert dict(report.events) == {"product": 2320, "relation": 15230, "interaction": 88467}
    assert report.rows == {"meta_lines": 3385, "rating_rows": 89689}
    assert dict(report.skipped) == {
        "duplicate_meta": 1065,
        "duplicate_rating": 1221,
        "conflicting_rating": 1,
        "edge_to_unknown_asin": 59900,
    }
    assert events[0]["ts"] == "2001-10-26T00:00:00Z" and events[-1]["ts"] == "2018-09-19T00:00:00Z"
