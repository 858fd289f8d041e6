"""Kafka producer sink: publish records and wait until the broker acknowledged every one.

``KafkaPublisher.publish(topic, records)`` sends a list of (key, value, headers) and returns
only when each record is acknowledged (acks=all); any failure raises ``PublishFailed`` and the
caller must not commit the offsets the records cover. Retries are safe for ordering because
at most one request per connection is in flight.
"""

from __future__ import annotations

from collections.abc import Iterable

from kafka import KafkaProducer

from streamer.settings import Settings

Record = tuple[bytes | None, bytes | None, list[tuple[str, bytes]]]


class PublishFailed(Exception):
    """At least one record was not acknowledged by the broker."""


class KafkaPublisher:
    def __init__(self, settings: Settings, client_id: str = "kg-streamer"):
        self.producer = KafkaProducer(
            bootstrap_servers=settings.bootstrap_servers,
            client_id=client_id,
            acks="all",
            linger_ms=5,
            batch_size=256 * 1024,
            retries=5,
            max_in_flight_requests_per_connection=1,
            request_timeout_ms=30_000,
        )

    def publish(self, topic: str, records: Iterable[Record], timeout_s: float = 60.0) -> int:
        futures = [self.producer.send(topic, key=key, value=value, headers=headers) for key, value, headers in records]
        if not futures:
            return 0
        self.producer.flush(timeout=timeout_s)
        for future in futures:
            try:
                future.get(timeout=0)
            except Exception as exc:
                raise PublishFailed(f"{topic}: {exc}") from exc
        return len(futures)

    def close(self) -> None:
        self.producer.close(timeout=10)
