"""Top-k ranking metrics over a user x item score matrix (recall@k, NDCG@k, binary relevance).

``recall@k`` = hits in the top k / number of targets, averaged over users (each user with at
least one target counts once). ``NDCG@k`` = DCG of the top k (gain 1 / log2(rank + 1)) divided by
the DCG of an ideal list of min(k, targets) hits. Excluded items (a user's training
interactions: what ``recommend`` leaves out) are never ranked. Ties are broken by item index
(``torch.topk`` on CPU after a stable sort), so a constant scorer is deterministic.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import Tensor


def rank_metrics(
    score_fn: Callable[[np.ndarray], Tensor],
    users: np.ndarray,
    targets: Sequence[np.ndarray],
    exclude: Sequence[np.ndarray],
    k: int = 20,
    chunk: int = 1024,
) -> dict[str, float]:
    """``score_fn(user_rows) -> [len(rows), n_items]`` scores (higher is better); ``targets[i]``
    and ``exclude[i]`` are item column indices for ``users[i]``."""
    recalls: list[float] = []
    ndcgs: list[float] = []
    discount = 1.0 / np.log2(np.arange(2, k + 2))
    for lo in range(0, len(users), chunk):
        hi = min(lo + chunk, len(users))
        scores = score_fn(users[lo:hi]).detach().float().cpu().clone()
        n_items = scores.shape[1]
        for i in range(hi - lo):
            ex = exclude[lo + i]
            if len(ex):
                scores[i, torch.as_tensor(ex, dtype=torch.long)] = -torch.inf
        kk = min(k, n_items)
        # stable: equal scores keep item order (sort is stable; topk is not guaranteed to be)
        order = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :kk].numpy()
        for i in range(hi - lo):
            tgt = targets[lo + i]
            if not len(tgt):
                continue
            hit = np.isin(order[i], tgt)
            recalls.append(float(hit.sum()) / len(tgt))
            ideal = discount[: min(len(tgt), kk)].sum()
            ndcgs.append(float((hit * discount[:kk]).sum() / ideal))
    n = len(recalls)
    return {f"recall@{k}": float(np.mean(recalls)) if n else 0.0, f"ndcg@{k}": float(np.mean(ndcgs)) if n else 0.0, "users": n}
