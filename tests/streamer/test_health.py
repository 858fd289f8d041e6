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


def test_a_taken_metrics_address_is_one_clear_line_and_exit_2(served_health: int, monkeypatch, capsys) -> None:
    """A second kg-streamer command on the same host and default KGS_METRICS_ADDR: it says what
    to set instead of dying with a traceback (found running ingest and embed side by side)."""
    import argparse

    from streamer import cli
    from streamer.kafka import topics
    from streamer.settings import Settings

    with pytest.raises(metrics.AddressInUse, match="KGS_METRICS_ADDR"):
        metrics.serve(f"127.0.0.1:{served_health}")
    monkeypatch.setattr(topics, "ensure_topics", lambda settings: None)
    made = []
    args = argparse.Namespace(command="embed", until_caught_up=False, max_seconds=None)
    settings = Settings(_env_file=None, metrics_addr=f"127.0.0.1:{served_health}")
    assert cli.run_consumer(lambda s: made.append(s), args, settings) == 2
    assert not made  # no consumer was built
    err = capsys.readouterr().err
    assert err.startswith(f"kg-streamer embed: cannot serve /metrics on 127.0.0.1:{served_health}") and "Traceback" not in err
