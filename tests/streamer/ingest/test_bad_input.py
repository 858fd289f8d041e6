"""No message stops ingest: a real consumer over topics where bad messages are mixed with good.

Every valid event is applied (the graph equals a clean run of the valid events alone), every
invalid message lands on kg.dlq exactly once with its source topic, partition, offset and
error class, a value too large for the DLQ arrives truncated with its original size and
SHA-256, the nasty-but-valid values are stored verbatim, the offsets are committed to the log
end, and the consumer is still running when it is all done (long-lived mode, in a thread).
"""

from __future__ import annotations

import hashlib
import random
import threading
import uuid

import pytest
from kafka import KafkaProducer

from streamer.contracts.events import InvalidEvent, decode_event
from streamer.ingest.step import ingest_consumer
from tests.conftest import wait_for
from tests.helpers import event_message, nasty_event_cases, query, read_topic, sample_events
from tests.streamer.kafka.test_broker_behaviour import assert_same_graph, clean_run, committed_offsets, derive


def is_valid(raw: bytes) -> bool:
    try:
        decode_event(raw)
        return True
    except InvalidEvent:
        return False


def random_messages(seed: int, n: int) -> list[bytes]:
    """Arbitrary bytes, and JSON-looking bytes with a byte flipped."""
    rng = random.Random(seed)
    out = [bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 300))) for _ in range(n // 2)]
    good = b'{"type":"product","id":"r","ts":1,"title":"t"}'
    for _ in range(n - len(out)):
        b = bytearray(good)
        b[rng.randrange(len(b))] = rng.getrandbits(8)
        out.append(bytes(b))
    return out


@pytest.fixture
def prefix() -> str:
    return f"bad{uuid.uuid4().hex[:8]}-"


def test_bad_messages_go_to_the_dlq_exactly_once_and_ingest_keeps_running(settings, prefix):
    clean_run(settings, sample_events(prefix + "clean-"))
    valid_events = sample_events(prefix + "run-")
    run = derive(settings, batch_max_events=50, batch_max_wait_s=0.1)
    nasty = nasty_event_cases(prefix)  # ids outside the "run-" graph compared below
    rng = random.Random(7)
    # the invalid messages go to every input topic, interleaved with the valid stream
    messages = [event_message(run, e) for e in valid_events]
    extra = [(name, raw) for name, raw, _ in nasty] + [(f"random{i}", raw) for i, raw in enumerate(random_messages(11, 40))]
    for name, raw in extra:
        topic = rng.choice(run.input_topics)
        messages.insert(rng.randrange(len(messages) + 1), (topic, name.encode(), raw))
    expected_dead = {name for name, raw in extra if not is_valid(raw)}
    assert {name for name, _, valid in nasty if not valid} <= expected_dead

    producer = KafkaProducer(
        bootstrap_servers=run.bootstrap_servers, acks="all", max_request_size=8 << 20, max_in_flight_requests_per_connection=1
    )
    futures = [(key, producer.send(topic, key=key, value=value)) for topic, key, value in messages]
    producer.flush()
    acked = [(key, f.get(timeout=30)) for key, f in futures]
    producer.close()
    sent = {key: meta for key, meta in acked if key.decode() in {name for name, _ in extra}}  # the extra ones' keys are unique
    ends: dict = {}
    for _, meta in acked:
        tp = (meta.topic, meta.partition)
        ends[tp] = max(ends.get(tp, 0), meta.offset + 1)

    ingest = ingest_consumer(run)
    result: dict = {}
    thread = threading.Thread(target=lambda: result.setdefault("stats", ingest.run(max_seconds=240)), daemon=True)
    thread.start()

    def committed() -> dict:
        return {(tp.topic, tp.partition): off for tp, off in committed_offsets(run).items() if off}

    try:
        try:
            wait_for(lambda: committed() == ends, timeout_s=180, interval_s=0.5, what="every message committed")
        except AssertionError as exc:
            raise AssertionError(f"{exc}: committed {sorted(committed().items())}, log ends {sorted(ends.items())}") from None
        assert thread.is_alive(), f"ingest stopped: {result}"
    finally:
        ingest.stop()
        thread.join(60)
    stats = result["stats"]

    # every invalid message on the DLQ exactly once, with where it came from and why
    dlq = read_topic(run, run.topic_dlq, expect=len(expected_dead), timeout_s=30)
    by_name: dict[str, list] = {}
    for record in dlq:
        by_name.setdefault(record.key.decode(), []).append(record)
    assert set(by_name) == expected_dead
    assert all(len(records) == 1 for records in by_name.values()), {k: len(v) for k, v in by_name.items() if len(v) > 1}
    for name, (record,) in by_name.items():
        headers = dict(record.headers)
        meta = sent[name.encode()]
        assert headers["__connect.errors.topic"].decode() == meta.topic
        assert int(headers["__connect.errors.offset"]) == meta.offset
        assert headers["__connect.errors.exception.class.name"], name
    big = dict(by_name["three_megabytes"][0].headers)
    original = dict((n, r) for n, r, _ in nasty)["three_megabytes"]
    assert int(big["kgs.original.size"]) == len(original)
    assert big["kgs.original.sha256"].decode() == hashlib.sha256(original).hexdigest()
    assert len(by_name["three_megabytes"][0].value) == run.dlq_max_value_bytes
    assert dict(by_name["deep_array"][0].headers)["__connect.errors.exception.class.name"] == b"TooDeep"

    # every valid event applied: the graph equals a clean run of the valid events
    assert stats.dead_letters == len(expected_dead)
    assert stats.events_in == len(messages)
    assert_same_graph(settings, prefix)
    for name, raw, valid in nasty:
        if valid:
            event = decode_event(raw)
            stored = query(settings, "MATCH (p:Product {id: $id}) RETURN p.title AS t, p.description AS d", id=event.id)
            assert stored == [{"t": event.title, "d": event.description}], name


class NotUtf8(str):
    """A header key whose bytes on the wire are not UTF-8 (legal in Kafka's protocol, and what
    a librdkafka producer can send); kafka-python's producer asks the key for its bytes."""

    def encode(self, *_args, **_kwargs) -> bytes:  # type: ignore[override]
        return b"\xff\xfebad-key"


def test_a_record_the_kafka_client_cannot_parse_is_dead_lettered_and_skipped(settings, prefix):
    """kafka-python refuses a header key that is not UTF-8 (CorruptRecordError on every poll,
    then a busy loop). The consumer finds the partition, dead-letters the offset as
    CorruptRecord and goes on; records in other partitions and after it are applied."""
    clean_run(settings, sample_events(prefix + "clean-"))
    events = sample_events(prefix + "run-")
    run = derive(settings, batch_max_events=20, batch_max_wait_s=0.1)
    producer = KafkaProducer(bootstrap_servers=run.bootstrap_servers, acks="all", max_in_flight_requests_per_connection=1)
    half = len(events) // 2
    for e in events[:half]:
        topic, key, value = event_message(run, e)
        producer.send(topic, key=key, value=value)
    producer.flush()
    poison = producer.send(
        run.topic_products,
        key=b"poison",
        value=b'{"type":"product","id":"p","ts":1}',
        partition=0,
        headers=[(NotUtf8("k"), b"v")],
    ).get(timeout=30)
    for e in events[half:]:
        topic, key, value = event_message(run, e)
        producer.send(topic, key=key, value=value)
    producer.flush()
    producer.close()

    stats = ingest_consumer(run).run(until_caught_up=True, max_seconds=120)
    dlq = read_topic(run, run.topic_dlq, expect=1)
    assert len(dlq) == 1
    headers = dict(dlq[0].headers)
    assert headers["__connect.errors.exception.class.name"] == b"CorruptRecord"
    assert (
        headers["__connect.errors.topic"].decode(),
        int(headers["__connect.errors.partition"]),
        int(headers["__connect.errors.offset"]),
    ) == (poison.topic, poison.partition, poison.offset)
    assert stats.dead_letters == 1
    assert_same_graph(settings, prefix)
