"""Re-embed on a model change (no services): the layer-wise full-graph rebuild equals the
engine's own, a checkpoint written by another model comes back re-embedded exactly as a fresh
load with the new model would be; candidates and metrics on a tiny engine."""

from __future__ import annotations

import numpy as np
import torch

from encoders.graph import GraphEncoder
from streamer.contracts import changes as C
from streamer.embed.engine import IncrementalEngine
from streamer.embed.state import layerwise_rebuild, load_engine, save_engine
from streamer.settings import Settings
from tests.training.planted import CFG
from training.candidates import VectorIndex
from training.ranking import rank_metrics
from training.train import TrainConfig, train


def _engine(graph, model: GraphEncoder) -> IncrementalEngine:
    eng = IncrementalEngine(model, "cpu")
    feats = torch.where(torch.as_tensor(graph.has_text).unsqueeze(1), graph.features, model.type_features(graph.labels))
    rel = np.asarray(graph.rel)
    eng.bulk_load(graph.keys, graph.src, graph.dst, rel, feats, rel_names=graph.rel_names)
    return eng


def test_layerwise_rebuild_equals_rebuild(graph):
    eng = _engine(graph, GraphEncoder(CFG))
    eng.apply([C.edge_upsert("User:U1", "PURCHASED", "Product:P5", 1), C.node_delete("Product", "P9", 2)])
    h = [t.clone() for t in eng.h]
    s = [t.clone() for t in eng.S]
    layerwise_rebuild(eng, chunk_rows=17, progress=False)
    for a, b in zip(h + s, eng.h + eng.S):
        assert torch.allclose(a, b, atol=1e-5)
    assert eng.verify()[1] == 0


def test_a_checkpoint_of_another_model_is_reembedded_like_a_fresh_load(graph, tmp_path):
    old = GraphEncoder(CFG)
    eng = _engine(graph, old)
    path = tmp_path / "engine.pt"
    save_engine(eng, path)
    trained = train(graph, TrainConfig(epochs=2, batch_size=64, negatives=16, progress=False, device="cpu"), CFG).model
    assert trained.version != old.version
    loaded, reembedded = load_engine(path, trained, "cpu", progress=False)
    assert reembedded
    fresh = _engine(graph, trained)  # the same graph loaded from scratch with the new model
    for a, b in zip(loaded.h, fresh.h):
        assert torch.allclose(a[: graph.num_nodes], b[: graph.num_nodes], atol=1e-5)
    assert loaded.verify()[1] == 0
    again, reembedded = load_engine(path, old, "cpu", progress=False)
    assert not reembedded and torch.equal(again.h[-1], eng.h[-1])


def test_candidates_from_a_checkpoint(graph, tmp_path):
    model = GraphEncoder(CFG)
    eng = _engine(graph, model)
    (tmp_path / "embed").mkdir()
    save_engine(eng, tmp_path / "embed" / "engine.pt")
    settings = Settings(_env_file=None, state_dir=tmp_path)
    index = VectorIndex.load(settings)
    assert index.source.startswith("checkpoint")
    user = "User:U3"
    bought = index.interacted(user)
    assert bought == {graph.keys[d] for s, d in zip(graph.src, graph.dst) if graph.keys[s] == user}
    recs, excluded = index.recommend("U3", k=500)
    assert excluded == len(bought)
    assert {c.key for c in recs} == {k for k in graph.keys if k.startswith("Product:")} - bought
    scores = [c.score for c in recs]
    assert scores == sorted(scores, reverse=True)
    want = eng.vectors([eng.replica.index[user]])[0] @ eng.vectors([eng.replica.index[recs[0].key]])[0]
    assert abs(float(want) - recs[0].score) < 1e-5
    sim = index.similar("Product:P0", k=5)
    assert len(sim) == 5 and "Product:P0" not in {c.key for c in sim}


def test_rank_metrics():
    scores = torch.tensor([[0.9, 0.8, 0.7, 0.1], [0.1, 0.2, 0.3, 0.4]])
    users = np.array([0, 1])
    got = rank_metrics(
        lambda b: scores[torch.as_tensor(b)],
        users,
        [np.array([1, 3]), np.array([0])],
        [np.array([0]), np.array([], dtype=np.int64)],
        k=2,
    )
    # user 0: item 0 excluded, top-2 = [1, 2]: 1 hit of 2 targets; NDCG = 1 / (1 + 1/log2(3))
    # user 1: top-2 = [3, 2]: no hit
    assert abs(got["recall@2"] - 0.25) < 1e-9
    assert abs(got["ndcg@2"] - 0.5 * (1 / (1 + 1 / np.log2(3)))) < 1e-9
    assert got["users"] == 2
