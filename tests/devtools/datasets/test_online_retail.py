"""UCI Online Retail loader: every event validates, time order holds, odd rows are handled."""

from __future__ import annotations

import gzip
import time
from datetime import datetime
from pathlib import Path

import pytest

from devtools.datasets import LoadReport, online_retail
from streamer.contracts.events import InteractionEvent, ProductEvent, validate_event
from tests.helpers import check_valid_and_ordered, full_dataset

ROOT = Path(__file__).resolve().parents[3]
SAMPLE = ROOT / "data" / "sample" / "online_retail_sample.csv.gz"
HEADER = "InvoiceNo,StockCode,Description,Quantity,InvoiceDate,UnitPrice,CustomerID,Country\n"

ROWS = """\
536365,85123A,WHITE HANGING HEART T-LIGHT HOLDER,6,2010-12-01 08:26:00,2.55,17850,United Kingdom
536365,85123A,WHITE HANGING HEART T-LIGHT HOLDER,6,2010-12-01 08:26:00,2.55,17850,United Kingdom
536365,85123a,  WHITE  HANGING HEART T-LIGHT HOLDER ,2,2010-12-01 08:26:00,2.95,17850.0,United Kingdom
C536379,85123A,WHITE HANGING HEART T-LIGHT HOLDER,-1,2010-12-01 09:41:00,2.55,14527,United Kingdom
536380,POST,POSTAGE,3,2010-12-01 09:45:00,18.0,12583,France
536381,BANK CHARGES,Bank Charges,1,2010-12-01 09:46:00,15.0,,United Kingdom
536382,23444,Next Day Carriage,1,2010-12-01 09:47:00,15.0,15513,United Kingdom
536383,gift_0001_20,Dotcomgiftshop Gift Voucher £20.00,1,2010-12-01 09:48:00,17.02,,United Kingdom
536384,22139,damaged,-5,2010-12-01 10:00:00,0.0,,United Kingdom
536385,22140,?,5,2010-12-01 10:01:00,0.0,,United Kingdom
536386,71053,WHITE METAL LANTERN,6,2010-12-01 10:05:00,3.39,,United Kingdom
536387,71053,Unknown,1,2010-12-01 10:06:00,3.39,13047,United Kingdom
536388,71053,WHITE MOROCCAN METAL LANTERN,2,2010-12-01 10:07:00,3.50,13047,United Kingdom
536388,85123A,WHITE HANGING HEART T-LIGHT HOLDER,1,2010-12-01 10:07:00,2.10,13047,United Kingdom
A563185,B,Adjust bad debt,1,2010-12-01 10:08:00,11062.06,,United Kingdom
536389,84029G,"KNITTED UNION FLAG, HOT WATER BOTTLE",6,2010-12-01 10:09:00,3.39,13047,United Kingdom
536390,22000,TOO FEW COLUMNS,1,2010-12-01 10:10:00
536391,22001,NOT A NUMBER,abc,2010-12-01 10:11:00,1.0,13047,United Kingdom
536392,22002,Unknown,1,2010-12-01 10:12:00,1.25,13047,United Kingdom
536393,22002,?,1,2010-12-01 10:13:00,1.25,13047,United Kingdom
536394,22002,PAPER CHAIN KIT,1,2010-12-01 10:14:00,1.25,13047,United Kingdom
536395,71053,WHITE METAL LANTERN,1,2010-12-01 10:15:00,3.39,13047,United Kingdom
536395,71053,WHITE MOROCCAN METAL LANTERN,1,2010-12-01 10:15:00,3.39,13047,United Kingdom
"""


def write(tmp_path: Path, rows: str, name: str = "online_retail.csv.gz") -> Path:
    path = tmp_path / name
    data = (HEADER + rows).encode("utf-8")
    path.write_bytes(gzip.compress(data) if name.endswith(".gz") else data)
    return path


def load(path: Path, **kwargs) -> tuple[list[dict], LoadReport]:
    report = LoadReport("online_retail")
    return list(online_retail.events(path, report=report, **kwargs)), report


def test_fixture_events_and_skips(tmp_path: Path) -> None:
    events, report = load(write(tmp_path, ROWS))
    check_valid_and_ordered(events)
    products = [e for e in events if e["type"] == "product"]
    purchases = [e for e in events if e["type"] == "interaction"]

    assert [(p["id"], p["title"], p["price"], p["version"]) for p in products] == [
        ("85123A", "WHITE HANGING HEART T-LIGHT HOLDER", 2.55, 0),
        ("71053", "WHITE METAL LANTERN", 3.39, 0),  # from a guest line: catalogue only
        ("71053", "WHITE MOROCCAN METAL LANTERN", 3.50, 1),  # renamed -> new upsert
        ("84029G", "KNITTED UNION FLAG, HOT WATER BOTTLE", 3.39, 0),
        ("22002", None, 1.25, 0),  # first seen as "Unknown"
        ("22002", "PAPER CHAIN KIT", 1.25, 1),  # first usable description
    ]
    assert [(e["user_id"], e["product_id"], e["quantity"], e["action"]) for e in purchases] == [
        ("17850", "85123A", 6, "purchase"),
        ("17850", "85123A", 2, "purchase"),  # lower-case code, float customer id, same title: no upsert
        ("13047", "71053", 1, "purchase"),  # "Unknown" description keeps the title
        ("13047", "71053", 2, "purchase"),
        ("13047", "85123A", 1, "purchase"),  # price change alone: no upsert
        ("13047", "84029G", 6, "purchase"),
        ("13047", "22002", 1, "purchase"),
        ("13047", "22002", 1, "purchase"),
        ("13047", "22002", 1, "purchase"),
        ("13047", "71053", 1, "purchase"),  # back to an earlier name: not a rename, no upsert
        ("13047", "71053", 1, "purchase"),
    ]
    assert purchases[0]["ts"] == "2010-12-01T08:26:00Z"
    assert dict(report.skipped) == {
        "duplicate_line": 1,
        "cancellation": 1,
        "non_product_code": 4,  # POST, BANK CHARGES, 23444, gift voucher
        "non_positive_quantity": 1,
        "non_positive_price": 1,
        "missing_customer": 1,
        "non_sale_invoice": 1,
        "malformed_row": 2,
    }
    assert dict(report.notes) == {"unusable_description": 3, "renamed_product": 1}
    assert dict(report.events) == {"product": 6, "interaction": 11}
    assert report.rows["lines"] == ROWS.count("\n")
    # every product an interaction names was upserted before it
    seen: set[str] = set()
    for event in events:
        if event["type"] == "product":
            seen.add(event["id"])
        else:
            assert event["product_id"] in seen


def test_upsert_precedes_its_purchase_at_the_same_time(tmp_path: Path) -> None:
    events, _ = load(write(tmp_path, ROWS))
    assert [e["type"] for e in events[:2]] == ["product", "interaction"]
    assert events[0]["ts"] == events[1]["ts"]


def test_plain_csv_directory_and_limit(tmp_path: Path) -> None:
    write(tmp_path, ROWS, name="online_retail.csv")
    events, report = load(tmp_path, limit=4)
    assert len(events) == 4 and sum(report.events.values()) == 4
    assert events == load(tmp_path)[0][:4]
    assert load(tmp_path, limit=0)[0] == []


def test_out_of_order_file_is_refused(tmp_path: Path) -> None:
    rows = (
        "536366,22633,HAND WARMER UNION JACK,6,2010-12-01 08:28:00,1.85,17850,United Kingdom\n"
        "536365,85123A,WHITE HANGING HEART T-LIGHT HOLDER,6,2010-12-01 08:26:00,2.55,17850,United Kingdom\n"
    )
    with pytest.raises(ValueError, match="older than the row before"):
        load(write(tmp_path, rows))


def test_uci_original_date_format(tmp_path: Path) -> None:
    rows = "536365,85123A,WHITE HANGING HEART T-LIGHT HOLDER,6,12/1/2010 8:26,2.55,17850,United Kingdom\n"
    events, _ = load(write(tmp_path, rows))
    assert {e["ts"] for e in events} == {"2010-12-01T08:26:00Z"}


def test_not_an_online_retail_file(tmp_path: Path) -> None:
    path = tmp_path / "x.csv"
    path.write_text("a,b,c\n1,2,3\n")
    with pytest.raises(ValueError, match="missing columns"):
        load(path)
    with pytest.raises(FileNotFoundError):
        load(tmp_path / "missing")


def test_helpers() -> None:
    assert online_retail.clean_title("  Unknown ") is None
    assert online_retail.clean_title("??") is None
    assert online_retail.clean_title("") is None
    assert online_retail.clean_title(" 3 TRADITIONAl  BISCUIT CUTTERS  SET ") == "3 TRADITIONAl BISCUIT CUTTERS SET"
    assert [online_retail.is_product_code(c) for c in ("85123A", "15056BL", "22423", "POST", "DCGS0003", "23444", "C2")] == [
        True,
        True,
        True,
        False,
        False,
        False,
        False,
    ]
    assert online_retail.user_id("17850.0") == "17850"
    assert online_retail.user_id(" ") is None


def test_committed_sample() -> None:
    events, report = load(SAMPLE)
    check_valid_and_ordered(events)
    assert dict(report.events) == {"product": 2738, "interaction": 25569}
    assert len({e["id"] for e in events if e["type"] == "product"}) == 2719
    assert dict(report.notes) == {"renamed_product": 19}
    assert report.rows["lines"] == 42481
    assert dict(report.skipped) == {
        "missing_customer": 15252,
        "cancellation": 719,
        "duplicate_line": 500,
        "non_positive_price": 201,
        "non_product_code": 170,
        "non_positive_quantity": 70,
    }
    assert events[0]["ts"] == "2010-12-01T08:26:00Z" and events[-1]["ts"] == "2010-12-23T16:49:00Z"
    assert len({e["user_id"] for e in events if e["type"] == "interaction"}) == 884
    assert all(isinstance(validate_event(e), (ProductEvent, InteractionEvent)) for e in events[:10])


def test_full_data_set() -> None:
    started = time.perf_counter()
    events, report = load(full_dataset("online_retail", "online_retail.csv.gz"))
    parse_s = time.perf_counter() - started
    check_valid_and_ordered(events)
    assert dict(report.events) == {"product": 4015, "interaction": 391071}
    assert len({e["id"] for e in events if e["type"] == "product"}) == 3790
    assert dict(report.notes) == {"renamed_product": 225}
    assert dict(report.skipped) == {
        "missing_customer": 131354,
        "cancellation": 9251,
        "duplicate_line": 5268,
        "non_product_code": 2483,
        "non_positive_quantity": 1324,
        "non_positive_price": 1155,
        "non_sale_invoice": 3,
    }
    assert report.rows["lines"] == 541909
    assert datetime.fromisoformat(events[-1]["ts"]) == datetime.fromisoformat("2011-12-09T12:50:00+00:00")
    assert parse_s < 60
