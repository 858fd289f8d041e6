"""streamer/kafka/paced_poll.py against the real noida-db, the broker it exists for.

The fetches are counted where kafka-python handles each fetch response (the instance's
``_fetcher._handle_fetch_response``, wrapped to count and then run as before): the client
talks to the real broker, only the count is added.
"""

from __future__ import annotations

import threading
import time
import uuid
from typing import Any

from kafka import KafkaConsumer, KafkaProducer
from kafka.admin import KafkaAdminClient, NewTopic
from kafka.structs import TopicPartition

from devtools.local_services import LocalServices
from streamer.kafka import paced_poll
from streamer.settings import Settings


def _topic(bootstrap: str) -> str:
    name = f"paced-{uuid.uuid4().hex[:8]}"
    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    try:
        admin.create_topics([NewTopic(name, 1, 1)])
    finally:
        admin.close()
    return name


def _counted_consumer(bootstrap: str, topic: str) -> tuple[KafkaConsumer, list[int]]:
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False, fetch_max_wait_ms=500)
    tp = TopicPartition(topic, 0)
    consumer.assign([tp])
    consumer.seek_to_end(tp)
    consumer.position(tp)
    responses = [0]
    handle = consumer._fetcher._handle_fetch_response

    def counting(*args: Any, **kwargs: Any) -> Any:
        responses[0] += 1
        return handle(*args, **kwargs)

    consumer._fetcher._handle_fetch_response = counting
    return consumer, responses


def test_noida_answers_an_empty_fetch_at_once_so_a_plain_poll_spins(noida_broker: LocalServices) -> None:
    """Why paced_poll exists: with fetch_max_wait_ms 500, a broker that holds empty fetches
    answers about 2 in one second; noida-db answered 1,778 here."""
    bootstrap = noida_broker.settings.bootstrap_servers
    consumer, responses = _counted_consumer(bootstrap, _topic(bootstrap))
    try:
        consumer.poll(timeout_ms=0)
        responses[0] = 0
        assert consumer.poll(timeout_ms=1000) == {}
        assert responses[0] > 200, f"{responses[0]} empty fetches in 1 s: noida-db now holds them; revisit paced_poll"
    finally:
        consumer.close()


def test_a_paced_poll_fetches_at_most_once_per_interval_and_still_returns_what_arrives(noida_broker: LocalServices) -> None:
    bootstrap = noida_broker.settings.bootstrap_servers
    topic = _topic(bootstrap)
    consumer, responses = _counted_consumer(bootstrap, topic)
    producer = KafkaProducer(bootstrap_servers=bootstrap, linger_ms=0)
    try:
        paced_poll.poll(consumer, 0, 0.01)
        responses[0] = 0
        t0 = time.monotonic()
        assert paced_poll.poll(consumer, 1000, 0.01) == {}
        waited = time.monotonic() - t0
        assert 0.95 <= waited < 1.5
        # one fetch per poll(timeout_ms=0), one poll per 10 ms interval: at most ~100 in 1 s
        assert responses[0] <= 110, f"{responses[0]} fetches in 1 s with a 10 ms interval"

        sent_at: list[float] = []

        def send_later() -> None:
            time.sleep(0.3)
            sent_at.append(time.monotonic())
            producer.send(topic, b"hello").get(timeout=10)

        sender = threading.Thread(target=send_later)
        sender.start()
        polled = paced_poll.poll(consumer, 3000, 0.01)
        got_at = time.monotonic()
        sender.join()
        assert [r.value for records in polled.values() for r in records] == [b"hello"]
        assert got_at - sent_at[0] < 0.5  # it returned when the record came, not at the timeout
    finally:
        producer.close()
        consumer.close()


def test_the_interval_is_on_for_the_embedded_noida_and_off_elsewhere() -> None:
    assert Settings(_env_file=None, local_broker="noida").idle_fetch_interval_s == 0.010
    assert Settings(_env_file=None, local_broker="tansu").idle_fetch_interval_s == 0.0
    assert Settings(_env_file=None, local_broker="noida", idle_fetch_interval_ms=0).idle_fetch_interval_s == 0.0
    assert Settings(_env_file=None, idle_fetch_interval_ms=25).idle_fetch_interval_s == 0.025
