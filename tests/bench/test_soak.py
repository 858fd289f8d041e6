"""The soak and fault harness, short: ``bench/soak.py`` for 90 s at 120 events/s of the committed
Online Retail sample, with kill -9 of ingest and of the embedding worker and a burst of bad
messages. Nothing may be lost, the graph must equal a clean run of the same input,
the replica the graph, the published vectors a full recompute, and the dead-letter topic must
hold exactly the bad messages. The broker restart is left out here: noida-db loses records it
acknowledged when it restarts under load (docs/reliability.md), so what the run can promise
then depends on the broker; the consumer's survival of a broker restart is tested in
tests/streamer/kafka/test_consumer.py. (The 30-minute run with every fault kind is in
bench/results/soak.json and docs/reliability.md.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_short_soak_with_faults_loses_nothing(tmp_path):
    out = tmp_path / "soak.json"
    proc = subprocess.run(
        [
            sys.executable,
            "bench/soak.py",
            "--minutes",
            "1.5",
            "--rate",
            "120",
            "--per-kind",
            "1",
            "--data",
            "sample",
            "--faults",
            "kill_ingest,kill_embed,bad_burst",
            "--out",
            str(out),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.exists(), proc.stderr[-4000:]
    report = json.loads(out.read_text())
    summary = {
        k: report[k]
        for k in (
            "lost",
            "extra",
            "graph_equal",
            "replica_equal",
            "vectors_ok",
            "dlq_expected",
            "dlq_found",
            "dlq_distinct",
            "caught_up",
        )
    }
    assert report["events_produced"] >= 0.9 * 120 * 90, summary
    assert report["caught_up"], summary
    assert report["lost"] == 0 and report["extra"] == 0 and report["graph_equal"], (
        summary,
        report["lost_examples"],
        report["extra_examples"],
    )
    assert report["replica_equal"], report["verify"].get("graph")
    assert report["vectors_ok"], report["verify"]
    assert report["dlq_found"] == report["dlq_distinct"] == report["dlq_expected"] == 20, summary
    assert [f["kind"] for f in report["faults"]] and all(f["recovered_s"] is not None for f in report["faults"]), report["faults"]
    assert proc.returncode == 0, proc.stderr[-4000:]


# In a child process: a nice value raised cannot be lowered again without privilege, and the
# test process's own threads must keep theirs.
_PRIORITIES = r"""
import os, subprocess, sys, threading
sys.path.insert(0, "bench")
import soak
stop = threading.Event()
helper = threading.Thread(target=stop.wait)
helper.start()
soak.deprioritise_harness()
child = subprocess.run([sys.executable, "-c", "import os; print(os.getpriority(os.PRIO_PROCESS, 0))"],
                       capture_output=True, text=True, check=True)
print(soak.HARNESS_NICE, os.getpriority(os.PRIO_PROCESS, helper.native_id), os.getpriority(os.PRIO_PROCESS, 0),
      child.stdout.strip())
stop.set()
helper.join()
"""


def test_the_harness_threads_yield_to_the_processes_it_starts():
    """The harness's helper threads (producer, vector reader, sampler, Kafka client threads) run
    at ``HARNESS_NICE``; its main thread, which starts and restarts the processes under test,
    keeps its priority, and so does a process it starts (docs/reliability.md "The harness")."""
    proc = subprocess.run([sys.executable, "-c", _PRIORITIES], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-4000:]
    nice, helper, main, child = (int(v) for v in proc.stdout.split()[-4:])
    base = os.getpriority(os.PRIO_PROCESS, 0)
    assert nice > 0
    assert helper == max(nice, base), (helper, base)
    assert main == base and child == base, (main, child, base)
