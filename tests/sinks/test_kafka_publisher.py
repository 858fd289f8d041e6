"""``sinks.kafka_publisher`` against a real broker: records land on the partition every Kafka
client's default partitioner picks for their key, although the publisher computes (and
remembers) that partition itself instead of calling kafka-python's partitioner."""

from __future__ import annotations

from kafka import KafkaConsumer
from kafka.partitioner.default import DefaultPartitioner

from sinks.kafka_publisher import KafkaPublisher


class _Cluster:
    """What kafka-python's DefaultPartitioner reads of the cluster metadata."""

    def __init__(self, topic: str, partitions: set[int]):
        self.topic, self.partitions = topic, partitions

    def topics(self) -> set[str]:
        return {self.topic}

    def partitions_for_topic(self, topic: str) -> set[int]:
        return self.partitions

    def available_partitions_for_topic(self, topic: str) -> set[int]:
        return self.partitions


def test_records_land_on_the_default_partitioners_partition(settings):
    topic = settings.topic_embeddings
    keys = [f"Product:{i}".encode() for i in range(300)] + [b"", "User:\u00e9\u4e2d".encode(), b"\xff" * 40]
    publisher = KafkaPublisher(settings, client_id="t-partitions")
    try:
        # twice: the second time every key's partition comes from what the publisher remembered
        for round_ in (b"1", b"2"):
            assert publisher.publish(topic, ((k, round_, []) for k in keys)) == len(keys)
    finally:
        publisher.close()
    reader = KafkaConsumer(
        topic, bootstrap_servers=settings.bootstrap_servers, auto_offset_reset="earliest", consumer_timeout_ms=5000
    )
    try:
        landed = [(r.key, r.partition) for r in reader]
    finally:
        reader.close()
    assert len(landed) == 2 * len(keys)
    partitions = {p for _, p in landed}
    assert len(partitions) > 1, "the keys spread over the topic's partitions"
    count = settings.input_partitions  # kg.embeddings has as many partitions as the inputs
    expected = DefaultPartitioner()
    cluster = _Cluster(topic, set(range(count)))
    for key, partition in landed:
        assert partition == expected.partition(topic, key, key, None, None, cluster), key
