"""ops/prometheus: promtool validates the config and the rules, the rule unit tests pass, every
alert has a firing and a silent case, and everything refers to metrics that exist."""

from __future__ import annotations

import re
import subprocess

import yaml
from prometheus_client import REGISTRY

import streamer.metrics  # noqa: F401 - registers every kgs_* metric
from tests.ops.prom import DASHBOARD, PROMETHEUS_YML, RULE_TESTS, require, rule_files

# What the issue asks for, by the alert that does it.
REQUIRED_ALERTS = {
    "KgsLagSecondsOverSLO": "lag seconds over SLO",
    "KgsLagGrowing": "lag growing for 15 min",
    "KgsConsumerStuck": "stuck consumer: lag > 0 and no commit",
    "KgsDeadLetters": "DLQ rate > 0",
    "KgsGraphFreshnessP99OverSLO": "freshness p99 over SLO (graph)",
    "KgsVectorFreshnessP99OverSLO": "freshness p99 over SLO (vector)",
    "KgsTargetDown": "target down",
}


def promtool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([require("promtool"), *args], capture_output=True, text=True, timeout=120)


def alerts() -> dict[str, dict]:
    out = {}
    for path in rule_files():
        for group in yaml.safe_load(path.read_text())["groups"]:
            for rule in group["rules"]:
                if "alert" in rule:
                    out[rule["alert"]] = rule
    return out


def test_promtool_check_config():
    result = promtool("check", "config", str(PROMETHEUS_YML))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_promtool_check_rules():
    files = rule_files()
    assert files, "prometheus.yml loads no rule file from ops/prometheus/rules"
    result = promtool("check", "rules", *map(str, files))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(alerts())} rules found" in result.stdout


def test_promtool_rule_unit_tests_pass():
    result = promtool("test", "rules", str(RULE_TESTS))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_the_unit_tests_load_the_rules_prometheus_loads():
    spec = yaml.safe_load(RULE_TESTS.read_text())
    loaded = {(RULE_TESTS.parent / f).resolve() for f in spec["rule_files"]}
    assert loaded == {p.resolve() for p in rule_files()}


def test_every_required_alert_exists_fires_and_stays_silent():
    defined = alerts()
    assert set(REQUIRED_ALERTS) <= set(defined), set(REQUIRED_ALERTS) - set(defined)
    fires, silent = set(), set()
    for case in yaml.safe_load(RULE_TESTS.read_text())["tests"]:
        for check in case.get("alert_rule_test", []):
            (fires if check.get("exp_alerts") else silent).add(check["alertname"])
    # every alert is shown firing on a synthetic failure, and silent on a healthy series
    assert set(defined) <= fires, f"no firing case for {set(defined) - fires}"
    assert set(defined) <= silent, f"no silent case for {set(defined) - silent}"
    for name, rule in defined.items():
        assert rule["labels"]["severity"] in ("warning", "critical"), name
        assert rule["annotations"].get("summary") and rule["annotations"].get("runbook"), name


def _declared_metrics() -> dict[str, str]:
    """Every sample name the kgs_* metrics export -> the metric's type."""
    names = {}
    for collector in list(REGISTRY._collector_to_names):
        for metric in collector.describe() if hasattr(collector, "describe") else []:
            if not metric.name.startswith("kgs_"):
                continue
            kind = metric.type
            suffixes = {
                "counter": ["_total", "_created"],
                "histogram": ["_bucket", "_sum", "_count", "_created"],
                "info": ["_info"],
                "gauge": [""],
            }.get(kind, [""])
            for suffix in suffixes:
                names[metric.name + suffix] = kind
    return names


def _referenced_metrics(text: str) -> set[str]:
    return set(re.findall(r"\bkgs_[a-z0-9_]+\b", text))


def test_rules_and_dashboard_refer_only_to_declared_metrics():
    declared = _declared_metrics()
    used = _referenced_metrics("\n".join(p.read_text() for p in rule_files())) | _referenced_metrics(DASHBOARD.read_text())
    assert used, "no kgs_* metric referenced"
    assert used <= set(declared), f"not declared in streamer/metrics.py: {sorted(used - set(declared))}"


def test_metric_names_follow_the_conventions():
    declared = {}
    for collector in list(REGISTRY._collector_to_names):
        for metric in collector.describe() if hasattr(collector, "describe") else []:
            if metric.name.startswith("kgs_"):
                declared[metric.name] = collector
    assert len(declared) >= 25
    for name, collector in declared.items():
        labels = list(getattr(collector, "_labelnames", ()))
        # one spelling of the group label; no other spelling of it anywhere
        assert not {"consumer_group", "consumergroup", "group_id"} & set(labels), name
        # base units: seconds, never milliseconds
        assert not re.search(r"_(ms|millis|milliseconds|minutes|hours)\b", name), name
        if "duration" in name or "freshness" in name or "staleness" in name or name.endswith("_lag_seconds"):
            assert name.endswith("_seconds"), name
        if "timestamp" in name:
            assert name.endswith("_timestamp_seconds"), name
    # per-partition lag has group, topic and partition
    for name in ("kgs_consumer_lag_messages", "kgs_consumer_lag_seconds", "kgs_consumer_commit_staleness_seconds"):
        assert list(declared[name]._labelnames) == ["group", "topic", "partition"]
