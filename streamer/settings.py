"""One typed settings object for every kg-streamer command.

Defaults are safe for a laptop: the embedded broker and graph DB on loopback ports, a state
directory `.kgs` under the working directory. Every field can be overridden by an environment
variable with the prefix ``KGS_`` (``KGS_STATE_DIR``, ``KGS_BOOTSTRAP_SERVERS``,
``KGS_BOLT_URI``, ``KGS_BOLT_PASSWORD`` ...) or by a ``.env`` file. Production (docker-compose)
changes only these values; the code is the same.

Secrets are ``SecretStr``: they print as ``**********`` in logs and reprs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


def default_data_dir() -> Path:
    """``../shared/data`` beside the project checkout (where the project's machines keep the
    full public data sets); ``data`` under the working directory when there is none."""
    beside = Path(__file__).resolve().parent.parent.parent / "shared" / "data"
    return beside if beside.is_dir() else Path("data")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="KGS_", env_file=".env", extra="ignore")

    # --- where local state lives (embedded services, worker checkpoints, caches) ---
    state_dir: Path = Path(".kgs")
    data_dir: Path = Field(
        default_factory=default_data_dir,
        description="the full public data sets (online_retail/, amazon_magazine_2018/) for `load`, benches and tests",
    )

    # --- Kafka ---
    bootstrap_servers: str = "127.0.0.1:19092"
    local_broker: Literal["tansu", "noida"] = Field(
        "tansu",
        description="Embedded broker started by `kg-streamer services up`. tansu (default) keeps "
        "everything in memory; noida-db persists to the state dir but never evicts a crashed group "
        "member (see devtools/local_services.py).",
    )
    topic_products: str = "kg.products"
    topic_interactions: str = "kg.interactions"
    topic_relations: str = "kg.relations"
    topic_changes: str = "kg.changes"
    topic_embeddings: str = "kg.embeddings"
    topic_dlq: str = "kg.dlq"
    topic_shards: str = Field(
        "kg.shards",
        description="sharded embedding workers: a topic with embed_shards partitions and no records; the consumer "
        "group <embed_group>.shards assigns its partitions, i.e. the shards each worker owns (docs/scaling.md)",
    )
    embeddings_segment_ms: int = Field(
        60_000,
        ge=1_000,
        description="kg.embeddings rolls a log segment at least this often (topic config segment.ms, set when the "
        "topic is created): log compaction never touches the active segment, so with Kafka's default (7 days) the "
        "topic keeps every vector ever published instead of about one per node (docs/reliability.md)",
    )
    input_partitions: int = 3
    changes_partitions: int = Field(1, description="kg.changes is the graph's changelog; one partition keeps it totally ordered.")
    ingest_group: str = "kg-ingest"
    embed_group: str = "kg-embed"
    session_timeout_ms: int = 10_000
    heartbeat_interval_ms: int = 1_000
    max_poll_interval_ms: int = 300_000
    fetch_max_wait_ms: int = Field(
        20,
        ge=0,
        description="how long the broker may hold a fetch that finds no new record (Kafka's default, 500 ms, "
        "is latency a quiet stream pays on every batch; measured in docs/reliability.md)",
    )
    idle_fetch_interval_ms: int | None = Field(
        None,
        ge=0,
        description="while nothing arrives, a consumer fetches at most this often: for brokers that answer an empty "
        "fetch at once instead of holding it fetch_max_wait_ms (noida-db), where kafka-python's poll would spin a "
        "core (streamer/kafka/paced_poll.py); unset: 10 when local_broker is noida, else 0 (off)",
    )
    auto_offset_reset: Literal["earliest", "latest"] = "earliest"
    consumer_stall_s: float = Field(
        30.0,
        gt=0,
        description="seconds a consumer may go without records, while its group coordinator cannot be reached or "
        "while records wait past its position, before the Kafka client is rebuilt (kafka-python can stay stuck "
        "after a broker restart)",
    )
    group_instance_id: str | None = Field(
        None,
        description="static group membership (KIP-345), e.g. the pod name: a restarted consumer takes its "
        "old place at once instead of waiting for the dead member's session to expire",
    )

    # --- graph DB over Bolt ---
    bolt_uri: str = "bolt://127.0.0.1:17687"
    bolt_user: str = "root"
    bolt_password: SecretStr = SecretStr("kg-streamer-local")
    bolt_database: str = "kg"
    graph_dialect: Literal["auto", "neo4j", "arcadedb"] = "auto"
    arcadedb_http_port: int = 12480

    # --- ingest ---
    batch_max_events: int = 1_000
    batch_max_wait_s: float = 0.5
    max_event_bytes: int = 256 * 1024
    dlq_max_value_bytes: int = Field(
        900_000,
        description="a dead letter's value is cut to this size (original size and SHA-256 in its "
        "headers), so that it fits the broker's default 1 MB message limit with its headers",
    )
    graph_retry_attempts: int = 5
    graph_retry_base_s: float = 0.2
    graph_retry_max_s: float = 5.0
    backpressure_pause_s: float = 5.0

    # --- embedding worker ---
    text_model: str = Field("all-MiniLM-L6-v2", description="'all-MiniLM-L6-v2' (offline package) or a local HF model path")
    graph_checkpoint: Path | None = None
    gnn_layers: int = 2
    gnn_hidden: int = 128
    gnn_out: int = 128
    gnn_seed: int = 0
    fusion: Literal["concat", "mean"] = "concat"
    fusion_text_weight: float = 0.5
    device: str = Field("auto", description="'auto' (cuda when present), 'cpu', 'cuda', 'cuda:1' ...")
    torch_threads: int = 0
    embed_batch_max_changes: int = Field(
        20_000,
        description="micro-batch cap; only reached while catching up (a bigger batch publishes each moved vector "
        "once instead of once per batch)",
    )
    embed_batch_max_wait_s: float = 0.2
    embed_shards: int = Field(
        0,
        ge=0,
        le=10_000,
        description="0: one worker computes and publishes every vector. S > 0: workers split the output keys into S "
        "shards (Kafka's default partitioner of the key) owned through the group <embed_group>.shards; each worker "
        "follows the whole changelog in its own group <embed_group>.<member> (docs/scaling.md)",
    )
    embed_member: str | None = Field(
        None,
        description="sharded workers: this worker's name (its changelog group and the kgs.member header of its "
        "records); default: group_instance_id (the pod name), else the host name. Unique per worker.",
    )
    vector_encoding: Literal["json", "f32", "f16"] = Field(
        "json",
        description="kg.embeddings values: JSON (readable anywhere), or the compact binary record with "
        "float32 or float16 values (streamer/contracts/vectors.py documents both)",
    )
    embed_checkpoint_every_s: float = Field(30.0, description="how often the worker checkpoints its replica and caches")

    # --- embedding engine (docs/engine.md "Bounded mode", docs/reliability.md "Which mode") ---
    # The default propagates exactly (every hidden layer equals a full recompute within 1e-5)
    # and publishes lazily: a vector goes out when h_L moved by more than
    # embed_publish_threshold since it was last published, so the topic is within that of a full
    # recompute (measured on Online Retail: 44x fewer vectors published than exact, vector error
    # <= 1.2e-4, cosine >= 0.99999). exact: every vector that moved at all is published.
    # embed_propagate_threshold > 0 also holds back hidden-layer changes (cheaper, less exact).
    # The error stays under the engine's reported error_bound (verify tolerates 1e-5 + error_bound).
    embed_mode: Literal["exact", "bounded"] = "bounded"
    embed_propagate_threshold: float = Field(0.0, ge=0, description="bounded mode: hidden-layer threshold (0: exact)")
    embed_publish_threshold: float = Field(1e-4, ge=0, description="bounded mode: publish threshold on h_L")
    embed_reanchor_every: int = Field(256, ge=1, description="recompute a sum from its neighbours after this many deltas")
    embed_full_ratio: float | None = Field(
        None,
        ge=0,
        description="a layer whose delta messages reach this fraction of the graph's half-edges runs as a "
        "full pass instead (docs/engine.md 'Large batches'); unset: on CPU the break-even of the engine's own "
        "measured costs (0.1 until measured), on CUDA 0.02; 0: never",
    )

    # --- observability ---
    metrics_addr: str = Field("127.0.0.1:9464", description="host:port for /metrics; empty disables")
    log_level: str = "INFO"

    @property
    def idle_fetch_interval_s(self) -> float:
        """``idle_fetch_interval_ms`` in seconds, resolved: unset means 10 ms on the embedded
        noida-db, which answers empty fetches at once, and 0 (plain polls) elsewhere."""
        if self.idle_fetch_interval_ms is not None:
            return self.idle_fetch_interval_ms / 1000
        return 0.010 if self.local_broker == "noida" else 0.0

    @property
    def input_topics(self) -> list[str]:
        return [self.topic_products, self.topic_interactions, self.topic_relations]

    def to_env(self) -> dict[str, str]:
        """``KGS_*`` environment variables that reproduce these settings in a child process."""
        env: dict[str, str] = {}
        for name, value in self.model_dump().items():
            if value is None:
                continue
            if isinstance(value, SecretStr):
                value = value.get_secret_value()
            env[f"KGS_{name.upper()}"] = str(value)
        return env

    def local_dir(self, name: str) -> Path:
        """A sub-directory of the state dir, created on demand."""
        path = self.state_dir / name
        path.mkdir(parents=True, exist_ok=True)
        return path


def load_settings(**overrides: Any) -> Settings:
    """Settings from defaults < .env < environment < explicit overrides."""
    return Settings(**overrides)
