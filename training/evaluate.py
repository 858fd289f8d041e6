"""Temporal evaluation of the published vectors on real data .

Protocol (``evaluate_dataset``)
-------------------------------
1. The loader's event stream (``devtools.datasets.online_retail`` / ``amazon``) is read whole
   (no Kafka, no graph DB) and split at time ``T``, the ``split_quantile`` of all interaction
   times.
2. The graph at ``T`` (``training.dataset.from_events``): every interaction and relation
   before ``T``; every product of the stream with its metadata (text, brand, categories,
   attributes) -- products first seen after ``T`` are in the catalogue with their metadata
   but without any history: the **cold-start** products.
3. Test targets: for every user with at least one interaction before ``T``, the products they
   interacted with at or after ``T`` that they had not interacted with before (``recommend``
   never shows already-bought products, so those are excluded from the ranking too).
   Users seen only after ``T`` cannot be personalised by any method here and are left out.
4. Methods, all in the same run, all ranking the whole catalogue by a score:

   * ``popularity``: number of users who interacted with the product before ``T``.
   * ``text_only``: the user's profile is the mean of the text embeddings of their products
     before ``T``; score = cosine with the product's text embedding (``h0``).
   * ``untrained``: the published vectors of the seeded, untrained graph encoder
     (the worker's default model): score = ``fused(user) . fused(product)``.
   * ``fused_trained``: the same vectors after ``kg-streamer train`` on the graph at ``T``
     (its own validation split: the newest 10 % of the pairs before ``T``).
   * ``fused_trained_align`` (with ``align_weight``): trained with the alignment objective too.
   * ``search_text`` / ``search_aligned``: a text query -- the product text of the user's most
     recent product before ``T`` -- against product vectors: cosine with text embeddings, or
     ``fuse(q, align(q)) . fused(product)`` of the aligned model (what ``kg-streamer search`` does).

5. recall@20 and NDCG@20 (``training.ranking``) over all targets, and separately over
   the cold-start targets with the cold-start products as the candidates (the "new arrivals"
   shelf; every method ranks only those, so popularity has nothing to go on there and ranks
   them in catalogue order).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, replace
from datetime import UTC
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from encoders.graph import GraphEncoder, GraphEncoderConfig, fuse
from training.dataset import EventLog, GraphData, from_events
from training.ranking import rank_metrics
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
METHODS = ("fused_trained", "popularity", "text_only", "untrained")


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


class Split:
    """Users, targets and exclusions of one temporal split, in product-column space."""

    def __init__(self, graph: GraphData, log_: EventLog, t_split: int) -> None:
        self.graph = graph
        self.products = graph.nodes_of("Product")
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
        self.popularity = np.bincount(self.col[pairs.item], minlength=len(self.products)).astype(np.float32)
        idx = graph.index
        test: dict[int, set[int]] = {}
        later_users: set[str] = set()
        for t, user, pid, _rel in log_.interactions:
            if t < t_split:
                continue
            u = idx.get(f"User:{user}")
            if u is None or u not in hist:
                later_users.add(user)
                continue
            p = idx.get(f"Product:{pid}")
            if p is None:
                continue
            test.setdefault(u, set()).add(p)
        self.users = np.asarray(sorted(test), dtype=np.int64)
        self.hist = {u: np.asarray(sorted(set(hist[u])), dtype=np.int64) for u in self.users.tolist()}
        self.last_item = {u: last[u][1] for u in self.users.tolist()}
        self.targets = [self.col[np.asarray(sorted(test[u] - set(hist[u])), dtype=np.int64)] for u in self.users.tolist()]
        self.exclude = [self.col[self.hist[u]] for u in self.users.tolist()]
        self.cold = self.popularity == 0  # no interaction before T
        self.users_without_history = len(later_users)

    def stats(self) -> dict[str, Any]:
        cold_targets = sum(int(self.cold[t].sum()) for t in self.targets)
        return {
            "users": int(sum(1 for t in self.targets if len(t))),
            "targets": int(sum(len(t) for t in self.targets)),
            "cold_start_users": int(sum(1 for t in self.targets if self.cold[t].any())),
            "cold_start_targets": cold_targets,
            "products": int(len(self.products)),
            "cold_start_products": int(self.cold.sum()),
            "train_pairs": int(len(self.train_pairs)),
            "test_users_without_history": self.users_without_history,
        }

    def evaluate(self, score: Callable[[np.ndarray], Tensor], k: int = 20) -> dict[str, dict[str, float]]:
        """Metrics over all targets and over cold-start targets among cold-start candidates."""
        pos = {u: i for i, u in enumerate(self.users.tolist())}
        overall = rank_metrics(score, self.users, self.targets, self.exclude, k)
        cold_cols = np.flatnonzero(self.cold)
        remap = np.full(len(self.products), -1, dtype=np.int64)
        remap[cold_cols] = np.arange(len(cold_cols))
        keep = [i for i, t in enumerate(self.targets) if self.cold[t].any()]
        if keep and len(cold_cols):
            users = self.users[keep]
            targets = [remap[self.targets[i][self.cold[self.targets[i]]]] for i in keep]
            cold_t = torch.as_tensor(cold_cols, dtype=torch.long)

            def cold_score(batch: np.ndarray) -> Tensor:
                return score(batch)[:, cold_t]

            cold = rank_metrics(cold_score, users, targets, [np.zeros(0, np.int64)] * len(users), k)
        else:
            cold = {f"recall@{k}": 0.0, f"ndcg@{k}": 0.0, "users": 0}
        del pos
        return {"overall": overall, "cold_start": cold}


def _interaction_rels() -> tuple[str, ...]:
    from training.dataset import INTERACTION_RELS

    return INTERACTION_RELS


def _vector_scorer(split: Split, user_vecs: dict[int, Tensor] | Tensor, item_vecs: Tensor) -> Callable[[np.ndarray], Tensor]:
    if isinstance(user_vecs, Tensor):  # rows aligned with split.users
        pos = {u: i for i, u in enumerate(split.users.tolist())}

        def score(batch: np.ndarray) -> Tensor:
            return user_vecs[torch.as_tensor([pos[int(u)] for u in batch])] @ item_vecs.t()

        return score
    raise TypeError("user_vecs")


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
) -> dict[str, Any]:
    """One data set, every method in the same run. ``configs``: training configurations to
    choose from by validation recall@k (the first is the default); ``deadline``
    (``time.monotonic()``) stops trying further configs."""
    cfg = configs[0]
    t0 = time.perf_counter()
    times = log_.interaction_times()
    t_split = int(np.quantile(times, split_quantile, method="lower"))
    graph = from_events(log_, text_encoder, t_split)
    if cache_path is not None and hasattr(text_encoder, "save_cache"):
        text_encoder.save_cache(cache_path)
    text_seconds = time.perf_counter() - t0
    split = Split(graph, log_, t_split)
    log.info("%s: split at %s, graph %s, split %s", name, iso(t_split), graph.summary(), split.stats())
    products_t = torch.as_tensor(split.products, dtype=torch.long)
    users_t = torch.as_tensor(split.users, dtype=torch.long)
    results: dict[str, dict[str, dict[str, float]]] = {}
    training: dict[str, Any] = {}

    # popularity
    pop = torch.as_tensor(split.popularity)
    results["popularity"] = split.evaluate(lambda b: pop.unsqueeze(0).expand(len(b), -1), k)

    # text only: mean of the text embeddings of the user's history
    model0 = GraphEncoder(model_cfg)
    h0 = torch.where(torch.as_tensor(graph.has_text).unsqueeze(1), graph.features, model0.type_features(graph.labels))
    t_items = F.normalize(h0[products_t], dim=1)
    profiles = torch.stack([F.normalize(h0[torch.as_tensor(split.hist[u])], dim=1).mean(0) for u in split.users.tolist()])
    results["text_only"] = split.evaluate(_vector_scorer(split, F.normalize(profiles, dim=1), t_items), k)

    # untrained (seeded) graph encoder = the worker's default model
    vec = published_vectors(model0, graph, cfg.fusion, cfg.fusion_text_weight, eval_device)
    results["untrained"] = split.evaluate(_vector_scorer(split, vec[users_t], vec[products_t]), k)

    # trained: every candidate config, the one with the best *validation* recall is reported
    best = None
    sweep = []
    for i, c in enumerate(configs):
        if deadline is not None and i > 0 and time.monotonic() > deadline:
            log.warning("%s: time budget spent, %d of %d configs tried", name, i, len(configs))
            break
        res = train(graph, replace(c, align_weight=0.0), model_cfg)
        vec = published_vectors(res.model, graph, c.fusion, c.fusion_text_weight, eval_device)
        test = split.evaluate(_vector_scorer(split, vec[users_t], vec[products_t]), k)
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
            best = (res, test, c)
    assert best is not None
    res, test, cfg = best
    results["fused_trained"] = test
    training["fused_trained"] = _training_summary(res)
    aligned_model = None
    if align_weight > 0:
        res_a = train(graph, replace(cfg, align_weight=align_weight), model_cfg)
        aligned_vec = published_vectors(res_a.model, graph, cfg.fusion, cfg.fusion_text_weight, eval_device)
        results["fused_trained_align"] = split.evaluate(_vector_scorer(split, aligned_vec[users_t], aligned_vec[products_t]), k)
        training["fused_trained_align"] = _training_summary(res_a)
        aligned_model = res_a.model

    # text queries: the text of the user's most recent product before T
    last = torch.as_tensor([split.last_item[u] for u in split.users.tolist()], dtype=torch.long)
    q = F.normalize(h0[last], dim=1)
    results["search_text"] = split.evaluate(_vector_scorer(split, q, t_items), k)
    if aligned_model is not None:
        with torch.no_grad():
            qv = fuse(q, aligned_model.align_text(q), cfg.fusion, cfg.fusion_text_weight)
        results["search_aligned"] = split.evaluate(_vector_scorer(split, qv, aligned_vec[products_t]), k)

    return {
        "dataset": name,
        "split_time": iso(t_split),
        "split_quantile": split_quantile,
        "first_event": iso(int(times.min())),
        "last_event": iso(int(times.max())),
        "graph": graph.summary(),
        "split": split.stats(),
        "results": results,
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
        )
        rep["load_seconds"] = round(load_s, 1)
        rep["texts_encoded"] = text.encoded_count - before
        rep["path"] = str(path)
        rep["wall_seconds"] = round(time.perf_counter() - t1, 1)
        report["datasets"][name] = rep
        if out is not None:
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(report, indent=2) + "\n")
    return report


def quality_json(report: dict[str, Any], k: int = 20) -> dict[str, Any]:
    """``{dataset: {method: {"recall@20": x, "ndcg@20": y}}}``; cold start as ``<dataset>/cold_start``."""
    out: dict[str, Any] = {}
    for name, rep in report["datasets"].items():
        for part, key in (("overall", name), ("cold_start", f"{name}/cold_start")):
            out[key] = {
                m: {f"recall@{k}": round(r[part][f"recall@{k}"], 4), f"ndcg@{k}": round(r[part][f"ndcg@{k}"], 4)}
                for m, r in rep["results"].items()
            }
    return out


def markdown_table(report: dict[str, Any], k: int = 20) -> str:
    order = ["fused_trained", "fused_trained_align", "popularity", "text_only", "untrained", "search_text", "search_aligned"]
    lines = []
    for name, rep in report["datasets"].items():
        s = rep["split"]
        lines.append(
            f"**{name}** (split at {rep['split_time']}; {s['users']} users, {s['targets']} targets; "
            f"cold start: {s['cold_start_users']} users, {s['cold_start_targets']} targets among "
            f"{s['cold_start_products']} new products)\n"
        )
        lines.append(f"| method | recall@{k} | NDCG@{k} | cold-start recall@{k} | cold-start NDCG@{k} |")
        lines.append("|---|---|---|---|---|")
        for m in [m for m in order if m in rep["results"]]:
            r = rep["results"][m]
            lines.append(
                f"| {m} | {r['overall'][f'recall@{k}']:.4f} | {r['overall'][f'ndcg@{k}']:.4f} | "
                f"{r['cold_start'][f'recall@{k}']:.4f} | {r['cold_start'][f'ndcg@{k}']:.4f} |"
            )
        lines.append("")
    return "\n".join(lines).rstrip()
