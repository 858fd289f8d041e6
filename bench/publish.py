#!/usr/bin/env python
"""What publishing vectors costs: packed record batches against kafka-python's ``send``.

    python bench/publish.py [--records 364,2562,20000] [--reps 7] [--broker tansu|noida]
                            [--bootstrap host:port] [--encoding f16] [--dim 512]
                            [--output bench/results/publish.json]

The worker's last two steps for a batch of N changed vectors, on a real broker (an embedded
one started here, in a temporary state dir, on a free port; or ``--bootstrap``), each timed
end to end:

- **serialise**: ``encode_vectors`` (one numpy pass, ``streamer/contracts/vectors.py``)
  against ``VectorRecord.to_kafka`` one vector at a time (what the worker did before);
- **publish**: ``KafkaPublisher.publish`` with its packed record batches
  (``sinks/record_batches.py``) against the same publisher sending record by record through
  kafka-python's ``send`` (its fallback, and what it did before): both ``acks=all``, flushed,
  to the same topic of 6 partitions.

The two sides alternate, ``--reps`` times each, after a warm-up publish; the medians are
reported per record with the ratios (``speedup``: baseline / ours) measured in the same run.
Prints JSON and writes it to ``--output``. N = 364 and 2,562 are what bounded mode published
per batch of 1,000 and 10,000 changes on Online Retail (docs/performance.md).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from kafka.admin import KafkaAdminClient, NewTopic

from devtools.local_services import LocalServices, free_port
from sinks.kafka_publisher import KafkaPublisher
from streamer.contracts.vectors import VectorRecord, encode_vectors
from streamer.settings import Settings

TOPIC = "bench.vectors"


def timed(fn: Any) -> float:
    began = time.perf_counter()
    fn()
    return time.perf_counter() - began


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--records", default="364,2562,20000", help="comma list: vectors per publish")
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--broker", choices=["tansu", "noida"], default="tansu", help="the embedded broker to start")
    p.add_argument("--bootstrap", default=None, help="a running broker instead of an embedded one")
    p.add_argument("--encoding", choices=["f16", "f32", "json"], default="f16")
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--output", default=str(Path(__file__).resolve().parent / "results" / "publish.json"))
    a = p.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="kgs-bench-publish-") as state:
        bootstrap = a.bootstrap or f"127.0.0.1:{free_port()}"
        settings = Settings(_env_file=None, state_dir=Path(state), bootstrap_servers=bootstrap, local_broker=a.broker)
        services = None if a.bootstrap else LocalServices(settings)
        if services is not None:
            services.up(("broker",))
        try:
            admin = KafkaAdminClient(bootstrap_servers=bootstrap)
            try:
                admin.create_topics([NewTopic(TOPIC, 6, 1)])
            finally:
                admin.close()
            rows = [measure(settings, n, a) for n in (int(x) for x in a.records.split(",") if x)]
        finally:
            if services is not None:
                services.down(("broker",))
    report = {
        "bench": "publish",
        "broker": "bootstrap" if a.bootstrap else a.broker,
        "encoding": a.encoding,
        "dim": a.dim,
        "reps": a.reps,
        "rows": rows,
    }
    text = json.dumps(report, indent=1)
    print(text)
    Path(a.output).parent.mkdir(parents=True, exist_ok=True)
    Path(a.output).write_text(text + "\n")
    return 0


def measure(settings: Settings, n: int, a: argparse.Namespace) -> dict[str, Any]:
    rng = np.random.default_rng(n)
    vectors = rng.standard_normal((n, a.dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    keys = [f"Product:{i}" for i in range(n)]
    event_ts = [1_291_191_960_000 + i for i in range(n)]
    version, now = "g1a2b3c4d5e6", int(time.time() * 1000)

    def one_by_one() -> list[Any]:
        return [VectorRecord(k, v, version, t, now, now).to_kafka(a.encoding) for k, v, t in zip(keys, vectors, event_ts)]

    def at_once() -> list[Any]:
        return encode_vectors(keys, vectors, version, event_ts, now, now, a.encoding)

    records = at_once()
    assert records == one_by_one(), "encode_vectors must write the bytes of to_kafka"
    publisher = KafkaPublisher(settings, client_id="bench-publish")
    try:
        publisher.publish(TOPIC, records)  # warm-up: connection, metadata, the key partitions
        times: dict[str, list[float]] = {"serialise_one_by_one": [], "serialise_at_once": [], "send": [], "packed": []}
        for _ in range(a.reps):
            times["serialise_one_by_one"].append(timed(one_by_one))
            times["serialise_at_once"].append(timed(at_once))
            publisher.record_by_record = True
            times["send"].append(timed(lambda: publisher.publish(TOPIC, records)))
            publisher.record_by_record = False
            times["packed"].append(timed(lambda: publisher.publish(TOPIC, records)))
    finally:
        publisher.close()
    med = {k: statistics.median(v) for k, v in times.items()}
    us = {k: round(1e6 * v / n, 2) for k, v in med.items()}
    before = med["serialise_one_by_one"] + med["send"]
    after = med["serialise_at_once"] + med["packed"]
    return {
        "records": n,
        "bytes_per_record": round(sum(len(k) + len(v or b"") for k, v, _ in records) / n, 1),
        "us_per_record": us,
        "ms_median": {k: round(1000 * v, 3) for k, v in med.items()},
        "speedup_serialise": round(med["serialise_one_by_one"] / med["serialise_at_once"], 2),
        "speedup_publish": round(med["send"] / med["packed"], 2),
        "speedup_serialise_and_publish": round(before / after, 2),
        "records_per_s_packed": round(n / med["packed"]),
        "records_per_s_send": round(n / med["send"]),
    }


if __name__ == "__main__":
    raise SystemExit(main())
