"""Kafka consumer pieces shared by the long-running consumers (ingest and embed).

* ``ConsumerLoop`` -- stop flag + signal handlers + best-effort close;
* ``make_consumer`` -- a group member with auto-commit off and the session settings;
* ``caught_up`` -- lag 0 on every assigned partition, from ``highwater()`` (Tansu's
  ``end_offsets()`` is wrong, and the highwater is what the last fetch saw);
* ``rewind`` -- seek partitions this member holds back to the first offsets of records it
  dropped uncommitted (a refused commit here; a batch dropped on revoke, in ingest's
  rebalance listener): kafka-python keeps the position of a partition that a rebalance gives
  back to the same member, so such records are only read again if they are rewound;
* ``commit_after`` -- commit the offsets after the last record of a finished batch; records
  the offset gauges and writes the commit time into the offset metadata
  (``streamer.ops.lag.commit_metadata``), from which ``kg-streamer status`` reads the last
  commit age off the broker. A commit refused because the group rebalanced is logged, and the
  batch's partitions that this member still holds are **rewound** to the batch's first offsets:
  the work is durable and idempotent, so whoever owns a partition next (this member included)
  replays it, and ``caught_up`` cannot report a partition whose last batch is uncommitted as
  done (its position is behind the log end again). Without the rewind this member would not
  read the batch again: ``--until-caught-up`` could stop with the group's offsets short of
  the log end, and a later commit on the partition would pass over the batch.
"""

from __future__ import annotations

import logging
import signal
import time
from collections.abc import Callable

from kafka import KafkaConsumer
from kafka.errors import CommitFailedError, RebalanceInProgressError
from kafka.structs import OffsetAndMetadata, TopicPartition

from streamer import metrics as m
from streamer.ops.lag import commit_metadata
from streamer.settings import Settings

log = logging.getLogger(__name__)


class ConsumerLoop:
    """What the long-running consumers share: a stop flag that SIGTERM/SIGINT set (the loop
    finishes the batch in hand and exits), and a best-effort close of their clients."""

    stopping = False

    def stop(self, *_args) -> None:
        self.stopping = True

    def install_signal_handlers(self) -> None:
        signal.signal(signal.SIGTERM, self.stop)
        signal.signal(signal.SIGINT, self.stop)

    @staticmethod
    def close_quietly(*closers: Callable[[], object]) -> None:
        for closer in closers:
            try:
                closer()
            except Exception:  # noqa: BLE001 - closing is best effort
                log.exception("error while closing")


def make_consumer(settings: Settings, group: str, client_id: str, max_poll_records: int) -> KafkaConsumer:
    return KafkaConsumer(
        bootstrap_servers=settings.bootstrap_servers,
        group_id=group,
        client_id=client_id,
        enable_auto_commit=False,
        auto_offset_reset=settings.auto_offset_reset,
        session_timeout_ms=settings.session_timeout_ms,
        heartbeat_interval_ms=settings.heartbeat_interval_ms,
        max_poll_interval_ms=settings.max_poll_interval_ms,
        max_poll_records=max_poll_records,
        group_instance_id=settings.group_instance_id,
    )


def caught_up(consumer: KafkaConsumer) -> bool:
    assigned = consumer.assignment()
    if not assigned:
        return False
    for tp in assigned:
        highwater = consumer.highwater(tp)
        if highwater is None or consumer.position(tp) < highwater:
            return False
    return True


def commit_after(consumer: KafkaConsumer, group: str, records) -> dict[TopicPartition, int]:
    """Commit the offset after the last of ``records`` per partition; returns what was committed
    ({} when the group rebalanced and refused the commit)."""
    offsets: dict[TopicPartition, OffsetAndMetadata] = {}
    metadata = commit_metadata()
    for r in records:
        tp = TopicPartition(r.topic, r.partition)
        if tp not in offsets or r.offset + 1 > offsets[tp].offset:
            offsets[tp] = OffsetAndMetadata(r.offset + 1, metadata, -1)
    if not offsets:
        return {}
    try:
        consumer.commit(offsets)
    except (CommitFailedError, RebalanceInProgressError) as exc:
        log.warning("%s: commit refused after a rebalance (%s); the batch will be replayed", group, exc)
        rewind(consumer, first_offsets(records))
        return {}
    now = time.time()
    for tp, meta in offsets.items():
        m.COMMITTED_OFFSET.labels(group, tp.topic, str(tp.partition)).set(meta.offset)
        m.LAST_COMMIT_TIMESTAMP.labels(group, tp.topic, str(tp.partition)).set(now)
    return {tp: meta.offset for tp, meta in offsets.items()}


def first_offsets(records) -> dict[TopicPartition, int]:
    """The lowest offset among ``records``, per partition."""
    first: dict[TopicPartition, int] = {}
    for r in records:
        tp = TopicPartition(r.topic, r.partition)
        first[tp] = min(first.get(tp, r.offset), r.offset)
    return first


def rewind(consumer: KafkaConsumer, first: dict[TopicPartition, int]) -> None:
    """Seek the partitions of ``first`` that this member holds back to those offsets (the first
    of records it dropped uncommitted); the others are read from the committed offsets by
    their new owner."""
    held = consumer.assignment()
    for tp, offset in first.items():
        if tp in held:
            consumer.seek(tp, offset)
