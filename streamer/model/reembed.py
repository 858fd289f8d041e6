"""Full re-embed after a model change: layer-wise full-graph inference with a progress bar.

The worker calls ``load_engine`` at start-up. When its checkpointed engine state was written
by another graph model (``state["graph_version"] != model.version``), the replica and the
input features are kept and every cache is recomputed **layer by layer over the whole
graph** -- all nodes' layer 1 from ``h0``, then all nodes' layer 2 from layer 1, ... (PyG's
layer-wise inference; each layer reads only the previous one, so no k-hop neighbourhood is
ever expanded) -- in chunks of destination rows, with a progress bar per layer. The result
equals ``IncrementalEngine.rebuild()`` (the same sums and the same dense step, so the
incremental path continues from it exactly and ``kg-streamer verify`` holds).

Input features of non-product nodes are the model's type-embedding rows. A trained model may
carry learned rows for them (``streamer/model/train.py``), so they are refreshed from the new
model before the layers run. Product rows are text embeddings (unchanged) or the Product type
row, which training never changes.

Same version: ``IncrementalEngine.load`` as before (no recompute).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from encoders.graph import GraphEncoder
from streamer.embed import engine as engine_mod
from streamer.embed.engine import IncrementalEngine
from streamer.embed.replica import Replica

log = logging.getLogger(__name__)


def state_graph_version(path: str | Path) -> str | None:
    """The graph model version an engine checkpoint was written with (memory-mapped peek)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:
        state = torch.load(path, map_location="cpu", weights_only=True)
    return state.get("graph_version")


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
        bar = tqdm(total=n, desc=f"re-embed layer {layer + 1}/{engine.L}", unit="node", disable=not progress,
                   mininterval=1.0)
        for lo in range(0, n, chunk_rows):
            rows = slots[lo:lo + chunk_rows]
            seg, nbr = rep.gather(rows)
            r = torch.as_tensor(rows, device=dev)
            s = torch.zeros(len(rows), engine.dims[layer], dtype=engine.agg_dtype, device=dev)
            if len(seg):
                s.index_add_(0, torch.as_tensor(seg, device=dev),
                             engine.h[layer][torch.as_tensor(nbr, device=dev)].to(engine.agg_dtype))
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
        engine._clear(dead)


@torch.no_grad()
def refresh_type_features(engine: IncrementalEngine) -> int:
    """Set ``h0`` of every live non-product node to the current model's type row; returns how many."""
    rep = engine.replica
    live = rep.live_slots()
    labels = [rep.label_of(int(s)) for s in live]
    keep = np.asarray([lb != "Product" for lb in labels], dtype=bool)
    slots = live[keep]
    if len(slots):
        feats = engine.model.type_features([labels[i] for i in np.flatnonzero(keep)])
        engine.h[0][torch.as_tensor(slots, device=engine.device)] = feats.to(engine.device)
    return int(len(slots))


def load_engine(path: str | Path, model: GraphEncoder, device: Any = "auto", progress: bool = True,
                **kwargs: Any) -> tuple[IncrementalEngine, bool]:
    """(engine, re-embedded): the checkpointed engine for ``model``; with another graph model
    version than the checkpoint's, a full layer-wise re-embed (module docstring)."""
    old = state_graph_version(path)
    if old == model.version:
        return IncrementalEngine.load(path, model, device, **kwargs), False
    log.info("engine state %s was written by graph model %s; full re-embed with %s", path, old, model.version)
    state = torch.load(path, map_location="cpu", weights_only=True)
    if state.get("format") != engine_mod.STATE_FORMAT:
        raise ValueError(f"{path}: unknown engine state format {state.get('format')}")
    engine = IncrementalEngine(model, device, **kwargs)
    engine.replica = Replica.from_state_dict(state["replica"])
    n = engine.replica.num_slots
    engine._ensure_capacity(max(n, 16))
    engine.h[0][:n] = state["h"][0].to(engine.device)
    del state
    refresh_type_features(engine)
    layerwise_rebuild(engine, progress=progress)
    return engine, True
