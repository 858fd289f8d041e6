"""Seeded synthetic e-commerce knowledge graphs with realistic skew, and mixed update streams.

Used by ``bench/incremental.py`` (scale benchmarks) and by the engine tests (small sizes).

Graph model (the one the ingest consumer writes, docs/engine.md):

* ``Product`` -[IN_CATEGORY]-> leaf ``Category`` -[PARENT]-> top-level ``Category``
* ``Product`` -[HAS_BRAND]-> ``Brand``
* ``User`` -[VIEWED]-> ``Product`` and ``User`` -[PURCHASED]-> ``Product`` (one edge per distinct
  (user, product, action); repeats of a pair collapse like the graph's MERGE does)

Skew, all drawn from one ``numpy.random.Generator(seed)`` (same seed + config = same graph):

* **category sizes** are Zipf: size(rank k) ~ k^-s over ``categories`` leaf categories. The
  exponent ``s`` is *solved* (bisection) so that the largest category holds
  ``largest_category`` products (e.g. 1M products, 2,000 categories, largest 122k gives
  s ~ 1.0, the example of gnn_anchors.md section 4.5); every category has >= 1 product.
  Leaf categories hang under ``top_categories`` top-level ones (round robin by rank).
* **brand sizes** are Zipf with exponent ``brand_zipf`` over ``brands``; a product's brand is
  drawn independently of its category.
* **user activity** is power-law: a user's number of interactions is
  ``ceil(x_min * (1 + Lomax(activity_alpha)))`` (a Pareto tail with pdf exponent
  ``activity_alpha + 1``), capped at ``max_activity``; ``x_min`` is set so that the mean is
  ``interactions_per_user`` before the cap.
* **product popularity** is Zipf with exponent ``popularity_zipf`` over a random permutation of
  the products: each interaction picks its product by popularity (continuous power-law
  inverse CDF, floored to a rank: ``zipf_ranks``). ``purchase_share`` of the
  interactions are purchases, the rest views.
* **features**: products get seeded random unit vectors of ``feature_dim`` (a stand-in for
  text embeddings, which are unit-norm too); every other node gets its node-type embedding
  (the engine's default), exactly like the worker.

Presets (``PRESETS``): ``tiny`` (tests), ``small`` (~110k nodes), ``1m`` (1.0M nodes, ~18M
directed edges, largest category 100k) and ``products`` (2.5M nodes, ~120M directed edges,
largest category 122k: the size of ogbn-products). ``SynthGraph.stats()`` reports the
realised sizes and degrees.

Update streams (``UpdateStream``): seeded, mixed event types drawn with the weights in
``StreamMix``: new interactions (existing users, sometimes new users; products by
popularity), removed interactions (a random existing interaction), product feature updates
(new text embedding for a uniformly drawn product), new products (features + IN_CATEGORY to
a category drawn by category size + HAS_BRAND) and product deletes. ``next(n)`` returns a
micro-batch of ``streamer.contracts.changes.Change`` records plus the features of the products it
(re)describes, ready for ``IncrementalEngine.apply``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np
import torch

from streamer.contracts import changes as C
from streamer.embed.replica import sorted_unique

REL_NAMES = ("IN_CATEGORY", "PARENT", "HAS_BRAND", "VIEWED", "PURCHASED")
IN_CATEGORY, PARENT, HAS_BRAND, VIEWED, PURCHASED = range(5)


@dataclass(frozen=True)
class SynthConfig:
    products: int = 2_000
    users: int = 3_000
    categories: int = 40
    largest_category: int = 400
    top_categories: int = 5
    brands: int = 100
    brand_zipf: float = 1.1
    interactions_per_user: float = 8.0
    activity_alpha: float = 1.2
    max_activity: int = 1_000
    popularity_zipf: float = 0.9
    purchase_share: float = 0.1
    feature_dim: int = 384
    seed: int = 0

    def scaled(self, **kw: Any) -> SynthConfig:
        return replace(self, **kw)


PRESETS: dict[str, SynthConfig] = {
    "tiny": SynthConfig(),
    "small": SynthConfig(
        products=40_000,
        users=70_000,
        categories=400,
        largest_category=8_000,
        top_categories=10,
        brands=2_000,
        interactions_per_user=12.0,
        max_activity=5_000,
    ),
    "1m": SynthConfig(
        products=500_000,
        users=500_000,
        categories=1_000,
        largest_category=100_000,
        top_categories=20,
        brands=10_000,
        interactions_per_user=16.0,
        max_activity=20_000,
    ),
    "products": SynthConfig(
        products=1_000_000,
        users=1_478_000,
        categories=2_000,
        largest_category=122_451,
        top_categories=20,
        brands=20_000,
        interactions_per_user=51.0,
        max_activity=50_000,
    ),
}


def zipf_exponent_for(n_items: int, total: int, largest: int) -> float:
    """Exponent s with total * 1 / H(n_items, s) == largest (bisection)."""
    if not 0 < largest <= total:
        raise ValueError("need 0 < largest <= total")
    ranks = np.arange(1, n_items + 1, dtype=np.float64)
    target = largest / total
    if target <= 1.0 / n_items:
        return 0.0
    lo, hi = 0.0, 8.0
    for _ in range(100):
        mid = (lo + hi) / 2
        share = 1.0 / np.sum(ranks**-mid)
        lo, hi = (mid, hi) if share < target else (lo, mid)
    return (lo + hi) / 2


def zipf_sizes(n_items: int, total: int, s: float, rng: np.random.Generator) -> np.ndarray:
    """Sizes of ``n_items`` groups summing to ``total`` (each >= 1), proportional to rank^-s."""
    w = np.arange(1, n_items + 1, dtype=np.float64) ** -s
    raw = w / w.sum() * (total - n_items)
    sizes = np.floor(raw).astype(np.int64) + 1
    short = total - int(sizes.sum())  # hand out the rounding remainder by largest fraction
    if short > 0:
        sizes[np.argsort(-(raw - np.floor(raw)), kind="stable")[:short]] += 1
    return sizes


def zipf_ranks(n: int, s: float, u: np.ndarray) -> np.ndarray:
    """0-based ranks in [0, n) for uniforms ``u``, drawn with the continuous power law
    p(x) ~ x^-s on [1, n + 1) (closed-form inverse CDF, no table search), floored."""
    if abs(s - 1.0) < 1e-9:
        x = np.exp(u * np.log(n + 1.0))
    else:
        a = 1.0 - s
        x = ((float(n + 1) ** a - 1.0) * u + 1.0) ** (1.0 / a)
    return np.minimum(x.astype(np.int64) - 1, n - 1)


@dataclass
class SynthGraph:
    config: SynthConfig
    keys: list[str]
    src: np.ndarray  # int64 node indices into keys
    dst: np.ndarray
    rel: np.ndarray  # int8 ids into REL_NAMES
    n_products: int
    n_leaf: int
    n_top: int
    n_brands: int
    n_users: int
    category_of: np.ndarray  # leaf-category index per product
    brand_of: np.ndarray
    popularity_perm: np.ndarray  # product of each popularity rank
    category_cdf: np.ndarray  # category sizes as a cdf (new products land by size)
    zipf_s: float
    info: dict[str, Any] = field(default_factory=dict)

    rel_names = REL_NAMES

    # index ranges: products, leaf categories, top categories, brands, users
    @property
    def leaf0(self) -> int:
        return self.n_products

    @property
    def top0(self) -> int:
        return self.n_products + self.n_leaf

    @property
    def brand0(self) -> int:
        return self.top0 + self.n_top

    @property
    def user0(self) -> int:
        return self.brand0 + self.n_brands

    @property
    def num_nodes(self) -> int:
        return len(self.keys)

    def product_features(self, rows: int | None = None, seed: int | None = None) -> torch.Tensor:
        """Seeded unit-norm product features [rows or n_products, feature_dim] (float32, CPU)."""
        g = torch.Generator().manual_seed(self.config.seed if seed is None else seed)
        x = torch.randn(self.n_products if rows is None else rows, self.config.feature_dim, generator=g)
        return torch.nn.functional.normalize(x, dim=1)

    def stats(self) -> dict[str, Any]:
        deg = np.bincount(np.concatenate([self.src, self.dst]), minlength=self.num_nodes)
        users = deg[self.user0 :]
        prods = deg[: self.n_products]
        cat_sizes = np.bincount(self.category_of, minlength=self.n_leaf)
        return {
            "nodes": self.num_nodes,
            "typed_edges": int(len(self.src)),
            "directed_edges": int(2 * len(self.src)),
            "products": self.n_products,
            "users": self.n_users,
            "leaf_categories": self.n_leaf,
            "top_categories": self.n_top,
            "brands": self.n_brands,
            "category_zipf_s": round(self.zipf_s, 4),
            "largest_category": int(cat_sizes.max()),
            "median_category": int(np.median(cat_sizes)),
            "max_user_degree": int(users.max()) if len(users) else 0,
            "mean_user_degree": round(float(users.mean()), 2) if len(users) else 0.0,
            "max_product_degree": int(prods.max()),
            "max_degree": int(deg.max()),
            "mean_degree": round(float(deg.mean()), 2),
            **self.info,
        }

    # hub picks for the benchmark
    def largest_category(self) -> int:
        """Node index of the largest leaf category."""
        return self.leaf0 + int(np.argmax(np.bincount(self.category_of, minlength=self.n_leaf)))

    def product_in_largest_category(self) -> int:
        cat = self.largest_category() - self.leaf0
        return int(np.flatnonzero(self.category_of == cat)[0])

    def most_active_user(self) -> int:
        is_user = self.src >= self.user0
        counts = np.bincount(self.src[is_user] - self.user0, minlength=self.n_users)
        return self.user0 + int(np.argmax(counts))


def generate(config: SynthConfig | str) -> SynthGraph:
    """The seeded synthetic graph of a config (or a preset name)."""
    cfg = PRESETS[config] if isinstance(config, str) else config
    rng = np.random.default_rng(cfg.seed)
    P, U, NC, NT, NB = cfg.products, cfg.users, cfg.categories, cfg.top_categories, cfg.brands
    s = zipf_exponent_for(NC, P - NC, cfg.largest_category - 1)  # zipf_sizes adds 1 to each
    sizes = zipf_sizes(NC, P, s, rng)
    category_of = rng.permutation(np.repeat(np.arange(NC, dtype=np.int64), sizes))
    brand_sizes = zipf_sizes(NB, P, cfg.brand_zipf, rng)
    brand_of = rng.permutation(np.repeat(np.arange(NB, dtype=np.int64), brand_sizes))
    leaf0, top0 = P, P + NC
    brand0 = top0 + NT
    user0 = brand0 + NB
    keys = (
        [f"Product:p{i}" for i in range(P)]
        + [f"Category:c{i}" for i in range(NC)]
        + [f"Category:t{i}" for i in range(NT)]
        + [f"Brand:b{i}" for i in range(NB)]
        + [f"User:u{i}" for i in range(U)]
    )
    # user activity: Pareto tail, mean interactions_per_user before the cap
    a = cfg.activity_alpha
    x_min = cfg.interactions_per_user * (a - 1) / a if a > 1 else 1.0
    activity = np.minimum(np.ceil(x_min * (1.0 + rng.pareto(a, U))), cfg.max_activity).astype(np.int64)
    total = int(activity.sum())
    users = np.repeat(np.arange(U, dtype=np.int64), activity)
    perm = rng.permutation(P)
    prods = perm[zipf_ranks(P, cfg.popularity_zipf, rng.random(total))]
    action = np.where(rng.random(total) < cfg.purchase_share, PURCHASED, VIEWED).astype(np.int8)
    # one edge per distinct (user, action, product), like the graph's MERGE
    pair = sorted_unique((users * 2 + (action == PURCHASED)) * P + prods)
    prods, users = pair % P, pair // P // 2
    action = np.where((pair // P) % 2 == 1, PURCHASED, VIEWED).astype(np.int8)
    pids = np.arange(P, dtype=np.int64)
    src = np.concatenate([pids, leaf0 + np.arange(NC, dtype=np.int64), pids, user0 + users])
    dst = np.concatenate([leaf0 + category_of, top0 + np.arange(NC, dtype=np.int64) % NT, brand0 + brand_of, prods])
    rel = np.concatenate([np.full(P, IN_CATEGORY, np.int8), np.full(NC, PARENT, np.int8), np.full(P, HAS_BRAND, np.int8), action])
    cat_cdf = np.cumsum(sizes) / P
    return SynthGraph(
        cfg, keys, src, dst, rel, P, NC, NT, NB, U, category_of, brand_of, perm, cat_cdf, s, {"interactions_drawn": total}
    )


# ---- update streams ----------------------------------------------------------------------------
@dataclass(frozen=True)
class StreamMix:
    """Relative weights of the event types of a mixed update stream."""

    interaction_add: float = 0.70
    interaction_delete: float = 0.10
    feature_update: float = 0.12
    product_add: float = 0.06
    product_delete: float = 0.02
    new_user_share: float = 0.05  # of interaction adds, by a user never seen before

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


INTERACTIONS_ONLY = StreamMix(
    interaction_add=0.5, interaction_delete=0.5, feature_update=0.0, product_add=0.0, product_delete=0.0, new_user_share=0.0
)


class UpdateStream:
    """A seeded stream of mixed micro-batches over a ``SynthGraph`` (see the module doc).

    It draws against the graph as generated plus what it created itself; events that name
    something already gone (a deleted product's interaction, a removed interaction) are still
    emitted, as a real changelog would carry them, and the engine treats them as no-ops."""

    def __init__(self, graph: SynthGraph, mix: StreamMix = StreamMix(), seed: int = 1, t0: int = 1_700_000_000_000):
        self.g = graph
        self.mix = mix
        self.rng = np.random.default_rng(seed)
        self.ts = t0
        self.next_product = graph.n_products
        self.next_user = graph.n_users
        w = np.asarray(
            [mix.interaction_add, mix.interaction_delete, mix.feature_update, mix.product_add, mix.product_delete],
            dtype=np.float64,
        )
        self.cdf = np.cumsum(w) / w.sum()
        self.is_inter = np.flatnonzero(graph.src >= graph.user0)
        self.feature_seed = int(self.rng.integers(1 << 31))
        self.counts = {k: 0 for k in ("interaction_add", "interaction_delete", "feature_update", "product_add", "product_delete")}

    def _features(self, n: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.feature_seed)
        self.feature_seed += 1
        return torch.nn.functional.normalize(torch.randn(n, self.g.config.feature_dim, generator=g), dim=1)

    def _product_key(self, p: int) -> str:
        return f"Product:p{p}"

    def _popular_products(self, n: int) -> np.ndarray:
        g = self.g
        return g.popularity_perm[zipf_ranks(g.n_products, g.config.popularity_zipf, self.rng.random(n))]

    def next(self, n: int) -> tuple[list[C.Change], dict[str, torch.Tensor]]:
        g, rng = self.g, self.rng
        kinds = np.searchsorted(self.cdf, rng.random(n), side="right")
        out: list[C.Change] = []
        feats: dict[str, torch.Tensor] = {}
        n_feat = int(np.sum((kinds == 2) | (kinds == 3)))
        x = self._features(n_feat) if n_feat else None
        xi = 0
        pops = self._popular_products(n)
        users = rng.integers(0, g.n_users, n)
        for i, k in enumerate(kinds.tolist()):
            self.ts += 1
            ts = self.ts
            if k == 0:
                self.counts["interaction_add"] += 1
                if rng.random() < self.mix.new_user_share:
                    u = f"User:u{self.next_user}"
                    self.next_user += 1
                else:
                    u = f"User:u{int(users[i])}"
                rel = REL_NAMES[PURCHASED] if rng.random() < g.config.purchase_share else REL_NAMES[VIEWED]
                out.append(C.edge_upsert(u, rel, self._product_key(int(pops[i])), ts))
            elif k == 1:
                self.counts["interaction_delete"] += 1
                e = int(self.is_inter[rng.integers(len(self.is_inter))])
                out.append(C.edge_delete(g.keys[int(g.src[e])], REL_NAMES[int(g.rel[e])], g.keys[int(g.dst[e])], ts))
            elif k == 2:
                self.counts["feature_update"] += 1
                key = self._product_key(int(rng.integers(g.n_products)))
                out.append(C.node_upsert("Product", key.split(":", 1)[1], ts))
                feats[key] = x[xi]  # type: ignore[index]
                xi += 1
            elif k == 3:
                self.counts["product_add"] += 1
                pid = f"p{self.next_product}"
                self.next_product += 1
                cat = int(np.searchsorted(g.category_cdf, rng.random()))
                brand = int(g.brand_of[rng.integers(g.n_products)])
                key = f"Product:{pid}"
                out.append(C.node_upsert("Product", pid, ts))
                out.append(C.edge_upsert(key, "IN_CATEGORY", g.keys[g.leaf0 + min(cat, g.n_leaf - 1)], ts))
                out.append(C.edge_upsert(key, "HAS_BRAND", g.keys[g.brand0 + brand], ts))
                feats[key] = x[xi]  # type: ignore[index]
                xi += 1
            else:
                self.counts["product_delete"] += 1
                p = int(rng.integers(g.n_products))
                out.append(C.node_delete("Product", f"p{p}", ts))
                feats.pop(self._product_key(p), None)
        return out, feats


def describe(config: SynthConfig) -> dict[str, Any]:
    d = asdict(config)
    d["category_zipf_s"] = round(
        zipf_exponent_for(config.categories, config.products - config.categories, config.largest_category - 1), 4
    )
    return d


__all__ = [
    "INTERACTIONS_ONLY",
    "PRESETS",
    "REL_NAMES",
    "StreamMix",
    "SynthConfig",
    "SynthGraph",
    "UpdateStream",
    "describe",
    "generate",
    "zipf_exponent_for",
    "zipf_sizes",
]
