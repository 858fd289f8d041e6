"""Every Prometheus metric kg-streamer exports, declared once: name, unit, help, labels.

Conventions: base units with the unit in the name (``_seconds``, ``_bytes``), counters end in
``_total``, the consumer group label is always spelled ``group``, topic partitions are
``topic`` + ``partition``. ``serve(addr)`` starts the HTTP endpoint of a long-running
command (no-op when ``metrics_addr`` is empty): ``/metrics``, and the liveness and readiness
probes ``/healthz`` and ``/readyz`` (``streamer.health``).
"""

from __future__ import annotations

import threading
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import Counter, Gauge, Histogram, Info, make_wsgi_app

from streamer.health import HEALTH

_BATCH_SIZES = (1, 10, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 50000)
_DURATIONS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
_FRESHNESS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 300, 900, 3600)

# --- ingest ---------------------------------------------------------------------------
EVENTS_CONSUMED = Counter("kgs_events_consumed_total", "Input messages polled from Kafka.", ["group", "topic"])
EVENTS_APPLIED = Counter(
    "kgs_events_applied_total", "Valid input events written to the graph DB (committed transactions).", ["group", "topic", "kind"]
)
EVENTS_DLQ = Counter(
    "kgs_events_dlq_total", "Input messages sent to the dead-letter topic, by error class.", ["group", "topic", "error_class"]
)
GRAPH_WRITES = Counter("kgs_graph_writes_total", "Graph entities written, by kind (node or relationship).", ["group", "kind"])
CHANGES_PUBLISHED = Counter("kgs_changes_published_total", "Change records acknowledged on kg.changes.", ["group"])
GRAPH_RETRIES = Counter("kgs_graph_retries_total", "Graph transactions retried after a transient error.", ["group"])
GRAPH_ERRORS = Counter(
    "kgs_graph_errors_total",
    "Graph transactions that failed, by outcome (transient, unavailable, rejected).",
    ["group", "outcome"],
)
CLIENT_REBUILDS = Counter(
    "kgs_consumer_client_rebuilds_total",
    "Times a consumer rebuilt its Kafka client: stuck joining, the group coordinator unreachable, or records left "
    "unfetched past its position, each for consumer_stall_s.",
    ["group"],
)
LOG_TRUNCATIONS = Counter(
    "kgs_log_truncations_total",
    "Times a partition's log end was found below the consumer's position (the broker lost acknowledged records).",
    ["group", "topic", "partition"],
)
BACKPRESSURE = Gauge("kgs_backpressure_paused", "1 while the consumer has paused its partitions for backpressure.", ["group"])

# --- batches and stages ----------------------------------------------------------------
BATCH_EVENTS = Histogram("kgs_batch_events", "Messages per processed batch.", ["group"], buckets=_BATCH_SIZES)
STAGE_SECONDS = Histogram(
    "kgs_stage_duration_seconds",
    "Seconds one batch spent in a stage: queue (age of its oldest record when polled), batch_wait (held for more "
    "records), then the steps' stages (decode, write, publish; embed, publish) and commit.",
    ["group", "stage"],
    buckets=_DURATIONS,
)

# --- offsets and lag --------------------------------------------------------------------
COMMITTED_OFFSET = Gauge("kgs_consumer_committed_offset", "Last offset committed by the group.", ["group", "topic", "partition"])
LAG_MESSAGES = Gauge(
    "kgs_consumer_lag_messages", "Messages between the committed offset and the log end.", ["group", "topic", "partition"]
)
LAG_SECONDS = Gauge(
    "kgs_consumer_lag_seconds",
    "Age of the oldest unconsumed message (broker timestamp), 0 when caught up.",
    ["group", "topic", "partition"],
)
LAST_COMMIT_TIMESTAMP = Gauge(
    "kgs_consumer_last_commit_timestamp_seconds",
    "Unix time of the group's last successful commit.",
    ["group", "topic", "partition"],
)
# The lag gauges below (and LAG_MESSAGES / LAG_SECONDS above) are set by streamer/groups/lag.py from
# the broker: every long-running consumer samples its own group, `kg-streamer lag-exporter`
# samples any groups (and keeps reporting while the consumers are down). Several processes may
# report the same partition: aggregate with max by (group, topic, partition).
COMMIT_STALENESS = Gauge(
    "kgs_consumer_commit_staleness_seconds",
    "While lag > 0: seconds the group has had work without committing, min(now - last commit, lag seconds); 0 when caught up.",
    ["group", "topic", "partition"],
)
GROUP_MEMBERS = Gauge("kgs_consumer_group_members", "Live members of the consumer group (DescribeGroups).", ["group"])
TOPIC_END_OFFSET = Gauge(
    "kgs_topic_end_offset",
    "Log end offset (high watermark from a fetch) of a partition the monitored groups read.",
    ["topic", "partition"],
)
TOPIC_START_OFFSET = Gauge(
    "kgs_topic_start_offset", "Log start offset (oldest retained message) of a partition.", ["topic", "partition"]
)
LAG_SAMPLE_TIMESTAMP = Gauge(
    "kgs_lag_last_sample_timestamp_seconds", "Unix time of the lag monitor's last successful sample of the group.", ["group"]
)
LAG_SAMPLE_ERRORS = Counter(
    "kgs_lag_sample_errors_total", "Lag samples of the group that failed (broker unreachable, timeouts).", ["group"]
)

# --- freshness --------------------------------------------------------------------------
FRESHNESS_GRAPH = Histogram(
    "kgs_freshness_graph_seconds",
    "Input message timestamp (entry into Kafka) to graph transaction committed.",
    ["group"],
    buckets=_FRESHNESS,
)
FRESHNESS_VECTOR = Histogram(
    "kgs_freshness_vector_seconds",
    "Input message timestamp (entry into Kafka) to refreshed vector acknowledged on kg.embeddings.",
    ["group"],
    buckets=_FRESHNESS,
)

# --- embedding worker -------------------------------------------------------------------
AFFECTED_NODES = Histogram(
    "kgs_affected_nodes", "Nodes recomputed per micro-batch, by GNN layer.", ["group", "layer"], buckets=_BATCH_SIZES
)
VECTORS_PUBLISHED = Counter(
    "kgs_vectors_published_total", "Vectors (and tombstones) acknowledged on kg.embeddings.", ["group", "kind"]
)
VECTORS_SUPPRESSED = Counter(
    "kgs_vectors_suppressed_total", "Refreshed vectors not published because their change was under the threshold.", ["group"]
)
FULL_PASS_LAYERS = Counter(
    "kgs_full_pass_layers_total",
    "GNN layers computed by one full-graph pass instead of delta propagation (large batches, docs/engine.md).",
    ["group"],
)
TEXT_ENCODED = Counter("kgs_text_encoded_total", "Product texts run through the transformer (cache misses).", ["group"])
SHARDS_OWNED = Gauge(
    "kgs_shards_owned",
    "Sharded embedding workers: output-key shards this worker owns (streamer/embed/shards.py); 0 when not sharded.",
    ["group"],
)
CHANGES_STALE = Counter(
    "kgs_changes_stale_total",
    "kg.changes records not applied because the replica already holds a newer version (streamer/embed/versions.py).",
    ["group"],
)
MODEL_INFO = Info("kgs_model", "The graph encoder serving vectors: version, layers, dims, device.")


GRAPH_ERROR_OUTCOMES = ("transient", "unavailable", "rejected")


def init_labels(group: str, role: str) -> None:
    """Create the series a consumer may only touch on rare events (retries, errors, tombstones),
    at 0, so that rate() and alerts see them from the first scrape instead of missing the
    first increment. ``role`` is "ingest" or "embed"."""
    BATCH_EVENTS.labels(group)
    if role == "ingest":
        GRAPH_RETRIES.labels(group)
        for outcome in GRAPH_ERROR_OUTCOMES:
            GRAPH_ERRORS.labels(group, outcome)
        BACKPRESSURE.labels(group).set(0)
        CHANGES_PUBLISHED.labels(group)
    elif role == "embed":
        for kind in ("vector", "tombstone"):
            VECTORS_PUBLISHED.labels(group, kind)
        VECTORS_SUPPRESSED.labels(group)
        FULL_PASS_LAYERS.labels(group)
        TEXT_ENCODED.labels(group)
        CHANGES_STALE.labels(group)


_served: list[str] = []


class _ThreadingServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass  # probes every few seconds would flood the log


def _app() -> Any:
    metrics_app = make_wsgi_app()

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        path = environ.get("PATH_INFO", "")
        if path in ("/healthz", "/readyz"):
            ok, why = HEALTH.live() if path == "/healthz" else HEALTH.ready()
            start_response("200 OK" if ok else "503 Service Unavailable", [("Content-Type", "text/plain; charset=utf-8")])
            return [why.encode() + b"\n"]
        return metrics_app(environ, start_response)  # type: ignore[no-any-return]

    return app


class AddressInUse(RuntimeError):
    """``serve``'s address is taken (e.g. by another kg-streamer command on the same host)."""


def serve(addr: str) -> bool:
    """Start the HTTP endpoint (/metrics, /healthz, /readyz) on "host:port" in a daemon thread;
    returns False when disabled; ``AddressInUse`` when the address cannot be bound."""
    if not addr:
        return False
    host, _, port = addr.rpartition(":")
    try:
        server = make_server(host or "0.0.0.0", int(port), _app(), _ThreadingServer, handler_class=_QuietHandler)
    except OSError as e:
        raise AddressInUse(
            f"cannot serve /metrics on {addr} ({e.strerror or e}); another process holds it (another kg-streamer "
            "command on this host?): give this one its own KGS_METRICS_ADDR=host:port, or KGS_METRICS_ADDR= for none"
        ) from e
    threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True).start()
    _served.append(addr)
    return True


def serving() -> bool:
    """Whether this process serves /metrics (``serve`` was called with an address)."""
    return bool(_served)
