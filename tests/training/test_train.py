"""Training: the fast training forward is the worker's model, runs are deterministic, the best
checkpoint reloads to identical outputs, and training beats the untrained encoder on a graph
with planted structure."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from encoders.graph import GraphEncoder, GraphEncoderConfig, fuse
from tests.training.planted import CFG, planted_graph
from training.train import TrainConfig, TrainGraph, edge_index, save, split_validation, train, train_forward, validate

FAST = TrainConfig(epochs=8, batch_size=64, negatives=32, lr=1e-2, patience=12, progress=False, device="cpu", temperature=0.1)


def _x0(model: GraphEncoder, graph) -> torch.Tensor:
    has = torch.as_tensor(graph.has_text).unsqueeze(1)
    return torch.where(has, graph.features, model.type_features(graph.labels))


def test_training_forward_equals_the_pyg_forward_the_worker_runs(graph):
    model = GraphEncoder(CFG)
    tg = TrainGraph(graph, model, torch.device("cpu"))
    rows = torch.arange(graph.num_nodes)
    x0, hl = train_forward(model, tg, rows)
    ref = model.forward_all(_x0(model, graph), torch.as_tensor(edge_index(graph)))
    assert torch.equal(x0, ref[0])
    assert torch.allclose(hl, ref[-1], atol=1e-5)
    # removing a step's positives == the forward over the graph without those edges
    inter = np.flatnonzero(graph.interaction_mask())[:25]
    u, p = torch.as_tensor(graph.src[inter]), torch.as_tensor(graph.dst[inter])
    _, hl_removed = train_forward(model, tg, rows, tg.removal(u, p, torch.ones(len(u))))
    keep = np.ones(graph.num_edges, dtype=bool)
    keep[inter] = False
    ref2 = model.forward_all(_x0(model, graph), torch.as_tensor(edge_index(graph.subgraph_edges(keep))))
    assert torch.allclose(hl_removed, ref2[-1], atol=1e-5)


def test_validation_split_is_temporal_and_removes_the_held_out_edges(graph):
    train_graph, tr, va, how = split_validation(graph, FAST)
    assert how.startswith("temporal")
    assert len(va) > 0 and tr.ts.max() < va.ts.min()
    held = set(zip(va.user.tolist(), va.item.tolist()))
    inter = train_graph.interaction_mask()
    assert not held & set(zip(train_graph.src[inter].tolist(), train_graph.dst[inter].tolist()))
    no_time = replace(graph, edge_ts=None)
    _, _, va2, how2 = split_validation(no_time, FAST)
    assert how2.startswith("random") and len(va2) == round(0.1 * (len(tr) + len(va)))


@pytest.fixture(scope="module")
def trained():
    """One training run shared by the tests below (with the alignment head)."""
    graph = planted_graph()
    return graph, train(graph, replace(FAST, align_weight=0.5, supervision="both"), CFG)


def test_training_beats_the_untrained_encoder_and_keeps_the_product_row(trained):
    _, res = trained
    assert res.best_val["recall@20"] > res.init_val["recall@20"]
    assert res.history and res.best_epoch >= 1 and res.peak_rss_bytes > 0
    assert any(s.startswith("random") for s in res.supervision) and any(s.startswith("window") for s in res.supervision)
    # the Product type row (h0 of products without text, kept in the worker's replica) is untouched
    init = GraphEncoder(replace(CFG, align=True))
    p = init.type_index("Product")
    assert torch.equal(res.model.type_embedding.weight[p], init.type_embedding.weight[p])
    u = init.type_index("User")
    assert not torch.equal(res.model.type_embedding.weight[u], init.type_embedding.weight[u])


def test_training_is_deterministic_with_a_seed(graph):
    short = replace(FAST, epochs=2, max_steps_per_epoch=3)
    a = train(graph, short, CFG)
    b = train(graph, short, CFG)
    assert a.model.version == b.model.version
    c = train(graph, replace(short, seed=1, epochs=1), replace(CFG, seed=1))
    assert c.model.version != a.model.version


def test_saved_checkpoint_reloads_to_identical_outputs(trained, tmp_path):
    graph, res = trained
    ckpt, metrics = save(res, tmp_path / "g.safetensors", {"note": "test"})
    loaded = GraphEncoder.load(ckpt)
    assert loaded.version == res.model.version and loaded.config == res.model.config and loaded.has_align
    x, ei = _x0(res.model, graph), torch.as_tensor(edge_index(graph))
    for a, b in zip(res.model.forward_all(x, ei), loaded.forward_all(_x0(loaded, graph), ei)):
        assert torch.equal(a, b)
    q = torch.nn.functional.normalize(torch.randn(3, CFG.in_dim), dim=1)
    assert torch.equal(res.model.align_text(q), loaded.align_text(q))
    doc = json.loads(metrics.read_text())
    assert doc["version"] == loaded.version and doc["note"] == "test" and doc["history"]


def test_alignment_pulls_text_and_structure_together(trained):
    graph, res = trained
    m = res.model
    prods = np.flatnonzero(graph.has_text)
    x, ei = _x0(m, graph), torch.as_tensor(edge_index(graph))
    s = torch.nn.functional.normalize(m.forward_all(x, ei)[-1][prods], dim=1)
    a = torch.nn.functional.normalize(m.align_text(graph.features[prods]), dim=1)
    sim = a @ s.t()
    # each product's aligned text is closer to its own structure vector than to the average one
    assert float(sim.diag().mean()) > float(sim.mean()) + 0.1


def test_seeded_configs_keep_their_version():
    cfg = GraphEncoderConfig()
    assert "align" not in json.loads(cfg.to_json())
    assert GraphEncoderConfig.from_json(cfg.to_json()) == cfg
    aligned = replace(cfg, align=True)
    assert GraphEncoderConfig.from_json(aligned.to_json()) == aligned
    assert GraphEncoder(aligned).version != GraphEncoder(cfg).version


def test_validate_ranks_without_training_items(graph):
    train_graph, tr, va, _ = split_validation(graph, FAST)
    model = GraphEncoder(CFG)
    tg = TrainGraph(train_graph, model, torch.device("cpu"))
    full = validate(model, tg, tr, va, FAST)
    assert 0 <= full["recall@20"] <= 1 and full["users"] > 0
    x0, hl = train_forward(model, tg, torch.arange(graph.num_nodes))
    assert fuse(x0, hl).shape[1] == CFG.in_dim + CFG.out
