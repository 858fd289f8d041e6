"""UCI Online Retail (Chen, Sain & Guo 2012, CC BY 4.0) -> product and purchase events.

Input: ``online_retail.csv[.gz]`` (or a directory holding it) with the columns
InvoiceNo, StockCode, Description, Quantity, InvoiceDate, UnitPrice, CustomerID, Country:
every invoice line of a UK online gift retailer, 2010-12-01 .. 2011-12-09, sorted by
InvoiceDate. The file is streamed row by row (constant memory apart from one small record per
stock code); a row older than the one before it raises ``ValueError``, because the loader
promises event-time order and will not reorder silently.

Mapping
* StockCode -> Product ``id`` (upper-cased: ``85123a`` and ``85123A`` are the same item in
  this data), Description -> ``title`` (whitespace collapsed), UnitPrice -> ``price``.
  No brand, categories or description exist in this data set.
* CustomerID -> User id (``17850``; a float-formatted ``17850.0`` from other copies is
  normalised to ``17850``).
* Each accepted invoice line -> one ``purchase`` interaction with its ``quantity``; ``ts`` is
  the invoice time. InvoiceDate carries no zone (UK local time); it is labelled UTC as is,
  which keeps the order exact (converting would fold the October DST hour) and is off by at
  most one hour.
* Ids are the data set's own: stock codes (``85123A``) and customer numbers cannot collide
  with Amazon's 10-character ASINs and 13-14 character reviewer ids.

Product upserts
* One upsert the first time a stock code appears on an accepted line, and a new one when it
  appears under a (cleaned) description it never had before: the shop renamed the item
  (225 times in the full data, on 207 stock codes), which changes the text the embeddings
  are built from. Going back to an earlier name is not a rename: some codes alternate
  between two names in use at the same time (23203 switches between "JUMBO BAG DOILEY
  PATTERNS" and "JUMBO BAG VINTAGE DOILEY" 45 times in 2011), and re-sending each switch
  would re-embed the product for nothing; the graph keeps the most recently introduced
  name. Each upsert is a full snapshot (title and price) and carries ``version`` = 0, 1, 2
  ... per stock code, so two upserts within the same minute still order correctly
  downstream (a newer version wins before ts is compared).
* Price changes alone do not make an upsert: unit prices vary line by line with quantity
  tiers and customers (~184k changes), which is pricing, not a catalogue change. ``price`` is
  the unit price of the line that triggered the upsert.
* Guest lines (no CustomerID) still feed the catalogue: a stock code seen only in guest
  orders becomes a product without interactions.

Rows not turned into events (``report.skipped``, first matching reason wins)
* ``malformed_row``: wrong column count, unparsable number or date.
* ``duplicate_line``: the exact same row (all eight fields) already seen (5,268 in the full
  data; they are scanner/export repeats, so counting them twice would double the quantity).
  Duplicates share their InvoiceDate and the file is time-ordered, so the loader remembers
  only the rows of the current minute.
* ``cancellation``: InvoiceNo starting with ``C`` (negative quantities). The event schema has
  no retraction of an interaction and a cancellation names no original line, so the original
  purchase stays as an expression of interest; cancellations are counted, not replayed.
* ``non_sale_invoice``: any other non-numeric InvoiceNo (``A563185``: "Adjust bad debt").
* ``non_product_code``: a StockCode that is not a catalogue item: anything that is not five
  digits plus at most two letters (POST, DOT, M, C2, D, S, B, CRUK, BANK CHARGES, AMAZONFEE,
  PADS, gift_0001_* vouchers; also DCGS*, dotcom-only lines of which none has a customer),
  plus ``23444`` ("Next Day Carriage"), a five-digit service code.
* ``non_positive_quantity``: quantity <= 0 outside cancellations (stock write-offs such as
  "damaged", "check", "?", all without a customer).
* ``non_positive_price``: unit price <= 0 (adjustments and free samples; the 33 such lines
  with a customer in the full data are free items, not purchases).
* ``missing_customer``: no CustomerID (~25% of lines, guest or phone orders): the product
  upsert is still emitted if due, the interaction is not. Inventing one user per invoice would
  add 1,371 one-order users that carry no history.

Fix-ups and facts (``report.notes``)
* ``unusable_description``: "Unknown", empty, or no letter/digit at all ("?"): the title
  stays the last usable one (None if there never was one) and never triggers an upsert.
* ``renamed_product``: upserts sent because a product got a new name (see above).

Country is not used: users carry no properties in the event schema, and a per-country node
would need a relationship type outside the allowlist.
"""

from __future__ import annotations

import csv
import math
import re
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

from devtools.datasets import LoadReport, open_text, take

COLUMNS = ("InvoiceNo", "StockCode", "Description", "Quantity", "InvoiceDate", "UnitPrice", "CustomerID", "Country")
FILE_NAMES = ("online_retail.csv.gz", "online_retail.csv")
_PRODUCT_CODE = re.compile(r"\d{5}[A-Z]{0,2}")
SERVICE_CODES = frozenset({"23444"})  # five digits, but "Next Day Carriage"
_ALNUM = re.compile(r"[A-Za-z0-9]")


def resolve(path: str | Path) -> Path:
    """The CSV itself, or the directory that holds ``online_retail.csv[.gz]``."""
    path = Path(path)
    if path.is_dir():
        for name in FILE_NAMES:
            if (path / name).is_file():
                return path / name
        raise FileNotFoundError(f"no {' or '.join(FILE_NAMES)} in {path}")
    if not path.is_file():
        raise FileNotFoundError(path)
    return path


def events(path: str | Path, limit: int | None = None, report: LoadReport | None = None) -> Iterator[dict[str, Any]]:
    """Product upserts and purchase interactions of the Online Retail CSV, oldest first."""
    report = LoadReport("online_retail") if report is None else report
    return take(_events(resolve(path), report), limit, report)


def clean_title(description: str) -> str | None:
    """Collapsed whitespace, or None for "Unknown", empty and punctuation-only descriptions."""
    title = " ".join(description.split())
    if not title or title.lower() == "unknown" or not _ALNUM.search(title):
        return None
    return title


def is_product_code(code: str) -> bool:
    return _PRODUCT_CODE.fullmatch(code) is not None and code not in SERVICE_CODES


def user_id(customer: str) -> str | None:
    customer = customer.strip()
    if customer.endswith(".0"):
        customer = customer[:-2]
    if not customer or customer.lower() == "nan":
        return None
    return customer


def _parse_time(text: str) -> datetime:
    try:
        return datetime.fromisoformat(text.strip())  # 2010-12-01 08:26:00 (this copy)
    except ValueError:
        return datetime.strptime(text.strip(), "%m/%d/%Y %H:%M")  # 12/1/2010 8:26 (UCI's xlsx export)


def _parse_quantity(text: str) -> int:
    value = float(text)
    if not value.is_integer():
        raise ValueError(f"quantity {text!r} is not a whole number")
    return int(value)


def _events(path: Path, report: LoadReport) -> Iterator[dict[str, Any]]:
    with open_text(path) as handle:
        reader = csv.reader(handle)
        header = [name.strip() for name in next(reader, [])]
        missing = [name for name in COLUMNS if name not in header]
        if missing:
            raise ValueError(f"{path}: not an Online Retail CSV, missing columns {missing}")
        i_inv, i_code, i_desc, i_qty, i_date, i_price, i_cust = (header.index(n) for n in COLUMNS[:7])
        width = len(header)

        titles: dict[str, set[str]] = {}  # stock code -> every usable title it has had
        versions: dict[str, int] = {}  # stock code -> version of its last upsert
        last_date_text: str | None = None
        last_time: datetime | None = None
        ts = ""
        minute_rows: set[tuple[str, ...]] = set()

        for line_no, row in enumerate(reader, start=2):
            report.rows["lines"] += 1
            if len(row) != width:
                report.skipped["malformed_row"] += 1
                continue
            date_text = row[i_date]
            if date_text != last_date_text:
                try:
                    time = _parse_time(date_text)
                except ValueError:
                    report.skipped["malformed_row"] += 1
                    continue
                if last_time is not None and time < last_time:
                    raise ValueError(
                        f"{path}:{line_no}: InvoiceDate {date_text} is older than the row before "
                        f"({last_time}); the loader needs the file sorted by InvoiceDate"
                    )
                last_date_text, last_time = date_text, time
                ts = time.strftime("%Y-%m-%dT%H:%M:%SZ")
                minute_rows.clear()

            key = tuple(row)
            if key in minute_rows:
                report.skipped["duplicate_line"] += 1
                continue
            minute_rows.add(key)

            invoice = row[i_inv].strip()
            if invoice.startswith("C"):
                report.skipped["cancellation"] += 1
                continue
            if not invoice.isdigit():
                report.skipped["non_sale_invoice"] += 1
                continue
            code = row[i_code].strip().upper()
            if not is_product_code(code):
                report.skipped["non_product_code"] += 1
                continue
            try:
                quantity = _parse_quantity(row[i_qty])
                price = float(row[i_price])
            except ValueError:
                report.skipped["malformed_row"] += 1
                continue
            if quantity <= 0:
                report.skipped["non_positive_quantity"] += 1
                continue
            if not (math.isfinite(price) and price > 0):
                report.skipped["non_positive_price"] += 1
                continue

            title = clean_title(row[i_desc])
            if title is None:
                report.notes["unusable_description"] += 1
            names = titles.get(code)
            if names is None or (title is not None and title not in names):
                if names is None:
                    names = titles[code] = set()
                elif names:
                    report.notes["renamed_product"] += 1
                if title is not None:
                    names.add(title)
                versions[code] = versions.get(code, -1) + 1
                yield {
                    "type": "product",
                    "op": "upsert",
                    "id": code,
                    "title": title,
                    "description": None,
                    "brand": None,
                    "categories": [],
                    "attributes": {},
                    "price": price,
                    "version": versions[code],
                    "ts": ts,
                }

            user = user_id(row[i_cust])
            if user is None:
                report.skipped["missing_customer"] += 1
                continue
            yield {
                "type": "interaction",
                "user_id": user,
                "product_id": code,
                "action": "purchase",
                "quantity": quantity,
                "ts": ts,
            }
