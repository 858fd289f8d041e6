"""Reproduce docs/quality.md: leak-free temporal evaluation of the published vectors on real data.

    python bench/quality.py                       # both data sets from KGS_DATA_DIR, CPU
    python bench/quality.py --write-docs          # ... and rewrite docs/quality.json + the table
    python bench/quality.py --device cuda --text-cache FILE --data-dir DIR --report OUT.json

Every method -- the trained model, the untrained and text-only vectors, and the baselines
(all-time and recent popularity, item-kNN, BPR matrix factorisation) -- is measured in the
same run on the same split (``training.evaluate``; its docstring is the protocol: nothing from
after T reaches training or the vectors at T, ties are broken in a seeded random order, paired
bootstrap intervals of every method against the default one). The trained model is chosen
among ``SWEEP`` (a few learning rates and temperatures) by recall@20 on its own validation
split (the newest 10 % of the interactions before T), never by the test numbers; ``--sweep
none`` trains the default configuration only. ``--text-cache`` serves the product text
embeddings from a cache file written by an earlier run (``<state_dir>/model/
text_cache.safetensors``), for a machine without the text model.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# Training configurations the evaluation chooses from, by validation recall@20.
BASE = {"epochs": 60, "patience": 5, "batch_size": 4096, "negatives": 1024}  # = TrainConfig's defaults
SWEEP = [
    {},  # TrainConfig's defaults: lr 3e-3, temperature 0.05, auto supervision
    {"lr": 1e-2},
    {"temperature": 0.1},
    {"batch_size": 1024},  # more, smaller steps
]
ALIGN_WEIGHT = 0.1
START, END = "<!-- quality-table:start -->", "<!-- quality-table:end -->"
START_CPU, END_CPU = "<!-- quality-table-cpu:start -->", "<!-- quality-table-cpu:end -->"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datasets", default="online_retail,amazon_magazine")
    ap.add_argument("--data-dir", default=None, help="folder holding online_retail/ and amazon_magazine_2018/")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 is fastest on a busy 2-core box)")
    ap.add_argument("--sweep", choices=["default", "none"], default="default")
    ap.add_argument("--epochs", type=int, default=None)
    ap.add_argument("--max-steps-per-epoch", type=int, default=None, help="for smoke runs")
    ap.add_argument("--align", type=float, default=ALIGN_WEIGHT)
    ap.add_argument(
        "--compare-fusion",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also train with the other fusion (mean vs concat) and report it plain and blended",
    )
    ap.add_argument("--text-cache", default=None)
    ap.add_argument("--state-dir", default=str(ROOT / ".kgs"))
    ap.add_argument("--report", default=None, help="full JSON report (default <state-dir>/model/quality_report.json)")
    ap.add_argument("--budget-s", type=float, default=None, help="stop trying further configs after this")
    ap.add_argument(
        "--determinism", action="store_true", help="also train the first data set twice for a few steps and compare the versions"
    )
    ap.add_argument(
        "--write-docs",
        nargs="?",
        const="main",
        choices=["main", "cpu"],
        default=None,
        help="main: rewrite docs/quality.json and the main table of docs/quality.md; cpu: only the table of the CPU run",
    )
    ap.add_argument("--from-report", default=None, help="no run: take the results from this saved report")
    args = ap.parse_args(argv)

    import torch

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    from streamer.settings import Settings
    from training import evaluate
    from training.train import TrainConfig

    settings = Settings(_env_file=None, state_dir=Path(args.state_dir), device=args.device)
    base = TrainConfig(
        **BASE,
        fusion=settings.fusion,
        fusion_text_weight=settings.fusion_text_weight,
        device=args.device,
        progress=False,
        seed=settings.gnn_seed,
    )
    if args.epochs:
        base = replace(base, epochs=args.epochs)
    if args.max_steps_per_epoch:
        base = replace(base, max_steps_per_epoch=args.max_steps_per_epoch)
    configs = [replace(base, **c) for c in (SWEEP if args.sweep == "default" else SWEEP[:1])]
    names = [n.strip() for n in args.datasets.split(",") if n.strip()]
    paths = {}
    if args.data_dir:
        for name in names:
            paths[name] = Path(args.data_dir) / Path(evaluate.DATASETS[name]["path"]).name
    report_path = Path(args.report) if args.report else settings.local_dir("model") / "quality_report.json"
    if args.from_report:
        report = json.loads(Path(args.from_report).read_text())
    else:
        t0 = time.perf_counter()
        report = evaluate.run(
            names,
            settings,
            configs,
            args.align,
            report_path,
            paths,
            text_cache=Path(args.text_cache) if args.text_cache else None,
            eval_device="cuda" if torch.cuda.is_available() and args.device != "cpu" else "cpu",
            budget_s=args.budget_s,
            compare_fusion=args.compare_fusion,
        )
        if args.determinism:
            report["determinism"] = determinism(names[0], paths.get(names[0]), settings, base, args.text_cache)
            print(json.dumps(report["determinism"]))
        from bench.ingest import command_line

        report["command"] = command_line("bench/quality.py", argv if argv is not None else sys.argv[1:])
        report["seconds"] = round(time.perf_counter() - t0, 1)
        report["device"] = torch.cuda.get_device_name() if torch.cuda.is_available() and args.device != "cpu" else "cpu"
        report["torch"] = torch.__version__
        report_path.write_text(json.dumps(report, indent=2) + "\n")
        print(f"full report: {report_path}")
    table = evaluate.markdown_table(report)
    print(table)
    if args.write_docs:
        start, end = (START, END) if args.write_docs == "main" else (START_CPU, END_CPU)
        if args.write_docs == "main":
            (ROOT / "docs" / "quality.json").write_text(json.dumps(evaluate.quality_json(report), indent=2) + "\n")
        md = ROOT / "docs" / "quality.md"
        text = md.read_text() if md.exists() else f"{start}\n{end}\n"
        text = re.sub(re.escape(start) + ".*?" + re.escape(end), lambda _: f"{start}\n{table}\n{end}", text, flags=re.S)
        md.write_text(text)
    return 0


def determinism(name: str, path, settings, base, text_cache) -> dict:
    """Train twice with the same seed (a few steps) on one data set's graph: same version?"""
    import numpy as np

    from encoders.graph import GraphEncoderConfig
    from training import evaluate
    from training.dataset import from_events
    from training.train import train

    spec = evaluate.DATASETS[name]
    log = evaluate.load_events(spec["loader"], path or settings.data_dir / spec["path"])
    text = evaluate.CacheOnlyText(text_cache) if text_cache else None
    if text is None:
        from encoders.text import TextEncoder

        text = TextEncoder(settings.text_model, device=settings.device)
    t_split = int(np.quantile(log.interaction_times(), spec["split_quantile"], method="lower"))
    graph = from_events(log, text, t_split, all_products=False)  # the graph at T only (training.evaluate)
    cfg = replace(base, epochs=2, max_steps_per_epoch=5)
    mc = GraphEncoderConfig(
        in_dim=text.dim, hidden=settings.gnn_hidden, out=settings.gnn_out, layers=settings.gnn_layers, seed=settings.gnn_seed
    )
    versions = [train(graph, cfg, mc).model.version for _ in range(2)]
    return {"dataset": name, "device": str(cfg.device), "versions": versions, "identical": versions[0] == versions[1]}


if __name__ == "__main__":
    sys.exit(main())
