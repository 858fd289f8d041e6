#!/usr/bin/env python
"""What an embedded broker costs as its log grows: latency of two hops and broker CPU per message.

    python bench/broker_cost.py [--broker noida|tansu] [--seconds 240] [--rate 400]
                                [--vectors-per-s 600] [--segment-ms N] [--compression gzip]

An embedded broker (started here, in a temporary state dir, on a free port) carries a stream of
``--rate`` small messages per second through two hops, as the pipeline does (input topic ->
a relay consumer that produces each message on -> a sink consumer): the relay and the sink
record the latency from the producer's timestamp. ``--vectors-per-s`` adds a producer of 1.1 KB
values keyed over 14,000 keys to a compacted topic (the size of f16 vectors on kg.embeddings;
``segment.ms`` 60 s as ``streamer.kafka.topics`` creates it), so the broker holds what the soak
makes it hold. Reports as JSON: the hop and end-to-end latency p50/p99/max (the first tenth of
the samples left out as warm-up), the max end-to-end latency per 10 s (does it grow with the
log?), and the broker's CPU seconds per small message (from /proc: both hops and the vectors).

Why: on the 2-core machine noida-db's CPU per message grew from 0.33 ms after 30 s to 1.2 ms
after 240 s (docs/reliability.md "Where the tail comes from").
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from kafka import KafkaConsumer, KafkaProducer
from kafka.admin import KafkaAdminClient, NewTopic

from devtools.local_services import LocalServices, free_port
from streamer.settings import Settings


def cpu_seconds(pid: int) -> float:
    stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(stat[11]) + int(stat[12])) / os.sysconf("SC_CLK_TCK")


def quantile(xs: list[float], q: float) -> float | None:
    xs = sorted(xs)
    return round(xs[int(q * (len(xs) - 1))], 1) if xs else None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--broker", choices=["noida", "tansu"], default="noida")
    p.add_argument("--seconds", type=float, default=240.0)
    p.add_argument("--rate", type=float, default=400.0, help="small messages per second")
    p.add_argument("--vectors-per-s", type=int, default=600, help="1.1 KB keyed values per second to a compacted topic")
    p.add_argument("--segment-ms", type=int, default=None, help="segment.ms of the two hop topics (default: the broker's)")
    p.add_argument("--compression", default=None, help="the producers' compression_type (e.g. gzip)")
    p.add_argument("--fetch-max-wait-ms", type=int, default=20, help="the consumers' (the pipeline's default)")
    a = p.parse_args(argv)

    state = Path(tempfile.mkdtemp(prefix="kgs-broker-cost-"))
    settings = Settings(_env_file=None, state_dir=state, bootstrap_servers=f"127.0.0.1:{free_port()}", local_broker=a.broker)
    services = LocalServices(settings)
    services.up(("broker",), timeout_s=180)
    bootstrap = settings.bootstrap_servers
    try:
        hop_configs = {"segment.ms": str(a.segment_ms)} if a.segment_ms else {}
        admin = KafkaAdminClient(bootstrap_servers=bootstrap)
        admin.create_topics(
            [
                NewTopic("hop.in", 3, 1, topic_configs=hop_configs),
                NewTopic("hop.out", 1, 1, topic_configs=hop_configs),
                NewTopic("hop.vectors", 3, 1, topic_configs={"cleanup.policy": "compact", "segment.ms": "60000"}),
            ]
        )
        admin.close()

        def producer(linger_ms: int) -> KafkaProducer:
            return KafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=linger_ms, compression_type=a.compression)

        def consumer(topic: str, group: str) -> KafkaConsumer:
            return KafkaConsumer(
                topic,
                bootstrap_servers=bootstrap,
                group_id=group,
                auto_offset_reset="earliest",
                fetch_max_wait_ms=a.fetch_max_wait_ms,
            )

        hop: list[float] = []
        end: list[tuple[float, float]] = []  # (arrival unix s, latency ms)
        stop = threading.Event()

        def relay() -> None:
            c, out = consumer("hop.in", "relay"), producer(0)
            while not stop.is_set():
                for records in c.poll(timeout_ms=200).values():
                    now = time.time() * 1000
                    for r in records:
                        hop.append(now - int(r.value[:13]))
                        out.send("hop.out", r.value)
                out.flush()

        def sink() -> None:
            c = consumer("hop.out", "sink")
            while not stop.is_set():
                for records in c.poll(timeout_ms=200).values():
                    now = time.time()
                    end.extend((now, now * 1000 - int(r.value[:13])) for r in records)

        def vectors() -> None:
            out, i = producer(5), 0
            while not stop.is_set():
                for _ in range(a.vectors_per_s // 10):
                    out.send("hop.vectors", key=b"k%d" % (i % 14_000), value=os.urandom(1100))
                    i += 1
                out.flush()
                stop.wait(0.1)

        threads = [threading.Thread(target=f, daemon=True) for f in (relay, sink, vectors)]
        for t in threads:
            t.start()
        time.sleep(3)  # the groups join
        pid = services.pid("broker")
        assert pid is not None
        cpu0 = cpu_seconds(pid)
        source = producer(5)
        began, sent = time.time(), 0
        while time.time() - began < a.seconds:
            wait = began + sent / a.rate - time.time()
            if wait > 0:
                time.sleep(wait)
            source.send("hop.in", b"%013d" % int(time.time() * 1000) + b"x" * 300)
            sent += 1
        source.flush()
        time.sleep(2)
        stop.set()
        cpu = cpu_seconds(pid) - cpu0
        per_10s: dict[int, float] = defaultdict(float)
        for at, ms in end:
            per_10s[int(at - began) // 10 * 10] = max(per_10s[int(at - began) // 10 * 10], ms)
        steady_hop, steady_end = hop[len(hop) // 10 :], [ms for _, ms in end][len(end) // 10 :]
        report: dict[str, Any] = {
            "broker": a.broker,
            "seconds": a.seconds,
            "rate": a.rate,
            "vectors_per_s": a.vectors_per_s,
            "segment_ms": a.segment_ms,
            "compression": a.compression,
            "messages": sent,
            "received": len(end),
            "hop_p50_ms": quantile(steady_hop, 0.5),
            "hop_p99_ms": quantile(steady_hop, 0.99),
            "end_to_end_p50_ms": quantile(steady_end, 0.5),
            "end_to_end_p99_ms": quantile(steady_end, 0.99),
            "end_to_end_max_ms": quantile([ms for _, ms in end], 1.0),
            "end_to_end_max_ms_per_10s": {str(k): round(v) for k, v in sorted(per_10s.items())},
            "broker_cpu_ms_per_message": round(1000 * cpu / max(sent, 1), 3),
        }
        print(json.dumps(report, indent=1))
        return 0
    finally:
        services.down(("broker",))
        shutil.rmtree(state, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
