"""Sharded embedding workers: which output keys this worker owns, decided by Kafka's group protocol.

Scale-out model (docs/scaling.md): N workers each follow the **whole** changelog and keep the
whole replica (the hidden layers are cheap to keep exact everywhere), but each computes the
last layer and publishes vectors only for the keys of the shards it owns. A key's shard is
``shard_of(key, S)``: Kafka's default partitioner (murmur2 of the key bytes, modulo S), so when
kg.embeddings has S partitions, shard s is exactly partition s and every output partition has
one writer at a time.

Ownership is not ours to coordinate: ``ShardMembership`` is a member of the consumer group
``<embed_group>.shards`` over the topic ``kg.shards``, which has S partitions and no records.
The partitions the group assigns to a member are the shards it owns. The assignor is
kafka-python's sticky assignor (a rebalance moves as few shards as possible; kafka-python has no
cooperative protocol, so the eager protocol revokes everything and the sticky assignment hands
most of it back), and ``group_instance_id`` (the pod name) gives static membership: a restarted
pod gets its shards back without a rebalance, a killed one loses them after the session timeout.

Lifecycle of a ``ShardMembership`` (a thread of its own, the only user of its Kafka client):

1. ``start()`` subscribes and polls in its thread (``poll`` runs the group protocol: join, sync,
   heartbeat; the rebalance callbacks run inside it).
2. **assigned** -- the new set of shards is left for the worker's thread (``take()``).
3. **revoked** -- the worker must stop publishing these shards *before* another member gets them,
   and waits (``rebalancing``) until the new assignment before it applies the next batch.
   The callback leaves "owns nothing" for the worker and waits (at most ``revoke_wait_s``) until
   the worker's thread has taken it (``take()``), i.e. finished the batch in hand. Only then does
   this member rejoin, so the next owner is assigned after the previous one stopped.
   A member killed with ``kill -9`` stops publishing by itself.
4. ``close()`` leaves the group (a dynamic member's shards move at once; a static member's after
   the session timeout).

The worker (``streamer.embed.worker.EmbedStep``) reads ``take()`` between batches, restricts the
engine's last layer to the owned shards, and on every shard it newly owns recomputes that
shard's last layer from the exact hidden layers and publishes its vectors (the previous owner
may have died before publishing some of them): no update is lost and no key keeps a dead owner.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable, Sequence

import numpy as np
from kafka import ConsumerRebalanceListener, KafkaConsumer
from kafka.coordinator.assignors.sticky.sticky_assignor import StickyPartitionAssignor
from kafka.partitioner.default import murmur2
from kafka.structs import TopicPartition

from streamer.kafka.consumer import subscribe
from streamer.settings import Settings

log = logging.getLogger(__name__)


def shard_of(key: str, shards: int) -> int:
    """The shard of an output key: Kafka's default partitioner over ``shards`` partitions."""
    return (murmur2(key.encode("utf-8")) & 0x7FFFFFFF) % shards


def shards_of(keys: Sequence[str | None], shards: int) -> np.ndarray:
    """``shard_of`` for many keys (int32; -1 for a missing key)."""
    return np.fromiter(((-1 if k is None else shard_of(k, shards)) for k in keys), dtype=np.int32, count=len(keys))


def member_name(settings: Settings) -> str:
    """This worker's name: ``embed_member``, else the static instance id (the pod name), else
    the host name. It names the worker's own changelog group and its records."""
    if settings.embed_member:
        return settings.embed_member
    if settings.group_instance_id:
        return settings.group_instance_id
    import socket

    return socket.gethostname()


class _Listener(ConsumerRebalanceListener):
    def __init__(self, owner: ShardMembership):
        self.owner = owner

    def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        self.owner._revoked()

    def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        self.owner._assigned({tp.partition for tp in assigned})


class ShardMembership:
    """Owned shards from the group ``<embed_group>.shards`` (module docstring)."""

    def __init__(self, settings: Settings, revoke_wait_s: float = 30.0):
        self.settings = settings
        self.shards = settings.embed_shards
        self.group = f"{settings.embed_group}.shards"
        self.revoke_wait_s = revoke_wait_s
        self._lock = threading.Condition()
        self._pending: frozenset[int] | None = None  # a new owned set the worker has not taken
        self._owned: frozenset[int] = frozenset()  # what the worker acts on (after take())
        self._rebalancing = True  # from subscribe, and from a revoke until the next assignment
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.error: BaseException | None = None
        self.consumer = KafkaConsumer(
            bootstrap_servers=settings.bootstrap_servers,
            group_id=self.group,
            client_id=f"kg-embed-shards-{member_name(settings)}",
            enable_auto_commit=False,
            session_timeout_ms=settings.session_timeout_ms,
            heartbeat_interval_ms=settings.heartbeat_interval_ms,
            max_poll_interval_ms=max(settings.max_poll_interval_ms, int(revoke_wait_s * 1000) + 10_000),
            group_instance_id=settings.group_instance_id,
            partition_assignment_strategy=[StickyPartitionAssignor],
        )

    # --- the membership thread ----------------------------------------------------------
    def start(self) -> None:
        subscribe(self.consumer, [self.settings.topic_shards], _Listener(self))  # one rebalance, not two
        self._thread = threading.Thread(target=self._run, name="kg-embed-shards", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                self.consumer.poll(timeout_ms=200)  # kg.shards has no records: this runs the protocol
        except BaseException as exc:  # the worker's thread sees it in take()
            log.exception("shard membership failed")
            self.error = exc

    def _assigned(self, shards: set[int]) -> None:
        with self._lock:
            self._pending = frozenset(shards)
            self._rebalancing = False
            self._lock.notify_all()
        log.info("shard group %s: assigned %d of %d shards %s", self.group, len(shards), self.shards, sorted(shards))

    def _revoked(self) -> None:
        with self._lock:
            self._rebalancing = True
            if not self._owned and self._pending is None:
                return
            self._pending = frozenset()
            self._lock.notify_all()
            deadline = time.monotonic() + self.revoke_wait_s
            while self._pending is not None and not self._stop.is_set():
                left = deadline - time.monotonic()
                if left <= 0:
                    log.warning("shard group %s: the worker kept its shards past %.0fs", self.group, self.revoke_wait_s)
                    return
                self._lock.wait(left)

    # --- the worker's side ----------------------------------------------------------------
    def take(self) -> frozenset[int] | None:
        """The new owned set if it changed since the last call (the worker acts on it before
        its next batch), else None. Raises if the membership thread failed."""
        if self.error is not None:
            raise RuntimeError(f"shard membership failed: {self.error!r}") from self.error
        with self._lock:
            pending, self._pending = self._pending, None
            if pending is not None:
                self._owned = pending
                self._lock.notify_all()
            return pending

    @property
    def rebalancing(self) -> bool:
        """Between a revoke (or the start) and the next assignment: the worker waits instead of
        applying batches, so that the shards it gets back are still current (a batch applied
        while it owns nothing would leave every shard's last layer stale, and getting them back
        would cost a refresh and a republish of all of them)."""
        return self._rebalancing

    @property
    def changing(self) -> bool:
        """A new owned set waits for ``take()``."""
        return self._pending is not None

    def close(self) -> None:
        self._stop.set()
        with self._lock:
            self._lock.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=10)
        try:
            self.consumer.close()
        except Exception:  # closing is best effort
            log.exception("error while closing the shard membership")


def owned_mask(shard_ids: np.ndarray, owned: Iterable[int], shards: int) -> np.ndarray:
    """Boolean mask: which of ``shard_ids`` (-1: unknown) are in ``owned``."""
    table = np.zeros(max(shards, 1), dtype=bool)
    table[list(owned)] = True
    return table[np.clip(shard_ids, 0, None)] & (shard_ids >= 0)
