"""``kg-streamer demo``: the main job end to end on the embedded services and real data.

1. start the embedded broker and graph DB in the state dir (``services up``; reused if up)
   and create the topics;
2. produce the committed real sample (UCI Online Retail, December 2010; Amazon 2018 Magazine
   subset) into the input topics;
3. run the ingest consumer until its lag is 0;
4. train the graph encoder on the sample in the graph DB (``kg-streamer train --source graph``'s
   code path, bounded by ``DEMO_TRAIN``: about a minute of CPU on the sample; the product text
   it encodes is cached for the worker), so the published vectors come from a trained model,
   not the seeded init that docs/quality.md calls useless for recommending;
5. make that checkpoint the state dir's active model (``activate_checkpoint``) and run the
   embedding worker with it until its lag is 0
   (incremental GNN embeddings of every node, published to kg.embeddings);
6. audit the worker's state against a full recompute;
7. print a short summary, then recommendations for one user with purchases (the one with the
   most purchased products) and the products most similar to the most-bought product, with
   their titles; write the full report as JSON to ``<state_dir>/demo-summary.json``, whose path
   it prints.

Training is deterministic on CPU, so a second run trains the same checkpoint (same version) and
the worker carries on without re-embedding. A later plain ``kg-streamer embed`` with the same
state dir keeps this model (``<state_dir>/model/active.json``; ``KGS_GRAPH_CHECKPOINT``
overrides it).

It prints its steps with progress bars; logs are at WARNING unless ``--verbose``. The
services stay up afterwards (``kg-streamer services down`` stops them), so the graph can be
inspected over Bolt and the command can be run again: the second run replays the same
events, which the version guards turn into no-ops.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import time
from collections import Counter
from pathlib import Path
from typing import Any

from streamer.settings import Settings

STEPS = 7
# The demo's training run on the sample (TrainConfig's batch of 4,096 pairs and 1,024 negatives):
# ~2 s per epoch on a quiet 2-core CPU with one torch thread, validation recall@20 best around
# epoch 4 (early stopping after 3 epochs without a better one keeps the best); 8 epochs at most
# keep it well inside issue 14's 2 minutes of CPU even on a contended machine.
DEMO_TRAIN: dict[str, Any] = {"epochs": 8, "patience": 3}
# one torch thread while training unless KGS_TORCH_THREADS says otherwise (docs/quality.md: two
# threads were 3-5 times slower on contended cores)
DEMO_TRAIN_THREADS = 1
TOP_K = 5


def _step(n: int, text: str) -> None:
    print(f"[{n}/{STEPS}] {text}", flush=True)


def pick_examples(index: Any) -> tuple[str | None, str | None]:
    """(the user with the most purchased products, the product the most users purchased), from
    the worker's replica; None where the graph has no purchases."""
    rep = index.replica
    if rep is None or "PURCHASED" not in rep.rels:
        return None, None
    code = 2 * rep.rels.index("PURCHASED")  # the half of each PURCHASED edge in the user's block
    per_user: dict[str, int] = {}
    buyers: Counter[str] = Counter()
    for slot in rep.live_slots():
        key = rep.keys[int(slot)]
        if not key or not key.startswith("User:"):
            continue
        s, n = int(rep.start[slot]), int(rep.length[slot])
        bought = {rep.keys[int(w)] for w, c in zip(rep.nbr[s : s + n], rep.code[s : s + n]) if c == code}
        bought = {k for k in bought if k in index.index}
        if bought:
            per_user[key] = len(bought)
            buyers.update(bought)
    if not per_user:
        return None, None
    user = min(per_user, key=lambda k: (-per_user[k], k))
    product = min(buyers, key=lambda k: (-buyers[k], k))
    return user, product


def print_examples(settings: Settings, k: int = TOP_K) -> dict[str, Any]:
    """Print recommendations for one user and products similar to one product, with titles."""
    from training.candidates import VectorIndex, serving_blend, titles, with_titles
    from training.commands import candidate_table, clean_title, ranking_text

    index = VectorIndex.load(settings, "checkpoint")
    user, product = pick_examples(index)
    out: dict[str, Any] = {}
    if user is None or product is None:
        print("  (no purchases in the graph: no recommendations to show)")
        return out
    blend = serving_blend(settings, index)
    recs, excluded = index.recommend(user, k, blend=blend)
    recs = with_titles(settings, recs)
    bought = titles(settings, sorted(index.interacted(user)))
    sample = "; ".join(clean_title(t, 34) for t in list(bought.values())[:3])
    print(f"  recommendations for {user} (bought {excluded} products, e.g. {sample}),")
    print(f"  ranked by {ranking_text(blend)}:")
    print("\n".join(candidate_table(recs, title_width=56, indent="  ")))
    sims = with_titles(settings, index.similar(product, k))
    name = titles(settings, [product]).get(product, "")
    print(f'  similar to the most-bought product {product} "{clean_title(name, 48)}":')
    print("\n".join(candidate_table(sims, title_width=56, indent="  ")))
    out["recommend"] = {
        "user": user,
        "excluded": excluded,
        "ranking": blend.to_dict() if blend is not None else "cosine",
        "results": [c.as_dict() for c in recs],
    }
    out["similar"] = {"node": product, "title": name, "results": [c.as_dict() for c in sims]}
    return out


def train_model(settings: Settings, verbose: bool) -> Any:
    """The demo's training run (``DEMO_TRAIN``) on the graph DB; the text it encodes is saved to
    the worker's text cache so that the worker does not encode it again."""
    import torch

    from encoders.text import TextEncoder
    from streamer.embed.state import checkpoint_dir
    from training.commands import train_checkpoint
    from training.train import TrainConfig

    cfg = TrainConfig(
        **DEMO_TRAIN,
        seed=settings.gnn_seed,
        fusion=settings.fusion,
        fusion_text_weight=settings.fusion_text_weight,
        device=settings.device,
        progress=True,
    )
    text = TextEncoder(settings.text_model, device=settings.device)
    threads = torch.get_num_threads()
    if settings.torch_threads <= 0:
        settings = settings.model_copy(update={"torch_threads": DEMO_TRAIN_THREADS})
    try:
        # progress bars (stderr) always; the per-epoch lines training prints only with --verbose
        with contextlib.nullcontext() if verbose else contextlib.redirect_stdout(io.StringIO()):
            trained = train_checkpoint(settings, cfg, source="graph", text=text)
    finally:
        torch.set_num_threads(threads)  # the worker runs with its own setting
    if len(text):  # (saving an empty cache fails)
        text.save_cache(checkpoint_dir(settings) / "text_cache.safetensors")
    return trained


def run_demo(settings: Settings, sample_dir: Path, limit: int | None = None, verbose: bool = False) -> int:
    from devtools.datasets import produce
    from devtools.local_services import LocalServices
    from sinks.graph_db import GraphSink
    from streamer.embed.state import activate_checkpoint
    from streamer.embed.worker import embed_consumer
    from streamer.ingest.step import ingest_consumer
    from streamer.kafka.topics import ensure_topics

    if not verbose:
        for name in ("streamer", "sinks", "encoders", "devtools", "training"):
            logging.getLogger(name).setLevel(logging.WARNING)
    t0 = time.monotonic()
    _step(1, f"starting the embedded services in {settings.state_dir} ({settings.local_broker} + ArcadeDB)")
    LocalServices(settings).up()
    ensure_topics(settings)

    _step(2, "producing the committed real sample into the input topics")
    loaded = {
        "online_retail": produce.load_online_retail(sample_dir / "online_retail_sample.csv.gz", settings, limit=limit),
        "amazon_magazine": produce.load_amazon(sample_dir / "amazon_magazine", settings, limit=limit),
    }

    _step(3, "ingesting until caught up (validate, one graph transaction per batch, changelog)")
    ingest = ingest_consumer(settings)
    ingest.install_signal_handlers()
    stats = ingest.run(until_caught_up=True)

    _step(4, "training the graph model on the sample in the graph DB (link prediction, early stopping)")
    t_train = time.monotonic()
    trained = train_model(settings, verbose)
    train_s = time.monotonic() - t_train
    settings = settings.model_copy(update={"graph_checkpoint": trained.checkpoint})
    activate_checkpoint(settings, trained.checkpoint)  # a later plain `kg-streamer embed` keeps it

    _step(5, "embedding with the trained model until caught up (text, then only the k-hop neighbourhoods that changed)")
    worker = embed_consumer(settings)
    worker.install_signal_handlers()
    embed_stats = worker.run(until_caught_up=True)

    _step(6, "auditing the incremental state against a full recompute")
    max_err, rows_over = worker.step.engine.verify()

    graph = GraphSink(settings)
    nodes, relationships = graph.counts()
    graph.close()
    res = trained.result
    val_key = next((k for k in res.best_val if k.startswith("recall@")), "")
    report: dict[str, Any] = {
        "loaded": {name: s.summary() for name, s in loaded.items()},
        "ingest": stats.summary(),
        "train": {
            "checkpoint": str(trained.checkpoint),
            "metrics": str(trained.metrics),
            "published_model_version": trained.published_model_version,
            "epochs": len(res.history),
            "best_epoch": res.best_epoch,
            "best_val": res.best_val,
            "init_val": res.init_val,
            "popularity_val": res.popularity_val,
            "seconds": round(train_s, 1),
            "config": DEMO_TRAIN,
        },
        "graph_totals": {"nodes": nodes, "relationships": relationships},
        "embed": embed_stats.summary(),
        "verify": {"max_abs_err": max_err, "rows_over_1e-5": rows_over, "ok": rows_over == 0},
        "bolt": settings.bolt_uri,
        "bootstrap_servers": settings.bootstrap_servers,
    }
    out = settings.state_dir / "demo-summary.json"
    _step(7, "summary")
    ing, emb = report["ingest"], report["embed"]

    def val(d: dict[str, float]) -> str:
        return f"{d[val_key]:.3f}" if val_key in d else "-"

    print(
        "\n".join(
            [
                f"  events in            {ing['events_in']:,} ({ing['events_per_s']:,} events/s), "
                f"{ing['dead_letters']:,} to the dead-letter topic",
                f"  written              {ing['nodes_written']:,} products, {ing['relationships_written']:,} relationship rows",
                f"  graph now            {nodes:,} nodes, {relationships:,} relationships",
                f"  model                trained in {train_s:.0f} s: validation {val_key or 'recall'} {val(res.best_val)} "
                f"(untrained {val(res.init_val)}, popularity {val(res.popularity_val)})",
                f"  vectors published    {emb['vectors_published']:,} ({emb['rows_recomputed']:,} rows recomputed), "
                f"model {trained.published_model_version}",
                f"  freshness            p50 {emb['freshness_p50_s']} s, p99 {emb['freshness_p99_s']} s "
                "(a backfill: from when each input entered Kafka)",
                f"  verify               {'OK' if rows_over == 0 else 'FAILED'} (max abs err {max_err:.1e} "
                "against a full recompute)",
            ]
        ),
        flush=True,
    )
    report["examples"] = print_examples(settings)
    report["seconds_total"] = round(time.monotonic() - t0, 1)
    out.write_text(json.dumps(report, indent=2, default=str))
    print(
        "\n".join(
            [
                f"  took                 {report['seconds_total']} s; Bolt {settings.bolt_uri}, "
                f"Kafka {settings.bootstrap_servers}",
                f"  model                {trained.checkpoint} (active: `kg-streamer embed` keeps it)",
                f"  full report          {out}",
            ]
        ),
        flush=True,
    )
    return 0 if rows_over == 0 else 1
