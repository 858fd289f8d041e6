"""Graph encoder: seeded init and version, checkpoints, the dense half of a layer, fusion."""

from __future__ import annotations

import math

import pytest
import torch
from torch_geometric.utils import to_undirected

from encoders.graph import GraphEncoder, GraphEncoderConfig, fuse, fused_dim

CFG = GraphEncoderConfig(in_dim=12, hidden=8, out=6, layers=2, seed=3)


def graph(n: int = 30, m: int = 80, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 12, generator=g)
    ei = to_undirected(torch.randint(0, n, (2, m), generator=g), num_nodes=n)
    return x, ei


def test_seeded_init_is_deterministic_and_leaves_the_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    a = GraphEncoder(CFG)
    after = torch.rand(3)
    assert torch.equal(expected, after)
    b = GraphEncoder(CFG)
    assert a.version == b.version and len(a.version) == 12
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)
    assert GraphEncoder(GraphEncoderConfig(**{**CFG.__dict__, "seed": 4})).version != a.version
    assert GraphEncoder(GraphEncoderConfig(**{**CFG.__dict__, "hidden": 9})).version != a.version


def test_checkpoint_round_trip(tmp_path):
    model = GraphEncoder(CFG)
    with torch.no_grad():
        model.convs[0].lin_l.weight.add_(1.0)  # "trained"
    path = tmp_path / "gnn.safetensors"
    model.save(path)
    loaded = GraphEncoder.load(path)
    assert loaded.config == model.config and loaded.version == model.version
    x, ei = graph()
    assert torch.equal(loaded(x, ei), model(x, ei))


def test_dense_half_equals_sageconv_after_mean_aggregation():
    model = GraphEncoder(CFG)
    x, ei = graph()
    hs = model.forward_all(x, ei)
    assert [h.shape[1] for h in hs] == [12, 8, 6]
    assert (hs[1] >= 0).all()  # ReLU between layers
    assert (hs[2] < 0).any()  # none after the last
    n = x.shape[0]
    for layer in range(2):
        s = torch.zeros(n, hs[layer].shape[1]).index_add_(0, ei[1], hs[layer][ei[0]])
        deg = torch.bincount(ei[1], minlength=n).clamp(min=1).unsqueeze(1)
        with torch.no_grad():
            out = model.dense(layer, s / deg, hs[layer])
        assert torch.allclose(out, hs[layer + 1], atol=1e-6)


def test_sum_aggregation_is_supported_and_others_are_refused():
    model = GraphEncoder(GraphEncoderConfig(in_dim=12, hidden=8, out=6, aggr="sum"))
    x, ei = graph()
    s = torch.zeros(30, 12).index_add_(0, ei[1], x[ei[0]])
    with torch.no_grad():
        assert torch.allclose(model.dense(0, s, x), model.forward_all(x, ei)[1], atol=1e-5)
    with pytest.raises(ValueError):
        GraphEncoder(GraphEncoderConfig(aggr="max"))  # type: ignore[arg-type]


def test_type_features():
    model = GraphEncoder(CFG)
    f = model.type_features(["Product", "User", "Category", "Martian", "Venusian"])
    assert f.shape == (5, 12)
    assert torch.allclose(f.norm(dim=1), torch.ones(5), atol=1e-6)
    assert not torch.equal(f[0], f[1]) and torch.equal(f[3], f[4])  # unknown labels share a row


def test_fusion_concat_and_mean():
    g = torch.Generator().manual_seed(0)
    t, s = torch.randn(5, 12, generator=g), torch.randn(5, 6, generator=g)
    w = 0.3
    v = fuse(t, s, "concat", w)
    assert v.shape == (5, 18) and torch.allclose(v.norm(dim=1), torch.ones(5), atol=1e-6)
    cos = lambda a, b: torch.nn.functional.cosine_similarity(a, b, dim=0)
    assert math.isclose(float(v[0] @ v[1]), w * float(cos(t[0], t[1])) + (1 - w) * float(cos(s[0], s[1])), abs_tol=1e-6)
    s12 = torch.randn(5, 12, generator=g)
    m = fuse(t, s12, "mean", 1.0)
    assert torch.allclose(m, torch.nn.functional.normalize(t, dim=1), atol=1e-6)
    assert fused_dim("concat", 12, 6) == 18 and fused_dim("mean", 12, 12) == 12
    with pytest.raises(ValueError):
        fuse(t, s, "mean")
    with pytest.raises(ValueError):
        fuse(t, s, "concat", 1.5)
