"""Model lifecycle on the real embedded broker and graph DB: the worker embeds with the seeded
model, ``train`` learns from its replica (and from the graph DB), and starting the worker with
the new checkpoint re-embeds everything under the new version, equal to a clean run with that
model; ``verify`` passes; candidates leave bought products out; vectors go back to the graph."""

from __future__ import annotations

import json
import uuid

import numpy as np
import pytest

from streamer.cli import build_parser
from streamer.embed.verify import last_vectors, verify
from streamer.embed.worker import embed_consumer
from streamer.ingest.step import ingest_consumer
from streamer.kafka.topics import ensure_topics
from tests.helpers import produce_events, query, sample_events
from training.candidates import VectorIndex, write_back
from training.dataset import INTERACTION_RELS


def _run_cli(argv: list[str], settings) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args, settings)


def test_new_model_version_triggers_a_full_reembed_and_verify_passes(settings, tmp_path, capsys):
    prefix = f"m{uuid.uuid4().hex[:6]}-"
    settings = settings.model_copy(update={"torch_threads": 1, "device": "cpu"})
    produce_events(settings, sample_events(prefix, products=40, users=12))
    ingest_consumer(settings).run(until_caught_up=True, max_seconds=120)
    embed_consumer(settings).run(until_caught_up=True, max_seconds=180)
    before = last_vectors(settings)
    old_versions = {r.model_version for r in before.values()}
    assert len(old_versions) == 1

    # train on the worker's checkpointed replica (CLI), with the alignment head
    ckpt = tmp_path / "trained.safetensors"
    assert (
        _run_cli(
            [
                "train",
                "--source",
                "replica",
                "--out",
                str(ckpt),
                "--epochs",
                "3",
                "--batch-size",
                "32",
                "--negatives",
                "16",
                "--align",
                "0.2",
                "--no-progress",
                "--device",
                "cpu",
            ],
            settings,
        )
        == 0
    )
    out = capsys.readouterr().out
    assert ckpt.exists() and ckpt.with_name("trained.metrics.json").exists() and '"version"' in out

    # restart the worker with the new model: full re-embed under the new version
    new = settings.model_copy(update={"graph_checkpoint": ckpt})
    stats = embed_consumer(new).run(until_caught_up=True, max_seconds=180)
    assert stats.full_reembed
    after = last_vectors(new)
    live = {k: r for k, r in after.items() if r.vector is not None}
    new_versions = {r.model_version for r in live.values()}
    assert len(new_versions) == 1 and new_versions.isdisjoint(old_versions)
    assert set(live) == {k for k, r in before.items() if r.vector is not None}
    assert stats.vectors_published >= len(live)
    report = verify(new, against_topic=True)
    assert report["ok"], report

    # ... and equal to a clean worker that embeds the changelog from scratch with that model
    clean = new.model_copy(
        update={
            "state_dir": tmp_path / "clean",
            "embed_group": new.embed_group + "-clean",
            "topic_embeddings": new.topic_embeddings + "-clean",
        }
    )
    ensure_topics(clean)
    embed_consumer(clean).run(until_caught_up=True, max_seconds=180)
    want = last_vectors(clean)
    for key, rec in live.items():
        assert want[key].model_version == rec.model_version
        np.testing.assert_allclose(rec.vector, want[key].vector, atol=1e-5, err_msg=key)

    # candidates from the checkpoint and from the topic: bought products are left out
    # a user who bought: with 12 users and actions cycling view/purchase/rate, U0, U3, U6 and
    # U9 only view (picking the first user the topic returned failed whenever it was one of them)
    user = f"User:{prefix}U1"
    assert user in live
    for source in ("checkpoint", "topic"):
        index = VectorIndex.load(new, source)
        bought = index.interacted(user)
        assert bought, user
        recs, excluded = index.recommend(user, k=50)
        assert excluded == len(bought) and recs
        assert not {c.key for c in recs} & bought
        assert all(c.key.startswith("Product:") for c in recs)
        assert [c.score for c in recs] == sorted((c.score for c in recs), reverse=True)
        product = next(iter(bought))
        assert product not in {c.key for c in index.similar(product, k=10)}
    hits, aligned = VectorIndex.load(new).search("Product 3", k=5)
    assert aligned and len(hits) == 5
    capsys.readouterr()
    assert _run_cli(["recommend", "--user", user.partition(":")[2], "--k", "20", "--json"], new) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["model_versions"] == {next(iter(new_versions)): len(live)}
    assert doc["excluded"] == len(bought) and not {r["key"] for r in doc["results"]} & bought
    assert _run_cli(["search", "--text", "Product 3 description", "--k", "3", "--source", "topic", "--json"], new) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["aligned"] and len(doc["results"]) == 3

    # write-back: the vectors as a node property of the graph
    written = write_back(VectorIndex.load(new), new, ["Product"])
    products = [k for k in live if k.startswith("Product:")]
    assert written["Product"] == len(products)
    row = query(
        new, "MATCH (p:Product {id: $id}) RETURN p.embedding AS e, p.embedding_version AS v", id=products[0].partition(":")[2]
    )[0]
    assert row["v"] == next(iter(new_versions))
    np.testing.assert_allclose(np.asarray(row["e"], dtype=np.float32), live[products[0]].vector, atol=1e-6)

    # recommend ranks with the checkpoint's blend (training/blend.py), checked against an
    # independent computation from the topic's vectors and the graph's interactions; a new
    # product nobody has bought gets the text prior
    metrics_path = ckpt.with_name("trained.metrics.json")
    meta = json.loads(metrics_path.read_text())
    assert {"beta", "gamma", "window_days"} <= set(meta["blend"])
    meta["blend"].update(window_days=None, beta=0.5, gamma=1.0, dot_scale=0.5, text_scale=0.25, text_mean=0.1, cold_offset=-0.5)
    metrics_path.write_text(json.dumps(meta))
    fresh = {
        "type": "product",
        "id": f"{prefix}NEW",
        "title": "Product 3 new edition",
        "brand": f"{prefix}Brand0",
        "ts": 1_300_009_000,
    }
    produce_events(new, [fresh])
    ingest_consumer(new).run(until_caught_up=True, max_seconds=120)
    embed_consumer(new).run(until_caught_up=True, max_seconds=180)
    vecs = {k: r.vector for k, r in last_vectors(new).items() if r.vector is not None}
    rels = list(INTERACTION_RELS)
    buyers = {
        f"Product:{r['id']}": r["n"]
        for r in query(
            new, "MATCH (u:User)-[r]->(p:Product) WHERE type(r) IN $rels RETURN p.id AS id, count(DISTINCT u) AS n", rels=rels
        )
    }
    mine = [
        f"Product:{r['id']}"
        for r in query(
            new,
            "MATCH (:User {id: $id})-[r]->(p:Product) WHERE type(r) IN $rels "
            "AND coalesce(p.deleted, false) = false RETURN DISTINCT p.id AS id",
            id=user.partition(":")[2],
            rels=rels,
        )
    ]

    def text(v):
        t = np.asarray(v[: len(v) - new.gnn_out], dtype=np.float64)
        return t / np.linalg.norm(t)

    profile = np.mean([text(vecs[p]) for p in mine], axis=0)
    profile /= np.linalg.norm(profile)
    capsys.readouterr()
    assert _run_cli(["recommend", "--user", user.partition(":")[2], "--k", "500", "--json"], new) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["ranking"]["beta"] == 0.5 and doc["ranking"]["gamma"] == 1.0
    assert f"Product:{prefix}NEW" in {r["key"] for r in doc["results"]}
    for r in doc["results"]:
        v, n = vecs[r["key"]], buyers.get(r["key"], 0)
        want = (
            float(np.dot(vecs[user], v)) / 0.5
            + 0.5 * np.log1p(n)
            + ((float(text(v) @ profile) - 0.1) / 0.25 - 0.5 if n == 0 else 0.0)
        )
        assert r["score"] == pytest.approx(want, abs=1e-4), r["key"]
    assert _run_cli(["recommend", "--user", user.partition(":")[2], "--k", "5", "--plain", "--json"], new) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["ranking"] == "cosine"
    for r in doc["results"]:
        assert r["score"] == pytest.approx(float(np.dot(vecs[user], vecs[r["key"]])), abs=1e-4)


def test_train_from_a_graph_db_snapshot(settings, tmp_path, capsys):
    prefix = f"g{uuid.uuid4().hex[:6]}-"
    settings = settings.model_copy(update={"torch_threads": 1, "device": "cpu"})
    produce_events(settings, sample_events(prefix, products=25, users=8))
    ingest_consumer(settings).run(until_caught_up=True, max_seconds=120)
    from training.dataset import from_graph_db

    data = from_graph_db(settings, None)
    summary = data.summary()
    n_products = query(settings, "MATCH (p:Product) WHERE coalesce(p.deleted, false) = false RETURN count(p) AS n")[0]["n"]
    assert summary["nodes_by_label"]["Product"] == n_products
    assert summary["interaction_edges"] > 0
    inter = data.interaction_mask()
    assert (data.edge_ts[inter] > 0).all()  # interactions carry first_ts
    assert "ALSO_BOUGHT" in summary["edges_by_rel"] and "PARENT" in summary["edges_by_rel"]
    ckpt = tmp_path / "g.safetensors"
    assert (
        _run_cli(
            [
                "train",
                "--source",
                "graph",
                "--out",
                str(ckpt),
                "--epochs",
                "2",
                "--batch-size",
                "16",
                "--negatives",
                "8",
                "--no-progress",
                "--device",
                "cpu",
            ],
            settings,
        )
        == 0
    )
    capsys.readouterr()
    metrics = json.loads(ckpt.with_name("g.metrics.json").read_text())
    assert metrics["validation"].startswith("temporal") and metrics["source"] == "graph"
