"""Test helpers for the ops tests: Debian's Prometheus on a free port, kg-streamer processes.

``Prometheus(tmp_path, targets)`` writes a config *derived from* ops/prometheus/prometheus.yml
(same job names, same rule files -- the repo's, by absolute path), with every job's discovery
replaced by static loopback targets and a 1 s scrape and evaluation interval, starts
``prometheus`` on a free port and answers PromQL over its HTTP API.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import free_port, wait_for
from tests.helpers import settings_env

REPO = Path(__file__).resolve().parents[2]
OPS = REPO / "ops"
PROMETHEUS_YML = OPS / "prometheus" / "prometheus.yml"
RULES_DIR = OPS / "prometheus" / "rules"
RULE_TESTS = OPS / "prometheus" / "tests" / "kg-streamer.test.yml"
DASHBOARD = OPS / "grafana" / "dashboards" / "kg-streamer.json"
GRAFANA_PROVISIONING = OPS / "grafana" / "provisioning"


def require(tool: str) -> str:
    path = shutil.which(tool)
    if not path:
        pytest.fail(f"{tool} is not installed: run `bash scripts/setup.sh --test` (apt-get install prometheus)")
    return path


def rule_files() -> list[Path]:
    """The rule files the production config loads (its glob, resolved in the repo)."""
    config = yaml.safe_load(PROMETHEUS_YML.read_text())
    files: list[Path] = []
    for pattern in config["rule_files"]:
        assert pattern.startswith("/etc/prometheus/rules/"), pattern
        files += sorted(RULES_DIR.glob(pattern.removeprefix("/etc/prometheus/rules/")))
    return files


class Prometheus:
    def __init__(self, tmp_path: Path, targets: dict[str, list[str]], interval: str = "1s"):
        self.dir = tmp_path / f"prometheus-{free_port()}"
        self.dir.mkdir(parents=True)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = yaml.safe_load(PROMETHEUS_YML.read_text())
        jobs = {job["job_name"] for job in config["scrape_configs"]}
        unknown = set(targets) - jobs
        assert not unknown, f"jobs {unknown} are not in {PROMETHEUS_YML}"
        config["global"].update(scrape_interval=interval, evaluation_interval=interval, scrape_timeout=interval)
        config["rule_files"] = [str(p) for p in rule_files()]
        config["scrape_configs"] = [{"job_name": job, "static_configs": [{"targets": addrs}]} for job, addrs in targets.items()]
        self.config_path = self.dir / "prometheus.yml"
        self.config_path.write_text(yaml.safe_dump(config))
        self.proc: subprocess.Popen | None = None

    def start(self) -> Prometheus:
        self.log = open(self.dir / "prometheus.log", "wb")
        self.proc = subprocess.Popen(
            [
                require("prometheus"),
                f"--config.file={self.config_path}",
                f"--storage.tsdb.path={self.dir / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        wait_for(self._ready, timeout_s=30, interval_s=0.2, what="prometheus ready")
        return self

    def _ready(self) -> bool:
        if self.proc and self.proc.poll() is not None:
            raise AssertionError(f"prometheus exited: {(self.dir / 'prometheus.log').read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(f"{self.url}/-/ready", timeout=1) as r:
                return r.status == 200
        except OSError:
            return False

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if getattr(self, "log", None):
            self.log.close()

    def api(self, path: str, **params: Any) -> Any:
        url = f"{self.url}/api/v1/{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        with urllib.request.urlopen(url, timeout=10) as r:
            body = json.loads(r.read())
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str, at: float | None = None) -> list[dict]:
        params = {"query": expr}
        if at is not None:
            params["time"] = f"{at:.3f}"
        return self.api("query", **params)["result"]

    def value(self, expr: str) -> float | None:
        """The single value of an instant query (None if it returns nothing)."""
        result = self.query(expr)
        assert len(result) <= 1, result
        return float(result[0]["value"][1]) if result else None


def kgs_process(
    settings, command: list[str], metrics_port: int | None = None, log_path: Path | None = None, **env_overrides: str
) -> subprocess.Popen:
    """``python -m streamer.cli <command>`` with ``settings`` (and metrics on a loopback port)."""
    env = {**os.environ, **settings_env(settings), **env_overrides}
    env["KGS_METRICS_ADDR"] = f"127.0.0.1:{metrics_port}" if metrics_port else ""
    out = open(log_path, "wb") if log_path else subprocess.DEVNULL
    return subprocess.Popen(
        [sys.executable, "-m", "streamer.cli", *command], env=env, cwd=REPO, stdout=out, stderr=subprocess.STDOUT
    )


def stop_process(proc: subprocess.Popen, timeout_s: float = 60) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        return r.read().decode()
