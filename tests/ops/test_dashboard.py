"""ops/grafana: the dashboard is well-formed, provisioned with the Prometheus datasource it
references, and covers what operators look at. (Its PromQL is run against a live Prometheus in
tests/streamer/groups/test_live_pipeline.py; Grafana itself cannot be installed here.)"""

from __future__ import annotations

import json
import re

import yaml

from tests.ops.prom import DASHBOARD, GRAFANA_PROVISIONING

VARIABLES = {"$group", "$__rate_interval"}


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def panels() -> list[dict]:
    return [p for p in dashboard()["panels"] if p["type"] != "row"]


def exprs() -> list[str]:
    return [t["expr"] for p in panels() for t in p["targets"]]


def datasource() -> dict:
    spec = yaml.safe_load((GRAFANA_PROVISIONING / "datasources" / "prometheus.yml").read_text())
    (ds,) = spec["datasources"]
    return ds


def test_the_provisioned_datasource_is_the_one_every_panel_uses():
    ds = datasource()
    assert ds["type"] == "prometheus" and ds["url"] == "http://prometheus:9090" and ds["uid"]
    board = dashboard()
    for p in panels():
        assert p["datasource"] == {"type": "prometheus", "uid": ds["uid"]}, p["title"]
        assert p["targets"], p["title"]
        for t in p["targets"]:
            assert t["datasource"] == {"type": "prometheus", "uid": ds["uid"]}, p["title"]
    for var in board["templating"]["list"]:
        assert var["datasource"] == {"type": "prometheus", "uid": ds["uid"]}


def test_the_dashboard_provider_points_at_the_dashboard_directory():
    spec = yaml.safe_load((GRAFANA_PROVISIONING / "dashboards" / "kg-streamer.yml").read_text())
    (provider,) = spec["providers"]
    assert provider["type"] == "file"
    assert provider["options"]["path"] == "/etc/grafana/dashboards"  # the mount in docker-compose.yml (test_compose)


def test_dashboard_structure():
    board = dashboard()
    assert board["uid"] == "kg-streamer" and board["schemaVersion"] >= 36
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))
    # no two panels overlap on the grid
    cells = set()
    for p in board["panels"]:
        g = p["gridPos"]
        assert g["x"] >= 0 and g["x"] + g["w"] <= 24, p["title"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"{p['title']} overlaps at {(x, y)}"
                cells.add((x, y))
    (group,) = board["templating"]["list"]
    assert group["name"] == "group" and group["includeAll"] and group["multi"] and group["allValue"] == ".*"


def test_queries_use_only_known_variables_and_the_group_filter():
    for expr in exprs():
        assert set(re.findall(r"\$\w+", expr)) <= VARIABLES, expr
        assert not re.search(r"[{(,]\s*(consumer_group|consumergroup)\b", expr), expr  # one label spelling
        for selector in re.findall(r"kgs_\w+\{([^}]*)\}", expr):
            assert 'group=~"$group"' in selector, expr  # every per-group series follows the variable


def test_dashboard_covers_what_the_issue_lists():
    text = "\n".join(exprs())
    titles = " | ".join(p["title"].lower() for p in panels())
    wanted = {
        "lag in messages": "kgs_consumer_lag_messages",
        "lag in seconds": "kgs_consumer_lag_seconds",
        "commit staleness": "kgs_consumer_commit_staleness_seconds",
        "throughput in": "kgs_topic_end_offset",
        "throughput out": "kgs_events_consumed_total",
        "applied": "kgs_events_applied_total",
        "graph freshness": "kgs_freshness_graph_seconds_bucket",
        "vector freshness": "kgs_freshness_vector_seconds_bucket",
        "dlq rate": "kgs_events_dlq_total",
        "stage durations": "kgs_stage_duration_seconds_bucket",
        "batch sizes": "kgs_batch_events_bucket",
        "affected-set sizes": "kgs_affected_nodes_bucket",
        "vectors published": "kgs_vectors_published_total",
        "vectors suppressed": "kgs_vectors_suppressed_total",
        "model version": "kgs_model_info",
        "graph retries": "kgs_graph_retries_total",
        "targets": "up{",
    }
    missing = [what for what, needle in wanted.items() if needle not in text]
    assert not missing, missing
    assert "topk(" in text and "top 10 partitions" in titles  # top-k
    assert "per-partition drill-down" in titles
    for q in ("0.5", "0.9", "0.99"):
        assert f"histogram_quantile({q}, sum by (group, le) (rate(kgs_freshness_vector_seconds_bucket" in text
