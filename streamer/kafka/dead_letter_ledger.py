"""Which input messages already have a dead letter on ``kg.dlq``, so a replay does not send another.

A batch is replayed after a crash (kill -9 between the dead letters' acknowledgement and the
commit or checkpoint), a refused commit, a rebalance or a rebuilt client. Its graph writes,
changes and vectors are idempotent; a dead letter sent again would be a duplicate on ``kg.dlq``.
Both steps keep one: ingest (replays start at the group's committed offsets) and the embedding
worker (replays start at its checkpoint's offsets).

``DeadLetterLedger`` holds the source ``(topic, partition, offset)`` of every dead letter that a
replay could meet again:

* **after an assignment**, before the first batch with dead letters, ``load(starts, since_s)``
  reads ``kg.dlq`` from ``since_s`` (less ``CLOCK_MARGIN_S`` for skew between hosts; from the
  beginning when 0) to its end, keeping the dead letters of the assigned partitions at or past
  ``starts``, the offsets a replay starts from. ``since_s`` is when those offsets were made
  durable: a dead letter for an offset past them was sent later, by whoever processed that
  batch, so nothing older is needed. ``committed_starts(consumer, partitions)`` gives both for
  a group's commits (the commit metadata's ``ts``); the worker passes its checkpoint's offsets
  and save time. ``kg.dlq`` is read whole, whatever ``since_s`` says, while it holds at most
  ``FULL_READ_MAX`` records (bad messages are rare, and a start from a time is only as good
  as the time: in soak run 6 a noida-db restart put a committed offset back by 20 minutes
  while the commit time pointed later, and 3 dead letters were sent twice). The read is
  bounded by ``budget_s``; past it the ledger is incomplete (logged) and a replay may
  duplicate a dead letter, never lose one.
* **as it goes** (``add``) it keeps what this process sent, so a batch replayed in the same
  process (a refused commit) is covered too; ``forget_below`` drops what no replay can reach
  (offsets below the first offset of the batch in hand: replays start at or before it).

Dead letters are still counted as such; only the send is skipped.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable

from kafka import KafkaConsumer
from kafka.errors import KafkaError
from kafka.structs import TopicPartition

from streamer.contracts.dead_letters import DeadLetter, source_of
from streamer.kafka.consumer import parse_commit_metadata
from streamer.settings import Settings

log = logging.getLogger(__name__)

CLOCK_MARGIN_S = 300.0
FULL_READ_MAX = 100_000  # records of kg.dlq read from the beginning whatever the commit times say
Source = tuple[str, int, int]


class DeadLetterLedger:
    def __init__(self, settings: Settings, budget_s: float = 30.0):
        self.settings = settings
        self.budget_s = budget_s
        self.sent: set[Source] = set()

    def add(self, sources: Iterable[Source]) -> None:
        self.sent.update(sources)

    def forget_below(self, first: dict[TopicPartition, int]) -> None:
        self.sent = {s for s in self.sent if s[2] >= first.get(TopicPartition(s[0], s[1]), -1)}

    def unsent(self, dead: list[DeadLetter], first: dict[TopicPartition, int]) -> list[DeadLetter]:
        """The dead letters of the batch whose first offsets are ``first`` that ``kg.dlq`` does
        not hold yet (forgetting what no replay can reach any more)."""
        self.forget_below(first)
        return [d for d in dead if (d.topic, d.partition, d.offset) not in self.sent]

    def load(self, starts: dict[TopicPartition, int], since_s: float) -> int:
        """Rebuild from ``kg.dlq`` for the partitions in ``starts`` (this member's assignment,
        each with the offset a replay starts from); returns how many dead letters it now knows of."""
        self.sent = {s for s in self.sent if TopicPartition(s[0], s[1]) in starts}
        if not starts:
            return len(self.sent)
        began = time.monotonic()
        found = self.read_dlq(max(0.0, since_s - CLOCK_MARGIN_S) if since_s > 0 else 0.0, starts)
        self.sent |= found
        log.info(
            "%d dead letters already on %s for the assigned partitions (read in %.1fs)",
            len(found),
            self.settings.topic_dlq,
            time.monotonic() - began,
        )
        return len(self.sent)

    def read_dlq(self, since_s: float, committed: dict[TopicPartition, int]) -> set[Source]:
        found: set[Source] = set()
        reader = KafkaConsumer(
            bootstrap_servers=self.settings.bootstrap_servers,
            group_id=None,
            enable_auto_commit=False,
            client_id="kgs-dlq-ledger",
            fetch_max_wait_ms=self.settings.fetch_max_wait_ms,
        )
        try:
            tps = [
                TopicPartition(self.settings.topic_dlq, p)
                for p in sorted(reader.partitions_for_topic(self.settings.topic_dlq) or ())
            ]
            if not tps:
                return found
            reader.assign(tps)
            ends, begins = reader.end_offsets(tps), reader.beginning_offsets(tps)
            if sum(ends[tp] - begins[tp] for tp in tps) <= FULL_READ_MAX:
                since_s = 0.0  # small: read it all, trusting no clock
            starts = reader.offsets_for_times({tp: int(since_s * 1000) for tp in tps}) if since_s > 0 else {}
            for tp in tps:
                start = starts.get(tp)
                if since_s > 0 and start is None:
                    reader.seek_to_end(tp)  # nothing sent since then
                elif start is not None:
                    reader.seek(tp, start.offset)
                else:
                    reader.seek_to_beginning(tp)
            deadline = time.monotonic() + self.budget_s
            while time.monotonic() < deadline:
                for records in reader.poll(timeout_ms=200).values():
                    for r in records:
                        source = source_of(r.headers)
                        if source is None:
                            continue
                        tp = TopicPartition(source[0], source[1])
                        if tp in committed and source[2] >= committed[tp]:
                            found.add(source)
                if all(reader.highwater(tp) is not None and reader.position(tp) >= reader.highwater(tp) for tp in tps):
                    return found
            log.warning(
                "reading %s took longer than %.0fs: a replayed batch may send a dead letter twice",
                self.settings.topic_dlq,
                self.budget_s,
            )
            return found
        finally:
            reader.close()


def committed_starts(consumer: KafkaConsumer, partitions: Iterable[TopicPartition]) -> tuple[dict[TopicPartition, int], float]:
    """A group's replay starts: each partition's committed offset (0 when never committed) and
    the oldest commit time among them (0 when any is unknown: read ``kg.dlq`` from the start)."""
    starts: dict[TopicPartition, int] = {}
    since_s: float | None = None
    for tp in partitions:
        try:
            meta = consumer.committed(tp, metadata=True, timeout_ms=10_000)
        except (KafkaError, TypeError):
            meta = None
        if meta is None:
            starts[tp], since = 0, 0.0
        else:
            starts[tp] = meta.offset
            since = parse_commit_metadata(meta.metadata) or 0.0
        since_s = since if since_s is None else min(since_s, since)
    return starts, since_s or 0.0
