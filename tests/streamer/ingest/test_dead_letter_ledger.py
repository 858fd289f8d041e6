"""A replayed batch sends no dead letter twice: ``streamer.ingest.dead_letter_ledger`` against
both embedded brokers and the real graph DB.

The crash is staged where it hurts: a step after ``IngestStep`` raises, so the batch's graph
writes, changes and dead letters are all acknowledged but its offsets are never committed (as
a kill -9 between the acknowledgement and the commit). A second consumer in the same group
replays the batch from the committed offsets; ``kg.dlq`` must still hold each bad message once.
"""

from __future__ import annotations

import uuid

import pytest

from streamer.ingest.step import IngestStep
from streamer.kafka.consumer import BatchingConsumer
from tests.helpers import PassStep, event_message, produce, read_topic, sample_events


class Crash(Exception):
    pass


class CrashAfterIngest(PassStep):
    """A step that fails every batch: what the ingest step made durable stays uncommitted."""

    def process(self, batch) -> None:
        raise Crash("killed between the acknowledgement and the commit")


def consumer_with(settings, steps) -> BatchingConsumer:
    return BatchingConsumer(
        settings, settings.ingest_group, settings.input_topics, "kg-ingest", steps, max_batch=500, max_wait_s=0.5
    )


def test_a_replayed_batch_sends_no_dead_letter_twice(settings, broker_kind):
    prefix = f"ledger{uuid.uuid4().hex[:6]}-"
    bad = [(settings.topic_products, f"bad{i}".encode(), f"not json {i}".encode()) for i in range(5)]
    good = [event_message(settings, e) for e in sample_events(prefix, products=5, users=2)]
    produce(settings, good[:10] + bad + good[10:])

    first = IngestStep(settings)
    with pytest.raises(Crash):
        consumer_with(settings, [first, CrashAfterIngest()]).run(until_caught_up=True, max_seconds=60)
    assert first.stats.dead_letters == 5
    assert len(read_topic(settings, settings.topic_dlq, expect=5)) == 5

    replay = IngestStep(settings)
    consumer_with(settings, [replay]).run(until_caught_up=True, max_seconds=60)
    assert replay.stats.events_in == len(good) + len(bad), "the batch was replayed"
    assert replay.stats.dead_letters == 5 and replay.stats.dead_letters_not_resent == 5
    dlq = read_topic(settings, settings.topic_dlq, expect=6, timeout_s=5)
    assert sorted(r.key for r in dlq) == sorted(k for _, k, _ in bad)
