"""Create the project's topics, idempotently: ``ensure_topics(settings)``.

Topics: the input topics (``settings.input_topics``, ``settings.input_partitions`` each),
``kg.changes`` (``settings.changes_partitions``, 1 by default: the graph's changelog stays
totally ordered), ``kg.dlq`` (1 partition) and ``kg.embeddings`` (``input_partitions``,
``cleanup.policy=compact``: the latest vector per node key, and ``segment.ms`` =
``settings.embeddings_segment_ms``: compaction never touches the active segment, so without it
the topic would keep every vector ever published until a week-old segment rolls), and with
sharded embedding workers (``embed_shards`` > 0) ``kg.shards`` with one partition per shard and
no records (streamer/embed/shards.py). A topic that
already exists is left as it is (its partition count and configs are not changed; a partition
mismatch is logged as a warning).

What the brokers do (measured with kafka-python 3.0.12):

- CreateTopics with per-topic configs: **noida-db 0.2.3** creates the topic and stores the
  configs (DescribeConfigs returns ``cleanup.policy=compact``). **Tansu 0.6.0** creates the
  topic and answers success, but drops the configs (DescribeConfigs returns nothing), so
  kg.embeddings is not compacted there. Neither embedded broker is relied on to compact:
  consumers of kg.embeddings must take the latest record per key anyway (as on real Kafka,
  where compaction is lazy). A repeated CreateTopics gives TopicAlreadyExists (error 36) on
  both, which is what makes this function idempotent.
- Auto-create: both create an unknown topic when a *producer* asks for its metadata (noida-db
  with 1 partition, Tansu with 4); a consumer's metadata request does not create it. Real
  Kafka may have auto-create off. So every topic is created here, explicitly, before use.
- ``replication_factor=-1`` (the broker's default, Kafka >= 2.4) works on both and on real
  Kafka, so production gets its cluster's default replication without a setting.
- End offsets: noida-db answers ``end_offsets()`` correctly; Tansu answers the base offset of
  the last *batch* + 1 (wrong as soon as a batch holds more than one record): compute lag from
  ``consumer.highwater()`` after a fetch, not from ``end_offsets()``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from typing import Any

from kafka import KafkaConsumer
from kafka.admin import KafkaAdminClient
from kafka.consumer.fetcher import ConsumerRecord
from kafka.errors import TopicAlreadyExistsError, for_code
from kafka.structs import TopicPartition

from streamer.settings import Settings

log = logging.getLogger(__name__)


def topic_plan(settings: Settings) -> dict[str, dict[str, Any]]:
    """Every topic the project uses -> its CreateTopics options."""

    def topic(partitions: int, **configs: str) -> dict[str, Any]:
        return {"num_partitions": partitions, "replication_factor": -1, "configs": configs}

    plan = {name: topic(settings.input_partitions) for name in settings.input_topics}
    plan[settings.topic_changes] = topic(settings.changes_partitions)
    plan[settings.topic_dlq] = topic(1)
    plan[settings.topic_embeddings] = topic(
        settings.input_partitions,
        **{"cleanup.policy": "compact", "segment.ms": str(settings.embeddings_segment_ms)},
    )
    if settings.embed_shards:  # sharded embedding workers: ownership only, no records
        plan[settings.topic_shards] = topic(settings.embed_shards)
    return plan


def ensure_topics(settings: Settings, timeout_s: float = 30.0) -> list[str]:
    """Create the project's topics that do not exist yet; return the names it created."""
    plan = topic_plan(settings)
    admin = KafkaAdminClient(
        bootstrap_servers=settings.bootstrap_servers, client_id="kgs-topics", request_timeout_ms=int(timeout_s * 1000)
    )
    try:
        response = admin.create_topics(plan, timeout_ms=int(timeout_s * 1000), raise_errors=False)
        created: list[str] = []
        for result in response["topics"]:
            error = for_code(result["error_code"])
            if result["error_code"] == 0:
                created.append(result["name"])
            elif error is not TopicAlreadyExistsError:
                raise error(f"creating topic {result['name']}: {result.get('error_message')}")
        existing = {t["name"]: len(t["partitions"]) for t in admin.describe_topics(list(plan))}
    finally:
        admin.close()
    for name, options in plan.items():
        if existing.get(name) != options["num_partitions"]:
            log.warning(
                "topic %s has %s partitions, settings ask for %d (left as it is)",
                name,
                existing.get(name),
                options["num_partitions"],
            )
    if created:
        log.info("created topics %s", ", ".join(created))
    return created


def read_to_end(settings: Settings, topic: str, timeout_s: float = 600.0) -> Iterator[ConsumerRecord]:
    """Every record of ``topic``, all partitions, from the start to the log end as it is when
    the read reaches it (a consumer without a group; for audits and tools, not the pipeline).
    Waits for the topic's metadata (a broker that just started may not know it for a moment),
    and stops when every partition's position has reached its high watermark. Raises
    ``TimeoutError`` if that does not happen within ``timeout_s``."""
    consumer = KafkaConsumer(
        bootstrap_servers=settings.bootstrap_servers, group_id=None, enable_auto_commit=False, fetch_max_bytes=32 << 20
    )
    try:
        deadline = time.monotonic() + timeout_s
        partitions = consumer.partitions_for_topic(topic)
        metadata_deadline = min(deadline, time.monotonic() + 30)
        while not partitions and time.monotonic() < metadata_deadline:
            consumer.topics()  # a metadata request for every topic
            partitions = consumer.partitions_for_topic(topic)
            if not partitions:
                time.sleep(0.2)
        if not partitions:
            return
        tps = [TopicPartition(topic, p) for p in sorted(partitions)]
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
        while True:
            batch = consumer.poll(timeout_ms=500)
            for records in batch.values():
                yield from records
            if not batch and all((hw := consumer.highwater(tp)) is not None and consumer.position(tp) >= hw for tp in tps):
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"{topic}: not read to the end within {timeout_s}s")
    finally:
        consumer.close()
