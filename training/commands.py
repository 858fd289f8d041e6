"""Sub-commands of the model lifecycle , registered into ``kg-streamer``::

    kg-streamer train [--source replica|graph] [--out FILE] [--align 0.1] ...
    kg-streamer evaluate [--datasets online_retail,amazon_magazine] [--report FILE] [--quality-json FILE]
    kg-streamer similar --node Product:X [--k 20] [--source auto|checkpoint|topic] [--json]
    kg-streamer recommend --user U [--k 20] [--source ...] [--json]
    kg-streamer search --text "..." [--k 20] [--source ...] [--json]
    kg-streamer write-vectors [--labels Product,User] [--source ...]

``train`` prints the checkpoint path and its version; start the worker with
``KGS_GRAPH_CHECKPOINT=<path>`` to re-embed everything with it. ``similar``, ``recommend`` and
``search`` print a ``rank id score title`` table (titles read from the graph DB over Bolt), or
with ``--json`` the query, source, model versions and every candidate (key, id, title, score).
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def _train_config(args: argparse.Namespace, settings: Any):
    from training.train import TrainConfig

    return TrainConfig(
        epochs=args.epochs,
        batch_size=args.batch_size,
        negatives=args.negatives,
        lr=args.lr,
        temperature=args.temperature,
        loss=args.loss,
        patience=args.patience,
        val_fraction=args.val_fraction,
        align_weight=args.align,
        supervision=args.supervision,
        seed=settings.gnn_seed if args.seed is None else args.seed,
        max_steps_per_epoch=args.max_steps_per_epoch,
        fusion=settings.fusion,
        fusion_text_weight=settings.fusion_text_weight,
        device=args.device or settings.device,
        progress=not args.no_progress,
    )


def _add_train_options(p: argparse.ArgumentParser) -> None:
    from training.train import TrainConfig

    d = TrainConfig()
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="positive pairs per step")
    p.add_argument("--negatives", type=int, default=d.negatives, help="uniformly sampled negative products per step")
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--temperature", type=float, default=d.temperature)
    p.add_argument("--loss", choices=["softmax", "bpr"], default=d.loss)
    p.add_argument("--patience", type=int, default=d.patience, help="epochs without a better validation recall@20")
    p.add_argument("--val-fraction", type=float, default=d.val_fraction)
    p.add_argument(
        "--supervision",
        choices=["auto", "temporal", "random", "both"],
        default=d.supervision,
        help="temporal windows (predict the next products from the past), random hold-out, or both; "
        "auto: temporal, plus random when few users come back (docs/quality.md)",
    )
    p.add_argument("--align", type=float, default=0.0, help="weight of the text-graph alignment loss (0: no head)")
    p.add_argument("--seed", type=int, default=None, help="default: KGS_GNN_SEED")
    p.add_argument("--max-steps-per-epoch", type=int, default=None)
    p.add_argument("--device", default=None, help="default: KGS_DEVICE (auto: CUDA when present)")
    p.add_argument("--no-progress", action="store_true")


@dataclass
class Trained:
    """What ``train_checkpoint`` wrote."""

    checkpoint: Path
    metrics: Path
    published_model_version: str
    source: str
    result: Any  # training.train.TrainResult


def train_checkpoint(
    settings: Any,
    cfg: Any,
    source: str | None = None,
    out: Path | None = None,
    init: str | None = None,
    text: Any = None,
) -> Trained:
    """Train the graph encoder on the worker's replica (``source="replica"``, the default when
    the worker has a checkpoint) or on the graph DB (``"graph"``: product text through ``text``,
    cached in its text cache), and save the checkpoint and its metrics (default
    ``<state_dir>/model/graph-<version>.safetensors``). ``kg-streamer train`` and the demo."""
    from encoders.graph import GraphEncoder, GraphEncoderConfig
    from encoders.text import TextEncoder
    from training import dataset as graph_mod
    from training.blend import fit_blend
    from training.train import published_version, save, train

    if settings.torch_threads > 0:
        import torch

        torch.set_num_threads(settings.torch_threads)
    engine_path = Path(settings.state_dir) / "embed" / "engine.pt"
    source = source or ("replica" if engine_path.exists() else "graph")
    if text is None:  # (an encoder with an empty cache is falsy: it has a __len__)
        text = TextEncoder(settings.text_model, device=settings.device)
    if source == "replica":
        data = graph_mod.from_engine_state(engine_path)
    else:
        cache = Path(settings.state_dir) / "embed" / "text_cache.safetensors"
        if cache.exists():
            text.load_cache(cache)
        data = graph_mod.from_graph_db(settings, text)
    init_model = GraphEncoder.load(init) if init else None
    model_cfg = GraphEncoderConfig(
        in_dim=text.dim, hidden=settings.gnn_hidden, out=settings.gnn_out, layers=settings.gnn_layers, seed=cfg.seed
    )
    result = train(data, cfg, model_cfg, init_model)
    blend = fit_blend(result.model, data, cfg, cfg.k)  # recommend's ranking, on the same validation split
    version = result.model.version
    out = out or settings.local_dir("model") / f"graph-{version}.safetensors"
    published = published_version(result.model, text.model_id, settings.fusion, settings.fusion_text_weight)
    ckpt, metrics = save(
        result,
        out,
        {
            "source": source,
            "published_model_version": published,
            "text_model": text.model_id,
            "fusion": settings.fusion,
            "fusion_text_weight": settings.fusion_text_weight,
            "blend": blend.to_dict(),
        },
    )
    return Trained(ckpt, metrics, published, source, result)


def cmd_train(args: argparse.Namespace, settings: Any) -> int:
    cfg = _train_config(args, settings)
    t = train_checkpoint(settings, cfg, args.source, Path(args.out) if args.out else None, args.init)
    result = t.result
    print(
        json.dumps(
            {
                "checkpoint": str(t.checkpoint),
                "metrics": str(t.metrics),
                "version": result.model.version,
                "published_model_version": t.published_model_version,
                "best_epoch": result.best_epoch,
                "best_val": result.best_val,
                "init_val": result.init_val,
                "seconds": round(result.seconds, 1),
                "peak_rss_mb": round(result.peak_rss_bytes / 2**20, 1),
                "device": result.device,
                "source": t.source,
                "use": f"KGS_GRAPH_CHECKPOINT={t.checkpoint} kg-streamer embed",
            },
            indent=2,
        )
    )
    return 0


def cmd_evaluate(args: argparse.Namespace, settings: Any) -> int:
    from training import evaluate

    names = [n.strip() for n in args.datasets.split(",") if n.strip()]
    paths = {}
    for spec in args.path or []:
        name, _, path = spec.partition("=")
        paths[name] = Path(path)
    report = evaluate.run(
        names, settings, _train_config(args, settings), args.align, Path(args.report) if args.report else None, paths
    )
    if args.quality_json:
        Path(args.quality_json).write_text(json.dumps(evaluate.quality_json(report), indent=2) + "\n")
    print(evaluate.markdown_table(report))
    return 0


def clean_title(title: str | None, width: int) -> str:
    """One line of at most ``width`` characters (whitespace collapsed, cut with '...')."""
    text = " ".join((title or "").split())
    return text if len(text) <= width else text[: width - 3].rstrip() + "..."


def candidate_table(cands: Sequence[Any], title_width: int = 64, indent: str = "") -> list[str]:
    """``rank  id  score  title`` lines for candidates (``Candidate`` with ``title`` filled)."""
    if not cands:
        return [f"{indent}(no candidates)"]
    id_w = max(2, *(len(c.id) for c in cands))
    lines = [f"{indent}{'rank':>4}  {'id':<{id_w}}  {'score':>7}  title"]
    for rank, c in enumerate(cands, 1):
        title = clean_title(c.title, title_width) if c.title else "(no title)"
        lines.append(f"{indent}{rank:>4}  {c.id:<{id_w}}  {c.score:>7.4f}  {title}")
    return lines


def _versions_text(index: Any) -> str:
    versions = index.version_summary()
    shown = ", ".join(f"{v or '?'} ({n:,} vectors)" for v, n in list(versions.items())[:2])
    return shown + (f" (+{len(versions) - 2} more)" if len(versions) > 2 else "")


def _print_candidates(
    kind: str, query: str, index: Any, cands: Sequence[Any], settings: Any, as_json: bool, heading: str, **extra: Any
) -> None:
    """JSON (``--json``: the query, source, model versions, ``extra`` and every candidate with its
    title) or a heading and a ``rank id score title`` table."""
    from training.candidates import with_titles

    cands = with_titles(settings, cands)
    if as_json:
        print(
            json.dumps(
                {
                    kind: query,
                    "source": index.source,
                    "model_versions": index.version_summary(),
                    **extra,
                    "results": [c.as_dict() for c in cands],
                },
                indent=2,
            )
        )
        return
    print(heading)
    print(f"  vectors: {index.source}; model {_versions_text(index)}")
    print("\n".join(candidate_table(cands, indent="  ")))


def _clear_errors(command: Any) -> Any:
    """A candidate command's expected failures (an unknown node or user, no vectors yet) as one
    line on stderr and exit code 2, not a traceback."""

    @functools.wraps(command)
    def run(args: argparse.Namespace, settings: Any) -> int:
        try:
            return int(command(args, settings))
        except (KeyError, FileNotFoundError, ValueError) as e:
            message = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
            print(f"kg-streamer {args.command}: {message}", file=sys.stderr)
            return 2

    return run


@_clear_errors
def cmd_similar(args: argparse.Namespace, settings: Any) -> int:
    from training.candidates import titles

    index = _load_index(settings, args.source)
    cands = index.similar(args.node, args.k)
    name = titles(settings, [args.node]).get(args.node) if not args.json else None
    heading = f"products similar to {args.node}" + (f' "{clean_title(name, 60)}"' if name else "")
    _print_candidates("node", args.node, index, cands, settings, args.json, heading)
    return 0


@_clear_errors
def cmd_recommend(args: argparse.Namespace, settings: Any) -> int:
    from training.candidates import serving_blend

    index = _load_index(settings, args.source)
    rels = [r.strip().upper() for r in args.exclude_rels.split(",") if r.strip()]
    blend = None if args.plain else serving_blend(settings, index)
    cands, excluded = index.recommend(args.user, args.k, rels, blend)
    user = args.user if args.user.startswith("User:") else f"User:{args.user}"
    heading = (
        f"recommendations for {user} ({excluded:,} products already {'/'.join(rels) or '-'} left out)\n"
        f"  ranked by {ranking_text(blend)}"
    )
    _print_candidates(
        "user",
        args.user,
        index,
        cands,
        settings,
        args.json,
        heading,
        excluded=excluded,
        excluded_rels=rels,
        ranking=blend.to_dict() if blend is not None else "cosine",
    )
    return 0


def ranking_text(blend: Any) -> str:
    """How ``recommend`` ranked, in words (``training.blend.Blend`` or None); terms at 0 left out."""
    if blend is None or blend.plain:
        return "the cosine of the user's and the products' vectors"
    terms = ["the model's cosine"]
    if blend.beta:
        window = "all time" if blend.window_days is None else f"the last {blend.window_days} days"
        terms.append(f"{blend.beta:g} x log(1 + buyers in {window})")
    if blend.gamma:
        terms.append(f"a text prior (weight {blend.gamma:g}) for products nobody has bought yet")
    if blend.cold_offset:
        terms.append(f"{blend.cold_offset:g} for products nobody has bought yet")
    return " + ".join(terms).replace("+ -", "- ") + " (training/blend.py)"


@_clear_errors
def cmd_search(args: argparse.Namespace, settings: Any) -> int:
    index = _load_index(settings, args.source)
    cands, aligned = index.search(args.text, args.k)
    how = "text and the graph model's alignment head" if aligned else "text only: the graph model has no alignment head"
    heading = f'products for "{args.text}" ({how})'
    _print_candidates("text", args.text, index, cands, settings, args.json, heading, aligned=aligned)
    return 0


def _load_index(settings: Any, source: Any) -> Any:
    from training.candidates import VectorIndex

    return VectorIndex.load(settings, source)


@_clear_errors
def cmd_write_vectors(args: argparse.Namespace, settings: Any) -> int:
    from training.candidates import VectorIndex, write_back

    index = VectorIndex.load(settings, args.source)
    labels = [x.strip() for x in args.labels.split(",") if x.strip()]
    written = write_back(index, settings, labels, args.batch)
    print(json.dumps({"source": index.source, "model_versions": index.version_summary(), "written": written}, indent=2))
    return 0


def register(sub: Any) -> None:
    p = sub.add_parser("train", help="train the graph encoder by link prediction; writes a checkpoint + metrics")
    p.add_argument(
        "--source",
        choices=["replica", "graph"],
        default=None,
        help="the worker's checkpointed replica (default when there is one) or the graph DB",
    )
    p.add_argument("--out", default=None, help="checkpoint file (default <state_dir>/model/graph-<version>.safetensors)")
    p.add_argument("--init", default=None, help="start from this checkpoint instead of the seeded init")
    _add_train_options(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="temporal evaluation on the real data sets (recall@20 / NDCG@20)")
    p.add_argument("--datasets", default="online_retail,amazon_magazine")
    p.add_argument("--path", action="append", help="NAME=PATH to read a data set from elsewhere")
    p.add_argument("--report", default=None, help="write the full JSON report here")
    p.add_argument("--quality-json", default=None, help="write {dataset: {method: metrics}} here")
    _add_train_options(p)
    p.set_defaults(func=cmd_evaluate, align=0.1)

    sources = ["auto", "checkpoint", "topic"]
    p = sub.add_parser("similar", help="products nearest a node's vector")
    p.add_argument("--node", required=True, help="node key, e.g. Product:85123A")
    p.add_argument("--k", type=int, default=20)
    p.add_argument("--source", choices=sources, default="auto")
    p.add_argument("--json", action="store_true", help="machine-readable output (with titles)")
    p.set_defaults(func=cmd_similar)

    p = sub.add_parser("recommend", help="products for a user, without those already bought")
    p.add_argument("--user", required=True, help="user id (or User:<id>)")
    p.add_argument("--k", type=int, default=20)
    p.add_argument("--source", choices=sources, default="auto")
    p.add_argument("--exclude-rels", default="PURCHASED,RATED", help="interactions that count as already bought")
    p.add_argument(
        "--plain", action="store_true", help="rank by the vectors' cosine alone, without the checkpoint's popularity/text blend"
    )
    p.add_argument("--json", action="store_true", help="machine-readable output (with titles)")
    p.set_defaults(func=cmd_recommend)

    p = sub.add_parser("search", help="products for a text query (text encoder, aligned when the model can)")
    p.add_argument("--text", required=True)
    p.add_argument("--k", type=int, default=20)
    p.add_argument("--source", choices=sources, default="auto")
    p.add_argument("--json", action="store_true", help="machine-readable output (with titles)")
    p.set_defaults(func=cmd_search)

    p = sub.add_parser("write-vectors", help="store the current vectors on the graph nodes (n.embedding)")
    p.add_argument("--labels", default="Product")
    p.add_argument("--source", choices=sources, default="auto")
    p.add_argument("--batch", type=int, default=1000)
    p.set_defaults(func=cmd_write_vectors)
