"""Consumer lag from the broker: messages, seconds, commit staleness (``status``, exporters, alerts).

One **sample** of a group (``LagSampler.sample``) asks the broker, never the consumer:

1. the group's committed offsets and their metadata (OffsetFetch) and its live members
   (DescribeGroups);
2. the log start of every partition of the group's topics (ListOffsets EARLIEST);
3. a throw-away consumer *without* a group ``assign``s those partitions, seeks each to the
   committed offset and fetches once. The fetch response carries the high watermark -- the
   real log end, which Tansu's ListOffsets LATEST (``end_offsets()``) is not -- and the first
   record it returns is the oldest unconsumed message, whose broker timestamp (CreateTime, or
   LogAppendTime where the topic is configured so) dates the lag. No estimate from rates or
   offset/time interpolation tables (kafka-lag-exporter, klag's fallback).

Per partition (``PartitionLag``):

- ``lag_messages = end - position``; the position is the committed offset, or the log start
  when the group never committed (or committed below it): where ``auto_offset_reset=earliest``
  makes the consumer start;
- ``lag_seconds = now - timestamp(first unconsumed message)`` while lag_messages > 0, else 0;
- **last commit**: kg-streamer's consumers write the commit time into the offset metadata
  (``commit_metadata()``: ``{"ts": <unix ms>}``; Apache Kafka and noida-db keep it, Tansu drops
  it). A long-running ``LagMonitor`` also notes the sample at which a committed offset moved.
  Otherwise it is unknown (``None``);
- **commit staleness** (klag's idea, reported only while lag > 0):
  ``min(now - last commit, lag_seconds)``: how long the group has had work and not committed.
  A slow consumer keeps committing and stays low; a stuck or dead one grows with the clock.
  With no known commit it equals lag_seconds.

**LagMonitor** samples groups every ``interval_s`` from its own daemon thread with its own
connections, so it never blocks a poll loop and keeps reporting while a loop is stuck, and
sets the gauges declared in ``streamer.metrics``. ``kgs_consumer_lag_seconds`` and
``kgs_consumer_commit_staleness_seconds`` are computed when scraped: the value as of the last
sample, or -- when the committed offset did not move between the last two samples (a stopped
or stuck group) -- extrapolated to the scrape time, which is exact while the group stays
stopped and at most one interval high once it starts committing again.

Every long-running consumer runs a monitor for its own group (``start_monitor``, a no-op when
metrics are disabled); ``kg-streamer lag-exporter`` runs one for any groups and keeps
reporting while the consumers are down. Several processes can report the same partition:
dashboards and alerts aggregate with ``max by (group, topic, partition)``.
"""

from __future__ import annotations

import functools
import logging
import math
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field

from kafka import KafkaConsumer
from kafka.admin import KafkaAdminClient, OffsetSpec
from kafka.structs import OffsetAndMetadata, TopicPartition

from streamer import metrics as m
from streamer.kafka.consumer import parse_commit_metadata
from streamer.settings import Settings

log = logging.getLogger(__name__)

DEFAULT_INTERVAL_S = 5.0
FETCH_TIMEOUT_S = 5.0


# --- what a sample holds --------------------------------------------------------------------
@dataclass
class PartitionLag:
    group: str
    topic: str
    partition: int
    committed: int | None  # the group's committed offset (None: never committed)
    start: int  # log start offset
    end: int  # log end offset (high watermark)
    oldest_ts: float | None  # broker timestamp (unix s) of the first unconsumed message
    commit_ts: float | None  # last commit time (unix s), when known
    sampled_at: float
    exact: bool = True  # False when the fetch did not answer in time (end from ListOffsets)

    @property
    def position(self) -> int:
        return self.start if self.committed is None or self.committed < self.start else self.committed

    @property
    def lag_messages(self) -> int:
        return max(0, self.end - self.position)

    def lag_seconds(self, now: float | None = None) -> float | None:
        """Age of the oldest unconsumed message at ``now`` (default: the sample time)."""
        if self.lag_messages == 0:
            return 0.0
        if self.oldest_ts is None:
            return None
        return max(0.0, (self.sampled_at if now is None else now) - self.oldest_ts)

    def commit_age(self, now: float | None = None) -> float | None:
        if self.commit_ts is None:
            return None
        return max(0.0, (self.sampled_at if now is None else now) - self.commit_ts)

    def commit_staleness(self, now: float | None = None) -> float | None:
        """While lag > 0: min(commit age, lag seconds); 0 when caught up."""
        lag_s = self.lag_seconds(now)
        if lag_s is None or lag_s == 0.0:
            return lag_s
        age = self.commit_age(now)
        return lag_s if age is None else min(age, lag_s)

    def to_dict(self) -> dict:
        out = {k: v for k, v in asdict(self).items() if k not in ("oldest_ts", "commit_ts", "sampled_at", "group")}
        out.update(
            lag_messages=self.lag_messages,
            lag_seconds=_round(self.lag_seconds()),
            last_commit_age_seconds=_round(self.commit_age()),
            commit_staleness_seconds=_round(self.commit_staleness()),
            oldest_unconsumed_timestamp=self.oldest_ts,
            last_commit_timestamp=self.commit_ts,
        )
        return out


@dataclass
class GroupLag:
    group: str
    state: str | None  # Stable, Empty, PreparingRebalance, Dead ... (None: not answered)
    members: list[dict]  # member_id, client_id, client_host, group_instance_id
    partitions: list[PartitionLag]
    sampled_at: float
    topics: list[str] = field(default_factory=list)

    @property
    def lag_messages(self) -> int:
        return sum(p.lag_messages for p in self.partitions)

    @property
    def lag_seconds(self) -> float | None:
        values = [p.lag_seconds() for p in self.partitions]
        known = [v for v in values if v is not None]
        return max(known) if known else (None if values else 0.0)

    def to_dict(self) -> dict:
        return {
            "group": self.group,
            "state": self.state,
            "members": self.members,
            "topics": self.topics,
            "sampled_at": self.sampled_at,
            "lag_messages": self.lag_messages,
            "lag_seconds": _round(self.lag_seconds),
            "partitions": [p.to_dict() for p in self.partitions],
        }


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def pipeline_groups(settings: Settings, known_groups: Iterable[str] = ()) -> dict[str, list[str]]:
    """The pipeline's consumer groups and the topics each reads.

    Sharded embedding workers (``embed_shards`` > 0) each follow the changelog in a group of
    their own, ``<embed_group>.<member>`` (``streamer/embed/worker.py``), so the plain
    ``embed_group`` is the pipeline's only while the worker is unsharded. Every worker group
    among ``known_groups`` (the broker's, ``LagSampler.list_groups``) is added; the shard group
    ``<embed_group>.shards`` reads no records and is left out."""
    groups = {settings.ingest_group: list(settings.input_topics)}
    if settings.embed_shards <= 0:
        groups[settings.embed_group] = [settings.topic_changes]
    prefix = f"{settings.embed_group}."
    for group in sorted(set(known_groups)):
        if group.startswith(prefix) and group != f"{prefix}shards":
            groups[group] = [settings.topic_changes]
    return groups


# --- talking to the broker ------------------------------------------------------------------
class _Admin(KafkaAdminClient):
    """KafkaAdminClient that tolerates authorized-operation bits it does not know (Tansu sets
    bit 15 in DescribeGroups, which kafka-python 3.0.12 cannot map to an ACLOperation and
    raises on); we never ask for them."""

    def _process_acl_operations(self, obj):
        obj.pop("authorized_operations", None)
        return obj


def fetch_heads(
    bootstrap_servers: str, positions: Mapping[TopicPartition, int], timeout_s: float = FETCH_TIMEOUT_S
) -> dict[TopicPartition, tuple[int, object | None]]:
    """Fetch once at each position: {tp: (high watermark, first record at or after it or None)}.

    A fresh consumer without a group, so the high watermark is the one this fetch returned
    (never a stale one) and no group is joined. Partitions that did not answer before
    ``timeout_s`` are missing from the result.
    """
    if not positions:
        return {}
    consumer = KafkaConsumer(
        bootstrap_servers=bootstrap_servers,
        group_id=None,
        client_id="kgs-lag",
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        fetch_max_wait_ms=100,
        max_partition_fetch_bytes=64 * 1024,
    )
    heads: dict[TopicPartition, tuple[int, object | None]] = {}
    try:
        consumer.assign(list(positions))
        for tp, offset in positions.items():
            consumer.seek(tp, offset)
        pending = set(positions)
        deadline = time.monotonic() + timeout_s
        while pending and time.monotonic() < deadline:
            for tp, records in consumer.poll(timeout_ms=100).items():
                if tp in pending and records:
                    heads[tp] = (consumer.highwater(tp), records[0])
                    pending.discard(tp)
                    consumer.pause(tp)
            for tp in list(pending):
                highwater = consumer.highwater(tp)
                if highwater is not None and consumer.position(tp) >= highwater:
                    heads[tp] = (highwater, None)  # nothing unconsumed
                    pending.discard(tp)
    finally:
        consumer.close()
    return heads


class LagSampler:
    """Samples groups' lag from the broker (see the module docstring). Not thread-safe: one
    sampler per thread."""

    def __init__(self, bootstrap_servers: str, request_timeout_s: float = 10.0):
        self.bootstrap_servers = bootstrap_servers
        self.request_timeout_s = request_timeout_s
        self._admin: _Admin | None = None

    @property
    def admin(self) -> _Admin:
        if self._admin is None:
            self._admin = _Admin(
                bootstrap_servers=self.bootstrap_servers,
                client_id="kgs-lag",
                request_timeout_ms=int(self.request_timeout_s * 1000),
            )
        return self._admin

    def close(self) -> None:
        if self._admin is not None:
            try:
                self._admin.close()
            finally:
                self._admin = None

    def list_groups(self) -> list[str]:
        """The ids of the consumer groups the broker knows."""
        return sorted({g["group_id"] if isinstance(g, dict) else g[0] for g in self.admin.list_groups()})

    # --- pieces also used by replay ---------------------------------------------------------
    def partitions(self, topics: Iterable[str]) -> list[TopicPartition]:
        """Partitions of the topics that exist."""
        topics = sorted(set(topics))
        if not topics:
            return []
        tps = []
        for topic in self.admin.describe_topics(topics):
            if topic.get("error_code", 0):
                log.debug("topic %s: error %s", topic.get("name"), topic.get("error_code"))
                continue
            tps += [TopicPartition(topic["name"], p["partition_index"]) for p in topic["partitions"]]
        return sorted(tps)

    def committed(self, group: str) -> dict[TopicPartition, OffsetAndMetadata]:
        offsets = self.admin.list_group_offsets({group: None}).get(group, {})
        return {tp: meta for tp, meta in offsets.items() if meta.offset is not None and meta.offset >= 0}

    def describe(self, group: str) -> tuple[str | None, list[dict]]:
        """(state, live members) of a group."""
        try:
            description = self.admin.describe_groups([group]).get(group, {})
        except Exception as exc:  # noqa: BLE001 - a broker without DescribeGroups still gets lag
            log.warning("describe group %s failed: %s", group, exc)
            return None, []
        members = [
            {k: member.get(k) for k in ("member_id", "group_instance_id", "client_id", "client_host")}
            for member in description.get("members") or []
        ]
        return description.get("group_state"), members

    def start_offsets(self, tps: Iterable[TopicPartition]) -> dict[TopicPartition, int]:
        tps = list(tps)
        if not tps:
            return {}
        answer = self.admin.list_partition_offsets({tp: OffsetSpec.EARLIEST for tp in tps})
        return {tp: max(0, answer[tp].offset) for tp in tps}

    def end_offsets(self, tps: Iterable[TopicPartition]) -> dict[TopicPartition, int]:
        """Exact log end offsets, from the high watermark of a fetch at the log start."""
        starts = self.start_offsets(tps)
        heads = fetch_heads(self.bootstrap_servers, starts)
        missing = [tp for tp in starts if tp not in heads]
        if missing:
            raise TimeoutError(f"no fetch answer for {missing} within {FETCH_TIMEOUT_S}s")
        return {tp: heads[tp][0] for tp in starts}

    # --- the sample -------------------------------------------------------------------------
    def sample(self, groups: Mapping[str, Sequence[str] | None]) -> list[GroupLag]:
        """Lag of each group over the given topics (None: the topics it has committed on)."""
        out = []
        for group, topics in groups.items():
            committed = self.committed(group)
            state, members = self.describe(group)
            topics = sorted(set(topics) if topics else {tp.topic for tp in committed})
            tps = self.partitions(topics)
            starts = self.start_offsets(tps)
            positions = {
                tp: starts[tp] if tp not in committed or committed[tp].offset < starts[tp] else committed[tp].offset for tp in tps
            }
            heads = fetch_heads(self.bootstrap_servers, positions)
            sampled_at = time.time()
            ends = {}
            if len(heads) < len(tps):  # a partition did not answer: fall back to ListOffsets
                latest = self.admin.list_partition_offsets({tp: OffsetSpec.LATEST for tp in tps if tp not in heads})
                ends = {tp: o.offset for tp, o in latest.items()}
            partitions = []
            for tp in tps:
                meta = committed.get(tp)
                highwater, record = heads.get(tp, (ends.get(tp, positions[tp]), None))
                ts = getattr(record, "timestamp", None)
                partitions.append(
                    PartitionLag(
                        group=group,
                        topic=tp.topic,
                        partition=tp.partition,
                        committed=meta.offset if meta else None,
                        start=starts[tp],
                        end=max(highwater, positions[tp]),
                        oldest_ts=ts / 1000 if ts is not None and ts >= 0 else None,
                        commit_ts=parse_commit_metadata(meta.metadata) if meta else None,
                        sampled_at=sampled_at,
                        exact=tp in heads,
                    )
                )
            out.append(GroupLag(group, state, members, partitions, sampled_at, topics))
        return out


# --- the monitor ----------------------------------------------------------------------------
@dataclass
class _Track:
    lag: PartitionLag
    stalled: bool = False  # committed offset unchanged since the previous sample
    observed_commit_ts: float | None = None


class LagMonitor:
    """Samples ``groups`` every ``interval_s`` on a daemon thread and sets the lag gauges.
    With ``discover`` (the pipeline's settings), the groups are the pipeline's, found again at
    every sample (``pipeline_groups``): sharded workers come and go as they scale."""

    def __init__(
        self,
        bootstrap_servers: str,
        groups: Mapping[str, Sequence[str] | None],
        interval_s: float = DEFAULT_INTERVAL_S,
        discover: Settings | None = None,
    ):
        self.groups = dict(groups)
        self.discover = discover
        self.interval_s = interval_s
        self.sampler = LagSampler(bootstrap_servers)
        self._tracks: dict[tuple[str, str, int], _Track] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.last: list[GroupLag] = []
        self.sampled_at: float | None = None  # monotonic time of the last successful sample
        for group in self.groups:
            m.LAG_SAMPLE_ERRORS.labels(group)  # at 0 from the first scrape

    def start(self) -> LagMonitor:
        self._thread = threading.Thread(target=self._run, name="kgs-lag-monitor", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout_s: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout_s)
        self.sampler.close()

    def _run(self) -> None:
        while not self._stop.is_set():
            began = time.monotonic()
            try:
                self.sample_once()
            except Exception as exc:  # noqa: BLE001 - a monitor must outlive broker hiccups
                log.warning("lag sample failed: %s", exc)
                for group in self.groups:
                    m.LAG_SAMPLE_ERRORS.labels(group).inc()
                self.sampler.close()  # reconnect next time
            self._stop.wait(max(0.05, self.interval_s - (time.monotonic() - began)))

    def sample_once(self) -> list[GroupLag]:
        if self.discover is not None:
            self.groups = dict(pipeline_groups(self.discover, self.sampler.list_groups()))
        sample = self.sampler.sample(self.groups)
        for group_lag in sample:
            self._publish(group_lag)
        self.last = sample
        self.sampled_at = time.monotonic()
        return sample

    def _publish(self, group_lag: GroupLag) -> None:
        group = group_lag.group
        m.GROUP_MEMBERS.labels(group).set(len(group_lag.members))
        for p in group_lag.partitions:
            key = (group, p.topic, p.partition)
            labels = (group, p.topic, str(p.partition))
            previous = self._tracks.get(key)
            track = _Track(p)
            if previous is not None:
                moved = previous.lag.committed != p.committed
                track.stalled = not moved
                track.observed_commit_ts = p.sampled_at if moved else previous.observed_commit_ts
                if p.oldest_ts is None and not p.exact and not moved:
                    p.oldest_ts = previous.lag.oldest_ts  # the fetch timed out: keep what we knew
            exact_commit_ts = p.commit_ts  # from the commit metadata
            if p.commit_ts is None and track.observed_commit_ts is not None:
                p.commit_ts = track.observed_commit_ts
            self._tracks[key] = track
            if previous is None:
                m.LAG_SECONDS.labels(*labels).set_function(functools.partial(self._lag_seconds, key))
                m.COMMIT_STALENESS.labels(*labels).set_function(functools.partial(self._staleness, key))
            m.LAG_MESSAGES.labels(*labels).set(p.lag_messages)
            if p.committed is not None:
                m.COMMITTED_OFFSET.labels(*labels).set(p.committed)
            if exact_commit_ts is not None:
                m.LAST_COMMIT_TIMESTAMP.labels(*labels).set(exact_commit_ts)
            m.TOPIC_END_OFFSET.labels(p.topic, str(p.partition)).set(p.end)
            m.TOPIC_START_OFFSET.labels(p.topic, str(p.partition)).set(p.start)
        m.LAG_SAMPLE_TIMESTAMP.labels(group).set(group_lag.sampled_at)

    def _now_for(self, track: _Track) -> float:
        return time.time() if track.stalled else track.lag.sampled_at

    def _lag_seconds(self, key: tuple[str, str, int]) -> float:
        track = self._tracks.get(key)
        if track is None:
            return 0.0
        value = track.lag.lag_seconds(self._now_for(track))
        return math.nan if value is None else value

    def _staleness(self, key: tuple[str, str, int]) -> float:
        track = self._tracks.get(key)
        if track is None:
            return 0.0
        value = track.lag.commit_staleness(self._now_for(track))
        return math.nan if value is None else value


def start_monitor(settings: Settings, group: str, topics: Sequence[str]) -> LagMonitor | None:
    """The hook a long-running consumer calls when it starts: where this process serves
    ``/metrics`` (``streamer.metrics.serving()``), sample its group's lag in the background.
    Nowhere else: nobody would read the gauges. Stop it on close."""
    if not m.serving():
        return None
    return LagMonitor(settings.bootstrap_servers, {group: list(topics)}).start()
