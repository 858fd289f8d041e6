"""What the work *between* two batches costs the incremental engine (CPU, Online Retail).

    python bench/between_batches.py                    # ~15 s on the 2-core dev box
    python bench/between_batches.py --batch-size 1 --threads 1

``bench/incremental.py`` times (a) twice: interleaved with the k-hop baseline (b), and alone.
On Online Retail at batch 10 the two differ by ~1.6 ms (3.7 vs 2.2 ms). This benchmark says
where that comes from. It applies batches of the real update stream with the engine's
defaults and, before each timed batch, runs one of these (round-robin, so every variant
sees the same machine state):

- ``none``         nothing (the "alone" figure);
- ``alloc_16mb``   allocate and free a 16 MB tensor without touching it (allocator state);
- ``touch_16mb``   allocate, zero and free 16 MB (fresh pages, some cache traffic);
- ``read_32mb``    sum an existing 32 MB tensor (data caches swept, torch threads busy);
- ``idle_20ms``    sleep 20 ms (the core idles, or the host runs something else on it);
- ``spin_20ms``    20 ms of a pure-Python loop (the core busy, little memory traffic);
- ``khop``         the k-hop baseline (b) over the previous batch's affected set, as in
                   ``bench/incremental.py``'s interleaved pass.

Output: one JSON object on stdout: median ms per variant and the ratio to ``none`` measured
in the same run. Absolute times only count as a comparison within one run.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import incremental as inc


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch-size", type=int, default=10)
    p.add_argument("--rounds", type=int, default=8, help="rounds; each variant times --per-round batches per round")
    p.add_argument("--per-round", type=int, default=5)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--retail", default=str(inc.DEFAULT_RETAIL))
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    args = inc.parse(["--datasets", "retail", "--device", "cpu", "--retail", a.retail])
    bench = inc.Bench(args)
    ds = inc.retail_dataset(Path(args.retail), args.retail_split, args.dim)
    engine = inc.IncrementalEngine(bench.model(args.dim), torch.device("cpu"), reanchor_every=args.reanchor_every)
    inc.load_into(engine, ds)
    stream, B, L = ds["stream"], a.batch_size, engine.L
    khop = inc.KHopBaseline(engine)
    big = torch.randn(8_000_000)
    last_affected = [np.zeros(0, dtype=np.int64)]

    def spin() -> None:
        t = time.perf_counter()
        while time.perf_counter() - t < 0.02:
            pass

    variants: dict[str, Callable[[], object]] = {
        "none": lambda: None,
        "alloc_16mb": lambda: torch.empty(4_000_000),
        "touch_16mb": lambda: torch.zeros(4_000_000),
        "read_32mb": lambda: float(big.sum()),
        "idle_20ms": lambda: time.sleep(0.02),
        "spin_20ms": spin,
        "khop": lambda: khop.run(last_affected[0]),
    }
    for _ in range(5):  # warm-up
        ch, f = stream.next(B)
        last_affected[0] = engine.apply(ch, f, with_vectors=False).affected_rows[L].numpy()
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(a.rounds):
        for name, before in variants.items():
            for _ in range(a.per_round):
                ch, f = stream.next(B)
                before()
                t0 = time.perf_counter()
                report = engine.apply(ch, f, with_vectors=False)
                times[name].append(time.perf_counter() - t0)
                last_affected[0] = report.affected_rows[L].numpy()
    err, over = engine.verify(method="layers")
    base = float(np.median(times["none"]))
    out = {
        "dataset": "retail",
        "device": "cpu",
        "batch_size": B,
        "torch_threads": torch.get_num_threads(),
        "batches_per_variant": len(times["none"]),
        "max_abs_err": err,
        "rows_over_1e-5": over,
        "ms_median": {k: round(1000 * float(np.median(v)), 3) for k, v in times.items()},
        "ratio_to_none": {k: round(float(np.median(v)) / base, 2) for k, v in times.items()},
    }
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
