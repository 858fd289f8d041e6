"""Kafka record batches (message format v2) built many records at a time, for kafka-python.

Why
---
``KafkaProducer.send`` builds its batch one record at a time, in Python: argument checks, a
size estimate, a future per record, the accumulator's lock, and ``DefaultRecordBatchBuilder.
append``'s varints. That is 25-45 µs a record here, and publishing the vectors of a large
micro-batch is most of what the worker waits for (docs/performance.md "Publishing").

What
----
``pack(records, batch_size, max_request_size)`` writes the *records section* of the batches a
partition's records go into, in their order: each record in the v2 wire format, with timestamp
delta 0 (one CreateTime per publish), offset delta = its place in the batch, and its headers
encoded once per distinct header list. A batch takes records until the next one would pass
``batch_size`` (the first record of a batch always goes in, as in kafka-python); a record
larger than ``max_request_size`` fails the whole call with ``MessageSizeTooLargeError``
before anything is handed over, and so does one with neither key nor value (``ValueError``,
as ``send``).

``enqueue(producer, tp, sections, timestamp_ms)`` hands each section to the producer as a
``ProducerBatch`` whose builder is kafka-python's own ``DefaultRecordBatchBuilder``, and
wakes the sender. When the sender drains the batch, kafka-python sets the producer id and
sequence (idempotence), compresses, writes the batch header and its CRC-32C, and retries,
exactly as for the batches ``send`` builds. ``producer.flush`` waits for these batches like
any other. A batch's ``produce_future`` tells whether the broker acknowledged it
(``failures``).

The one difference from ``send``: when a broker answers ``MESSAGE_TOO_LARGE``, kafka-python
splits the batch and re-enqueues the halves without completing the first batch's future. So
a batch still not done after a flush returned is reported by ``failures`` as split, and the
publisher goes back to ``send`` (``sinks/kafka_publisher.py``). Brokers take 1 MB batches by
default (``message.max.bytes``); the publisher's batches are at most 256 KB.

Tied to kafka-python 3.0.12 (pinned in pyproject.toml): it sets the builder's record count,
timestamps and last offset, and the accumulator's per-partition queue. A test builds the same
records both ways and asserts the bytes of the finished batches are equal
(tests/sinks/test_record_batches.py), so an upgrade that changes them fails there.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from kafka import KafkaProducer
from kafka.errors import MessageSizeTooLargeError
from kafka.producer.producer_batch import ProducerBatch
from kafka.record.default_records import DefaultRecordBatchBuilder
from kafka.record.memory_records import MemoryRecordsBuilder
from kafka.structs import TopicPartition

Headers = Sequence[tuple[str, bytes | None]]
Record = tuple[bytes | None, bytes | None, Headers]

BATCH_OVERHEAD = DefaultRecordBatchBuilder.HEADER_STRUCT.size  # 61 bytes before the first record


def _zigzag_varint(n: int) -> bytes:
    """Kafka's signed varint (zigzag, then 7 bits a byte, low first)."""
    v = (n << 1) ^ (n >> 63)
    out = bytearray()
    while v > 0x7F:
        out.append((v & 0x7F) | 0x80)
        v >>= 7
    out.append(v)
    return bytes(out)


_SMALL = [_zigzag_varint(i) for i in range(1 << 13)]  # every length and offset delta below 8 KB
_NULL = _zigzag_varint(-1)  # a null key, value or header value


def varint(n: int) -> bytes:
    return _SMALL[n] if 0 <= n < 8192 else _zigzag_varint(n)


def encode_headers(headers: Headers) -> bytes:
    parts = [varint(len(headers))]
    for name, value in headers:
        raw = name.encode("utf-8")
        parts += (varint(len(raw)), raw)
        parts += (_NULL,) if value is None else (varint(len(value)), value)
    return b"".join(parts)


class Section:
    """The records section of one batch: ``parts`` joined, ``count`` records, ``size`` bytes."""

    __slots__ = ("parts", "count", "size")

    def __init__(self) -> None:
        self.parts: list[bytes] = []
        self.count = 0
        self.size = 0

    def payload(self) -> bytes:
        return b"".join(self.parts)


def pack(records: Sequence[Record], batch_size: int, max_request_size: int) -> list[Section]:
    """The records sections of the batches ``records`` go into, in order (see module docstring)."""
    sections: list[Section] = []
    section = Section()
    header_cache: dict[tuple[tuple[str, bytes | None], ...], bytes] = {}
    for key, value, headers in records:
        hkey = tuple(headers)
        hbytes = header_cache.get(hkey)
        if hbytes is None:
            hbytes = header_cache[hkey] = encode_headers(headers)
        if key is None and value is None:
            raise ValueError("a record needs a key or a value")
        kpart = (_NULL,) if key is None else (varint(len(key)), key)
        vpart = (_NULL,) if value is None else (varint(len(value)), value)
        fields = 2 + sum(map(len, kpart)) + sum(map(len, vpart)) + len(hbytes)  # all but the offset
        if BATCH_OVERHEAD + fields + 6 > max_request_size:
            raise MessageSizeTooLargeError(
                f"a record of {fields} bytes and more is larger than max_request_size ({max_request_size})"
            )
        offset = varint(section.count)
        length = varint(fields + len(offset))
        size = len(length) + fields + len(offset)
        if section.count and BATCH_OVERHEAD + section.size + size > batch_size:
            sections.append(section)
            section = Section()
            offset = varint(0)
            length = varint(fields + 1)
            size = len(length) + fields + 1
        section.parts += (length, b"\x00\x00", offset, *kpart, *vpart, hbytes)  # attributes 0, timestamp delta 0
        section.count += 1
        section.size += size
    if section.count:
        sections.append(section)
    return sections


def records_builder(section: Section, timestamp_ms: int, config: dict[str, Any]) -> MemoryRecordsBuilder:
    """kafka-python's builder of one batch, holding ``section``'s records as if appended one by one
    (``config``: the producer's accumulator config: message format, compression, batch size)."""
    records = MemoryRecordsBuilder(config["message_version"], config["compression_attrs"], config["batch_size"])
    builder = records._builder
    if not isinstance(builder, DefaultRecordBatchBuilder):
        raise RuntimeError("the broker's message format is older than v2 (Kafka 0.11)")
    builder._buffer += section.payload()
    builder._first_timestamp = builder._max_timestamp = timestamp_ms
    builder._num_records = section.count
    builder._last_offset = section.count - 1
    records._next_offset = section.count
    return records


def enqueue(producer: KafkaProducer, tp: TopicPartition, sections: Sequence[Section], timestamp_ms: int) -> list[ProducerBatch]:
    """Hand each section to ``producer`` as one batch for ``tp`` (in order) and wake its sender."""
    accumulator = producer._accumulator
    batches = [ProducerBatch(tp, records_builder(section, timestamp_ms, accumulator.config)) for section in sections]
    accumulator._appends_in_progress.increment()
    try:
        with accumulator._tp_lock(tp):
            if accumulator._closed:
                raise RuntimeError("the producer is closed")
            queue = accumulator._batches[tp]
            for batch in batches:
                queue.append(batch)
                accumulator._incomplete.add(batch)
    finally:
        accumulator._appends_in_progress.decrement()
    producer._sender.wakeup()
    return batches


def failures(batches: Sequence[ProducerBatch]) -> list[str]:
    """After a flush: why each batch that the broker did not acknowledge failed ("split" for a
    batch kafka-python split after MESSAGE_TOO_LARGE: its halves were sent on their own)."""
    out = []
    for batch in batches:
        future = batch.produce_future
        if not future.is_done:
            out.append(f"{batch.topic_partition}: split")
        elif future.exception is not None:
            out.append(f"{batch.topic_partition}: {type(future.exception).__name__}: {future.exception}")
    return out
