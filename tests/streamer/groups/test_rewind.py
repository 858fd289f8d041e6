"""``kg-streamer replay``: targets resolve to the right offsets on both brokers, a group with live
members is refused unless forced, a replay to earliest leaves the graph and the last vector per
key unchanged, and a backfill shows its progress with rate and ETA."""

from __future__ import annotations

import json
import re
import threading
import time
import uuid
from datetime import UTC, datetime

import numpy as np
import pytest
from kafka import KafkaConsumer, KafkaProducer

from streamer.embed.verify import last_vectors
from streamer.embed.worker import embed_consumer
from streamer.groups.lag import LagSampler
from streamer.groups.rewind import parse_target
from streamer.ingest.step import ingest_consumer
from streamer.kafka.consumer import parse_commit_metadata
from tests.conftest import wait_for
from tests.helpers import graph_snapshot, produce_events, sample_events, settings_env
from tests.ops.prom import kgs_process, stop_process


def cli(settings, capsys, *argv: str) -> tuple[int, str, str]:
    """``kg-streamer <argv>`` in-process with ``settings`` (the CLI's start-up imports torch)."""
    from streamer.cli import main

    capsys.readouterr()
    with pytest.MonkeyPatch.context() as mp:
        for key, value in settings_env(settings).items():
            mp.setenv(key, value)
        mp.setenv("COLUMNS", "160")
        rc = main(list(argv))
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def committed(settings, group: str) -> dict[int, int]:
    sampler = LagSampler(settings.bootstrap_servers)
    try:
        return {tp.partition: meta.offset for tp, meta in sampler.committed(group).items()}
    finally:
        sampler.close()


def test_parse_target():
    now = 1_700_000_000.0
    assert parse_target("earliest").kind == "earliest" and parse_target("LATEST").kind == "latest"
    assert parse_target("1200") == parse_target(" 1200 ") and parse_target("1200").value == 1200
    assert parse_target("2024-05-01T12:00:00Z").value == int(datetime(2024, 5, 1, 12, tzinfo=UTC).timestamp() * 1000)
    assert parse_target("2024-05-01T12:00:00") == parse_target("2024-05-01T12:00:00+00:00")  # no zone: UTC
    assert parse_target("2024-05-01T14:00:00+02:00") == parse_target("2024-05-01T12:00:00Z")
    assert parse_target("-15m", now=now).value == int((now - 900) * 1000)
    assert parse_target("-1.5h", now=now).value == int((now - 5400) * 1000)
    for bad in ("yesterday", "-5x", "1e3", ""):
        with pytest.raises(ValueError):
            parse_target(bad)


def test_targets_resolve_per_partition(settings, broker_kind, capsys):
    """earliest, offsets (clamped), times (first message at or after; none -> log end), latest."""
    topic, group, parts = settings.topic_products, settings.ingest_group, settings.input_partitions
    producer = KafkaProducer(bootstrap_servers=settings.bootstrap_servers, acks="all", linger_ms=5)
    for i in range(10 * parts):
        producer.send(topic, value=b"{}", partition=i % parts)
    producer.flush()
    time.sleep(1.2)
    middle = datetime.now(UTC).isoformat()
    time.sleep(0.2)
    for i in range(5 * parts):
        producer.send(topic, value=b"{}", partition=i % parts)
    producer.flush()
    producer.close()

    def plan(to: str) -> dict[int, int]:
        rc, out, err = cli(settings, capsys, "replay", "--group", group, "--topics", topic, f"--to={to}", "--dry-run", "--json")
        assert rc == 0, err
        summary = json.loads(out)
        assert summary["dry_run"] and summary["state"] is not None
        return {p["partition"]: p["target"] for p in summary["partitions"]}

    every = lambda offset: {p: offset for p in range(parts)}
    assert plan("earliest") == every(0)
    assert plan("latest") == every(15)  # the fetch high watermark (Tansu's ListOffsets LATEST says 11)
    assert plan(middle) == every(10)
    assert plan("3") == every(3)
    assert plan("1000") == every(15)  # clamped to the log end
    assert plan("-1h") == every(0)
    assert plan("2099-01-01T00:00:00Z") == every(15)  # no message that new: the log end (Tansu answers 0)
    assert committed(settings, group) == {}  # dry runs change nothing

    rc, out, err = cli(settings, capsys, "replay", "--group", group, "--topics", topic, f"--to={middle}")
    assert rc == 0, err
    assert "re-read" in out and "new offset" in out
    assert committed(settings, group) == every(10)
    sampler = LagSampler(settings.bootstrap_servers)
    try:
        metas = sampler.committed(group).values()
        if broker_kind == "noida":  # keeps the metadata: who rewound it, when
            assert all(abs(parse_commit_metadata(m.metadata) - time.time()) < 60 for m in metas)
            assert all(json.loads(m.metadata)["by"] == "replay" for m in metas)
    finally:
        sampler.close()


class LiveMember:
    """A consumer in the group that keeps polling (and heartbeating) on its own thread."""

    def __init__(self, settings, group: str, topic: str):
        self.consumer = KafkaConsumer(
            bootstrap_servers=settings.bootstrap_servers,
            group_id=group,
            enable_auto_commit=False,
            session_timeout_ms=settings.session_timeout_ms,
            heartbeat_interval_ms=settings.heartbeat_interval_ms,
        )
        self.consumer.subscribe([topic])
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self):
        while not self.stop.is_set():
            self.consumer.poll(timeout_ms=200 if self.consumer.assignment() else 2000)
        self.consumer.close()

    def close(self):
        self.stop.set()
        self.thread.join(30)


def test_a_group_with_live_members_is_refused_unless_forced(settings, capsys):
    topic, group = settings.topic_products, settings.ingest_group
    produce_events(settings, sample_events(f"r{uuid.uuid4().hex[:6]}-", products=9, users=2))
    member = LiveMember(settings, group, topic)
    try:
        sampler = LagSampler(settings.bootstrap_servers)
        wait_for(lambda: sampler.describe(group)[1], timeout_s=60, what="a live member")
        sampler.close()
        rc, out, err = cli(settings, capsys, "replay", "--group", group, "--topics", topic, "--to", "earliest")
        assert rc == 3
        assert "live member" in err and "--force" in err
        assert committed(settings, group) == {}
        # --dry-run says so but is allowed
        rc, out, err = cli(settings, capsys, "replay", "--group", group, "--topics", topic, "--to", "earliest", "--dry-run")
        assert rc == 0 and "refused without --force" in err
        # --force removes the members (LeaveGroup on their behalf), then commits
        rc, out, err = cli(
            settings, capsys, "replay", "--group", group, "--topics", topic, "--to", "earliest", "--force", "--json"
        )
        assert rc == 0, err
        assert json.loads(out)["removed_members"] >= 1
        assert committed(settings, group) == {p: 0 for p in range(settings.input_partitions)}
    finally:
        member.close()


def test_the_embedding_workers_group_is_refused_unless_forced(settings, capsys):
    rc, out, err = cli(settings, capsys, "replay", "--group", settings.embed_group, "--to", "earliest")
    assert rc == 3 and "own checkpoint" in err
    rc, out, err = cli(settings, capsys, "replay", "--group", settings.embed_group, "--to", "earliest", "--force")
    assert rc == 0, err


def test_replay_to_earliest_leaves_graph_and_last_vectors_unchanged(settings, capsys):
    settings = settings.model_copy(update={"torch_threads": 1})
    prefix = f"rp{uuid.uuid4().hex[:6]}-"
    events = sample_events(prefix, products=25, users=6)
    produce_events(settings, events)
    first = ingest_consumer(settings).run(until_caught_up=True, max_seconds=120)
    assert first.events_in == len(events)
    embed_consumer(settings).run(until_caught_up=True, max_seconds=180)
    graph_before = graph_snapshot(settings, prefix)
    vectors_before = last_vectors(settings)
    assert graph_before["nodes"] and vectors_before
    ends = committed(settings, settings.ingest_group)

    rc, out, err = cli(settings, capsys, "replay", "--group", settings.ingest_group, "--to", "earliest", "--dry-run", "--json")
    assert rc == 0, err
    plan = json.loads(out)
    assert plan["to_reread"] == len(events) and plan["backfill"] == len(events)
    assert committed(settings, settings.ingest_group) == ends  # a dry run changes nothing

    rc, out, err = cli(settings, capsys, "replay", "--group", settings.ingest_group, "--to", "earliest")
    assert rc == 0, err
    assert set(committed(settings, settings.ingest_group).values()) == {0}

    again = ingest_consumer(settings).run(until_caught_up=True, max_seconds=120)
    assert again.events_in == len(events)  # every event was read and applied again...
    assert committed(settings, settings.ingest_group) == ends
    embed_consumer(settings).run(until_caught_up=True, max_seconds=180)
    # ...and changed nothing: the graph, and the last vector per key
    assert graph_snapshot(settings, prefix) == graph_before
    vectors_after = last_vectors(settings)
    assert vectors_after.keys() == vectors_before.keys()
    for key, before in vectors_before.items():
        after = vectors_after[key]
        assert after.model_version == before.model_version, key
        if before.vector is None:
            assert after.vector is None, key
        else:
            assert np.array_equal(after.vector, before.vector), key


def test_a_backfill_shows_progress_with_rate_and_eta(settings, tmp_path):
    prefix = f"bf{uuid.uuid4().hex[:6]}-"
    events = sample_events(prefix, products=60, users=10)
    produce_events(settings, events)
    ingest_consumer(settings).run(until_caught_up=True, max_seconds=120)
    group = settings.ingest_group
    log = tmp_path / "replay.log"
    replay = kgs_process(
        settings, ["replay", "--group", group, "--to", "earliest", "--follow", "--timeout", "240"], log_path=log, COLUMNS="160"
    )
    ingest = None
    try:
        # the rewind is committed before the consumers start again (the group must be empty)
        wait_for(lambda: set(committed(settings, group).values()) == {0}, timeout_s=120, interval_s=0.2, what="the rewind")
        small_batches = settings.model_copy(update={"batch_max_events": 40})  # several commits: a moving bar
        ingest = kgs_process(small_batches, ["ingest"], log_path=tmp_path / "ingest.log")
        assert replay.wait(240) == 0, log.read_text()[-3000:]
    finally:
        if replay.poll() is None:
            replay.kill()
        if ingest is not None:
            stop_process(ingest)
    text = log.read_text()
    total = f"{len(events)}/{len(events)}"
    assert f"backfill {group}" in text and total in text, text[-3000:]
    n = len(events)
    assert re.search(rf"backfill .*: \d+/{n} \(\d+%\) [1-9][\d,]* msg/s eta \d+:\d\d:\d\d", text), text  # rate, ETA
    assert re.search(rf"{n}/{n} 100% [1-9][\d,]* msg/s eta 0:00:00", text), text
    assert f"caught up: {len(events)} of {len(events)} messages" in text
