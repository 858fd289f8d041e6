#!/usr/bin/env python
"""Ingest benchmark: the full UCI Online Retail replay through the real ingest consumer.

    python bench/ingest.py [CSV] [--batch-size N | --batch-sizes 250,1000,5000] [--broker tansu|noida]

What it does, all on private embedded services (its own temporary state dir, free loopback
ports; nobody else's services are touched, and everything it started is stopped at the end,
also on error or Ctrl-C):

1. starts the embedded broker, creates the topics (``ensure_topics``) and replays the whole
   CSV into the input topics (``load_online_retail``), timing the produce rate (CSV parsing,
   JSON encoding and acks=all produce together);
2. **baseline** (same run, same machine, so the ratio means something on a noisy box): on a
   fresh graph DB, the first events of the same data written **one event per transaction**
   (decode -> plan -> one Bolt transaction, like a naive sink that writes each message on its
   own), for ``--baseline-seconds`` or ``--baseline-events``, whichever ends first; then the
   very same events on another fresh graph DB in transactions of ``batch size`` events. Both
   are graph-only (no consume, no changelog publish, no commit);
3. **the graph DB's own limit** (``db_raw``, measured after the runs of 4): every event the
   pipeline runs, decoded and
   planned beforehand (not timed), written with the pipeline's statements in transactions of
   the batch size, back to back, on a fresh graph DB; each run's ``ratio_to_db_raw`` is its
   events/s over this one (1.0: the pipeline costs nothing on top of the database);
4. for each batch size: a fresh graph DB and a new consumer group, then
   ``ingest_consumer(settings).run(until_caught_up=True)`` over everything replayed, timed;
   the stage timings come from the ``kgs_stage_duration_seconds`` histogram the consumer
   records (decode, write, publish, commit; "poll/other" is the remainder), plus the CPU
   seconds each process used (this one, the graph DB's JVM, the broker), also per event: on a
   shared machine CPU microseconds per event move much less with the load than wall time;
5. optionally (``--profile``) one more run under cProfile, reported separately (cProfile
   slows the Python side, so its throughput is not a result).

Every graph DB is warmed up first (``--warmup-events`` real events written one per
transaction and in one batch, then deleted) so that JIT compilation of the JVM does not
land on whichever measurement comes first.

The JSON result goes to stdout (and to ``--output`` when given); progress goes to stderr.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import itertools
import json
import logging
import os
import platform
import pstats
import resource
import secrets
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from prometheus_client import REGISTRY

from devtools.datasets import LoadReport, online_retail
from devtools.datasets.produce import encode, load_online_retail
from devtools.local_services import LocalServices, ServiceError, free_port
from sinks.graph_db import GraphSink
from streamer.contracts.events import decode_event
from streamer.ingest.plan import plan_batch
from streamer.ingest.step import ingest_consumer
from streamer.kafka.topics import ensure_topics
from streamer.settings import Settings

DEFAULT_DATA = Settings().data_dir / "online_retail" / "online_retail.csv.gz"
STAGES = ("decode", "write", "publish", "commit")
# Broker session settings: Tansu makes a new group wait session_timeout/2 before the join
# completes, noida-db needs >= 6 s (reference/environment.md).
SESSION = {"tansu": (2_000, 500), "noida": (6_000, 1_000)}
# Bench-only statement (not sent by the product): empties a graph after the warm-up.
WIPE = "MATCH (n) DETACH DELETE n"

log = logging.getLogger("bench.ingest")


# --------------------------------------------------------------------------- helpers
def command_line(script: str, argv: list[str]) -> str:
    """The command that made a result, for its JSON: an absolute path among the arguments is
    written relative to the repository when it lies inside it, otherwise as its file name
    under ``<elsewhere>/`` (no machine's absolute path goes into a committed result)."""
    root = Path(__file__).resolve().parents[1]

    def portable(arg: str) -> str:
        if not os.path.isabs(arg):
            return arg
        path = Path(arg).resolve()
        return os.path.relpath(path, root) if path.is_relative_to(root) else f"<elsewhere>/{path.name}"

    return " ".join(["python", script, *(portable(a) for a in argv)])


def machine() -> dict[str, Any]:
    model = None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gib = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_gib = round(int(line.split()[1]) / 1024 / 1024, 1)
    except OSError:
        pass
    return {
        "cpu_count": os.cpu_count(),
        "cpu_model": model,
        "memory_gib": mem_gib,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
    }


def proc_cpu_s(pid: int | None) -> float | None:
    """User + system CPU seconds of a live process (all its threads), from /proc."""
    if pid is None:
        return None
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


def self_cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def service_pid(services: LocalServices, name: str) -> int | None:
    try:
        return int((services.dir / f"{name}.pid").read_text().strip())
    except (OSError, ValueError):
        return None


def stage_totals(group: str) -> dict[str, dict[str, float]]:
    """Sum and count of kgs_stage_duration_seconds per stage for one consumer group."""
    out: dict[str, dict[str, float]] = {}
    for metric in REGISTRY.collect():
        if metric.name != "kgs_stage_duration_seconds":
            continue
        for sample in metric.samples:
            if sample.labels.get("group") != group:
                continue
            stage = sample.labels.get("stage")
            if sample.name.endswith("_sum"):
                out.setdefault(stage, {})["seconds"] = sample.value
            elif sample.name.endswith("_count"):
                out.setdefault(stage, {})["batches"] = sample.value
    return out


class TimedGraphSink(GraphSink):
    """The product's GraphSink, recording (events in the batch, seconds) of every write."""

    def __init__(self, settings: Settings):
        super().__init__(settings)
        self.writes: list[tuple[int, float]] = []

    def write(self, batch, source_ms=None):  # type: ignore[no-untyped-def]
        t0 = time.perf_counter()
        try:
            return super().write(batch, source_ms)
        finally:
            self.writes.append((batch.events, time.perf_counter() - t0))


def write_cost_by_decile(writes: list[tuple[int, float]]) -> list[float]:
    """Graph write milliseconds per 1,000 events in each tenth of the run (by events): does the
    cost per event grow as the graph grows?"""
    total = sum(n for n, _ in writes)
    if not total:
        return []
    buckets = [[0, 0.0] for _ in range(10)]
    seen = 0
    for n, secs in writes:
        b = buckets[min(9, seen * 10 // total)]
        b[0] += n
        b[1] += secs
        seen += n
    return [round(secs / n * 1e6, 1) if n else 0.0 for n, secs in buckets]


def rate(n: float, seconds: float) -> float:
    return round(n / seconds, 1) if seconds > 0 else 0.0


# --------------------------------------------------------------------------- services
class Bench:
    """Owns the temporary state dir and every service it starts; ``close()`` stops them all."""

    def __init__(self, broker: str, root: Path | None, keep: bool):
        self.broker_kind = broker
        self.root = Path(tempfile.mkdtemp(prefix="kgs-bench-", dir=root))
        self.keep = keep
        self.password = "kgs-bench-" + secrets.token_hex(8)
        self.started: list[LocalServices] = []
        self.graph_seq = itertools.count()
        self.broker: LocalServices | None = None

    def settings(self, state_dir: Path, **overrides: Any) -> Settings:
        session_ms, heartbeat_ms = SESSION[self.broker_kind]
        values: dict[str, Any] = {
            "state_dir": state_dir,
            "local_broker": self.broker_kind,
            "bootstrap_servers": f"127.0.0.1:{free_port()}",
            "bolt_uri": f"bolt://127.0.0.1:{free_port()}",
            "arcadedb_http_port": free_port(),
            "bolt_password": self.password,
            "metrics_addr": "",
            "session_timeout_ms": session_ms,
            "heartbeat_interval_ms": heartbeat_ms,
        }
        return Settings(_env_file=None, **{**values, **overrides})

    def _up(self, name: str, state_dir: Path, **overrides: Any) -> LocalServices:
        for attempt in range(3):  # a free port can be taken between picking and binding
            services = LocalServices(self.settings(state_dir, **overrides))
            self.started.append(services)
            try:
                t0 = time.monotonic()
                services.up((name,), timeout_s=180)
                log.info("%s up in %.1fs (%s)", name, time.monotonic() - t0, state_dir)
                return services
            except ServiceError:
                services.down((name,))
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def start_broker(self) -> LocalServices:
        self.broker = self._up("broker", self.root / "broker")
        return self.broker

    def start_graph(self) -> tuple[LocalServices, Settings]:
        """A fresh, empty graph DB; returns it and Settings joining it to the broker."""
        assert self.broker is not None
        graph = self._up("graph", self.root / f"graph-{next(self.graph_seq)}")
        settings = graph.settings.model_copy(update={"bootstrap_servers": self.broker.settings.bootstrap_servers})
        return graph, settings

    def stop_graph(self, graph: LocalServices) -> None:
        graph.down(("graph",))
        shutil.rmtree(graph.dir.parent, ignore_errors=True)

    def close(self) -> None:
        for services in reversed(self.started):
            try:
                services.down()
            except Exception:
                log.exception("stopping services in %s", services.dir)
        if not self.keep:
            shutil.rmtree(self.root, ignore_errors=True)


# --------------------------------------------------------------------------- phases
def wire_events(path: Path, limit: int) -> list[bytes]:
    """The first ``limit`` events of the data set, as the bytes the replay puts on the wire."""
    return [encode(e) for e in online_retail.events(path, limit=limit, report=LoadReport("online_retail"))]


def write_one_per_tx(sink: GraphSink, raws: list[bytes], max_bytes: int, seconds: float | None) -> tuple[int, float, int]:
    """Decode, plan and write each event in its own transaction; (events, seconds, mutations)."""
    done = mutations = 0
    t0 = time.monotonic()
    for raw in raws:
        result = sink.write(plan_batch([decode_event(raw, max_bytes)]))
        mutations += result.nodes_written + result.relationships_written
        done += 1
        if seconds is not None and time.monotonic() - t0 >= seconds:
            break
    return done, time.monotonic() - t0, mutations


def write_batched(sink: GraphSink, raws: list[bytes], max_bytes: int, batch: int) -> tuple[int, float, int]:
    mutations = 0
    t0 = time.monotonic()
    for i in range(0, len(raws), batch):
        result = sink.write(plan_batch([decode_event(raw, max_bytes) for raw in raws[i : i + batch]]))
        mutations += result.nodes_written + result.relationships_written
    return len(raws), time.monotonic() - t0, mutations


def db_raw(bench: Bench, raws: list[bytes], batch: int, warm: list[bytes]) -> dict[str, Any]:
    """The graph DB's own limit for the pipeline's statements: every event the pipeline ran,
    decoded and planned beforehand (not timed), then written with the same statements
    (``GraphSink.write``: batched UNWIND/MERGE, nodes first) in transactions of ``batch``
    events, back to back, on a fresh warmed-up graph DB. No Kafka, no changelog, no commit."""
    max_bytes = bench.broker.settings.max_event_bytes  # type: ignore[union-attr]
    plans = [plan_batch([decode_event(raw, max_bytes) for raw in raws[i : i + batch]]) for i in range(0, len(raws), batch)]
    graph, settings = fresh_warm_graph(bench, warm)
    sink = GraphSink(settings)
    try:
        log.info("db raw: %d events in transactions of %d, statements only", len(raws), batch)
        mutations = 0
        t0 = time.monotonic()
        for plan in plans:
            result = sink.write(plan)
            mutations += result.nodes_written + result.relationships_written
        secs = time.monotonic() - t0
        nodes, rels = sink.counts()
    finally:
        sink.close()
        bench.stop_graph(graph)
    return {
        "what": "the same events, planned beforehand, written with the pipeline's statements; no Kafka",
        "events": len(raws),
        "batch_size": batch,
        "seconds": round(secs, 2),
        "events_per_s": rate(len(raws), secs),
        "graph_mutations_per_s": rate(mutations, secs),
        "graph_after": {"nodes": nodes, "relationships": rels},
    }


def warm_up(sink: GraphSink, raws: list[bytes], max_bytes: int) -> None:
    """Exercise every statement on the JVM (one per tx and batched), then empty the graph."""
    if not raws:
        return
    write_one_per_tx(sink, raws[: len(raws) // 2], max_bytes, seconds=None)
    write_batched(sink, raws, max_bytes, batch=len(raws))
    sink.query(WIPE)
    nodes, rels = sink.counts()
    if nodes or rels:
        raise RuntimeError(f"warm-up left {nodes} nodes and {rels} relationships behind")


def fresh_warm_graph(bench: Bench, warm: list[bytes], **overrides: Any) -> tuple[LocalServices, Settings]:
    graph, settings = bench.start_graph()
    settings = settings.model_copy(update=overrides)
    sink = GraphSink(settings)
    try:
        sink.ensure_schema()
        t0 = time.monotonic()
        warm_up(sink, warm, settings.max_event_bytes)
        log.info("graph warmed up in %.1fs", time.monotonic() - t0)
    finally:
        sink.close()
    return graph, settings


def baseline(bench: Bench, path: Path, args: argparse.Namespace, warm: list[bytes], batch: int) -> dict[str, Any]:
    raws = wire_events(path, args.baseline_events)
    max_bytes = bench.broker.settings.max_event_bytes  # type: ignore[union-attr]
    out: dict[str, Any] = {"what": "graph-only writes of the first events of the same data on a fresh, warmed-up graph DB"}

    graph, settings = fresh_warm_graph(bench, warm)
    sink = GraphSink(settings)
    try:
        log.info("baseline: one event per transaction (up to %d events or %ss)", len(raws), args.baseline_seconds)
        n, secs, muts = write_one_per_tx(sink, raws, max_bytes, args.baseline_seconds)
    finally:
        sink.close()
        bench.stop_graph(graph)
    out["one_per_tx"] = {
        "events": n,
        "seconds": round(secs, 2),
        "events_per_s": rate(n, secs),
        "graph_mutations_per_s": rate(muts, secs),
        "mutations": muts,
    }

    graph, settings = fresh_warm_graph(bench, warm)
    sink = GraphSink(settings)
    try:
        log.info("baseline: the same %d events in transactions of %d", n, batch)
        n2, secs2, muts2 = write_batched(sink, raws[:n], max_bytes, batch)
    finally:
        sink.close()
        bench.stop_graph(graph)
    out["batched"] = {
        "events": n2,
        "batch_size": batch,
        "seconds": round(secs2, 2),
        "events_per_s": rate(n2, secs2),
        "graph_mutations_per_s": rate(muts2, secs2),
        "mutations": muts2,
    }
    out["batched_speedup_same_events"] = round(out["batched"]["events_per_s"] / max(out["one_per_tx"]["events_per_s"], 1e-9), 1)
    return out


def ingest_run(bench: Bench, batch: int, tag: str, warm: list[bytes], profile: bool = False) -> dict[str, Any]:
    group = f"kg-ingest-bench-{tag}"
    graph, settings = fresh_warm_graph(bench, warm, batch_max_events=batch, ingest_group=group)
    broker_pid = service_pid(bench.broker, "broker")  # type: ignore[arg-type]
    graph_pid = service_pid(graph, "graph")
    try:
        sink = TimedGraphSink(settings)
        consumer = ingest_consumer(settings, graph=sink)
        cpu0 = (self_cpu_s(), proc_cpu_s(graph_pid), proc_cpu_s(broker_pid))
        profiler = cProfile.Profile() if profile else None
        log.info("ingest run %s: batch size %d, group %s", tag, batch, group)
        t0 = time.monotonic()
        if profiler:
            profiler.enable()
        stats = consumer.run(until_caught_up=True)
        if profiler:
            profiler.disable()
        secs = time.monotonic() - t0
        cpu1 = (self_cpu_s(), proc_cpu_s(graph_pid), proc_cpu_s(broker_pid))
        reader = GraphSink(settings)
        try:
            nodes, rels = reader.counts()
        finally:
            reader.close()
    finally:
        bench.stop_graph(graph)

    summary = stats.summary()
    mutations = stats.nodes_written + stats.relationships_written
    stages = stage_totals(group)
    # the graph write runs on ingest's writer thread while the consumer's thread decodes, publishes,
    # commits and polls (streamer/ingest/step.py): the shares overlap and add up to more than 1;
    # write's share is how much of the run the graph DB spent in the pipeline's transactions
    breakdown: dict[str, Any] = {
        st: {
            "seconds": round(stages.get(st, {}).get("seconds", 0.0), 2),
            "share": round(stages.get(st, {}).get("seconds", 0.0) / secs, 3),
        }
        for st in STAGES
    }
    breakdown["overlapping"] = "write runs on a thread of its own, beside decode, publish and poll"

    def cpu(i: int) -> dict[str, Any] | None:
        if cpu0[i] is None or cpu1[i] is None:
            return None
        used = cpu1[i] - cpu0[i]
        return {
            "cpu_seconds": round(used, 1),
            "cores_busy": round(used / secs, 2),
            "cpu_us_per_event": round(used / max(stats.events_in, 1) * 1e6, 1),
        }

    result: dict[str, Any] = {
        "batch_size": batch,
        "events": stats.events_in,
        "events_applied": stats.events_applied,
        "seconds": round(secs, 2),
        "events_per_s": rate(stats.events_in, secs),
        "graph_mutations_per_s": rate(mutations, secs),
        "nodes_written": stats.nodes_written,
        "relationships_written": stats.relationships_written,
        "changes_published": stats.changes_published,
        "dlq": stats.dead_letters,
        "batches": stats.batches,
        "mean_batch_events": round(stats.events_in / max(stats.batches, 1), 1),
        "graph_after": {"nodes": nodes, "relationships": rels},
        "stages": breakdown,
        "write_ms_per_1k_events_by_decile": write_cost_by_decile(sink.writes),
        "cpu": {"ingest_process": cpu(0), "graph_db_jvm": cpu(1), "broker": cpu(2)},
        "consumer_summary": summary,
    }
    if profiler:
        result["profile"] = profile_summary(profiler)
    return result


_PROFILE_FUNCS = {
    ("ingest.py", "_poll_once"): "poll",
    ("ingest.py", "_decode"): "decode (validate JSON events)",
    ("mutations.py", "plan_batch"): "plan_batch (coalesce)",
    ("graph_db.py", "_products"): "graph: product statements",
    ("graph_db.py", "_interactions"): "graph: interaction statements",
    ("graph_db.py", "_relations"): "graph: relation statements",
    ("graph_db.py", "_write_once"): "graph: whole transaction",
    ("ingest.py", "_commit"): "offset commit",
    ("kafka_producer.py", "publish"): "publish (kg.changes + DLQ, acks=all)",
    ("changes.py", "to_json"): "Change.to_json",
    ("ingest.py", "_account"): "metrics/accounting",
}


def profile_summary(profiler: cProfile.Profile) -> dict[str, Any]:
    stats = pstats.Stats(profiler)
    cum: dict[str, float] = {}
    for (filename, _line, func), (_cc, _nc, _tt, ct, _callers) in stats.stats.items():  # type: ignore[attr-defined]
        label = _PROFILE_FUNCS.get((Path(filename).name, func))
        if label:
            cum[label] = round(cum.get(label, 0.0) + ct, 2)
    stream = io.StringIO()
    stats.stream = stream  # type: ignore[attr-defined]
    stats.sort_stats("tottime").print_stats(15)
    top = [line.rstrip() for line in stream.getvalue().splitlines() if line.strip()][-16:]
    return {"cumulative_seconds": cum, "top_by_self_time": top}


# --------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    defaults = Settings(_env_file=None)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("data", nargs="?", type=Path, default=DEFAULT_DATA, help=f"Online Retail CSV (default {DEFAULT_DATA})")
    parser.add_argument(
        "--batch-size",
        type=int,
        default=defaults.batch_max_events,
        help="events per ingest batch (default settings.batch_max_events = %(default)s)",
    )
    parser.add_argument("--batch-sizes", type=str, default=None, help="sweep, e.g. 250,1000,5000 (overrides --batch-size)")
    parser.add_argument("--broker", choices=("tansu", "noida"), default=defaults.local_broker)
    parser.add_argument("--limit", type=int, default=None, help="replay only the first N events (default: all)")
    parser.add_argument("--baseline-events", type=int, default=20_000, help="at most this many events in the baseline")
    parser.add_argument("--baseline-seconds", type=float, default=25.0, help="stop the one-per-tx baseline after this long")
    parser.add_argument("--no-baseline", action="store_true")
    parser.add_argument("--no-db-raw", action="store_true", help="skip the graph DB's own rate on the same events")
    parser.add_argument("--warmup-events", type=int, default=1_000)
    parser.add_argument("--profile", action="store_true", help="one extra run under cProfile (reported separately)")
    parser.add_argument("--state-root", type=Path, default=None, help="where the temporary state dir goes (default: $TMPDIR)")
    parser.add_argument("--keep-state", action="store_true", help="do not delete the temporary state dir")
    parser.add_argument("--output", type=Path, default=None, help="also write the JSON here")
    args = parser.parse_args(argv)

    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("kafka").setLevel(logging.WARNING)
    logging.getLogger("neo4j").setLevel(logging.WARNING)
    logging.getLogger("streamer.ingest.step").setLevel(logging.WARNING)

    batch_sizes = [int(b) for b in args.batch_sizes.split(",")] if args.batch_sizes else [args.batch_size]
    data = online_retail.resolve(args.data)

    def terminate(signum, _frame):
        raise SystemExit(128 + signum)  # unwinds through the finally below: services are stopped

    signal.signal(signal.SIGTERM, terminate)

    result: dict[str, Any] = {
        "benchmark": "ingest",
        "data": os.path.relpath(data, Path(__file__).resolve().parents[1]),  # no machine's absolute path
        "command": command_line("bench/ingest.py", argv if argv is not None else sys.argv[1:]),
        "broker": args.broker,
        "graph_db": "arcadedb (arcadedb-embedded, Bolt)",
        "machine": machine(),
    }
    bench = Bench(args.broker, args.state_root, args.keep_state)
    try:
        broker = bench.start_broker()
        ensure_topics(broker.settings)
        log.info("replaying %s (%s)", data, "all events" if args.limit is None else f"first {args.limit} events")
        replay = load_online_retail(data, broker.settings, limit=args.limit, progress=False)
        result["replay"] = {
            "events": replay.events,
            "per_topic": replay.per_topic,
            "seconds": round(replay.elapsed_s, 2),
            "events_per_s": round(replay.events_per_s, 1),
            "note": "CSV parse + JSON encode + acks=all produce, one producer",
            "loader": replay.report.summary() if replay.report else None,
        }
        log.info("replayed %d events in %.1fs", replay.events, replay.elapsed_s)

        warm = wire_events(data, args.warmup_events) if args.warmup_events else []
        if not args.no_baseline:
            head_batch = args.batch_size if args.batch_size in batch_sizes else batch_sizes[0]
            result["baseline"] = baseline(bench, data, args, warm, head_batch)

        runs = []
        for i, batch in enumerate(batch_sizes):
            run = ingest_run(bench, batch, f"{batch}-{i}", warm)
            runs.append(run)
            log.info("batch %d: %d events in %.1fs = %.0f events/s", batch, run["events"], run["seconds"], run["events_per_s"])
        result["runs"] = runs
        if not args.no_db_raw:
            head_batch = args.batch_size if args.batch_size in batch_sizes else batch_sizes[0]
            raws = wire_events(data, args.limit if args.limit is not None else replay.events)
            result["db_raw"] = raw = db_raw(bench, raws, head_batch, warm)
            del raws
            for run in runs:
                run["ratio_to_db_raw"] = round(run["events_per_s"] / max(raw["events_per_s"], 1e-9), 3)
        if "baseline" in result:
            base = result["baseline"]["one_per_tx"]["events_per_s"]
            for run in runs:
                run["speedup_vs_one_per_tx"] = round(run["events_per_s"] / max(base, 1e-9), 1)
        # The headline is the run at --batch-size (the settings default) when the sweep has it, else
        # the first run: not the best of a sweep, which on a noisy machine would flatter.
        head = next((r for r in runs if r["batch_size"] == args.batch_size), runs[0])
        result["headline"] = {
            k: head[k]
            for k in ("batch_size", "events", "seconds", "events_per_s", "graph_mutations_per_s", "changes_published", "dlq")
        }
        result["headline"]["speedup_vs_one_per_tx"] = head.get("speedup_vs_one_per_tx")
        result["headline"]["ratio_to_db_raw"] = head.get("ratio_to_db_raw")
        result["headline"]["cpu_us_per_event"] = {
            k: (head["cpu"][k] or {}).get("cpu_us_per_event") for k in ("ingest_process", "graph_db_jvm", "broker")
        }
        if args.profile:
            result["profiled_run"] = ingest_run(bench, batch_sizes[0], f"profile-{batch_sizes[0]}", warm, profile=True)
        result["machine"]["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    finally:
        bench.close()

    text = json.dumps(result, indent=2)
    print(text)
    if args.output:
        args.output.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
