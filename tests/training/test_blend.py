"""The default ranking policy (``training.blend``): what each term may change, that the plain
blend is the model's own ranking, that the weights come from validation only, and that a
checkpoint carries its blend to ``recommend``."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tests.training.test_protocol import CFG, FakeText, T
from tests.training.test_protocol import log_ as log_
from training import evaluate
from training.blend import Blend, fit_blend, load_blend, text_part
from training.evaluate import evaluate_dataset
from training.train import TrainConfig


def test_text_prior_moves_only_products_without_interactions():
    g = torch.Generator().manual_seed(0)
    dot, text = torch.randn(3, 6, generator=g), torch.randn(3, 6, generator=g)
    recent = torch.zeros(6)
    cold = torch.tensor([True, False, True, False, False, False])
    plain = Blend().score(dot, text, recent, cold)
    prior = Blend(gamma=2.0).score(dot, text, recent, cold)
    assert torch.equal(plain[:, ~cold], prior[:, ~cold])
    assert torch.allclose(prior[:, cold], plain[:, cold] + 2.0 * text[:, cold])
    shifted = Blend(gamma=2.0, text_mean=0.3, text_scale=0.5, cold_offset=-1.0).score(dot, text, recent, cold)
    assert torch.equal(plain[:, ~cold], shifted[:, ~cold])
    assert torch.allclose(shifted[:, cold], plain[:, cold] + 2.0 * (text[:, cold] - 0.3) / 0.5 - 1.0)


def test_recent_popularity_orders_products_the_model_cannot_tell_apart():
    dot = torch.zeros(2, 4)
    recent = torch.tensor([0.0, 5.0, 1.0, 50.0])
    s = Blend(beta=0.5).score(dot, None, recent, torch.zeros(4, dtype=torch.bool))
    assert s[0].argsort(descending=True).tolist() == [3, 1, 2, 0]
    assert Blend().plain and not Blend(beta=0.1).plain


def test_text_part_is_the_unit_text_embedding_of_concat_vectors():
    from encoders.graph import fuse

    t, s = torch.randn(5, 16), torch.randn(5, 8)
    v = fuse(t, s, "concat", 0.3)
    assert torch.allclose(text_part(v, 8, "concat"), torch.nn.functional.normalize(t, dim=1), atol=1e-6)
    assert text_part(fuse(t, torch.randn(5, 16), "mean", 0.3), 16, "mean") is None


def test_plain_blend_ranks_exactly_as_the_trained_model(log_, monkeypatch):
    monkeypatch.setattr(evaluate, "fit_blend", lambda *a, **k: Blend())
    cfg = TrainConfig(epochs=1, batch_size=8, negatives=2, progress=False, device="cpu", val_fraction=0.0)
    rep = evaluate_dataset("tiny", log_, FakeText(), [cfg], CFG, split_quantile=0.4, bootstrap=50)
    blend, trained = rep["results"]["fused_blend"], rep["results"]["fused_trained"]
    for part in ("overall", "cold_start"):
        for metric in ("recall@20", "ndcg@20"):
            assert blend[part][metric] == trained[part][metric]
            assert blend[part]["users"] == trained[part]["users"]


def test_fit_blend_sees_the_validation_split_only(log_, monkeypatch):
    """fit_blend scores the training graph without the held-out edges and takes its targets
    from the held-out pairs: the test period is never handed to it."""
    from training import train as train_mod

    seen = {}
    real = train_mod.split_validation

    def spy(graph, cfg):
        out = real(graph, cfg)
        seen["graph_edges"], seen["val_pairs"] = graph.num_edges, len(out[2])
        seen["max_ts"] = int(graph.edge_ts.max())
        return out

    monkeypatch.setattr(train_mod, "split_validation", spy)
    cfg = TrainConfig(epochs=1, batch_size=8, negatives=2, progress=False, device="cpu", val_fraction=0.3)
    rep = evaluate_dataset("tiny", log_, FakeText(), [cfg], CFG, split_quantile=0.4, bootstrap=50)
    t_split = int(np.quantile(log_.interaction_times(), 0.4, method="lower"))
    assert seen["val_pairs"] > 0 and seen["max_ts"] < t_split
    chosen = rep["training"]["fused_blend"]
    assert chosen["validation"]["users"] >= 1
    assert chosen["beta"] >= 0 and chosen["gamma"] >= 0


def test_a_checkpoints_blend_is_loaded_from_its_metrics(tmp_path):
    ckpt = tmp_path / "graph-abc.safetensors"
    ckpt.write_bytes(b"")
    assert load_blend(ckpt) is None
    b = Blend(window_days=14, beta=0.2, gamma=1.0, dot_scale=0.1, text_scale=0.2, validation={"users": 3})
    (tmp_path / "graph-abc.metrics.json").write_text(json.dumps({"version": "abc", "blend": b.to_dict()}))
    assert load_blend(ckpt) == b
    assert load_blend(None) is None


@pytest.mark.parametrize("fusion", ["concat"])
def test_fit_blend_returns_the_plain_model_without_validation_targets(log_, fusion):
    from encoders.graph import GraphEncoder
    from training.evaluate import catalogue_at

    cat = catalogue_at(log_, FakeText(), T, dim=CFG.in_dim)
    cfg = TrainConfig(epochs=1, progress=False, device="cpu", val_fraction=0.0, fusion=fusion)
    assert fit_blend(GraphEncoder(CFG), cat.graph, cfg).plain


def test_the_fusion_comparison_reports_the_other_fusion_plain_and_blended(log_):
    cfg = TrainConfig(epochs=1, batch_size=8, negatives=2, progress=False, device="cpu", val_fraction=0.3)
    rep = evaluate_dataset("tiny", log_, FakeText(), [cfg], CFG, split_quantile=0.4, bootstrap=50, compare_fusion=True)
    assert {"fused_trained_mean", "fused_blend_mean"} <= set(rep["results"])
    assert rep["training"]["fused_trained_mean"]["train_config"]["fusion"] == "mean"
    assert rep["training"]["fused_blend_mean"]["gamma"] == 0.0  # mean fusion has no text part to give back
    assert "ci95_vs_default" in rep["results"]["fused_blend_mean"]["overall"]
