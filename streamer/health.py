"""Liveness and readiness of a long-running command, for Kubernetes probes (ops/k8s/).

Served next to ``/metrics`` on ``settings.metrics_addr`` (``streamer.metrics.serve``):

- ``GET /healthz`` -- **liveness**: 200 while the command's loop turns. The consumer loop calls
  ``HEALTH.beat()`` on every turn (a poll, a batch, a backpressure retry), the lag exporter on
  every sample. 503 once no beat came for ``stale_s`` (set by the commands: a consumer's
  ``max.poll.interval.ms``, since a loop stuck that long has been dropped from its group anyway
  and only a restart helps; ten lag samples for the exporter). A command still starting (model load, a full re-embed)
  counts as live: a startupProbe bounds that. Backpressure (the graph DB or the broker down)
  keeps the loop turning, so an outage never restarts pods.
- ``GET /readyz`` -- **readiness**: 200 while the command is live, has started and is a member
  of its consumer group (its last join completed, with or without partitions); 503 while it
  starts, while it rejoins after a rebalance, and once it is stopping. Kubernetes sends no
  traffic to these pods; readiness paces rolling updates and PodDisruptionBudgets.

The body is one line of text saying why. One process-wide ``HEALTH``; the state is a few
attributes written by the loop's thread and read by the server's threads (plain reads and
writes of Python attributes, no lock needed).
"""

from __future__ import annotations

import time
from typing import Literal

Phase = Literal["starting", "joining", "member", "stopping"]


class Health:
    def __init__(self, stale_s: float = 300.0) -> None:
        self.stale_s = stale_s
        self.phase: Phase = "starting"
        self.beat_at: float | None = None

    def beat(self) -> None:
        self.beat_at = time.monotonic()

    def set_phase(self, phase: Phase) -> None:
        self.phase = phase
        self.beat()

    def live(self) -> tuple[bool, str]:
        if self.phase == "starting" or self.beat_at is None:
            return True, "starting"
        quiet = time.monotonic() - self.beat_at
        if quiet > self.stale_s:
            return False, f"the loop has not turned for {quiet:.0f}s (stale after {self.stale_s:.0f}s)"
        return True, f"{self.phase}, loop turned {quiet:.1f}s ago"

    def ready(self) -> tuple[bool, str]:
        live, why = self.live()
        if not live:
            return False, why
        if self.phase != "member":
            return False, self.phase
        return True, why


HEALTH = Health()
