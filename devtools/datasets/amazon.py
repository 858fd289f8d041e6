"""Amazon Review Data 2018 (Ni, Li & McAuley, EMNLP 2019), one category -> events.

Input: a directory with ``meta_<Category>.json[.gz]`` (product metadata, one JSON object a
line) and ``<Category>.csv[.gz]`` (ratings, no header: asin,reviewerID,rating,unixTime), e.g.
``meta_Magazine_Subscriptions.json.gz`` + ``Magazine_Subscriptions.csv.gz``. Neither file is in
time order, so both are read whole (Magazine: 2,320 products, 89,689 ratings, a few MB of
memory), turned into events and sorted by time; ties go products, relations, interactions.

Products (``meta_*``)
* ``id`` = asin. Duplicate lines for an asin (identical in this data) -> the first wins,
  the rest count as ``duplicate_meta``.
* ``title``: HTML entities decoded, complete tags removed; a title still holding markup
  (``<span class="a-size-medium a-color-secondary"``, ``Magazines" />``: a scraping error on
  2,173 of the 2,320 Magazine products) becomes None rather than a fragment
  (``notes.broken_title``).
  The text encoder still has the description, brand and categories.
* ``description``: the list's non-empty paragraphs, tags removed (``<br />`` -> newline),
  entities decoded, joined with newlines, cut at 20,000 characters.
* ``brand``: entities decoded; empty -> None. ``categories``: the path as given (entities
  decoded, empty elements dropped, at most 16), root ``Magazine Subscriptions`` included.
* ``price``: only a plain ``$12.99`` (or the low end of ``$10.00 - $20.00``); anything else
  (empty, or the CSS that the scraper caught on 17 rows) -> None.
* ``attributes``: ``format`` and ``publisher`` from ``details`` and ``sales_rank`` (int) from
  ``rank``, when present. Images, ``ASIN``/``Shipping`` details and empty fields are dropped.

Relations
* ``also_buy`` -> ``ALSO_BOUGHT``, ``also_view`` -> ``ALSO_VIEWED``, from the product to each
  listed asin, directed as Amazon lists them, with ``props.position`` = the index in the list
  (Amazon's order). Only edges whose target is a node this data set creates anyway (it has
  metadata or ratings) are kept: the other targets are products of other categories with no
  text and no interactions (15,883 for Magazine), which would swamp the graph with featureless
  nodes (``skipped.edge_to_unknown_asin``; ``keep_external=True`` keeps them).
  Self-loops and repeats within a list are dropped (``skipped.self_or_repeated_edge``).

Ratings -> ``rate`` interactions (user = reviewerID, rating 1..5, ts = unixTime, day resolution)
* An exact duplicate row is dropped (``duplicate_rating``: 1,221 rows). A second row for the
  same (asin, reviewer, time) with another rating is dropped too (``conflicting_rating``):
  equal ts cannot order them downstream, so the first in file order is kept. The same reviewer
  rating the same item at different times is kept: the newer rating wins downstream.
* Rows that do not parse (column count, number, rating outside 0..10) -> ``malformed_row``.
* Ratings of asins without metadata (108 items) are kept; their Product node has no text.

Event time for products and relations (the metadata has none: it is a 2018 crawl)
* A product's upsert takes the time of its first rating, so products join the stream when
  the first customer meets them and never precede the interaction history by years; a product
  nobody rated takes the time of the earliest rating in the file (the start of the stream).
* A relation takes the later of its two endpoints' times, so it arrives once both exist
  (an external target, with ``keep_external``, counts as existing from the start).
  ``also_buy``/``also_view`` reflect 2018, so early edges are anachronistic either way; this
  choice keeps every edge between nodes that already exist in the replayed graph.
"""

from __future__ import annotations

import csv
import html
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from devtools.datasets import LoadReport, iso_utc, open_text, take

RELATIONS = {"also_buy": "ALSO_BOUGHT", "also_view": "ALSO_VIEWED"}
MAX_TEXT = 20_000
MAX_CATEGORIES = 16
NO_RATINGS_EPOCH = 946_684_800  # 2000-01-01T00:00:00Z, used only when there are no ratings at all
_ORDER = {"product": 0, "relation": 1, "interaction": 2}
_TAG = re.compile(r"<[^<>]*>")
_BREAK = re.compile(r"<br\s*/?>|</p>", re.IGNORECASE)
_PRICE = re.compile(r"\$\s?(\d{1,7}(?:,\d{3})*(?:\.\d{1,2})?)(?:\s*-\s*\$\s?\d{1,7}(?:,\d{3})*(?:\.\d{1,2})?)?")
_RANK = re.compile(r"\s*([\d,]+)\s+in\s")


def resolve(path: str | Path) -> tuple[Path, Path]:
    """(meta file, ratings file) in a directory of one Amazon 2018 category."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is not a directory with meta_<Category>.json.gz and <Category>.csv.gz")
    metas = sorted(path.glob("meta_*.json.gz")) or sorted(path.glob("meta_*.json"))
    if len(metas) != 1:
        raise FileNotFoundError(f"expected one meta_<Category>.json[.gz] in {path}, found {[m.name for m in metas]}")
    category = metas[0].name.removeprefix("meta_").split(".json")[0]
    for name in (f"{category}.csv.gz", f"{category}.csv"):
        if (path / name).is_file():
            return metas[0], path / name
    raise FileNotFoundError(f"no {category}.csv[.gz] (ratings) next to {metas[0]}")


def events(
    path: str | Path,
    limit: int | None = None,
    report: LoadReport | None = None,
    keep_external: bool = False,
) -> Iterator[dict[str, Any]]:
    """Product upserts, ALSO_BOUGHT/ALSO_VIEWED relations and rate interactions, oldest first."""
    report = LoadReport("amazon") if report is None else report
    meta_path, ratings_path = resolve(path)
    return take(_events(meta_path, ratings_path, report, keep_external), limit, report)


# --- cleaning --------------------------------------------------------------------------------
def clean_text(text: str) -> str:
    """Tags out (line breaks kept), entities decoded, runs of spaces collapsed per line."""
    text = _TAG.sub("", _BREAK.sub("\n", text))
    lines = (" ".join(line.split()) for line in html.unescape(text).splitlines())
    return "\n".join(line for line in lines if line)


def clean_title(raw: Any) -> str | None:
    if not isinstance(raw, str):
        return None
    title = " ".join(html.unescape(_TAG.sub("", raw)).split())
    if not title or "<" in title or ">" in title:
        return None
    return title[:MAX_TEXT]


def clean_description(raw: Any) -> str | None:
    parts = raw if isinstance(raw, list) else [raw]
    text = "\n".join(clean_text(p) for p in parts if isinstance(p, str) and p.strip())
    return text[:MAX_TEXT] or None


def clean_short(raw: Any, limit: int = 256) -> str | None:
    if not isinstance(raw, str):
        return None
    text = " ".join(html.unescape(raw).split())
    return text[:limit] or None


def parse_price(raw: Any) -> float | None:
    if not isinstance(raw, str):
        return None
    match = _PRICE.fullmatch(raw.strip())
    return float(match.group(1).replace(",", "")) if match else None


def product_fields(doc: dict[str, Any]) -> dict[str, Any]:
    """The product event fields (without ts) of one metadata record."""
    categories = [c for c in (clean_short(c) for c in doc.get("category") or []) if c][:MAX_CATEGORIES]
    raw_details = doc.get("details")
    details: dict[str, Any] = raw_details if isinstance(raw_details, dict) else {}
    attributes: dict[str, Any] = {}
    for key, name in (("Format:", "format"), ("Publisher:", "publisher")):
        value = clean_short(details.get(key))
        if value:
            attributes[name] = value
    rank = doc.get("rank")
    if isinstance(rank, str) and (match := _RANK.match(rank)):
        attributes["sales_rank"] = int(match.group(1).replace(",", ""))
    return {
        "type": "product",
        "op": "upsert",
        "id": doc["asin"],
        "title": clean_title(doc.get("title")),
        "description": clean_description(doc.get("description")),
        "brand": clean_short(doc.get("brand")),
        "categories": categories,
        "attributes": attributes,
        "price": parse_price(doc.get("price")),
    }


# --- reading ---------------------------------------------------------------------------------
def read_meta(path: Path, report: LoadReport) -> dict[str, dict[str, Any]]:
    """asin -> metadata record (first line wins), in file order."""
    docs: dict[str, dict[str, Any]] = {}
    with open_text(path) as handle:
        for line in handle:
            if not line.strip():
                continue
            report.rows["meta_lines"] += 1
            try:
                doc = json.loads(line)
            except json.JSONDecodeError:
                report.skipped["malformed_meta"] += 1
                continue
            asin = doc.get("asin") if isinstance(doc, dict) else None
            if not isinstance(asin, str) or not asin.strip() or len(asin) > 256:
                report.skipped["malformed_meta"] += 1
                continue
            if asin in docs:
                report.skipped["duplicate_meta"] += 1
                continue
            docs[asin] = doc
    return docs


def read_ratings(path: Path, report: LoadReport) -> list[tuple[int, str, str, float]]:
    """(unix time, asin, reviewer, rating) per kept row, in file order."""
    kept: list[tuple[int, str, str, float]] = []
    seen: dict[tuple[str, str, int], float] = {}
    with open_text(path) as handle:
        for row in csv.reader(handle):
            if not row:
                continue
            report.rows["rating_rows"] += 1
            try:
                asin, reviewer, rating_text, time_text = (field.strip() for field in row)
                rating, unix = float(rating_text), int(float(time_text))
            except ValueError:  # wrong column count or not a number
                report.skipped["malformed_row"] += 1
                continue
            if not asin or not reviewer or max(len(asin), len(reviewer)) > 256 or not 0 <= rating <= 10:
                report.skipped["malformed_row"] += 1
                continue
            key = (asin, reviewer, unix)
            if key in seen:
                report.skipped["duplicate_rating" if seen[key] == rating else "conflicting_rating"] += 1
                continue
            seen[key] = rating
            kept.append((unix, asin, reviewer, rating))
    return kept


def _events(meta_path: Path, ratings_path: Path, report: LoadReport, keep_external: bool) -> Iterator[dict[str, Any]]:
    docs = read_meta(meta_path, report)
    ratings = read_ratings(ratings_path, report)

    first_rated: dict[str, int] = {}
    for unix, asin, _, _ in ratings:
        if unix < first_rated.get(asin, unix + 1):
            first_rated[asin] = unix
    start = min(first_rated.values(), default=NO_RATINGS_EPOCH)
    unrated = sum(1 for asin in docs if asin not in first_rated)
    if unrated:
        report.notes["product_without_ratings_at_stream_start"] += unrated

    timed: list[tuple[int, int, int, dict[str, Any]]] = []  # (unix, kind order, sequence, event)

    def add(unix: int, event: dict[str, Any]) -> None:
        event["ts"] = iso_utc(unix)
        timed.append((unix, _ORDER[event["type"]], len(timed), event))

    for asin, doc in docs.items():
        event = product_fields(doc)
        if event["title"] is None and isinstance(doc.get("title"), str) and doc["title"].strip():
            report.notes["broken_title"] += 1
        add(first_rated.get(asin, start), event)

    for asin, doc in docs.items():
        src_time = first_rated.get(asin, start)
        for field, rel in RELATIONS.items():
            targets = doc.get(field) or []
            seen: set[str] = set()
            for position, dst in enumerate(targets):
                if not isinstance(dst, str) or not dst.strip() or len(dst) > 256:
                    report.skipped["malformed_edge"] += 1
                    continue
                if dst == asin or dst in seen:
                    report.skipped["self_or_repeated_edge"] += 1
                    continue
                seen.add(dst)
                if dst not in docs and dst not in first_rated and not keep_external:
                    report.skipped["edge_to_unknown_asin"] += 1
                    continue
                dst_time = first_rated.get(dst, start)
                add(
                    max(src_time, dst_time),
                    {
                        "type": "relation",
                        "op": "upsert",
                        "src": {"label": "Product", "id": asin},
                        "rel": rel,
                        "dst": {"label": "Product", "id": dst},
                        "props": {"position": position},
                    },
                )

    for unix, asin, reviewer, rating in ratings:
        add(unix, {"type": "interaction", "user_id": reviewer, "product_id": asin, "action": "rate", "rating": rating})
    if ratings:
        report.notes["rated_asin_without_meta"] += sum(1 for asin in first_rated if asin not in docs)

    timed.sort(key=lambda item: item[:3])
    for _, _, _, event in timed:
        yield event
