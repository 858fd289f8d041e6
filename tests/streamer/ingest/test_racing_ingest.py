"""Three ingest consumers race on the same entities; the worker's replica still equals the graph.

Products are keyed by product id, interactions by user id and relations by source id, so with
three consumers in one group (3 partitions per input topic) the delete of a product, the
interactions of many users with it and the relations that name it are written by different
consumers, concurrently, and their changes can reach kg.changes in another order than the
graph committed them. The changes carry versions (``sinks/cypher.py``) and the worker's
``VersionGuard`` applies only newer ones, so after catching up ``verify --against-graph``
(the same code path) finds nothing. Real broker and ArcadeDB.
"""

from __future__ import annotations

import itertools
import json
import random
import threading
import time
import uuid
from typing import Any

from kafka import KafkaProducer

from streamer import metrics as m
from streamer.contracts.changes import Change
from streamer.embed.verify import verify
from streamer.embed.worker import embed_consumer
from streamer.groups.lag import LagSampler
from streamer.ingest.step import ingest_consumer
from streamer.kafka.topics import ensure_topics
from tests.conftest import wait_for
from tests.helpers import event_message, produce, read_topic

PRODUCTS = 6
USERS = 24
ROUNDS = 60


def racing_events(prefix: str, seed: int = 13) -> list[list[dict[str, Any]]]:
    """Rounds of events on a few products: upserts, deletes, re-upserts, interactions from many
    users, relation upserts and deletes between the products; event times only go forward."""
    rng = random.Random(seed)
    times = itertools.count(1_600_000_000_000)
    rounds: list[list[dict[str, Any]]] = []

    def pid(i: int) -> str:
        return f"{prefix}P{i}"

    for r in range(ROUNDS):
        events: list[dict[str, Any]] = []
        add = lambda event, events=events: events.append({**event, "ts": next(times)})

        for i in range(PRODUCTS):
            roll = rng.random()
            if roll < 0.2:
                add({"type": "product", "op": "delete", "id": pid(i)})
            elif roll < 0.7:
                add(
                    {
                        "type": "product",
                        "id": pid(i),
                        "title": f"product {i} round {r}",
                        "brand": f"{prefix}Brand{rng.randrange(3)}",
                        "categories": [f"{prefix}Home", f"{prefix}Shelf{rng.randrange(2)}"],
                    }
                )
        for _ in range(12):
            add(
                {
                    "type": "interaction",
                    "user_id": f"{prefix}U{rng.randrange(USERS)}",
                    "product_id": pid(rng.randrange(PRODUCTS)),
                    "action": rng.choice(["view", "purchase"]),
                }
            )
        for _ in range(4):
            a, b = rng.sample(range(PRODUCTS), 2)
            add(
                {
                    "type": "relation",
                    "op": "delete" if rng.random() < 0.3 else "upsert",
                    "src": {"label": "Product", "id": pid(a)},
                    "rel": "ALSO_BOUGHT",
                    "dst": {"label": "Product", "id": pid(b)},
                }
            )
        rng.shuffle(events)  # within a round, the producer's order is arbitrary too
        rounds.append(events)
    return rounds


def reorderings(changes: list[Change]) -> int:
    """Records that reached kg.changes after a newer record about the same product: a node
    change with an older (gen, rev), or an edge change naming an older incarnation of it."""
    newest: dict[str, tuple[int, int]] = {}
    late = 0
    for c in changes:
        if c.op.startswith("node") and c.key and c.gen is not None and c.rev is not None:
            late += (c.gen, c.rev) < newest.get(c.key, (0, 0))
            newest[c.key] = max(newest.get(c.key, (0, 0)), (c.gen, c.rev))
        elif c.dst and c.dst_gen is not None:
            late += c.dst_gen < newest.get(c.dst, (0, 0))[0]
    return late


def test_three_racing_ingest_consumers_and_the_replica_still_equals_the_graph(settings, capsys, tmp_path):
    settings = settings.model_copy(update={"batch_max_events": 6, "batch_max_wait_s": 0.02, "torch_threads": 1})
    prefix = f"race{uuid.uuid4().hex[:6]}-"
    consumers = [ingest_consumer(settings) for _ in range(3)]
    results: dict[int, Any] = {}
    threads = [
        threading.Thread(target=lambda i=i, c=c: results.setdefault(i, c.run(max_seconds=600)), daemon=True)
        for i, c in enumerate(consumers)
    ]
    for t in threads:
        t.start()
    try:
        # every consumer holds partitions before the events flow
        wait_for(
            lambda: all(c.consumer is not None and c.consumer.assignment() for c in consumers), timeout_s=60, what="3 members"
        )
        producer = KafkaProducer(bootstrap_servers=settings.bootstrap_servers, acks="all", linger_ms=2)
        try:
            for events in racing_events(prefix):
                for event in events:
                    topic, key, value = event_message(settings, event)
                    producer.send(topic, key=key, value=value)
                producer.flush()
                time.sleep(0.01)
        finally:
            producer.close()
        sampler = LagSampler(settings.bootstrap_servers)
        try:

            def caught_up() -> bool:
                (lag,) = sampler.sample({settings.ingest_group: settings.input_topics})
                assert all(t.is_alive() for t in threads), "an ingest consumer stopped"
                return bool(lag.partitions) and lag.lag_messages == 0

            wait_for(caught_up, timeout_s=300, interval_s=0.5, what="the three consumers to catch up")
        finally:
            sampler.close()
    finally:
        for c in consumers:
            c.stop()
        for t in threads:
            t.join(120)
    assert all(not t.is_alive() for t in threads)

    changes = [Change.from_json(r.value) for r in read_topic(settings, settings.topic_changes)]
    nodes = [c for c in changes if c.op.startswith("node")]
    edges = [c for c in changes if c.op.startswith("edge") and c.rel != "PARENT"]
    assert nodes and all(c.rev is not None and c.gen is not None for c in nodes)
    assert edges and all(c.rev is not None and c.src_gen is not None and c.dst_gen is not None for c in edges)
    assert any(c.gen and c.gen > 1 for c in nodes), "some product was deleted, resurrected and deleted again"

    embed_consumer(settings).run(until_caught_up=True, max_seconds=300)
    stale = m.CHANGES_STALE.labels(settings.embed_group)._value.get()
    report = verify(settings, against_graph=True)
    with capsys.disabled():
        print(
            f"\nracing ingest: {len(changes)} changes, {reorderings(changes)} reached kg.changes after a newer one "
            f"about the same product, {int(stale)} dropped as stale by the worker, "
            f"transactions per consumer {[r.batches if hasattr(r, 'batches') else '?' for r in results.values()]}"
        )
    assert report["ok"], json.dumps(report, indent=2)
    assert report["graph"]["nodes"] > PRODUCTS and report["graph"]["products_behind"] == 0

    # the same records in a shuffled order (what luck may or may not produce above), with
    # replays, to a fresh worker: it must converge to the same graph
    records = read_topic(settings, settings.topic_changes)
    rng = random.Random(7)
    shuffled = records + rng.sample(records, len(records) // 10)
    rng.shuffle(shuffled)
    sfx = uuid.uuid4().hex[:6]
    other = settings.model_copy(
        update={
            "topic_changes": f"{settings.topic_changes}.shuffled{sfx}",
            "embed_group": f"{settings.embed_group}.shuffled{sfx}",
            "state_dir": tmp_path / "shuffled",
        }
    )
    ensure_topics(other)
    produce(other, [(other.topic_changes, r.key, r.value) for r in shuffled])
    embed_consumer(other).run(until_caught_up=True, max_seconds=300)
    again = verify(other, against_graph=True)
    with capsys.disabled():
        print(f"shuffled changelog: {int(m.CHANGES_STALE.labels(other.embed_group)._value.get())} dropped as stale")
    assert again["ok"], json.dumps(again, indent=2)
