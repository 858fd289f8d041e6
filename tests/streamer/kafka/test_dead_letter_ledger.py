"""A replayed batch sends no dead letter twice: ``streamer.kafka.dead_letter_ledger`` in both
steps, against both embedded brokers and the real graph DB.

Ingest: the crash is staged where it hurts: a step after ``IngestStep`` raises, so the batch's
graph writes, changes and dead letters are all acknowledged but its offsets are never committed
(as a kill -9 between the acknowledgement and the commit). A second consumer in the same group
replays the batch from the committed offsets; ``kg.dlq`` must still hold each bad message once.

Worker: its replays start at its checkpoint. The worker checkpoints, then dead-letters bad
changelog records and checkpoints again; the older checkpoint is put back (as a crash after
the dead letters' acknowledgement and before the next checkpoint), and the next worker replays
the bad records; ``kg.dlq`` must still hold each once.
"""

from __future__ import annotations

import shutil
import uuid

import pytest

from streamer.embed.state import checkpoint_dir
from streamer.embed.worker import embed_consumer
from streamer.ingest.step import IngestStep, ingest_consumer
from streamer.kafka.consumer import BatchingConsumer
from tests.helpers import PassStep, event_message, produce, produce_events, read_topic, sample_events


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


def test_a_worker_replaying_from_its_checkpoint_sends_no_dead_letter_twice(settings, tmp_path):
    prefix = f"wledger{uuid.uuid4().hex[:6]}-"
    events = sample_events(prefix, products=6, users=2)
    produce_events(settings, events[: len(events) // 2])
    ingest_consumer(settings).run(until_caught_up=True, max_seconds=120)
    embed_consumer(settings).run(until_caught_up=True, max_seconds=240)  # checkpoint 1 (ends with one)
    older = tmp_path / "checkpoint-1"
    shutil.copytree(checkpoint_dir(settings), older)

    bad = [(settings.topic_changes, f"bad{i}".encode(), f"not a change {i}".encode()) for i in range(4)]
    produce(settings, bad)
    produce_events(settings, events[len(events) // 2 :])
    ingest_consumer(settings).run(until_caught_up=True, max_seconds=120)
    first = embed_consumer(settings)
    first.run(until_caught_up=True, max_seconds=240)
    assert first.steps[0].stats.dead_letters == 4
    assert len(read_topic(settings, settings.topic_dlq, expect=4)) == 4

    shutil.rmtree(checkpoint_dir(settings))
    shutil.copytree(older, checkpoint_dir(settings), dirs_exist_ok=True)  # back to before the bad records
    replay = embed_consumer(settings)
    replay.run(until_caught_up=True, max_seconds=240)
    stats = replay.steps[0].stats
    assert stats.dead_letters == 4, "the bad records were replayed from the older checkpoint"
    assert stats.dead_letters_not_resent == 4
    dlq = read_topic(settings, settings.topic_dlq, expect=5, timeout_s=5)
    assert sorted(r.key for r in dlq) == sorted(k for _, k, _ in bad)


def test_the_ledger_finds_dead_letters_older_than_the_commit_time_says(settings, broker_kind):
    """A broker that puts a committed offset back (noida-db after a restart, soak run 6) can leave
    a commit time later than the dead letters a replay meets again. The ledger reads a small
    kg.dlq whole, so it still finds them: without that, it started reading 5 minutes before the
    commit time and sent 3 dead letters twice."""
    import time

    from kafka import KafkaProducer
    from kafka.structs import TopicPartition

    from streamer.contracts.dead_letters import DeadLetter
    from streamer.kafka.dead_letter_ledger import DeadLetterLedger

    topic = settings.topic_products
    letters = [DeadLetter(topic, 0, 1000 + i, b"k", b"not json", (), "NotJson", "not JSON", "decode") for i in range(3)]
    an_hour_ago = int((time.time() - 3600) * 1000)
    producer = KafkaProducer(bootstrap_servers=settings.bootstrap_servers, acks="all")
    for d in letters:
        key, value, headers = d.to_kafka(settings.dlq_max_value_bytes)
        producer.send(settings.topic_dlq, key=key, value=value, headers=headers, timestamp_ms=an_hour_ago)
    producer.flush()
    producer.close()

    ledger = DeadLetterLedger(settings)
    ledger.load({TopicPartition(topic, 0): 1000}, since_s=time.time())  # a commit "now", offsets from before
    assert {(topic, 0, 1000 + i) for i in range(3)} <= ledger.sent
