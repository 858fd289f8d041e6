"""ops/k8s validates offline: core kinds with ``kubernetes-validate`` (the Kubernetes OpenAPI
schemas, strict: no unknown fields), the custom resources (KEDA ScaledObject, Prometheus
Operator ServiceMonitor) against their CRDs' schemas (tools/k8s-validate), and the manifests
are wired to what the code serves and reads: every setting is a real one, probes hit the paths
``streamer.health`` answers, on the port the metrics server binds, and nothing secret sits in
the ConfigMap."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from streamer.settings import Settings
from tests.ops.prom import REPO

K8S = REPO / "ops" / "k8s"
VALIDATOR = REPO / "tools" / "k8s-validate"
KUBERNETES_VERSION = "1.33.0"  # a release kubernetes-validate ships schemas for
CUSTOM_KINDS = {"ScaledObject", "ServiceMonitor"}


def documents() -> list[tuple[str, dict[str, Any]]]:
    """(file#index, document) of every manifest kustomization.yaml lists."""
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    out = []
    for name in kustomization["resources"]:
        for i, doc in enumerate(yaml.safe_load_all((K8S / name).read_text())):
            if doc:
                out.append((f"{name}#{i}", doc))
    return out


def by_kind(kind: str) -> list[dict[str, Any]]:
    return [doc for _, doc in documents() if doc["kind"] == kind]


def workloads() -> list[dict[str, Any]]:
    return by_kind("Deployment") + by_kind("StatefulSet")


def test_kustomization_lists_every_manifest() -> None:
    listed = set(yaml.safe_load((K8S / "kustomization.yaml").read_text())["resources"])
    on_disk = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == on_disk


def test_core_kinds_validate_against_the_kubernetes_schemas() -> None:
    import kubernetes_validate

    core = [(name, doc) for name, doc in documents() if doc["kind"] not in CUSTOM_KINDS]
    assert {doc["kind"] for _, doc in core} >= {"Deployment", "StatefulSet", "Service", "PodDisruptionBudget", "ConfigMap"}
    errors = {}
    for name, doc in core:
        try:
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            errors[name] = str(exc)
    assert not errors, errors


def test_the_validator_catches_a_bad_core_manifest() -> None:
    """The check above can fail: an unknown field and a wrong type are rejected."""
    import kubernetes_validate

    deployment = json.loads(json.dumps(by_kind("Deployment")[0]))
    deployment["spec"]["replicas"] = "one"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSION, strict=True)
    deployment = json.loads(json.dumps(by_kind("Deployment")[0]))
    deployment["spec"]["template"]["spec"]["containers"][0]["livenesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSION, strict=True)


def validate_custom(items: list[tuple[str, dict[str, Any]]]) -> list[dict[str, Any]]:
    node = shutil.which("node")
    if node is None or not (VALIDATOR / "node_modules").is_dir():
        pytest.fail("tools/k8s-validate is not installed: scripts/install_node_tool.sh tools/k8s-validate (node >= 20)")
    payload = json.dumps([{"name": name, "doc": doc} for name, doc in items])
    proc = subprocess.run(
        [node, str(VALIDATOR / "validate.mjs")], input=payload, capture_output=True, text=True, timeout=60, check=False
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_custom_resources_validate_against_their_crd_schemas() -> None:
    custom = [(name, doc) for name, doc in documents() if doc["kind"] in CUSTOM_KINDS]
    assert {doc["kind"] for _, doc in custom} == CUSTOM_KINDS
    results = validate_custom(custom)
    assert all(r["ok"] for r in results), results


def test_the_crd_validator_catches_bad_custom_resources() -> None:
    scaled = json.loads(json.dumps(by_kind("ScaledObject")[0]))
    scaled["spec"]["minReplicaCount"] = "one"
    monitor = json.loads(json.dumps(by_kind("ServiceMonitor")[0]))
    del monitor["spec"]["selector"]
    unknown = {"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "w"}}
    results = validate_custom([("scaled", scaled), ("monitor", monitor), ("unknown", unknown)])
    assert [r["ok"] for r in results] == [False, False, False], results
    assert "no schema" in results[2]["error"]


def test_settings_in_the_manifests_are_real_settings() -> None:
    fields = {f"KGS_{name.upper()}" for name in Settings.model_fields}
    names = set(by_kind("ConfigMap")[0]["data"])
    for workload in workloads():
        for container in workload["spec"]["template"]["spec"]["containers"]:
            names |= {e["name"] for e in container.get("env", [])}
    unknown = sorted(n for n in names if n.startswith("KGS_") and n not in fields)
    assert not unknown, unknown


def test_no_secret_in_the_configmap() -> None:
    data = by_kind("ConfigMap")[0]["data"]
    assert not [k for k in data if "PASSWORD" in k or "SECRET" in k or "TOKEN" in k]
    for workload in workloads():
        for container in workload["spec"]["template"]["spec"]["containers"]:
            for e in container.get("env", []):
                if "PASSWORD" in e["name"]:
                    assert "secretKeyRef" in e.get("valueFrom", {}), e


def test_probes_and_ports_match_what_the_commands_serve() -> None:
    """Every container's probes hit /healthz or /readyz on the port KGS_METRICS_ADDR binds, and
    the consumers' liveness allows at least one max.poll.interval of stillness."""
    port = int(by_kind("ConfigMap")[0]["data"]["KGS_METRICS_ADDR"].rpartition(":")[2])
    commands = set()
    for workload in workloads():
        spec = workload["spec"]["template"]["spec"]
        (container,) = spec["containers"]
        commands.add(container["args"][0])
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert ports == {"metrics": port}, ports
        assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
        assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
        for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
            if probe in container:
                assert container[probe]["httpGet"]["port"] == "metrics"
        assert container["resources"]["requests"] and container["resources"]["limits"]
        assert spec["securityContext"]["runAsNonRoot"] is True
    assert commands == {"ingest", "embed", "lag-exporter"}


def test_keda_scales_ingest_on_lag_seconds_up_to_the_input_partitions() -> None:
    scaled = by_kind("ScaledObject")[0]["spec"]
    assert scaled["scaleTargetRef"]["name"] == "kg-ingest"
    assert scaled["maxReplicaCount"] == int(by_kind("ConfigMap")[0]["data"]["KGS_INPUT_PARTITIONS"])
    (trigger,) = scaled["triggers"]
    assert trigger["type"] == "prometheus"
    assert "kgs_consumer_lag_seconds" in trigger["metadata"]["query"] and 'group="kg-ingest"' in trigger["metadata"]["query"]
    # the metric exists under that name
    assert "kgs_consumer_lag_seconds" in (REPO / "streamer" / "metrics.py").read_text()


def test_keda_scales_the_sharded_embedding_workers_on_their_own_groups_lag() -> None:
    """Each worker follows the changelog in its group kg-embed.<pod> and exports that group's lag
    (streamer/groups/lag.py ``start_monitor``); the StatefulSet scales on the worst of them, never
    past the number of shards (a worker without a shard has nothing to publish)."""
    (scaled,) = [s["spec"] for s in by_kind("ScaledObject") if s["spec"]["scaleTargetRef"]["name"] == "kg-embed"]
    assert scaled["scaleTargetRef"]["kind"] == "StatefulSet"
    assert 1 <= scaled["maxReplicaCount"] <= int(by_kind("ConfigMap")[0]["data"]["KGS_EMBED_SHARDS"])
    (trigger,) = scaled["triggers"]
    query = trigger["metadata"]["query"]
    assert "kgs_consumer_lag_seconds" in query
    import re

    regex = re.search(r'group=~"([^"]+)"', query).group(1).encode().decode("unicode_escape")  # PromQL string escapes
    assert (
        re.fullmatch(regex, "kg-embed.kg-embed-0")
        and not re.fullmatch(regex, "kg-embed")
        and not re.fullmatch(regex, "kg-ingest")
    )
    from streamer.embed.worker import embed_consumer_group
    from streamer.settings import Settings

    group = embed_consumer_group(Settings(_env_file=None, embed_shards=64, group_instance_id="kg-embed-0"))
    assert re.fullmatch(regex, group)
    (embed,) = [s for s in by_kind("StatefulSet") if s["metadata"]["name"] == "kg-embed"]
    env = {e["name"]: e for e in embed["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["KGS_GROUP_INSTANCE_ID"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"


def test_pod_disruption_budgets_cover_the_consumers() -> None:
    covered = {p["spec"]["selector"]["matchLabels"]["app.kubernetes.io/name"] for p in by_kind("PodDisruptionBudget")}
    assert covered == {"kg-ingest", "kg-embed"}


def test_service_monitor_selects_every_metrics_service() -> None:
    selector = by_kind("ServiceMonitor")[0]["spec"]["selector"]["matchLabels"]
    services = [s for s in by_kind("Service") if all(s["metadata"]["labels"].get(k) == v for k, v in selector.items())]
    assert {s["metadata"]["name"] for s in services} == {"kg-ingest-metrics", "kg-embed", "kg-lag-exporter"}


def test_manifest_files_have_no_machine_paths() -> None:
    for path in Path(K8S).glob("*.yaml"):
        assert "/work/" not in path.read_text() and "/home/" not in path.read_text(), path
