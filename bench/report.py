"""Markdown tables from bench/results/incremental.json (what docs/performance.md shows).

    python bench/report.py [bench/results/incremental.json]

One table per (dataset, device) for the exact-mode batch rows (and, where (a) was timed end to
end, one against the best baseline, both modes), one for the full_ratio sweep, one for the hub
rows. Numbers are copied, never recomputed.
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

DEFAULT = Path(__file__).resolve().parent / "results" / "incremental.json"


def _num(x: float | None, digits: int = 3) -> str:
    if x is None:
        return "–"
    if abs(x) >= 1000:
        return f"{x:,.0f}"
    if abs(x) >= 100:
        return f"{x:.0f}"
    return f"{x:.{digits}g}"


def batch_table(rows: list[dict[str, Any]]) -> str:
    out = [
        "| batch | (a) ms | (a) alone ms | (b) k-hop ms | a/b | a/b, (a) alone | c/a | updates/s "
        "| batches with a full pass | \\|A_1\\|, \\|A_2\\| median | max err (rows > 1e-5) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---|---|---:|",
    ]
    for r in sorted(rows, key=lambda r: r["batch_size"]):
        aff = r.get("affected_per_layer_median") or []
        fl = r.get("full_layers") or []
        out.append(
            f"| {r['batch_size']:,} | {_num(r['ms_incremental'])} | {_num(r.get('ms_incremental_isolated'))} "
            f"| {_num(r['ms_khop'])} | {_num(r['speedup_vs_khop'])}× "
            f"| {_num(r.get('speedup_vs_khop_isolated'))}{'×' if r.get('speedup_vs_khop_isolated') else ''} "
            f"| {_num(r['speedup_vs_full'])}× | {r['updates_per_s']:,.0f} "
            f"| {sum(1 for x in fl if x)} of {len(fl)} | {', '.join(f'{x:,}' for x in aff[1:])} "
            f"| {r['max_abs_err']:.1e} ({r['rows_over_1e-5']}) |"
        )
    return "\n".join(out)


def end_to_end_table(rows: list[dict[str, Any]]) -> str:
    """The rows with (a) timed end to end (vectors built, serialised and published)."""
    out = [
        "| batch | mode | (a) end to end ms | apply / serialise / publish ms | vectors (MB) published "
        "| held back | (b') k_hop_subgraph ms | (c) full ms | speedup_vs_best | with the baseline publishing too "
        "| max err vs full recompute | (b') max err |",
        "|---:|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in sorted(rows, key=lambda r: (r["batch_size"], r.get("mode", "exact"))):
        st = r["ms_stages"]
        out.append(
            f"| {r['batch_size']:,} | {r.get('mode', 'exact')} | {_num(r['ms_end_to_end'])} "
            f"| {_num(st['apply'])} / {_num(st['serialise'])} / {_num(st['publish'])} "
            f"| {r['vectors_published']:,} ({r['bytes_published'] / 1e6:.2g}) "
            f"| {_num(r.get('vectors_held_back_median'))} | {_num(r['ms_khop_subgraph'])} "
            f"| {_num(r['ms_full'])} | **{_num(r['speedup_vs_best'])}×** | {_num(r['speedup_vs_best_publishing'])}× "
            f"| {r['max_abs_err_full']:.1e} | {r['max_abs_err_khop_subgraph']:.1e} |"
        )
    return "\n".join(out)


def sweep_table(rows: list[dict[str, Any]]) -> str:
    ratios = sorted({r["full_ratio"] for r in rows})
    by_b: dict[int, dict[float, dict[str, Any]]] = defaultdict(dict)
    for r in rows:
        by_b[r["batch_size"]][r["full_ratio"]] = r
    out = ["| batch | " + " | ".join(f"full_ratio {x:g}" for x in ratios) + " |", "|---:|" + "---:|" * len(ratios)]
    for b in sorted(by_b):
        cells = []
        for x in ratios:
            r = by_b[b].get(x)
            cells.append(
                "–"
                if r is None
                else f"{_num(r['ms_incremental'])} ms ({sum(1 for x in r['full_layers'] if x)}/{len(r['full_layers'])})"
            )
        out.append(f"| {b:,} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def hub_table(rows: list[dict[str, Any]]) -> str:
    out = [
        "| case (degree) | mode | ms | \\|A_1\\|, \\|A_2\\| | vectors published | held back | max err |",
        "|---|---|---:|---|---:|---:|---:|",
    ]
    for r in rows:
        if r["kind"] == "hub":
            aff = r.get("affected_per_layer") or []
            out.append(
                f"| {r['case']} ({r['degree']:,}) | {r['mode']} | {_num(r['ms'])} "
                f"| {', '.join(f'{x:,}' for x in aff[1:])} | {r['vectors_published']:,} "
                f"| {r['vectors_suppressed']:,} | {r['max_abs_err']:.1e} |"
            )
        else:
            out.append(
                f"| {r['case']} | {r['mode']} | {_num(r['ms_per_update'])} / update | "
                f"| {r['vectors_published']:,} | {r['vectors_suppressed']:,} | {r['max_abs_err']:.1e} |"
            )
    return "\n".join(out)


def main(argv: list[str]) -> int:
    path = Path(argv[0]) if argv else DEFAULT
    rows = json.loads(path.read_text())
    groups: dict[tuple[str, str], dict[str, list[dict[str, Any]]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        groups[(r.get("dataset", "?"), r.get("device", "?"))][r.get("kind", "?")].append(r)
    for (dataset, device), kinds in groups.items():
        ds = (kinds.get("dataset") or [{}])[0]
        gpu = (ds.get("run") or {}).get("gpu") or device
        print(f"### {dataset}, {gpu}\n")
        if ds:
            print(
                f"{ds.get('nodes', 0):,} nodes, {ds.get('directed_edges', 0):,} directed edges; "
                f"(c) full pass = {_num(ds.get('full_ms'))} ms; sums {ds.get('sums')}\n"
            )
        if kinds.get("batch"):
            e2e = [r for r in kinds["batch"] if "ms_end_to_end" in r]
            if e2e:
                print(f"(a) end to end against the best baseline ({e2e[0]['vector_encoding']} vectors):\n")
                print(end_to_end_table(e2e) + "\n")
            exact = [r for r in kinds["batch"] if r.get("mode", "exact") == "exact"]
            if exact:
                print("exact mode, (a) against the mini-batched k-hop (b) and the full pass (c):\n")
                print(batch_table(exact) + "\n")
        if kinds.get("full_ratio_sweep"):
            print("full_ratio sweep, (a) alone, median ms (batches that used a full pass / batches):\n")
            print(sweep_table(kinds["full_ratio_sweep"]) + "\n")
        hubs = kinds.get("hub", []) + kinds.get("hub_burst", [])
        if hubs:
            print(hub_table(hubs) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
