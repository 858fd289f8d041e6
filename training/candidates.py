"""Candidate retrieval from the current vectors: similar products, recommendations, text search.

Where the vectors come from (``VectorIndex.load(settings, source)``):

* ``checkpoint``: the worker's checkpointed engine (``<state_dir>/embed/engine.pt``): the
  published vector of every live node is ``fuse(h0, hL)`` of its cached rows, recomputed
  here with the fusion settings (exactly what the worker published up to that checkpoint);
  a user's interactions come from the replica.
* ``topic``: the last record per key on ``kg.embeddings`` (what any consumer sees); a user's
  interactions come from the graph DB.
* ``auto`` (default): the checkpoint when there is one, else the topic.

Scores are dot products of unit vectors (cosine). With ``concat`` fusion the score of two
products is ``w * cos(text) + (1 - w) * cos(structure)``.

* ``similar(key)``: products nearest a node's vector (the node itself left out).
* ``recommend(user)``: products nearest the user's vector, without those the user already
  interacted with through ``exclude_rels`` (default PURCHASED and RATED: already bought).
  With the active checkpoint's blend (``serving_blend``; ``kg-streamer train`` fits it on its
  validation split, training/blend.py) the cosine is blended with recent popularity and, for
  products nobody has taken yet, a text prior; the counts come from the graph DB
  (``product_popularity``). That blend is the default method of docs/quality.md.
* ``search(text)``: the query through the text encoder, then ``fuse(q, align(q))`` when the
  graph model (``KGS_GRAPH_CHECKPOINT``) has an alignment head (``kg-streamer train --align``),
  else ``fuse(q, 0)``, whose ranking is the text-only cosine.

``titles(settings, keys)`` reads the products' titles from the graph DB (``PRODUCTS_BY_ID``,
one parameterised read), so that the commands print ``rank id title score`` tables.

``write_back`` stores the vectors on the graph nodes (``n.embedding``, ``n.embedding_version``,
``n.embedding_dim``) for graph-side similarity, in batches of parameterised ``UNWIND`` writes.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from encoders.graph import fuse
from streamer.contracts.changes import split_key
from training.blend import Blend

log = logging.getLogger(__name__)

BOUGHT_RELS: tuple[str, ...] = ("PURCHASED", "RATED")
Source = Literal["auto", "checkpoint", "topic"]


@dataclass
class Candidate:
    key: str
    score: float
    title: str | None = None  # from the graph DB (``titles``); None: not looked up or none there

    @property
    def id(self) -> str:
        return split_key(self.key)[1]

    def as_dict(self) -> dict[str, Any]:
        return {"key": self.key, "id": self.id, "title": self.title, "score": round(self.score, 6)}


def titles(settings: Any, keys: Iterable[str], timeout_s: float = 10.0) -> dict[str, str]:
    """``{product key: title}`` of the live products among ``keys`` with a title, read from the
    graph DB in one parameterised statement (``cypher.PRODUCTS_BY_ID``). Non-product keys are
    skipped; when the graph DB does not answer, a warning and no titles (the ids still print)."""
    from sinks import cypher
    from sinks.graph_db import open_driver

    ids = sorted({split_key(k)[1] for k in keys if split_key(k)[0] == "Product"})
    if not ids:
        return {}
    try:
        with open_driver(settings, timeout_s=timeout_s) as driver:
            rows, _, _ = driver.execute_query(cypher.PRODUCTS_BY_ID, ids=ids, database_=settings.bolt_database)
    except Exception as e:  # noqa: BLE001 - titles are a convenience; the ranking stands without them
        log.warning("no titles: the graph DB at %s did not answer (%s: %s)", settings.bolt_uri, type(e).__name__, e)
        return {}
    return {f"Product:{r['id']}": str(r["title"]) for r in rows if r["title"]}


def with_titles(settings: Any, cands: Sequence[Candidate]) -> list[Candidate]:
    """The candidates with ``title`` filled in from the graph DB (``titles``)."""
    found = titles(settings, [c.key for c in cands])
    return [Candidate(c.key, c.score, found.get(c.key)) for c in cands]


@dataclass
class VectorIndex:
    keys: list[str]
    vectors: Tensor  # [n, dim] float32, unit rows
    versions: list[str]
    source: str
    settings: Any = None
    replica: Any = None  # checkpoint source: for interactions
    index: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.index:
            self.index = {k: i for i, k in enumerate(self.keys)}
        self.labels = np.asarray([split_key(k)[0] for k in self.keys], dtype=object)
        self.products = np.flatnonzero(self.labels == "Product")

    # ---- loading -----------------------------------------------------------------------
    @classmethod
    def load(cls, settings: Any, source: Source = "auto") -> VectorIndex:
        engine_path = Path(settings.state_dir) / "embed" / "engine.pt"
        if source == "checkpoint" or (source == "auto" and engine_path.exists()):
            return cls.from_checkpoint(settings, engine_path)
        return cls.from_topic(settings)

    @classmethod
    def from_checkpoint(cls, settings: Any, path: Path | None = None) -> VectorIndex:
        from streamer.embed.replica import Replica

        path = path or Path(settings.state_dir) / "embed" / "engine.pt"
        if not path.exists():
            raise FileNotFoundError(f"no worker checkpoint at {path}: run `kg-streamer embed` first or use --source topic")
        state = torch.load(path, map_location="cpu", weights_only=True)
        rep = Replica.from_state_dict(state["replica"])
        live = torch.as_tensor(rep.live_slots(), dtype=torch.long)
        vec = fuse(state["h"][0][live].float(), state["h"][-1][live].float(), settings.fusion, settings.fusion_text_weight)
        offsets = path.with_name("offsets.json")
        version = state.get("model_version", "")
        if offsets.exists():
            version = json.loads(offsets.read_text()).get("model_version", version)
        rep_keys = cast(list[str], rep.keys)  # live slots have keys
        keys = [rep_keys[int(s)] for s in live]
        return cls(keys, vec, [version] * len(keys), f"checkpoint {path}", settings, rep)

    @classmethod
    def from_topic(cls, settings: Any) -> VectorIndex:
        from streamer.embed.verify import last_vectors

        last = last_vectors(settings)
        items = sorted((k, r) for k, r in last.items() if r.vector is not None)
        if not items:
            raise ValueError(f"no vectors on {settings.topic_embeddings}")
        dims = Counter(len(r.vector) for _, r in items)
        dim = dims.most_common(1)[0][0]
        items = [(k, r) for k, r in items if len(r.vector) == dim]
        vec = torch.as_tensor(np.stack([r.vector for _, r in items]), dtype=torch.float32)
        return cls(
            [k for k, _ in items],
            F.normalize(vec, dim=1),
            [r.model_version for _, r in items],
            f"topic {settings.topic_embeddings}",
            settings,
        )

    # ---- facts -------------------------------------------------------------------------
    def version_summary(self) -> dict[str, int]:
        return dict(Counter(self.versions).most_common())

    def interacted(self, user_key: str, rels: Iterable[str] = BOUGHT_RELS) -> set[str]:
        """Product keys the user has an edge of one of ``rels`` to."""
        rels = set(rels)
        if self.replica is not None:
            rep = self.replica
            v = rep.index.get(user_key)
            if v is None:
                return set()
            s, n = int(rep.start[v]), int(rep.length[v])
            out = set()
            for w, c in zip(rep.nbr[s : s + n], rep.code[s : s + n]):
                if c % 2 == 0 and rep.rels[c // 2] in rels:
                    out.add(rep.keys[int(w)])
            return out
        return _interacted_from_graph(self.settings, split_key(user_key)[1], rels)

    # ---- ranking -----------------------------------------------------------------------
    def _top(self, query: Tensor, k: int, exclude: set[str]) -> list[Candidate]:
        return self._top_scores(self.vectors[torch.as_tensor(self.products, dtype=torch.long)] @ query, k, exclude)

    def _top_scores(self, scores: Tensor, k: int, exclude: set[str]) -> list[Candidate]:
        """The ``k`` best products by ``scores`` (one per row of ``self.products``)."""
        keep = np.ones(len(self.products), dtype=bool)
        if exclude:
            drop = np.asarray([self.index.get(key, -1) for key in exclude])
            keep = ~np.isin(self.products, drop)
        rows = np.flatnonzero(keep)
        if not len(rows):
            return []
        top = torch.topk(scores[torch.as_tensor(rows, dtype=torch.long)], min(k, len(rows)))
        return [Candidate(self.keys[int(self.products[rows[i]])], float(s)) for s, i in zip(top.values, top.indices)]

    def vector(self, key: str) -> Tensor:
        i = self.index.get(key)
        if i is None:
            raise KeyError(f"{key}: no vector (unknown node, deleted, or not embedded yet)")
        return self.vectors[i]

    def similar(self, key: str, k: int = 20) -> list[Candidate]:
        return self._top(self.vector(key), k, {key})

    def recommend(
        self, user: str, k: int = 20, exclude_rels: Sequence[str] = BOUGHT_RELS, blend: Blend | None = None
    ) -> tuple[list[Candidate], int]:
        """(candidates, how many interacted products were left out). With a ``blend``
        (``serving_blend``), the scores are ``blend.score`` of the cosines (training/blend.py)."""
        key = user if user.startswith("User:") else f"User:{user}"
        bought = self.interacted(key, exclude_rels)
        products = self.vectors[torch.as_tensor(self.products, dtype=torch.long)]
        scores = products @ self.vector(key)
        if blend is not None and not blend.plain:
            scores = self._blended(key, products, scores, blend)
        return self._top_scores(scores, k, bought), len(bought)

    def _blended(self, user_key: str, products: Tensor, dot: Tensor, blend: Blend) -> Tensor:
        """``blend.score`` for one user: recent popularity and the cold flags from the graph DB
        (``product_popularity``), the user's text profile from their products' vectors
        (``products``: the rows of ``self.products``)."""
        from training.blend import text_part
        from training.dataset import INTERACTION_RELS

        pop = product_popularity(self.settings, blend)
        if pop is None:
            return dot
        counts = torch.as_tensor(
            [pop.get(split_key(self.keys[int(i)])[1], (0, 0)) for i in self.products], dtype=torch.float32
        ).reshape(-1, 2)
        struct_dim = blend.struct_dim or self.settings.gnn_out  # the checkpoint's width, when the blend knows it
        text = text_part(products, struct_dim, self.settings.fusion)
        tsim = None
        position = {int(row): i for i, row in enumerate(self.products)}
        history = [position[r] for p in self.interacted(user_key, INTERACTION_RELS) if (r := self.index.get(p, -1)) in position]
        if text is not None and history:
            profile = F.normalize(text[torch.as_tensor(history, dtype=torch.long)].mean(0), dim=0)
            tsim = (text @ profile).unsqueeze(0)
        return blend.score(dot.unsqueeze(0), tsim, counts[:, 1], counts[:, 0] == 0)[0]

    def search(self, text: str, k: int = 20, text_encoder: Any = None, model: Any = None) -> tuple[list[Candidate], bool]:
        """(candidates, aligned): the query vector of ``text`` against product vectors."""
        q = query_vector(text, self.settings, self.vectors.shape[1], text_encoder, model)
        return self._top(q[0], k, set()), q[1]


def query_vector(text: str, settings: Any, dim: int, text_encoder: Any = None, model: Any = None) -> tuple[Tensor, bool]:
    """(vector, aligned) of a text query in published-vector space."""
    from encoders.graph import GraphEncoder
    from encoders.text import TextEncoder

    text_encoder = text_encoder or TextEncoder(settings.text_model, device="cpu")
    t = text_encoder.encode([text]).float()
    from streamer.embed.state import active_checkpoint

    checkpoint = active_checkpoint(settings) if model is None else None
    if checkpoint is not None:
        model = GraphEncoder.load(checkpoint)
    aligned = model is not None and model.has_align
    if aligned:
        with torch.no_grad():
            s = model.align_text(t)
    else:
        s = torch.zeros(1, dim - t.shape[1] if settings.fusion == "concat" else t.shape[1])
    q = fuse(t, s, settings.fusion, settings.fusion_text_weight)[0]
    if q.shape[0] != dim:
        raise ValueError(f"query vector has {q.shape[0]} dims, the vectors {dim}: check the fusion settings")
    return q, aligned


def serving_blend(settings: Any, index: VectorIndex) -> Blend | None:
    """The blend of the active checkpoint (``streamer.embed.state.active_checkpoint``), when the
    index's vectors are that checkpoint's (its ``published_model_version``); else None (the
    plain cosine ranking: a blend's scales fit only its own model's vectors)."""
    from streamer.embed.state import active_checkpoint
    from training.blend import checkpoint_metrics

    checkpoint = active_checkpoint(settings)
    doc = checkpoint_metrics(checkpoint)
    if not doc.get("blend"):
        return None
    version = doc.get("published_model_version")
    if version not in index.version_summary():
        log.warning("the vectors are not %s's (model %s): ranking by the model's cosine alone", checkpoint, version)
        return None
    return Blend.from_dict(doc["blend"])


def product_popularity(settings: Any, blend: Blend, timeout_s: float = 30.0) -> dict[str, tuple[int, int]] | None:
    """``{product id: (users ever, users in the blend's window)}`` of the live products with an
    interaction, from the graph DB (``cypher.NEWEST_INTERACTION`` gives "now": the newest
    interaction, so that replayed old data ranks as it did then; then
    ``cypher.PRODUCT_POPULARITY``). None, with a warning, when the graph DB does not answer.
    One scan of the interactions per call: fine for a command, not for a serving tier, which
    would keep these counts up to date instead."""
    from sinks import cypher
    from sinks.graph_db import open_driver
    from training.dataset import INTERACTION_RELS

    rels = list(INTERACTION_RELS)
    try:
        with open_driver(settings, timeout_s=timeout_s) as driver:
            rows, _, _ = driver.execute_query(cypher.NEWEST_INTERACTION, rels=rels, database_=settings.bolt_database)
            now = rows[0]["now"] if rows else None
            since = blend.since(int(now)) if now is not None else None
            rows, _, _ = driver.execute_query(cypher.PRODUCT_POPULARITY, rels=rels, since=since, database_=settings.bolt_database)
    except Exception as e:  # noqa: BLE001 - the cosine ranking stands without the popularity terms
        log.warning("no popularity: the graph DB at %s did not answer (%s: %s)", settings.bolt_uri, type(e).__name__, e)
        return None
    return {str(r["id"]): (int(r["users"]), int(r["recent"])) for r in rows}


def _interacted_from_graph(settings: Any, user_id: str, rels: set[str]) -> set[str]:
    from sinks import cypher
    from sinks.graph_db import open_driver

    with open_driver(settings) as driver:
        rows, _, _ = driver.execute_query(cypher.USER_PRODUCTS, id=user_id, database_=settings.bolt_database)
    return {f"Product:{r['id']}" for r in rows if r["rel"] in rels}


def write_back(index: VectorIndex, settings: Any, labels: Sequence[str] = ("Product",), batch: int = 1000) -> dict[str, int]:
    """Set ``embedding`` / ``embedding_version`` / ``embedding_dim`` on the graph's nodes."""
    from sinks import cypher
    from sinks.graph_db import open_driver

    written: dict[str, int] = {}
    with open_driver(settings) as driver:
        for label in labels:
            statement = cypher.write_vectors(label)
            rows = np.flatnonzero(index.labels == label)
            total = 0
            for lo in range(0, len(rows), batch):
                chunk = rows[lo : lo + batch]
                payload = [
                    {
                        "id": split_key(index.keys[int(i)])[1],
                        "version": index.versions[int(i)],
                        "vector": [float(x) for x in index.vectors[int(i)].tolist()],
                    }
                    for i in chunk
                ]
                records, _, _ = driver.execute_query(statement, rows=payload, database_=settings.bolt_database)
                total += int(records[0]["written"]) if records else 0
            written[label] = total
    return written
