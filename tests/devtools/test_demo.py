"""``kg-streamer demo`` on the real embedded broker and graph DB (the session's services: starting
them is stubbed out) with the first events of the committed sample: it trains a model, the
worker publishes that model's vectors, and it ends with recommendations for a user and similar
products, with titles, in at most 40 lines."""

from __future__ import annotations

import json
from pathlib import Path

from devtools import demo
from devtools.local_services import LocalServices
from streamer.embed.verify import last_vectors
from tests.helpers import query

SAMPLE_DIR = Path(__file__).resolve().parents[2] / "data" / "sample"


def test_demo_trains_embeds_with_the_trained_model_and_prints_titles(settings, monkeypatch, capsys):
    monkeypatch.setattr(LocalServices, "up", lambda self, *a, **k: None)  # the session's services are up
    settings = settings.model_copy(update={"device": "cpu"})
    assert demo.run_demo(settings, SAMPLE_DIR, limit=1500, verbose=True) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert len(lines) <= 40, out
    assert "[4/7] training" in out and "[7/7] summary" in out and "verify               OK" in out

    report = json.loads((settings.state_dir / "demo-summary.json").read_text())
    ckpt = Path(report["train"]["checkpoint"])
    assert ckpt.exists() and report["train"]["epochs"] <= demo.DEMO_TRAIN["epochs"]
    # the worker ran with the trained checkpoint: every published vector carries its version
    published = report["train"]["published_model_version"]
    live = {k: r for k, r in last_vectors(settings).items() if r.vector is not None}
    assert live and {r.model_version for r in live.values()} == {published}
    offsets = json.loads((settings.state_dir / "embed" / "offsets.json").read_text())
    assert offsets["model_version"] == published
    # ... and it is the state dir's active model: a later plain `kg-streamer embed` keeps it
    from streamer.embed.state import active_checkpoint

    assert f"{ckpt} (active" in out
    assert active_checkpoint(settings.model_copy(update={"graph_checkpoint": None})) == ckpt.resolve()

    # recommendations for a user who bought, and similar products, both with titles from the graph
    ex = report["examples"]
    user, product = ex["recommend"]["user"], ex["similar"]["node"]
    assert user.startswith("User:") and ex["recommend"]["excluded"] > 0
    assert product.startswith("Product:")
    graph_titles = {
        f"Product:{r['id']}": r["title"]
        for r in query(settings, "MATCH (p:Product) WHERE coalesce(p.deleted, false) = false RETURN p.id AS id, p.title AS title")
    }
    for part in ("recommend", "similar"):
        results = ex[part]["results"]
        assert len(results) == demo.TOP_K
        for r in results:
            assert r["title"] == graph_titles[r["key"]]  # None: a product only seen in interactions
            shown = " ".join(r["title"].split())[:20] if r["title"] else "(no title)"
            assert shown in out  # the printed table shows it
    assert any(r["title"] for part in ("recommend", "similar") for r in ex[part]["results"])
    assert f"recommendations for {user}" in out and f"similar to the most-bought product {product}" in out
    # ranked as docs/quality.md's default method: the trained model's blend (training/blend.py)
    metrics = json.loads(ckpt.with_name(ckpt.name.removesuffix(".safetensors") + ".metrics.json").read_text())
    assert ex["recommend"]["ranking"] == metrics["blend"]
    from training.blend import Blend
    from training.commands import ranking_text

    assert f"ranked by {ranking_text(Blend.from_dict(metrics['blend']))}" in out
