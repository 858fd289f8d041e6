"""The physical limit of an exact incremental update (issue 12; docs/performance.md "The
physical limit"): what share of a full forward pass's work each batch size *must* touch, and
how close the engine's apply stage comes to that share.

For a batch, per layer l = 1..L (mean-aggregation GraphSAGE, the project's model):

* ``rows``: |A_l|, the rows whose layer-l value can change. Any exact method recomputes (or
  updates) at least these rows' dense transform; a full pass does all N rows.
* ``in_edges``: the in-edges of A_l, what a method that re-gathers each affected row reads
  (the k-hop subgraph baselines do this); a full pass reads all 2E half-edges.
* ``messages``: the half-edges out of the rows that changed at layer l-1, what the delta
  method reads (the engine's ``delta_messages``, measured with the full-pass switch off).

``fraction_*`` = the sum over the layers / (L x the full pass's count). A batch whose fractions
are near 1 cannot be done in much less than a full pass by any exact method; ``apply_over_full``
is the engine's measured apply time (switch off, vectors not built) over the full pass's, in
the same run. Streams and datasets are ``bench/incremental.py``'s.

    python bench/physical_limit.py                       # Online Retail, ~1 min
    python bench/physical_limit.py --datasets retail,synth:small --output bench/results/physical_limit.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import incremental as inc

from streamer.embed.engine import IncrementalEngine


def series(engine: IncrementalEngine, stream, batch: int, reps: int, full_s: float) -> dict:
    L = engine.L
    rows, in_edges, messages, ratio = [], [], [], []
    for _ in range(reps):
        changes, features = stream.next(batch)
        t0 = time.perf_counter()
        report = engine.apply(changes, features, with_vectors=False)
        ratio.append((time.perf_counter() - t0) / full_s)
        a = report.affected_rows[1 : L + 1]
        degree = engine.replica.length  # after the batch (the replica may have grown)
        n_rows, half_edges = engine.replica.num_nodes, 2 * engine.replica.num_edges
        rows.append(sum(len(x) for x in a) / (L * n_rows))
        in_edges.append(sum(int(degree[x.numpy()].sum()) for x in a) / (L * half_edges))
        messages.append(report.delta_messages / (L * half_edges))
    med = lambda xs: round(float(np.median(xs)), 5)
    return {
        "batch_size": batch,
        "reps": reps,
        "fraction_rows": med(rows),
        "fraction_in_edges": med(in_edges),
        "fraction_messages": med(messages),
        "apply_over_full": med(ratio),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--datasets", default="retail", help="comma list: retail, synth:<preset>")
    p.add_argument("--batch-sizes", default="1,10,100,1000,10000")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--output", default=None, help="also write the JSON here")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    out = []
    for name in [d for d in a.datasets.split(",") if d]:
        ds = inc.retail_dataset(inc.DEFAULT_RETAIL, 0.5, 384) if name == "retail" else inc.synth_dataset(name.split(":", 1)[1], 0)
        model = inc.GraphEncoder(inc.GraphEncoderConfig(in_dim=384, hidden=128, out=128, layers=2, seed=0))
        # full_ratio 0: never switch to a full pass, so the delta work is what is measured
        engine = IncrementalEngine(model, torch.device("cpu"), agg_dtype=torch.float64, full_ratio=0.0)
        inc.load_into(engine, ds)
        adj = engine.adjacency(torch.float32)
        fulls = []
        for _ in range(3):
            t0 = time.perf_counter()
            engine.full_layers(adj)
            fulls.append(time.perf_counter() - t0)
        full_s = min(fulls)
        del adj
        for b in [int(x) for x in a.batch_sizes.split(",") if x]:
            row = {
                "dataset": name,
                "nodes": engine.replica.num_nodes,
                "half_edges": 2 * engine.replica.num_edges,
                "full_ms": round(1000 * full_s, 2),
                **series(engine, ds["stream"], b, a.reps, full_s),
            }
            print(json.dumps(row), flush=True)
            out.append(row)
    if a.output:
        Path(a.output).write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
