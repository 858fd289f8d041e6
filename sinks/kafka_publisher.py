"""Kafka producer sink: publish records and wait until the broker acknowledged every one.

``KafkaPublisher.publish(topic, records)`` sends a list of (key, value, headers) and returns
only when each record is acknowledged (acks=all); any failure raises ``PublishFailed`` and the
caller must not commit the offsets the records cover. Retries are safe for ordering because
at most one request per connection is in flight.

Each record goes to the partition Kafka's default partitioner picks for its key (murmur2, as in
every Kafka client), computed here once per key and remembered (``_partitioner``); a record
without a key goes to the next partition in turn. A partition's records keep their order.

The records of a publish are packed into record batches many at a time
(``sinks/record_batches.py``) and handed to kafka-python's producer, which sends, retries and
sequences them as its own. kafka-python's ``send`` costs 25-45 µs a record here, most of what
publishing vectors cost before; packing costs a few. If a broker ever splits one of these
batches (MESSAGE_TOO_LARGE: its ``message.max.bytes`` is under the 256 KB batch), that publish
fails and the publisher sends record by record (``send``) from then on, which kafka-python splits.

A publish waits at most ``timeout_s`` (metadata, buffer space and acknowledgements together),
so a broker that is down turns into ``PublishFailed`` (backpressure upstream) within seconds,
not minutes. After a failure the producer is replaced by a new one: a broker that restarted
without its producer state answers the old producer's sequence numbers with
OutOfOrderSequenceNumber, and a fresh producer starts clean.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

from kafka import KafkaProducer
from kafka.partitioner.default import murmur2
from kafka.producer.producer_batch import ProducerBatch
from kafka.structs import TopicPartition

from sinks import record_batches
from streamer.settings import Settings

Record = tuple[bytes | None, bytes | None, list[tuple[str, bytes]]]

KEYS_REMEMBERED = 200_000  # per topic: the partition of this many keys is kept (about 30 MB)


class PublishFailed(Exception):
    """At least one record was not acknowledged by the broker."""


class KafkaPublisher:
    def __init__(self, settings: Settings, client_id: str = "kg-streamer", timeout_s: float = 20.0):
        self.settings = settings
        self.client_id = client_id
        self.timeout_s = timeout_s
        self.producer: KafkaProducer | None = self._new_producer()
        self.key_partitions: dict[str, tuple[list[int], dict[bytes, int]]] = {}
        self.record_by_record = False  # True once a broker split one of our batches (MESSAGE_TOO_LARGE)

    def _new_producer(self) -> KafkaProducer:
        return KafkaProducer(
            bootstrap_servers=self.settings.bootstrap_servers,
            client_id=self.client_id,
            acks="all",
            linger_ms=5,
            batch_size=256 * 1024,
            retries=5,
            max_in_flight_requests_per_connection=1,
            request_timeout_ms=int(self.timeout_s * 1000),
            max_block_ms=int(self.timeout_s * 1000),
            max_request_size=4 * 1024 * 1024,
        )

    def publish(self, topic: str, records: Iterable[Record]) -> int:
        try:
            if self.producer is None:
                self.producer = self._new_producer()
            producer = self.producer
            partition_of = self._partitioner(producer, topic)
            if self.record_by_record:
                return self._send_each(producer, topic, records, partition_of)
            by_partition: dict[int, list[Record]] = {}
            for record in records:
                by_partition.setdefault(partition_of(record[0]), []).append(record)
            if not by_partition:
                return 0
            config = producer.config
            sent: list[ProducerBatch] = []
            now_ms = int(time.time() * 1000)
            for partition, group in by_partition.items():
                sections = record_batches.pack(group, config["batch_size"], config["max_request_size"])
                sent += record_batches.enqueue(producer, TopicPartition(topic, partition), sections, now_ms)
            producer.flush(timeout=self.timeout_s)
            failed = record_batches.failures(sent)
            if failed:
                if any(reason.endswith(": split") for reason in failed):
                    self.record_by_record = True  # the broker refuses our batch size: let kafka-python split
                raise PublishFailed(f"{len(failed)} of {len(sent)} batches not acknowledged: {failed[0]}")
        except Exception as exc:
            self._replace()
            if isinstance(exc, PublishFailed):
                raise
            raise PublishFailed(f"{topic}: {type(exc).__name__}: {exc}") from exc
        return sum(map(len, by_partition.values()))

    def _send_each(
        self, producer: KafkaProducer, topic: str, records: Iterable[Record], partition_of: Callable[[bytes | None], int]
    ) -> int:
        """kafka-python's own path, one ``send`` per record (after a broker split a batch)."""
        futures = [
            producer.send(topic, key=key, value=value, headers=headers, partition=partition_of(key))
            for key, value, headers in records
        ]
        producer.flush(timeout=self.timeout_s)
        for future in futures:
            future.get(timeout=0)
        return len(futures)

    def _partitioner(self, producer: KafkaProducer, topic: str) -> Callable[[bytes | None], int]:
        """The partition of a key as every Kafka client's default partitioner picks it (murmur2
        of the key over the sorted partitions; a record without a key goes to the next partition
        in turn), with the keys' partitions remembered. kafka-python's partitioner is pure
        Python, and vectors and changes are keyed by node: the same keys come back."""
        partitions: list[int] = sorted(producer.partitions_for(topic))
        known, remembered = self.key_partitions.get(topic, ([], {}))
        if known != partitions or len(remembered) > KEYS_REMEMBERED:
            remembered = {}
            self.key_partitions[topic] = (partitions, remembered)

        spread = [0]  # keyless records go round the partitions

        def partition_of(key: bytes | None) -> int:
            if key is None:
                spread[0] = (spread[0] + 1) % len(partitions)
                return partitions[spread[0]]
            partition = remembered.get(key)
            if partition is None:
                partition = remembered[key] = partitions[(murmur2(key) & 0x7FFFFFFF) % len(partitions)]
            return partition

        return partition_of

    def _replace(self) -> None:
        """Drop the producer; the next publish makes a new one (the broker may still be down)."""
        if self.producer is not None:
            try:
                self.producer.close(timeout=0)
            except Exception:  # noqa: BLE001 - a broken producer may fail to close; it is dropped anyway
                pass
        self.producer = None

    def close(self) -> None:
        if self.producer is not None:
            self.producer.close(timeout=10)
