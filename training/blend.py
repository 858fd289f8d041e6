"""The default ranking policy: the trained model's score, blended with recent popularity and,
for products nobody has taken yet, a text prior (issue 14; docs/quality.md).

For a user ``u`` and a product ``p`` (published vectors are unit rows, so ``u . p`` is a cosine):

    score(u, p) = (u . p) / dot_scale
                + beta * log1p(recent(p))
                + [p has no interaction] * (gamma * (text(u) . text(p) - text_mean) / text_scale + cold_offset)

* ``recent(p)``: distinct users who took ``p`` in the last ``window_days`` (all time: ``None``)
  before "now" (the split time in the evaluation; the newest interaction in the graph when
  serving, so that a replay of old data ranks as it did then).
* ``text(p)``: the text part of ``p``'s published vector (concat fusion: its first
  ``dim - gnn_out`` columns, renormalised = the unit text embedding); ``text(u)``: the
  normalised mean of the text of the user's products. Only products without any interaction
  get this prior: the trained model pushes them down (it learnt that products without buyers
  are not bought), and their text is all there is to go on. With ``mean`` fusion the text part
  cannot be recovered from the vector, so ``gamma`` is 0.
* ``dot_scale``, ``text_scale``, ``text_mean``: the standard deviations of the two cosines
  (and the text cosines' mean) over the validation users x products, so that ``beta`` and
  ``gamma`` are on comparable scales. The text prior is centred, so it reorders the products
  without interactions among themselves; where they stand against the others is
  ``cold_offset``'s alone.

``fit_blend`` chooses everything on the training's own validation split (``train.
split_validation``: the newest ``val_fraction`` of the pairs, their edges removed from the
graph) with the trained model's vectors on that graph, never on test data: first ``gamma`` by
recall@k of the validation's cold-start targets among the cold-start products (the "new
arrivals" shelf, where ``cold_offset`` does not matter), then ``window_days`` and ``beta``, then
``cold_offset``, by recall@k over all validation targets (NDCG@k breaks ties of recall).
Validation popularity counts each pair at its first time (what the pairs carry); the
evaluation and the serving path count any interaction in the window (``last_ts``). With no
interaction times (a replica's graph), only all-time popularity is tried.

``beta = gamma = cold_offset = 0`` is the plain model (in every grid, so validation can
choose it).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from training.baselines import DAY_MS, WINDOWS_DAYS, popularity
from training.ranking import rank_metrics

log = logging.getLogger(__name__)

BETAS: tuple[float, ...] = (0.0, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0)
GAMMAS: tuple[float, ...] = (0.0, 0.25, 0.5, 1.0, 2.0, 4.0)
COLD_OFFSETS: tuple[float, ...] = (0.0, -4.0, -2.0, -1.0, -0.5, 0.5, 1.0, 2.0)
# fit_blend scores validation users x products whole (a few such matrices at once): at most this
# many entries, by sampling the users (seeded), so that a large catalogue cannot exhaust memory
MAX_SCORE_ENTRIES = 20_000_000


@dataclass
class Blend:
    window_days: int | None = None
    beta: float = 0.0
    gamma: float = 0.0
    dot_scale: float = 1.0
    text_scale: float = 1.0
    text_mean: float = 0.0
    cold_offset: float = 0.0
    struct_dim: int = 0  # the graph model's output width: the vector's last struct_dim columns (0: unknown)
    validation: dict[str, Any] = field(default_factory=dict)

    @property
    def plain(self) -> bool:
        return self.beta == 0.0 and self.gamma == 0.0 and self.cold_offset == 0.0

    def score(self, dot: Tensor, text: Tensor | None, recent: Tensor, cold: Tensor) -> Tensor:
        """[users, products] blended scores from the model's cosines ``dot``, the text cosines
        ``text`` (None: no text prior), ``recent`` popularity [products] and ``cold`` [products]
        (bool: no interaction at all)."""
        s = dot / self.dot_scale + self.beta * torch.log1p(recent.float()).unsqueeze(0)
        prior = torch.full_like(s, self.cold_offset)
        if text is not None and self.gamma:
            prior = prior + (self.gamma / self.text_scale) * (text - self.text_mean)
        return s + prior * cold.float().unsqueeze(0)

    def since(self, now_ms: int) -> int | None:
        return None if self.window_days is None else now_ms - self.window_days * DAY_MS

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Blend:
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


def text_part(vectors: Tensor, struct_dim: int, fusion: str) -> Tensor | None:
    """The unit text embeddings inside concat-fused vectors (None for ``mean`` fusion)."""
    if fusion != "concat":
        return None
    return F.normalize(vectors[:, : vectors.shape[1] - struct_dim], dim=1)


def text_profiles(text: Tensor, histories: Sequence[np.ndarray]) -> Tensor:
    """Unit mean of each history's rows of ``text``."""
    return F.normalize(torch.stack([text[torch.as_tensor(h, dtype=torch.long)].mean(0) for h in histories]), dim=1)


def load_blend(checkpoint: str | Path | None) -> Blend | None:
    """The blend saved with a checkpoint (``<name>.metrics.json``'s ``blend``), if any."""
    doc = checkpoint_metrics(checkpoint).get("blend")
    return Blend.from_dict(doc) if doc else None


def checkpoint_metrics(checkpoint: str | Path | None) -> dict[str, Any]:
    """A checkpoint's ``<name>.metrics.json`` (``train.save``), or {} when there is none."""
    from training.train import metrics_path

    path = None if checkpoint is None else metrics_path(checkpoint)
    return json.loads(path.read_text()) if path is not None and path.exists() else {}


def _metrics(scores: Tensor, targets: list[np.ndarray], exclude: list[np.ndarray], k: int) -> tuple[float, float]:
    """(recall@k, NDCG@k): compared as a pair, so NDCG breaks ties of recall."""
    users = np.arange(scores.shape[0])
    m = rank_metrics(lambda b: scores[torch.as_tensor(b, dtype=torch.long)], users, targets, exclude, k)
    return m[f"recall@{k}"], m[f"ndcg@{k}"]


@torch.no_grad()
def fit_blend(model: Any, graph: Any, cfg: Any, k: int = 20) -> Blend:
    """Choose the blend on the training's validation split (module docstring)."""
    from training.evaluate import published_vectors
    from training.train import split_validation

    tr_graph, tr, va, _how = split_validation(graph, cfg)
    products = graph.nodes_of("Product")
    col = np.full(graph.num_nodes, -1, dtype=np.int64)
    col[products] = np.arange(len(products))
    hist: dict[int, set[int]] = {}
    for u, p in zip(tr.user.tolist(), tr.item.tolist()):
        hist.setdefault(u, set()).add(int(col[p]))
    new: dict[int, set[int]] = {}
    for u, p in zip(va.user.tolist(), va.item.tolist()):
        c = int(col[p])
        if u in hist and c not in hist[u]:
            new.setdefault(u, set()).add(c)
    if not new:
        return Blend(validation={"users": 0})
    users = np.asarray(sorted(new), dtype=np.int64)
    max_users = min(cfg.max_val_users, max(100, MAX_SCORE_ENTRIES // max(1, len(products))))
    if len(users) > max_users:
        users = np.sort(np.random.default_rng(cfg.seed).choice(users, max_users, replace=False))
    targets = [np.asarray(sorted(new[int(u)]), dtype=np.int64) for u in users]
    exclude = [np.asarray(sorted(hist[int(u)]), dtype=np.int64) for u in users]

    vec = published_vectors(model, tr_graph, cfg.fusion, cfg.fusion_text_weight)
    uv, pv = vec[torch.as_tensor(users)], vec[torch.as_tensor(products)]
    dot = uv @ pv.t()
    text = text_part(torch.cat([uv, pv]), model.config.out, cfg.fusion)
    tsim = None
    if text is not None:
        tp = text[len(users) :]
        tsim = text_profiles(tp, exclude) @ tp.t()
    tr_cols = col[tr.item]
    cold = torch.as_tensor(np.bincount(tr_cols, minlength=len(products)) == 0)
    blend = Blend(dot_scale=float(dot.std()) or 1.0, struct_dim=int(model.config.out))
    if tsim is not None:
        blend.text_scale, blend.text_mean = float(tsim.std()) or 1.0, float(tsim.mean())
    zeros = torch.zeros(len(products))

    # gamma: the cold-start shelf (the validation's cold targets among the cold products)
    gamma_val: dict[str, list[float]] = {}
    cold_cols = np.flatnonzero(cold.numpy())
    keep = [i for i, t in enumerate(targets) if cold[t].any()]
    if tsim is not None and keep and len(cold_cols):
        remap = np.full(len(products), -1, dtype=np.int64)
        remap[cold_cols] = np.arange(len(cold_cols))
        ct = [remap[targets[i][cold.numpy()[targets[i]]]] for i in keep]
        sub_dot, sub_text = dot[keep][:, cold_cols], tsim[keep][:, cold_cols]
        ones = torch.ones(len(cold_cols), dtype=torch.bool)
        best: tuple[tuple[float, float], float] = ((-1.0, -1.0), 0.0)
        for g in GAMMAS:
            b = replace(blend, gamma=g)
            m = _metrics(b.score(sub_dot, sub_text, zeros[: len(cold_cols)], ones), ct, [np.zeros(0, np.int64)] * len(keep), k)
            gamma_val[str(g)] = [round(x, 5) for x in m]
            if m > best[0]:
                best = (m, g)
        blend.gamma = best[1]

    # window and beta: every validation target, with that gamma
    have_times = bool((tr.ts >= 0).all())
    cut = int(va.ts.min()) if have_times else 0
    windows = WINDOWS_DAYS if have_times else (None,)
    tr_users = tr.user
    overall: dict[str, list[float]] = {}
    best_o: tuple[tuple[float, float], int | None, float] = ((-1.0, -1.0), None, 0.0)
    recents = {
        w: torch.as_tensor(popularity(tr_users, tr_cols, tr.ts, len(products), None if w is None else cut - w * DAY_MS))
        for w in windows
    }
    for w in windows:
        for beta in BETAS:
            m = _metrics(replace(blend, window_days=w, beta=beta).score(dot, tsim, recents[w], cold), targets, exclude, k)
            overall[f"{'all' if w is None else w}/{beta}"] = [round(x, 5) for x in m]
            if m > best_o[0]:
                best_o = (m, w, beta)
    blend.window_days, blend.beta = best_o[1], best_o[2]
    offsets: dict[str, list[float]] = {}
    best_c: tuple[tuple[float, float], float] = ((-1.0, -1.0), 0.0)
    if bool(cold.any()):
        for offset in COLD_OFFSETS:
            b = replace(blend, cold_offset=offset)
            m = _metrics(b.score(dot, tsim, recents[blend.window_days], cold), targets, exclude, k)
            offsets[str(offset)] = [round(x, 5) for x in m]
            if m > best_c[0]:
                best_c = (m, offset)
        blend.cold_offset = best_c[1]
    blend.validation = {
        "users": len(users),
        "cold_start_users": len(keep),
        f"cold_start_recall_ndcg@{k}_by_gamma": gamma_val,
        f"recall_ndcg@{k}_by_window_and_beta": overall,
        f"recall_ndcg@{k}_by_cold_offset": offsets,
        f"recall_ndcg@{k}": [round(x, 5) for x in max(best_o[0], best_c[0])],
    }
    log.info(
        "blend on validation: window %s days, beta %s, gamma %s, cold offset %s (recall@%d %.4f)",
        blend.window_days,
        blend.beta,
        blend.gamma,
        blend.cold_offset,
        k,
        max(best_o[0], best_c[0])[0],
    )
    return blend
