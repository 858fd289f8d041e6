"""Scale-out of the embedding worker: 1, 2 and 4 sharded worker processes on one update stream.

    python bench/scaleout.py                       # synthetic 1M graph, 1/2/4 workers, a kill -9 at 4 (~16 min)
    python bench/scaleout.py --preset small --changes 40        # a quick run
    python bench/scaleout.py --preset tiny --changes 60 --workers 1,2 --kill-at 2 --output /tmp/s.json   # the suite's smoke run

What it measures (docs/scaling.md, streamer/embed/shards.py). The parent builds the graph
(``devtools/synth.py`` preset), loads it into an engine, saves that state, draws a seeded
update stream (``UpdateStream``: new interactions, removed ones, product feature updates, new
products, deletes) and starts an embedded broker (Tansu). For each worker count W it starts W
worker processes (``--worker``); each

1. loads the saved state (the replica and every layer: what a worker restarting from its
   checkpoint holds) and joins the shard group (``ShardMembership``: a real consumer group
   over a topic with ``--shards`` partitions, kafka-python's sticky assignor);
2. waits until the parent sees the group settled (every shard owned once) and says go;
3. applies every batch of the stream (every worker follows the whole changelog; the stream is
   the same seeded file for all, standing in for kg.changes), keeping the last layer only for
   its shards, and publishes its vectors and tombstones to the run's output topic (``f32``
   records with the header ``kgs.member``), waiting for the broker's acknowledgement; between
   batches it takes a new owned set and, for shards it newly owns, recomputes their last layer
   and publishes all their vectors (the worker's ``sync_shards``);
4. reports its layer-L rows, all rows, CPU seconds and wall time.

At startup every worker holds the same fresh state as the initial build, whose vectors are
already published, so it republishes nothing then; a shard taken over later is republished
whole.

A run with ``--kill-at`` sends ``kill -9`` to worker 0 once it has applied that fraction of the
batches; the survivors get its shards after the session timeout and republish them.

The parent then checks **coverage** on the output topic (read to the end): a reference engine
applies the same stream unsharded (and is checked against a full layer-wise recompute:
``reference_vs_full_err``); for every key whose vector the stream moved or deleted there must
be a record, the last record of every key must equal the reference (vector within 1e-5, or a
tombstone for a deleted key), and it must come from the worker owning the key's shard at the
end. ``coverage_ok`` is that check on a run without a kill, ``after_kill_coverage_ok`` on a run
with one.

Output (``--output``, default bench/results/scaleout.json): one row per run with ``workers``,
``rows_per_worker`` (layer-L rows each worker computed), ``cpu_s_per_worker``,
``updates_per_s`` (stream changes / wall seconds from go until the slowest worker finished),
``coverage_ok``, ``after_kill_coverage_ok`` (null without a kill), and the detail:
``hidden_rows_per_worker``, ``takeover_rows_per_worker``, ``max_share_vs_1_worker`` (largest
worker's layer-L rows / the 1-worker run's), ``wall_s``, ``cores``. On this 2-core machine
the W processes share two cores, so ``updates_per_s`` cannot grow with W; the per-worker rows
and CPU seconds are what scale-out divides.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import platform
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from devtools import synth
from devtools.local_services import LocalServices, free_port
from encoders.graph import GraphEncoder, GraphEncoderConfig
from sinks.kafka_publisher import KafkaPublisher
from streamer.contracts.vectors import decode_vector
from streamer.embed.engine import IncrementalEngine
from streamer.embed.shards import ShardMembership, shard_of
from streamer.embed.state import load_engine, save_engine
from streamer.embed.worker import signed_record, vector_records
from streamer.kafka.topics import ensure_topics, read_to_end
from streamer.settings import Settings


def log(*a: Any) -> None:
    print(*a, file=sys.stderr, flush=True)


def model(dim: int, layers: int) -> GraphEncoder:
    return GraphEncoder(GraphEncoderConfig(in_dim=dim, hidden=dim, out=dim, layers=layers, seed=0))


def write_json(path: Path, doc: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc))
    tmp.replace(path)


# ---- a worker process -------------------------------------------------------------------------
def worker(a: argparse.Namespace) -> int:
    torch.set_num_threads(1)
    work = Path(a.work)
    status_path = work / f"{a.member}.json"
    settings = Settings(
        _env_file=None,
        bootstrap_servers=a.bootstrap,
        embed_group=a.group,
        embed_shards=a.shards,
        topic_shards=a.shards_topic,
        topic_embeddings=a.topic,
        embed_member=a.member,
        session_timeout_ms=a.session_timeout_ms,
        heartbeat_interval_ms=max(200, a.session_timeout_ms // 4),
    )
    engine, _ = load_engine(work / "engine.pt", model(a.dim, a.layers), "cpu", progress=False)
    engine.set_shards(a.shards, ())
    with open(work / "stream.pkl", "rb") as f:
        stream = pickle.load(f)
    publisher = KafkaPublisher(settings, client_id=f"kgs-scaleout-{a.member}")
    membership = ShardMembership(settings, revoke_wait_s=30)
    membership.start()
    owned: frozenset[int] = frozenset()
    status: dict[str, Any] = {"member": a.member, "pid": os.getpid(), "batches_done": 0, "layer_rows": 0, "hidden_rows": 0}
    status.update(takeover_rows=0, takeover_vectors=0, vectors_published=0, owned=[], done=False, settled=False)
    version = engine.model_version

    def sync() -> None:  # the worker's sync_shards (streamer/embed/worker.py), publishing f32 records
        nonlocal owned
        new = membership.take()
        if new is None:
            return
        owned = new
        added, refreshed = engine.take_shards(a.shards, new)
        if added:
            rows = engine.shard_rows(added)
            if status["batches_done"] or a.publish_at_start:  # at startup the initial build is already published
                keys = [engine.replica.keys[int(s)] for s in rows]
                vecs = engine.vectors(rows).numpy()
                now = int(time.time() * 1000)
                from streamer.contracts.vectors import VectorRecord

                records = [
                    signed_record(VectorRecord(k, v, version, None, None, now).to_kafka("f32"), a.member)
                    for k, v in zip(keys, vecs)
                ]
                publisher.publish(a.topic, records)
                status["takeover_vectors"] += len(records)
                status["vectors_published"] += len(records)
            status["takeover_rows"] += refreshed
        status["owned"] = sorted(new)

    go = work / "go"
    stop = work / "stop"
    while not go.exists():  # join and settle
        sync()
        status["settled"] = bool(owned)
        write_json(status_path, status)
        time.sleep(0.1)
    cpu0 = time.process_time()
    t0 = time.perf_counter()
    for i, (changes, features) in enumerate(stream):
        sync()
        while membership.rebalancing:  # as the worker does (backpressure): apply nothing until assigned
            time.sleep(0.05)
            sync()
        report = engine.apply(changes, features)
        publisher.publish(a.topic, vector_records(report, version, "f32", None, a.member))
        status["layer_rows"] += report.affected[-1]
        status["hidden_rows"] += sum(report.affected[1:-1])
        status["vectors_published"] += len(report.changed_keys) + len(report.deleted_keys)
        status["batches_done"] = i + 1
        if i % 5 == 0:
            write_json(status_path, status)
    status.update(wall_s=time.perf_counter() - t0, cpu_s=time.process_time() - cpu0, done=True)
    write_json(status_path, status)
    while not stop.exists():  # stay a member: take over the shards of a worker that dies
        sync()
        status["settled"] = not membership.changing
        write_json(status_path, status)
        time.sleep(0.1)
    status["cpu_s_total"] = time.process_time()
    status["max_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    write_json(status_path, status)
    membership.close()
    publisher.close()
    return 0


# ---- the parent -------------------------------------------------------------------------------
def build(a: argparse.Namespace, work: Path) -> tuple[list[tuple], dict[str, Any]]:
    cfg = synth.PRESETS[a.preset].scaled(seed=a.seed)
    t0 = time.perf_counter()
    g = synth.generate(cfg)
    engine = IncrementalEngine(model(a.dim, a.layers), "cpu", full_ratio=0.0 if a.no_full else None)
    feats = g.product_features()
    if feats.shape[1] != a.dim:  # the preset's feature width -> the bench's (seeded projection)
        proj = torch.randn(feats.shape[1], a.dim, generator=torch.Generator().manual_seed(0))
        feats = torch.nn.functional.normalize(feats @ proj, dim=1)
    engine.bulk_load(
        g.keys,
        g.src,
        g.dst,
        g.rel.astype(np.int64),
        features=feats,
        rel_names=list(synth.REL_NAMES),
        feature_rows=np.arange(g.n_products),
    )
    save_engine(engine, work / "engine.pt")
    stream_gen = synth.UpdateStream(g, seed=a.seed + 1)
    stream = []
    batches = max(1, a.changes // a.batch)
    for _ in range(batches):
        changes, features = stream_gen.next(a.batch)
        if features:
            keys = list(features)
            x = torch.stack([features[k] for k in keys])
            if x.shape[1] != a.dim:
                x = torch.nn.functional.normalize(x @ proj, dim=1)
            features = dict(zip(keys, x))
        stream.append((changes, features))
    with open(work / "stream.pkl", "wb") as f:
        pickle.dump(stream, f)
    info = {
        "nodes": engine.replica.num_nodes,
        "typed_edges": engine.replica.num_edges,
        "build_s": round(time.perf_counter() - t0, 1),
    }
    log(f"graph {a.preset}: {info}")
    return stream, info


def reference(a: argparse.Namespace, work: Path, stream: list[tuple]) -> dict[str, Any]:
    """Final vectors (or None: deleted) of every key the stream moved, by one unsharded engine."""
    engine, _ = load_engine(work / "engine.pt", model(a.dim, a.layers), "cpu", progress=False)
    moved: set[str] = set()
    deleted: set[str] = set()
    rows = 0
    for changes, features in stream:
        r = engine.apply(changes, features)
        moved.update(r.changed_keys)
        deleted.update(r.deleted_keys)
        rows += r.affected[-1]
    err, over = engine.verify(method="layers")
    final: dict[str, np.ndarray | None] = {}
    for k in moved | deleted:
        slot = engine.replica.index.get(k)
        final[k] = None if slot is None else engine.vectors([slot])[0].numpy()
    log(f"reference: {len(final)} keys moved or deleted, layer-L rows {rows}, vs full recompute err {err:.2e} ({over} over)")
    return {"final": final, "rows": rows, "err": err, "over": over, "engine": engine}


def coverage(
    a: argparse.Namespace, settings: Settings, ref: dict[str, Any], owners: dict[int, str]
) -> tuple[bool, dict[str, Any]]:
    last: dict[str, tuple[Any, str]] = {}
    for r in read_to_end(settings, settings.topic_embeddings, 600):
        last[r.key.decode()] = (decode_vector(r.key, r.value, r.headers), dict(r.headers or []).get("kgs.member", b"").decode())
    engine = ref["engine"]
    wrong, foreign = [], []
    missing = [key for key in ref["final"] if key not in last]
    for key, (rec, member) in last.items():
        if owners.get(shard_of(key, a.shards)) != member:
            foreign.append(key)
        want = ref["final"].get(key, "unmoved")
        if isinstance(want, str):  # a key the stream did not move: a takeover republished it
            slot = engine.replica.index.get(key)
            want = None if slot is None else engine.vectors([slot])[0].numpy()
        if (want is None) != (rec.vector is None) or (want is not None and not np.allclose(rec.vector, want, atol=1e-5, rtol=0)):
            wrong.append(key)
    ok = not (missing or wrong or foreign)
    detail = {
        "keys_checked": len(ref["final"]),
        "keys_on_topic": len(last),
        "missing": len(missing),
        "wrong": len(wrong),
        "not_by_owner": len(foreign),
    }
    if not ok:
        detail["examples"] = {"missing": missing[:3], "wrong": wrong[:3], "not_by_owner": foreign[:3]}
    return ok, detail


def run(
    a: argparse.Namespace, work: Path, bootstrap: str, n: int, kill_at: float | None, stream: list[tuple], ref: dict[str, Any]
) -> dict[str, Any]:
    tag = f"w{n}{'k' if kill_at else ''}-{int(time.time())}"
    settings = Settings(
        _env_file=None,
        bootstrap_servers=bootstrap,
        topic_embeddings=f"scaleout.{tag}.embeddings",
        topic_shards=f"scaleout.{tag}.shards",
        embed_shards=a.shards,
        input_partitions=min(a.shards, 8),
    )
    ensure_topics(settings)
    for f in ("go", "stop"):
        (work / f).unlink(missing_ok=True)
    members = [f"{tag}-{i}" for i in range(n)]
    for m in members:
        (work / f"{m}.json").unlink(missing_ok=True)
    procs = {
        m: subprocess.Popen(
            [
                sys.executable,
                __file__,
                "--worker",
                "--work",
                str(work),
                "--member",
                m,
                "--bootstrap",
                bootstrap,
                "--group",
                f"scaleout.{tag}",
                "--shards",
                str(a.shards),
                "--shards-topic",
                settings.topic_shards,
                "--topic",
                settings.topic_embeddings,
                "--dim",
                str(a.dim),
                "--layers",
                str(a.layers),
                "--session-timeout-ms",
                str(a.session_timeout_ms),
            ],
            stderr=open(work / f"{m}.log", "w"),
        )
        for m in members
    }

    def status() -> dict[str, dict[str, Any]]:
        out = {}
        for m in members:
            try:
                out[m] = json.loads((work / f"{m}.json").read_text())
            except (OSError, ValueError):
                out[m] = {}
        return out

    def wait(pred, what: str, timeout_s: float) -> dict[str, dict[str, Any]]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            st = status()
            dead = [m for m, p in procs.items() if p.poll() not in (None, -9) and m not in killed]
            if dead:
                raise SystemExit(f"worker {dead} exited: see {work / (dead[0] + '.log')}")
            if pred(st):
                return st
            time.sleep(0.2)
        raise SystemExit(f"timed out waiting for {what}: {status()}")

    killed: set[str] = set()
    victim_done = None

    def settled(st: dict[str, dict[str, Any]], alive: list[str]) -> bool:
        owned = [set(st[m].get("owned", [])) for m in alive]
        return all(owned) and sum(map(len, owned)) == a.shards and set().union(*owned) == set(range(a.shards))

    t_join = time.perf_counter()
    wait(lambda st: settled(st, members), "the shard group to settle", 300)
    time.sleep(2 * a.session_timeout_ms / 1000)  # the assignment holds
    st = wait(lambda st: settled(st, members), "the shard group to settle", 120)
    join_s = time.perf_counter() - t_join
    (work / "go").touch()
    t0 = time.perf_counter()
    batches = len(stream)
    if kill_at:
        victim = members[0]
        wait(lambda st: st[victim].get("batches_done", 0) >= kill_at * batches, "the victim's progress", 3600)
        os.kill(procs[victim].pid, signal.SIGKILL)
        procs[victim].wait()
        killed.add(victim)
        victim_done = status()[victim].get("batches_done")
        log(f"kill -9 {victim} after {victim_done} of {batches} batches")
    alive = [m for m in members if m not in killed]
    wait(lambda st: all(st[m].get("done") for m in alive), "the workers to finish the stream", 3600)
    wall = time.perf_counter() - t0
    st = wait(lambda st: settled(st, alive) and all(st[m].get("settled") for m in alive), "the survivors to own every shard", 300)
    time.sleep(1.0)
    st = status()
    owners = {s: m for m in alive for s in st[m].get("owned", [])}
    ok, detail = coverage(a, settings, ref, owners)
    (work / "stop").touch()
    for p in procs.values():
        p.wait(timeout=60)
    st = status()
    row = {
        "workers": n,
        "rows_per_worker": [st[m].get("layer_rows") for m in members],
        "cpu_s_per_worker": [round(st[m].get("cpu_s", float("nan")), 2) if m not in killed else None for m in members],
        "updates_per_s": round(sum(len(c) for c, _ in stream) / wall, 1),
        "coverage_ok": ok if not kill_at else None,
        "after_kill_coverage_ok": ok if kill_at else None,
        "killed": sorted(killed),
        "kill_at_fraction": kill_at,
        "victim_batches_done_at_kill": victim_done,
        "hidden_rows_per_worker": [st[m].get("hidden_rows") for m in members],
        "takeover_rows_per_worker": [st[m].get("takeover_rows") for m in members],
        "takeover_vectors_per_worker": [st[m].get("takeover_vectors") for m in members],
        "vectors_published_per_worker": [st[m].get("vectors_published") for m in members],
        "max_rss_mb_per_worker": [round(st[m].get("max_rss_mb", 0)) if m not in killed else None for m in members],
        "max_share_vs_1_worker": round(max(st[m].get("layer_rows", 0) for m in members) / max(ref["rows"], 1), 4),
        "reference_layer_rows": ref["rows"],
        "wall_s": round(wall, 2),
        "join_s": round(join_s, 2),
        "coverage": detail,
    }
    log(json.dumps(row))
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="1m", choices=sorted(synth.PRESETS))
    p.add_argument("--workers", default="1,2,4")
    p.add_argument(
        "--kill-at",
        type=float,
        default=0.4,
        help="kill -9 worker 0 of the largest run at this fraction of the stream (0: no kill run)",
    )
    p.add_argument("--changes", type=int, default=100, help="changes in the stream (~13k vectors move per change on 1m)")
    p.add_argument("--batch", type=int, default=10, help="changes per micro-batch")
    p.add_argument("--shards", type=int, default=64)
    p.add_argument(
        "--dim", type=int, default=32, help="input, hidden and output width (small: W processes hold the whole graph each)"
    )
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-full", action="store_true", help="never switch to full passes")
    p.add_argument("--session-timeout-ms", type=int, default=6000)
    p.add_argument("--output", default=str(ROOT / "bench" / "results" / "scaleout.json"))
    p.add_argument("--publish-at-start", action="store_true", help=argparse.SUPPRESS)
    # worker mode
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    for name in ("--work", "--member", "--bootstrap", "--group", "--shards-topic", "--topic"):
        p.add_argument(name, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        return worker(a)

    work = Path(tempfile.mkdtemp(prefix="kgs-scaleout-"))
    state = Path(tempfile.mkdtemp(prefix="kgs-scaleout-broker-"))
    services = LocalServices(
        Settings(_env_file=None, state_dir=state, local_broker="tansu", bootstrap_servers=f"127.0.0.1:{free_port()}")
    )
    rows: list[dict[str, Any]] = []
    try:
        services.up(("broker",), timeout_s=180)
        bootstrap = services.settings.bootstrap_servers
        stream, info = build(a, work)
        ref = reference(a, work, stream)
        counts = [int(x) for x in a.workers.split(",")]
        plan: list[tuple[int, float | None]] = [(n, None) for n in counts]
        if a.kill_at and max(counts) > 1:
            plan.append((max(counts), a.kill_at))
        for n, kill in plan:
            rows.append(run(a, work, bootstrap, n, kill, stream, ref))
        doc = {
            "graph": {"preset": a.preset, **info},
            "stream": {"changes": sum(len(c) for c, _ in stream), "batches": len(stream), "batch": a.batch},
            "shards": a.shards,
            "dim": a.dim,
            "layers": a.layers,
            "reference_vs_full_err": ref["err"],
            "reference_rows_over_1e-5": ref["over"],
            "runs": rows,
            "host": {
                "host": platform.node(),
                "cores": os.cpu_count(),
                "torch": torch.__version__,
                "python": platform.python_version(),
            },
        }
        out = Path(a.output)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(doc, indent=1) + "\n")
        print(json.dumps(doc, indent=1))
        return 0 if all(r["coverage_ok"] is not False and r["after_kill_coverage_ok"] is not False for r in rows) else 1
    finally:
        services.down()
        shutil.rmtree(state, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
