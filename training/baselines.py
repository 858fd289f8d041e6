"""Non-graph baselines of the temporal evaluation (``training/evaluate.py``).

Everything here sees only interactions before the split time ``T`` and works in
item-column space: ``users`` are user rows ``0 .. n_users-1``, ``items`` are catalogue columns
``0 .. n_items-1``, ``ts`` are epoch ms. Items with no interaction before ``T`` (new products)
get the lowest score of every baseline here (they tie; ``training.ranking`` breaks ties in a
seeded random order).

* ``popularity(users, items, ts, n_items, since_ms)``: number of distinct users who interacted
  with the item at or after ``since_ms`` (all time when ``None``).
* ``choose_window(...)``: the recent-popularity window (days, or ``None`` = all time) with the
  best recall@k on a **validation split inside the training period**: the newest
  ``val_fraction`` of the interactions before ``T`` are the validation targets (users with
  history before the cut, items they had not taken before), popularity is counted before the
  cut. The test numbers are never looked at.
* ``ItemKNN``: item-item cosine over the binary user x item matrix before ``T``; a user's score
  for an item = sum of its similarities to the user's items.
* ``train_bpr(...)``: BPR matrix factorisation (torch, CPU), uniform negatives over the items
  that have interactions; the number of epochs is chosen by recall@k on the same validation
  split (early stopping), then the model is retrained on every pair before ``T`` for that many
  epochs. Deterministic for a seed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from training.ranking import rank_metrics

DAY_MS = 86_400_000
WINDOWS_DAYS: tuple[int | None, ...] = (1, 3, 7, 14, 30, None)


def popularity(users: np.ndarray, items: np.ndarray, ts: np.ndarray, n_items: int, since_ms: int | None = None) -> np.ndarray:
    """Distinct users per item with an interaction at or after ``since_ms`` (float32 [n_items])."""
    keep = np.ones(len(items), dtype=bool) if since_ms is None else ts >= since_ms
    pairs = np.unique(np.stack([items[keep], users[keep]]), axis=1) if keep.any() else np.zeros((2, 0), np.int64)
    return np.bincount(pairs[0], minlength=n_items).astype(np.float32)


@dataclass
class Holdout:
    """A validation split inside the training period: pairs before ``cut`` train, the users'
    new items at or after it are the targets."""

    cut: int
    train: np.ndarray  # bool mask over the input interactions
    users: np.ndarray  # user rows with history before cut and >= 1 new item after it
    targets: list[np.ndarray]
    exclude: list[np.ndarray]


def holdout(users: np.ndarray, items: np.ndarray, ts: np.ndarray, val_fraction: float = 0.1) -> Holdout:
    cut = int(np.quantile(ts, 1.0 - val_fraction, method="lower"))
    train = ts < cut
    hist: dict[int, set[int]] = {}
    for u, i in zip(users[train].tolist(), items[train].tolist()):
        hist.setdefault(u, set()).add(i)
    new: dict[int, set[int]] = {}
    for u, i in zip(users[~train].tolist(), items[~train].tolist()):
        if u in hist and i not in hist[u]:
            new.setdefault(u, set()).add(i)
    rows = np.asarray(sorted(new), dtype=np.int64)
    return Holdout(
        cut,
        train,
        rows,
        [np.asarray(sorted(new[u]), dtype=np.int64) for u in rows.tolist()],
        [np.asarray(sorted(hist[u]), dtype=np.int64) for u in rows.tolist()],
    )


def choose_window(
    users: np.ndarray,
    items: np.ndarray,
    ts: np.ndarray,
    n_items: int,
    windows_days: Sequence[int | None] = WINDOWS_DAYS,
    k: int = 20,
    val_fraction: float = 0.1,
) -> tuple[int | None, dict[str, float]]:
    """(best window in days or None = all time, validation recall@k per window)."""
    h = holdout(users, items, ts, val_fraction)
    tu, ti, tt = users[h.train], items[h.train], ts[h.train]
    val: dict[str, float] = {}
    best: tuple[float, int | None] | None = None
    for w in windows_days:
        pop = torch.as_tensor(popularity(tu, ti, tt, n_items, None if w is None else h.cut - w * DAY_MS))

        def score(b: np.ndarray, p: torch.Tensor = pop) -> torch.Tensor:
            return p.unsqueeze(0).expand(len(b), -1)

        r = rank_metrics(score, h.users, h.targets, h.exclude, k)[f"recall@{k}"]
        val["all" if w is None else str(w)] = r
        if best is None or r > best[0]:
            best = (r, w)
    assert best is not None
    return best[1], val


def _interaction_matrix(users: np.ndarray, items: np.ndarray, n_users: int, n_items: int) -> Tensor:
    pairs = np.unique(np.stack([users, items]), axis=1)
    idx = torch.as_tensor(pairs, dtype=torch.long)
    return torch.sparse_coo_tensor(idx, torch.ones(idx.shape[1]), (n_users, n_items)).coalesce()


class ItemKNN:
    """Item-item cosine on binary co-interactions (diagonal zeroed)."""

    def __init__(self, users: np.ndarray, items: np.ndarray, n_users: int, n_items: int) -> None:
        x = _interaction_matrix(users, items, n_users, n_items)
        co = torch.sparse.mm(x.t().coalesce(), x).to_dense()  # [n_items, n_items] co-interaction counts
        norm = co.diagonal().clone().sqrt().clamp_min(1e-12)
        self.sim = co / norm.unsqueeze(0) / norm.unsqueeze(1)
        self.sim.fill_diagonal_(0.0)
        self.n_items = n_items

    def score(self, histories: Sequence[np.ndarray]) -> Tensor:
        """[len(histories), n_items]: sum of similarities to each history's items."""
        x = torch.zeros(len(histories), self.n_items)
        for r, h in enumerate(histories):
            if len(h):
                x[r, torch.as_tensor(h, dtype=torch.long)] = 1.0
        return x @ self.sim


@dataclass
class BPRConfig:
    dim: int = 64
    lr: float = 5e-3
    reg: float = 1e-4  # L2 on the batch's embeddings
    batch_size: int = 2048
    max_epochs: int = 40
    patience: int = 3
    k: int = 20
    val_fraction: float = 0.1
    seed: int = 0


@dataclass
class BPRModel:
    user: Tensor  # [n_users, dim]
    item: Tensor  # [n_items, dim]
    known: Tensor  # [n_items] bool: items with an interaction in the training pairs
    epochs: int
    val_curve: list[float]

    def score(self, rows: np.ndarray) -> Tensor:
        s = self.user[torch.as_tensor(rows, dtype=torch.long)] @ self.item.t()
        low = s.min() - 1.0 if s.numel() else torch.tensor(0.0)
        return torch.where(self.known.unsqueeze(0), s, low)


def _fit_bpr(users: np.ndarray, items: np.ndarray, n_users: int, n_items: int, cfg: BPRConfig, epochs: int, val: Holdout | None):
    pairs = np.unique(np.stack([users, items]), axis=1)
    u_all = torch.as_tensor(pairs[0], dtype=torch.long)
    i_all = torch.as_tensor(pairs[1], dtype=torch.long)
    known_items = torch.unique(i_all)
    known = torch.zeros(n_items, dtype=torch.bool)
    known[known_items] = True
    g = torch.Generator().manual_seed(cfg.seed)
    U = torch.nn.Parameter(torch.randn(n_users, cfg.dim, generator=g) * 0.1)
    V = torch.nn.Parameter(torch.randn(n_items, cfg.dim, generator=g) * 0.1)
    opt = torch.optim.Adam([U, V], lr=cfg.lr)
    curve: list[float] = []
    best: tuple[float, int, Tensor, Tensor] | None = None
    for epoch in range(1, epochs + 1):
        order = torch.randperm(len(u_all), generator=g)
        for lo in range(0, len(order), cfg.batch_size):
            b = order[lo : lo + cfg.batch_size]
            u, i = u_all[b], i_all[b]
            j = known_items[torch.randint(len(known_items), (len(b),), generator=g)]
            eu, ei, ej = U[u], V[i], V[j]
            x = (eu * (ei - ej)).sum(1)
            l2 = (eu.pow(2).sum() + ei.pow(2).sum() + ej.pow(2).sum()) / len(b)
            loss = -torch.nn.functional.logsigmoid(x).mean() + cfg.reg * l2
            opt.zero_grad()
            loss.backward()
            opt.step()
        if val is not None:
            model = BPRModel(U.detach().clone(), V.detach().clone(), known, epoch, curve)
            r = rank_metrics(model.score, val.users, val.targets, val.exclude, cfg.k)[f"recall@{cfg.k}"]
            curve.append(r)
            if best is None or r > best[0]:
                best = (r, epoch, model.user, model.item)
            elif epoch - best[1] >= cfg.patience:
                break
    if best is not None:
        return BPRModel(best[2], best[3], known, best[1], curve)
    return BPRModel(U.detach().clone(), V.detach().clone(), known, epochs, curve)


def train_bpr(
    users: np.ndarray, items: np.ndarray, ts: np.ndarray, n_users: int, n_items: int, cfg: BPRConfig | None = None
) -> BPRModel:
    """BPR-MF on the pairs given (all before ``T``); epochs chosen on the validation split."""
    cfg = cfg or BPRConfig()
    h = holdout(users, items, ts, cfg.val_fraction)
    picked = _fit_bpr(users[h.train], items[h.train], n_users, n_items, cfg, cfg.max_epochs, h)
    final = _fit_bpr(users, items, n_users, n_items, cfg, picked.epochs, None)
    final.val_curve = picked.val_curve
    return final
