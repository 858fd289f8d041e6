"""Every bench in ``bench/`` runs, on a tiny input, and prints the JSON it promises.

Nothing else runs the benches, and a bench nobody runs rots (``bench/ingest.py`` crashed on a
changed ``GraphSink.write`` signature for a while). These are smoke runs, not measurements:
they check that each bench gets to its report with its fields, never a speed. The real runs,
their commands and their numbers are in docs/performance.md and docs/reliability.md;
``bench/soak.py`` has its own test (test_soak.py).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import full_dataset

ROOT = Path(__file__).resolve().parents[2]


def run_bench(args: list[str], timeout_s: float = 420) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout_s)
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-4000:])
    return proc


@pytest.fixture
def retail_csv() -> Path:
    return full_dataset("online_retail/online_retail.csv.gz")


def test_ingest_bench(tmp_path, retail_csv):
    out = tmp_path / "ingest.json"
    run_bench(
        [
            "bench/ingest.py",
            str(retail_csv),
            "--limit",
            "3000",
            "--warmup-events",
            "0",
            "--batch-size",
            "500",
            "--baseline-events",
            "50",
            "--state-root",
            str(tmp_path),
            "--output",
            str(out),
        ]
    )
    report = json.loads(out.read_text())
    text = json.dumps(report)
    assert "events_per_s" in text and "baseline" in text, sorted(report)
    raw = report["db_raw"]  # the graph DB's own rate on the same events, and the pipeline's share of it
    assert raw["events"] == 3000 and raw["events_per_s"] > 0, raw
    assert report["headline"]["ratio_to_db_raw"] > 0, report["headline"]


def test_pipeline_bench(tmp_path, retail_csv):
    proc = run_bench(["bench/pipeline.py", "--data", str(retail_csv), "--limit", "2000"])
    report = json.loads(proc.stdout[proc.stdout.index("{") :])
    assert report, proc.stdout[-2000:]


def test_incremental_bench(tmp_path, retail_csv):
    out = tmp_path / "incremental.json"
    run_bench(
        [
            "bench/incremental.py",
            "--datasets",
            "synth:tiny",
            "--batch-sizes",
            "1,10",
            "--full-reps",
            "1",
            "--no-hubs",
            "--burst",
            "0",
            "--khop-budget-s",
            "5",
            "--fresh",
            "--output",
            str(out),
        ]
    )
    rows = json.loads(out.read_text())
    batches = [r for r in rows if r.get("kind") == "batch" and r.get("dataset") == "synth:tiny"]
    assert {(r["batch_size"], r["mode"]) for r in batches} >= {(b, m) for b in (1, 10) for m in ("exact", "bounded")}
    for r in batches:  # (a) end to end, against baselines measured whole
        assert r["ms_end_to_end"] > 0 and r["speedup_vs_best"] > 0 and r["khop_measured_fraction"] == 1.0, r
        assert r["bytes_published"] > 0 or r["mode"] == "bounded", r
        if r["mode"] == "exact":
            assert r["vectors_published"] > 0 and r["vectors_held_back_median"] == 0, r
            assert r["max_abs_err_khop_subgraph"] <= 1e-4, r  # (b') computes what the engine holds
            assert r["max_abs_err_full"] <= 1e-5, r
        else:  # what the topic holds stays within the publish threshold of a full recompute
            assert r["publish_threshold"] > 0 and r["max_abs_err_full"] <= r["error_bound"] + 1e-5, r


def test_broker_cost_bench():
    proc = run_bench(["bench/broker_cost.py", "--seconds", "4", "--rate", "50", "--vectors-per-s", "50"], timeout_s=240)
    report = json.loads(proc.stdout)
    assert report["messages"] >= 150 and report["received"] > 0, report
    assert report["broker_cpu_ms_per_message"] > 0 and report["end_to_end_p99_ms"] > 0, report


def test_between_batches_bench(retail_csv):
    proc = run_bench(["bench/between_batches.py", "--rounds", "1", "--per-round", "2", "--retail", str(retail_csv)])
    assert json.loads(proc.stdout[proc.stdout.index("{") :])


def test_physical_limit_bench(tmp_path):
    out = tmp_path / "limit.json"
    run_bench(
        ["bench/physical_limit.py", "--datasets", "synth:tiny", "--batch-sizes", "1,50", "--reps", "2", "--output", str(out)]
    )
    rows = json.loads(out.read_text())
    assert [r["batch_size"] for r in rows] == [1, 50]
    for r in rows:
        for k in ("fraction_rows", "fraction_in_edges", "fraction_messages"):
            assert 0 < r[k] <= 1, r
        assert r["apply_over_full"] > 0
    assert rows[1]["fraction_rows"] > rows[0]["fraction_rows"]  # a larger batch touches more


def test_quality_bench(tmp_path):
    full_dataset("online_retail/online_retail.csv.gz")
    report = tmp_path / "quality.json"
    run_bench(
        [
            "bench/quality.py",
            "--datasets",
            "online_retail",
            "--sweep",
            "none",
            "--epochs",
            "1",
            "--max-steps-per-epoch",
            "2",
            "--state-dir",
            str(tmp_path / "state"),
            "--report",
            str(report),
        ],
        timeout_s=600,
    )
    rep = json.loads(report.read_text())["datasets"]["online_retail"]
    assert rep["default_method"] == "fused_blend" and "fused_trained" in rep["results"]
    assert {"window_days", "beta", "gamma", "cold_offset"} <= set(rep["training"]["fused_blend"])


def test_report_tables():
    proc = run_bench(["bench/report.py", str(ROOT / "bench" / "results" / "incremental.json")], timeout_s=60)
    assert "|" in proc.stdout


def test_scaleout_bench(tmp_path):
    """1 and 2 sharded worker processes and a kill -9 on the tiny graph: the fields the issue
    names, and coverage checked (the bench exits non-zero when it fails)."""
    out = tmp_path / "scaleout.json"
    run_bench(
        ["bench/scaleout.py", "--preset", "tiny", "--changes", "60", "--batch", "10", "--workers", "1,2"]
        + ["--kill-at", "0.5", "--shards", "8", "--output", str(out)]
    )
    doc = json.loads(out.read_text())
    runs = doc["runs"]
    assert [r["workers"] for r in runs] == [1, 2, 2]
    for r in runs:
        assert {
            "workers",
            "rows_per_worker",
            "cpu_s_per_worker",
            "updates_per_s",
            "coverage_ok",
            "after_kill_coverage_ok",
        } <= set(r)
        assert len(r["rows_per_worker"]) == r["workers"]
    assert runs[0]["coverage_ok"] is True and runs[1]["coverage_ok"] is True
    assert runs[2]["after_kill_coverage_ok"] is True and runs[2]["killed"]
    assert sum(runs[1]["rows_per_worker"]) == runs[0]["rows_per_worker"][0]  # the shards split the last layer
    assert doc["reference_vs_full_err"] < 1e-5


def test_publish_bench(tmp_path):
    out = tmp_path / "publish.json"
    run_bench(["bench/publish.py", "--records", "50,300", "--reps", "2", "--output", str(out)], timeout_s=240)
    report = json.loads(out.read_text())
    assert [r["records"] for r in report["rows"]] == [50, 300]
    for row in report["rows"]:
        assert row["speedup_publish"] > 0 and row["speedup_serialise"] > 0, row
        assert set(row["us_per_record"]) == {"serialise_one_by_one", "serialise_at_once", "send", "packed"}, row
