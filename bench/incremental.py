#!/usr/bin/env python
"""Incremental engine benchmark: (a) our engine, end to end, vs the best a PyG user would run.

    python bench/incremental.py --quick                         # ~5 min on the 2-core dev box
    python bench/incremental.py                                 # Online Retail + synthetic 1M (CPU)
    python bench/incremental.py --datasets synth:products --device cuda   # products scale (GPU)

Per dataset and per update batch size (1, 10, 100, 1,000, 10,000: InkStream's grid), every
timed batch is applied by

(a) our side, **end to end** (``EndToEnd``): ``IncrementalEngine.apply`` with the
    fused vectors built, every vector serialised as the worker does (``vector_records``,
    ``--vector-encoding``, f16 by default), tombstones for deleted nodes, and all of them
    handed to a Kafka producer and acknowledged by a real broker (an embedded Tansu started
    here, ``--local-broker noida`` to keep the log on disk, or ``--bootstrap``).
    ``ms_end_to_end`` and its stages (``ms_stages``: apply, serialise, publish),
    ``vectors_published`` and ``bytes_published`` per batch.
(b') one ``k_hop_subgraph`` of the batch's seeds plus a forward pass (``SubgraphBaseline``):
    the seeds are the rows the batch touched (upserted nodes, edge ends, ``out_edges``
    targets); the rows within L hops of them can change and need their own L-hop
    neighbourhoods, so ``k_hop_subgraph(seeds, 2L)`` over the prebuilt ``edge_index``, its
    ``adj_t`` and the model's own ``SAGEConv`` layers; measured whole on every batch. Its
    outputs for the rows within L hops are compared with the engine's
    (``max_abs_err_khop_subgraph``): an independent exactness check of every timed batch.
(c) a full forward pass on a prebuilt graph, the faster of the project's fused layer-wise
    sparse pass (``IncrementalEngine.full_layers``: per layer one CSR product over all nodes
    plus the dense step, float32 sums as PyG) and PyG's own ``SAGEConv`` layers over the same
    CSR ``adj_t`` (``full_path`` says which); best of ``--full-reps``, once per dataset.
(b) secondary: InkStream's mini-batched k-hop baseline over the batch's affected set ``A_L``
    (``timing_original.py --range affected``: PyG's ``NeighborLoader(num_neighbors=[-1] * L,
    input_nodes=A_L, batch_size=--khop-batch)`` with ``trim_to_layer``), reproduced with plain
    torch by ``KHopBaseline`` (pyg-lib / torch-sparse are not installed here). It is given
    ``--khop-budget-s`` per series; past it, the seed mini-batches done are timed and the
    total is extrapolated (``minibatch_khop_measured_fraction``).

Each batch size runs once per ``--modes`` entry: ``exact`` (every vector that moved is
published; the state equals a full recompute to 1e-5) and ``bounded``, the worker's default
(``KGS_EMBED_MODE``, ``WORKER_THRESHOLDS``: exact hidden layers, a vector published once it
moved more than the publish threshold since it was last published). Bounded rows report the
vectors held back and ``max_abs_err_full``, the largest distance between what the topic holds
and a full recompute; they leave out (b) and the isolated pass. The two series take
consecutive batches of the same stream.

``speedup_vs_best`` = min(b', c) / median(a), the headline; ``speedup_vs_full`` = (c) / (a),
``speedup_vs_khop`` = (b) / (a), ``updates_per_s`` = batch size / (a), all with (a) end to
end. ``speedup_vs_best_publishing`` adds to the baseline the serialise and publish stages
of (a): a full-recompute user must publish the changed vectors too (a lower bound for them:
they would also have to find which vectors moved). ``khop_measured_fraction`` is 1.0: the
baselines of ``speedup_vs_best`` are measured whole, never extrapolated. ``ms_incremental`` is
the apply stage of (a) (vectors built), ``ms_incremental_isolated`` the engine alone without vectors in a pass of its own. The
``cpu_*`` columns repeat the ratios in CPU seconds of this process (``time.process_time``;
the broker's CPU is not in them): on a shared, loaded CPU host the wall-clock times include
waiting for a core, the CPU seconds do not. After each batch-size series the whole state is
verified against a full recompute with float64 sums (``max_abs_err_full``, the exactness
check: <= 1e-5 on every row of every layer); ``max_abs_err_vs_khop`` is the largest (a)-vs-(b)
difference (PyG's float32 scatter: at hubs its own rounding reaches ~1e-4, so that column
measures the baseline as much as the engine); ``max_abs_err`` is ``max_abs_err_full``.

Hub cases (synthetic graphs): a feature change of a product in the largest category, of that
category node, and of the most active user, each in exact and in bounded mode (time, vectors
published, vectors held back, max error against a full recompute, the a-priori bound), plus a
burst of ``--burst`` feature changes to products of the largest category, one per batch.

Datasets: ``retail`` (the UCI Online Retail CSV through ``devtools.datasets.online_retail``:
products, users, PURCHASED edges; the first ``--retail-split`` of the events form the graph,
the rest, in order, is the update stream; product features are seeded unit vectors per
(stock code, title), standing in for text embeddings) and ``synth:<preset>`` (see
``devtools/synth.py``; the update stream is its mixed stream).

Output: one JSON list of rows on stdout and in ``--output`` (rows of earlier runs on other
datasets or devices are kept; rows for the same dataset+device are replaced). Progress goes
to stderr. The file is rewritten after every row, so an interrupted run leaves what it did.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import platform
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from torch_geometric.utils import k_hop_subgraph

from devtools import synth
from devtools.local_services import LocalServices, free_port
from encoders.graph import GraphEncoder, GraphEncoderConfig
from encoders.text import resolve_device
from sinks.kafka_publisher import KafkaPublisher
from streamer.contracts import changes as C
from streamer.contracts.vectors import Encoding
from streamer.embed.engine import BatchReport, IncrementalEngine
from streamer.embed.worker import vector_records
from streamer.kafka.topics import ensure_topics
from streamer.settings import Settings

DEFAULT_RETAIL = Settings().data_dir / "online_retail" / "online_retail.csv.gz"
REPS = {1: 30, 10: 20, 100: 10, 1000: 5, 10000: 3}
QUICK_REPS = {1: 10, 10: 6, 100: 3, 1000: 2, 10000: 1}
# the worker's default bounded mode (streamer/settings.py): hidden layers exact, a vector is
# published once it moved more than the publish threshold since it was last published
WORKER_THRESHOLDS = (Settings().embed_propagate_threshold, Settings().embed_publish_threshold)


def log(*a: Any) -> None:
    print(f"[{time.strftime('%H:%M:%S')}]", *a, file=sys.stderr, flush=True)


class Timer:
    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def __call__(self, fn: Callable[[], Any]) -> tuple[float, Any]:
        if self.cuda:
            torch.cuda.synchronize()
        t, c = time.perf_counter(), time.process_time()
        out = fn()
        if self.cuda:
            torch.cuda.synchronize()
        self.cpu = time.process_time() - c  # CPU seconds of this process (contention check)
        return time.perf_counter() - t, out


# ---- (b) the k-hop baseline -------------------------------------------------------------------
class KHopBaseline:
    """NeighborLoader(num_neighbors=[-1]*L, batch_size) + trim_to_layer semantics, plain torch."""

    def __init__(self, engine: IncrementalEngine, batch_size: int = 1024, max_messages: int = 1 << 27):
        self.e = engine
        self.batch_size = batch_size
        self.max_messages = max_messages  # above this, a layer aggregates in edge chunks
        self.local = np.full(0, -1, dtype=np.int64)

    @torch.no_grad()
    def _subgraph(self, seeds: np.ndarray) -> tuple[np.ndarray, list[int], list[tuple[np.ndarray, np.ndarray]]]:
        rep = self.e.replica
        if len(self.local) < rep.num_slots:
            self.local = np.full(rep.num_slots, -1, dtype=np.int64)
            self.pos = np.zeros(rep.num_slots, dtype=np.int64)
        local = self.local
        nodes = [seeds]
        local[seeds] = np.arange(len(seeds))
        count = len(seeds)
        cum = [count]  # nodes of hops 0..k
        frontier = seeds
        hop_edges = []  # per hop: (dst local, src global)
        for _ in range(self.e.L):
            seg, w = rep.gather(frontier)
            hop_edges.append((local[frontier][seg], w))
            fresh = w[local[w] < 0]  # neighbours not sampled yet
            if len(fresh):
                ar = np.arange(len(fresh))  # dedupe without a sort (scratch array)
                self.pos[fresh] = ar
                fresh = fresh[self.pos[fresh] == ar]
                local[fresh] = count + np.arange(len(fresh))
                nodes.append(fresh)
                count += len(fresh)
            fresh_u = fresh
            cum.append(count)
            frontier = fresh_u
        all_nodes = np.concatenate(nodes)
        edges = [(dst, local[w]) for dst, w in hop_edges]
        local[all_nodes] = -1
        return all_nodes, cum, edges

    @torch.no_grad()
    def _layer(self, layer: int, x: torch.Tensor, n_dst: int, src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
        e = self.e
        conv = e.model.convs[layer]
        if len(src) * x.shape[1] <= self.max_messages:
            out = conv((x, x[:n_dst]), torch.stack([src, dst]), size=(x.shape[0], n_dst))
            return out.relu() if layer < e.L - 1 else out
        agg = torch.zeros(n_dst, x.shape[1], device=x.device)  # same math, edge chunks (memory)
        step = max(1, self.max_messages // x.shape[1])
        for lo in range(0, len(src), step):
            agg.index_add_(0, dst[lo : lo + step], x[src[lo : lo + step]])
        deg = torch.bincount(dst, minlength=n_dst).clamp_(min=1).to(x.dtype)
        return e.model.dense(layer, agg / deg.unsqueeze(1) if e.mean else agg, x[:n_dst])

    @torch.no_grad()
    def run(
        self,
        seeds: np.ndarray,
        budget_s: float | None = None,
        rng: np.random.Generator | None = None,
    ) -> tuple[float, np.ndarray, torch.Tensor | None, float]:
        """(seconds, seeds done, their layer-L outputs, fraction measured); seconds is
        extrapolated to all seeds when the budget ran out."""
        e, dev = self.e, self.e.device
        if not len(seeds):
            return 0.0, seeds, None, 1.0
        chunks = [seeds[i : i + self.batch_size] for i in range(0, len(seeds), self.batch_size)]
        order = (rng or np.random.default_rng(0)).permutation(len(chunks))
        timer = Timer(dev)
        spent, done, outs = 0.0, [], []
        self.cpu_s = 0.0
        for i in order:
            chunk = chunks[i]

            def one() -> torch.Tensor:
                nodes, cum, edges = self._subgraph(chunk)
                x = e.h[0][torch.from_numpy(nodes).to(dev)]
                for layer in range(e.L):
                    hops = e.L - 1 - layer  # destinations: hops 0..hops
                    n_dst = cum[hops]
                    dst = np.concatenate([edges[k][0] for k in range(hops + 1)])
                    src = np.concatenate([edges[k][1] for k in range(hops + 1)])
                    x = self._layer(layer, x, n_dst, torch.from_numpy(src).to(dev), torch.from_numpy(dst).to(dev))
                return x[: len(chunk)]

            dt, out = timer(one)
            spent += dt
            self.cpu_s += timer.cpu
            done.append(chunk)
            outs.append(out)
            if budget_s is not None and spent > budget_s and len(done) < len(chunks):
                break
        got = np.concatenate(done)
        frac = len(got) / len(seeds)
        self.cpu_s /= frac
        return spent / frac, got, torch.cat(outs), frac


# ---- (b') one k_hop_subgraph + a forward pass --------------------------------------------------
def seed_rows(changes: list[C.Change], engine: IncrementalEngine) -> np.ndarray:
    """The rows a batch touched directly, as a user would collect them from the batch: every
    node it upserted, both ends of every edge it wrote, and the targets of an upsert's
    ``out_edges`` (those still in the graph after the batch)."""
    keys: set[str] = set()
    for ch in changes:
        if ch.key:
            keys.add(ch.key)
            keys.update(str(t) for _, t in (ch.props or {}).get("out_edges", []) or [])
        if ch.src and ch.dst:
            keys.update((ch.src, ch.dst))
    index = engine.replica.index
    return np.asarray(sorted(index[k] for k in keys if k in index), dtype=np.int64)


def csr_adj_t(edge_index: torch.Tensor, n: int) -> torch.Tensor:
    """``adj_t`` (row = target) as a torch CSR tensor with one entry per edge. Not PyG's
    ``to_torch_csr_tensor``: it coalesces, so two relations between the same pair become one
    entry of value 2, and the mean aggregation (``spmm(reduce="mean")`` divides by the entries of
    a row) then counts that neighbour once in the denominator and twice in the sum."""
    src, dst = edge_index
    order = torch.argsort(dst, stable=True)
    crow = torch.zeros(n + 1, dtype=torch.long, device=edge_index.device)
    torch.cumsum(torch.bincount(dst, minlength=n), 0, out=crow[1:])
    values = torch.ones(len(src), device=edge_index.device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(crow, src[order], values, size=(n, n))


class SubgraphBaseline:
    """(b'): what a PyG user writes to refresh only what a batch can change. The rows within L
    hops of the seeds can change, and computing them needs their own L-hop neighbourhoods, so
    one ``k_hop_subgraph(seeds, 2L)`` over the prebuilt ``edge_index``, its adjacency as a CSR
    ``adj_t``, and the model's own ``SAGEConv`` layers over it; the outputs of the rows within
    L hops are exact. Timed: the subgraph, the adjacency and the forward pass (the full
    ``edge_index`` is prebuilt from the replica after each batch, untimed)."""

    def __init__(self, engine: IncrementalEngine):
        self.e = engine
        self.edge_index: torch.Tensor | None = None
        self.cpu_s = 0.0

    def prepare(self) -> None:
        self.edge_index = self.e.edge_index()

    @torch.no_grad()
    def run(self, seeds: np.ndarray) -> tuple[float, float]:
        """(seconds, max |out - engine| over the rows within L hops of the seeds)."""
        e, L, n = self.e, self.e.L, self.e.replica.num_slots
        assert self.edge_index is not None
        if not len(seeds):
            self.cpu_s = 0.0
            return 0.0, 0.0
        seeds_t = torch.as_tensor(seeds, dtype=torch.long, device=e.device)

        def one() -> tuple[torch.Tensor, torch.Tensor]:
            subset, ei, _, _ = k_hop_subgraph(seeds_t, 2 * L, self.edge_index, relabel_nodes=True, num_nodes=n)
            return subset, e.model.forward(e.h[0][subset], csr_adj_t(ei, len(subset)))

        timer = Timer(e.device)
        dt, (subset, out) = timer(one)
        self.cpu_s = timer.cpu
        near, _, _, _ = k_hop_subgraph(seeds_t, L, self.edge_index, num_nodes=n)  # the rows that can change
        local = torch.searchsorted(subset, near)
        return dt, float((out[local] - e.h[L][near]).abs().max()) if len(near) else 0.0


# ---- (a) end to end: apply, build the vectors, serialise, publish -----------------------------
class EndToEnd:
    """(a) as a user waits for it: ``engine.apply`` with the fused vectors built, each vector
    serialised as the worker does (``streamer.embed.worker.vector_records``, ``--vector-encoding``), tombstones
    for deleted nodes, and all of them handed to a Kafka producer and acknowledged by a real
    broker (``KafkaPublisher.publish``: ``acks=all``, flushed)."""

    def __init__(self, engine: IncrementalEngine, publisher: KafkaPublisher, topic: str, encoding: Encoding):
        self.e, self.publisher, self.topic, self.encoding = engine, publisher, topic, encoding
        self.stages: dict[str, float] = {}
        self.vectors = 0
        self.bytes = 0

    def __call__(self, changes: list[C.Change], features: Any) -> BatchReport:
        t0 = time.perf_counter()
        report = self.e.apply(changes, features, with_vectors=True)
        if self.e.device.type == "cuda":
            torch.cuda.synchronize()
        t1 = time.perf_counter()
        records = vector_records(report, self.e.model_version, self.encoding)  # as the worker builds them
        t2 = time.perf_counter()
        self.publisher.publish(self.topic, records)
        t3 = time.perf_counter()
        self.stages = {"apply": t1 - t0, "serialise": t2 - t1, "publish": t3 - t2}
        self.vectors = len(records)
        self.bytes = sum(len(k) + len(v or b"") for k, v, _ in records)
        return report


# ---- datasets -----------------------------------------------------------------------------------
class ListStream:
    def __init__(self, items: list[tuple[C.Change, torch.Tensor | None]]):
        self.items, self.pos = items, 0

    def next(self, n: int) -> tuple[list[C.Change], dict[str, torch.Tensor]]:
        if self.pos + n > len(self.items):
            self.pos = 0  # replays are no-ops or re-changes
        part = self.items[self.pos : self.pos + n]
        self.pos += n
        feats = {ch.key: x for ch, x in part if x is not None and ch.key is not None}
        return [ch for ch, _ in part], feats


def _unit(seed_text: str, dim: int) -> torch.Tensor:
    seed = int.from_bytes(hashlib.sha256(seed_text.encode()).digest()[:8], "little") & ((1 << 63) - 1)
    return torch.nn.functional.normalize(torch.randn(dim, generator=torch.Generator().manual_seed(seed)), dim=0)


def _ms(ts: str) -> int:
    return int(datetime.fromisoformat(ts.replace("Z", "+00:00")).timestamp() * 1000)


def retail_dataset(path: Path, split: float, dim: int) -> dict[str, Any]:
    from devtools.datasets import online_retail

    events = list(online_retail.events(path))
    n0 = int(len(events) * split)
    products: dict[str, int] = {}
    users: dict[str, int] = {}
    titles: dict[str, str] = {}
    pairs: set[tuple[int, int]] = set()
    for ev in events[:n0]:
        if ev["type"] == "product":
            products.setdefault(ev["id"], len(products))
            titles[ev["id"]] = ev.get("title") or ""
        else:
            p = products.setdefault(ev["product_id"], len(products))
            u = users.setdefault(ev["user_id"], len(users))
            pairs.add((u, p))
    P = len(products)
    keys = [f"Product:{c}" for c in products] + [f"User:{u}" for u in users]
    uv = np.asarray(sorted(pairs), dtype=np.int64).reshape(-1, 2)
    feats = torch.stack([_unit(f"{c}|{titles.get(c, '')}", dim) for c in products])
    stream = []
    for ev in events[n0:]:
        ts = _ms(ev["ts"])
        if ev["type"] == "product":
            ch = C.node_upsert("Product", ev["id"], ts)
            stream.append((ch, _unit(f"{ev['id']}|{ev.get('title') or ''}", dim)))
        else:
            stream.append((C.edge_upsert(f"User:{ev['user_id']}", "PURCHASED", f"Product:{ev['product_id']}", ts), None))
    return {
        "keys": keys,
        "src": P + uv[:, 0],
        "dst": uv[:, 1],
        "rel": "PURCHASED",
        "rel_names": None,
        "features": feats,
        "feature_rows": np.arange(P),
        "stream": ListStream(stream),
        "graph": None,
        "info": {
            "events": len(events),
            "initial_events": n0,
            "stream_events": len(stream),
            "products": P,
            "users": len(users),
            "typed_edges": len(uv),
        },
    }


def load_into(engine: IncrementalEngine, ds: dict[str, Any]) -> None:
    """``engine.bulk_load`` of a dataset built by ``retail_dataset`` or ``synth_dataset``."""
    engine.bulk_load(
        ds["keys"],
        ds["src"],
        ds["dst"],
        ds["rel"],
        features=ds["features"],
        rel_names=ds["rel_names"],
        feature_rows=ds["feature_rows"],
    )


def synth_dataset(preset: str, seed: int) -> dict[str, Any]:
    cfg = synth.PRESETS[preset].scaled(seed=seed)
    g = synth.generate(cfg)
    return {
        "keys": g.keys,
        "src": g.src,
        "dst": g.dst,
        "rel": g.rel.astype(np.int64),
        "rel_names": list(synth.REL_NAMES),
        "features": g.product_features(),
        "feature_rows": np.arange(g.n_products),
        "stream": synth.UpdateStream(g, seed=seed + 1),
        "graph": g,
        "info": g.stats(),
    }


# ---- the benchmark -----------------------------------------------------------------------------
def memory_info(engine: IncrementalEngine) -> dict[str, Any]:
    rep = engine.replica
    nb = rep.nbytes()
    n, e = max(rep.num_nodes, 1), max(rep.num_edges, 1)
    cache = sum(t[: rep.num_slots].element_size() * t[: rep.num_slots].nelement() for t in engine.h + engine.S)
    used = 10 * rep.top
    return {
        "replica_bytes_per_edge_used": round(used / e, 2),
        "replica_bytes_per_edge_alloc": round(nb["half_edge_arrays"] / e, 2),
        "replica_bytes_per_node_arrays": round(nb["node_arrays"] / max(rep.num_slots, 1), 2),
        "cache_bytes_per_node": round(cache / n, 1),
    }


def snapshot(engine: IncrementalEngine) -> dict[str, Any]:
    """A copy of the engine's state (replica and caches) to ``restore`` later."""
    state = engine.state_dict()
    state["replica"] = {k: (v.copy() if isinstance(v, np.ndarray) else copy.deepcopy(v)) for k, v in state["replica"].items()}
    state["h"] = [t.clone() for t in state["h"]]
    state["S"] = [t.clone() for t in state["S"]]
    state["count"] = [t.clone() for t in state["count"]]
    return state


def restore(engine: IncrementalEngine, state: dict[str, Any]) -> None:
    """Put a ``snapshot`` back (``IncrementalEngine.restore``)."""
    engine.restore(state)


class Bench:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.device = resolve_device(args.device)
        self.timer = Timer(self.device)
        self.rows: list[dict[str, Any]] = []
        self.started = time.monotonic()
        self.out = Path(args.output) if args.output else None
        self.kept: list[dict[str, Any]] = []
        if self.out and self.out.exists() and not args.fresh:
            try:
                self.kept = json.loads(self.out.read_text())
            except (ValueError, OSError):
                self.kept = []
        self.services, self.publisher, self.topic = self.start_broker()
        self.host = {
            "host": platform.node(),
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "python": platform.python_version(),
            "gpu": torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else None,
        }

    def start_broker(self) -> tuple[LocalServices | None, KafkaPublisher, str]:
        """The broker (a) publishes to: ``--bootstrap``, or an embedded Tansu started here."""
        a = self.args
        if a.bootstrap:
            settings = Settings(_env_file=None, bootstrap_servers=a.bootstrap)
            services = None
        else:
            state = Path(tempfile.mkdtemp(prefix="kgs-incremental-"))
            settings = Settings(
                _env_file=None, state_dir=state, local_broker=a.local_broker, bootstrap_servers=f"127.0.0.1:{free_port()}"
            )
            services = LocalServices(settings)
            services.up(("broker",), timeout_s=180)
        ensure_topics(settings)
        log(f"(a) publishes to {settings.topic_embeddings} on {settings.bootstrap_servers} ({a.vector_encoding})")
        return services, KafkaPublisher(settings, client_id="kgs-bench-incremental"), settings.topic_embeddings

    def close(self) -> None:
        self.publisher.close()
        if self.services is not None:
            self.services.down()
            shutil.rmtree(Path(self.services.settings.state_dir), ignore_errors=True)

    def over_budget(self) -> bool:
        return self.args.time_budget_s is not None and time.monotonic() - self.started > self.args.time_budget_s

    def emit(self, row: dict[str, Any]) -> None:
        row = {"device": str(self.device), "sums": self.args.agg_dtype, **row}
        if self.device.type == "cpu":
            row["loadavg_1m"] = round(os.getloadavg()[0], 2)
        self.rows.append(row)
        log(json.dumps(row))
        self.save()

    def save(self) -> None:
        if not self.out:
            return
        mine = {(r.get("dataset"), r.get("device")) for r in self.rows}
        rows = [r for r in self.kept if (r.get("dataset"), r.get("device")) not in mine] + self.rows
        self.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.out.with_suffix(".tmp")
        tmp.write_text(json.dumps(rows, indent=1) + "\n")
        tmp.replace(self.out)

    def model(self, in_dim: int) -> GraphEncoder:
        a = self.args
        return GraphEncoder(GraphEncoderConfig(in_dim=in_dim, hidden=a.hidden, out=a.out, layers=a.layers, seed=0))

    def dataset(self, name: str) -> None:
        a = self.args
        log(f"dataset {name}: building")
        t0 = time.perf_counter()
        if name == "retail":
            ds = retail_dataset(Path(a.retail), a.retail_split, a.dim)
        elif name.startswith("synth:"):
            ds = synth_dataset(name.split(":", 1)[1], a.seed)
        else:
            raise SystemExit(f"unknown dataset {name!r}")
        build_s = time.perf_counter() - t0
        engine = IncrementalEngine(
            self.model(a.dim),
            self.device,
            reanchor_every=a.reanchor_every,
            agg_dtype=getattr(torch, a.agg_dtype),
            full_ratio=a.full_ratio,
        )
        load_s, _ = self.timer(lambda: load_into(engine, ds))
        del ds["features"]
        log(f"dataset {name}: built in {build_s:.1f}s, loaded in {load_s:.1f}s: {ds['info']}")
        adj = engine.adjacency(torch.float32)  # (c) sums in float32, like PyG
        fulls, full_cpu = [], []
        full: list[torch.Tensor] = []
        for _ in range(a.full_reps):
            dt, full = self.timer(lambda adj=adj: engine.full_layers(adj))
            fulls.append(dt)
            full_cpu.append(self.timer.cpu)
        live = engine.as_index(engine.replica.live_slots())
        err0 = max(float((full[k][live] - engine.h[k][live]).abs().max()) for k in range(1, engine.L + 1))
        del full
        # (c) with PyG's own layers: SAGEConv over the same CSR adjacency (it is PyG's adj_t:
        # row = receiver); the faster of the two is (c)
        n = engine.replica.num_slots
        pygs, pyg_cpu = [], []
        out = torch.zeros(0)
        for _ in range(a.full_reps):
            dt, out = self.timer(lambda adj=adj: engine.model.forward(engine.h[0][:n], adj))
            pygs.append(dt)
            pyg_cpu.append(self.timer.cpu)
        err_pyg = float((out[live] - engine.h[engine.L][live]).abs().max())
        del out, adj
        full_s = min(min(fulls), min(pygs))
        self.full_cpu_s = min(min(full_cpu), min(pyg_cpu))
        self.emit(
            {
                "kind": "dataset",
                "dataset": name,
                "nodes": engine.replica.num_nodes,
                "typed_edges": engine.replica.num_edges,
                "directed_edges": 2 * engine.replica.num_edges,
                "build_s": round(build_s, 2),
                "load_s": round(load_s, 2),
                "full_ms": round(1000 * full_s, 2),
                "cpu_ms_full": round(1000 * self.full_cpu_s, 2),
                "full_runs_ms": [round(1000 * x, 2) for x in fulls],
                "full_pyg_runs_ms": [round(1000 * x, 2) for x in pygs],
                "full_path": "fused" if min(fulls) <= min(pygs) else "pyg_sageconv",
                "rebuild_vs_full_err": err0,
                "pyg_vs_engine_err": err_pyg,
                **memory_info(engine),
                "info": ds["info"],
                "run": self.host,
            }
        )
        khop = KHopBaseline(engine, batch_size=a.khop_batch)
        self.e2e = EndToEnd(engine, self.publisher, self.topic, a.vector_encoding)
        self.sub = SubgraphBaseline(engine)
        rng = np.random.default_rng(a.seed)
        reps = QUICK_REPS if a.quick else REPS
        for B in a.batch_sizes:
            if self.over_budget():
                log(f"time budget spent: skipping batch size {B} and later")
                break
            for mode in a.modes:
                if mode == "bounded":  # the worker's defaults, not the hub cases' thresholds
                    engine.configure("bounded", *WORKER_THRESHOLDS)
                self.batch_series(name, engine, ds["stream"], khop, B, reps.get(B, 3), full_s, rng, mode)
                if mode == "bounded":
                    engine.configure("exact")  # rebuild(): exact again (untimed)
            if a.sweep_full_ratio and not self.over_budget():
                self.ratio_sweep(name, engine, ds["stream"], B, reps.get(B, 3), full_s)
        if ds["graph"] is not None and a.hubs and not self.over_budget():
            self.hubs(name, engine, ds["graph"])

    def batch_series(
        self,
        name: str,
        engine: IncrementalEngine,
        stream: Any,
        khop: KHopBaseline,
        B: int,
        reps: int,
        full_s: float,
        rng: np.random.Generator,
        mode: str = "exact",
    ) -> None:
        """One series of ``reps`` batches of size ``B`` in ``mode`` (the engine is configured
        by the caller). In bounded mode the secondary (b) and the isolated pass are left out:
        the row is about what the user's default costs end to end and how far it is from exact."""
        a, L = self.args, engine.L
        exact = mode == "exact"
        if B <= 100:  # warm-up (allocator, caches, the producer's connection)
            ch, f = stream.next(B)
            self.e2e(ch, f)
        batches = [stream.next(B) for _ in range(reps)]
        iso: list[float] = []
        if exact and self.isolate(engine):  # (a) alone first, on the same batches
            snap = snapshot(engine)
            for ch, f in batches:
                dt, _ = self.timer(lambda: engine.apply(ch, f, with_vectors=False))
                iso.append(dt)
            restore(engine, snap)
            del snap
        ta, tb, fracs, errs, aff, pub, msgs, cpu, cpub, fl, held = [], [], [], [], [], [], [], [], [], [], []
        stages: dict[str, list[float]] = {"apply": [], "serialise": [], "publish": []}
        nbytes, tsub, cpusub, errsub = [], [], [], []
        for r, (ch, f) in enumerate(batches):
            if r and self.over_budget():
                break
            dt, report = self.timer(lambda ch=ch, f=f: self.e2e(ch, f))
            cpu.append(self.timer.cpu)
            ta.append(dt)
            for k, v in self.e2e.stages.items():
                stages[k].append(v)
            nbytes.append(self.e2e.bytes)
            self.sub.prepare()  # the user's prebuilt edge_index, after the batch (untimed)
            sdt, serr = self.sub.run(seed_rows(ch, engine))
            tsub.append(sdt)
            cpusub.append(self.sub.cpu_s)
            errsub.append(serr)
            aff.append(report.affected)
            pub.append(self.e2e.vectors)
            msgs.append(report.delta_messages)
            fl.append(report.full_layers)
            held.append(report.vectors_suppressed)
            if not exact:
                continue
            seeds = report.affected_rows[L].numpy()
            sb, done, out, frac = khop.run(seeds, a.khop_budget_s / reps, rng)
            tb.append(sb)
            cpub.append(khop.cpu_s)
            fracs.append(frac)
            if out is not None:
                errs.append(float((out - engine.h[L][engine.as_index(done)]).abs().max()))
        verify_s, (err_full, over) = self.timer(lambda: engine.verify(method="layers"))
        a_med, sub_med = float(np.median(ta)), float(np.median(tsub))
        b_med = float(np.median(tb)) if tb else float("nan")
        best = min(sub_med, full_s)

        def med_ms(xs: list[float]) -> float:
            return round(1000 * float(np.median(xs)), 3)

        self.emit(
            {
                "kind": "batch",
                "dataset": name,
                "batch_size": B,
                "mode": mode,
                "propagate_threshold": 0.0 if exact else WORKER_THRESHOLDS[0],
                "publish_threshold": 0.0 if exact else WORKER_THRESHOLDS[1],
                "error_bound": engine.error_bound,
                "reps": len(ta),
                "stream": "mixed",
                "ms_end_to_end": round(1000 * a_med, 3),
                "ms_end_to_end_p90": round(1000 * float(np.percentile(ta, 90)), 3),
                "ms_stages": {k: med_ms(v) for k, v in stages.items()},
                "vectors_published": int(np.median(pub)),
                "bytes_published": int(np.median(nbytes)),
                "vector_encoding": a.vector_encoding,
                "ms_khop_subgraph": round(1000 * sub_med, 3),
                "cpu_ms_khop_subgraph": med_ms(cpusub),
                "max_abs_err_khop_subgraph": max(errsub),
                "best_baseline": "khop_subgraph" if sub_med <= full_s else "full",
                "speedup_vs_best": round(best / a_med, 2),
                # the baselines' users must publish the same vectors too (a lower bound: they
                # would also have to find which ones moved): best + our serialise and publish
                "speedup_vs_best_publishing": round(
                    (best + float(np.median(stages["serialise"])) + float(np.median(stages["publish"]))) / a_med, 2
                ),
                "cpu_speedup_vs_best": round(
                    min(float(np.median(cpusub)), self.full_cpu_s) / max(float(np.median(cpu)), 1e-9), 2
                ),
                "khop_measured_fraction": 1.0,  # (b') and (c) are measured whole, every batch
                "minibatch_khop_measured_fraction": round(float(np.min(fracs)), 4) if fracs else None,
                "ms_incremental": med_ms(stages["apply"]),
                "ms_incremental_p90": round(1000 * float(np.percentile(ta, 90)), 3),
                "cpu_ms_incremental": round(1000 * float(np.median(cpu)), 3),
                "cpu_ms_khop": round(1000 * float(np.median(cpub)), 3) if cpub else None,
                "cpu_ms_full": round(1000 * self.full_cpu_s, 3),
                "cpu_speedup_vs_khop": round(float(np.median(cpub)) / max(float(np.median(cpu)), 1e-9), 2) if cpub else None,
                "cpu_speedup_vs_full": round(self.full_cpu_s / max(float(np.median(cpu)), 1e-9), 2),
                "ms_khop": round(1000 * b_med, 3) if tb else None,
                "ms_full": round(1000 * full_s, 3),
                "speedup_vs_khop": round(b_med / a_med, 2) if tb else None,
                "speedup_vs_full": round(full_s / a_med, 2),
                "updates_per_s": round(B / a_med, 1),
                "max_abs_err": err_full,
                "max_abs_err_vs_khop": max(errs) if errs else None,
                "max_abs_err_full": err_full,
                "rows_over_1e-5": over,
                "verify_s": round(verify_s, 2),
                "affected_per_layer_median": [int(x) for x in np.median(np.asarray(aff), axis=0)],
                "affected_per_layer_max": [int(x) for x in np.max(np.asarray(aff), axis=0)],
                "published_median": int(np.median(pub)),
                "vectors_held_back_median": int(np.median(held)),
                "delta_messages_median": int(np.median(msgs)),
                "full_ratio": engine.full_ratio,
                "switch_ratio": round(engine.switch_ratio(), 5),  # the calibrated break-even at the series' end
                "full_layers": fl,
                "ms_incremental_isolated": round(1000 * float(np.median(iso)), 3) if iso else None,
                "speedup_vs_khop_isolated": round(b_med / float(np.median(iso)), 2) if iso else None,
            }
        )

    def isolate(self, engine: IncrementalEngine) -> bool:
        """Whether to time (a) in its own pass too: its caches are copied to host memory and
        back, so only below ``--isolate-max-gb``."""
        n = engine.replica.num_slots
        gb = sum(t[:n].element_size() * t[:n].nelement() for t in engine.h + engine.S) / 1e9
        return self.args.isolate_max_gb > 0 and gb <= self.args.isolate_max_gb

    def ratio_sweep(self, name: str, engine: IncrementalEngine, stream: Any, B: int, reps: int, full_s: float) -> None:
        """(a) alone under each ``--sweep-full-ratio`` value, on the next batches of the stream
        (different batches of the same size, so compare medians), then one exactness check."""
        default, costs = engine.full_ratio, engine.costs
        engine.costs = None  # a fixed switch point per sweep value
        for ratio in self.args.sweep_full_ratio:
            engine.full_ratio = ratio
            ta, fl = [], []
            for _ in range(reps):
                ch, f = stream.next(B)
                dt, report = self.timer(lambda: engine.apply(ch, f, with_vectors=False))
                ta.append(dt)
                fl.append(report.full_layers)
            med = float(np.median(ta))
            self.emit(
                {
                    "kind": "full_ratio_sweep",
                    "dataset": name,
                    "batch_size": B,
                    "full_ratio": ratio,
                    "reps": len(ta),
                    "ms_incremental": round(1000 * med, 3),
                    "ms_full": round(1000 * full_s, 3),
                    "speedup_vs_full": round(full_s / med, 2),
                    "full_layers": fl,
                }
            )
        engine.full_ratio, engine.costs = default, costs
        err, over = engine.verify(method="layers")
        self.emit(
            {"kind": "full_ratio_sweep_check", "dataset": name, "batch_size": B, "max_abs_err": err, "rows_over_1e-5": over}
        )

    def hubs(self, name: str, engine: IncrementalEngine, g: synth.SynthGraph) -> None:
        a = self.args
        eps, tau = a.propagate_threshold, a.publish_threshold
        cat_key = g.keys[g.largest_category()]
        members = [g.keys[int(p)] for p in np.flatnonzero(g.category_of == g.largest_category() - g.leaf0)]
        rep = engine.replica
        cat_slot = rep.index[cat_key]
        # products still in the category after the update stream ran (it deletes some)
        members = [k for k in members if k in rep.index and rep.has_edge(rep.index[k], "IN_CATEGORY", cat_slot)]
        cases = [
            ("product_in_largest_category", members[0]),
            ("largest_category_node", cat_key),
            ("most_active_user", g.keys[g.most_active_user()]),
        ]
        ts = 2_000_000_000_000
        for case, key in cases:
            if self.over_budget():
                break
            label, nid = C.split_key(key)
            slot = engine.replica.index[key]
            old = engine.h[0][slot].clone()
            new = _unit(f"hub|{key}", engine.dims[0]).to(engine.device)
            deg = int(engine.replica.length[slot])
            for mode in ("exact", "bounded"):
                if mode == "bounded":
                    engine.configure("bounded", eps, tau)
                ts += 1
                dt, rep = self.timer(lambda: engine.apply([C.node_upsert(label, nid, ts)], {key: new}, with_vectors=False))
                cpu_s = self.timer.cpu
                vs, (err, over) = self.timer(lambda: engine.verify(method="layers"))
                self.emit(
                    {
                        "kind": "hub",
                        "dataset": name,
                        "case": case,
                        "key": key,
                        "degree": deg,
                        "mode": mode,
                        "ms": round(1000 * dt, 3),
                        "cpu_ms": round(1000 * cpu_s, 3),
                        "affected_per_layer": rep.affected,
                        "changed_per_layer": rep.changed,
                        "vectors_published": len(rep.changed_rows),
                        "vectors_suppressed": rep.vectors_suppressed,
                        "suppressed_per_layer": rep.suppressed,
                        "max_residual_per_layer": rep.max_residual,
                        "delta_messages": rep.delta_messages,
                        "max_abs_err": err,
                        "rows_over_bound": over,
                        "error_bound": rep.error_bound,
                        "propagate_threshold": eps if mode == "bounded" else 0.0,
                        "publish_threshold": tau if mode == "bounded" else 0.0,
                    }
                )
                ts += 1  # put the old features back, exactly
                if mode == "bounded":
                    engine.configure("exact")  # rebuild(): exact again
                engine.apply([C.node_upsert(label, nid, ts)], {key: old}, with_vectors=False)
        # a burst of feature changes inside the largest category, one per batch
        rng = np.random.default_rng(a.seed + 7)
        for mode in ("exact", "bounded"):
            if self.over_budget():
                break
            if mode == "bounded":
                engine.configure("bounded", eps, tau)
            total, total_cpu, pub, sup = 0.0, 0.0, 0, 0
            for i, p in enumerate(rng.choice(len(members), size=min(a.burst, len(members)), replace=False)):
                ts += 1
                key = members[int(p)]
                x = _unit(f"burst|{mode}|{i}|{key}", engine.dims[0])
                dt, rep = self.timer(
                    lambda: engine.apply([C.node_upsert("Product", key.split(":", 1)[1], ts)], {key: x}, with_vectors=False)
                )
                total += dt
                total_cpu += self.timer.cpu
                pub += len(rep.changed_rows)
                sup += rep.vectors_suppressed
            err, over = engine.verify(method="layers")
            self.emit(
                {
                    "kind": "hub_burst",
                    "dataset": name,
                    "case": f"{a.burst} feature changes in the largest category",
                    "category_size": int(len(members)),
                    "mode": mode,
                    "ms_total": round(1000 * total, 2),
                    "ms_per_update": round(1000 * total / a.burst, 3),
                    "cpu_ms_per_update": round(1000 * total_cpu / a.burst, 3),
                    "vectors_published": pub,
                    "vectors_suppressed": sup,
                    "max_abs_err": err,
                    "rows_over_bound": over,
                    "error_bound": engine.error_bound,
                    "propagate_threshold": eps if mode == "bounded" else 0.0,
                    "publish_threshold": tau if mode == "bounded" else 0.0,
                }
            )
            if mode == "bounded":
                engine.configure("exact")


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--datasets", default=None, help="comma list: retail, synth:<preset> (tiny|small|1m|products)")
    p.add_argument("--quick", action="store_true", help="retail + synth:small, fewer repetitions")
    p.add_argument("--batch-sizes", default="1,10,100,1000,10000")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--dim", type=int, default=384, help="input feature width (text embedding size)")
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--out", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument(
        "--full-ratio",
        type=float,
        default=None,
        help="switch a layer to a full pass at this messages/half-edges ratio (default: the "
        "engine's per-device default; 0: never)",
    )
    p.add_argument(
        "--isolate-max-gb",
        type=float,
        default=4.0,
        help="also time (a) in a pass of its own over the same batches (InkStream times each "
        "method in its own run) when the engine's caches are at most this many GB; 0: never",
    )
    p.add_argument(
        "--sweep-full-ratio",
        type=lambda v: [float(x) for x in v.split(",") if x],
        default=[],
        help="after each batch size, time (a) alone under each of these full_ratio values",
    )
    p.add_argument("--reanchor-every", type=int, default=256)
    p.add_argument(
        "--agg-dtype",
        choices=["float64", "float32"],
        default="float64",
        help="the engine's neighbour sums (float32: the engine before the products-scale run)",
    )
    p.add_argument("--khop-batch", type=int, default=1024, help="seeds per NeighborLoader mini-batch")
    p.add_argument(
        "--khop-budget-s",
        type=float,
        default=40.0,
        help="per batch-size series (split over its batches): measure the k-hop baseline this "
        "long, then extrapolate (at least one seed mini-batch per batch is always measured)",
    )
    p.add_argument("--full-reps", type=int, default=2)
    p.add_argument("--bootstrap", default=None, help="the broker (a) publishes to (default: an embedded Tansu started here)")
    p.add_argument("--local-broker", choices=["tansu", "noida"], default="tansu", help="the embedded broker to start")
    p.add_argument("--vector-encoding", choices=["json", "f32", "f16"], default="f16", help="how (a) serialises its vectors")
    p.add_argument("--hubs", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--burst", type=int, default=50)
    p.add_argument(
        "--modes",
        type=lambda v: [m for m in v.split(",") if m],
        default=["exact", "bounded"],
        help="the engine modes of the batch series (bounded: the worker's default mode and thresholds, "
        "KGS_EMBED_PROPAGATE_THRESHOLD / KGS_EMBED_PUBLISH_THRESHOLD's defaults)",
    )
    p.add_argument("--propagate-threshold", type=float, default=5e-5)
    p.add_argument("--publish-threshold", type=float, default=1e-4)
    p.add_argument("--retail", default=str(DEFAULT_RETAIL))
    p.add_argument("--retail-split", type=float, default=0.5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--time-budget-s", type=float, default=None, help="stop starting new work after this long")
    p.add_argument("--output", default=str(Path(__file__).resolve().parent / "results" / "incremental.json"))
    p.add_argument("--fresh", action="store_true", help="do not keep rows of earlier runs in --output")
    p.add_argument(
        "--import-rows", default=None, help="merge the rows of another run's JSON (e.g. the GPU run's) into --output, then exit"
    )
    args = p.parse_args(argv)
    if args.datasets is None:
        args.datasets = "retail,synth:small" if args.quick else "retail,synth:1m"
    args.datasets = [d for d in args.datasets.split(",") if d]
    args.batch_sizes = [int(b) for b in args.batch_sizes.split(",") if b]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.import_rows:
        out = Path(args.output)
        rows = json.loads(out.read_text()) if out.exists() else []
        new = json.loads(Path(args.import_rows).read_text())
        keys = {(r.get("dataset"), r.get("device")) for r in new}
        rows = [r for r in rows if (r.get("dataset"), r.get("device")) not in keys] + new
        out.write_text(json.dumps(rows, indent=1) + "\n")
        log(f"{out}: {len(new)} rows imported from {args.import_rows}, {len(rows)} in all")
        return 0
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    bench = Bench(args)
    log(f"device {bench.device}, torch threads {torch.get_num_threads()}, datasets {args.datasets}")
    try:
        for name in args.datasets:
            if bench.over_budget():
                log(f"time budget spent: skipping dataset {name}")
                continue
            bench.dataset(name)
    finally:
        bench.close()
    print(json.dumps(bench.rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
