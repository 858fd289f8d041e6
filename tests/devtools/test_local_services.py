"""The embedded services: start, readiness, idempotent up, status, clean down, persistence."""

from __future__ import annotations

import json
import socket
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.admin import ConfigResource, ConfigResourceType, KafkaAdminClient
from kafka.structs import OffsetAndMetadata
from pydantic import SecretStr

from devtools.local_services import LocalServices, ServiceError, parse_host_port
from streamer.kafka.topics import ensure_topics, topic_plan
from streamer.settings import Settings
from tests.conftest import TEST_PASSWORD, free_port, service_settings


def _listening(address: str) -> bool:
    host, port = parse_host_port(address, 0)
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def _produce(bootstrap: str, topic: str, n: int, partition: int | None = None) -> None:
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all")
    try:
        for i in range(n):
            producer.send(topic, key=f"k{i}".encode(), value=f"v{i}".encode(), partition=partition)
        producer.flush(timeout=10)
    finally:
        producer.close()


def _read_all(bootstrap: str, tp: TopicPartition, expect: int, timeout_s: float = 15.0) -> list[bytes]:
    """Every value of ``tp`` from the beginning (no group), until ``expect`` were read."""
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    try:
        consumer.assign([tp])
        consumer.seek_to_beginning(tp)
        values: list[bytes] = []
        deadline = time.monotonic() + timeout_s
        while len(values) < expect and time.monotonic() < deadline:
            values += [r.value for r in consumer.poll(timeout_ms=200).get(tp, [])]
        return values
    finally:
        consumer.close()


# ---------------------------------------------------------------------- up / status
def test_up_is_idempotent(default_broker: LocalServices, arcadedb: LocalServices) -> None:
    before = {**default_broker.status(("broker",)), **arcadedb.status(("graph",))}
    t0 = time.monotonic()
    assert set(default_broker.up(("broker",))) == {"broker"}
    assert set(arcadedb.up(("graph",))) == {"graph"}
    assert time.monotonic() - t0 < 5, "a second up() must not restart anything"
    after = {**default_broker.status(("broker",)), **arcadedb.status(("graph",))}
    assert {k: v["pid"] for k, v in after.items()} == {k: v["pid"] for k, v in before.items()}
    assert all(v["running"] and v["ready"] for v in after.values())


def test_status_reports_each_service(default_broker: LocalServices, arcadedb: LocalServices) -> None:
    broker = default_broker.status(("broker",))["broker"]
    graph = arcadedb.status(("graph",))["graph"]
    assert broker["kind"] == default_broker.settings.local_broker
    assert broker["address"] == default_broker.settings.bootstrap_servers
    assert graph["kind"] == "arcadedb"
    assert graph["address"] == arcadedb.settings.bolt_uri
    for state in (broker, graph):
        assert state["running"] and state["ready"] and isinstance(state["pid"], int)
        assert Path(state["log"]).is_file()
    json.dumps([broker, graph])  # the CLI prints it as JSON


def test_secret_stays_out_of_logs_status_and_command_lines(arcadedb: LocalServices) -> None:
    status = arcadedb.status(("graph",))["graph"]
    assert TEST_PASSWORD not in json.dumps(status)
    assert TEST_PASSWORD not in Path(status["log"]).read_text(errors="replace")
    assert TEST_PASSWORD.encode() not in Path(f"/proc/{status['pid']}/cmdline").read_bytes()


def test_status_of_a_state_dir_with_nothing_running(tmp_path: Path) -> None:
    services = LocalServices(service_settings(tmp_path))
    status = services.status()
    assert {name: (s["running"], s["ready"], s["pid"]) for name, s in status.items()} == {
        "broker": (False, False, None),
        "graph": (False, False, None),
    }
    assert services.down() == {"broker": False, "graph": False}


# ---------------------------------------------------------------------- round trips
def test_broker_round_trip_with_a_consumer_group(settings: Settings, broker_kind: str) -> None:
    topic = settings.topic_products
    _produce(settings.bootstrap_servers, topic, 20)
    consumer = KafkaConsumer(
        topic,
        bootstrap_servers=settings.bootstrap_servers,
        group_id=settings.ingest_group,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        session_timeout_ms=settings.session_timeout_ms,
        heartbeat_interval_ms=settings.heartbeat_interval_ms,
    )
    try:
        seen: dict[bytes, bytes] = {}
        deadline = time.monotonic() + 30
        while len(seen) < 20 and time.monotonic() < deadline:
            for records in consumer.poll(timeout_ms=2000).values():
                seen.update({r.key: r.value for r in records})
        assert seen == {f"k{i}".encode(): f"v{i}".encode() for i in range(20)}
        consumer.commit()
        committed = sum(consumer.committed(tp) or 0 for tp in consumer.assignment())
        assert committed == 20
    finally:
        consumer.close()


def test_graph_round_trip(settings: Settings, clean_graph: Any) -> None:
    db = settings.bolt_database
    assert clean_graph.execute_query("MATCH (n) RETURN count(n) AS c", database_=db).records[0]["c"] == 0
    clean_graph.execute_query("CREATE (:Probe {id: $id})", id="p1", database_=db)
    records = clean_graph.execute_query("MATCH (p:Probe) RETURN p.id AS id, 1 AS one", database_=db).records
    assert [(r["id"], r["one"]) for r in records] == [("p1", 1)]


def test_ensure_topics_is_idempotent(settings: Settings, broker_kind: str) -> None:
    plan = topic_plan(settings)
    assert ensure_topics(settings) == []  # the settings fixture created them already
    admin = KafkaAdminClient(bootstrap_servers=settings.bootstrap_servers)
    try:
        partitions = {t["name"]: len(t["partitions"]) for t in admin.describe_topics(list(plan))}
        assert partitions == {name: opts["num_partitions"] for name, opts in plan.items()}
        configs = admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, settings.topic_embeddings)])
    finally:
        admin.close()
    if broker_kind == "noida":  # Tansu accepts the config and drops it (see streamer/kafka/topics.py)
        embeddings = configs["topic"][settings.topic_embeddings]
        assert embeddings["cleanup.policy"]["value"] == "compact"
        assert embeddings["segment.ms"]["value"] == str(settings.embeddings_segment_ms)


# ---------------------------------------------------------------------- down / restart
def test_down_stops_and_restart_keeps_data_on_noida_only(make_services: Any, broker_kind: str) -> None:
    services: LocalServices = make_services(("broker",), local_broker=broker_kind)
    bootstrap = services.settings.bootstrap_servers
    topic, group = f"persist.{uuid.uuid4().hex[:6]}", "persist-group"
    tp = TopicPartition(topic, 0)
    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    admin.create_topics({topic: {"num_partitions": 1, "replication_factor": -1}})
    admin.close()
    _produce(bootstrap, topic, 5, partition=0)
    committer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False)
    committer.assign([tp])
    committer.commit({tp: OffsetAndMetadata(3, "", -1)})
    committer.close()

    pid = services.status()["broker"]["pid"]
    assert services.down() == {"broker": True, "graph": False}
    status = services.status()["broker"]
    assert (status["running"], status["ready"], status["pid"]) == (False, False, None)
    assert not _listening(bootstrap)
    assert not Path(f"/proc/{pid}").exists()
    assert services.down() == {"broker": False, "graph": False}  # idempotent

    services.up(("broker",))
    assert services.status()["broker"]["pid"] != pid
    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    try:
        topics = set(admin.list_topics())
    finally:
        admin.close()
    if broker_kind == "noida":
        assert topic in topics
        assert _read_all(bootstrap, tp, expect=5) == [f"v{i}".encode() for i in range(5)]
        reader = KafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False)
        try:
            assert reader.committed(tp) == 3
        finally:
            reader.close()
    else:  # Tansu keeps everything in memory
        assert topic not in topics


def test_graph_down_is_clean_and_data_survives_restart(make_services: Any) -> None:
    from neo4j import GraphDatabase

    services: LocalServices = make_services(("graph",))
    s = services.settings
    auth = (s.bolt_user, s.bolt_password.get_secret_value())
    with GraphDatabase.driver(s.bolt_uri, auth=auth) as driver:
        driver.execute_query("CREATE (:Durable {id: 'd1'})", database_=s.bolt_database)
    assert services.down(("graph",)) == {"graph": True}
    assert not _listening(s.bolt_uri)
    assert "arcadedb-server: stopped" in Path(services.status()["graph"]["log"]).read_text()

    services.up(("graph",))
    with GraphDatabase.driver(s.bolt_uri, auth=auth) as driver:
        records = driver.execute_query("MATCH (d:Durable) RETURN d.id AS id", database_=s.bolt_database).records
    assert [r["id"] for r in records] == ["d1"]

    wrong = LocalServices(s.model_copy(update={"bolt_password": SecretStr("not-the-password")}))
    with pytest.raises(ServiceError, match="created with another password"):
        wrong.up(("graph",), timeout_s=30)
    assert services.status(("graph",))["graph"]["ready"]  # a failed up() leaves a running server alone


# ---------------------------------------------------------------------- failures
def test_port_taken_by_a_stranger_is_reported_before_starting(tmp_path: Path) -> None:
    with socket.socket() as stranger:
        stranger.bind(("127.0.0.1", 0))
        stranger.listen()
        port = stranger.getsockname()[1]
        services = LocalServices(service_settings(tmp_path, bootstrap_servers=f"127.0.0.1:{port}"))
        with pytest.raises(ServiceError, match=f"127.0.0.1:{port} is already in use"):
            services.up(("broker",), timeout_s=10)
    assert services.status(("broker",))["broker"]["running"] is False


def test_a_server_that_dies_at_start_is_reported_with_its_log(tmp_path: Path) -> None:
    # 192.0.2.1 (TEST-NET-1) is not a local address: the broker cannot listen and exits.
    services = LocalServices(service_settings(tmp_path, local_broker="noida", bootstrap_servers=f"192.0.2.1:{free_port()}"))
    t0 = time.monotonic()
    with pytest.raises(ServiceError, match="exited during start-up") as info:
        services.up(("broker",), timeout_s=30)
    assert time.monotonic() - t0 < 10
    assert "cannot listen on 192.0.2.1" in str(info.value)  # the tail of broker.log


def test_up_that_fails_stops_what_it_started(tmp_path: Path) -> None:
    services = LocalServices(service_settings(tmp_path, local_broker="noida"))
    with pytest.raises(ServiceError, match="did not answer in time"):
        services.up(("broker",), timeout_s=0.0)
    assert services.status(("broker",))["broker"]["running"] is False
    assert not _listening(services.settings.bootstrap_servers)


def test_switching_broker_kind_while_one_runs_is_refused(make_services: Any) -> None:
    services: LocalServices = make_services(("broker",), local_broker="noida")
    other = LocalServices(services.settings.model_copy(update={"local_broker": "tansu"}))
    with pytest.raises(ServiceError, match="noida broker is already running"):
        other.up(("broker",), timeout_s=10)
    assert services.status(("broker",))["broker"]["ready"]
