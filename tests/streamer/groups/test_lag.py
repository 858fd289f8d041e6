"""Consumer lag from the broker (streamer/groups/lag.py): the arithmetic, the monitor's gauges, and
the end-to-end lag test -- stop the consumer, produce N events, and the lag metrics (scraped by
Debian's Prometheus) and ``kg-streamer status`` report N messages and an age within a second
of the truth; restart it, and lag returns to 0. Runs on both embedded brokers."""

from __future__ import annotations

import json
import time
import uuid
from collections import defaultdict

import pytest
from kafka import KafkaProducer
from prometheus_client import REGISTRY

from streamer.groups.lag import GroupLag, LagMonitor, PartitionLag
from streamer.kafka.consumer import commit_metadata, parse_commit_metadata
from tests.conftest import free_port, wait_for
from tests.helpers import produce_events, sample_events, settings_env
from tests.ops.prom import Prometheus, kgs_process, stop_process


# --- arithmetic ---------------------------------------------------------------------------------
def lag(committed, start=0, end=10, oldest_ts=100.0, commit_ts=None, sampled_at=110.0) -> PartitionLag:
    return PartitionLag("g", "t", 0, committed, start, end, oldest_ts, commit_ts, sampled_at)


def test_lag_in_messages_counts_from_the_committed_offset_or_the_log_start():
    assert lag(4).lag_messages == 6
    assert lag(None).lag_messages == 10  # never committed: auto_offset_reset=earliest reads from the start
    assert lag(2, start=5).lag_messages == 5  # committed below the log start (retention): from the start
    assert lag(10).lag_messages == 0


def test_lag_in_seconds_is_the_age_of_the_oldest_unconsumed_message():
    assert lag(4).lag_seconds() == pytest.approx(10.0)
    assert lag(4).lag_seconds(now=125.0) == pytest.approx(25.0)
    assert lag(10).lag_seconds() == 0.0  # caught up: 0, whatever the last message's age
    assert lag(4, oldest_ts=None).lag_seconds() is None  # unknown, not a guess


def test_commit_staleness_counts_only_while_there_is_work():
    assert lag(4, commit_ts=90.0).commit_staleness() == pytest.approx(10.0)  # work arrived after the commit
    assert lag(4, commit_ts=108.0).commit_staleness() == pytest.approx(2.0)  # committing: low
    assert lag(4).commit_staleness() == pytest.approx(10.0)  # commit time unknown: the lag seconds
    assert lag(10, commit_ts=0.0).commit_staleness() == 0.0  # idle and caught up is not stale


def test_commit_metadata_round_trip():
    assert parse_commit_metadata(commit_metadata(now=1234.5678)) == pytest.approx(1234.567)
    assert parse_commit_metadata(commit_metadata(now=1.0, by="replay")) == 1.0
    for other in (None, "", "x", "{}", '{"ts": "?"}', "[1]"):
        assert parse_commit_metadata(other) is None


class FakeSampler:
    def __init__(self, samples):
        self.samples = list(samples)

    def sample(self, groups):
        return [self.samples.pop(0)]

    def close(self):
        pass


def test_pipeline_groups_are_the_sharded_workers_own_groups_when_sharded():
    from streamer.groups.lag import pipeline_groups
    from streamer.settings import Settings

    plain = Settings(_env_file=None)
    on_broker = [plain.ingest_group, plain.embed_group, f"{plain.embed_group}.shards", f"{plain.embed_group}.w0", "other"]
    assert pipeline_groups(plain) == {plain.ingest_group: list(plain.input_topics), plain.embed_group: [plain.topic_changes]}
    sharded = plain.model_copy(update={"embed_shards": 8})
    assert pipeline_groups(sharded, on_broker) == {
        plain.ingest_group: list(plain.input_topics),
        f"{plain.embed_group}.w0": [plain.topic_changes],
    }
    # a worker group left over from a sharded run still shows next to the unsharded one
    assert set(pipeline_groups(plain, on_broker)) == {plain.ingest_group, plain.embed_group, f"{plain.embed_group}.w0"}


def test_monitor_gauges_extrapolate_only_while_the_group_is_stopped():
    group = f"g-{uuid.uuid4().hex[:6]}"
    now = time.time()

    def sample(committed: int, at: float, oldest: float) -> GroupLag:
        part = PartitionLag(group, "t", 0, committed, 0, 10, oldest, None, at)
        return GroupLag(group, "Empty", [], [part], at, ["t"])

    monitor = LagMonitor("unused:1", {group: ["t"]})
    monitor.sampler = FakeSampler([sample(4, now - 10, now - 30), sample(5, now - 5, now - 20), sample(5, now - 1, now - 20)])

    def gauge(name: str, **labels) -> float:
        return REGISTRY.get_sample_value(name, labels or {"group": group, "topic": "t", "partition": "0"})

    monitor.sample_once()
    assert gauge("kgs_consumer_lag_messages") == 6
    assert gauge("kgs_consumer_lag_seconds") == pytest.approx(20.0, abs=0.01)  # the first sample: as sampled
    assert gauge("kgs_consumer_commit_staleness_seconds") == pytest.approx(20.0, abs=0.01)  # no commit known
    monitor.sample_once()  # the committed offset moved: the group works, report the sampled age
    assert gauge("kgs_consumer_lag_seconds") == pytest.approx(15.0, abs=0.01)
    assert gauge("kgs_consumer_commit_staleness_seconds") == pytest.approx(0.0, abs=0.01)  # commit seen at this sample
    monitor.sample_once()  # unchanged since the last sample: stopped -> extrapolated to the scrape
    assert gauge("kgs_consumer_lag_seconds") == pytest.approx(time.time() - (now - 20), abs=0.05)
    assert gauge("kgs_consumer_commit_staleness_seconds") == pytest.approx(time.time() - (now - 5), abs=0.05)
    assert gauge("kgs_consumer_group_members", group=group) == 0
    assert gauge("kgs_topic_end_offset", topic="t", partition="0") == 10
    assert gauge("kgs_lag_sample_errors_total", group=group) == 0


# --- end to end -----------------------------------------------------------------------------------
def status_json(settings, group: str, capsys) -> dict:
    """``kg-streamer status --group G --json``, in-process (the CLI's start-up imports torch)."""
    from streamer.cli import main

    capsys.readouterr()
    with pytest.MonkeyPatch.context() as mp:
        for key, value in settings_env(settings).items():
            mp.setenv(key, value)
        assert main(["status", "--group", group, "--json"]) == 0
    (answer,) = json.loads(capsys.readouterr().out)["groups"]
    return answer


def produce_timed(settings, prefix: str, n: int, partitions: int) -> dict[int, list[float]]:
    """n product events round-robin over the partitions; {partition: [wall time before each send]}."""
    producer = KafkaProducer(bootstrap_servers=settings.bootstrap_servers, acks="all", linger_ms=0)
    sent: dict[int, list[float]] = defaultdict(list)
    futures = []
    for i in range(n):
        partition = i % partitions
        event = {"type": "product", "id": f"{prefix}L{i}", "title": f"late {i}", "ts": 1_400_000_000 + i}
        sent[partition].append(time.time())
        futures.append(
            producer.send(
                settings.topic_products, key=event["id"].encode(), value=json.dumps(event).encode(), partition=partition
            )
        )
    producer.flush()
    for f in futures:
        f.get(timeout=10)
    producer.close()
    return sent


def test_stopped_consumer_lag_in_messages_and_seconds_then_back_to_zero(settings, broker_kind, tmp_path, capsys):
    prefix = f"lag{uuid.uuid4().hex[:6]}-"
    group, topic = settings.ingest_group, settings.topic_products
    exporter_port, ingest_port = free_port(), free_port()
    exporter = kgs_process(
        settings, ["lag-exporter", "--group", group, "--interval", "1"], exporter_port, tmp_path / "exporter.log"
    )
    prometheus = Prometheus(
        tmp_path, {"kg-lag-exporter": [f"127.0.0.1:{exporter_port}"], "kg-ingest": [f"127.0.0.1:{ingest_port}"]}
    ).start()
    ingest = kgs_process(settings, ["ingest"], ingest_port, tmp_path / "ingest-1.log")
    started = time.monotonic()
    try:
        produced = produce_events(settings, sample_events(prefix, products=6, users=3))
        produced += settings.input_partitions
        produce_timed(settings, prefix + "w", settings.input_partitions, settings.input_partitions)  # every partition
        wait_for(
            lambda: (
                (s := status_json(settings, group, capsys))["lag_messages"] == 0
                and sum(p["end"] for p in s["partitions"]) == produced
            ),
            timeout_s=90,
            interval_s=0.5,
            what="ingest caught up",
        )
        # the consumer serves its own group's lag as well (its in-process monitor)
        wait_for(
            lambda: prometheus.value(f'max(kgs_consumer_lag_messages{{group="{group}",job="kg-ingest"}})') == 0,
            timeout_s=30,
            interval_s=0.5,
            what="kg-ingest reports lag 0",
        )
        assert stop_process(ingest) == 0

        n = 37
        sent = produce_timed(settings, prefix, n, settings.input_partitions)
        time.sleep(2.5)  # let the backlog age, and the exporter see the group stopped (two samples)

        # kg-streamer status: N messages, the age of each partition's oldest unconsumed message
        status = status_json(settings, group, capsys)
        assert status["lag_messages"] == n
        parts = {p["partition"]: p for p in status["partitions"] if p["topic"] == topic}
        for partition, times in sent.items():
            p = parts[partition]
            assert p["lag_messages"] == len(times)
            truth = status["sampled_at"] - times[0]
            assert truth > 2.0
            assert abs(p["lag_seconds"] - truth) < 1.0, (p, truth)
            assert p["commit_staleness_seconds"] == pytest.approx(p["lag_seconds"], abs=0.01)  # the commit is older
            assert p["committed"] is not None
            if broker_kind == "noida":  # keeps the commit metadata: the exact commit age
                assert p["last_commit_age_seconds"] >= p["lag_seconds"]
            else:  # Tansu drops it
                assert p["last_commit_age_seconds"] is None
        assert status["lag_seconds"] == pytest.approx(status["sampled_at"] - min(t[0] for t in sent.values()), abs=1.0)

        # the metrics, as Prometheus scraped them from the lag exporter (the consumer is down)
        selector = f'group="{group}",topic="{topic}"'
        wait_for(
            lambda: prometheus.value(f"sum(max by (partition) (kgs_consumer_lag_messages{{{selector}}}))") == n,
            timeout_s=20,
            interval_s=0.25,
            what="Prometheus sees N messages of lag",
        )
        time.sleep(1.5)
        values = {
            r["metric"]["partition"]: float(r["value"][1]) for r in prometheus.query(f"kgs_consumer_lag_seconds{{{selector}}}")
        }
        scraped = {
            r["metric"]["partition"]: float(r["value"][1])
            for r in prometheus.query(f"timestamp(kgs_consumer_lag_seconds{{{selector}}})")
        }
        stale = {
            r["metric"]["partition"]: float(r["value"][1])
            for r in prometheus.query(f"kgs_consumer_commit_staleness_seconds{{{selector}}}")
        }
        for partition, times in sent.items():
            truth = scraped[str(partition)] - times[0]  # age of the oldest unconsumed message at the scrape
            assert abs(values[str(partition)] - truth) < 1.0, (partition, values, truth)
            assert abs(stale[str(partition)] - truth) < 1.0
        assert prometheus.value(f'max(kgs_consumer_group_members{{group="{group}"}})') == 0
        # the table for people: the same numbers
        from streamer.cli import main

        with pytest.MonkeyPatch.context() as mp:
            for key, value in settings_env(settings).items():
                mp.setenv(key, value)
            mp.setenv("COLUMNS", "160")
            capsys.readouterr()
            assert main(["status", "--group", group]) == 0
        table = capsys.readouterr().out
        for column in ("committed", "end", "lag (msgs)", "lag (s)", "last commit", group, topic):
            assert column in table, table
        assert f"│ {n} " in table.replace(",", "") or f" {n} │" in table, table

        # restart: it catches up and lag returns to 0, in messages and seconds
        ingest = kgs_process(settings, ["ingest"], ingest_port, tmp_path / "ingest-2.log")
        wait_for(
            lambda: (
                prometheus.value(f'max(kgs_consumer_lag_messages{{group="{group}"}})') == 0
                and prometheus.value(f'max(kgs_consumer_lag_seconds{{group="{group}"}})') == 0
                and prometheus.value(f'max(kgs_consumer_commit_staleness_seconds{{group="{group}"}})') == 0
            ),
            timeout_s=90,
            interval_s=0.5,
            what="lag back to 0",
        )
        status = status_json(settings, group, capsys)
        assert status["lag_messages"] == 0 and status["lag_seconds"] == 0.0
        assert len(status["members"]) == 1
        # nothing of this fires an alert: lag stayed far under the SLOs
        firing = [a for a in prometheus.api("alerts")["alerts"] if a["state"] == "firing"]
        assert not firing, firing
    finally:
        stop_process(ingest)
        stop_process(exporter)
        prometheus.stop()
    assert time.monotonic() - started < 180
