"""Full replay of a real data set through the whole pipeline, then the audit.

    python bench/pipeline.py [--data PATH] [--limit N] [--broker tansu|noida]

Starts its own embedded broker and graph DB in a temporary state dir on free ports, replays
UCI Online Retail (default: online_retail/online_retail.csv.gz under KGS_DATA_DIR) into the input
topics, runs the ingest consumer until caught up, runs the embedding worker until caught up,
runs `verify` (full recompute vs incremental state, and the last vector per key on
kg.embeddings), and prints one JSON object: times per stage, events, vectors published,
affected-set sizes per layer, freshness, the audit, and the machine. Stops its services.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.ingest import free_port, machine
from streamer.settings import Settings

DEFAULT_DATA = Settings().data_dir / "online_retail" / "online_retail.csv.gz"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(DEFAULT_DATA))
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--broker", default="tansu", choices=["tansu", "noida"])
    parser.add_argument("--torch-threads", type=int, default=1)
    args = parser.parse_args()

    from devtools.datasets.produce import load_online_retail
    from devtools.local_services import LocalServices
    from streamer.embed.verify import verify
    from streamer.embed.worker import embed_consumer
    from streamer.ingest.step import ingest_consumer
    from streamer.kafka.topics import ensure_topics
    from streamer.settings import Settings

    state = Path(tempfile.mkdtemp(prefix="kgs-replay-"))
    settings = Settings(
        _env_file=None,
        state_dir=state,
        local_broker=args.broker,
        bootstrap_servers=f"127.0.0.1:{free_port()}",
        bolt_uri=f"bolt://127.0.0.1:{free_port()}",
        arcadedb_http_port=free_port(),
        metrics_addr="",
        torch_threads=args.torch_threads,
    )
    services = LocalServices(settings)
    out: dict = {"data": args.data, "limit": args.limit, "broker": args.broker, "machine": machine()}
    try:
        services.up()
        ensure_topics(settings)
        t = time.monotonic()
        loaded = load_online_retail(args.data, settings, limit=args.limit, rate=None)
        out["load"] = {"events": loaded.events, "seconds": round(time.monotonic() - t, 1)}
        t = time.monotonic()
        ingest = ingest_consumer(settings).run(until_caught_up=True)
        out["ingest"] = ingest.summary()
        t = time.monotonic()
        worker = embed_consumer(settings)
        embed = worker.run(until_caught_up=True)
        out["embed"] = embed.summary()
        out["embed"]["nodes"] = worker.step.engine.replica.num_nodes
        out["embed"]["edges"] = worker.step.engine.replica.num_edges
        t = time.monotonic()
        out["verify"] = verify(settings, against_topic=True)
        out["verify"]["seconds"] = round(time.monotonic() - t, 1)
    finally:
        services.down()
        shutil.rmtree(state, ignore_errors=True)
    print(json.dumps(out, indent=2, default=str))
    return 0 if out.get("verify", {}).get("ok") else 1


if __name__ == "__main__":
    sys.exit(main())
