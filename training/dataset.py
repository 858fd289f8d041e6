"""A snapshot of the knowledge graph for training and evaluation (``GraphData``).

Three ways to get one, all giving the graph the embedding worker sees (same node keys, the
same typed edges, product text as ``streamer.embed.engine.Featurizer`` builds it):

* ``from_engine_state(path)``: the worker's checkpointed replica (``<state_dir>/embed/engine.pt``):
  topology plus the input features ``h0`` it already holds (no text re-encoding). Edges carry
  no time, so validation there is a random hold-out.
* ``from_graph_db(settings, text)``: one read transaction over Bolt (``sinks.cypher``):
  live products with their text, every live relationship; interactions carry ``first_ts``.
* ``from_events(events, text, until_ms)``: straight from the loaders' event streams (no Kafka,
  no graph DB): the graph as it stood at ``until_ms`` (interactions and relations before it;
  with the default ``all_products=True`` also every later product with its metadata; the
  evaluation uses ``all_products=False``, the leak-free graph at ``T``: see ``training/evaluate.py``).

Input features: ``features[i]`` is a text embedding where ``has_text[i]``; every other node
gets its label's type embedding from the graph model (``GraphEncoder.type_features``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from torch import Tensor

from encoders.text import product_text
from streamer.contracts.changes import split_key
from streamer.contracts.events import ACTION_TYPES
from streamer.ingest.plan import attribute_ids, category_ids

INTERACTION_RELS: tuple[str, ...] = tuple(ACTION_TYPES.values())


@dataclass
class GraphData:
    keys: list[str]
    labels: list[str]
    src: np.ndarray  # typed edges (unique per (src, rel, dst)), node indices
    dst: np.ndarray
    rel: np.ndarray  # index into rel_names
    rel_names: list[str]
    features: Tensor  # [N, d] float32; rows without text are ignored
    has_text: np.ndarray  # [N] bool
    edge_ts: np.ndarray | None = None  # [E] int64 epoch ms of the edge's first event, -1 unknown
    index: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.index:
            self.index = {k: i for i, k in enumerate(self.keys)}
        self.src = np.asarray(self.src, dtype=np.int64)
        self.dst = np.asarray(self.dst, dtype=np.int64)
        self.rel = np.asarray(self.rel, dtype=np.int64)

    @property
    def num_nodes(self) -> int:
        return len(self.keys)

    @property
    def num_edges(self) -> int:
        return len(self.src)

    def nodes_of(self, label: str) -> np.ndarray:
        return np.flatnonzero(np.asarray([lb == label for lb in self.labels], dtype=bool))

    def interaction_mask(self, rels: Iterable[str] = INTERACTION_RELS) -> np.ndarray:
        """Edges User-[interaction]->Product."""
        wanted = np.asarray([r in set(rels) for r in self.rel_names], dtype=bool)
        lab = np.asarray(self.labels, dtype=object)
        if not len(self.src):
            return np.zeros(0, dtype=bool)
        return wanted[self.rel] & (lab[self.src] == "User") & (lab[self.dst] == "Product")

    def subgraph_edges(self, keep: np.ndarray) -> GraphData:
        """The same nodes with only the edges where ``keep``."""
        return GraphData(
            self.keys,
            self.labels,
            self.src[keep],
            self.dst[keep],
            self.rel[keep],
            self.rel_names,
            self.features,
            self.has_text,
            None if self.edge_ts is None else self.edge_ts[keep],
            self.index,
        )

    def summary(self) -> dict[str, Any]:
        from collections import Counter

        inter = self.interaction_mask()
        return {
            "nodes": self.num_nodes,
            "edges": self.num_edges,
            "nodes_by_label": dict(Counter(self.labels).most_common()),
            "edges_by_rel": {self.rel_names[r]: int(c) for r, c in zip(*np.unique(self.rel, return_counts=True))},
            "interaction_edges": int(inter.sum()),
            "products_with_text": int(self.has_text.sum()),
        }


class _Builder:
    """Collects nodes and typed edges by key; dedupes edges (first time wins)."""

    def __init__(self) -> None:
        self.keys: list[str] = []
        self.labels: list[str] = []
        self.index: dict[str, int] = {}
        self.rel_names: list[str] = []
        self.rel_index: dict[str, int] = {}
        self.edges: dict[tuple[int, int, int], int] = {}  # (src, rel, dst) -> first ts

    def node(self, key: str) -> int:
        i = self.index.get(key)
        if i is None:
            i = self.index[key] = len(self.keys)
            self.keys.append(key)
            self.labels.append(split_key(key)[0])
        return i

    def edge(self, src: str, rel: str, dst: str, ts: int = -1) -> None:
        r = self.rel_index.get(rel)
        if r is None:
            r = self.rel_index[rel] = len(self.rel_names)
            self.rel_names.append(rel)
        k = (self.node(src), r, self.node(dst))
        old = self.edges.get(k)
        if old is None or old < 0 or (0 <= ts < old):
            self.edges[k] = ts

    def build(self, features: Tensor, has_text: np.ndarray) -> GraphData:
        if self.edges:
            arr = np.asarray([(s, r, d, t) for (s, r, d), t in self.edges.items()], dtype=np.int64)
        else:
            arr = np.zeros((0, 4), dtype=np.int64)
        return GraphData(
            list(self.keys),
            list(self.labels),
            arr[:, 0],
            arr[:, 2],
            arr[:, 1],
            list(self.rel_names),
            features,
            has_text,
            arr[:, 3],
            dict(self.index),
        )


def product_structure(props: Mapping[str, Any]) -> list[tuple[str, str]]:
    """A product's owned out-edges (rel, dst key) and its category chain, as ingest writes them
    (``streamer.ingest.plan.owned_edges`` + ``PARENT`` edges between category path prefixes)."""
    out: list[tuple[str, str]] = []
    if props.get("brand"):
        out.append(("HAS_BRAND", f"Brand:{props['brand']}"))
    cats = category_ids(list(props.get("categories") or []))
    if cats:
        out.append(("IN_CATEGORY", f"Category:{cats[-1]}"))
    out.extend(("HAS_ATTRIBUTE", f"Attribute:{a}") for a, _, _ in attribute_ids(dict(props.get("attributes") or {})))
    return out


def category_chain(props: Mapping[str, Any]) -> list[tuple[str, str]]:
    cats = category_ids(list(props.get("categories") or []))
    return [(f"Category:{c}", f"Category:{p}") for c, p in zip(cats[1:], cats[:-1])]


def encode_texts(keys: Sequence[str], texts: Sequence[str], text_encoder: Any, dim: int) -> tuple[Tensor, np.ndarray]:
    """Features [len(keys), dim] for the given texts (empty text -> no text)."""
    feats = torch.zeros(len(keys), dim)
    has = np.asarray([bool(t) for t in texts], dtype=bool)
    idx = np.flatnonzero(has)
    if len(idx) and text_encoder is not None:
        feats[torch.as_tensor(idx)] = text_encoder.encode([texts[int(i)] for i in idx])
    elif text_encoder is None:
        has[:] = False
    return feats, has


# --- from the worker's checkpoint -------------------------------------------------------------
def from_engine_state(path: str | Path) -> GraphData:
    """The worker's replica and input features (``streamer.embed.state.save_engine``)."""
    from streamer.embed.replica import Replica, block_ranges

    state = torch.load(path, map_location="cpu", weights_only=True)
    rep = Replica.from_state_dict(state["replica"])
    live = rep.live_slots()
    seg, pos = block_ranges(rep.start[live], rep.length[live])
    code = rep.code[pos].astype(np.int64)
    out = code % 2 == 0  # one half per typed edge: the one in src's block
    remap = np.full(rep.num_slots, -1, dtype=np.int64)
    remap[live] = np.arange(len(live))
    src = remap[live[seg[out]]]
    dst = remap[rep.nbr[pos[out]].astype(np.int64)]
    rep_keys = cast(list[str], rep.keys)  # live slots have keys
    keys = [rep_keys[int(s)] for s in live]
    labels = [rep.label_of(int(s)) for s in live]
    h0 = state["h"][0][torch.as_tensor(live, dtype=torch.long)].float()
    # Products hold text features (or the frozen Product type row, which training never changes);
    # every other node holds its label's type row, which the model supplies.
    has_text = np.asarray([lb == "Product" for lb in labels], dtype=bool)
    return GraphData(keys, labels, src, dst, code[out] // 2, list(rep.rels), h0, has_text, np.full(len(src), -1, dtype=np.int64))


# --- from the graph DB ----------------------------------------------------------------------
def from_graph_db(settings: Any, text_encoder: Any) -> GraphData:
    """One read transaction: live products (text) and live relationships."""
    from sinks import cypher
    from sinks.graph_db import open_driver

    b = _Builder()
    texts: dict[str, str] = {}
    with open_driver(settings) as driver, driver.session(database=settings.bolt_database) as session:

        def read(tx):
            for rec in tx.run(cypher.SNAPSHOT_PRODUCTS):
                key = f"Product:{rec['id']}"
                b.node(key)
                texts[key] = product_text(dict(rec))
            for rec in tx.run(cypher.SNAPSHOT_RELATIONSHIPS):
                ts = rec["ts"]
                b.edge(
                    f"{rec['a_label']}:{rec['a']}", rec["rel"], f"{rec['b_label']}:{rec['b']}", int(ts) if ts is not None else -1
                )

        session.execute_read(read)
    dim = text_encoder.dim if text_encoder is not None else 384
    feats, has = encode_texts(b.keys, [texts.get(k, "") for k in b.keys], text_encoder, dim)
    return b.build(feats, has)


# --- from loader events ---------------------------------------------------------------------
_TS_CACHE: dict[Any, int] = {}


def ts_ms(value: Any) -> int:
    """Event ``ts`` (RFC 3339 string or Unix seconds) -> epoch ms."""
    hit = _TS_CACHE.get(value)
    if hit is not None:
        return hit
    if isinstance(value, (int, float)):
        out = int(round(float(value) * 1000))
    else:
        dt = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
        if dt.tzinfo is None:
            dt = dt.replace(tzinfo=UTC)
        out = int(round(dt.timestamp() * 1000))
    if len(_TS_CACHE) < 1_000_000:
        _TS_CACHE[value] = out
    return out


@dataclass
class EventLog:
    """A loader's stream, split by kind, times in epoch ms (products keep every upsert)."""

    products: dict[str, list[tuple[int, dict[str, Any]]]]  # id -> [(ts, event)] in order
    interactions: list[tuple[int, str, str, str]]  # (ts, user, product, rel)
    relations: list[tuple[int, str, str, str, str, str, str]]  # (ts, op, src label, src, rel, dst label, dst)

    @classmethod
    def read(cls, events: Iterable[dict[str, Any]]) -> EventLog:
        products: dict[str, list[tuple[int, dict[str, Any]]]] = {}
        inter: list[tuple[int, str, str, str]] = []
        rels: list[tuple[int, str, str, str, str, str, str]] = []
        for e in events:
            kind = e["type"]
            if kind == "interaction":
                inter.append((ts_ms(e["ts"]), str(e["user_id"]), str(e["product_id"]), ACTION_TYPES[e["action"]]))
            elif kind == "product":
                products.setdefault(str(e["id"]), []).append((ts_ms(e["ts"]), e))
            elif kind == "relation":
                rels.append(
                    (
                        ts_ms(e["ts"]),
                        e.get("op", "upsert"),
                        e["src"]["label"],
                        str(e["src"]["id"]),
                        str(e["rel"]).upper(),
                        e["dst"]["label"],
                        str(e["dst"]["id"]),
                    )
                )
        return cls(products, inter, rels)

    def interaction_times(self) -> np.ndarray:
        return np.asarray([t for t, *_ in self.interactions], dtype=np.int64)


def from_events(log: EventLog, text_encoder: Any, until_ms: int, all_products: bool = True, dim: int = 384) -> GraphData:
    """The graph at ``until_ms``: interactions and relations before it. Products: those upserted
    before it with their latest props then; with ``all_products`` also the products that appear
    only later, with their first props (a new catalogue item with its metadata but no history:
    the cold-start candidates). Deleted products are left out."""
    b = _Builder()
    texts: dict[str, str] = {}
    for pid, ups in log.products.items():
        before = [e for t, e in ups if t < until_ms]
        if before:
            props = before[-1]
        elif all_products:
            props = ups[0][1]
        else:
            continue
        if props.get("op", "upsert") == "delete":
            continue
        key = f"Product:{pid}"
        b.node(key)
        texts[key] = product_text(props)
        for rel, dst in product_structure(props):
            b.edge(key, rel, dst)
        for child, parent in category_chain(props):
            b.edge(child, "PARENT", parent)
    for t, op, sl, s, rel, dl, d in log.relations:
        if t >= until_ms:
            continue
        if op == "delete":
            b.edges.pop((b.node(f"{sl}:{s}"), b.rel_index.get(rel, -1), b.node(f"{dl}:{d}")), None)
        else:
            b.edge(f"{sl}:{s}", rel, f"{dl}:{d}", t)
    for t, user, pid, rel in log.interactions:
        if t < until_ms:
            b.edge(f"User:{user}", rel, f"Product:{pid}", t)
        elif all_products:
            b.node(f"Product:{pid}")  # rated later, no metadata: a candidate without text
    if text_encoder is not None:
        dim = text_encoder.dim
    feats, has = encode_texts(b.keys, [texts.get(k, "") for k in b.keys], text_encoder, dim)
    return b.build(feats, has)
