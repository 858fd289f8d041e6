"""Debian's Prometheus against a running pipeline on the embedded services: the ingest and embed
services and the lag exporter (``python -m streamer.cli ...``, each serving /metrics) with events
flowing; Prometheus loads the repo's alert rules and scrapes them under the production job names.
Every PromQL expression of the Grafana dashboard must return at least one series (Grafana itself
cannot be installed here), the rules evaluate without error, and only the alert the test provokes
(a dead letter) fires."""

from __future__ import annotations

import json
import math
import threading
import time
import urllib.request
import uuid

import pytest
from kafka import KafkaProducer

from tests.conftest import free_port, wait_for
from tests.helpers import event_message, sample_events, settings_env
from tests.ops.prom import DASHBOARD, Prometheus, kgs_process, stop_process

RATE_INTERVAL = "15s"  # what Grafana's $__rate_interval is at a 1 s scrape (4 x scrape interval, rounded up)


def dashboard_queries() -> list[tuple[str, str]]:
    board = json.loads(DASHBOARD.read_text())
    return [(p["title"], t["expr"]) for p in board["panels"] if p["type"] != "row" for t in p["targets"]]


def grafana_substitute(expr: str) -> str:
    """What Grafana sends for the default variable values (group = All -> its allValue ".*")."""
    return expr.replace("$__rate_interval", RATE_INTERVAL).replace("$group", ".*")


class EventStream:
    """A producer thread: the sample, one undecodable message (a dead letter), then new products
    and interactions a few times a second until stopped."""

    def __init__(self, settings, prefix: str):
        self.settings, self.prefix = settings, prefix
        self.stop = threading.Event()
        self.sent = 0
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self):
        s = self.settings
        producer = KafkaProducer(bootstrap_servers=s.bootstrap_servers, acks="all", linger_ms=5)
        try:
            for topic, key, value in (event_message(s, e) for e in sample_events(self.prefix, products=20, users=5)):
                producer.send(topic, key=key, value=value)
            producer.send(s.topic_products, key=b"bad", value=b"{not json")
            i = 0
            while not self.stop.is_set():
                product = {
                    "type": "product",
                    "id": f"{self.prefix}N{i}",
                    "title": f"new product {i}",
                    "brand": f"{self.prefix}Brand{i % 3}",
                    "categories": [f"{self.prefix}Home"],
                    "ts": 1_500_000_000 + i,
                }
                view = {
                    "type": "interaction",
                    "user_id": f"{self.prefix}U{i % 5}",
                    "product_id": f"{self.prefix}P{i % 20}",
                    "action": "view",
                    "ts": 1_500_000_000 + i,
                }
                for event in (product, view):
                    topic, key, value = event_message(s, event)
                    producer.send(topic, key=key, value=value)
                producer.flush()
                self.sent += 2
                i += 1
                self.stop.wait(0.3)
        finally:
            producer.close()

    def close(self):
        self.stop.set()
        self.thread.join(30)


def test_every_dashboard_query_returns_series_from_a_live_pipeline(settings, tmp_path, capsys):
    settings = settings.model_copy(update={"torch_threads": 1})
    ports = {"kg-ingest": free_port(), "kg-embed": free_port(), "kg-lag-exporter": free_port()}
    prometheus = Prometheus(tmp_path, {job: [f"127.0.0.1:{port}"] for job, port in ports.items()}).start()
    procs = {
        "ingest": kgs_process(settings, ["ingest"], ports["kg-ingest"], tmp_path / "ingest.log"),
        "embed": kgs_process(settings, ["embed"], ports["kg-embed"], tmp_path / "embed.log"),
        "lag-exporter": kgs_process(
            settings, ["lag-exporter", "--interval", "1"], ports["kg-lag-exporter"], tmp_path / "lag-exporter.log"
        ),
    }
    stream = EventStream(settings, f"live{uuid.uuid4().hex[:6]}-")
    embed_group = settings.embed_group
    try:

        def all_up() -> bool:
            for name, proc in procs.items():
                assert proc.poll() is None, f"{name} exited: {(tmp_path / f'{name}.log').read_text()[-3000:]}"
            return all(prometheus.value(f'up{{job="{job}"}}') == 1 for job in ports)

        wait_for(all_up, timeout_s=240, interval_s=1, what="every target up")
        # vectors are flowing when the worker has observed freshness over the last window
        wait_for(
            lambda: (
                (
                    prometheus.value(f'sum(rate(kgs_freshness_vector_seconds_count{{group="{embed_group}"}}[{RATE_INTERVAL}]))')
                    or 0
                )
                > 0
            ),
            timeout_s=240,
            interval_s=1,
            what="vectors published",
        )
        time.sleep(5)  # a few more scrapes of everything, so every rate window holds two samples

        missing, no_values = [], []
        for title, expr in dashboard_queries():
            query = grafana_substitute(expr)
            deadline = time.monotonic() + 30
            result = prometheus.query(query)
            while not result and time.monotonic() < deadline:
                time.sleep(1)
                result = prometheus.query(query)
            if not result:
                missing.append(f"{title}: {query}")
            elif "histogram_quantile" in expr and not any(math.isfinite(float(r["value"][1])) for r in result):
                no_values.append(f"{title}: {query}")
        assert not missing, "dashboard queries without a series:\n" + "\n".join(missing)
        assert not no_values, "histogram panels with no observation in the window:\n" + "\n".join(no_values)

        # the dashboard's variable: label_values(kgs_consumer_lag_messages, group), as Grafana asks it
        board = json.loads(DASHBOARD.read_text())
        (variable,) = board["templating"]["list"]
        metric, label = variable["query"]["query"].removeprefix("label_values(").removesuffix(")").split(", ")
        values = prometheus.api(f"label/{label}/values", **{"match[]": metric})
        assert {settings.ingest_group, embed_group} <= set(values)

        # the repo's rules are loaded and evaluate without errors against the real series
        rules = [r for g in prometheus.api("rules")["groups"] for r in g["rules"]]
        assert len([r for r in rules if r["type"] == "alerting"]) >= 8
        assert all(r["health"] == "ok" for r in rules), [(r["name"], r.get("lastError")) for r in rules if r["health"] != "ok"]

        # the one provoked failure alerts; nothing else fires on a healthy pipeline
        def dead_letter_alert() -> list:
            return [
                a
                for a in prometheus.api("alerts")["alerts"]
                if a["labels"]["alertname"] == "KgsDeadLetters" and a["state"] == "firing"
            ]

        (alert,) = wait_for(dead_letter_alert, timeout_s=30, what="KgsDeadLetters firing")
        assert alert["labels"]["group"] == settings.ingest_group and alert["labels"]["topic"] == settings.topic_products
        firing = {a["labels"]["alertname"] for a in prometheus.api("alerts")["alerts"] if a["state"] == "firing"}
        assert firing == {"KgsDeadLetters"}, firing

        # status over the pipeline's two groups (its default), both with a live member
        from streamer.cli import main

        with pytest.MonkeyPatch.context() as mp:
            for key, value in settings_env(settings).items():
                mp.setenv(key, value)
            capsys.readouterr()
            assert main(["status", "--json"]) == 0
        groups = {g["group"]: g for g in json.loads(capsys.readouterr().out)["groups"]}
        assert set(groups) == {settings.ingest_group, embed_group}
        assert all(len(g["members"]) == 1 for g in groups.values())
        assert {p["topic"] for p in groups[embed_group]["partitions"]} == {settings.topic_changes}

        # the Kubernetes probes of each running command (streamer/health.py, ops/k8s): live,
        # and ready as a member of its group (the exporter: after its first sample)
        for job, port in ports.items():
            for path in ("/healthz", "/readyz"):
                with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
                    assert response.status == 200, (job, path, response.read())
    finally:
        stream.close()
        for proc in procs.values():
            stop_process(proc)
        prometheus.stop()
