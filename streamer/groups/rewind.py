"""Rewind a consumer group to backfill: ``kg-streamer replay --group G --to ...``.

1. **target** (``parse_target``): ``earliest``, ``latest``, an offset (``1200``, the same offset
   on every partition), an ISO-8601 time (``2024-05-01T12:00:00Z``; no zone means UTC) or a
   time relative to now (``-15m``, ``-2h``, ``-1d``).
2. **plan** (``plan_replay``): per partition of the group's topics (``--topics``, else the topics
   it committed on, else the pipeline's topics for the pipeline's groups) the current committed
   offset and the new one. A time resolves with ListOffsets to the first message at or after
   it; no such message means the log end. Everything is clamped to [log start, log end], the end
   being the fetch high watermark (Tansu's ListOffsets LATEST is wrong, and Tansu answers a time
   past the last message with offset 0: both handled here).
3. **guard**: a group with live members is refused (their next commit would overwrite the
   rewind, and the broker rejects the commit anyway). ``force`` removes the members first
   (LeaveGroup on their behalf -- meant for members that are gone but not yet evicted, e.g.
   after kill -9, or on noida-db which never evicts them); a member that is in fact alive rejoins
   and reads from the rewound offsets.
4. **commit** (``apply_replay``): OffsetCommit on behalf of the empty group, with
   ``commit_metadata(by="replay")``.
5. **follow** (``follow_backfill``): the consumers, started again, re-read; the progress is the
   committed offsets moving from the new offsets to the log end seen at planning time.

What a replay changes: the ingest stage re-applies events through the version guards (a repeat
changes nothing in the graph) and republishes their changes; the embedding worker recomputes
nothing that did not move. The embedding worker positions kg.changes from its *own checkpoint*
(``streamer/embed/worker.py``), so rewinding its group only moves the committed offsets it
reports (and lag looks high until its next commit): ``kg-streamer replay`` refuses that group
unless forced; to rebuild the worker's state from the changelog, stop it and remove its
checkpoint.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime

from kafka.admin import MemberToRemove
from kafka.errors import KafkaError
from kafka.structs import OffsetAndMetadata, TopicPartition

from streamer.groups.lag import LagSampler
from streamer.kafka.consumer import commit_metadata

log = logging.getLogger(__name__)

_RELATIVE = re.compile(r"^-(\d+(?:\.\d+)?)([smhd])$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}


class ReplayRefused(RuntimeError):
    """The group has live members and ``force`` was not given."""

    def __init__(self, group: str, members: list[dict]):
        self.group = group
        self.members = members
        who = ", ".join(f"{mm.get('client_id') or '?'}@{mm.get('client_host') or '?'}" for mm in members)
        super().__init__(
            f"group {group} has {len(members)} live member(s) ({who}): stop its consumers first, "
            f"or --force to remove members that are gone"
        )


@dataclass(frozen=True)
class Target:
    kind: str  # "earliest" | "latest" | "offset" | "timestamp"
    value: int | None = None  # the offset, or the time in unix ms

    def describe(self) -> str:
        if self.kind == "timestamp":
            assert self.value is not None, "a timestamp target has a value"
            return datetime.fromtimestamp(self.value / 1000, tz=UTC).isoformat()
        return self.kind if self.value is None else str(self.value)


def parse_target(text: str, now: float | None = None) -> Target:
    """``earliest`` | ``latest`` | offset | ISO-8601 time | relative time (``-15m``)."""
    text = text.strip()
    if text.lower() in ("earliest", "latest"):
        return Target(text.lower())
    if text.isdigit():
        return Target("offset", int(text))
    match = _RELATIVE.match(text)
    if match:
        seconds = float(match.group(1)) * _UNIT_S[match.group(2)]
        return Target("timestamp", int(((time.time() if now is None else now) - seconds) * 1000))
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"--to {text!r}: expected earliest, latest, an offset, an ISO-8601 time or -<N>[smhd]") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return Target("timestamp", int(when.timestamp() * 1000))


@dataclass
class PartitionPlan:
    topic: str
    partition: int
    current: int | None  # committed now (None: never committed)
    target: int
    start: int
    end: int

    @property
    def tp(self) -> TopicPartition:
        return TopicPartition(self.topic, self.partition)

    @property
    def to_reread(self) -> int:
        """Messages the group will read again (negative: skipped)."""
        current = self.start if self.current is None else self.current
        return current - self.target

    @property
    def backfill(self) -> int:
        """Messages from the new offset to the log end: the work until caught up."""
        return max(0, self.end - self.target)

    def to_dict(self) -> dict:
        return {
            "topic": self.topic,
            "partition": self.partition,
            "current": self.current,
            "target": self.target,
            "start": self.start,
            "end": self.end,
            "to_reread": self.to_reread,
            "backfill": self.backfill,
        }


def replay_topics(sampler: LagSampler, group: str, topics: Iterable[str] | None, known: dict[str, list[str]]) -> list[str]:
    if topics:
        return sorted(set(topics))
    committed = {tp.topic for tp in sampler.committed(group)}
    return sorted(committed or set(known.get(group, [])))


def plan_replay(sampler: LagSampler, group: str, topics: list[str], target: Target) -> list[PartitionPlan]:
    tps = sampler.partitions(topics)
    if not tps:
        raise ValueError(f"no partitions for topics {topics} (do they exist?)")
    committed = sampler.committed(group)
    starts = sampler.start_offsets(tps)
    ends = sampler.end_offsets(tps)
    if target.kind == "earliest":
        raw = dict(starts)
    elif target.kind == "latest":
        raw = dict(ends)
    elif target.kind == "offset":
        assert target.value is not None, "an offset target has a value"
        raw = {tp: int(target.value) for tp in tps}
    else:
        assert target.value is not None, "a timestamp target has a value"
        answer = sampler.admin.list_partition_offsets({tp: int(target.value) for tp in tps})
        # Kafka and noida-db answer offset -1 when no message is that new; Tansu answers offset 0
        # with timestamp -1. Either way: nothing at or after the time -> the log end.
        raw = {tp: ends[tp] if answer[tp].offset < 0 or answer[tp].timestamp < 0 else answer[tp].offset for tp in tps}
    return [
        PartitionPlan(
            tp.topic,
            tp.partition,
            committed[tp].offset if tp in committed else None,
            min(max(raw[tp], starts[tp]), ends[tp]),
            starts[tp],
            ends[tp],
        )
        for tp in tps
    ]


def apply_replay(
    sampler: LagSampler, group: str, plans: list[PartitionPlan], force: bool = False, attempts: int = 5
) -> list[dict]:
    """Commit the plan's offsets for the group; returns the members removed (``force``)."""
    removed: list[dict] = []
    offsets = {p.tp: OffsetAndMetadata(p.target, commit_metadata(by="replay"), -1) for p in plans}
    for attempt in range(attempts):
        _state, members = sampler.describe(group)
        if members:
            if not force:
                raise ReplayRefused(group, members)
            answer = sampler.admin.remove_group_members(
                group,
                [MemberToRemove(member_id=mm["member_id"], group_instance_id=mm.get("group_instance_id")) for mm in members],
            )
            log.warning("removed %d member(s) of %s: %s", len(members), group, {k: v.__name__ for k, v in answer.items()})
            removed += members
        errors = {tp: err for tp, err in sampler.admin.alter_group_offsets(group, offsets).items() if err.errno != 0}
        if not errors:
            return removed
        log.warning("commit for %s refused (%s), attempt %d", group, {str(k): v.__name__ for k, v in errors.items()}, attempt + 1)
        if not force:
            raise ReplayRefused(group, members or [{"client_id": "a member that joined meanwhile"}])
        time.sleep(0.2 * (attempt + 1))
    raise KafkaError(f"could not commit the replay offsets for {group} after {attempts} attempts")


def backfill_progress(sampler: LagSampler, group: str, plans: list[PartitionPlan]) -> int:
    """Messages of the plan the group has committed past so far."""
    committed = sampler.committed(group)
    done = 0
    for p in plans:
        at = committed[p.tp].offset if p.tp in committed else p.target
        done += min(max(at - p.target, 0), p.backfill)
    return done


def follow_backfill(
    sampler: LagSampler,
    group: str,
    plans: list[PartitionPlan],
    timeout_s: float | None = None,
    interval_s: float = 0.5,
    on_progress: Callable[[int, int], None] | None = None,
) -> dict:
    """Watch the group commit through the plan until caught up with the log end seen when
    planning (or ``timeout_s``). Returns a summary."""
    total = sum(p.backfill for p in plans)
    started = time.monotonic()
    done = 0
    while True:
        done = backfill_progress(sampler, group, plans)
        if on_progress:
            on_progress(done, total)
        if done >= total or (timeout_s is not None and time.monotonic() - started > timeout_s):
            break
        time.sleep(interval_s)
    seconds = time.monotonic() - started
    return {
        "group": group,
        "backfill_messages": total,
        "done_messages": done,
        "caught_up": done >= total,
        "seconds": round(seconds, 2),
        "messages_per_s": round(done / seconds, 1) if seconds > 0 else None,
    }
