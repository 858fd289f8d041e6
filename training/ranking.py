"""Top-k ranking metrics over a user x item score matrix (recall@k, NDCG@k, binary relevance),
and paired bootstrap confidence intervals on the difference of two methods.

``recall@k`` = hits in the top k / number of targets, averaged over users (each user with at
least one target counts once). ``NDCG@k`` = DCG of the top k (gain 1 / log2(rank + 1)) divided by
the DCG of an ideal list of min(k, targets) hits. Excluded items (a user's training
interactions: what ``recommend`` leaves out) are never ranked above a non-excluded item.

Ties are broken by a **seeded random order** of the items (``tie_order(n_items, tie_seed)``,
the same order for every user and every method of a run): never by item index, which in the
evaluation is the order in which products first appeared, so a constant scorer would rank the
newest products last (or first) for a reason no method knows about.

``paired_bootstrap_ci(a, b)``: ``a`` and ``b`` are per-user metrics of two methods on the same
users (same order); users are resampled with replacement (seeded) and the percentile interval
of the mean difference ``a - b`` is returned.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import Tensor


def tie_order(n_items: int, seed: int = 0) -> np.ndarray:
    """The seeded random order in which equal scores are ranked (a permutation of the items)."""
    return np.random.default_rng(seed).permutation(n_items)


def rank_per_user(
    score_fn: Callable[[np.ndarray], Tensor],
    users: np.ndarray,
    targets: Sequence[np.ndarray],
    exclude: Sequence[np.ndarray],
    k: int = 20,
    chunk: int = 1024,
    tie_seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """(recall@k, NDCG@k) per user with at least one target, in the order of ``users``.

    ``score_fn(user_rows) -> [len(rows), n_items]`` scores (higher is better); ``targets[i]``
    and ``exclude[i]`` are item column indices for ``users[i]``."""
    recalls: list[float] = []
    ndcgs: list[float] = []
    discount = 1.0 / np.log2(np.arange(2, k + 2))
    perm: np.ndarray | None = None
    for lo in range(0, len(users), chunk):
        hi = min(lo + chunk, len(users))
        scores = score_fn(users[lo:hi]).detach().float().cpu().clone()
        n_items = scores.shape[1]
        if perm is None or len(perm) != n_items:
            perm = tie_order(n_items, tie_seed)
        for i in range(hi - lo):
            ex = exclude[lo + i]
            if len(ex):
                scores[i, torch.as_tensor(ex, dtype=torch.long)] = -torch.inf
        kk = min(k, n_items)
        # equal scores keep their position in the seeded random order (the sort is stable)
        shuffled = scores[:, torch.as_tensor(perm, dtype=torch.long)]
        top = torch.sort(shuffled, dim=1, descending=True, stable=True).indices[:, :kk].numpy()
        order = perm[top]
        for i in range(hi - lo):
            tgt = targets[lo + i]
            if not len(tgt):
                continue
            hit = np.isin(order[i], tgt)
            recalls.append(float(hit.sum()) / len(tgt))
            ideal = discount[: min(len(tgt), kk)].sum()
            ndcgs.append(float((hit * discount[:kk]).sum() / ideal))
    return np.asarray(recalls, dtype=np.float64), np.asarray(ndcgs, dtype=np.float64)


def rank_metrics(
    score_fn: Callable[[np.ndarray], Tensor],
    users: np.ndarray,
    targets: Sequence[np.ndarray],
    exclude: Sequence[np.ndarray],
    k: int = 20,
    chunk: int = 1024,
    tie_seed: int = 0,
) -> dict[str, float]:
    """Means of ``rank_per_user``: ``{"recall@k", "ndcg@k", "users"}``."""
    rec, ndcg = rank_per_user(score_fn, users, targets, exclude, k, chunk, tie_seed)
    n = len(rec)
    return {f"recall@{k}": float(rec.mean()) if n else 0.0, f"ndcg@{k}": float(ndcg.mean()) if n else 0.0, "users": n}


def paired_bootstrap_ci(
    a: np.ndarray, b: np.ndarray, resamples: int = 1000, seed: int = 0, level: float = 0.95
) -> dict[str, float]:
    """``{"diff", "lo", "hi"}``: the mean of ``a - b`` and its percentile bootstrap interval at
    ``level``, resampling the users (the paired rows of ``a`` and ``b``) ``resamples`` times."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired samples differ in shape: {a.shape} vs {b.shape}")
    d = a - b
    if not len(d):
        return {"diff": 0.0, "lo": 0.0, "hi": 0.0}
    rng = np.random.default_rng(seed)
    means = np.empty(resamples, dtype=np.float64)
    for lo in range(0, resamples, 100):  # 100 resamples at a time bounds the index matrix
        hi = min(lo + 100, resamples)
        means[lo:hi] = d[rng.integers(0, len(d), size=(hi - lo, len(d)))].mean(axis=1)
    tail = (1.0 - level) / 2 * 100
    lo_q, hi_q = np.percentile(means, [tail, 100 - tail])
    return {"diff": float(d.mean()), "lo": float(lo_q), "hi": float(hi_q)}
