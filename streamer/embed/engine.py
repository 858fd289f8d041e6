"""Exact incremental GNN inference over a stream of graph changes.

Contract
--------
``IncrementalEngine(model, device)`` holds a ``Replica`` of the graph and, for every slot,
every layer's activations ``h[0..L]`` (``h[0]`` = input features) plus, per layer ``l``, the
neighbour **sum** ``S[l] = sum_{u in N(v)} h[l][u]`` that layer ``l+1`` aggregates (its degree is
the replica's block length). ``apply(changes)`` takes one micro-batch of
``streamer.contracts.changes.Change`` records (any mix of node_upsert / node_delete / edge_upsert /
edge_delete, applied in order; idempotent: replaying a record changes nothing) and brings
every cache to the state a full forward pass over the new graph would give, touching only:

1. *structure*: each inserted/removed edge adds/subtracts the neighbour's **old** activation
   to/from the endpoint's sums at every layer (O(d) per edge and layer);
2. *features*: ``A_0`` = nodes whose input features changed (new or re-encoded text);
3. *layer l = 1..L*: every node ``u`` whose ``h[l-1]`` changed (``C_{l-1}``) adds
   ``h_new[u] - h_old[u]`` to the sums of its neighbours in the new graph (O(d) per half-edge;
   the neighbours of the receiver are never read), and
   ``A_l = C_{l-1} + N(C_{l-1}) + endpoints of changed edges + new nodes``
   is recomputed densely, ``h[l] = dense(S/deg, h[l-1])``, reading only cached rows. ``C_l`` is
   the part of ``A_l`` whose row actually changed (bitwise), so nothing propagates from rows
   that did not move.

Algebra (for one layer): ``S_new[v] = S_old[v] - sum_removed h_old + sum_added h_old +
sum_{u in N_new(v)} (h_new[u] - h_old[u])``, which is exact; only rounding differs from a fresh
sum. Rows outside ``A_l`` are never written, so they stay bit-identical.

Drift guard: each (slot, layer) counts the deltas added into its sum; when the count reaches
``reanchor_every`` the sum is recomputed from the neighbours (and the count reset) before it is
used. A row whose degree drops to 0 gets an exactly-zero sum. ``rebuild()`` re-anchors all.
The sums are float64 by default (``agg_dtype``): a float32 sum over hundreds of thousands of
similar rows (a product's viewers all carry the User type embedding) is off by ~1e-5 of the
mean, which the weights amplify past the 1e-5 exactness bar.

Batches are planned, not looped: one Python pass resolves keys to slots; edge records are
applied per run (a run ends at a node delete) by their net effect per distinct edge, with
vectorised replica calls (``find_edges`` / ``add_edges`` / ``remove_edges_at``). All set
bookkeeping (affected sets, unions, degrees, drift counters) is numpy on the host; the caches,
sums and dense work live on the device (CPU or CUDA).

Large batches: before layer ``l`` the engine knows how many delta messages it would
send, ``sum deg(C_{l-1})`` plus the structural ends. When that reaches ``full_ratio`` times the
graph's half-edges, layers ``l..L`` switch to full-graph passes instead (``_full_from``): one
blocked float32 CSR product over all rows gives fresh sums (rows cut into blocks of at most
``F32_BLOCK`` terms, the blocks added in ``agg_dtype``: ``_blocked``), and the *structural*
rule above still decides which rows are written and published (``A_l`` from the neighbour
blocks of ``C_{l-1}``, as on the delta path), so rows outside ``A_l`` stay bit-identical (a row of
``A_l`` may move by the float32 rounding, and is then published in exact mode).
The written sums are fresh, i.e. re-anchored; in bounded mode ``_select`` still decides
which recomputed rows pass their change on. A fixed ``full_ratio`` sets the switch point (0
turns it off). Left unset, on CPU the switch point is the break-even of a cost model calibrated
online from the engine's own layers (``PathCosts``: seconds per delta message, seconds per
half-edge of a full layer), starting from ``FULL_RATIO``; on CUDA it is ``FULL_RATIO``
(measured in docs/performance.md). Either path is exact, so the switch moves only the time.

Bounded mode (``mode="bounded"``; docs/engine.md): a recomputed row of layer ``l`` passes its
change on only when it moved by more than ``thresholds[l]`` (propagate threshold for hidden
layers, publish threshold for layer L) against its *stored* row; the rest is carried forward
implicitly, and ``error_bound`` bounds the error against a full recompute. ``_select`` is the
hook; exact mode passes every row that moved.

``full_recompute()`` is the plain PyG forward over the whole replica, ``full_layers()`` the
layer-wise sparse full pass (float64 sums); ``verify()`` compares one of them with the cached
state. ``save``/``load`` persist replica and caches. A deleted node's slot is zeroed and reused
by later batches; the report lists its key so the worker publishes a tombstone.
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, cast

import numpy as np
import torch
from torch import Tensor

from encoders.graph import GraphEncoder, SageLinear, fuse, fused_dim, vector_version
from encoders.text import resolve_device
from streamer.contracts.changes import Change
from streamer.embed.replica import Replica
from streamer.embed.shards import owned_mask, shard_of, shards_of

log = logging.getLogger(__name__)

FeatureMap = Mapping[str, Tensor]
Featurize = Callable[[Sequence[Change]], FeatureMap]
STATE_FORMAT = 1
# messages / half-edges at which a layer switches to a full pass, per device type (measured:
# docs/performance.md, "Switching to full passes"); a CUDA full pass is cheap next to the host-side
# index work of a large incremental layer
FULL_RATIO = {"cpu": 0.1, "cuda": 0.02}
CALIBRATE_MIN_MESSAGES = 2_000  # delta layers below this are mostly fixed cost: not a per-message rate
# The most terms a full pass sums in one float32 run (``IncrementalEngine._blocked``): a float32
# sum of d identical rows drifts ~2.3e-9 x d from the exact mean (bench/float_sums.py: 1.5e-3 at
# d = 657k), so blocks of 256 stay ~40x under the 1e-5 bound; the blocks add up in float64.
F32_BLOCK = 256


@dataclass
class PathCosts:
    """The switch's cost model, calibrated online from the engine's own layers (module doc,
    "Large batches"): seconds per delta message (delta layers of at least
    ``CALIBRATE_MIN_MESSAGES``) and seconds per half-edge of a full-pass layer (``_full_from``,
    CSR build included; ``rebuild`` gives a first, lower estimate), each a moving average. A
    layer is cheaper as a full pass once ``messages x per_message >= half_edges x
    per_half_edge``: ``ratio()`` is that break-even, the prior until both are measured."""

    prior: float
    per_message: float | None = None
    per_half_edge: float | None = None
    full_measured: bool = False  # per_half_edge comes from a real full-pass layer, not a rebuild

    def ratio(self) -> float:
        if self.per_message is None or self.per_half_edge is None:
            return self.prior
        return self.per_half_edge / self.per_message

    def observe_delta(self, seconds: float, messages: int) -> None:
        if messages >= CALIBRATE_MIN_MESSAGES:
            self.per_message = _ewma(self.per_message, seconds / messages)

    def observe_full(self, seconds: float, half_edges: int, rebuild: bool = False) -> None:
        if half_edges <= 0 or (rebuild and self.full_measured):
            return
        rate = seconds / half_edges
        self.per_half_edge = rate if rebuild or not self.full_measured else _ewma(self.per_half_edge, rate)
        self.full_measured = self.full_measured or not rebuild


def _ewma(old: float | None, new: float, weight: float = 0.3) -> float:
    return new if old is None else old + weight * (new - old)


@dataclass
class BatchReport:
    """What one micro-batch did. ``changed_*`` are aligned; ``vectors`` too when requested."""

    changes: int = 0
    affected: list[int] = field(default_factory=list)  # |A_0| .. |A_L|
    changed: list[int] = field(default_factory=list)  # |C_0| .. |C_L| (rows that moved)
    rows_recomputed: int = 0  # sum over l >= 1 of |A_l|
    delta_messages: int = 0  # rows added into some sum by delta
    reanchored_rows: int = 0
    full_layers: int = 0  # layers computed by a full pass (large batches)
    neighbour_reads: int = 0  # neighbour rows read by re-anchoring
    changed_keys: list[str] = field(default_factory=list)
    changed_rows: Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))
    changed_ts: list[int] = field(default_factory=list)
    vectors: Tensor | None = None
    deleted_keys: list[str] = field(default_factory=list)
    max_ts: int | None = None
    seconds: float = 0.0
    affected_rows: list[Tensor] = field(default_factory=list)  # per layer, on CPU
    # bounded mode (all zero in exact mode): per layer 0..L, recomputed rows whose value moved
    # but stayed under the layer's threshold (held back), and the largest such change
    suppressed: list[int] = field(default_factory=list)
    max_residual: list[float] = field(default_factory=list)
    vectors_suppressed: int = 0  # refreshed vectors not published (h_L under the publish threshold)
    error_bound: float = 0.0  # a priori bound on max |h - exact| after this batch

    def summary(self) -> dict[str, Any]:
        return {
            "changes": self.changes,
            "affected": self.affected,
            "changed": self.changed,
            "rows_recomputed": self.rows_recomputed,
            "delta_messages": self.delta_messages,
            "reanchored_rows": self.reanchored_rows,
            "full_layers": self.full_layers,
            "published": len(self.changed_rows),
            "deleted": len(self.deleted_keys),
            "suppressed": self.suppressed,
            "vectors_suppressed": self.vectors_suppressed,
            "max_residual": self.max_residual,
            "error_bound": self.error_bound,
            "seconds": round(self.seconds, 6),
        }


class _EdgeRun:
    """Edge records of a micro-batch between two node deletes, resolved to slots, in order."""

    __slots__ = ("s", "r", "d", "op", "ts")

    def __init__(self) -> None:
        self.s: list[int] = []
        self.r: list[int] = []
        self.d: list[int] = []
        self.op: list[int] = []  # 1 = upsert, 0 = delete
        self.ts: list[int] = []

    def add(self, s: int, r: int, d: int, op: int, ts: int) -> None:
        self.s.append(s)
        self.r.append(r)
        self.d.append(d)
        self.op.append(op)
        self.ts.append(ts)

    def take(self) -> tuple[np.ndarray, ...]:
        out = tuple(np.asarray(x, dtype=np.int64) for x in (self.s, self.r, self.d, self.op, self.ts))
        for x in (self.s, self.r, self.d, self.op, self.ts):
            x.clear()
        return out


class _Structure:
    """Structural sum events: ``owner``'s sums gain (+1) or lose (-1) ``src``'s *old* row."""

    def __init__(self) -> None:
        self.parts: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []

    def add(self, owner: np.ndarray, src: np.ndarray | int, sign: float, ts: np.ndarray | int) -> None:
        owner = np.asarray(owner, dtype=np.int64)
        n = len(owner)
        if n:
            self.parts.append(
                (
                    owner,
                    np.broadcast_to(np.asarray(src, dtype=np.int64), (n,)),
                    np.full(n, sign, dtype=np.float32),
                    np.broadcast_to(np.asarray(ts, dtype=np.int64), (n,)),
                )
            )

    def edges(self, s: np.ndarray, d: np.ndarray, sign: float, ts: np.ndarray) -> None:
        """Both halves of each edge (one for a self-loop)."""
        self.add(d, s, sign, ts)
        k = s != d
        self.add(s[k], d[k], sign, ts[k])

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        if not self.parts:
            z = np.zeros(0, dtype=np.int64)
            return z, z, np.zeros(0, dtype=np.float32), z
        return tuple(np.concatenate([p[i] for p in self.parts]) for i in range(4))  # type: ignore[return-value]


def _lipschitz(model: GraphEncoder) -> list[float]:
    """Per layer l = 1..L (index 0 unused): an upper bound of how much an error of e (max-abs)
    in every input row of layer l can move an output row, for mean aggregation:
    ``||W_l||_inf + ||W_r||_inf`` (max absolute row sums; ReLU is 1-Lipschitz)."""
    out = [0.0]
    for conv in model.convs:
        lip = float(cast(SageLinear, conv.lin_l).weight.detach().abs().sum(1).max())
        lin_r = cast("SageLinear | None", getattr(conv, "lin_r", None))
        if lin_r is not None:
            lip += float(lin_r.weight.detach().abs().sum(1).max())
        out.append(lip)
    return out


class IncrementalEngine:
    def __init__(
        self,
        model: GraphEncoder,
        device: str | torch.device | None = "auto",
        *,
        fusion: Literal["concat", "mean"] = "concat",
        fusion_text_weight: float = 0.5,
        mode: Literal["exact", "bounded"] = "exact",
        propagate_threshold: float = 0.0,
        publish_threshold: float = 0.0,
        reanchor_every: int = 256,
        full_ratio: float | None = None,
        agg_dtype: torch.dtype = torch.float64,
        featurize: Featurize | None = None,
        text_model_id: str = "",
    ) -> None:
        self.device = resolve_device(device)
        self.model = model.to(self.device).eval()
        self.dims = model.dims
        self.L = model.num_layers
        self.mean = model.config.aggr == "mean"
        self.fusion, self.fusion_text_weight = fusion, fusion_text_weight
        self.out_dim = fused_dim(fusion, self.dims[0], self.dims[-1])
        self.reanchor_every = reanchor_every
        self.full_ratio = FULL_RATIO.get(self.device.type, 0.0) if full_ratio is None else float(full_ratio)
        if self.full_ratio < 0:
            raise ValueError("full_ratio must be >= 0 (0: never switch to full passes)")
        # unset on CPU: the switch follows the measured costs (on CUDA the layers are not timed:
        # kernels run asynchronously, and a sync per layer would cost more than it tells)
        self.costs: PathCosts | None = PathCosts(self.full_ratio) if full_ratio is None and self.device.type == "cpu" else None
        self.agg_dtype = agg_dtype
        self.featurize = featurize
        self.text_model_id = text_model_id
        self.lipschitz = _lipschitz(self.model)
        self.configure(mode, propagate_threshold, publish_threshold, _rebuild=False)
        self.replica = Replica()
        self.cap = 0
        self.h: list[Tensor] = [torch.zeros(0, d, device=self.device) for d in self.dims]
        self.S: list[Tensor] = [torch.zeros(0, d, device=self.device, dtype=agg_dtype) for d in self.dims[:-1]]
        # drift counters live on the host (index bookkeeping is numpy), whatever the device
        self.count = [torch.zeros(0, dtype=torch.int32) for _ in range(self.L)]
        self._ts = torch.zeros(0, dtype=torch.int64, device=self.device)
        self._pos = np.zeros(0, dtype=np.int64)  # scratch for set unions
        self._isnew = np.zeros(0, dtype=bool)  # scratch: created in this batch
        self._ones = torch.ones(1024, dtype=torch.int32)
        # a copy of the replica's half-edge array on the device, kept current from the
        # replica's write log (full passes then copy only what changed); CUDA only by default
        self.mirror_adjacency = self.device.type == "cuda"
        self._nbr_dev: Tensor | None = None
        self._nbr_of: Replica | None = None
        # sharded last layer (streamer/embed/shards.py): 0 = this engine owns every key
        self.shards = 0
        self._owned: frozenset[int] = frozenset()
        self._current_shards: frozenset[int] = frozenset()  # owned when the last batch was applied
        self._shard = np.full(0, -1, dtype=np.int32)  # per slot: its key's shard (-1: not known yet)
        self.ensure_capacity(16)

    # ---- identity and mode ---------------------------------------------------------------
    @property
    def model_version(self) -> str:
        """Version of the published vectors: graph model version + text model + fusion."""
        return vector_version(self.text_model_id, self.model.version, self.fusion, self.fusion_text_weight)

    def configure(
        self,
        mode: Literal["exact", "bounded"] = "exact",
        propagate_threshold: float = 0.0,
        publish_threshold: float = 0.0,
        *,
        _rebuild: bool = True,
    ) -> None:
        """Switch between exact and bounded mode (module doc, "Bounded mode"). exact -> bounded
        keeps the state (an exact state satisfies every bound); bounded -> exact re-anchors
        everything with ``rebuild()`` so that the state is exact again."""
        if mode not in ("exact", "bounded"):
            raise ValueError(f"mode must be 'exact' or 'bounded', not {mode!r}")
        if mode == "exact" and (propagate_threshold or publish_threshold):
            raise ValueError("thresholds need mode='bounded' (exact mode propagates every change)")
        if propagate_threshold < 0 or publish_threshold < 0:
            raise ValueError("thresholds must be >= 0")
        if mode == "bounded" and not self.mean:
            raise ValueError("bounded mode needs mean aggregation (with sum the bound grows with the degree)")
        was_bounded = getattr(self, "mode", "exact") == "bounded"
        self.mode = mode
        # eps[l]: a recomputed row of layer l passes its change on only above eps[l]; layer 0
        # (input features) is always exact, layer L's threshold is the publish threshold
        self.thresholds = [0.0] + [float(propagate_threshold)] * (self.L - 1) + [float(publish_threshold)]
        if _rebuild and was_bounded and mode == "exact":
            self.rebuild()

    @property
    def error_bound(self) -> float:
        """A priori bound on max |h_l - exact h_l| (every layer up to L) in the current mode:
        e_0 = 0, e_l = lip_l * e_(l-1) + eps_l, where lip_l = ||W_l||_inf + ||W_r||_inf (mean
        aggregation) and eps_l the layer's threshold. 0 in exact mode (up to float rounding)."""
        e = 0.0
        for layer in range(1, self.L + 1):
            e = self.lipschitz[layer] * e + self.thresholds[layer]
        return e

    # ---- storage -----------------------------------------------------------------------
    def ensure_capacity(self, need: int, headroom: bool = True) -> None:
        """Rows for ``need`` slots. Growth is by 1/4 (amortised O(1) per new node, and a
        2.5M-node engine does not briefly hold two full copies of 16 GB of caches)."""
        if need <= self.cap:
            return
        new = max(need, self.cap + self.cap // 4, 16) if headroom else need

        def grow(t: Tensor, fill: int = 0) -> Tensor:
            out = torch.full((new, *t.shape[1:]), fill, dtype=t.dtype, device=t.device)
            out[: t.shape[0]] = t
            return out

        for caches in (self.h, self.S, self.count):  # one tensor at a time: the old one is
            for i in range(len(caches)):  # freed before the next is allocated
                caches[i] = grow(caches[i])
        self._ts = grow(self._ts, -1)
        self._pos = np.zeros(new, dtype=np.int64)
        isnew = np.zeros(new, dtype=bool)
        isnew[: len(self._isnew)] = self._isnew
        self._isnew = isnew
        self.cap = new

    def as_index(self, a: np.ndarray | Sequence[int]) -> Tensor:
        """int64 index array -> tensor on the device (zero-copy on CPU)."""
        t = torch.from_numpy(np.ascontiguousarray(a, dtype=np.int64))
        return t if self.device.type == "cpu" else t.to(self.device)

    def _union(self, *parts: np.ndarray) -> np.ndarray:
        """Distinct elements of index arrays, O(total) with a scratch array (no sort)."""
        parts = tuple(p for p in parts if len(p))
        if not parts:
            return np.zeros(0, dtype=np.int64)
        idx = np.concatenate(parts).astype(np.int64, copy=False) if len(parts) > 1 else np.asarray(parts[0], np.int64)
        if len(idx) < 2:
            return idx
        ar = np.arange(len(idx), dtype=np.int64)
        self._pos[idx] = ar
        distinct: np.ndarray = idx[self._pos[idx] == ar]
        return distinct

    def _count(self, layer: int, idx: np.ndarray) -> None:
        """count[layer][idx] += 1 per occurrence (host int32; torch's index_add_ is much
        cheaper than numpy's ufunc.at for the small index arrays of small batches)."""
        if len(self._ones) < len(idx):
            self._ones = torch.ones(max(len(idx), 2 * len(self._ones)), dtype=torch.int32)
        self.count[layer].index_add_(0, torch.from_numpy(np.ascontiguousarray(idx, dtype=np.int64)), self._ones[: len(idx)])

    def _set_default_features(self, slots: np.ndarray) -> None:
        if len(slots):
            labels = [self.replica.label_of(int(s)) for s in slots]
            self.h[0][self.as_index(slots)] = self.model.type_features(labels).to(self.device)

    # ---- the incremental step ----------------------------------------------------------
    @torch.no_grad()
    def apply(self, changes: Sequence[Change], features: FeatureMap | None = None, with_vectors: bool = True) -> BatchReport:
        """Apply one micro-batch (in order) and bring every cache up to date. ``features``:
        new input features by node key (else ``featurize(changes)``, else the type embedding).
        ``with_vectors=False`` skips building the published keys, event times and vectors
        (``changed_rows`` is still set): for benchmarks and replays that publish nothing."""
        self._current_shards = self._owned  # sharded: the last layer of the other shards goes stale
        t_start = time.perf_counter()
        if features is None and self.featurize is not None:
            features = self.featurize(changes)
        features = features or {}
        rep = self.replica
        index, rel_ids = rep.index, rep.rel_index
        structure = _Structure()
        run = _EdgeRun()
        x_new: dict[int, tuple[Tensor | None, int]] = {}  # slot -> (features or None=type emb, ts)
        created: set[int] = set()
        removed: list[int] = []
        deleted: dict[str, None] = {}
        max_ts: int | None = None

        def node(key: str, label: str | None, ts: int) -> int:
            slot = index.get(key)
            if slot is None:
                slot, _ = rep.add_node(key, label)
                created.add(slot)
                x_new[slot] = (None, ts)
            return slot

        # one pass resolves keys to slots; edge records are applied in vectorised runs (a run
        # ends at a node delete, whose removal of incident edges must see the edges before it).
        # The common case (an edge upsert between known nodes) is inlined: this loop is the
        # per-record cost of a large batch.
        run_s, run_r, run_d, run_op, run_ts = run.s.append, run.r.append, run.d.append, run.op.append, run.ts.append
        for ch in changes:
            op, ts = ch.op, ch.ts
            if max_ts is None or ts > max_ts:
                max_ts = ts
            if op == "edge_upsert":
                assert ch.src is not None and ch.dst is not None and ch.rel is not None
                s = index.get(ch.src)
                if s is None:
                    s = node(ch.src, None, ts)
                d = index.get(ch.dst)
                if d is None:
                    d = node(ch.dst, None, ts)
                r = rel_ids.get(ch.rel)
                run_s(s)
                run_r(rep.rel_id(ch.rel) if r is None else r)
                run_d(d)
                run_op(1)
                run_ts(ts)
            elif op == "edge_delete":
                assert ch.src is not None and ch.dst is not None and ch.rel is not None
                s_old, d_old, r_old = index.get(ch.src), index.get(ch.dst), rel_ids.get(ch.rel)
                if s_old is not None and d_old is not None and r_old is not None:
                    run.add(s_old, r_old, d_old, 0, ts)
            elif op == "node_upsert":
                assert ch.key is not None
                slot = node(ch.key, ch.label, ts)
                x_new[slot] = (features.get(ch.key), ts)
                deleted.pop(ch.key, None)
            elif op == "node_delete":
                assert ch.key is not None
                deleted[ch.key] = None
                gone = index.get(ch.key)
                if gone is None:
                    continue
                self._apply_edges(run, structure)
                nbrs = rep.remove_node(gone)
                structure.add(nbrs[nbrs != gone], gone, -1.0, ts)
                removed.append(gone)
                x_new.pop(gone, None)
            else:
                raise ValueError(f"unknown change op {op!r}")
        self._apply_edges(run, structure)

        report = self._propagate(structure, x_new, created, removed, with_vectors)
        report.changes = len(changes)
        report.max_ts = max_ts
        report.deleted_keys = [k for k in deleted if k not in index and self.owns_key(k)]
        rep.maybe_compact()
        report.seconds = time.perf_counter() - t_start
        return report

    def _apply_edges(self, run: _EdgeRun, structure: _Structure) -> None:
        """Apply a run of edge records by their net effect per distinct edge (the last record
        of an edge decides whether it exists afterwards), vectorised."""
        if not run.s:
            return
        s, r, d, op, ts = run.take()
        rep = self.replica
        if len(s) > 1:
            n, nr = max(rep.num_slots, 1), max(len(rep.rels), 1)
            if n * n * nr < 1 << 62:
                key = (s * nr + r) * n + d
                order = np.argsort(key, kind="stable")
                ks = key[order]
                last = np.ones(len(s), dtype=bool)
                last[:-1] = ks[1:] != ks[:-1]
            else:
                order = np.lexsort((d, r, s))
                last = np.ones(len(s), dtype=bool)
                last[:-1] = (np.diff(s[order]) != 0) | (np.diff(r[order]) != 0) | (np.diff(d[order]) != 0)
            keep = order[last]
            s, r, d, op, ts = s[keep], r[keep], d[keep], op[keep], ts[keep]
        pos, owner = rep.find_edges(s, r, d)
        present = pos >= 0
        gone = present & (op == 0)
        if gone.any():
            rep.remove_edges_at(pos[gone], owner[gone], s[gone], d[gone])
            structure.edges(s[gone], d[gone], -1.0, ts[gone])
        new = ~present & (op == 1)
        if new.any():
            rep.add_edges(s[new], r[new], d[new])
            structure.edges(s[new], d[new], 1.0, ts[new])

    def _propagate(
        self,
        structure: _Structure,
        x_new: dict[int, tuple[Tensor | None, int]],
        created: set[int],
        removed: list[int],
        with_vectors: bool,
    ) -> BatchReport:
        rep, dev, L = self.replica, self.device, self.L
        self.ensure_capacity(rep.num_slots)
        report = BatchReport(suppressed=[0] * (L + 1), max_residual=[0.0] * (L + 1))
        alive = rep.alive
        touched_ts: list[Tensor] = []

        # 1. structure: sums gain/lose the neighbour's *old* row. Layer 0 here, layer l >= 1 just
        # before h[l] is overwritten; each only when layer l+1 runs on the delta path (a full pass
        # computes fresh sums for every row the structure touched)
        owners, srcs, signs, tss = structure.arrays()
        if len(owners):
            keep = alive[owners]
            if not keep.all():
                owners, srcs, signs, tss = owners[keep], srcs[keep], signs[keep], tss[keep]
        new_slots = np.fromiter((s for s in created if alive[s]), dtype=np.int64)
        ends = self._union(owners, new_slots)
        zero = ends[rep.length[ends] == 0] if len(ends) else ends  # no neighbours: the sum is exactly 0
        if len(owners):
            o, src = self.as_index(owners), self.as_index(srcs)
            sign = torch.from_numpy(signs).to(dev).unsqueeze(1)
            self._ts.scatter_reduce_(0, o, self.as_index(tss), reduce="amax")
            touched_ts.append(o)

        def structure_into(layer: int) -> None:
            if len(owners):
                self.S[layer].index_add_(0, o, self.h[layer][src].mul_(sign).to(self.agg_dtype))
                self._count(layer, owners)
                report.delta_messages += len(owners)
            if len(zero):
                self.S[layer][self.as_index(zero)] = 0
                self.count[layer].numpy()[zero] = 0

        # a batch whose first layer runs as a full pass skips layer 0's structural sums: the pass
        # recomputes the sums of every row they touch (the rows with new features stand in for
        # the rows that changed: a superset, decided before the features overwrite the old rows)
        slots = np.fromiter((s for s in x_new if alive[s]), dtype=np.int64)
        full_next = self._use_full_pass(slots, ends)
        if not full_next:
            structure_into(0)
        self._isnew[new_slots] = True

        # 2. input features
        rows_t = self.as_index(slots)
        old0 = self.h[0][rows_t]
        default = np.asarray([s for s in slots.tolist() if x_new[s][0] is None], dtype=np.int64)
        self._set_default_features(default)
        given = [(s, x) for s in slots.tolist() if (x := x_new[s][0]) is not None]
        if given:
            self.h[0][self.as_index([s for s, _ in given])] = torch.stack([x for _, x in given]).to(dev, torch.float32)
        if len(slots):
            ts = torch.as_tensor([x_new[s][1] for s in slots.tolist()], dtype=torch.int64, device=dev)
            self._ts.scatter_reduce_(0, rows_t, ts, reduce="amax")
            touched_ts.append(rows_t)
        new0 = self.h[0][rows_t]
        changed, _, delta, _ = self._select(0, slots, old0, new0, report)
        changed0 = changed
        report.affected.append(len(slots))
        report.changed.append(len(changed))
        report.affected_rows.append(torch.from_numpy(slots))
        held_last = np.zeros(0, dtype=np.int64)

        # 3. layers (a large batch finishes with full passes: module doc, "Large batches")
        for layer in range(L):
            if full_next:
                began = time.perf_counter()
                changed, held_last = self._full_from(layer, changed, ends, report, touched_ts)
                if self.costs is not None:
                    self.costs.observe_full((time.perf_counter() - began) / (L - layer), 2 * rep.num_edges)
                break
            began = time.perf_counter()
            seg, w = rep.gather(changed)
            if len(w):
                recv, seg_t = self.as_index(w), self.as_index(seg)
                self.S[layer].index_add_(0, recv, delta.to(self.agg_dtype)[seg_t])  # convert |C| rows, not messages
                self._count(layer, w)
                self._ts.scatter_reduce_(0, recv, self._ts[self.as_index(changed)][seg_t], reduce="amax")
                touched_ts.append(recv)
                report.delta_messages += len(w)
            rows = self._union(changed, w, ends)
            if layer + 1 == L:
                rows = self.owned_rows(rows)  # sharded: the last layer only for this worker's keys
            self._reanchor(layer, rows, report)
            rt = self.as_index(rows)
            agg = self.S[layer][rt].to(torch.float32)
            if self.mean:
                deg = torch.from_numpy(rep.length[rows].astype(np.float32)).to(dev).clamp_(min=1)
                agg.div_(deg.unsqueeze(1))
            new = self.model.dense(layer, agg, self.h[layer][rt])
            del agg
            old = self.h[layer + 1][rt]
            changed, idx, delta, held = self._select(layer + 1, rows, old, new, report, need_delta=layer + 1 < L)
            if layer + 1 < L:
                full_next = self._use_full_pass(changed, ends)
                if not full_next:
                    structure_into(layer + 1)  # h[layer+1] still holds the old rows
            if len(changed):
                self.h[layer + 1][self.as_index(changed)] = new if len(idx) == len(rows) else new[self.as_index(idx)]
            held_last = held
            report.affected.append(len(rows))
            report.changed.append(len(changed))
            report.affected_rows.append(torch.from_numpy(rows))
            report.rows_recomputed += len(rows)
            if self.costs is not None:
                self.costs.observe_delta(time.perf_counter() - began, len(w) + len(ends))

        # 4. report, then free the slots of deleted nodes
        out = self.owned_rows(self._union(changed, changed0))
        report.changed_rows = torch.from_numpy(out)
        if len(held_last):
            report.vectors_suppressed = int(len(held_last) - np.isin(held_last, changed0).sum())
        if self.mode == "bounded":
            report.error_bound = self.error_bound
        if with_vectors:
            keys = cast(list[str], rep.keys)  # changed rows are live slots: they have keys
            report.changed_keys = [keys[i] for i in out.tolist()]
            report.changed_ts = self._ts[self.as_index(out)].tolist()
            report.vectors = self.vectors(out)
        if touched_ts:
            self._ts[torch.cat(touched_ts)] = -1
        self._isnew[new_slots] = False
        if removed:
            self.clear_rows(self.as_index(removed))
            gone = np.asarray(removed)
            self._shard[gone[gone < len(self._shard)]] = -1
            rep.release(removed)
        return report

    def switch_ratio(self) -> float:
        """Messages / half-edges at which a layer runs as a full pass: the calibrated break-even
        (``costs``), or the fixed ``full_ratio``; 0: never."""
        if self.full_ratio <= 0:
            return 0.0
        return self.costs.ratio() if self.costs is not None else self.full_ratio

    def _use_full_pass(self, changed: np.ndarray, ends: np.ndarray) -> bool:
        """Whether the next layer is cheaper as a full pass: its delta messages (the degrees of
        the rows that moved, plus the structural ends) reach ``switch_ratio()`` x half-edges."""
        ratio = self.switch_ratio()
        if ratio <= 0:
            return False
        half_edges = 2 * self.replica.num_edges
        if half_edges == 0:
            return False
        messages = int(self.replica.length[changed].sum()) + len(ends)
        return messages >= ratio * half_edges

    def _full_from(
        self, first: int, changed: np.ndarray, ends: np.ndarray, report: BatchReport, touched_ts: list[Tensor]
    ) -> tuple[np.ndarray, np.ndarray]:
        """Layers ``first+1..L`` by full-graph passes; returns (``C_L``, rows of layer L held
        back). Per layer: ``A`` = ``C`` + the receivers of C's messages (C's neighbours) +
        ``ends``; the fresh sums of the rows of ``A`` (``_fresh_sums``: one CSR product, i.e.
        the sums of the *stored* rows, as the delta path keeps them) are written for them,
        and ``_select`` decides, as on the delta path, which of them pass their new row on
        (exact: every row that moved; bounded: the rows over the layer's threshold). Every
        other row stays bit-identical."""
        rep, dev, n = self.replica, self.device, self.replica.num_slots
        # on a GPU one CSR of the whole graph, from the mirrored adjacency, serves every layer;
        # on the host each layer reads just the rows of A from the replica (``_fresh_sums``)
        whole = self._blocked(*self._csr()) if self.mirror_adjacency else None
        alive = torch.from_numpy(rep.alive[:n]).to(dev)
        end_mask = torch.zeros(n, dtype=torch.bool, device=dev)
        end_mask[self.as_index(ends)] = True
        in_c = torch.zeros(n, dtype=torch.bool, device=dev)
        in_c[self.as_index(changed)] = True
        deg = torch.from_numpy(rep.length[:n].astype(np.float32)).to(dev).clamp_(min=1)
        for layer in range(first, self.L):
            # the receivers of C's messages (C's neighbours: every edge is kept at both ends, as
            # on the delta path), and their event time: the newest among their changed neighbours
            seg, w = rep.gather(changed)
            reached = torch.zeros(n, dtype=torch.bool, device=dev)
            if len(w):
                recv = self.as_index(w)
                reached[recv] = True
                self._ts.scatter_reduce_(0, recv, self._ts[self.as_index(changed)][self.as_index(seg)], reduce="amax")
                touched_ts.append(recv)
            rows_mask = (reached | in_c | end_mask) & alive
            if layer + 1 == self.L and self.shards:
                rows_mask &= torch.from_numpy(self.owned_slots(n)).to(dev)
            rows_t = rows_mask.nonzero().squeeze(1)
            fresh = self._fresh_sums(rows_t, self.h[layer][:n], whole)
            rows = rows_t.cpu().numpy()
            self.S[layer][rows_t] = fresh
            self.count[layer].numpy()[rows] = 0
            agg = fresh.to(torch.float32)
            del fresh
            if self.mean:
                agg.div_(deg[rows_t].unsqueeze(1))
            new = self.model.dense(layer, agg, self.h[layer][rows_t])
            del agg
            changed, idx, _, held = self._select(layer + 1, rows, self.h[layer + 1][rows_t], new, report, need_delta=False)
            if len(changed):
                c_t = self.as_index(changed)
                self.h[layer + 1][c_t] = new if len(idx) == len(rows) else new[self.as_index(idx)]
            in_c = torch.zeros_like(in_c)
            in_c[self.as_index(changed)] = True
            report.affected.append(len(rows))
            report.changed.append(len(changed))
            report.affected_rows.append(torch.from_numpy(rows))
            report.rows_recomputed += len(rows)
            report.full_layers += 1
        return changed, held

    def _fresh_sums(self, rows_t: Tensor, x: Tensor, whole: tuple[Tensor, Tensor, Tensor] | None) -> Tensor:
        """The neighbour sums of the rows ``rows_t`` (ascending) over ``x``, in ``agg_dtype``.

        Blocked float32 sums: one float32 product (half the cost of float64, as a plain full
        pass) over the rows cut into blocks of at most F32_BLOCK terms, the blocks of a row then
        added in agg_dtype (``_blocked``). A CSR product sums a row one term at a time, and in
        float32 that drifts with the row's length (bench/float_sums.py: 1.5e-3 at a 657k hub of
        identical rows); a block of 256 stays ~40x inside the 1e-5 bound.

        ``whole`` (GPU): the blocked CSR of every row; the product runs over all of them and the
        rows of A are taken out. Otherwise (host) the CSR of just these rows is read from the
        replica's blocks (``rep.gather``, the entries in the same order as ``_csr``'s, so the
        sums are bit for bit the same): no CSR of the whole graph is built, and the product
        covers the in-edges of A only (at a batch of 1,000 on Online Retail: 2.7 ms of CSR and
        5.0 ms of product become 0.5 ms and 3.6 ms)."""
        n, dev = self.replica.num_slots, self.device
        if whole is None:  # the CSR of A's rows: block row i is rows_t[i]
            rows = rows_t.numpy()
            _, nbrs = self.replica.gather(rows)
            crow = torch.zeros(len(rows) + 1, dtype=torch.int64)
            torch.cumsum(torch.from_numpy(self.replica.length[rows].astype(np.int64)), 0, out=crow[1:])
            adj, vrow, first_block = self._blocked(crow, torch.from_numpy(nbrs), columns=n)
            position = torch.arange(len(rows))  # of each CSR row in rows_t
        else:  # the whole graph's CSR: block row v is slot v
            adj, vrow, first_block = whole
            first_block = first_block[rows_t]
            position = torch.full((n,), -1, dtype=torch.long, device=dev)
            position[rows_t] = torch.arange(len(rows_t), device=dev)
        blocks = self._spmm(adj, x)  # [blocks, dim] float32
        if whole is None and len(vrow) == len(position):  # no row was cut: the blocks are A's rows
            return blocks.to(self.agg_dtype)
        fresh = blocks[first_block].to(self.agg_dtype)
        if len(vrow) > len(position):  # a row was cut: add the further blocks of A's rows
            further = torch.ones(len(vrow), dtype=torch.bool, device=dev)
            further[first_block] = False
            target = position[vrow]
            extra = (further & (target >= 0)).nonzero().squeeze(1)
            fresh.index_add_(0, target[extra], blocks[extra].to(self.agg_dtype))
        return fresh

    def _select(
        self, layer: int, rows: np.ndarray, old: Tensor, new: Tensor, report: BatchReport, need_delta: bool = True
    ) -> tuple[np.ndarray, np.ndarray, Tensor, np.ndarray]:
        """(changed rows, their positions in ``rows``, their delta new - old, held-back rows):
        the recomputed rows of ``layer`` that pass their change on (the bounded-mode hook).

        Exact mode (threshold 0): every row whose value changed at all (bitwise). Bounded mode:
        only rows whose change against the *stored* row exceeds the layer's threshold; the
        others keep their stored row, so the change not passed on stays as the difference
        between what the row would be and what is stored, and is passed on (in full) when it
        grows past the threshold. New nodes always pass."""
        eps = self.thresholds[layer]
        if not len(rows):
            return rows, rows, new, rows
        if eps > 0:
            mag = (new - old).abs().amax(1).cpu().numpy()
            move = (mag > eps) | self._isnew[rows]
            held = (mag > 0) & ~move
            if held.any():
                report.suppressed[layer] = int(held.sum())
                report.max_residual[layer] = float(mag[held].max())
            held_rows = rows[held]
        else:
            diff = new - old  # exact mode: any bit moved
            absdiff = diff.abs() if need_delta else diff.abs_()  # amax of |diff|: 3-4x faster than any(diff != 0)
            move = (absdiff.amax(1) != 0).cpu().numpy()
            move |= self._isnew[rows]
            held_rows = rows[:0]
            idx = np.flatnonzero(move)
            if not need_delta:  # layer L: nothing propagates further
                return rows[idx], idx, new[:0], held_rows
            if len(idx) == len(rows):
                return rows, idx, diff, held_rows
            return rows[idx], idx, diff[self.as_index(idx)], held_rows
        idx = np.flatnonzero(move)
        if not need_delta:  # layer L: nothing propagates further
            return rows[idx], idx, new[:0], held_rows
        if len(idx) == len(rows):
            return rows, idx, new - old, held_rows
        it = self.as_index(idx)
        return rows[idx], idx, new[it] - old[it], held_rows

    def _reanchor(self, layer: int, rows: np.ndarray, report: BatchReport, chunk: int = 1 << 18) -> None:
        """Recompute the sums of ``rows`` that took ``reanchor_every`` deltas, from neighbours."""
        cnt = self.count[layer].numpy()
        over = rows[cnt[rows] >= self.reanchor_every]
        if not len(over):
            return
        self.S[layer][self.as_index(over)], reads = self._neighbour_sums(layer, over, chunk)
        cnt[over] = 0
        report.reanchored_rows += len(over)
        report.neighbour_reads += reads

    def _neighbour_sums(self, layer: int, rows: np.ndarray, chunk: int = 1 << 18) -> tuple[Tensor, int]:
        """(fresh sums of ``rows``' neighbours' ``h[layer]``, in ``agg_dtype``; neighbour reads)."""
        seg, w = self.replica.gather(rows)
        fresh = torch.zeros(len(rows), self.dims[layer], dtype=self.agg_dtype, device=self.device)
        for lo in range(0, len(w), chunk):  # a hub can have millions of neighbours
            rows_in = self.h[layer][self.as_index(w[lo : lo + chunk])].to(self.agg_dtype)
            fresh.index_add_(0, self.as_index(seg[lo : lo + chunk]), rows_in)
        return fresh, len(w)

    def clear_rows(self, rows: Tensor) -> None:
        for t in self.h + self.S:
            t[rows] = 0
        host = rows.cpu()
        for t in self.count:
            t[host] = 0

    # ---- sharding (streamer/embed/shards.py) ----------------------------------------------
    def set_shards(self, shards: int, owned: Iterable[int]) -> None:
        """Keep the last layer (and publish vectors and tombstones) only for keys whose
        ``shard_of(key, shards)`` is in ``owned``; ``shards`` = 0: every key. The hidden layers
        stay exact for every node. A shard that is added later must be brought up to date with
        ``refresh_last_layer(shard_rows(added))`` before its vectors are read."""
        self.shards = int(shards)
        self._owned = frozenset(owned)

    def _shard_ids(self, rows: np.ndarray) -> np.ndarray:
        n = self.replica.num_slots
        if len(self._shard) < n:
            grown = np.full(max(n, 2 * len(self._shard)), -1, dtype=np.int32)
            grown[: len(self._shard)] = self._shard
            self._shard = grown
        ids: np.ndarray = self._shard[rows]
        unknown = rows[ids < 0]
        if len(unknown):
            keys = self.replica.keys
            self._shard[unknown] = shards_of([keys[int(s)] for s in unknown], self.shards)
            ids = self._shard[rows]
        return ids

    def owned_rows(self, rows: np.ndarray) -> np.ndarray:
        """The rows (slots) whose keys this engine owns: all of them when not sharded."""
        if not self.shards or not len(rows):
            return rows
        ids = self._shard_ids(np.asarray(rows, dtype=np.int64))
        owned: np.ndarray = rows[owned_mask(ids, self._owned, self.shards)]
        return owned

    def owned_slots(self, n: int) -> np.ndarray:
        """Boolean mask over slots ``0..n-1``: owned (every slot when not sharded)."""
        if not self.shards:
            return np.ones(n, dtype=bool)
        mask = np.zeros(n, dtype=bool)
        live = np.flatnonzero(self.replica.alive[:n])
        mask[self.owned_rows(live)] = True
        return mask

    def owns_key(self, key: str) -> bool:
        if not self.shards:
            return True
        return shard_of(key, self.shards) in self._owned

    def shard_rows(self, shards: Iterable[int]) -> np.ndarray:
        """The live slots whose keys fall in ``shards``."""
        live = self.replica.live_slots()
        if not self.shards:
            return live
        rows: np.ndarray = live[owned_mask(self._shard_ids(live), shards, self.shards)]
        return rows

    @torch.no_grad()
    def refresh_last_layer(self, rows: np.ndarray, chunk: int = 1 << 16) -> int:
        """Recompute the last layer of ``rows`` from the (exact) layer below: fresh neighbour
        sums, then the dense layer; returns the neighbour reads. What a worker runs on a shard it
        newly owns, whose last layer it did not keep up to date."""
        layer, reads = self.L - 1, 0
        for lo in range(0, len(rows), chunk):
            part = np.asarray(rows[lo : lo + chunk], dtype=np.int64)
            fresh, n = self._neighbour_sums(layer, part)
            rt = self.as_index(part)
            self.S[layer][rt] = fresh
            self.count[layer][torch.from_numpy(part)] = 0
            agg = fresh.to(torch.float32)
            if self.mean:
                deg = torch.from_numpy(self.replica.length[part].astype(np.float32)).to(self.device).clamp_(min=1)
                agg.div_(deg.unsqueeze(1))
            self.h[layer + 1][rt] = self.model.dense(layer, agg, self.h[layer][rt])
            reads += n
        return reads

    def take_shards(self, shards: int, owned: Iterable[int]) -> tuple[set[int], int]:
        """``set_shards``, and bring every newly owned shard up to date: the shards now owned
        that were not owned when the last batch was applied get ``refresh_last_layer``.
        Returns (those shards, the rows refreshed); the caller publishes their vectors. A shard
        owned until a revoke, with no batch applied since, needs nothing (the eager group
        protocol revokes everything on every rebalance and the sticky assignor hands most of it
        straight back)."""
        owned = frozenset(owned)
        added = set(owned - self._current_shards)
        self._current_shards |= owned
        self.set_shards(shards, owned)
        rows = self.shard_rows(added) if added else np.zeros(0, dtype=np.int64)
        self.refresh_last_layer(rows)
        return added, len(rows)

    # ---- outputs -----------------------------------------------------------------------
    @torch.no_grad()
    def vectors(self, rows: Tensor | np.ndarray | Sequence[int]) -> Tensor:
        """Published (fused, unit-norm) vectors of slots, float32 on CPU."""
        if isinstance(rows, np.ndarray):
            rows = self.as_index(rows)
        rows = torch.as_tensor(rows, dtype=torch.long, device=self.device)
        return fuse(self.h[0][rows], self.h[-1][rows], self.fusion, self.fusion_text_weight).cpu()

    def vector(self, key: str) -> Tensor:
        return self.vectors([self.replica.index[key]])[0]

    # ---- full recompute and verification -----------------------------------------------
    def edge_index(self) -> Tensor:
        src, dst = self.replica.edge_index()
        return torch.as_tensor(np.stack([src, dst]), dtype=torch.long, device=self.device)

    def _csr(self) -> tuple[Tensor, Tensor]:
        """The replica's adjacency in CSR form, built on the device from its block arrays (one
        copy of the used half-edge array; the index arithmetic runs where the data lives):
        ``crow`` [n+1], ``col`` [half-edges].
        Row v (a block owner) lists the neighbours whose messages v aggregates; dead slots are
        empty rows. int64 throughout."""
        rep, dev, n = self.replica, self.device, self.replica.num_slots
        length = torch.from_numpy(np.where(rep.alive[:n], rep.length[:n], 0).astype(np.int64)).to(dev)
        crow = torch.zeros(n + 1, dtype=torch.int64, device=dev)
        torch.cumsum(length, 0, out=crow[1:])
        total = int(crow[-1])
        row = torch.repeat_interleave(torch.arange(n, device=dev), length, output_size=total)
        offset = torch.from_numpy(rep.start[:n]).to(dev) - crow[:-1]  # block start - CSR start
        pos = torch.arange(total, device=dev).add_(offset[row])
        col = self._nbr_on_device()[pos].long()
        del pos
        return crow, col

    def _nbr_on_device(self) -> Tensor:
        """``replica.nbr[:top]`` on the device. With ``mirror_adjacency`` a device copy is kept
        and only the positions the replica wrote since the last call are sent; otherwise
        (CPU: a zero-copy view) the used part is copied whole."""
        rep = self.replica
        if not self.mirror_adjacency:
            return torch.from_numpy(rep.nbr[: rep.top]).to(self.device)
        if self._nbr_of is not rep:  # a new replica (load, restore)
            rep.track_writes()
            self._nbr_of, self._nbr_dev = rep, None
        writes = rep.take_writes()
        buf = self._nbr_dev
        if writes is None or buf is None or len(buf) < rep.top:
            buf = torch.empty(len(rep.nbr), dtype=torch.int32, device=self.device)
            buf[: rep.top] = torch.from_numpy(rep.nbr[: rep.top]).to(self.device)
            self._nbr_dev = buf
        elif len(writes):
            buf[self.as_index(writes)] = torch.from_numpy(rep.nbr[writes]).to(self.device)
        return buf[: rep.top]

    def _sparse(self, crow: Tensor, col: Tensor, dtype: torch.dtype, columns: int | None = None) -> Tensor:
        """A CSR matrix of ones, [len(crow) - 1, columns] (default: square)."""
        rows = len(crow) - 1
        if self.device.type == "cpu" and len(col) < (1 << 31) - 1:  # int32 halves the CSR on the host
            crow, col = crow.int(), col.int()
        size = (rows, rows if columns is None else columns)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            return torch.sparse_csr_tensor(crow, col, torch.ones(len(col), dtype=dtype, device=self.device), size=size)

    def _blocked(
        self, crow: Tensor, col: Tensor, block: int = F32_BLOCK, columns: int | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """The CSR adjacency with every row cut into blocks of at most ``block`` consecutive
        entries, as a [blocks, columns] float32 matrix (``col`` unchanged; default: square); with
        ``vrow`` (the row of each block) and ``first_block`` (each row's first block; an empty
        row keeps one empty block)."""
        dev, n = self.device, len(crow) - 1
        length = crow[1:] - crow[:-1]
        k = torch.clamp((length + block - 1) // block, min=1)  # blocks per row
        first_block = torch.zeros(n, dtype=torch.int64, device=dev)
        torch.cumsum(k[:-1], 0, out=first_block[1:])
        blocks = int(first_block[-1] + k[-1]) if n else 0
        vrow = torch.repeat_interleave(torch.arange(n, device=dev), k, output_size=blocks)
        vcrow = torch.empty(blocks + 1, dtype=torch.int64, device=dev)
        vcrow[:blocks] = crow[:-1][vrow] + (torch.arange(blocks, device=dev) - first_block[vrow]) * block
        vcrow[blocks] = crow[-1]
        return self._sparse(vcrow, col, torch.float32, columns=n if columns is None else columns), vrow, first_block

    def adjacency(self, dtype: torch.dtype | None = None) -> Tensor:
        """The replica's adjacency as a sparse CSR matrix on the device (row = receiver), for
        layer-wise full-graph passes without an [edges, dim] message tensor."""
        crow, col = self._csr()
        return self._sparse(crow, col, dtype or self.agg_dtype)

    def _spmm(self, adj: Tensor, x: Tensor) -> Tensor:
        if x.shape[0] == 0 or adj._nnz() == 0:
            return torch.zeros((adj.shape[0], *x.shape[1:]), dtype=adj.dtype, device=x.device)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            return adj @ x.to(adj.dtype)

    @torch.no_grad()
    def full_recompute(self) -> list[Tensor]:
        """The plain PyG forward over the whole replica: [h0, h1, ..., hL] for every slot
        (rows of free slots are meaningless). Materialises one message per edge: small graphs."""
        n = self.replica.num_slots
        return self.model.forward_all(self.h[0][:n], self.edge_index())

    @torch.no_grad()
    def full_layers(self, adjacency: Tensor | None = None) -> list[Tensor]:
        """Layer-wise full-graph recompute from the replica and ``h0``: [h0, ..., hL] for every
        slot, each layer one sparse (CSR) product over all nodes plus the dense step -- PyG's
        layer-wise inference with full neighbourhoods, without an [edges, dim] message tensor.
        ``adjacency``: a prebuilt ``adjacency(dtype)`` (else a float64 one: the sums are then
        accurate to ~1e-12 whatever the degree, which makes this the reference ``verify`` uses;
        a float32 adjacency is what PyG computes, and is ~2x faster)."""
        adj = self.adjacency(torch.float64) if adjacency is None else adjacency
        n = self.replica.num_slots
        deg = torch.from_numpy(self.replica.length[:n].astype(np.float32)).to(self.device).clamp_(min=1)
        hs = [self.h[0][:n]]
        for layer in range(self.L):
            agg = self._spmm(adj, hs[-1]).to(torch.float32)
            if self.mean:
                agg = agg / deg.unsqueeze(1)
            hs.append(self.model.dense(layer, agg, hs[-1]))
        return hs

    @torch.no_grad()
    def verify(self, tol: float | None = None, method: Literal["auto", "pyg", "layers"] = "auto") -> tuple[float, int]:
        """(max abs error over every layer's cached rows vs. a full recompute, rows over tol).
        ``tol`` defaults to 1e-5 plus the mode's ``error_bound`` (0 in exact mode). ``method``:
        the PyG forward (``full_recompute``), the layer-wise sparse pass (``full_layers``), or
        auto: PyG while one message per edge fits in ~1 GB. PyG sums in float32, which is
        exact to 1e-5 only while degrees are moderate (a float32 sum of 600k similar rows is off
        by ~1e-5 of the mean, before the weights amplify it); ``layers`` sums in float64."""
        if tol is None:
            tol = 1e-5 + self.error_bound
        live = self.as_index(self.replica.live_slots())
        if not len(live):
            return 0.0, 0
        if method == "auto":
            small = 2 * self.replica.num_edges * max(self.dims) <= (1 << 28)
            method = "pyg" if small and int(self.replica.length[: self.replica.num_slots].max()) < 10_000 else "layers"
        full = self.full_recompute() if method == "pyg" else self.full_layers()
        err = torch.zeros(len(live), device=self.device)
        owned = torch.from_numpy(self.owned_slots(self.replica.num_slots)).to(self.device)[live]
        for layer in range(1, self.L + 1):
            e = (full[layer][live] - self.h[layer][live]).abs().amax(1)
            if layer == self.L:  # sharded: the last layer is kept for the owned keys only
                e = torch.where(owned, e, torch.zeros_like(e))
            err = torch.maximum(err, e)
        return float(err.max()), int((err > tol).sum())

    @torch.no_grad()
    def rebuild(self) -> None:
        """Recompute every cache (sums and activations) from the replica and h0, layer by
        layer over all nodes (sparse CSR products; exact, so it also flushes whatever bounded
        mode held back)."""
        n = self.replica.num_slots
        if n == 0:
            return
        began = time.perf_counter()
        adj = self.adjacency()
        deg = torch.from_numpy(self.replica.length[:n].astype(np.float32)).to(self.device).clamp_(min=1)
        for layer in range(self.L):
            s = self._spmm(adj, self.h[layer][:n]).to(self.agg_dtype)
            self.S[layer][:n] = s
            agg = s.to(torch.float32)
            if self.mean:
                agg = agg / deg.unsqueeze(1)
            self.h[layer + 1][:n] = self.model.dense(layer, agg, self.h[layer][:n])
            del s, agg
        if self.costs is not None:
            self.costs.observe_full((time.perf_counter() - began) / self.L, 2 * self.replica.num_edges, rebuild=True)
        for t in self.count:
            t.zero_()
        dead = self.as_index(np.flatnonzero(~self.replica.alive[:n]))
        if len(dead):
            self.clear_rows(dead)

    def bulk_load(
        self,
        keys: Sequence[str],
        src: np.ndarray,
        dst: np.ndarray,
        rel: str | Sequence[str] | np.ndarray = "RELATED",
        features: Tensor | None = None,
        rel_names: Sequence[str] | None = None,
        feature_rows: np.ndarray | None = None,
    ) -> None:
        """Cold start: load nodes and edges (``src``/``dst`` index into ``keys``; ``rel`` one
        name, or ids into ``rel_names``) into an empty engine, then ``rebuild()``. ``features``:
        rows aligned with ``keys``, or with ``feature_rows`` (indices into ``keys``) when given;
        every other node gets its type embedding."""
        rep = self.replica
        if rep.num_nodes:
            raise ValueError("bulk_load needs an empty engine")
        slots = rep.add_nodes(keys)
        if isinstance(rel, str):
            rel_ids: np.ndarray | int = rep.rel_id(rel)
        else:
            names = list(rel_names or [])
            table = np.asarray([rep.rel_id(r) for r in names], dtype=np.int64)
            rel_ids = table[np.asarray(rel, dtype=np.int64)]
        rep.bulk_add_edges(slots[np.asarray(src)], rel_ids, slots[np.asarray(dst)])
        self.ensure_capacity(rep.num_slots)
        if features is None or feature_rows is not None:
            labels = rep.labels
            ntype = rep.ntype[slots]
            type_table = self.model.type_features(labels).to(self.device)
            self.h[0][self.as_index(slots)] = type_table[self.as_index(ntype)]
        if features is not None:
            rows = slots if feature_rows is None else slots[np.asarray(feature_rows, dtype=np.int64)]
            self.h[0][self.as_index(rows)] = features.to(self.device, torch.float32)
        self.rebuild()

    # ---- persistence -------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        n = self.replica.num_slots
        return {
            "format": STATE_FORMAT,
            "graph_version": self.model.version,
            "model_version": self.model_version,
            "agg_dtype": str(self.agg_dtype),
            "mode": self.mode,
            "replica": self.replica.state_dict(),
            "h": [t[:n].cpu() for t in self.h],
            "S": [t[:n].cpu() for t in self.S],
            "count": [t[:n].cpu() for t in self.count],
        }

    def restore(self, state: Mapping[str, Any]) -> None:
        """Put a ``state_dict()`` of this same model back in place: the replica and every cache
        row (rows past the state's slots zeroed, as fresh slots are); the scratch is cleared.
        For benchmarks that run the same batches again from one snapshot."""
        self.replica = Replica.from_state_dict(state["replica"])
        n = self.replica.num_slots
        self.ensure_capacity(max(n, 16))
        for mine, saved in zip(self.h + self.S + self.count, state["h"] + state["S"] + state["count"], strict=True):
            mine[:n] = saved.to(mine.device)
            mine[n:] = 0
        self._ts.fill_(-1)
        self._isnew[:] = False

    def restore_caches(self, state: Mapping[str, Any]) -> None:
        """Set ``h[1..L]``, the sums and the drift counters from ``state_dict()`` output whose
        replica and ``h[0]`` are already in place (``streamer.embed.state.load_engine``)."""
        n = self.replica.num_slots
        for layer in range(self.L):
            self.h[layer + 1][:n] = state["h"][layer + 1].to(self.device)
            self.S[layer][:n] = state["S"][layer].to(self.device)
            self.count[layer][:n] = state["count"][layer].cpu()
