"""``sinks.record_batches``: the batches it packs are, byte for byte, the batches kafka-python
builds record by record (so an upgrade of kafka-python that changes either fails here), and
records published through it come back whole and in order from a real broker."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import settings as hsettings
from hypothesis import strategies as st
from kafka import KafkaConsumer, TopicPartition
from kafka.errors import MessageSizeTooLargeError
from kafka.producer.producer_batch import ProducerBatch
from kafka.record.memory_records import MemoryRecords, MemoryRecordsBuilder

from sinks import record_batches
from sinks.kafka_publisher import KafkaPublisher, PublishFailed

CONFIG = {"message_version": 2, "compression_attrs": 0, "batch_size": 4096}
TS = 1_795_650_000_123


def kafka_python_batches(records, batch_size, producer_state=None):
    """What kafka-python's accumulator builds from the same records, one ``append`` each."""
    out, builder = [], None
    for key, value, headers in records:
        if builder is None or builder.append(TS, key, value, headers) is None:
            if builder is not None:
                out.append(builder)
            builder = MemoryRecordsBuilder(2, 0, batch_size)
            assert builder.append(TS, key, value, headers) is not None
    if builder is not None:
        out.append(builder)
    return [close(b, producer_state) for b in out]


def packed_batches(records, batch_size, producer_state=None):
    sections = record_batches.pack(records, batch_size, 1 << 20)
    assert all(s.count for s in sections)
    return [close(record_batches.records_builder(s, TS, {**CONFIG, "batch_size": batch_size}), producer_state) for s in sections]


def close(builder, producer_state):
    if producer_state is not None:
        builder.set_producer_state(*producer_state, False)
    builder.close()
    return bytes(builder.buffer())


header_lists = st.lists(st.tuples(st.text(max_size=12), st.one_of(st.none(), st.binary(max_size=40))), max_size=3)
records_strategy = st.lists(
    st.tuples(
        st.one_of(st.none(), st.binary(max_size=30)),
        st.one_of(st.none(), st.binary(max_size=900), st.binary(min_size=8190, max_size=8200)),
        st.sampled_from([[], [("model_version", b"g1"), ("content-type", b"application/x-kgs-vector")]]) | header_lists,
    ).filter(lambda r: r[0] is not None or r[1] is not None),
    min_size=1,
    max_size=60,
)


@hsettings(max_examples=150, deadline=None)
@given(records=records_strategy, batch_size=st.sampled_from([200, 1500, 4096, 65536]))
def test_packed_batches_equal_kafka_pythons_byte_for_byte(records, batch_size):
    assert packed_batches(records, batch_size) == kafka_python_batches(records, batch_size)


def test_equal_with_an_idempotent_producers_id_and_sequence():
    records = [(f"Product:{i}".encode(), bytes(range(i % 200)), [("h", b"v")]) for i in range(400)]
    state = (4242, 3, 17)  # producer id, epoch, base sequence: set when the sender drains a batch
    ours, theirs = packed_batches(records, 16384, state), kafka_python_batches(records, 16384, state)
    assert len(ours) > 1 and ours == theirs
    decoded = [r for batch in ours for b in MemoryRecords(batch) for r in b]
    assert [(r.key, r.value) for r in decoded] == [(k, v) for k, v, _ in records]
    assert all(b.validate_crc() for batch in ours for b in MemoryRecords(batch))


def test_a_record_too_big_or_empty_fails_before_anything_is_packed():
    with pytest.raises(MessageSizeTooLargeError):
        record_batches.pack([(b"k", b"x" * 10, []), (b"big", b"x" * 5000, [])], 4096, 4096)
    with pytest.raises(ValueError, match="a key or a value"):
        record_batches.pack([(b"k", b"x", []), (None, None, [])], 4096, 4096)


def test_failures_name_the_batch_and_the_reason():
    tp = TopicPartition("kg.embeddings", 3)
    section = record_batches.pack([(b"k", b"v", [])], 4096, 1 << 20)[0]
    ok, failed, unsent = (ProducerBatch(tp, record_batches.records_builder(section, TS, CONFIG)) for _ in range(3))
    ok.produce_future.success((0, -1, None))
    failed.produce_future.failure(MessageSizeTooLargeError("too big"))
    reasons = record_batches.failures([ok, failed, unsent])
    assert reasons == [f"{tp}: MessageSizeTooLargeError: [Error 10] MessageSizeTooLargeError: too big", f"{tp}: split"]


@pytest.mark.parametrize("record_by_record", [False, True], ids=["packed", "send"])
def test_published_records_come_back_whole_and_in_order(settings, record_by_record):
    """Through a real broker: 3,000 records of up to 2 KB (tombstones, keyless records, header
    values that are empty) over several publishes, both paths; the consumer checks each batch's CRC."""
    topic = settings.topic_embeddings
    published = []
    publisher = KafkaPublisher(settings, client_id="t-record-batches")
    publisher.record_by_record = record_by_record
    try:
        for round_ in range(3):
            records = []
            for i in range(1000):
                key = None if i % 97 == 1 else f"Product:{i % 300}".encode()
                value = None if i % 89 == 0 else bytes([round_]) * (i * 7 % 2048)
                headers = [("model_version", f"g{round_}".encode()), ("kgs.empty", b"")] if i % 5 else []
                records.append((key, value, headers))
            assert publisher.publish(topic, records) == len(records)
            published += records
    finally:
        publisher.close()
    reader = KafkaConsumer(
        topic,
        bootstrap_servers=settings.bootstrap_servers,
        auto_offset_reset="earliest",
        consumer_timeout_ms=5000,
        check_crcs=True,
    )
    try:
        landed = list(reader)
    finally:
        reader.close()
    assert len(landed) == len(published)
    key_partition = {r.key: r.partition for r in landed if r.key is not None}
    for partition in {r.partition for r in landed}:
        got = [(r.key, r.value, [(k, v) for k, v in r.headers]) for r in landed if r.partition == partition]
        sent = [r for r in published if r[0] is not None and key_partition[r[0]] == partition]
        keyed = [r for r in got if r[0] is not None]
        assert keyed == [(k, v, list(h)) for k, v, h in sent]  # a partition's records keep their order
    keyless = sorted((r.value or b"") for r in landed if r.key is None)
    assert keyless == sorted((r[1] or b"") for r in published if r[0] is None)
    assert len({r.partition for r in landed if r.key is None}) > 1, "keyless records go round the partitions"


def test_an_oversized_record_fails_the_publish_and_nothing_of_it_lands(settings):
    topic = settings.topic_dlq
    publisher = KafkaPublisher(settings, client_id="t-record-batches-big")
    try:
        with pytest.raises(PublishFailed, match="MessageSizeTooLargeError"):
            publisher.publish(topic, [(b"a", b"small", []), (b"b", b"x" * (5 << 20), [])])
        assert publisher.publish(topic, [(b"c", b"after", [])]) == 1  # the publisher goes on
    finally:
        publisher.close()
    reader = KafkaConsumer(
        topic, bootstrap_servers=settings.bootstrap_servers, auto_offset_reset="earliest", consumer_timeout_ms=4000
    )
    try:
        assert [r.key for r in reader] == [b"c"]
    finally:
        reader.close()
