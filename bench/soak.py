"""Soak and fault harness: the pipeline long-lived under a sustained rate, with faults.

    python bench/soak.py [--minutes 30] [--rate 400] [--faults all | kind,kind,...] [--per-kind 2] [--calm-minutes 0]
                         [--data online-retail | sample] [--seed 1] [--out bench/results/soak.json]
                         [--plots docs/reliability]

Setup: the embedded services in a temporary state dir (noida-db by default, which persists,
so that the broker can restart at all, though it loses records it acknowledged when it
restarts under load, see ``lost`` below; ``--broker tansu`` keeps everything in memory and has
no ``restart_broker``; ArcadeDB), ``kg-streamer ingest`` and ``kg-streamer
embed`` as separate OS processes (static group membership, metrics served), and a producer in
this process that replays real data at ``--rate`` events/s with event times re-based to the
wall clock (the data set is cycled when it runs out: the next pass repeats its purchases at
newer times, as returning customers would).

The harness shares the machine with what it measures, so it keeps out of its way: every thread
of this process except the main one (the producer, the vector reader, the sampler, and the
Kafka clients' own threads) runs at nice ``HARNESS_NICE`` (``deprioritise_harness``), and the
reference graph DB starts only when the reference is built, after the run. In a deployment the
producers and the readers of kg.embeddings run on other machines; here they still use the same
two cores, but only CPU the pipeline, the broker and the graph DB leave idle. The main thread
stays at the default priority because it starts (and restarts) the processes under test, which
inherit its nice value. Freshness is not measured by this process's clock: ``source_ms`` is
the record timestamp the producer stamps when it sends, ``published_ms`` the worker's.

Faults, on a seeded schedule (``--per-kind`` of each kind, spread over the run after a
minute of warm-up): ``kill_ingest`` / ``kill_embed`` (kill -9, restarted 2 s later, as a
supervisor would), ``term_ingest`` / ``term_embed`` (SIGTERM: the exit time is measured
against ``TERM_BOUND_S`` and must be clean; restarted), ``kill_graph`` (kill -9 of the graph
DB, restarted 30 s later), ``restart_broker`` (stop and start of the broker), ``bad_burst``
(20 fuzzed bad messages mixed into the input topics).

Checks at the end, independent of the code under test:
* ``graph_equal``: the graph equals a reference graph built by a clean ingest of the same
  events (every input the broker acknowledged, in its order, produced to the same partitions
  of a fresh in-memory broker and ingested from the start into a second graph DB); both are
  exported over Bolt in a canonical form (every node and relationship with all properties);
* ``replica_equal``: the worker's replica equals the graph DB (``verify --against-graph``);
* ``vectors_ok``: the last vector per key on kg.embeddings equals a full recompute
  (``verify --against-topic``);
* ``dlq_found`` == ``dlq_expected``: every invalid message on kg.dlq exactly once (by source
  topic, partition and offset), none of the valid ones;
* ``lost``: nodes and relationships of the reference missing from the graph under test
  (``extra``: the other way round), leaving out those of entities whose input the broker
  lost: an acknowledged record missing from its log at the end, or one acknowledged at an
  offset the broker had acknowledged before for another record (it hands out lost offsets
  again; a consumer already past them never sees what lands there). Those are counted apart
  (``broker_lost_acknowledged``, ``broker_reused_offsets``,
  ``differences_on_entities_the_broker_lost_input_for``).

Reports: sustained rate, freshness (produce to published vector: ``published_ms -
source_ms`` of every record on kg.embeddings) p50/p99/max in steady state (the
``--calm-minutes`` before the first fault; without them, outside the minute after each fault),
between faults, and in the minute after each fault, the recovery time of each fault (until a vector of an input produced after
the fault is published within the freshness SLO), the maximum lag in seconds, CPU seconds per
event and the RSS of each process over time. ``--plots`` writes PNGs of lag and freshness over
time with the faults marked (docs/reliability.md shows them).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from devtools.datasets import online_retail
from devtools.local_services import LocalServices, free_port
from streamer.contracts.vectors import VectorRecord, decode_vector, timing
from streamer.kafka import paced_poll
from streamer.kafka.topics import ensure_topics, read_to_end
from streamer.settings import Settings

FAULT_KINDS = ("kill_ingest", "kill_embed", "term_ingest", "term_embed", "kill_graph", "restart_broker", "bad_burst")
TERM_BOUND_S = 30.0  # a SIGTERM must end the process (batch in hand finished) within this
SLO_S = 1.0  # freshness target: produce to published vector
GRAPH_DOWN_S = 30.0
AFTER_FAULT_S = 60.0  # "the minute after each fault"
WARMUP_S = 60.0
CATCH_UP_S = 10.0  # a producer that fell behind by up to this (its thread starved of CPU) sends the backlog
HARNESS_NICE = 10  # the harness's own threads: lower priority than the processes under test


def deprioritise_harness() -> None:
    """Give every thread of this process but the main one nice ``HARNESS_NICE`` (Linux: the
    nice value is per thread; threads started later inherit it from the thread that starts them,
    so this runs again every few seconds for the Kafka clients' threads). Raising one's own nice
    value needs no privilege."""
    main = os.getpid()  # the main thread's id is the process id
    try:
        tids = [int(t) for t in os.listdir(f"/proc/{main}/task")]
    except FileNotFoundError:  # not Linux: nothing to do
        return
    for tid in tids:
        if tid == main:
            continue
        try:
            if os.getpriority(os.PRIO_PROCESS, tid) < HARNESS_NICE:
                os.setpriority(os.PRIO_PROCESS, tid, HARNESS_NICE)
        except (ProcessLookupError, PermissionError):  # the thread ended meanwhile
            pass


def log(msg: str) -> None:
    print(f"[soak {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --- the input: real events, re-based to the wall clock ----------------------------------------
def source_events(data: str, settings: Settings) -> list[dict[str, Any]]:
    if data == "sample":
        path = ROOT / "data" / "sample" / "online_retail_sample.csv.gz"
    else:
        path = settings.data_dir / "online_retail" / "online_retail.csv.gz"
        if not path.exists():
            raise SystemExit(f"{path} is missing: set KGS_DATA_DIR, or use --data sample")
    return list(online_retail.events(path))


def rebased(events: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """The data set over and over, each event stamped with the time it is sent (epoch ms). From
    the second pass on, users are new ones (``~<pass>`` appended to their ids): a pass that
    repeated the same purchases would change nothing in the graph and move no vector, so
    freshness could not be measured past the first pass (16.5 minutes of Online Retail at
    400 events/s)."""
    cycle = 0
    while True:
        for e in events:
            event = {**e, "ts": int(time.time() * 1000)}
            if cycle and "user_id" in event:
                event["user_id"] = f"{event['user_id']}~{cycle}"
            yield event
        cycle += 1


def route(event: dict[str, Any], s: Settings) -> tuple[str, bytes]:
    if event["type"] == "product":
        return s.topic_products, event["id"].encode()
    if event["type"] == "interaction":
        return s.topic_interactions, event["user_id"].encode()
    return s.topic_relations, event["src"]["id"].encode()


def bad_messages(rng: random.Random, n: int) -> list[bytes]:
    """Invalid messages of the families a producer sends by mistake (each must be dead-lettered)."""
    families = [
        lambda: b"[" * rng.randint(2000, 6000) + b"]" * 10,
        lambda: bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 200))) + b"\xff",
        lambda: b'{"type":"product","id":"x","ts":1,"price":NaN}',
        lambda: b'{"type":"product","id":"x","ts":1,"version":' + str(2**64 + rng.randint(0, 99)).encode() + b"}",
        lambda: b'{"type":"product","id":"\\udc80","ts":1}',
        lambda: b'{"type":"interaction","user_id":"u","product_id":"p","action":"steal","ts":1}',
        lambda: b'{"type":"product","id":"big","ts":1,"title":"' + b"y" * 600_000 + b'"}',
        lambda: b"",
        lambda: b"null",
    ]
    return [rng.choice(families)() for _ in range(n)]


class Producer:
    """Sends events at ``rate`` per second (token bucket), each one until the broker acknowledges
    it (a send that fails while the broker restarts is sent again), on a thread."""

    def __init__(self, settings: Settings, events: list[dict[str, Any]], rate: float):
        from kafka import KafkaProducer

        self.settings = settings
        self.source = rebased(events)
        self.rate = rate
        self.producer = KafkaProducer(
            bootstrap_servers=settings.bootstrap_servers,
            acks="all",
            linger_ms=5,
            max_in_flight_requests_per_connection=1,
            retries=10,
            request_timeout_ms=15_000,
            max_request_size=2 << 20,
            reconnect_backoff_max_ms=2000,
        )
        self.sent = 0
        self.acked = 0
        self.resent = 0
        self.stop_flag = threading.Event()
        self.retry: list[tuple[str, bytes | None, bytes]] = []
        self.acks: list[tuple[str, int, int, bytes]] = []  # what the broker acknowledged, and where
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self._run, name="producer", daemon=True)

    def start(self) -> Producer:
        self.started = time.monotonic()
        self.thread.start()
        return self

    def send(self, topic: str, key: bytes | None, value: bytes) -> None:
        future = self.producer.send(topic, key=key, value=value)

        def ok(meta: Any) -> None:
            with self.lock:
                self.acked += 1
                self.acks.append((meta.topic, meta.partition, meta.offset, value))

        def failed(_exc: BaseException) -> None:
            with self.lock:
                self.retry.append((topic, key, value))
                self.resent += 1

        future.add_callback(ok)
        future.add_errback(failed)

    def _run(self) -> None:
        interval = 1.0 / self.rate
        next_at = time.monotonic()
        while not self.stop_flag.is_set():
            with self.lock:
                again, self.retry = self.retry, []
            for topic, key, value in again:
                self.send(topic, key, value)
            now = time.monotonic()
            if now < next_at:
                time.sleep(min(next_at - now, 0.01))
                continue
            event = next(self.source)
            topic, key = route(event, self.settings)
            self.send(topic, key, json.dumps(event, separators=(",", ":")).encode())
            self.sent += 1
            next_at += interval
            if now - next_at > CATCH_UP_S:  # fell far behind (a long stall): do not burst
                next_at = now

    def stop(self) -> None:
        self.stop_flag.set()
        self.thread.join(30)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            self.producer.flush(timeout=30)
            with self.lock:
                again, self.retry = self.retry, []
            if not again:
                break
            for topic, key, value in again:
                self.send(topic, key, value)
        self.producer.close(timeout=10)


# --- observation: vectors, lag, processes ---------------------------------------------------
class VectorWatch:
    """Reads kg.embeddings from the start (no group) and records, per vector record that is the
    first to cover its input, the time it arrived and its freshness (``published_ms -
    source_ms``). A record whose ``source_ms`` is not newer than one already seen for the same
    key is a re-publication (a replay after a crash, a refused commit, or inputs the broker
    handed out again after losing their commits): the input already had a vector, so it is
    counted in ``republished`` and not as freshness (so is a record read again after the
    watch reconnects to a restarted broker; ``records`` and ``bytes`` count those twice)."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.points: list[tuple[float, float, float]] = []  # (arrival unix s, source unix s, freshness s)
        self.covered: dict[str, int] = {}  # key -> newest source_ms a published vector carried
        self.republished = 0
        self.records = 0
        self.bytes = 0
        self.last: dict[str, VectorRecord] = {}  # the last record per key: what compaction keeps
        self.at_end = False
        self.stop_flag = threading.Event()
        self.thread = threading.Thread(target=self._run, name="vectors", daemon=True)

    def start(self) -> VectorWatch:
        self.thread.start()
        return self

    def _run(self) -> None:
        from kafka import KafkaConsumer
        from kafka.structs import TopicPartition

        consumer = None
        while not self.stop_flag.is_set():
            try:
                if consumer is None:
                    consumer = KafkaConsumer(
                        bootstrap_servers=self.settings.bootstrap_servers,
                        group_id=None,
                        enable_auto_commit=False,
                        fetch_max_bytes=16 << 20,
                    )
                    parts = consumer.partitions_for_topic(self.settings.topic_embeddings) or set()
                    tps = [TopicPartition(self.settings.topic_embeddings, p) for p in sorted(parts)]
                    consumer.assign(tps)
                    consumer.seek_to_beginning(*tps)
                polled = paced_poll.poll(consumer, 500, self.settings.idle_fetch_interval_s)
                if not polled:
                    self.at_end = all(
                        (hw := consumer.highwater(tp)) is not None and consumer.position(tp) >= hw for tp in consumer.assignment()
                    )
                for records in polled.values():
                    now = time.time()
                    for r in records:
                        self.records += 1
                        self.bytes += len(r.value or b"") + len(r.key or b"")
                        self.last[r.key.decode()] = decode_vector(r.key, r.value, r.headers)
                        if r.value is None:
                            continue
                        source_ms, published_ms = timing(r.value)
                        if source_ms and published_ms:
                            key = r.key.decode()
                            if source_ms <= self.covered.get(key, 0):
                                self.republished += 1
                                continue
                            self.covered[key] = source_ms
                            self.points.append((now, source_ms / 1000, (published_ms - source_ms) / 1000))
            except Exception as exc:  # the broker restarts under it: reconnect  # noqa: BLE001
                log(f"vector watch: {type(exc).__name__}: {exc}")
                time.sleep(1)
        if consumer is not None:
            consumer.close()

    def stop(self) -> None:
        self.stop_flag.set()
        self.thread.join(30)


def proc_stats(pid: int) -> tuple[float, float] | None:
    """(cpu seconds, rss MiB) of a process from /proc, None when it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        status = Path(f"/proc/{pid}/status").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    ticks = os.sysconf("SC_CLK_TCK")
    cpu = (int(stat[11]) + int(stat[12])) / ticks
    rss = next((int(line.split()[1]) / 1024 for line in status.splitlines() if line.startswith("VmRSS:")), 0.0)
    return cpu, rss


@dataclass
class Sampler:
    """Every few seconds: the groups' lag in seconds (from the broker) and each process's CPU
    and RSS. CPU of a process that restarts is summed over its lives."""

    settings: Settings
    processes: dict[str, Any]  # name -> callable returning the pid now (or None)
    interval_s: float = 5.0
    lag: list[tuple[float, str, float]] = field(default_factory=list)  # (unix s, group, lag seconds)
    rss: list[tuple[float, str, float]] = field(default_factory=list)
    cpu_done: dict[str, float] = field(default_factory=dict)  # finished lives
    cpu_live: dict[tuple[str, int], float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.stop_flag = threading.Event()
        self.thread = threading.Thread(target=self._run, name="sampler", daemon=True)

    def start(self) -> Sampler:
        self.thread.start()
        return self

    def _run(self) -> None:
        from streamer.groups.lag import LagSampler, pipeline_groups

        sampler: LagSampler | None = None
        groups = pipeline_groups(self.settings)
        while not self.stop_flag.is_set():
            deprioritise_harness()
            now = time.time()
            for name, pid_of in self.processes.items():
                pid = pid_of()
                stats = proc_stats(pid) if pid else None
                if stats is not None:
                    self.cpu_live[(name, pid)] = stats[0]
                    self.rss.append((now, name, stats[1]))
            try:
                sampler = sampler or LagSampler(self.settings.bootstrap_servers)
                for g in sampler.sample(groups):
                    seconds = g.lag_seconds
                    if seconds is not None:
                        self.lag.append((now, g.group, seconds))
            except Exception:  # noqa: BLE001 - the broker restarts under it
                if sampler is not None:
                    sampler.close()
                sampler = None
            self.stop_flag.wait(self.interval_s)
        if sampler is not None:
            sampler.close()

    def cpu_seconds(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for (name, _pid), cpu in self.cpu_live.items():
            out[name] = out.get(name, 0.0) + cpu
        return out

    def stop(self) -> None:
        self.stop_flag.set()
        self.thread.join(30)


# --- the consumers as OS processes ------------------------------------------------------------
class Consumer:
    """``python -m streamer.cli <command>`` as a child process with the run's settings."""

    def __init__(self, command: str, settings: Settings, log_dir: Path, instance: str):
        self.command = command
        self.settings = settings.model_copy(update={"group_instance_id": instance, "metrics_addr": f"127.0.0.1:{free_port()}"})
        self.log_dir = log_dir
        self.proc: subprocess.Popen[bytes] | None = None
        self.lives = 0

    def start(self) -> None:
        self.lives += 1
        out = open(self.log_dir / f"{self.command}.{self.lives}.log", "wb")
        env = {**os.environ, **self.settings.to_env(), "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "streamer.cli", self.command], cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT
        )

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None and self.proc.poll() is None else None

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)

    def terminate(self) -> tuple[float, int]:
        """SIGTERM; (seconds to exit, exit code)."""
        assert self.proc is not None
        began = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(TERM_BOUND_S * 4)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait(30)
        return time.monotonic() - began, rc


# --- the run ------------------------------------------------------------------------------
def schedule(kinds: list[str], per_kind: int, minutes: float, seed: int, calm_minutes: float = 0.0) -> list[tuple[float, str]]:
    """Fault times: a minute of warm-up (a quarter of a short run), or ``calm_minutes`` without
    faults (the steady state), then evenly spaced slots in a seeded order, ending two minutes
    before the end (one in a run under 10 minutes) so that the last one can recover: a consumer
    restart can take ~40 s on noida-db (start-up, then a rejoin that may need the client
    rebuild after ``consumer_stall_s``)."""
    rng = random.Random(seed)
    faults = [k for k in kinds for _ in range(per_kind)]
    rng.shuffle(faults)
    start = max(min(WARMUP_S, minutes * 60 / 4), calm_minutes * 60)
    end = minutes * 60 - (120 if minutes >= 10 else max(60.0, minutes * 60 / 4))
    step = (end - start) / max(len(faults), 1)
    return [(start + (i + 0.5) * step, kind) for i, kind in enumerate(faults)]


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    return round(s[min(len(s) - 1, int(round(q / 100 * (len(s) - 1))))], 3)


VERSION_COUNTERS = ("rev", "gen")  # sinks/cypher.py: they count the writing transactions


def canonical_graph(settings: Settings) -> tuple[set[str], set[str]]:
    """Every node and relationship with all its properties, as canonical JSON strings; the
    version counters ``rev`` and ``gen`` are left out (they count the transactions that wrote
    an entity, which depend on batching and on faults, not on the state the events describe)."""
    from sinks.graph_db import open_driver

    def norm(props: dict[str, Any]) -> str:
        return json.dumps({k: v for k, v in props.items() if k not in VERSION_COUNTERS}, sort_keys=True, default=str)

    nodes: set[str] = set()
    rels: set[str] = set()
    with open_driver(settings, timeout_s=60) as driver, driver.session(database=settings.bolt_database) as session:
        for r in session.run("MATCH (n) RETURN labels(n)[0] AS label, properties(n) AS props"):
            nodes.add(f"{r['label']} {norm(r['props'])}")
        for r in session.run(
            "MATCH (a)-[r]->(b) RETURN labels(a)[0] AS al, a.id AS a, type(r) AS t, labels(b)[0] AS bl, b.id AS b, "
            "properties(r) AS props"
        ):
            rels.add(f"{r['al']}:{r['a']} -{r['t']}-> {r['bl']}:{r['b']} {norm(r['props'])}")
    return nodes, rels


def read_log(
    settings: Settings, topics: list[str], stall_s: float = 60.0
) -> tuple[dict[tuple[str, int, int], bytes], dict[str, int]]:
    """Every record the broker still serves on ``topics``, by (topic, partition, offset), and
    the partitions it stopped serving: a partition whose position does not move for ``stall_s``
    below its high watermark is given up at that position (noida-db, after unclean restarts,
    can answer fetches of its early offsets with nothing, for ever), as ``"topic/p": offset``."""
    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(
        bootstrap_servers=settings.bootstrap_servers, group_id=None, enable_auto_commit=False, fetch_max_bytes=32 << 20
    )
    out: dict[tuple[str, int, int], bytes] = {}
    unreadable: dict[str, int] = {}
    try:
        consumer.topics()
        tps = [TopicPartition(t, p) for t in topics for p in sorted(consumer.partitions_for_topic(t) or ())]
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
        moved = {tp: time.monotonic() for tp in tps}
        active = set(tps)
        while active:
            for tp, records in consumer.poll(timeout_ms=500).items():
                moved[tp] = time.monotonic()
                for r in records:
                    out[(r.topic, r.partition, r.offset)] = r.value
            for tp in list(active):
                hw, pos = consumer.highwater(tp), consumer.position(tp)
                if hw is not None and pos >= hw:
                    active.discard(tp)
                elif time.monotonic() - moved[tp] > stall_s:
                    unreadable[f"{tp.topic}/{tp.partition}"] = pos
                    consumer.pause(tp)
                    active.discard(tp)
        return out, unreadable
    finally:
        consumer.close()


def broker_losses(settings: Settings, acks: list[tuple[str, int, int, bytes]]) -> dict[str, Any]:
    """What unclean broker restarts did to the inputs: the acknowledged inputs that are not in
    its log now (``lost``), the offsets it acknowledged twice, for two records (it hands lost
    offsets out again, so a consumer already past them never sees the new record, and the old
    one is gone: both are counted in ``reused``), the acknowledged inputs at offsets it no
    longer serves (``unverified``: not counted as lost, a loss there shows as a reused offset
    when later records arrive), and the ids of the entities lost and reused records touch."""
    log_now, unreadable = read_log(settings, settings.input_topics)
    lost: list[bytes] = []
    unverified = 0
    for topic, partition, offset, value in acks:
        stuck_at = unreadable.get(f"{topic}/{partition}")
        if stuck_at is not None and offset >= stuck_at:
            unverified += 1
        elif log_now.get((topic, partition, offset)) != value:
            lost.append(value)
    by_offset: dict[tuple[str, int, int], list[bytes]] = {}
    for topic, partition, offset, value in acks:
        by_offset.setdefault((topic, partition, offset), []).append(value)
    reused = [v for values in by_offset.values() if len(values) > 1 for v in values]
    ids: set[str] = set()
    for value in lost + reused:
        try:
            event = json.loads(value)
        except ValueError:
            continue
        if not isinstance(event, dict):
            continue
        for name, label in (("id", "Product"), ("user_id", "User"), ("product_id", "Product")):
            if name in event:
                ids.add(f"{label}:{event[name]}")
        for end in ("src", "dst"):
            node = event.get(end)
            if isinstance(node, dict):
                ids.add(f"{node.get('label')}:{node.get('id')}")
    return {
        "lost": len(lost),
        "reused": sum(len(v) - 1 for v in by_offset.values() if len(v) > 1),
        "unverified": unverified,
        "unreadable_partitions": unreadable,
        "entity_ids": ids,
    }


def reference_graph(services: LocalServices, ref: Settings, acks: list[tuple[str, int, int, bytes]]) -> Any:
    """A clean run of the same events: every input the broker acknowledged, in the order it
    acknowledged them, produced to the same partitions of a fresh in-memory broker, ingested
    by one consumer from the start into a second graph DB. The reference never reads the
    broker under test (whose log an unclean restart can leave partly unreadable)."""
    from kafka import KafkaProducer

    from streamer.ingest.step import ingest_consumer

    services.up(("broker", "graph"))
    ensure_topics(ref)
    producer = KafkaProducer(
        bootstrap_servers=ref.bootstrap_servers,
        acks="all",
        linger_ms=20,
        max_in_flight_requests_per_connection=1,
        max_request_size=2 << 20,
    )
    for topic, partition, _offset, value in acks:
        producer.send(topic, value=value, partition=partition)
    producer.flush(timeout=600)
    producer.close(timeout=10)
    stats = ingest_consumer(ref).run(until_caught_up=True, max_seconds=1800)
    services.down(("broker",))
    return stats


def entity_ids(line: str) -> set[str]:
    """The node keys (``Label:id``) a canonical node or relationship line (``canonical_graph``)
    is about (ids with spaces, such as category paths, are not parsed: Online Retail has none)."""
    if " -" in line and "-> " in line:
        head, _, rest = line.partition(" -")
        return {head, rest.partition("-> ")[2].split(" ", 1)[0]}
    label, _, props = line.partition(" ")
    return {f"{label}:{json.loads(props).get('id')}"}


def read_dlq(settings: Settings) -> list[tuple[str, int, int]]:
    """(source topic, partition, offset) of every record on kg.dlq."""
    out: list[tuple[str, int, int]] = []
    for r in read_to_end(settings, settings.topic_dlq):
        h = dict(r.headers)
        out.append(
            (h["__connect.errors.topic"].decode(), int(h["__connect.errors.partition"]), int(h["__connect.errors.offset"]))
        )
    return out


def wait_for_members(settings: Settings, timeout_s: float) -> None:
    """Until the ingest and embed groups each have a live member."""
    from streamer.groups.lag import LagSampler

    sampler = LagSampler(settings.bootstrap_servers)
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            try:
                if all(sampler.describe(g)[1] for g in (settings.ingest_group, settings.embed_group)):
                    return
            except Exception:  # noqa: BLE001 - not up yet
                sampler.close()
            time.sleep(1)
        raise TimeoutError("the consumers did not join their groups")
    finally:
        sampler.close()


def wait_caught_up(settings: Settings, timeout_s: float) -> bool:
    from streamer.groups.lag import LagSampler, pipeline_groups

    sampler = LagSampler(settings.bootstrap_servers)
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            try:
                sample = sampler.sample(pipeline_groups(settings))
                if all(g.lag_messages == 0 for g in sample):
                    return True
            except Exception:  # noqa: BLE001
                sampler.close()
            time.sleep(2)
        return False
    finally:
        sampler.close()


def run(args: argparse.Namespace) -> dict[str, Any]:
    import tempfile

    rng = random.Random(args.seed)
    root = Path(tempfile.mkdtemp(prefix="kgs-soak-"))
    logs = root / "logs"
    logs.mkdir()
    base = Settings(
        _env_file=None,
        state_dir=root / "state",
        local_broker=args.broker,
        bootstrap_servers=f"127.0.0.1:{free_port()}",
        bolt_uri=f"bolt://127.0.0.1:{free_port()}",
        arcadedb_http_port=free_port(),
        session_timeout_ms=6000,
        heartbeat_interval_ms=1000,
        metrics_addr="",
        torch_threads=1,
        **({"vector_encoding": args.encoding} if args.encoding else {}),
        **({"embed_mode": args.mode} if args.mode else {}),
    )
    services = LocalServices(base)
    ref = base.model_copy(
        update={
            "state_dir": root / "ref",
            "local_broker": "tansu",
            "bootstrap_servers": f"127.0.0.1:{free_port()}",
            "bolt_uri": f"bolt://127.0.0.1:{free_port()}",
            "arcadedb_http_port": free_port(),
        }
    )
    ref_graph = LocalServices(ref)
    kinds = list(FAULT_KINDS) if args.faults == "all" else [k for k in args.faults.split(",") if k]
    if args.broker == "tansu" and "restart_broker" in kinds:
        raise SystemExit("tansu keeps everything in memory: a restart loses the topics; use --broker noida")
    plan = schedule(kinds, args.per_kind, args.minutes, args.seed, args.calm_minutes)
    report: dict[str, Any] = {
        "rate_eps": args.rate,
        "minutes": args.minutes,
        "calm_minutes": args.calm_minutes,
        "data": args.data,
        "seed": args.seed,
    }
    ingest = Consumer("ingest", base, logs, "soak-ingest-0")
    embed = Consumer("embed", base, logs, "soak-embed-0")
    try:
        log(f"services up in {root}")
        services.up()
        ensure_topics(base)
        events = source_events(args.data, base)
        log(f"{len(events):,} source events; faults {plan}")
        ingest.start()
        embed.start()
        wait_for_members(base, 180)  # both consumers joined (the worker has loaded its models)
        watch = VectorWatch(base).start()

        def graph_pid() -> int | None:
            return services.pid("graph")

        sampler = Sampler(
            base,
            {
                "ingest": lambda: ingest.pid,
                "embed": lambda: embed.pid,
                "graph_db": graph_pid,
                "broker": lambda: services.pid("broker"),
            },
        ).start()
        producer = Producer(base, events, args.rate).start()
        t0 = time.time()
        faults: list[dict[str, Any]] = []
        dlq_expected = 0
        for at_s, kind in plan:
            while time.time() - t0 < at_s:
                time.sleep(0.2)
            fault: dict[str, Any] = {"kind": kind, "at_s": round(time.time() - t0, 1)}
            log(f"fault {kind} at {fault['at_s']} s")
            if kind == "kill_ingest":
                ingest.kill()
                time.sleep(2)
                ingest.start()
            elif kind == "kill_embed":
                embed.kill()
                time.sleep(2)
                embed.start()
            elif kind in ("term_ingest", "term_embed"):
                target = ingest if kind == "term_ingest" else embed
                exit_s, rc = target.terminate()
                fault.update(exit_s=round(exit_s, 2), exit_code=rc, exit_within_bound=exit_s <= TERM_BOUND_S and rc == 0)
                target.start()
            elif kind == "kill_graph":
                pid = graph_pid()
                if pid:
                    os.killpg(pid, signal.SIGKILL)
                time.sleep(GRAPH_DOWN_S)
                services.up(("graph",))
            elif kind == "restart_broker":
                services.down(("broker",))
                services.up(("broker",))
            elif kind == "bad_burst":
                for raw in bad_messages(rng, 20):
                    producer.send(rng.choice(base.input_topics), None, raw)
                dlq_expected += 20
            faults.append(fault)
        while time.time() - t0 < args.minutes * 60:
            time.sleep(0.5)
        producer.stop()
        duration = time.time() - t0
        fresh = freshness_report(watch.points, faults, t0, duration, args.calm_minutes)
        log(
            f"freshness p50 {fresh['freshness_p50_s']} s, p99 {fresh['freshness_p99_s']} s, max {fresh['freshness_max_s']} s; "
            f"{watch.records:,} vector records, {watch.bytes / 1e6:.1f} MB"
        )
        log(f"produced {producer.acked:,} events in {duration:.0f} s; waiting for the pipeline to catch up")
        report.update(fresh, events_produced=producer.acked, faults=faults, checks="not run yet")
        write_report(report, args.out)  # what the run measured, kept if a check below fails
        (root / "series.json").write_text(json.dumps({"t0": t0, "vectors": watch.points, "lag": sampler.lag}))
        caught_up = wait_caught_up(base, 600)
        time.sleep(5)
        stages = {c.command: stage_means(c) for c in (ingest, embed)}
        ingest_exit = ingest.terminate()
        embed_exit = embed.terminate()
        sampler.stop()

        log(f"reference: the {len(producer.acks):,} acknowledged inputs, ingested cleanly into a second broker and graph DB")
        from streamer.embed.verify import verify

        ref_stats = reference_graph(ref_graph, ref, producer.acks)
        got_nodes, got_rels = canonical_graph(base)
        want_nodes, want_rels = canonical_graph(ref)
        losses = broker_losses(base, producer.acks)
        lost_ids = losses["entity_ids"]
        missing = (want_nodes - got_nodes) | (want_rels - got_rels)
        extra = (got_nodes - want_nodes) | (got_rels - want_rels)
        # differences on entities whose acknowledged input the broker lost are the broker's
        # (the pipeline read some of those inputs before they vanished from the log)
        broker_missing = {x for x in missing if entity_ids(x) & lost_ids}
        broker_extra = {x for x in extra if entity_ids(x) & lost_ids}
        missing -= broker_missing
        extra -= broker_extra
        first_audit = verify(base, against_graph=True, repair=True)
        repaired = first_audit["graph"].get("repair_changes_published", 0)
        if repaired:  # the broker lost changelog records: the worker applies the repair, then audit again
            log(f"replica differs from the graph ({first_audit['graph']}); {repaired} repair changes published")
            from streamer.embed.worker import embed_consumer

            # as the worker's own static member: a new dynamic member would wait for the stopped
            # one to rejoin (noida never evicts it), a replacement takes its place at once
            embed_consumer(embed.settings.model_copy(update={"metrics_addr": ""})).run(until_caught_up=True, max_seconds=600)
        watch.at_end = False
        deadline = time.monotonic() + 900
        while not watch.at_end and time.monotonic() < deadline:  # the watch has read every vector
            time.sleep(1)
        watch.stop()
        audit = verify(base, against_topic=True, against_graph=True, topic_vectors=watch.last)
        dlq = read_dlq(base)
        report.update(
            events_produced=producer.acked,
            sends_retried=producer.resent,
            rate_sustained_eps=round(producer.acked / duration, 1),
            caught_up=caught_up,
            faults=faults,
            broker_lost_acknowledged=losses["lost"],
            broker_reused_offsets=losses["reused"],
            broker_unverified_acknowledged=losses["unverified"],
            broker_unreadable_partitions=losses["unreadable_partitions"],
            differences_on_entities_the_broker_lost_input_for=len(broker_missing | broker_extra),
            lost=len(missing),
            extra=len(extra),
            lost_examples=sorted(missing)[:5],
            extra_examples=sorted(extra)[:5],
            graph_nodes=len(got_nodes),
            graph_relationships=len(got_rels),
            graph_equal=not missing and not extra,
            replica_equal=bool(audit.get("graph", {}).get("ok")),
            replica_equal_before_repair=bool(first_audit["graph"]["ok"]),
            replica_repair_changes=repaired,
            replica_differences_before_repair={
                k: v for k, v in first_audit["graph"].items() if k.endswith(("_graph", "_replica"))
            },
            vectors_ok=bool(
                audit["rows_over_tol"] == 0
                and audit.get("topic", {}).get("keys_stale") == 0
                and audit["topic"]["keys_missing"] == 0
                and audit["topic"]["deleted_without_tombstone"] == 0
            ),
            verify=audit,
            dlq_expected=dlq_expected,
            dlq_found=len(dlq),
            dlq_distinct=len(set(dlq)),
            dlq_reference=ref_stats.dead_letters,
            final_exits={"ingest": list(ingest_exit), "embed": list(embed_exit)},
            checks="done",
        )
        report.update(freshness_report(watch.points, faults, t0, duration, args.calm_minutes))
        report["stages_mean_s"] = stages
        report.update(
            vector_records=watch.records,
            vector_records_republished=watch.republished,
            vector_megabytes=round(watch.bytes / 1e6, 1),
            vector_encoding=base.vector_encoding,
            embed_mode=base.embed_mode,
            publish_threshold=base.embed_publish_threshold,
        )
        lag_max = {g: max((v for _, gg, v in sampler.lag if gg == g), default=None) for g in {g for _, g, _ in sampler.lag}}
        report["lag_max_s"] = {g: round(v, 2) if v is not None else None for g, v in lag_max.items()}
        cpu = sampler.cpu_seconds()
        report["cpu_s"] = {k: round(v, 1) for k, v in cpu.items()}
        report["cpu_ms_per_event"] = {k: round(1000 * v / max(producer.acked, 1), 3) for k, v in cpu.items()}
        report["rss_mib"] = rss_report(sampler.rss, t0)
        write_report(report, args.out)  # before the plots: a failure there must not cost the run
        if args.plots:
            try:
                plot(args.plots, watch.points, sampler.lag, faults, t0, base)
            except Exception as exc:  # noqa: BLE001 - the report is written; say why there is no plot
                log(f"no plot: {type(exc).__name__}: {exc}")
                report["plot_error"] = f"{type(exc).__name__}: {exc}"
                write_report(report, args.out)
        return report
    finally:
        for c in (ingest, embed):
            if c.pid:
                c.proc.kill()  # type: ignore[union-attr]
        services.down()
        ref_graph.down()
        if not args.keep:
            import shutil

            shutil.rmtree(root, ignore_errors=True)


def freshness_report(
    points: list[tuple[float, float, float]],
    faults: list[dict[str, Any]],
    t0: float,
    duration: float,
    calm_minutes: float = 0.0,
) -> dict[str, Any]:
    """Steady state (``freshness_*``): records of inputs produced after the warm-up and before
    the first fault when the run has ``calm_minutes``; otherwise outside the minute after any
    fault. Between faults (``freshness_between_faults_*``): inputs produced outside the minute
    after any fault, once faults have begun. After a fault: inputs produced in the minute after
    it. Recovery: the first vector of an input produced after the fault that is published
    within the SLO."""
    points = [p for p in points if p[1] <= t0 + duration]  # inputs produced during the run
    warm = min(WARMUP_S, duration / 4)
    windows = [
        (t0 + f["at_s"], t0 + f["at_s"] + AFTER_FAULT_S + (GRAPH_DOWN_S if f["kind"] == "kill_graph" else 0)) for f in faults
    ]
    first_fault = min((a for a, _ in windows), default=t0 + duration)
    between = [fr for _, src, fr in points if src >= max(t0 + warm, first_fault) and not any(a <= src < b for a, b in windows)]
    if calm_minutes > 0:
        steady = [fr for _, src, fr in points if t0 + warm <= src < first_fault]
    else:
        steady = [fr for _, src, fr in points if src >= t0 + warm and not any(a <= src < b for a, b in windows)]
    out: dict[str, Any] = {
        "vector_records": len(points),
        "freshness_p50_s": percentile(steady, 50),
        "freshness_p99_s": percentile(steady, 99),
        "freshness_max_s": round(max(steady), 3) if steady else None,
        "freshness_steady_samples": len(steady),
        "freshness_steady_window_s": [round(warm, 1), round(first_fault - t0, 1)] if calm_minutes > 0 else None,
        "freshness_between_faults_p50_s": percentile(between, 50),
        "freshness_between_faults_p99_s": percentile(between, 99),
        "freshness_between_faults_samples": len(between),
    }
    by_minute = []
    for m in range(int(duration // 60) + 1):
        inside = [fr for _, src, fr in points if t0 + 60 * m <= src < t0 + 60 * (m + 1)]
        by_minute.append({"minute": m, "p50_s": percentile(inside, 50), "p99_s": percentile(inside, 99), "n": len(inside)})
    out["freshness_by_minute"] = by_minute
    for f, (a, b) in zip(faults, windows, strict=True):
        inside = [fr for _, src, fr in points if a <= src < b]
        f["freshness_p50_s"], f["freshness_p99_s"] = percentile(inside, 50), percentile(inside, 99)
        f["freshness_max_s"] = round(max(inside), 3) if inside else None
        recovered = [arr for arr, src, fr in points if src >= a and fr <= SLO_S]
        f["recovered_s"] = round(min(recovered) - a, 1) if recovered else None
    return out


def stage_means(consumer: Consumer) -> dict[str, Any]:
    """Mean seconds per batch in each stage, batch size, and the ingest side's freshness (input
    to graph commit), from the process's own /metrics (this life of it)."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    try:
        with urllib.request.urlopen(f"http://{consumer.settings.metrics_addr}/metrics", timeout=10) as response:
            text = response.read().decode()
    except OSError as exc:
        return {"error": str(exc)}
    sums: dict[str, float] = {}
    counts: dict[str, float] = {}
    buckets: dict[str, dict[float, float]] = {}  # stage -> le -> cumulative count
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "kgs_stage_duration_seconds_bucket":
                le = float(s.labels["le"])
                by_le = buckets.setdefault(s.labels["stage"], {})
                by_le[le] = by_le.get(le, 0.0) + s.value
            elif s.name in ("kgs_stage_duration_seconds_sum", "kgs_stage_duration_seconds_count"):
                bucket = sums if s.name.endswith("_sum") else counts
                bucket[s.labels["stage"]] = bucket.get(s.labels["stage"], 0.0) + s.value
            elif s.name in (
                "kgs_batch_events_sum",
                "kgs_batch_events_count",
                "kgs_freshness_graph_seconds_sum",
                "kgs_freshness_graph_seconds_count",
            ):
                sums[s.name] = sums.get(s.name, 0.0) + s.value
    out: dict[str, Any] = {stage: round(sums[stage] / counts[stage], 4) for stage in counts if counts[stage]}
    # the tail of each stage: the histogram bucket that holds its 99th percentile (an upper
    # bound), and how many batches spent at least half a second in it
    out["p99_at_most_s"] = {}
    out["batches_over_0.5s"] = {}
    for stage, by_le in buckets.items():
        total = by_le.get(float("inf"), 0.0)
        if not total:
            continue
        le99 = min(le for le, c in by_le.items() if c >= 0.99 * total)
        out["p99_at_most_s"][stage] = le99 if le99 != float("inf") else None  # None: above the last bucket
        out["batches_over_0.5s"][stage] = int(total - by_le.get(0.5, total))
    if sums.get("kgs_batch_events_count"):
        out["batch_events"] = round(sums["kgs_batch_events_sum"] / sums["kgs_batch_events_count"], 1)
        out["batches"] = int(sums["kgs_batch_events_count"])
    if sums.get("kgs_freshness_graph_seconds_count"):
        out["input_to_graph_commit_s"] = round(
            sums["kgs_freshness_graph_seconds_sum"] / sums["kgs_freshness_graph_seconds_count"], 4
        )
    return out


def rss_report(rss: list[tuple[float, str, float]], t0: float) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in sorted({n for _, n, _ in rss}):
        series = [(t - t0, v) for t, n, v in rss if n == name]
        if not series:
            continue
        by_minute: dict[int, float] = {}
        for t, v in series:
            by_minute[int(t // 60)] = max(by_minute.get(int(t // 60), 0.0), v)
        out[name] = {
            "first": round(series[0][1]),
            "max": round(max(v for _, v in series)),
            "last": round(series[-1][1]),
            "max_by_minute": [round(by_minute[m]) for m in sorted(by_minute)],
        }
    return out


def plot(
    out_dir: str,
    points: list[tuple[float, float, float]],
    lag: list[tuple[float, str, float]],
    faults: list[dict[str, Any]],
    t0: float,
    settings: Settings,
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(11, 6.5), sharex=True)
    for group in sorted({g for _, g, _ in lag}):
        series = [(t - t0, v) for t, g, v in lag if g == group]
        ax1.plot([s[0] / 60 for s in series], [s[1] for s in series], label=group, linewidth=1)
    ax1.set_ylabel("consumer lag (s)")
    ax1.set_yscale("symlog", linthresh=1)
    ax1.legend(loc="upper right")
    xs = [(src - t0) / 60 for _, src, _ in points]
    ax2.scatter(xs, [fr for _, _, fr in points], s=1, alpha=0.3)
    ax2.axhline(SLO_S, color="green", linestyle="--", linewidth=1, label="SLO 1 s")
    ax2.set_yscale("log")
    ax2.set_ylabel("freshness: produce -> vector (s)")
    ax2.set_xlabel("minutes into the run (input produced at)")
    ax2.legend(loc="upper right")
    for ax in (ax1, ax2):
        for f in faults:
            ax.axvline(f["at_s"] / 60, color="red", alpha=0.4, linewidth=1)
    for f in faults:
        ax1.annotate(f["kind"], (f["at_s"] / 60, 1), rotation=90, fontsize=7, color="red", va="bottom")
    fig.tight_layout()
    fig.savefig(out / "soak.png", dpi=110)
    plt.close(fig)


def write_report(report: dict[str, Any], out: str | None) -> None:
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(report, indent=2, default=str) + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=30)
    parser.add_argument("--rate", type=float, default=400)
    parser.add_argument("--faults", default="all", help=f"all, or a comma list of {', '.join(FAULT_KINDS)}; '' for none")
    parser.add_argument("--per-kind", type=int, default=2)
    parser.add_argument(
        "--calm-minutes", type=float, default=0.0, help="minutes without faults first: the steady state is measured there"
    )
    parser.add_argument("--data", choices=["online-retail", "sample"], default="online-retail")
    parser.add_argument(
        "--broker",
        choices=["noida", "tansu"],
        default="noida",
        help="noida persists (the broker can restart); tansu is memory-only (no restart_broker fault)",
    )
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--encoding", choices=["json", "f32", "f16"], default=None, help="KGS_VECTOR_ENCODING for the run")
    parser.add_argument("--mode", choices=["exact", "bounded"], default=None, help="KGS_EMBED_MODE for the run")
    parser.add_argument("--out", default=None, help="write the JSON report here too")
    parser.add_argument("--plots", default=None, help="folder for soak.png")
    parser.add_argument("--keep", action="store_true", help="keep the state dir and logs")
    args = parser.parse_args()
    if args.plots:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise SystemExit("--plots needs matplotlib: pip install -e '.[bench]'") from None
    report = run(args)
    print(json.dumps(report, indent=2, default=str))
    ok = report["lost"] == 0 and report["graph_equal"] and report["replica_equal"] and report["vectors_ok"]
    ok = ok and report["dlq_found"] == report["dlq_distinct"] == report["dlq_expected"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
