#!/usr/bin/env python
"""Can the engine's neighbour sums be float32? Error of float32 sums at a 657k-degree hub.

    python bench/float_sums.py [--degree 657000] [--dim 384] [--updates 10000] [--spread 0.1]

The engine keeps, per node and layer, the sum of its neighbours' rows ``S[v] = sum_u h[u]``
and updates it by deltas (``S[v] += h_new[u] - h_old[u]``); the layer divides by the degree
and multiplies by the weights. Its float64 sums cost 8 bytes per value (docs/engine.md
"Why float64 sums"). The hard case is the products-scale graph's most viewed product: 657k
viewers whose rows share one large component (every user carries the same User type
embedding), so the sum is ~1e5 per coordinate and float32 keeps ~3 of its digits below 1e-2.

Rows here: one shared unit vector ``c`` plus ``--spread`` times a per-row unit vector (0:
identical rows, layer 0's users; 0.1: layer 1, where they differ by their purchases).
The ways of summing, each checked against an exact float64 sum of the same float32 rows:

- ``float32_sequential``: one row at a time, as ``index_add_`` adds a node's deltas;
- ``float32_blocked``: ``torch.sum`` (blocked pairwise reduction), as a full-pass SpMM or a
  re-anchor does;
- ``float32_kahan``: a sequential sum with a compensation term per value (Kahan); as much
  memory as float64;
- ``float32_shifted``: the sum of ``h[u] - c`` for a shift ``c`` known to all rows (the layer's
  mean row), kept in float32 and un-shifted as ``S = S' + deg * c``: the common component never
  enters the float32 sum;
- ``float64``: the engine's default.

For each: the max abs error of the mean (``S / deg``) and of the mean times the layer's weights
(a glorot-scaled ``dim x 128`` matrix, as SAGEConv's ``lin_l``), after the one-shot sum and after
``--updates`` delta updates (a random row replaced by a new one each time; the shifted sum
takes ``new - old`` in float32, like the others). The bound to meet is the engine's 1e-5.
Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import torch


def kahan_add(total: torch.Tensor, comp: torch.Tensor, x: torch.Tensor) -> None:
    y = x - comp
    t = total + y
    comp.copy_((t - total) - y)
    total.copy_(t)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--degree", type=int, default=657_000)
    p.add_argument("--dim", type=int, default=384)
    p.add_argument("--out", type=int, default=128)
    p.add_argument("--updates", type=int, default=10_000)
    p.add_argument("--spread", type=float, nargs="+", default=[0.0, 0.1])
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    g = torch.Generator().manual_seed(a.seed)
    weight = torch.randn(a.dim, a.out, generator=g, dtype=torch.float64) * (6 / (a.dim + a.out)) ** 0.5
    c = torch.nn.functional.normalize(torch.randn(a.dim, generator=g, dtype=torch.float64), dim=0)
    results: list[dict[str, Any]] = []
    for spread in a.spread:
        began = time.perf_counter()

        def rows(n: int, spread: float = spread) -> torch.Tensor:
            noise = torch.nn.functional.normalize(torch.randn(n, a.dim, generator=g, dtype=torch.float64), dim=1)
            return (c + spread * noise).float()

        h = rows(a.degree)
        exact = h.double().sum(0)
        c32 = c.float()

        # one-shot sums
        seq = torch.zeros(a.dim)
        kahan, comp = torch.zeros(a.dim), torch.zeros(a.dim)
        shifted = torch.zeros(a.dim)
        for row in h:  # one row at a time: how index_add_ accumulates into one node's sum
            seq += row
            kahan_add(kahan, comp, row)
            shifted += row - c32
        sums = {
            "float32_sequential": seq.double(),
            "float32_blocked": h.sum(0).double(),
            "float32_kahan": kahan.double(),
            "float32_shifted": shifted.double() + a.degree * c32.double(),
            "float64": h.double().sum(0),
        }

        def errors(s: dict[str, torch.Tensor], ref: torch.Tensor) -> dict[str, dict[str, float]]:
            mean_ref = ref / a.degree
            return {
                k: {
                    "mean": float((v / a.degree - mean_ref).abs().max()),
                    "after_weights": float(((v / a.degree - mean_ref) @ weight).abs().max()),
                }
                for k, v in s.items()
            }

        one_shot = errors(sums, exact)

        # delta updates: replace a random row by a new one, S += new - old
        s32 = seq.clone()
        k32, kc = kahan.clone(), comp.clone()
        sh32 = shifted.clone()
        s64 = sums["float64"].clone()
        for _ in range(a.updates):
            i = int(torch.randint(a.degree, (1,), generator=g))
            new = rows(1)[0]
            delta = new - h[i]
            s32 += delta
            kahan_add(k32, kc, delta)
            sh32 += delta  # (new - c) - (old - c), in float32
            s64 += new.double() - h[i].double()
            h[i] = new
        exact = h.double().sum(0)
        after = errors(
            {
                "float32_sequential": s32.double(),
                "float32_blocked": h.sum(0).double(),  # a re-anchor after the updates
                "float32_kahan": k32.double(),
                "float32_shifted": sh32.double() + a.degree * c32.double(),
                "float64": s64,
            },
            exact,
        )
        results.append(
            {
                "degree": a.degree,
                "dim": a.dim,
                "spread": spread,
                "sum_magnitude": float(exact.abs().max()),
                "one_shot_max_abs_err": one_shot,
                "after_updates": a.updates,
                "after_updates_max_abs_err": after,
                "within_1e-5_after_weights": {
                    k: one_shot[k]["after_weights"] <= 1e-5 and after[k]["after_weights"] <= 1e-5 for k in one_shot
                },
                "seconds": round(time.perf_counter() - began, 1),
            }
        )
    print(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
