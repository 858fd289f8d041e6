"""Kafka producer sink: publish records and wait until the broker acknowledged every one.

``KafkaPublisher.publish(topic, records)`` sends a list of (key, value, headers) and returns
only when each record is acknowledged (acks=all); any failure raises ``PublishFailed`` and the
caller must not commit the offsets the records cover. Retries are safe for ordering because
at most one request per connection is in flight.

``send(topic, records)`` hands the records to the producer and returns at once with a ``Sent``
whose ``wait()`` returns when every one of them is acknowledged (or raises ``PublishFailed``).
Ingest uses it to write the next batch to the graph while the broker acknowledges this one's
changes (streamer/kafka/consumer.py, lifecycle step 3). Records sent later never make an
earlier ``wait()`` longer: it waits on its own records only, not on a flush of the producer.

A publish waits at most ``timeout_s`` (metadata, buffer space and acknowledgements together),
so a broker that is down turns into ``PublishFailed`` (backpressure upstream) within seconds,
not minutes. After a failure the producer is replaced by a new one: a broker that restarted
without its producer state answers the old producer's sequence numbers with
OutOfOrderSequenceNumber, and a fresh producer starts clean.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

from kafka import KafkaProducer

from streamer.settings import Settings

Record = tuple[bytes | None, bytes | None, list[tuple[str, bytes]]]


class PublishFailed(Exception):
    """At least one record was not acknowledged by the broker."""


class Sent:
    """Records handed to the producer; ``wait()`` returns their count once the broker has
    acknowledged every one, and raises ``PublishFailed`` (the producer is replaced) otherwise."""

    def __init__(self, publisher: KafkaPublisher, topic: str, producer: Any, futures: list[Any]):
        self.publisher, self.topic, self.producer, self.futures = publisher, topic, producer, futures

    def wait(self) -> int:
        deadline = time.monotonic() + self.publisher.timeout_s
        try:
            for future in self.futures:
                future.get(timeout=max(0.0, deadline - time.monotonic()))
        except Exception as exc:
            self.publisher._replace(self.producer)
            raise PublishFailed(f"{self.topic}: {type(exc).__name__}: {exc}") from exc
        return len(self.futures)


class KafkaPublisher:
    def __init__(self, settings: Settings, client_id: str = "kg-streamer", timeout_s: float = 20.0):
        self.settings = settings
        self.client_id = client_id
        self.timeout_s = timeout_s
        self.producer: KafkaProducer | None = self._new_producer()

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
        sent = self.send(topic, records)
        if not sent.futures:
            return 0
        try:
            sent.producer.flush(timeout=self.timeout_s)  # send now, without waiting for linger_ms
        except Exception as exc:
            self._replace(sent.producer)
            raise PublishFailed(f"{topic}: {type(exc).__name__}: {exc}") from exc
        return sent.wait()

    def send(self, topic: str, records: Iterable[Record]) -> Sent:
        """Hand ``records`` to the producer; ``wait()`` on the result before committing them."""
        producer = self.producer
        try:
            if producer is None:
                producer = self.producer = self._new_producer()
            futures = [producer.send(topic, key=key, value=value, headers=headers) for key, value, headers in records]
        except Exception as exc:
            self._replace(producer)
            raise PublishFailed(f"{topic}: {type(exc).__name__}: {exc}") from exc
        return Sent(self, topic, producer, futures)

    def _replace(self, failed: KafkaProducer | None) -> None:
        """Drop the producer that failed; the next send makes a new one (the broker may still be
        down). A producer already replaced after an earlier failure is left alone."""
        if failed is None or failed is not self.producer:
            return
        dropped: Any = failed
        self.producer = None
        try:
            dropped.close(timeout=0)
        except Exception:  # noqa: BLE001 - a broken producer may fail to close; it is dropped anyway
            pass

    def close(self) -> None:
        if self.producer is not None:
            self.producer.close(timeout=10)
