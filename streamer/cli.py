"""``kg-streamer`` command line: one sub-command per job, all configured by ``Settings``.

    kg-streamer services up|down|status     embedded broker + graph DB in the state dir
    kg-streamer topics                      create the topics (idempotent)
    kg-streamer load online-retail [PATH]   replay a real data set into the input topics
    kg-streamer load amazon [DIR]           (default paths under KGS_DATA_DIR)
    kg-streamer ingest [--until-caught-up]  the ingest consumer (long-lived by default)
    kg-streamer embed [--until-caught-up]   the embedding worker (long-lived by default)
    kg-streamer verify [--against-topic]    full recompute == incremental state? (exit 1 if not)
    kg-streamer schema [--out FILE]         write the input events' JSON Schema
    kg-streamer demo                        services up, load the committed sample, ingest, embed, summary
    kg-streamer status | replay | lag-exporter                       consumer groups (streamer/groups/admin.py)
    kg-streamer train | evaluate | similar | recommend | search | write-vectors   model lifecycle (training/)

This module is the composition root: the one runtime module that may import the dev tools
(``devtools/``: embedded services, data sets, the demo) and the model tooling (``training/``),
each only inside the command that needs it, so a command pays only for its own imports.
``--verbose`` (or ``KGS_LOG_LEVEL=DEBUG``) lets third-party logs through (``streamer.logs``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from streamer.logs import setup_logging
from streamer.settings import Settings

REPO_ROOT = Path(__file__).resolve().parent.parent
SAMPLE_DIR = REPO_ROOT / "data" / "sample"
GROUP_COMMANDS = ("status", "replay", "lag-exporter")
MODEL_COMMANDS = ("train", "evaluate", "similar", "recommend", "search", "write-vectors")
DATASET_PATHS = {"online-retail": "online_retail/online_retail.csv.gz", "amazon": "amazon_magazine_2018"}


def cmd_services(args, settings: Settings) -> int:
    from devtools.local_services import LocalServices

    services = LocalServices(settings)
    if args.action == "up":
        services.up()
    elif args.action == "down":
        services.down()
    print(json.dumps(services.status(), indent=2, default=str))
    return 0


def cmd_topics(args, settings: Settings) -> int:
    from streamer.kafka.topics import ensure_topics

    print(json.dumps(ensure_topics(settings)))
    return 0


def cmd_load(args, settings: Settings) -> int:
    from devtools.datasets import produce
    from streamer.kafka.topics import ensure_topics

    path = Path(args.path) if args.path else settings.data_dir / DATASET_PATHS[args.dataset]
    if not path.exists():
        print(f"kg-streamer load: {path} does not exist (give a path, or set KGS_DATA_DIR)", file=sys.stderr)
        return 2
    ensure_topics(settings)
    loader = produce.load_online_retail if args.dataset == "online-retail" else produce.load_amazon
    stats = loader(path, settings, limit=args.limit, rate=args.rate)
    print(json.dumps(stats.summary() if hasattr(stats, "summary") else stats, indent=2, default=str))
    return 0


def run_consumer(make, args, settings: Settings) -> int:
    """A long-running consumer: topics, /metrics and the group's lag monitor (only where
    metrics are served), SIGTERM handling, run, print its summary."""
    from streamer import metrics
    from streamer.groups.lag import start_monitor
    from streamer.health import HEALTH
    from streamer.kafka.topics import ensure_topics

    ensure_topics(settings)
    HEALTH.stale_s = settings.max_poll_interval_ms / 1000  # a loop stuck longer has left its group anyway
    try:
        metrics.serve(settings.metrics_addr)
    except metrics.AddressInUse as e:
        print(f"kg-streamer {args.command}: {e}", file=sys.stderr)
        return 2
    consumer = make(settings)
    consumer.install_signal_handlers()
    monitor = start_monitor(settings, consumer.group, consumer.topics)
    try:
        stats = consumer.run(until_caught_up=args.until_caught_up, max_seconds=args.max_seconds)
    finally:
        if monitor is not None:
            monitor.stop()
    print(json.dumps(stats.summary(), indent=2))
    return 0


def cmd_ingest(args, settings: Settings) -> int:
    from streamer.ingest.step import ingest_consumer

    return run_consumer(ingest_consumer, args, settings)


def cmd_embed(args, settings: Settings) -> int:
    from streamer.embed.worker import embed_consumer

    return run_consumer(embed_consumer, args, settings)


def cmd_verify(args, settings: Settings) -> int:
    from streamer.embed.verify import verify

    report = verify(
        settings,
        against_topic=args.against_topic,
        tol=args.tol,
        against_graph=args.against_graph or args.repair,
        repair=args.repair,
    )
    print(json.dumps(report, indent=2))
    return 0 if report["ok"] else 1


def cmd_schema(args, settings: Settings) -> int:
    from streamer.contracts.events import json_schema

    text = json.dumps(json_schema(), indent=2) + "\n"
    if args.out:
        Path(args.out).write_text(text)
    else:
        sys.stdout.write(text)
    return 0


def cmd_demo(args, settings: Settings) -> int:
    from devtools.demo import run_demo

    return run_demo(settings, sample_dir=Path(args.sample_dir), limit=args.limit, verbose=args.verbose)


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; with ``command`` given, only the module that owns it is imported."""
    parser = argparse.ArgumentParser(
        prog="kg-streamer", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="let third-party logs through (kafka, neo4j ...)")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("services", help="start/stop the embedded broker and graph DB")
    p.add_argument("action", choices=["up", "down", "status"])
    p.set_defaults(func=cmd_services)

    p = sub.add_parser("topics", help="create the topics (idempotent)")
    p.set_defaults(func=cmd_topics)

    p = sub.add_parser("load", help="replay a real data set into the input topics")
    p.add_argument("dataset", choices=["online-retail", "amazon"])
    p.add_argument(
        "path", nargs="?", default=None, help="online_retail.csv.gz file, or the Amazon directory (default: under KGS_DATA_DIR)"
    )
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
    p.add_argument("--against-graph", action="store_true", help="also compare the replica with the graph DB (nodes, edges)")
    p.add_argument(
        "--repair",
        action="store_true",
        help="with --against-graph: publish to kg.changes the changes that take the replica to the graph",
    )
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("schema", help="print or write the JSON Schema of input events")
    p.add_argument("--out", default=None)
    p.set_defaults(func=cmd_schema)

    p = sub.add_parser("demo", help="the main job on embedded services and the committed real sample")
    p.add_argument("--sample-dir", default=str(SAMPLE_DIR))
    p.add_argument("--limit", type=int, default=None, help="events per data set")
    p.set_defaults(func=cmd_demo)

    if command is None or command in GROUP_COMMANDS:
        from streamer.groups import admin

        admin.register(sub)
    if command is None or command in MODEL_COMMANDS:
        from training import commands

        commands.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # a command pays only for importing its own concern's modules
    command = next((a for a in argv if not a.startswith("-")), None)
    args = build_parser(command).parse_args(argv)
    settings = Settings()
    setup_logging(settings.log_level, verbose=args.verbose)
    return args.func(args, settings)


if __name__ == "__main__":
    sys.exit(main())
