"""The dead-letter record on ``kg.dlq``: a message a consumer could not use, and why.

Key and value are the original message's, byte for byte; the headers are the original ones
plus Kafka Connect's error headers, so existing DLQ tooling reads them:

    __connect.errors.topic / .partition / .offset   where the message came from
    __connect.errors.stage                          decode | write | apply
    __connect.errors.exception.class.name           why, as a class (NotJson, ValidationError ...)
    __connect.errors.exception.message              why, in words (at most 2,000 bytes)

A value larger than ``max_value_bytes`` (what the broker takes, less room for the headers)
goes there **truncated** to that size, with headers ``kgs.original.size`` (bytes, decimal)
and ``kgs.original.sha256`` (hex) so the original can be identified and fetched from the
source topic while it is retained. A key larger than 4 KiB is truncated the same way
(``kgs.original.key.size``, ``kgs.original.key.sha256``), and the original headers are kept
up to 16 KiB in all (``kgs.original.headers.dropped``: how many did not fit). A message with
neither key nor value (a producer may send one; ours cannot) goes with an empty value and the
header ``kgs.original.null``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

Header = tuple[str, bytes]
KafkaRecord = tuple[bytes | None, bytes | None, list[Header]]

MAX_KEY_BYTES = 4096
MAX_HEADER_BYTES = 16 * 1024
MAX_MESSAGE_CHARS = 2000


@dataclass(frozen=True)
class DeadLetter:
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: tuple[Header, ...]
    error_class: str
    message: str
    stage: str  # "decode" | "write" | "apply"

    def to_kafka(self, max_value_bytes: int) -> KafkaRecord:
        """(key, value, headers) for the producer; the value cut to ``max_value_bytes``."""
        headers: list[Header] = []
        room, dropped = MAX_HEADER_BYTES, 0
        for k, v in self.headers:
            name, raw = str(k).encode("utf-8", "replace").decode("utf-8"), bytes(v) if v is not None else b""
            if len(name) + len(raw) > room:
                dropped += 1
                continue
            room -= len(name) + len(raw)
            headers.append((name, raw))
        if dropped:
            headers.append(("kgs.original.headers.dropped", str(dropped).encode()))
        headers += [
            ("__connect.errors.topic", self.topic.encode()),
            ("__connect.errors.partition", str(self.partition).encode()),
            ("__connect.errors.offset", str(self.offset).encode()),
            ("__connect.errors.stage", self.stage.encode()),
            ("__connect.errors.exception.class.name", self.error_class.encode("utf-8", "replace")),
            ("__connect.errors.exception.message", self.message[:MAX_MESSAGE_CHARS].encode("utf-8", "replace")),
        ]
        key, value = self.key, self.value
        if key is not None and len(key) > MAX_KEY_BYTES:
            headers += [
                ("kgs.original.key.size", str(len(key)).encode()),
                ("kgs.original.key.sha256", hashlib.sha256(key).hexdigest().encode()),
            ]
            key = key[:MAX_KEY_BYTES]
        if value is not None and len(value) > max_value_bytes:
            headers += [
                ("kgs.original.size", str(len(value)).encode()),
                ("kgs.original.sha256", hashlib.sha256(value).hexdigest().encode()),
            ]
            value = value[:max_value_bytes]
        if key is None and value is None:  # a Kafka producer needs one of the two
            headers.append(("kgs.original.null", b"key,value"))
            value = b""
        return key, value, headers


def source_of(headers: list[tuple[str, bytes]] | None) -> tuple[str, int, int] | None:
    """(topic, partition, offset) of the message a dead letter stands for, read from its
    ``__connect.errors.*`` headers (the last of each name: ours come after the original
    message's own headers); None when they are missing or malformed."""
    found = dict(headers or [])
    try:
        return (
            bytes(found["__connect.errors.topic"]).decode(),
            int(found["__connect.errors.partition"]),
            int(found["__connect.errors.offset"]),
        )
    except (KeyError, ValueError, TypeError, UnicodeDecodeError):
        return None
