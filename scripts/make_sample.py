#!/usr/bin/env python3
"""Cut the committed real-data sample (data/sample/) from the full data sets.

    python scripts/make_sample.py [--source KGS_DATA_DIR] [--out data/sample]

* Online Retail: every line invoiced before --retail-until (default 2011-01-01: December
  2010, 20 trading days from 2010-12-01 to 2010-12-23), header included, copied byte for
  byte. The source is sorted by InvoiceDate, so the sample is an exact prefix of it.
* Amazon Magazine: the --amazon-products (default 300) products with the most also_buy /
  also_view links to other products that have metadata (ties broken by asin) and the
  --amazon-titled (default 20) best-linked ones whose title is clean text (the top 300 all
  have the scraper's broken HTML title); all their metadata lines (duplicates included, as
  in the source), plus every rating row of those products and of the rated-but-no-metadata
  asins they link to; rows keep the source order. Dense links make a connected sample graph
  rather than isolated items.

Output is deterministic (gzip header without a timestamp), so re-running changes no bytes.
"""

from __future__ import annotations

import argparse
import csv
import gzip
import io
import json
from pathlib import Path

from streamer.settings import Settings

META = "meta_Magazine_Subscriptions.json.gz"
RATINGS = "Magazine_Subscriptions.csv.gz"


def write_gz(path: Path, lines: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=9) as gz:
        gz.write("".join(lines).encode("utf-8"))
    print(f"wrote {path} ({len(lines):,} lines, {path.stat().st_size / 1e6:.2f} MB)")


def cut_online_retail(source: Path, out: Path, until: str) -> None:
    with gzip.open(source, "rt", encoding="utf-8", newline="") as handle:
        header = handle.readline()
        kept = [header]
        for line in handle:
            row = next(csv.reader(io.StringIO(line)))
            if len(row) != 8:
                raise SystemExit(f"unexpected line (a field with a newline?): {line!r}")
            if row[4] >= until:  # InvoiceDate 'YYYY-MM-DD HH:MM:SS' sorts as text
                break
            kept.append(line)
    write_gz(out, kept)


def cut_amazon(source_dir: Path, out_dir: Path, n_products: int, n_titled: int) -> None:
    with gzip.open(source_dir / META, "rt", encoding="utf-8") as handle:
        meta_lines = [line for line in handle if line.strip()]
    with gzip.open(source_dir / RATINGS, "rt", encoding="utf-8") as handle:
        rating_lines = [line for line in handle if line.strip()]

    docs: dict[str, dict] = {}
    for line in meta_lines:
        doc = json.loads(line)
        docs.setdefault(doc["asin"], doc)
    degree = {asin: 0 for asin in docs}
    for asin, doc in docs.items():
        for dst in (doc.get("also_buy") or []) + (doc.get("also_view") or []):
            if dst in docs and dst != asin:
                degree[asin] += 1
                degree[dst] += 1
    ranked = [asin for asin, _ in sorted(degree.items(), key=lambda kv: (-kv[1], kv[0]))]
    chosen = set(ranked[:n_products])
    # The best-linked products are all scraped with a broken HTML title; add the best-linked
    # ones whose title is clean text so the sample has both kinds.
    titled = [asin for asin in ranked if "<" not in docs[asin]["title"] and ">" not in docs[asin]["title"]]
    chosen |= set(titled[:n_titled])

    rated = {line.split(",", 1)[0] for line in rating_lines}
    linked_without_meta = {
        dst
        for asin in chosen
        for dst in (docs[asin].get("also_buy") or []) + (docs[asin].get("also_view") or [])
        if dst not in docs and dst in rated
    }
    keep_ratings = chosen | linked_without_meta
    write_gz(out_dir / META, [line for line in meta_lines if json.loads(line)["asin"] in chosen])
    write_gz(out_dir / RATINGS, [line for line in rating_lines if line.split(",", 1)[0] in keep_ratings])
    print(f"amazon: {len(chosen)} products with metadata, {len(linked_without_meta)} linked rated asin(s) without")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", type=Path, default=Settings().data_dir)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent.parent / "data" / "sample")
    parser.add_argument("--retail-until", default="2011-01-01")
    parser.add_argument("--amazon-products", type=int, default=300)
    parser.add_argument("--amazon-titled", type=int, default=20)
    args = parser.parse_args()
    cut_online_retail(
        args.source / "online_retail" / "online_retail.csv.gz", args.out / "online_retail_sample.csv.gz", args.retail_until
    )
    cut_amazon(args.source / "amazon_magazine_2018", args.out / "amazon_magazine", args.amazon_products, args.amazon_titled)


if __name__ == "__main__":
    main()
