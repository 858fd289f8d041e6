"""``poll`` for brokers that answer an empty fetch at once: fetch at a set interval instead of
spinning.

A Kafka broker holds a fetch that finds no new record for up to ``fetch.max.wait.ms``
(``settings.fetch_max_wait_ms``) and answers as soon as a record arrives, so a consumer
waiting in ``KafkaConsumer.poll(timeout_ms=T)`` sleeps on its socket. Tansu does the same.
noida-db does not: it answers every fetch at once, empty or not, and kafka-python's ``poll``
then sends the next fetch at once, for the whole of ``T``. Measured here (2 cores): one
consumer waiting on a quiet noida-db topic used 90-100% of a core, 800 to 1,800 fetches a
second; on Tansu 1-4%. Every consumer of the pipeline waits like that between batches (the
adaptive batch wait), so on noida-db they burned the cores the pipeline needs
(docs/reliability.md, "The consumers spun on noida-db").

``poll(consumer, timeout_ms, interval_s)`` with ``interval_s > 0`` polls without waiting
(``timeout_ms=0``: it hands back what earlier fetches brought and sends the next fetch) and,
while nothing has come, waits ``interval_s`` before the next try, until ``timeout_ms`` has
passed. The wait stands in for the broker's: it is not backpressure (that pauses partitions,
``streamer/kafka/consumer.py``), the loop still returns within ``timeout_ms``, and
kafka-python heartbeats from its own thread. The price is latency: a record waits up to about
two intervals (one for the fetch that finds it, one for the poll that takes it; measured with
10 ms: p50 17 ms, p99 24 ms). ``settings.idle_fetch_interval_s`` is 10 ms on the embedded
noida-db and 0 (this module stays out of the way) everywhere else.

While the consumer has no assignment (joining the group) the plain ``poll`` runs: the group
protocol needs its blocking time.
"""

from __future__ import annotations

import time
from typing import cast

from kafka import KafkaConsumer
from kafka.consumer.fetcher import ConsumerRecord
from kafka.structs import TopicPartition

Polled = dict[TopicPartition, list[ConsumerRecord]]


def poll(consumer: KafkaConsumer, timeout_ms: int, interval_s: float, max_records: int | None = None) -> Polled:
    """``consumer.poll(timeout_ms, max_records)``, fetching at most every ``interval_s`` while
    nothing arrives (module docstring); ``interval_s <= 0`` is the plain ``poll``."""
    if interval_s <= 0 or timeout_ms <= 0 or not consumer.assignment():
        return cast(Polled, consumer.poll(timeout_ms=timeout_ms, max_records=max_records))
    deadline = time.monotonic() + timeout_ms / 1000
    while True:
        polled = cast(Polled, consumer.poll(timeout_ms=0, max_records=max_records))
        left = deadline - time.monotonic()
        if polled or left <= 0:
            return polled
        time.sleep(min(interval_s, left))
