"""streamer.health: the liveness and readiness answers, over the real HTTP endpoint that
``streamer.metrics.serve`` starts (the one the Kubernetes probes in ops/k8s call)."""

from __future__ import annotations

import time
import urllib.error
import urllib.request

import pytest

from streamer import metrics
from streamer.health import HEALTH, Health
from tests.conftest import free_port


def get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_phases_and_staleness() -> None:
    h = Health(stale_s=0.2)
    assert h.live()[0] and not h.ready()[0]  # starting: live (a startupProbe bounds it), not ready
    h.set_phase("joining")
    assert h.live()[0] and h.ready() == (False, "joining")
    h.set_phase("member")
    assert h.live()[0] and h.ready()[0]
    time.sleep(0.3)  # the loop stopped turning
    assert not h.live()[0] and not h.ready()[0]
    assert "not turned" in h.live()[1]
    h.beat()
    assert h.ready()[0]
    h.set_phase("stopping")
    assert h.live()[0] and h.ready() == (False, "stopping")


@pytest.fixture
def served_health():
    port = free_port()
    assert metrics.serve(f"127.0.0.1:{port}")
    saved = (HEALTH.phase, HEALTH.beat_at, HEALTH.stale_s)
    yield port
    HEALTH.phase, HEALTH.beat_at, HEALTH.stale_s = saved


def test_the_endpoint_answers_the_probes_and_still_serves_metrics(served_health: int) -> None:
    port = served_health
    HEALTH.stale_s = 0.3
    HEALTH.set_phase("joining")
    assert get(port, "/healthz")[0] == 200
    assert get(port, "/readyz") == (503, "joining\n")
    HEALTH.set_phase("member")
    assert get(port, "/readyz")[0] == 200
    time.sleep(0.4)
    status, body = get(port, "/healthz")
    assert status == 503 and "not turned" in body
    assert get(port, "/readyz")[0] == 503
    status, body = get(port, "/metrics")
    assert status == 200 and "kgs_stage_duration_seconds" in body
