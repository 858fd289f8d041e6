"""``streamer.embed.state``: building an engine from settings, saving and loading it."""

from __future__ import annotations

import pytest

from streamer.contracts import changes as C
from streamer.embed.state import build_engine, engine_options, graph_model
from streamer.settings import Settings


@pytest.fixture(autouse=True)
def _fresh_state_dir(tmp_path, monkeypatch):
    """Settings() here must not see ./.kgs: a model an earlier demo run promoted there is the
    active checkpoint, and these tests build models of other sizes."""
    monkeypatch.setenv("KGS_STATE_DIR", str(tmp_path / "default-state"))


def test_graph_model_from_settings(tmp_path):
    model = graph_model(Settings(gnn_layers=3, gnn_hidden=16, gnn_out=8, gnn_seed=7), in_dim=12)
    assert model.dims == [12, 16, 16, 8] and model.config.seed == 7
    path = tmp_path / "ckpt.safetensors"
    model.save(path)
    again = graph_model(Settings(graph_checkpoint=path), in_dim=12)
    assert again.version == model.version
    with pytest.raises(ValueError):
        graph_model(Settings(graph_checkpoint=path), in_dim=384)
    with pytest.raises(ValueError):
        graph_model(Settings(fusion="mean", gnn_out=8), in_dim=12)


def test_engine_options_from_settings():
    assert engine_options(Settings(_env_file=None)) == {
        "mode": "bounded",
        "reanchor_every": 256,
        "propagate_threshold": 0.0,
        "publish_threshold": 1e-4,
    }
    assert engine_options(Settings(_env_file=None, embed_mode="exact")) == {"mode": "exact", "reanchor_every": 256}
    opts = engine_options(Settings(embed_mode="bounded", embed_propagate_threshold=1e-3, embed_publish_threshold=2e-3))
    assert opts == {"mode": "bounded", "reanchor_every": 256, "propagate_threshold": 1e-3, "publish_threshold": 2e-3}
    engine = build_engine(Settings(gnn_hidden=8, gnn_out=8, device="cpu", embed_mode="bounded", embed_propagate_threshold=1e-3))
    assert engine.mode == "bounded" and engine.thresholds[1] == 1e-3


def test_build_engine_from_settings():
    engine = build_engine(Settings(gnn_hidden=8, gnn_out=8, device="cpu", fusion_text_weight=0.7))
    assert engine.dims == [384, 8, 8] and engine.device.type == "cpu"
    assert engine.fusion == "concat" and engine.out_dim == 392 and engine.featurize is None
    engine.apply([C.edge_upsert("User:1", "VIEWED", "Product:1", 1)])
    assert engine.verify()[1] == 0


def test_the_version_guard_is_saved_and_loaded_with_the_engine(tmp_path):
    from streamer.embed.state import load_engine, save_engine
    from streamer.embed.versions import VersionGuard

    engine = build_engine(Settings(gnn_hidden=8, gnn_out=8, device="cpu"))
    guard = VersionGuard()
    changes = [
        C.node_upsert("Product", "1", 1, {}, rev=3, gen=1),
        C.edge_upsert("Product:1", "ALSO_BOUGHT", "Product:2", 2, rev=2, src_gen=1, dst_gen=0),
    ]
    engine.apply(guard.admit(changes, engine.replica))
    save_engine(engine, tmp_path / "engine.pt", guard)
    again = VersionGuard()
    load_engine(tmp_path / "engine.pt", engine.model, "cpu", progress=False, versions=again)
    assert again.state_dict() == guard.state_dict() and again.gens == {"Product:1": 1}
    assert again.admit(changes, engine.replica) == [] and again.dropped == 2  # replays are stale
    save_engine(engine, tmp_path / "old.pt")  # a checkpoint from before versions: an empty guard
    load_engine(tmp_path / "old.pt", engine.model, "cpu", progress=False, versions=again)
    assert again.gens == {} and again.edges == {}


def test_the_active_checkpoint_is_the_workers_model_unless_one_is_set(tmp_path):
    """``kg-streamer demo`` trains and activates a checkpoint; a later worker on the same state
    dir runs it without KGS_GRAPH_CHECKPOINT; KGS_GRAPH_CHECKPOINT still wins; a pointer to a
    file that is gone falls back to the seeded init."""
    from encoders.graph import GraphEncoder, GraphEncoderConfig
    from streamer.embed.state import activate_checkpoint, active_checkpoint, graph_model
    from streamer.settings import Settings

    settings = Settings(_env_file=None, state_dir=tmp_path / "state", gnn_hidden=8, gnn_out=8)
    assert active_checkpoint(settings) is None
    untrained = graph_model(settings, in_dim=16)
    trained = GraphEncoder(GraphEncoderConfig(in_dim=16, hidden=8, out=8, layers=2, seed=99))
    path = tmp_path / "trained.safetensors"
    trained.save(path)
    activate_checkpoint(settings, path)
    assert active_checkpoint(settings) == path.resolve()
    assert graph_model(settings, in_dim=16).version == trained.version != untrained.version
    other = tmp_path / "other.safetensors"
    GraphEncoder(GraphEncoderConfig(in_dim=16, hidden=8, out=8, layers=2, seed=7)).save(other)
    assert graph_model(settings.model_copy(update={"graph_checkpoint": other}), in_dim=16).version != trained.version
    path.unlink()
    assert active_checkpoint(settings) is None
