"""The leak-free evaluation protocol (``training.evaluate``), one test per rule, on a tiny
synthetic event log (no text model, no services)."""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np
import pytest
import torch

from encoders.graph import GraphEncoder, GraphEncoderConfig
from encoders.text import product_text
from training.dataset import EventLog, from_events
from training.evaluate import Split, catalogue_at, catalogue_vectors, evaluate_dataset, published_vectors
from training.ranking import rank_per_user, tie_order
from training.train import TrainConfig

DIM = 16
T = 1_000_000  # split time, epoch ms
CFG = GraphEncoderConfig(in_dim=DIM, hidden=8, out=8, layers=2, seed=3)


class FakeText:
    """Deterministic text embeddings; remembers every text it was asked for."""

    model_id = "fake"
    dim = DIM

    def __init__(self) -> None:
        self.seen: list[str] = []
        self.encoded_count = 0

    def encode(self, texts: list[str]) -> torch.Tensor:
        self.seen.extend(texts)
        self.encoded_count += len(texts)
        rows = []
        for t in texts:
            seed = int.from_bytes(hashlib.sha256(t.encode()).digest()[:4], "little")
            rows.append(torch.nn.functional.normalize(torch.randn(DIM, generator=torch.Generator().manual_seed(seed)), dim=0))
        return torch.stack(rows)


def product(pid: str, ts_ms: int, title: str, brand: str = "Acme", cats: list[str] | None = None) -> dict:
    cats = cats or ["Home", "Kitchen"]
    return {"type": "product", "id": pid, "ts": ts_ms / 1000, "title": title, "brand": brand, "categories": cats}


def buy(user: str, pid: str, ts_ms: int) -> dict:
    return {"type": "interaction", "user_id": user, "product_id": pid, "ts": ts_ms / 1000, "action": "purchase"}


def events(after: bool = True) -> list[dict]:
    """P1, P2, P6 exist before T; after T: P1 is retitled, P3 and P5 appear (P5 in a new
    category), P4 is only ever bought (no product event), a relation P1-P3 is added."""
    ev = [
        product("P1", 10, "red mug"),
        product("P2", 20, "blue mug"),
        product("P6", 25, "teapot", brand="Other", cats=["Home"]),
        buy("u1", "P1", 100),
        buy("u2", "P2", 200),
        buy("u2", "P1", 300),
        buy("u3", "P6", 400),
    ]
    if after:
        ev += [
            product("P1", T + 10, "red mug LATER TITLE"),
            product("P3", T + 20, "green mug", brand="Acme"),
            product("P5", T + 30, "cast iron pan", brand="Acme", cats=["Home", "Kitchen", "Pans"]),
            {
                "type": "relation",
                "ts": (T + 40) / 1000,
                "src": {"label": "Product", "id": "P1"},
                "rel": "also_bought",
                "dst": {"label": "Product", "id": "P3"},
            },
            buy("u1", "P3", T + 50),
            buy("u1", "P4", T + 60),
            buy("u1", "P1", T + 70),  # a repeat: not a target
            buy("u1", "P2", T + 80),
            buy("u9", "P2", T + 90),  # no history before T
        ]
    return ev


@pytest.fixture
def log_() -> EventLog:
    return EventLog.read(events())


def test_graph_at_t_holds_no_node_edge_or_text_from_after_t(log_):
    text = FakeText()
    cat = catalogue_at(log_, text, T, dim=DIM)
    g = cat.graph
    assert {k for k in g.keys if k.startswith("Product:")} == {"Product:P1", "Product:P2", "Product:P6"}
    assert g.edge_ts is not None and bool((g.edge_ts < T).all())  # interactions and relations before T only
    assert "ALSO_BOUGHT" not in g.rel_names
    # P1's text is its text at T, not the later title
    p1 = g.index["Product:P1"]
    assert torch.allclose(g.features[p1], FakeText().encode([product_text(events()[0])])[0])
    # Brand and Category nodes aggregate only products of before T
    brand = g.index["Brand:Acme"]
    nbrs = {g.keys[int(s)] for s in g.src[g.dst == brand]} | {g.keys[int(d)] for d in g.dst[g.src == brand]}
    assert nbrs == {"Product:P1", "Product:P2"}
    assert not any("LATER" in t for t in text.seen)  # the later title is never encoded
    # the graph equals the one built from the events before T alone
    before = from_events(EventLog.read(events(after=False)), FakeText(), T, all_products=False, dim=DIM)
    assert sorted(before.keys) == sorted(g.keys) and before.num_edges == g.num_edges


def test_training_and_baselines_see_only_before_t(log_, monkeypatch):
    from training import evaluate

    seen: dict[str, Any] = {}
    real_train = evaluate.train

    def spy(graph, cfg, model_cfg):
        seen["keys"] = set(graph.keys)
        seen["max_ts"] = int(graph.edge_ts.max())
        return real_train(graph, cfg, model_cfg)

    monkeypatch.setattr(evaluate, "train", spy)
    cfg = TrainConfig(epochs=1, batch_size=8, negatives=2, progress=False, device="cpu", val_fraction=0.0)
    rep = evaluate_dataset("tiny", log_, FakeText(), [cfg], CFG, split_quantile=0.4, bootstrap=50)
    t_split = int(np.quantile(log_.interaction_times(), 0.4, method="lower"))
    assert seen["max_ts"] < t_split
    late_products = {f"Product:{pid}" for pid, ups in log_.products.items() if ups[0][0] >= t_split}
    assert late_products and not (late_products & seen["keys"])
    assert rep["default_method"] == "fused_blend"
    for m in ("popularity", "popularity_recent", "item_knn", "bpr_mf", "text_only", "untrained", "fused_trained", "fused_blend"):
        assert m in rep["results"]
    assert "ci95_vs_default" in rep["results"]["popularity"]["overall"]
    assert "ci95_vs_default" in rep["results"]["fused_trained"]["overall"]
    assert "ci95_vs_default" not in rep["results"]["fused_blend"]["overall"]


def test_baseline_inputs_are_before_t(log_):
    cat = catalogue_at(log_, FakeText(), T, dim=DIM)
    split = Split(cat, log_, T)
    users, items, ts = split.before
    assert len(ts) == 4 and (ts < T).all()
    assert (items < cat.n_at_t).all()  # no new product has an interaction before T


def test_new_products_enter_with_their_own_product_event_only(log_):
    cat = catalogue_at(log_, FakeText(), T, dim=DIM)
    assert cat.new_ids == ["P3", "P5"]  # in order of appearance; P4 has no product event
    model = GraphEncoder(CFG)
    at_t, new = catalogue_vectors(model, cat, "concat", 0.5)
    # the graph's own nodes keep their vectors at T
    assert torch.allclose(at_t, published_vectors(model, cat.graph, "concat", 0.5), atol=1e-5)
    before = events(after=False)
    for j, pid in enumerate(cat.new_ids):
        own = next(e for e in events() if e["type"] == "product" and e["id"] == pid)
        world = from_events(EventLog.read(before + [dict(own, ts=(T - 1) / 1000)]), FakeText(), T, all_products=False, dim=DIM)
        want = published_vectors(model, world, "concat", 0.5)[world.index[f"Product:{pid}"]]
        assert torch.allclose(new[j], want, atol=1e-5), pid  # P5 does not reach P3's vector, nor P3 P5's


def test_products_seen_only_through_later_interactions_are_not_in_the_catalogue(log_):
    cat = catalogue_at(log_, FakeText(), T, dim=DIM)
    assert "Product:P4" not in cat.column
    split = Split(cat, log_, T)
    assert split.targets_not_in_catalogue == 1
    assert split.stats()["new_products"] == 2


def test_training_items_are_excluded_from_targets_and_ranking(log_):
    cat = catalogue_at(log_, FakeText(), T, dim=DIM)
    split = Split(cat, log_, T)
    u1 = cat.graph.index["User:u1"]
    i = split.users.tolist().index(u1)
    p1 = cat.column["Product:P1"]
    assert p1 in split.exclude[i] and p1 not in split.targets[i]  # the repeat purchase is no target
    assert sorted(split.targets[i].tolist()) == sorted([cat.column["Product:P2"], cat.column["Product:P3"]])
    # a scorer that puts the history first: it is never ranked, the next item is
    scores = torch.zeros(1, cat.n_items)
    scores[0, p1] = 10.0
    scores[0, cat.column["Product:P3"]] = 5.0
    rec, _ = rank_per_user(lambda b: scores, np.array([u1]), [np.array([cat.column["Product:P3"]])], [np.array([p1])], k=1)
    assert rec.tolist() == [1.0]


def test_ties_are_broken_by_a_seeded_random_order():
    n, k = 200, 20
    flat = torch.zeros(1, n)
    tgt_first = [np.arange(k)]  # the first k items by index (catalogue order)
    r0, _ = rank_per_user(lambda b: flat, np.array([0]), tgt_first, [np.zeros(0, np.int64)], k=k, tie_seed=0)
    r0b, _ = rank_per_user(lambda b: flat, np.array([0]), tgt_first, [np.zeros(0, np.int64)], k=k, tie_seed=0)
    assert r0[0] < 0.5  # not catalogue order (it would be 1.0)
    assert r0[0] == r0b[0]  # seeded: the same every run
    top = set(tie_order(n, 0)[:k].tolist())
    r_top, _ = rank_per_user(lambda b: flat, np.array([0]), [np.asarray(sorted(top))], [np.zeros(0, np.int64)], k=k, tie_seed=0)
    assert r_top[0] == 1.0  # the ties follow tie_order
    assert set(tie_order(n, 1)[:k].tolist()) != top
    # scores still decide before ties do
    s = torch.zeros(1, n)
    s[0, 7] = 1.0
    r, _ = rank_per_user(lambda b: s, np.array([0]), [np.array([7])], [np.zeros(0, np.int64)], k=1, tie_seed=0)
    assert r[0] == 1.0
