"""The one way to build, open, save, load and re-embed an ``IncrementalEngine``.

* ``build_engine(settings, text)`` -- a fresh engine as the worker runs it: the graph model
  (``graph_model``: the checkpoint ``KGS_GRAPH_CHECKPOINT`` or a seeded init with the text
  encoder's width), fusion, device, exact or bounded mode (``engine_options``), torch threads,
  and product text through a ``Featurizer``.
* ``save_engine(engine, path, versions=None)`` -- replica + every cache (+ the worker's
  ``VersionGuard`` state, under ``"versions"``), atomically (temp file, fsync, rename): the
  guard's versions describe the replica, so they live in the same file.
* ``load_engine(path, model, ..., versions=None)`` -> ``(engine, reembedded)`` (and the guard's
  state loaded into ``versions``; empty when the file has none). A state written by the same
  graph model is restored as it was. A state written by **another** graph model
  (``KGS_GRAPH_CHECKPOINT`` names a newly trained one) keeps the replica and the product
  text features, refreshes every other node's input row to the new model's type embedding,
  and recomputes every cache **layer by layer over the whole graph** (``layerwise_rebuild``:
  all nodes' layer 1 from ``h0``, then layer 2 from layer 1 ..., in chunks of rows with a
  progress bar; no k-hop neighbourhood is ever expanded). The result equals
  ``IncrementalEngine.rebuild()``, so the incremental path continues from it exactly. A state
  written in bounded mode loaded into an exact engine is rebuilt (an exact engine starts exact).
* ``open_checkpoint(settings)`` -> ``Opened``: what the worker and ``kg-streamer verify`` start
  from: the text encoder (with its cache), and the checkpointed engine and version guard with
  the changelog offsets they cover, or fresh ones when there is no checkpoint.
* ``save_checkpoint(opened, offsets)`` -- engine with the version guard, text cache and offsets
  (``offsets.json`` is written last, so the offsets never claim more than the engine file holds).

Files, under ``<state_dir>/embed/``: ``engine.pt``, ``offsets.json`` (``{"offsets":
{"topic:partition": next offset}, "model_version": ...}``), ``text_cache.safetensors``.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from encoders.graph import GraphEncoder, GraphEncoderConfig, check_fusion
from encoders.text import TextEncoder, product_text
from streamer.contracts.changes import Change, split_key
from streamer.embed.engine import STATE_FORMAT, IncrementalEngine
from streamer.embed.replica import Replica
from streamer.embed.versions import VersionGuard
from streamer.settings import Settings

log = logging.getLogger(__name__)


# --- building ---------------------------------------------------------------------------------
def engine_options(settings: Settings) -> dict[str, Any]:
    """Engine keyword arguments from ``Settings``: mode, thresholds, drift guard, full-pass ratio."""
    opts: dict[str, Any] = {"mode": settings.embed_mode, "reanchor_every": int(settings.embed_reanchor_every)}
    if settings.embed_full_ratio is not None:
        opts["full_ratio"] = float(settings.embed_full_ratio)
    if settings.embed_mode == "bounded":
        opts["propagate_threshold"] = float(settings.embed_propagate_threshold)
        opts["publish_threshold"] = float(settings.embed_publish_threshold)
    return opts


ACTIVE_MODEL = "active.json"  # under <state_dir>/model/: the checkpoint the worker runs when none is set


def activate_checkpoint(settings: Settings, checkpoint: str | Path) -> Path:
    """Make ``checkpoint`` the model this state dir's worker runs when ``graph_checkpoint`` is
    not set (``kg-streamer demo`` does it after training on the sample, so that a later plain
    ``kg-streamer embed`` keeps the trained model). Written atomically; returns the pointer."""
    pointer = settings.local_dir("model") / ACTIVE_MODEL
    tmp = pointer.with_name(pointer.name + ".tmp")
    tmp.write_text(json.dumps({"checkpoint": str(Path(checkpoint).resolve())}) + "\n")
    tmp.replace(pointer)
    return pointer


def active_checkpoint(settings: Settings) -> Path | None:
    """``graph_checkpoint`` if set, else the checkpoint ``activate_checkpoint`` named in this
    state dir (if it still exists), else None (the seeded, untrained init)."""
    if settings.graph_checkpoint:
        return Path(settings.graph_checkpoint)
    pointer = Path(settings.state_dir) / "model" / ACTIVE_MODEL
    if not pointer.exists():
        return None
    path = Path(json.loads(pointer.read_text())["checkpoint"])
    if not path.exists():
        log.warning("%s names %s, which does not exist: running the untrained model", pointer, path)
        return None
    return path


def graph_model(settings: Settings, in_dim: int = 384) -> GraphEncoder:
    """The checkpoint (``active_checkpoint``: ``graph_checkpoint``, else the state dir's active
    model), else a seeded init; fusion checked."""
    checkpoint = active_checkpoint(settings)
    if checkpoint is not None:
        model = GraphEncoder.load(checkpoint)
        if model.config.in_dim != in_dim:
            raise ValueError(f"checkpoint in_dim {model.config.in_dim} != text dim {in_dim}")
    else:
        model = GraphEncoder(
            GraphEncoderConfig(
                in_dim=in_dim,
                hidden=settings.gnn_hidden,
                out=settings.gnn_out,
                layers=settings.gnn_layers,
                seed=settings.gnn_seed,
            )
        )
    check_fusion(settings.fusion, in_dim, model.config.out)
    return model


class Featurizer:
    """Input features for a micro-batch: product text through the ``TextEncoder``; nothing for
    other nodes (the engine then uses the model's node-type embedding)."""

    def __init__(self, text: TextEncoder | None, text_labels: Sequence[str] = ("Product",)) -> None:
        self.text = text
        self.text_labels = set(text_labels)

    def __call__(self, changes: Sequence[Change]) -> dict[str, Tensor]:
        if self.text is None:
            return {}
        latest: dict[str, str] = {}
        for ch in changes:
            if ch.op == "node_upsert" and ch.key and split_key(ch.key)[0] in self.text_labels:
                latest[ch.key] = product_text(ch.props or {})
            elif ch.op == "node_delete" and ch.key:
                latest.pop(ch.key, None)
        todo = [(k, t) for k, t in latest.items() if t]
        if not todo:
            return {}
        vecs = self.text.encode([t for _, t in todo])
        return {k: v for (k, _), v in zip(todo, vecs, strict=True)}


def engine_kwargs(settings: Settings, text: TextEncoder | None) -> dict[str, Any]:
    return dict(
        fusion=settings.fusion,
        fusion_text_weight=settings.fusion_text_weight,
        featurize=Featurizer(text) if text is not None else None,
        text_model_id=text.model_id if text is not None else "",
        **engine_options(settings),
    )


def build_engine(settings: Settings, text: TextEncoder | None = None) -> IncrementalEngine:
    """A fresh engine as the worker runs it (module docstring); no text: type embeddings only."""
    if settings.torch_threads > 0:
        torch.set_num_threads(settings.torch_threads)
    model = graph_model(settings, in_dim=text.dim if text is not None else 384)
    return IncrementalEngine(model, settings.device, **engine_kwargs(settings, text))


# --- saving and loading -----------------------------------------------------------------------
def save_engine(engine: IncrementalEngine, path: str | Path, versions: VersionGuard | None = None) -> None:
    """Write replica + caches (+ ``versions``' state) atomically (temp file, fsync, rename)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    state = engine.state_dict()
    if versions is not None:
        state["versions"] = versions.state_dict()
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)


def load_engine(
    path: str | Path,
    model: GraphEncoder,
    device: Any = "auto",
    progress: bool = True,
    versions: VersionGuard | None = None,
    **kwargs: Any,
) -> tuple[IncrementalEngine, bool]:
    """(engine, re-embedded): the saved engine for ``model`` (module docstring); the version
    guard's state goes into ``versions`` when given."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    if state.get("format") != STATE_FORMAT:
        raise ValueError(f"{path}: unknown engine state format {state.get('format')}")
    if versions is not None:
        versions.load_state_dict(state.pop("versions", None))
    engine = IncrementalEngine(model, device, **kwargs)
    engine.replica = Replica.from_state_dict(state["replica"])
    n = engine.replica.num_slots
    engine.ensure_capacity(max(n, 16))
    engine.h[0][:n] = state["h"][0].to(engine.device)
    if state["graph_version"] != model.version:
        log.info(
            "engine state %s was written by graph model %s; full re-embed with %s", path, state["graph_version"], model.version
        )
        del state
        refresh_type_features(engine)
        layerwise_rebuild(engine, progress=progress)
        return engine, True
    if str(engine.agg_dtype) != state["agg_dtype"] or (state.get("mode", "exact") == "bounded" and engine.mode == "exact"):
        log.info(
            "engine state was written with %s sums in %s mode; rebuilding the caches",
            state["agg_dtype"],
            state.get("mode", "exact"),
        )
        engine.rebuild()
        return engine, False
    engine.restore_caches(state)
    return engine, False


@torch.no_grad()
def layerwise_rebuild(engine: IncrementalEngine, chunk_rows: int = 65_536, progress: bool = True) -> None:
    """Recompute every sum and activation from the replica and ``h0``, one layer at a time over
    all nodes, in chunks of ``chunk_rows`` destination rows (what ``engine.rebuild()`` computes)."""
    from tqdm.auto import tqdm

    rep, dev = engine.replica, engine.device
    n = rep.num_slots
    deg = torch.as_tensor(rep.length[:n].astype(np.float32), device=dev)
    slots = np.arange(n, dtype=np.int64)
    for layer in range(engine.L):
        bar = tqdm(total=n, desc=f"re-embed layer {layer + 1}/{engine.L}", unit="node", disable=not progress, mininterval=1.0)
        for lo in range(0, n, chunk_rows):
            rows = slots[lo : lo + chunk_rows]
            seg, nbr = rep.gather(rows)
            r = torch.as_tensor(rows, device=dev)
            s = torch.zeros(len(rows), engine.dims[layer], dtype=engine.agg_dtype, device=dev)
            if len(seg):
                s.index_add_(
                    0, torch.as_tensor(seg, device=dev), engine.h[layer][torch.as_tensor(nbr, device=dev)].to(engine.agg_dtype)
                )
            engine.S[layer][r] = s
            agg = s.to(torch.float32)
            if engine.mean:
                agg = agg / deg[r].clamp(min=1).unsqueeze(1)
            engine.h[layer + 1][r] = engine.model.dense(layer, agg, engine.h[layer][r])
            bar.update(len(rows))
        bar.close()
    for t in engine.count:
        t.zero_()
    dead = torch.as_tensor(np.flatnonzero(~rep.alive[:n]), dtype=torch.long, device=dev)
    if len(dead):
        engine.clear_rows(dead)


@torch.no_grad()
def refresh_type_features(engine: IncrementalEngine) -> int:
    """Set ``h0`` of every live non-product node to the current model's type row; returns how many.

    A trained model may carry learned type rows; product rows are text embeddings (unchanged)
    or the Product type row, which training never changes."""
    rep = engine.replica
    live = rep.live_slots()
    labels = [rep.label_of(int(s)) for s in live]
    keep = np.asarray([lb != "Product" for lb in labels], dtype=bool)
    slots = live[keep]
    if len(slots):
        feats = engine.model.type_features([labels[i] for i in np.flatnonzero(keep)])
        engine.h[0][torch.as_tensor(slots, device=engine.device)] = feats.to(engine.device)
    return int(len(slots))


# --- the worker's checkpoint ------------------------------------------------------------------
@dataclass
class Opened:
    """An engine opened from the worker's checkpoint (or fresh), and where it lives."""

    engine: IncrementalEngine
    text: TextEncoder
    dir: Path
    versions: VersionGuard = field(default_factory=VersionGuard)  # saved inside engine.pt
    offsets: dict[str, int] = field(default_factory=dict)  # "topic:partition" -> next offset
    saved_s: float = 0.0  # when the checkpoint was written (epoch s; 0: unknown or none)
    reembedded: bool = False  # the checkpoint was written by another model: every vector is new

    @property
    def engine_path(self) -> Path:
        return self.dir / "engine.pt"

    @property
    def offsets_path(self) -> Path:
        return self.dir / "offsets.json"

    @property
    def text_cache_path(self) -> Path:
        return self.dir / "text_cache.safetensors"


def checkpoint_dir(settings: Settings) -> Path:
    return settings.local_dir("embed")


def open_checkpoint(settings: Settings, require: bool = False, progress: bool = True) -> Opened:
    """The worker's engine: from its checkpoint when there is one (re-embedded when the model
    changed), else fresh (``require``: raise ``FileNotFoundError`` instead)."""
    if settings.torch_threads > 0:
        torch.set_num_threads(settings.torch_threads)
    directory = checkpoint_dir(settings)
    text = TextEncoder(settings.text_model, device=settings.device)
    opened = Opened(engine=None, text=text, dir=directory)  # type: ignore[arg-type]
    if opened.text_cache_path.exists():
        text.load_cache(opened.text_cache_path)
    if not opened.engine_path.exists():
        if require:
            raise FileNotFoundError(f"no worker checkpoint at {opened.engine_path}: run `kg-streamer embed` first")
        opened.engine = build_engine(settings, text)
        return opened
    model = graph_model(settings, in_dim=text.dim)
    meta = json.loads(opened.offsets_path.read_text()) if opened.offsets_path.exists() else {}
    engine, reembedded = load_engine(
        opened.engine_path, model, settings.device, progress=progress, versions=opened.versions, **engine_kwargs(settings, text)
    )
    if meta.get("model_version") and meta["model_version"] != engine.model_version:
        log.info("vector version %s -> %s: full re-embed", meta["model_version"], engine.model_version)
        reembedded = True
    opened.engine, opened.reembedded, opened.offsets = engine, reembedded, meta.get("offsets", {})
    opened.saved_s = float(meta.get("saved_s", 0.0))
    log.info("resumed from checkpoint: %d nodes, offsets %s", engine.replica.num_nodes, opened.offsets)
    return opened


def save_checkpoint(opened: Opened, offsets: dict[str, int]) -> None:
    """Engine, text cache, then the offsets they cover (each file atomically)."""
    save_engine(opened.engine, opened.engine_path, opened.versions)
    opened.text.save_cache(opened.text_cache_path)
    tmp = opened.offsets_path.with_suffix(".tmp")
    saved_s = time.time()
    tmp.write_text(json.dumps({"offsets": offsets, "model_version": opened.engine.model_version, "saved_s": saved_s}))
    tmp.replace(opened.offsets_path)
    opened.offsets, opened.saved_s = dict(offsets), saved_s
