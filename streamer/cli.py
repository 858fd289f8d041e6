"""``kg-streamer`` command line: one sub-command per job, all configured by ``Settings``.

    kg-streamer services up|down|status     embedded broker + graph DB in the state dir
    kg-streamer topics                      create the topics (idempotent)
    kg-streamer load online-retail PATH     replay a real data set into the input topics
    kg-streamer load amazon DIR
    kg-streamer ingest [--until-caught-up]  the ingest consumer (long-lived by default)
    kg-streamer embed [--until-caught-up]   the embedding worker (long-lived by default)
    kg-streamer verify [--against-topic]    full recompute == incremental state? (exit 1 if not)
    kg-streamer schema [--out FILE]         write the input events' JSON Schema
    kg-streamer demo                        services up, load the committed sample, ingest, summary
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from streamer.settings import Settings

log = logging.getLogger("kg-streamer")

REPO_ROOT = Path(__file__).resolve().parent.parent
SAMPLE_DIR = REPO_ROOT / "data" / "sample"
# Sub-commands of other concerns, by the module that registers them (imported only when needed).
PLUGIN_MODULES = {
    "streamer.ops.cli": ("status", "replay", "lag-exporter"),
    "streamer.model.cli": ("train", "evaluate", "similar", "recommend", "search", "write-vectors"),
}


def _setup_logging(settings: Settings) -> None:
    logging.basicConfig(
        level=getattr(logging, settings.log_level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    for noisy in ("neo4j",):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def cmd_services(args, settings: Settings) -> int:
    from streamer.local_services import LocalServices

    services = LocalServices(settings)
    if args.action == "up":
        services.up()
    elif args.action == "down":
        services.down()
    print(json.dumps(services.status(), indent=2, default=str))
    return 0


def cmd_topics(args, settings: Settings) -> int:
    from streamer.topics import ensure_topics

    print(json.dumps(ensure_topics(settings)))
    return 0


def cmd_load(args, settings: Settings) -> int:
    from streamer.loaders import replay

    from streamer.topics import ensure_topics

    ensure_topics(settings)
    loader = replay.load_online_retail if args.dataset == "online-retail" else replay.load_amazon
    stats = loader(args.path, settings, limit=args.limit, rate=args.rate)
    print(json.dumps(stats.summary() if hasattr(stats, "summary") else stats, indent=2, default=str))
    return 0


def _run_consumer(make, args, settings: Settings) -> int:
    """A long-running consumer: topics, /metrics, SIGTERM handling, run, print its summary."""
    from streamer import metrics
    from streamer.topics import ensure_topics

    ensure_topics(settings)
    metrics.serve(settings.metrics_addr)
    consumer = make(settings)
    consumer.install_signal_handlers()
    stats = consumer.run(until_caught_up=args.until_caught_up, max_seconds=args.max_seconds)
    print(json.dumps(stats.summary(), indent=2))
    return 0


def cmd_ingest(args, settings: Settings) -> int:
    from streamer.ingest import IngestConsumer

    return _run_consumer(IngestConsumer, args, settings)


def cmd_embed(args, settings: Settings) -> int:
    from streamer.embed.worker import EmbedWorker

    return _run_consumer(EmbedWorker, args, settings)


def cmd_verify(args, settings: Settings) -> int:
    from streamer.embed.audit import verify

    report = verify(settings, against_topic=args.against_topic, tol=args.tol)
    print(json.dumps(report, indent=2))
    return 0 if report["ok"] else 1


def cmd_schema(args, settings: Settings) -> int:
    from streamer.events import json_schema

    text = json.dumps(json_schema(), indent=2) + "\n"
    if args.out:
        Path(args.out).write_text(text)
    else:
        sys.stdout.write(text)
    return 0


def cmd_demo(args, settings: Settings) -> int:
    from streamer.demo import run_demo

    return run_demo(settings, sample_dir=Path(args.sample_dir), limit=args.limit)


CORE_COMMANDS = {"services", "topics", "load", "ingest", "embed", "verify", "schema", "demo"}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; with ``command`` given only the plugin module that owns it is imported."""
    parser = argparse.ArgumentParser(prog="kg-streamer", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("services", help="start/stop the embedded broker and graph DB")
    p.add_argument("action", choices=["up", "down", "status"])
    p.set_defaults(func=cmd_services)

    p = sub.add_parser("topics", help="create the topics (idempotent)")
    p.set_defaults(func=cmd_topics)

    p = sub.add_parser("load", help="replay a real data set into the input topics")
    p.add_argument("dataset", choices=["online-retail", "amazon"])
    p.add_argument("path", help="online_retail.csv.gz file, or the Amazon directory")
    p.add_argument("--limit", type=int, default=None, help="stop after N events")
    p.add_argument("--rate", type=float, default=None, help="events per second (default: as fast as possible)")
    p.set_defaults(func=cmd_load)

    p = sub.add_parser("ingest", help="consume input topics into the graph DB")
    p.add_argument("--until-caught-up", action="store_true", help="exit once the group's lag is 0")
    p.add_argument("--max-seconds", type=float, default=None)
    p.set_defaults(func=cmd_ingest)

    p = sub.add_parser("embed", help="the embedding worker: kg.changes -> incremental GNN -> kg.embeddings")
    p.add_argument("--until-caught-up", action="store_true", help="exit once the group's lag is 0")
    p.add_argument("--max-seconds", type=float, default=None)
    p.set_defaults(func=cmd_embed)

    p = sub.add_parser("verify", help="audit: full recompute vs the worker's incremental state (exit 1 on failure)")
    p.add_argument("--tol", type=float, default=None, help="default: 1e-5 + the bounded mode's error bound (0 when exact)")
    p.add_argument("--against-topic", action="store_true", help="also compare with the last vector per key on kg.embeddings")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("schema", help="print or write the JSON Schema of input events")
    p.add_argument("--out", default=None)
    p.set_defaults(func=cmd_schema)

    p = sub.add_parser("demo", help="the main job on embedded services and the committed real sample")
    p.add_argument("--sample-dir", default=str(SAMPLE_DIR))
    p.add_argument("--limit", type=int, default=None, help="events per data set")
    p.set_defaults(func=cmd_demo)

    # Sub-commands of other concerns live next to their code; each module has register(sub).
    import importlib

    for name, commands in PLUGIN_MODULES.items():
        if command in CORE_COMMANDS or (command is not None and command not in commands and _known(command)):
            continue
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if not name.startswith(exc.name or "\0"):
                raise
            continue
        module.register(sub)
    return parser


def _known(command: str) -> bool:
    return command in CORE_COMMANDS or any(command in cmds for cmds in PLUGIN_MODULES.values())


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # a command pays only for importing its own concern's modules
    command = next((a for a in argv if not a.startswith("-")), None)
    args = build_parser(command).parse_args(argv)
    settings = Settings()
    _setup_logging(settings)
    return args.func(args, settings)


if __name__ == "__main__":
    sys.exit(main())
