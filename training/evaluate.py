"""Temporal evaluation of the published vectors on real data, leak-free, with strong baselines.

Protocol (``evaluate_dataset``)
-------------------------------
1. The loader's event stream (``devtools.datasets.online_retail`` / ``amazon``) is read whole
   (no Kafka, no graph DB) and split at time ``T``, the ``split_quantile`` of all interaction
   times.
2. **Nothing from after ``T`` reaches training or the vectors at ``T``** (``catalogue_at``):

   * The graph at ``T`` (``training.dataset.from_events(..., all_products=False)``) holds only
     what existed before ``T``: products upserted before ``T`` (their latest props then) or
     interacted with before ``T``, interactions and relations before ``T``. Brand, Category and
     Attribute nodes therefore aggregate only products of before ``T``. Every model is
     trained on this graph; every baseline sees only interactions before ``T``.
   * **New products** (first product event at or after ``T``) enter the catalogue as they
     appear, each **with its own (first) product event only**: its text and its owned edges
     (brand, category chain, attributes). Its vector is the one the worker would publish for
     the graph at ``T`` plus that single event (``catalogue_vectors``: each new product gets
     private copies of the nodes its event touches, so no new product hears another; exact
     for the default 2-layer model). No relation and no interaction after ``T`` is used.
   * A product that appears after ``T`` only through an interaction (no product event) is
     not in the catalogue: its existence is known only from the test data. Such targets are
     dropped and counted (``targets_not_in_catalogue``).

3. Test targets: for every user with at least one interaction before ``T``, the catalogue
   products they interacted with at or after ``T`` that they had not interacted with before
   (``recommend`` never shows already-bought products, so those are excluded from the ranking
   too). Users seen only after ``T`` are left out.
4. Methods, all in the same run, all ranking the whole catalogue by a score; ties are broken
   in a seeded random order (``training.ranking``), never by catalogue order:

   * ``popularity``: distinct users who interacted with the product before ``T`` (all time).
   * ``popularity_recent``: the same over the last ``w`` days before ``T``; ``w`` among
     1, 3, 7, 14, 30 days and all time, chosen by recall@k on a validation split inside the
     training period (the newest 10 % of the interactions before ``T``; ``training.baselines``).
   * ``item_knn``: item-item cosine on co-interactions before ``T``.
   * ``bpr_mf``: BPR matrix factorisation on the pairs before ``T`` (epochs chosen on the same
     validation split, then retrained on all of them).
   * ``text_only``: the user's profile is the mean of the text embeddings of their products
     before ``T``; score = cosine with the product's text embedding (``h0``).
   * ``untrained``: the published vectors of the seeded, untrained graph encoder
     (the worker's default model): score = ``fused(user) . fused(product)``.
   * ``fused_trained``: the same vectors after ``kg-streamer train`` on the graph at ``T``
     (its own validation split: the newest 10 % of the pairs before ``T``).
   * ``fused_blend`` (**the default method**, ``DEFAULT_METHOD``, what ``kg-streamer
     recommend`` ranks by): ``fused_trained``'s score blended with recent popularity and, for
     products without any interaction before ``T``, a text prior; window and weights chosen
     on that same validation split (``training.blend``).
   * ``fused_trained_align`` (with ``align_weight``): trained with the alignment objective too.
   * ``fused_trained_mean`` / ``fused_blend_mean`` (with ``compare_fusion``): the same training
     with the other fusion of text and structure, plain and blended.
   * ``search_text`` / ``search_aligned``: a text query -- the product text of the user's most
     recent product before ``T`` -- against product vectors: cosine with text embeddings, or
     ``fuse(q, align(q)) . fused(product)`` of the aligned model (what ``kg-streamer search`` does).

5. recall@k and NDCG@k (``training.ranking``) over all targets, and separately over the
   cold-start targets (products without any interaction before ``T``) with the cold-start
   products as the candidates (the "new arrivals" shelf).
6. **Paired bootstrap**: for every method other than the default, the 95 % interval of the
   difference ``method - default`` in recall@k and NDCG@k, resampling the test users (seeded,
   ``bootstrap`` resamples): ``results[method][part]["ci95_vs_default"]``.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from datetime import UTC
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from encoders.graph import GraphEncoder, GraphEncoderConfig, fuse
from encoders.text import product_text
from streamer.contracts.changes import split_key
from training.baselines import DAY_MS, BPRConfig, ItemKNN, choose_window, popularity, train_bpr
from training.blend import Blend, fit_blend, text_part, text_profiles
from training.dataset import EventLog, GraphData, category_chain, encode_texts, from_events, product_structure
from training.ranking import paired_bootstrap_ci, rank_per_user
from training.train import TrainConfig, edge_index, target_pairs, train

log = logging.getLogger(__name__)

DATASETS: dict[str, dict[str, Any]] = {
    # split_quantile: Online Retail's last 20 % of purchases (2011-11-01 .. 12-09); Amazon
    # Magazine's users rate ~1.2 items each, so its test period must be longer (the last 40 %,
    # 2015-05-23 .. 2018-09) to hold ~1,250 returning users; chosen for sample size, before
    # any model was trained.
    "online_retail": {"loader": "online_retail", "path": "online_retail", "split_quantile": 0.8},
    "amazon_magazine": {"loader": "amazon", "path": "amazon_magazine_2018", "split_quantile": 0.6},
}
DEFAULT_METHOD = "fused_blend"
METHODS = (
    "fused_blend",
    "fused_trained",
    "popularity",
    "popularity_recent",
    "item_knn",
    "bpr_mf",
    "text_only",
    "untrained",
)


def load_events(loader: str, path: str | Path) -> EventLog:
    from devtools.datasets import amazon, online_retail

    module = {"online_retail": online_retail, "amazon": amazon}[loader]
    return EventLog.read(module.events(path))


def iso(ms: int) -> str:
    from datetime import datetime

    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@torch.no_grad()
def published_vectors(model: GraphEncoder, graph: GraphData, fusion: str, w: float, device: str = "cpu") -> Tensor:
    """Every node's published vector, as the worker computes it (the plain PyG forward pass)."""
    dev = torch.device(device)
    model = model.to(dev).eval()
    labels = graph.labels
    x = model.type_features(labels).to(dev)
    has = torch.as_tensor(graph.has_text, device=dev)
    x = torch.where(has.unsqueeze(1), graph.features.to(dev), x)
    hs = model.forward_all(x, torch.as_tensor(edge_index(graph), dtype=torch.long, device=dev))
    out = fuse(hs[0], hs[-1], fusion, w).cpu()  # type: ignore[arg-type]
    model.cpu()
    return out


@dataclass
class Catalogue:
    """What exists at ``T``: the graph at ``T`` (its products are columns ``0 .. n_at_t-1``) and
    the new products that appear after ``T`` (columns ``n_at_t ..``, in order of appearance),
    each with its own first product event."""

    graph: GraphData
    products: np.ndarray  # node indices of the graph's products
    new_ids: list[str]
    new_props: list[dict[str, Any]]
    new_ts: list[int]
    new_features: Tensor  # [M, d] text of the new products' own product event
    new_has_text: np.ndarray
    column: dict[str, int]  # "Product:<id>" -> column

    @property
    def n_at_t(self) -> int:
        return len(self.products)

    @property
    def n_items(self) -> int:
        return len(self.products) + len(self.new_ids)


def catalogue_at(log_: EventLog, text_encoder: Any, t_split: int, dim: int = 384) -> Catalogue:
    """The graph at ``T`` (only what existed before it) and the products that appear after it."""
    graph = from_events(log_, text_encoder, t_split, all_products=False, dim=dim)
    products = graph.nodes_of("Product")
    column = {graph.keys[int(p)]: i for i, p in enumerate(products)}
    new: list[tuple[int, str, dict[str, Any]]] = []
    for pid, ups in log_.products.items():
        key = f"Product:{pid}"
        if key in graph.index or ups[0][0] < t_split:
            continue  # existed (or was deleted) before T
        ts, props = ups[0]
        if props.get("op", "upsert") == "delete":
            continue
        new.append((ts, pid, props))
    new.sort(key=lambda x: x[0])
    for i, (_, pid, _) in enumerate(new):
        column[f"Product:{pid}"] = len(products) + i
    if text_encoder is not None:
        dim = text_encoder.dim
    feats, has = encode_texts([f"Product:{pid}" for _, pid, _ in new], [product_text(p) for _, _, p in new], text_encoder, dim)
    return Catalogue(
        graph, products, [pid for _, pid, _ in new], [p for _, _, p in new], [t for t, _, _ in new], feats, has, column
    )


def _new_product_messages(cat: Catalogue) -> tuple[np.ndarray, list[str]]:
    """Extra messages [2, E'] and the labels of the extra nodes (after the graph's N nodes and
    the M new products) such that each new product hears the graph at ``T`` plus its own event:
    every node its event touches is copied privately for it; a copy hears what its original
    hears at ``T`` (a neighbour that has a copy too is heard through the copy) plus the event's
    edges. Nothing is sent to the graph's own nodes, so their vectors stay those at ``T``."""
    g = cat.graph
    n = g.num_nodes
    base = edge_index(g)
    order = np.argsort(base[1], kind="stable")
    src_sorted = base[0][order]
    starts = np.searchsorted(base[1][order], np.arange(n + 1))
    typed = set(zip(g.src.tolist(), g.rel.tolist(), g.dst.tolist()))
    rel_id = {r: i for i, r in enumerate(g.rel_names)}
    srcs: list[np.ndarray] = []
    dsts: list[np.ndarray] = []
    labels: list[str] = []
    next_id = n + len(cat.new_ids)
    for j, (pid, props) in enumerate(zip(cat.new_ids, cat.new_props)):
        p_key, p = f"Product:{pid}", n + j
        edges = [(p_key, rel, dst) for rel, dst in product_structure(props)] + [
            (child, "PARENT", parent) for child, parent in category_chain(props)
        ]
        copies: dict[str, int] = {}  # node key of the event -> its private copy's index

        def local(key: str, p_key: str = p_key, p: int = p, copies: dict[str, int] = copies) -> int:
            nonlocal next_id
            if key == p_key:
                return p
            if key not in copies:
                copies[key] = next_id
                labels.append(split_key(key)[0])
                next_id += 1
            return copies[key]

        seen: set[tuple[str, str, str]] = set()
        es: list[int] = []
        ed: list[int] = []
        for a, rel, b in edges:
            local(a), local(b)
            ia, ib, r = g.index.get(a), g.index.get(b), rel_id.get(rel)
            if (a, rel, b) in seen or (ia is not None and ib is not None and r is not None and (ia, r, ib) in typed):
                continue  # the graph at T already holds this edge: heard below through the original's neighbours
            seen.add((a, rel, b))
            la, lb = local(a), local(b)
            es.append(la)
            ed.append(lb)
            if la != lb:
                es.append(lb)
                ed.append(la)
        orig_to_copy = {g.index[k]: c for k, c in copies.items() if k in g.index}
        for o, c in orig_to_copy.items():
            heard = src_sorted[starts[o] : starts[o + 1]].copy()
            for o2, c2 in orig_to_copy.items():
                heard[heard == o2] = c2
            srcs.append(heard)
            dsts.append(np.full(len(heard), c, dtype=np.int64))
        srcs.append(np.asarray(es, dtype=np.int64))
        dsts.append(np.asarray(ed, dtype=np.int64))
    if not srcs:
        return np.zeros((2, 0), dtype=np.int64), labels
    return np.stack([np.concatenate(srcs), np.concatenate(dsts)]), labels


@torch.no_grad()
def catalogue_vectors(model: GraphEncoder, cat: Catalogue, fusion: str, w: float, device: str = "cpu") -> tuple[Tensor, Tensor]:
    """(published vectors of the graph's nodes at ``T``, of the new products with their own
    event each): one forward pass over the graph at ``T`` plus ``_new_product_messages``.
    Exact for models of up to 2 layers (the default); deeper models would also need the
    neighbours' neighbours copied."""
    if model.num_layers > 2:
        log.warning("new-product vectors are exact for up to 2 layers; this model has %d", model.num_layers)
    dev = torch.device(device)
    model = model.to(dev).eval()
    g = cat.graph
    extra, extra_labels = _new_product_messages(cat)
    x_graph = torch.where(torch.as_tensor(g.has_text).unsqueeze(1), g.features, model.type_features(g.labels).cpu())
    prod_row = model.type_features(["Product"]).cpu()
    x_new = torch.where(torch.as_tensor(cat.new_has_text).unsqueeze(1), cat.new_features, prod_row.expand(len(cat.new_ids), -1))
    x_copy = model.type_features(extra_labels).cpu() if extra_labels else torch.zeros(0, x_graph.shape[1])
    x = torch.cat([x_graph, x_new, x_copy]).to(dev)
    ei = torch.as_tensor(np.concatenate([edge_index(g), extra], axis=1), dtype=torch.long, device=dev)
    hs = model.forward_all(x, ei)
    out = fuse(hs[0], hs[-1], fusion, w).cpu()  # type: ignore[arg-type]
    model.cpu()
    n, m = g.num_nodes, len(cat.new_ids)
    return out[:n], out[n : n + m]


class Split:
    """Users, targets and exclusions of one temporal split, in catalogue-column space."""

    def __init__(self, cat: Catalogue, log_: EventLog, t_split: int, tie_seed: int = 0) -> None:
        graph = cat.graph
        self.cat = cat
        self.graph = graph
        self.products = cat.products
        self.n_items = cat.n_items
        self.tie_seed = tie_seed
        self.t_split = t_split
        self.col = np.full(graph.num_nodes, -1, dtype=np.int64)
        self.col[self.products] = np.arange(len(self.products))
        pairs, _ = target_pairs(graph, [r for r in graph.rel_names if r in _interaction_rels()])
        self.train_pairs = pairs
        hist: dict[int, list[int]] = {}
        last: dict[int, tuple[int, int]] = {}
        for u, p, t in zip(pairs.user.tolist(), pairs.item.tolist(), pairs.ts.tolist()):
            hist.setdefault(u, []).append(p)
            if u not in last or t >= last[u][0]:
                last[u] = (t, p)
        self.popularity = np.bincount(self.col[pairs.item], minlength=self.n_items).astype(np.float32)
        # every interaction before T as (user row, column, time): the baselines' input
        self.user_nodes = graph.nodes_of("User")
        self.user_row = {int(u): i for i, u in enumerate(self.user_nodes)}
        idx = graph.index
        ru: list[int] = []
        ri: list[int] = []
        rt: list[int] = []
        test: dict[int, set[int]] = {}
        later_users: set[str] = set()
        self.targets_not_in_catalogue = 0
        for t, user, pid, _rel in log_.interactions:
            u = idx.get(f"User:{user}")
            c = cat.column.get(f"Product:{pid}")
            if t < t_split:
                assert u is not None and c is not None and c < cat.n_at_t  # the graph at T holds it
                ru.append(self.user_row[u])
                ri.append(c)
                rt.append(t)
                continue
            if u is None or u not in hist:
                later_users.add(user)
                continue
            if c is None:
                self.targets_not_in_catalogue += 1
                continue
            test.setdefault(u, set()).add(c)
        self.before = (np.asarray(ru, dtype=np.int64), np.asarray(ri, dtype=np.int64), np.asarray(rt, dtype=np.int64))
        self.users = np.asarray(sorted(test), dtype=np.int64)
        self.hist = {u: np.asarray(sorted(set(hist[u])), dtype=np.int64) for u in self.users.tolist()}
        self.last_item = {u: last[u][1] for u in self.users.tolist()}
        self.exclude = [self.col[self.hist[u]] for u in self.users.tolist()]
        self.targets = [
            np.asarray(sorted(test[u] - set(ex.tolist())), dtype=np.int64) for u, ex in zip(self.users.tolist(), self.exclude)
        ]
        self.cold = self.popularity == 0  # no interaction before T (the new products and unsold ones)
        self.users_without_history = len(later_users)
        self.per_user: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]] = {}

    def stats(self) -> dict[str, Any]:
        cold_targets = sum(int(self.cold[t].sum()) for t in self.targets)
        return {
            "users": int(sum(1 for t in self.targets if len(t))),
            "targets": int(sum(len(t) for t in self.targets)),
            "cold_start_users": int(sum(1 for t in self.targets if self.cold[t].any())),
            "cold_start_targets": cold_targets,
            "products": int(self.n_items),
            "products_at_t": int(self.cat.n_at_t),
            "new_products": int(len(self.cat.new_ids)),
            "cold_start_products": int(self.cold.sum()),
            "train_pairs": int(len(self.train_pairs)),
            "test_users_without_history": self.users_without_history,
            "targets_not_in_catalogue": self.targets_not_in_catalogue,
        }

    def evaluate(self, name: str, score: Callable[[np.ndarray], Tensor], k: int = 20) -> dict[str, dict[str, float]]:
        """Metrics over all targets and over cold-start targets among cold-start candidates;
        the per-user values are kept in ``per_user[name]`` for the bootstrap."""
        rec, ndcg = rank_per_user(score, self.users, self.targets, self.exclude, k, tie_seed=self.tie_seed)
        self.per_user[name] = {"overall": (rec, ndcg)}
        cold_cols = np.flatnonzero(self.cold)
        remap = np.full(self.n_items, -1, dtype=np.int64)
        remap[cold_cols] = np.arange(len(cold_cols))
        keep = [i for i, t in enumerate(self.targets) if self.cold[t].any()]
        if keep and len(cold_cols):
            users = self.users[keep]
            targets = [remap[self.targets[i][self.cold[self.targets[i]]]] for i in keep]
            cold_t = torch.as_tensor(cold_cols, dtype=torch.long)

            def cold_score(batch: np.ndarray) -> Tensor:
                return score(batch)[:, cold_t]

            crec, cndcg = rank_per_user(
                cold_score, users, targets, [np.zeros(0, np.int64)] * len(users), k, tie_seed=self.tie_seed
            )
        else:
            crec, cndcg = np.zeros(0), np.zeros(0)
        self.per_user[name]["cold_start"] = (crec, cndcg)

        def means(r: np.ndarray, n_: np.ndarray) -> dict[str, float]:
            return {
                f"recall@{k}": float(r.mean()) if len(r) else 0.0,
                f"ndcg@{k}": float(n_.mean()) if len(n_) else 0.0,
                "users": len(r),
            }

        return {"overall": means(rec, ndcg), "cold_start": means(crec, cndcg)}

    def confidence(self, results: dict[str, Any], default: str, k: int = 20, resamples: int = 1000, seed: int = 0) -> None:
        """Adds ``ci95_vs_default`` (paired bootstrap over users of ``method - default``) to
        every method's parts in ``results``."""
        if default not in self.per_user:
            return
        for name, parts in results.items():
            if name == default or name not in self.per_user:
                continue
            for part in ("overall", "cold_start"):
                a, b = self.per_user[name][part], self.per_user[default][part]
                parts[part]["ci95_vs_default"] = {
                    metric: paired_bootstrap_ci(a[j], b[j], resamples, seed)
                    for j, metric in enumerate((f"recall@{k}", f"ndcg@{k}"))
                }


def _interaction_rels() -> tuple[str, ...]:
    from training.dataset import INTERACTION_RELS

    return INTERACTION_RELS


def _vector_scorer(split: Split, user_vecs: Tensor, item_vecs: Tensor) -> Callable[[np.ndarray], Tensor]:
    """``user_vecs`` rows aligned with ``split.users``; ``item_vecs`` rows = catalogue columns."""
    pos = {u: i for i, u in enumerate(split.users.tolist())}

    def score(batch: np.ndarray) -> Tensor:
        return user_vecs[torch.as_tensor([pos[int(u)] for u in batch])] @ item_vecs.t()

    return score


def _blend_scorer(
    split: Split, blend: Blend, user_vecs: Tensor, item_vecs: Tensor, struct_dim: int, fusion: str
) -> Callable[[np.ndarray], Tensor]:
    """``blend.score`` at ``T``: recent popularity from the interactions before ``T`` (any
    interaction in the window), cold = no interaction before ``T``, the user's text profile
    from their products before ``T``."""
    pos = {u: i for i, u in enumerate(split.users.tolist())}
    users, items, ts = split.before
    recent = torch.as_tensor(popularity(users, items, ts, split.n_items, blend.since(split.t_split)))
    cold = torch.as_tensor(split.cold)
    text = text_part(item_vecs, struct_dim, fusion)
    profiles = None if text is None else text_profiles(text, [split.col[split.hist[u]] for u in split.users.tolist()])

    def score(batch: np.ndarray) -> Tensor:
        rows = torch.as_tensor([pos[int(u)] for u in batch])
        tsim = None if profiles is None or text is None else profiles[rows] @ text.t()
        return blend.score(user_vecs[rows] @ item_vecs.t(), tsim, recent, cold)

    return score


def _config_diff(cfg: TrainConfig) -> dict[str, Any]:
    base = asdict(TrainConfig())
    return {k: v for k, v in asdict(cfg).items() if base.get(k) != v and k not in ("progress", "device", "target_rels")}


def _training_summary(res: Any) -> dict[str, Any]:
    m = res.metrics()
    out = {
        key: m[key]
        for key in (
            "version",
            "best_epoch",
            "best_val",
            "init_val",
            "popularity_val",
            "seconds",
            "steps",
            "device",
            "peak_rss_mb",
            "rss_before_mb",
            "peak_gpu_mb",
            "validation",
            "train_pairs",
            "val_pairs",
        )
    }
    out["epochs_run"] = len(m["history"])
    out["history"] = m["history"]
    out["train_config"] = m["train_config"]
    return out


def baseline_results(split: Split, k: int = 20, bpr: BPRConfig | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """(results, details) of ``popularity``, ``popularity_recent``, ``item_knn``, ``bpr_mf``."""
    users, items, ts = split.before
    n_users, n_items = len(split.user_nodes), split.n_items
    t_split = split.t_split
    results: dict[str, Any] = {}
    details: dict[str, Any] = {}

    def constant(v: np.ndarray) -> Callable[[np.ndarray], Tensor]:
        row = torch.as_tensor(v)
        return lambda b: row.unsqueeze(0).expand(len(b), -1)

    results["popularity"] = split.evaluate("popularity", constant(split.popularity), k)
    t0 = time.perf_counter()
    window, val = choose_window(users, items, ts, n_items, k=k)
    since = None if window is None else t_split - window * DAY_MS
    results["popularity_recent"] = split.evaluate("popularity_recent", constant(popularity(users, items, ts, n_items, since)), k)
    details["popularity_recent"] = {
        "window_days": window,
        "validation_recall": val,
        "seconds": round(time.perf_counter() - t0, 1),
    }

    t0 = time.perf_counter()
    knn = ItemKNN(users, items, n_users, n_items)
    hist_cols = {u: split.col[h] for u, h in split.hist.items()}
    results["item_knn"] = split.evaluate("item_knn", lambda b: knn.score([hist_cols[int(u)] for u in b]), k)
    details["item_knn"] = {"seconds": round(time.perf_counter() - t0, 1)}

    t0 = time.perf_counter()
    cfg = bpr or BPRConfig(k=k)
    mf = train_bpr(users, items, ts, n_users, n_items, cfg)
    rows = split.user_row
    results["bpr_mf"] = split.evaluate("bpr_mf", lambda b: mf.score(np.asarray([rows[int(u)] for u in b])), k)
    details["bpr_mf"] = {
        "config": asdict(cfg),
        "epochs": mf.epochs,
        "validation_recall": [round(x, 4) for x in mf.val_curve],
        "seconds": round(time.perf_counter() - t0, 1),
    }
    return results, details


def evaluate_dataset(
    name: str,
    log_: EventLog,
    text_encoder: Any,
    configs: list[TrainConfig],
    model_cfg: GraphEncoderConfig,
    split_quantile: float,
    k: int = 20,
    align_weight: float = 0.0,
    eval_device: str = "cpu",
    cache_path: Path | None = None,
    deadline: float | None = None,
    bootstrap: int = 1000,
    seed: int = 0,
    compare_fusion: bool = False,
) -> dict[str, Any]:
    """One data set, every method in the same run. ``configs``: training configurations to
    choose from by validation recall@k (the first is the default); ``compare_fusion``: also
    train the chosen config with the other fusion (``concat``/``mean``) and report it plain
    and blended (``fused_trained_<fusion>``, ``fused_blend_<fusion>``); ``deadline``
    (``time.monotonic()``) stops trying further configs. ``seed``: tie order and bootstrap."""
    cfg = configs[0]
    t0 = time.perf_counter()
    times = log_.interaction_times()
    t_split = int(np.quantile(times, split_quantile, method="lower"))
    cat = catalogue_at(log_, text_encoder, t_split, dim=model_cfg.in_dim)
    graph = cat.graph
    if cache_path is not None and hasattr(text_encoder, "save_cache"):
        text_encoder.save_cache(cache_path)
    text_seconds = time.perf_counter() - t0
    split = Split(cat, log_, t_split, tie_seed=seed)
    log.info("%s: split at %s, graph %s, split %s", name, iso(t_split), graph.summary(), split.stats())
    users_t = torch.as_tensor(split.users, dtype=torch.long)
    training: dict[str, Any] = {}

    results, baselines = baseline_results(split, k)
    log.info("%s baselines: %s", name, {m: r["overall"] for m, r in results.items()})

    def item_vectors(model: GraphEncoder, c: TrainConfig) -> tuple[Tensor, Tensor]:
        at_t, new = catalogue_vectors(model, cat, c.fusion, c.fusion_text_weight, eval_device)
        return at_t[users_t], torch.cat([at_t[torch.as_tensor(split.products, dtype=torch.long)], new])

    # text only: mean of the text embeddings of the user's history
    model0 = GraphEncoder(model_cfg)
    h0 = torch.where(torch.as_tensor(graph.has_text).unsqueeze(1), graph.features, model0.type_features(graph.labels))
    prod_row = model0.type_features(["Product"])
    h0_new = torch.where(torch.as_tensor(cat.new_has_text).unsqueeze(1), cat.new_features, prod_row.expand(len(cat.new_ids), -1))
    t_items = F.normalize(torch.cat([h0[torch.as_tensor(split.products, dtype=torch.long)], h0_new]), dim=1)
    profiles = torch.stack([F.normalize(h0[torch.as_tensor(split.hist[u])], dim=1).mean(0) for u in split.users.tolist()])
    results["text_only"] = split.evaluate("text_only", _vector_scorer(split, F.normalize(profiles, dim=1), t_items), k)

    # untrained (seeded) graph encoder = the worker's default model
    uv, iv = item_vectors(model0, cfg)
    results["untrained"] = split.evaluate("untrained", _vector_scorer(split, uv, iv), k)

    # trained: every candidate config, the one with the best *validation* recall is reported
    best = None
    sweep = []
    for i, c in enumerate(configs):
        if deadline is not None and i > 0 and time.monotonic() > deadline:
            log.warning("%s: time budget spent, %d of %d configs tried", name, i, len(configs))
            break
        res = train(graph, replace(c, align_weight=0.0), model_cfg)
        uv, iv = item_vectors(res.model, c)
        test = split.evaluate(f"_sweep{i}", _vector_scorer(split, uv, iv), k)
        entry = {
            "config": _config_diff(c),
            "val": res.best_val,
            "test": test,
            "seconds": round(res.seconds, 1),
            "best_epoch": res.best_epoch,
            "epochs_run": len(res.history),
        }
        sweep.append(entry)
        log.info("%s config %d %s: val %s test %s", name, i, entry["config"], res.best_val, test["overall"])
        if best is None or res.best_val.get(f"recall@{k}", 0.0) > best[0].best_val.get(f"recall@{k}", 0.0):
            best = (res, test, c, i)
    assert best is not None
    res, test, cfg, best_i = best
    results["fused_trained"] = test
    split.per_user["fused_trained"] = split.per_user[f"_sweep{best_i}"]
    training["fused_trained"] = _training_summary(res)
    # the default: the same vectors ranked with recent popularity and the cold-start text prior,
    # chosen on the training's validation split (training/blend.py)
    blend = fit_blend(res.model, graph, cfg, k)
    uv, iv = item_vectors(res.model, cfg)
    results["fused_blend"] = split.evaluate("fused_blend", _blend_scorer(split, blend, uv, iv, model_cfg.out, cfg.fusion), k)
    training["fused_blend"] = blend.to_dict()
    aligned_model = None
    if align_weight > 0:
        res_a = train(graph, replace(cfg, align_weight=align_weight), model_cfg)
        auv, aiv = item_vectors(res_a.model, cfg)
        results["fused_trained_align"] = split.evaluate("fused_trained_align", _vector_scorer(split, auv, aiv), k)
        training["fused_trained_align"] = _training_summary(res_a)
        aligned_model = res_a.model

    if compare_fusion:  # the same training with the other fusion of text and structure
        other: Literal["concat", "mean"] = "mean" if cfg.fusion == "concat" else "concat"
        c_other = replace(cfg, fusion=other, align_weight=0.0)
        # mean fusion adds the two parts, so the graph model's output is as wide as the text
        m_other = replace(model_cfg, out=model_cfg.in_dim) if other == "mean" else model_cfg
        res_f = train(graph, c_other, m_other)
        fuv, fiv = item_vectors(res_f.model, c_other)
        results[f"fused_trained_{other}"] = split.evaluate(f"fused_trained_{other}", _vector_scorer(split, fuv, fiv), k)
        blend_f = fit_blend(res_f.model, graph, c_other, k)
        results[f"fused_blend_{other}"] = split.evaluate(
            f"fused_blend_{other}", _blend_scorer(split, blend_f, fuv, fiv, m_other.out, other), k
        )
        training[f"fused_trained_{other}"] = _training_summary(res_f)
        training[f"fused_blend_{other}"] = blend_f.to_dict()

    # text queries: the text of the user's most recent product before T
    last = torch.as_tensor([split.last_item[u] for u in split.users.tolist()], dtype=torch.long)
    q = F.normalize(h0[last], dim=1)
    results["search_text"] = split.evaluate("search_text", _vector_scorer(split, q, t_items), k)
    if aligned_model is not None:
        with torch.no_grad():
            qv = fuse(q, aligned_model.align_text(q), cfg.fusion, cfg.fusion_text_weight)
        results["search_aligned"] = split.evaluate("search_aligned", _vector_scorer(split, qv, aiv), k)

    split.confidence(results, DEFAULT_METHOD, k, bootstrap, seed)
    return {
        "dataset": name,
        "split_time": iso(t_split),
        "split_quantile": split_quantile,
        "first_event": iso(int(times.min())),
        "last_event": iso(int(times.max())),
        "graph": graph.summary(),
        "split": split.stats(),
        "default_method": DEFAULT_METHOD,
        "tie_seed": seed,
        "bootstrap_resamples": bootstrap,
        "results": results,
        "baselines": baselines,
        "training": training,
        "sweep": sweep,
        "model_config": json.loads(model_cfg.to_json()),
        "graph_and_text_seconds": round(text_seconds, 1),
        "seconds": round(time.perf_counter() - t0, 1),
    }


class CacheOnlyText:
    """Text embeddings served from a ``TextEncoder`` cache file alone (no model loaded): for a
    machine without the text model. A text missing from the cache is an error."""

    def __init__(self, path: str | Path) -> None:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            self.model_id = (f.metadata() or {})["model_id"]
            keys, vectors = f.get_tensor("keys"), f.get_tensor("vectors")
        self.dim = int(vectors.shape[1])
        self._cache = {k.tobytes(): v for k, v in zip(keys.numpy(), vectors)}
        self.encoded_count = 0

    def encode(self, texts: list[str]) -> Tensor:
        import hashlib

        keys = [hashlib.sha256(f"{self.model_id}\0{t}".encode()).digest() for t in texts]
        missing = sum(1 for key in keys if key not in self._cache)
        if missing:
            raise KeyError(f"{missing} texts are not in the text cache")
        return torch.stack([self._cache[key] for key in keys]) if keys else torch.zeros(0, self.dim)


def run(
    datasets: list[str],
    settings: Any,
    configs: TrainConfig | list[TrainConfig],
    align_weight: float,
    out: Path | None,
    paths: dict[str, Path] | None = None,
    k: int = 20,
    text_cache: Path | None = None,
    eval_device: str = "cpu",
    budget_s: float | None = None,
    compare_fusion: bool = False,
) -> dict[str, Any]:
    """Evaluate the named data sets; write the full report to ``out`` (JSON) when given (after
    each data set). ``text_cache``: serve product text from this cache file only (no model)."""
    if isinstance(configs, TrainConfig):
        configs = [configs]
    cache = settings.local_dir("model") / "text_cache.safetensors"
    if text_cache is not None:
        text: Any = CacheOnlyText(text_cache)
        cache_out = None
    else:
        from encoders.text import TextEncoder

        text = TextEncoder(settings.text_model, device=settings.device)
        if cache.exists():
            text.load_cache(cache)
        cache_out = cache
    model_cfg = GraphEncoderConfig(
        in_dim=text.dim, hidden=settings.gnn_hidden, out=settings.gnn_out, layers=settings.gnn_layers, seed=settings.gnn_seed
    )
    report: dict[str, Any] = {
        "text_model": text.model_id,
        "fusion": settings.fusion,
        "fusion_text_weight": settings.fusion_text_weight,
        "datasets": {},
    }
    start = time.monotonic()
    for i, name in enumerate(datasets):
        spec = DATASETS[name]
        path = (paths or {}).get(name, settings.data_dir / spec["path"])
        deadline = None
        if budget_s is not None:  # an even share of what is left for each remaining data set
            deadline = time.monotonic() + (budget_s - (time.monotonic() - start)) / (len(datasets) - i) * 0.6
        t0 = time.perf_counter()
        events = load_events(spec["loader"], path)
        load_s = time.perf_counter() - t0
        t1 = time.perf_counter()
        before = text.encoded_count
        rep = evaluate_dataset(
            name,
            events,
            text,
            configs,
            model_cfg,
            spec["split_quantile"],
            k,
            align_weight,
            eval_device=eval_device,
            cache_path=cache_out,
            deadline=deadline,
            compare_fusion=compare_fusion,
        )
        rep["load_seconds"] = round(load_s, 1)
        rep["texts_encoded"] = text.encoded_count - before
        rep["path"] = os.path.relpath(path)  # relative: reports are committed (bench/results/)
        rep["wall_seconds"] = round(time.perf_counter() - t1, 1)
        report["datasets"][name] = rep
        if out is not None:
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(report, indent=2) + "\n")
    return report


def quality_json(report: dict[str, Any], k: int = 20) -> dict[str, Any]:
    """``{"default_method": name, dataset: {method: {"recall@20": x, "ndcg@20": y,
    "ci95_vs_default": {metric: [lo, hi]}}}}``; cold start as ``<dataset>/cold_start``. The
    interval is the paired bootstrap 95 % interval of ``method - default`` (absent for the
    default method itself)."""
    out: dict[str, Any] = {"default_method": DEFAULT_METHOD}
    for name, rep in report["datasets"].items():
        for part, key in (("overall", name), ("cold_start", f"{name}/cold_start")):
            out[key] = {}
            for m, r in rep["results"].items():
                entry: dict[str, Any] = {
                    f"recall@{k}": round(r[part][f"recall@{k}"], 4),
                    f"ndcg@{k}": round(r[part][f"ndcg@{k}"], 4),
                }
                ci = r[part].get("ci95_vs_default")
                if ci:
                    entry["ci95_vs_default"] = {metric: [round(v["lo"], 4), round(v["hi"], 4)] for metric, v in ci.items()}
                out[key][m] = entry
    return out


# the tables' row order: the default, the plain model, its variants, the baselines, then search
VARIANTS = ["fused_trained_align", "fused_blend_mean", "fused_trained_mean", "fused_blend_concat", "fused_trained_concat"]
ORDER = [*METHODS[:2], *VARIANTS, *METHODS[2:], "search_text", "search_aligned"]


def _with_ci(part: dict[str, Any], metric: str) -> str:
    ci = part.get("ci95_vs_default", {}).get(metric)
    value = f"{part[metric]:.4f}"
    return value if ci is None else f"{value} ({ci['lo']:+.3f}, {ci['hi']:+.3f})"


def markdown_table(report: dict[str, Any], k: int = 20) -> str:
    """Per data set: one row per method; in brackets the 95 % paired bootstrap interval of the
    difference to the default method."""
    lines = []
    for name, rep in report["datasets"].items():
        s = rep["split"]
        window = rep.get("baselines", {}).get("popularity_recent", {}).get("window_days", "n/a")
        lines.append(
            f"**{name}** (split at {rep['split_time']}; {s['users']} users, {s['targets']} targets; "
            f"cold start: {s['cold_start_users']} users, {s['cold_start_targets']} targets among "
            f"{s['cold_start_products']} products without history, {s.get('new_products', 'n/a')} of them new after T; "
            f"recent-popularity window chosen on validation: {window if window is not None else 'all'} days; "
            f"default method {rep.get('default_method', DEFAULT_METHOD)}, brackets: 95 % CI of the difference to it)\n"
        )
        lines.append(f"| method | recall@{k} | NDCG@{k} | cold-start recall@{k} | cold-start NDCG@{k} |")
        lines.append("|---|---|---|---|---|")
        for m in [m for m in ORDER if m in rep["results"]]:
            r = rep["results"][m]
            cells = [_with_ci(r[part], f"{metric}@{k}") for part in ("overall", "cold_start") for metric in ("recall", "ndcg")]
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines).rstrip()
