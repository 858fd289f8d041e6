"""Tiny graphs with planted structure for the model tests (fast: no text model, no services)."""

from __future__ import annotations

import numpy as np
import torch

from encoders.graph import GraphEncoderConfig
from training.dataset import GraphData

DIM = 16
CFG = GraphEncoderConfig(in_dim=DIM, hidden=8, out=8, layers=2, seed=5)


def planted_graph(users: int = 80, products: int = 120, groups: int = 6, per_user: int = 8, seed: int = 0) -> GraphData:
    """Users buy mostly inside their group's products; products of a group share a brand and
    have similar features; some products have no text; every edge has a time."""
    rng = np.random.default_rng(seed)
    g = torch.Generator().manual_seed(seed)
    keys = (
        [f"Product:P{i}" for i in range(products)] + [f"User:U{i}" for i in range(users)] + [f"Brand:B{j}" for j in range(groups)]
    )
    labels = [k.split(":")[0] for k in keys]
    centers = torch.randn(groups, DIM, generator=g)
    feats = torch.zeros(len(keys), DIM)
    pg = np.arange(products) % groups
    feats[:products] = centers[torch.as_tensor(pg)] + 0.5 * torch.randn(products, DIM, generator=g)
    feats = torch.nn.functional.normalize(feats, dim=1) * (torch.arange(len(keys)) < products).unsqueeze(1)
    has_text = np.zeros(len(keys), dtype=bool)
    has_text[:products] = True
    has_text[[3, 7]] = False
    src, dst, rel, ts = [], [], [], []
    t = 0
    for u in range(users):
        grp = u % groups
        own = np.flatnonzero(pg == grp)
        for _ in range(per_user):
            p = int(rng.choice(own)) if rng.random() < 0.85 else int(rng.integers(products))
            src.append(products + u)
            dst.append(p)
            rel.append(0)
            ts.append(t)
            t += 1
    for p in range(products):
        src.append(p)
        dst.append(products + users + int(pg[p]))
        rel.append(1)
        ts.append(-1)
    src.append(5)
    dst.append(5)
    rel.append(2)
    ts.append(-1)  # a self-loop
    src.append(5)
    dst.append(9)
    rel.append(2)
    ts.append(-1)
    times = rng.permutation(t)  # users interleaved in time
    ts = [int(times[x]) if x >= 0 else -1 for x in ts]
    arr = np.unique(np.stack([src, rel, dst]), axis=1, return_index=True)[1]
    keep = np.sort(arr)
    return GraphData(
        keys,
        labels,
        np.asarray(src)[keep],
        np.asarray(dst)[keep],
        np.asarray(rel)[keep],
        ["PURCHASED", "HAS_BRAND", "ALSO_BOUGHT"],
        feats,
        has_text,
        np.asarray(ts)[keep],
    )
