"""Train the graph encoder (and through it the fused vectors) by link prediction on
user-product interactions.

What is trained
---------------
Exactly the model the worker runs (``encoders.graph.GraphEncoder``: L SAGEConv layers, mean
aggregation) and exactly the vector it publishes: the score of (user u, product p) is the
dot product of their **fused** vectors, ``fuse(h0, hL)`` (for ``concat``:
``w * cos(t_u, t_p) + (1 - w) * cos(s_u, s_p)``), the same number ``kg-streamer recommend``
ranks by. Trainable: every SAGEConv weight, the type-embedding rows of the non-product labels
(User, Brand, Category, Attribute, unknown; a user's ``h0`` is its label's row, so the user
row acts as a learned text-side item prior) and, with ``align_weight > 0``, the alignment
head. The Product type row (the ``h0`` of a product without text) stays frozen: the worker
keeps such rows in its replica across model versions, so they must not change.

Objective
---------
Sampled softmax (default) or BPR over the fused score divided by a temperature. Each step
takes ``batch_size`` positive (user, product) pairs and ``negatives`` products drawn
uniformly (shared by the batch; a negative equal to the row's positive is masked). Where the
positives come from (``supervision``, see ``_supervision``):

* temporal windows (default when interactions carry times): windows over the newest half of
  the training pairs; a window's pairs are predicted on the graph of everything before the
  window, for users who had history then -- the next products from the past, which is how the
  vectors are used (and what the temporal evaluation measures);
* random hold-out: any training pair, its own edges removed from the message-passing graph
  for that step (the model cannot read the answer off the edge it is asked to predict);
* ``auto`` = the windows, plus the hold-out when the windows hold few pairs (users who rarely
  come back); without interaction times, the hold-out.

Optional alignment (``align_weight``): a symmetric InfoNCE between ``align(t_p)`` (a linear
map of the product's text embedding into the structure space) and its structure vector
``hL``, over the products of the step; a text query then maps into product-vector space as
``fuse(q, align(q))``.

Validation and early stopping
-----------------------------
With interaction times (graph DB, loader events): the newest ``val_fraction`` of the target
pairs (by first interaction time) are held out; without (the worker's replica): a seeded
random ``val_fraction``. Held-out edges are removed from the training graph. After every
epoch recall@20 over the held-out pairs (users with training history; their training items
excluded from the ranking) is measured on the full training graph; training stops after
``patience`` epochs without improvement and the best epoch's weights are kept.

Speed: the graphs are trained full-batch. Layer 1 transforms the (few) distinct input rows
before aggregating (``mean(W x) = W mean(x)``), the aggregation is a CSR sparse product whose
transpose is itself (the graph is undirected), and the last layer runs only for the rows a
step scores. ``train_forward`` equals ``GraphEncoder.forward_all`` (tested to 1e-5).

Determinism: weights start from the seeded init (``seed``), batches and negatives come from a
seeded ``torch.Generator``; with the same data, seed and device the checkpoint (and so its
version) is the same.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import resource
import threading
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from encoders.graph import GraphEncoder, GraphEncoderConfig, SageLinear, fuse
from encoders.text import resolve_device
from training.dataset import INTERACTION_RELS, GraphData
from training.ranking import rank_metrics

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    epochs: int = 60
    batch_size: int = 4096
    negatives: int = 1024
    lr: float = 3e-3
    weight_decay: float = 0.0
    temperature: float = 0.05
    loss: Literal["softmax", "bpr"] = "softmax"
    patience: int = 5
    val_fraction: float = 0.1
    k: int = 20
    align_weight: float = 0.0
    align_temperature: float = 0.1
    learn_type_embeddings: bool = True
    seed: int = 0
    max_steps_per_epoch: int | None = None
    max_val_users: int = 5000
    fusion: Literal["concat", "mean"] = "concat"
    fusion_text_weight: float = 0.5
    target_rels: tuple[str, ...] = INTERACTION_RELS
    supervision: Literal["auto", "random", "temporal", "both"] = "auto"
    min_temporal_fraction: float = 0.1
    windows: int = 4
    window_span: float = 0.5
    device: str = "auto"
    deterministic: bool = True
    progress: bool = True


# --- graph preparation --------------------------------------------------------------------
@dataclass
class Pairs:
    """Unique (user, product) target pairs with the time of their first interaction."""

    user: np.ndarray
    item: np.ndarray
    ts: np.ndarray

    def __len__(self) -> int:
        return len(self.user)


def target_pairs(graph: GraphData, rels: Sequence[str]) -> tuple[Pairs, np.ndarray]:
    """(pairs, edge mask of the target edges)."""
    mask = graph.interaction_mask(rels)
    u, p = graph.src[mask], graph.dst[mask]
    ts = graph.edge_ts[mask] if graph.edge_ts is not None else np.full(len(u), -1, np.int64)
    if not len(u):
        return Pairs(u, p, ts), mask
    n = graph.num_nodes
    key = u * n + p
    order = np.lexsort((np.where(ts < 0, np.iinfo(np.int64).max, ts), key))
    key_sorted = key[order]
    first = np.ones(len(order), dtype=bool)
    first[1:] = key_sorted[1:] != key_sorted[:-1]
    pick = order[first]  # per pair: the edge with the earliest known time
    return Pairs(u[pick], p[pick], ts[pick]), mask


def split_validation(graph: GraphData, cfg: TrainConfig) -> tuple[GraphData, Pairs, Pairs, str]:
    """(training graph without the held-out edges, train pairs, validation pairs, how)."""
    pairs, mask = target_pairs(graph, cfg.target_rels)
    n = len(pairs)
    if n == 0 or cfg.val_fraction <= 0:
        return graph, pairs, Pairs(*(np.zeros(0, np.int64),) * 3), "none"
    known = pairs.ts >= 0
    if known.mean() > 0.99:
        cut = np.quantile(pairs.ts, 1.0 - cfg.val_fraction, method="lower")
        val = pairs.ts > cut if (pairs.ts > cut).any() else pairs.ts >= cut
        how = f"temporal: pairs first seen after {int(cut)} ms"
    else:
        rng = np.random.default_rng(cfg.seed)
        val = np.zeros(n, dtype=bool)
        val[rng.permutation(n)[: max(1, int(round(n * cfg.val_fraction)))]] = True
        how = f"random {cfg.val_fraction:.0%} of pairs (seed {cfg.seed})"
    # every target edge of a held-out pair leaves the training graph
    nn = graph.num_nodes
    val_keys = pairs.user[val] * nn + pairs.item[val]
    edge_keys = graph.src * nn + graph.dst
    drop = mask & np.isin(edge_keys, val_keys)
    train_graph = graph.subgraph_edges(~drop)
    tr = Pairs(pairs.user[~val], pairs.item[~val], pairs.ts[~val])
    va = Pairs(pairs.user[val], pairs.item[val], pairs.ts[val])
    return train_graph, tr, va, how


def edge_index(graph: GraphData) -> np.ndarray:
    """Messages for PyG: both directions of every typed edge, a self-loop once."""
    s, d = graph.src, graph.dst
    k = s != d
    return np.stack([np.concatenate([s, d[k]]), np.concatenate([d, s[k]])])


def _csr_rect(rows: Tensor, cols: Tensor, vals: Tensor, n: int, m: int) -> Tensor:
    """CSR [n, m] with the entries (rows, cols, vals); repeated (row, col) entries add up."""
    rows, cols, vals = rows.long().cpu(), cols.long().cpu(), vals.float().cpu()
    key = rows * m + cols
    uniq, inv = torch.unique(key, return_inverse=True)  # sorted: row-major order
    summed = torch.zeros(len(uniq)).index_add_(0, inv, vals)
    r, c = uniq // m, uniq % m
    crow = torch.zeros(n + 1, dtype=torch.long)
    crow[1:] = torch.cumsum(torch.bincount(r, minlength=n), 0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "sparse CSR support is in beta"
        return torch.sparse_csr_tensor(crow, c, summed, (n, m), check_invariants=False)


def _csr(rows: Tensor, cols: Tensor, vals: Tensor, n: int) -> Tensor:
    return _csr_rect(rows, cols, vals, n, n)


class _Spmm(torch.autograd.Function):
    """``A @ X`` for a sparse ``A`` whose transpose ``At`` is given."""

    @staticmethod
    def forward(ctx, a: Tensor, at: Tensor, x: Tensor) -> Tensor:
        ctx.at = at
        return a @ x

    @staticmethod
    def backward(ctx, g: Tensor):
        return None, None, ctx.at @ g.contiguous()


class _SymSpmm(torch.autograd.Function):
    """``A @ X`` for a symmetric sparse ``A``; the gradient is ``A @ G`` (no transpose needed)."""

    @staticmethod
    def forward(ctx, a: Tensor, x: Tensor) -> Tensor:
        ctx.a = a
        return a @ x

    @staticmethod
    def backward(ctx, g: Tensor):
        return None, ctx.a @ g.contiguous()


class TrainGraph:
    """The training graph on a device: CSR adjacency (edge multiplicities), degrees, the distinct
    input rows and each node's row."""

    def __init__(self, graph: GraphData, model: GraphEncoder, device: torch.device) -> None:
        self.graph, self.device, self.n = graph, device, graph.num_nodes
        ei = torch.as_tensor(edge_index(graph), dtype=torch.long)
        ones = torch.ones(ei.shape[1])
        self.adj = _csr(ei[1], ei[0], ones, self.n).to(device)
        self.deg = torch.bincount(ei[1], minlength=self.n).float().to(device)
        text_nodes = np.flatnonzero(graph.has_text)
        self.text_rows = graph.features[torch.as_tensor(text_nodes, dtype=torch.long)].float().to(device)
        type_idx = np.asarray([model.type_index(lb) for lb in graph.labels], dtype=np.int64)
        xid = np.where(graph.has_text, 0, len(text_nodes) + type_idx)
        xid[text_nodes] = np.arange(len(text_nodes))
        self.xid = torch.as_tensor(xid, dtype=torch.long, device=device)
        k = len(text_nodes) + model.type_embedding.weight.shape[0]
        # the row lookup h0 = U[xid] as one-hot sparse products (gather forward, scatter-add
        # backward; both far faster than index/index_put on CPU)
        nodes = torch.arange(self.n)
        self.onehot = _csr_rect(nodes, self.xid.cpu(), torch.ones(self.n), self.n, k).to(device)
        self.onehot_t = _csr_rect(self.xid.cpu(), nodes, torch.ones(self.n), k, self.n).to(device)
        self.products = torch.as_tensor(graph.nodes_of("Product"), dtype=torch.long, device=device)
        self.frozen_type = torch.zeros(model.type_embedding.weight.shape[0], 1, dtype=torch.bool, device=device)
        self.frozen_type[model.type_index("Product")] = True
        self.type_init = model.type_embedding.weight.detach().clone().to(device)

    def removal(self, users: Tensor, items: Tensor, mult: Tensor) -> tuple[Tensor, Tensor]:
        """Adjacency of the edges between (users[i], items[i]) (multiplicity ``mult``) and the
        degree they account for: what one step removes from the graph."""
        rows = torch.cat([users, items])
        cols = torch.cat([items, users])
        vals = torch.cat([mult, mult]).float()
        deg = torch.zeros(self.n, device=self.device).index_put_((rows,), vals, accumulate=True)
        return _csr(rows.cpu(), cols.cpu(), vals.cpu(), self.n).to(self.device), deg


def type_rows(model: GraphEncoder, tg: TrainGraph) -> Tensor:
    """The type-embedding rows in use: learned rows normalised to unit norm, the Product row as is."""
    w = model.type_embedding.weight
    if not w.requires_grad:
        return w
    return torch.where(tg.frozen_type, tg.type_init, F.normalize(w, dim=1))


def train_forward(
    model: GraphEncoder, tg: TrainGraph, rows: Tensor, removed: tuple[Tensor, Tensor] | None = None
) -> tuple[Tensor, Tensor]:
    """(h0[rows], hL[rows]) of the SAGE stack over the training graph minus ``removed``."""
    U = torch.cat([tg.text_rows, type_rows(model, tg)])
    deg = tg.deg if removed is None else tg.deg - removed[1]
    inv = 1.0 / deg.clamp(min=1).unsqueeze(1)
    mean = model.config.aggr == "mean"

    def agg(h: Tensor) -> Tensor:
        s = _SymSpmm.apply(tg.adj, h)
        if removed is not None:
            s = s - _SymSpmm.apply(removed[0], h)
        return s * inv if mean else s

    L = model.num_layers
    conv0 = model.convs[0]
    lin_l0, lin_r0 = cast(SageLinear, conv0.lin_l), cast(SageLinear, conv0.lin_r)
    bias0 = lin_l0.bias
    assert bias0 is not None  # SAGEConv's lin_l has a bias (the default)
    last = L == 1
    hid = lin_l0.weight.shape[0]
    PU = U @ torch.cat([lin_l0.weight, lin_r0.weight]).t()
    P = _Spmm.apply(tg.onehot, tg.onehot_t, PU)  # = PU[xid]
    h = agg(P[:, :hid]) + bias0 + P[:, hid:]
    if last:
        return U[tg.xid[rows]], h[rows]
    h = h.relu()
    for layer in range(1, L):
        conv = model.convs[layer]
        lin_l, lin_r = cast(SageLinear, conv.lin_l), cast(SageLinear, conv.lin_r)
        a = agg(h)
        if layer == L - 1:
            out = lin_l(a[rows]) + lin_r(h[rows])
            return U[tg.xid[rows]], out
        h = (lin_l(a) + lin_r(h)).relu()
    raise AssertionError("unreachable")


# --- memory ---------------------------------------------------------------------------------
class PeakRSS:
    """Samples the process's resident memory every 50 ms (peak over a block of code)."""

    def __init__(self) -> None:
        self.peak = self.start = self._rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def _rss() -> int:
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except OSError:
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            self.peak = max(self.peak, self._rss())

    def __enter__(self) -> PeakRSS:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())


# --- training -------------------------------------------------------------------------------
@dataclass
class TrainResult:
    model: GraphEncoder
    history: list[dict[str, Any]] = field(default_factory=list)
    best_epoch: int = 0
    best_val: dict[str, float] = field(default_factory=dict)
    init_val: dict[str, float] = field(default_factory=dict)
    popularity_val: dict[str, float] = field(default_factory=dict)
    supervision: list[str] = field(default_factory=list)
    seconds: float = 0.0
    steps: int = 0
    device: str = "cpu"
    peak_rss_bytes: int = 0
    rss_before_bytes: int = 0
    peak_gpu_bytes: int | None = None
    validation: str = ""
    train_pairs: int = 0
    val_pairs: int = 0
    graph: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)

    def metrics(self) -> dict[str, Any]:
        return {
            "version": self.model.version,
            "model_config": json.loads(self.model.config.to_json()),
            "train_config": self.config,
            "best_epoch": self.best_epoch,
            "best_val": self.best_val,
            "init_val": self.init_val,
            "popularity_val": self.popularity_val,
            "supervision": self.supervision,
            "history": self.history,
            "seconds": round(self.seconds, 2),
            "steps": self.steps,
            "device": self.device,
            "peak_rss_mb": round(self.peak_rss_bytes / 2**20, 1),
            "rss_before_mb": round(self.rss_before_bytes / 2**20, 1),
            "peak_gpu_mb": None if self.peak_gpu_bytes is None else round(self.peak_gpu_bytes / 2**20, 1),
            "validation": self.validation,
            "train_pairs": self.train_pairs,
            "val_pairs": self.val_pairs,
            "graph": self.graph,
        }


def _grouped(users: np.ndarray, items: np.ndarray) -> dict[int, np.ndarray]:
    if not len(users):
        return {}
    order = np.argsort(users, kind="stable")
    u, it = users[order], items[order]
    cuts = np.flatnonzero(np.diff(u)) + 1
    return {int(g[0]): i for g, i in zip(np.split(u, cuts), np.split(it, cuts))}


@dataclass
class _Source:
    """Positive pairs of one kind and the graph their step runs on."""

    name: str
    graph: TrainGraph
    user: Tensor
    item: Tensor
    mult: Tensor | None  # edge multiplicity to remove per pair (random hold-out); None: nothing

    def __len__(self) -> int:
        return len(self.user)

    def batches(self, size: int, gen: torch.Generator) -> list[Tensor]:
        perm = torch.randperm(len(self), generator=gen).to(self.user.device)
        return [perm[i : i + size] for i in range(0, len(self), size)]

    def describe(self) -> str:
        return f"{self.name}: {len(self)} pairs"


def _supervision(
    train_graph: GraphData, tg: TrainGraph, tr: Pairs, cfg: TrainConfig, model: GraphEncoder, device: torch.device
) -> list[_Source]:
    """The positives a step learns from (``TrainConfig.supervision``):

    * ``random``: every training pair, its own edges removed from the graph for its step
      (predict a held-out piece of the history from the rest);
    * ``temporal``: ``windows`` time windows over the newest ``window_span`` of the training
      pairs; window i's pairs are predicted on the graph of everything before the window, for
      users who already had history then (predict the *next* products from the past: the
      situation the vectors are used in);
    * ``both``;
    * ``auto`` (default): ``temporal``, plus ``random`` when the windows hold fewer than
      ``min_temporal_fraction`` of the training pairs (users who rarely come back, as on Amazon).

    Without interaction times, ``random``."""
    sources: list[_Source] = []
    temporal = bool(cfg.supervision in ("temporal", "both", "auto") and len(tr) and (tr.ts >= 0).all())
    if temporal:
        sources += _windows(train_graph, tr, cfg, model, device)
        temporal = bool(sources)
    in_windows = sum(len(s) for s in sources)
    if (
        cfg.supervision in ("random", "both")
        or not temporal
        or (cfg.supervision == "auto" and in_windows < cfg.min_temporal_fraction * len(tr))
    ):
        tmask = train_graph.interaction_mask(cfg.target_rels)
        nn_ = train_graph.num_nodes
        pk, counts = np.unique(train_graph.src[tmask] * nn_ + train_graph.dst[tmask], return_counts=True)
        mult = counts[np.searchsorted(pk, tr.user * nn_ + tr.item)]
        sources.insert(
            0,
            _Source(
                "random hold-out",
                tg,
                torch.as_tensor(tr.user, device=device),
                torch.as_tensor(tr.item, device=device),
                torch.as_tensor(mult, dtype=torch.float32, device=device),
            ),
        )
    return sources


def _windows(train_graph: GraphData, tr: Pairs, cfg: TrainConfig, model: GraphEncoder, device: torch.device) -> list[_Source]:
    sources: list[_Source] = []
    qs = np.linspace(1.0 - cfg.window_span, 1.0, cfg.windows + 1)
    cuts = np.quantile(tr.ts, qs, method="lower")
    cuts[-1] = tr.ts.max() + 1
    ets = train_graph.edge_ts if train_graph.edge_ts is not None else np.full(train_graph.num_edges, -1)
    for lo, hi in zip(cuts[:-1], cuts[1:]):
        had = np.unique(tr.user[tr.ts < lo])
        sel = (tr.ts >= lo) & (tr.ts < hi) & np.isin(tr.user, had)
        if not sel.any():
            continue
        g = TrainGraph(train_graph.subgraph_edges((ets < 0) | (ets < lo)), model, device)
        sources.append(
            _Source(
                f"window from {int(lo)} ms",
                g,
                torch.as_tensor(tr.user[sel], device=device),
                torch.as_tensor(tr.item[sel], device=device),
                None,
            )
        )
    return sources


@torch.no_grad()
def fused_vectors(model: GraphEncoder, tg: TrainGraph, rows: Tensor, cfg: TrainConfig) -> Tensor:
    x0, hl = train_forward(model, tg, rows)
    return fuse(x0, hl, cfg.fusion, cfg.fusion_text_weight)


def validate(model: GraphEncoder | None, tg: TrainGraph, train: Pairs, val: Pairs, cfg: TrainConfig) -> dict[str, float]:
    """recall@k / NDCG@k of the held-out pairs (``model=None``: by popularity)."""
    if not len(val):
        return {}
    hist = _grouped(train.user, train.item)
    tgt = _grouped(val.user, val.item)
    users = np.asarray(sorted(u for u in tgt if u in hist), dtype=np.int64)
    if len(users) > cfg.max_val_users:
        users = np.random.default_rng(cfg.seed).choice(users, cfg.max_val_users, replace=False)
        users.sort()
    products = tg.products
    col = np.full(tg.n, -1, dtype=np.int64)
    col[products.cpu().numpy()] = np.arange(len(products))
    if model is None:
        pop = torch.as_tensor(np.bincount(col[train.item], minlength=len(products)), dtype=torch.float32)
        return rank_metrics(
            lambda b: pop.expand(len(b), -1), users, [col[tgt[int(u)]] for u in users], [col[hist[int(u)]] for u in users], cfg.k
        )
    model.eval()
    rows = torch.cat([products, torch.as_tensor(users, device=tg.device)])
    vec = fused_vectors(model, tg, rows, cfg)
    pv, uv = vec[: len(products)], vec[len(products) :]
    pos = {int(u): i for i, u in enumerate(users)}

    def score(batch: np.ndarray) -> Tensor:
        return uv[torch.as_tensor([pos[int(u)] for u in batch], device=tg.device)] @ pv.t()

    return rank_metrics(score, users, [col[tgt[int(u)]] for u in users], [col[hist[int(u)]] for u in users], cfg.k)


def train(
    graph: GraphData, cfg: TrainConfig, model_config: GraphEncoderConfig | None = None, init: GraphEncoder | None = None
) -> TrainResult:
    """Train on ``graph`` (validation split inside); returns the best model (on CPU)."""
    device = resolve_device(cfg.device)
    t_start = time.perf_counter()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        # cuBLAS needs a fixed workspace to be deterministic (read when its handle is created)
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    previous = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    if cfg.deterministic:
        # e.g. the backward of row indexing accumulates with atomics on CUDA unless asked not to
        torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        with PeakRSS() as mem:
            result = _train(graph, cfg, model_config, init, device)
    finally:
        torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])
    result.seconds = time.perf_counter() - t_start
    result.peak_rss_bytes, result.rss_before_bytes = mem.peak, mem.start
    if device.type == "cuda":
        result.peak_gpu_bytes = torch.cuda.max_memory_allocated(device)
    return result


def _train(
    graph: GraphData, cfg: TrainConfig, model_config: GraphEncoderConfig | None, init: GraphEncoder | None, device: torch.device
) -> TrainResult:
    from tqdm.auto import tqdm

    in_dim = int(graph.features.shape[1])
    if init is not None:
        mc = init.config
        if cfg.align_weight > 0 and not mc.align:
            mc = GraphEncoderConfig(**{**asdict(mc), "node_types": mc.node_types, "align": True})
        model = GraphEncoder(mc)
        model.load_state_dict(init.state_dict(), strict=False)
    else:
        mc = model_config or GraphEncoderConfig(in_dim=in_dim)
        if cfg.align_weight > 0 and not mc.align:
            mc = GraphEncoderConfig(**{**asdict(mc), "node_types": mc.node_types, "align": True})
        model = GraphEncoder(mc)
    if model.config.in_dim != in_dim:
        raise ValueError(f"graph features have {in_dim} dims, the model expects {model.config.in_dim}")
    model = model.to(device)
    model.type_embedding.weight.requires_grad_(cfg.learn_type_embeddings)

    train_graph, tr, va, how = split_validation(graph, cfg)
    if not len(tr):
        raise ValueError("no user-product interactions to train on")
    tg = TrainGraph(train_graph, model, device)
    n_products = len(tg.products)
    result = TrainResult(
        model=model,
        device=str(device),
        validation=how,
        train_pairs=len(tr),
        val_pairs=len(va),
        graph=graph.summary(),
        config={k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(cfg).items()},
    )
    sources = _supervision(train_graph, tg, tr, cfg, model, device)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(cfg.seed)
    has_text = torch.as_tensor(train_graph.has_text, device=device)

    result.init_val = validate(model, tg, tr, va, cfg)
    result.popularity_val = validate(None, tg, tr, va, cfg)
    log.info("validation before training: %s; popularity: %s", result.init_val, result.popularity_val)
    best_score, best_state, bad = -1.0, copy.deepcopy(model.state_dict()), 0
    result.supervision = [s.describe() for s in sources]
    log.info(
        "training on %s: %d pairs, %d held out (%s), %d products; supervision %s",
        device,
        len(tr),
        len(va),
        how,
        n_products,
        result.supervision,
    )
    for epoch in range(1, cfg.epochs + 1):
        model.train()
        t0 = time.perf_counter()
        plan = [(src, idx) for src in sources for idx in src.batches(cfg.batch_size, gen)]
        order = torch.randperm(len(plan), generator=gen).tolist()
        if cfg.max_steps_per_epoch:
            order = order[: cfg.max_steps_per_epoch]
        total = 0.0
        bar = tqdm(order, desc=f"epoch {epoch}", disable=not cfg.progress, leave=False, mininterval=1.0)
        for step, j in enumerate(bar):
            src, idx = plan[j]
            u, p = src.user[idx], src.item[idx]
            neg = tg.products[torch.randint(0, n_products, (min(cfg.negatives, n_products),), generator=gen).to(device)]
            rows, inv = torch.unique(torch.cat([u, p, neg]), return_inverse=True)
            b = len(u)
            removed = src.graph.removal(u, p, src.mult[idx]) if src.mult is not None else None
            x0, hl = train_forward(model, src.graph, rows, removed)
            f = fuse(x0, hl, cfg.fusion, cfg.fusion_text_weight)
            fu, fp, fn = f[inv[:b]], f[inv[b : 2 * b]], f[inv[2 * b :]]
            pos = (fu * fp).sum(1, keepdim=True)
            negs = fu @ fn.t()
            hit = p.unsqueeze(1) == neg.unsqueeze(0)
            if cfg.loss == "softmax":
                logits = torch.cat([pos, negs.masked_fill(hit, -torch.inf)], 1) / cfg.temperature
                loss = F.cross_entropy(logits, torch.zeros(b, dtype=torch.long, device=device))
            else:
                diff = F.softplus(-(pos - negs) / cfg.temperature)
                loss = diff.masked_fill(hit, 0).sum() / (~hit).sum().clamp(min=1)
            if cfg.align_weight > 0:
                prod = torch.unique(torch.cat([p, neg]))
                prod = prod[has_text[prod]]
                if len(prod) > 1:
                    sel = torch.searchsorted(rows, prod)
                    a = F.normalize(model.align_text(x0[sel]), dim=1)
                    s = F.normalize(hl[sel], dim=1)
                    lg = a @ s.t() / cfg.align_temperature
                    lab = torch.arange(len(prod), device=device)
                    loss = loss + cfg.align_weight * 0.5 * (F.cross_entropy(lg, lab) + F.cross_entropy(lg.t(), lab))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach())
            result.steps += 1
            if cfg.progress:
                bar.set_postfix(loss=f"{total / (step + 1):.4f}")
        bar.close()
        val = validate(model, tg, tr, va, cfg)
        entry = {
            "epoch": epoch,
            "loss": round(total / max(len(order), 1), 5),
            "seconds": round(time.perf_counter() - t0, 2),
            **{k: round(v, 5) for k, v in val.items() if k != "users"},
        }
        result.history.append(entry)
        log.info("epoch %d: %s", epoch, entry)
        if cfg.progress:
            tqdm.write(
                f"epoch {epoch}: loss {entry['loss']} "
                + " ".join(f"{k} {v}" for k, v in entry.items() if "@" in k)
                + f" ({entry['seconds']} s)"
            )
        score = val.get(f"recall@{cfg.k}", -entry["loss"]) if val else -entry["loss"]
        if score > best_score + 1e-6:
            best_score, best_state, bad, result.best_epoch = score, copy.deepcopy(model.state_dict()), 0, epoch
            result.best_val = val
        else:
            bad += 1
            if bad >= cfg.patience:
                break
    model.load_state_dict(best_state)
    _finalise_type_rows(model, tg)
    result.model = model.cpu().eval()
    for p in result.model.parameters():
        p.requires_grad_(False)
    return result


@torch.no_grad()
def _finalise_type_rows(model: GraphEncoder, tg: TrainGraph) -> None:
    """Store the rows the training used (unit norm; the Product row untouched, bit for bit)."""
    model.type_embedding.weight.copy_(type_rows(model, tg))


# --- outputs --------------------------------------------------------------------------------
def published_version(model: GraphEncoder, text_model_id: str, fusion: str, fusion_text_weight: float) -> str:
    """The version the worker's vectors will carry with this model (``IncrementalEngine.model_version``)."""
    from streamer.embed.engine import IncrementalEngine

    return IncrementalEngine(
        copy.deepcopy(model),
        "cpu",
        fusion=fusion,  # type: ignore[arg-type]
        fusion_text_weight=fusion_text_weight,
        text_model_id=text_model_id,
    ).model_version


def metrics_path(checkpoint: str | Path) -> Path:
    """``<name>.metrics.json`` next to a checkpoint ``<name>.safetensors`` (``save`` writes it)."""
    checkpoint = Path(checkpoint)
    return checkpoint.with_name(checkpoint.name.removesuffix(".safetensors") + ".metrics.json")


def save(result: TrainResult, out: str | Path, extra: dict[str, Any] | None = None) -> tuple[Path, Path]:
    """Write the checkpoint (safetensors, config and version in its metadata) and, next to it,
    ``<name>.metrics.json``. Returns both paths."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    result.model.save(out)
    metrics = metrics_path(out)
    doc = {**result.metrics(), **(extra or {}), "checkpoint": str(out)}
    metrics.write_text(json.dumps(doc, indent=2, default=str) + "\n")
    return out, metrics
