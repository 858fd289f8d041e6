"""An edge write racing a product delete, interleaved by hand over two real Bolt transactions.

The edge writer reads the product as live and attaches an edge; the deleter tombstones the
product and detaches its edges, and commits first. Without the endpoint lock of
``sinks/cypher.py`` (``_lock``) the edge writer then committed too, leaving a live edge on a
tombstone that no kg.changes record describes: after a resurrection the graph held an edge the
worker's replica had dropped as stale (seen by tests/streamer/ingest/test_racing_ingest.py
under load). With the lock the two serialise: on ArcadeDB (optimistic MVCC) the edge writer's
commit fails with a transient error, and ``GraphSink.write`` would retry it against the
tombstone; on Neo4j the deleter waits for the edge writer's lock, then detaches the committed
edge. Either way no live edge is left on the tombstone. Real ArcadeDB over Bolt.
"""

from __future__ import annotations

import json
import threading
import uuid
from typing import Any

import pytest
from neo4j import GraphDatabase
from neo4j.exceptions import Neo4jError, TransientError

from sinks import cypher
from sinks.graph_db import GraphSink
from streamer.contracts.events import decode_event
from streamer.ingest.plan import plan_batch
from tests.helpers import query


def _batch(*events: dict[str, Any]) -> Any:
    return plan_batch([decode_event(json.dumps(e).encode()) for e in events])


def _race(settings: Any, edge_statement: str, edge_rows: list[dict[str, Any]], victim: str) -> str:
    """Run ``edge_statement`` in an open transaction, delete ``victim`` in another one that
    commits first (or waits for the first, where the server locks), then commit the first.
    Returns how the edge writer ended: "committed" or "conflict"."""
    delete = _batch({"type": "product", "op": "delete", "id": victim, "ts": 2_000})
    auth = (settings.bolt_user, settings.bolt_password.get_secret_value())
    with (
        GraphDatabase.driver(settings.bolt_uri, auth=auth) as driver,
        driver.session(database=settings.bolt_database) as writer_session,
    ):
        writer = writer_session.begin_transaction()
        writer.run(edge_statement, rows=edge_rows).consume()
        failure: list[BaseException] = []

        def deleter() -> None:
            try:
                with driver.session(database=settings.bolt_database) as session, session.begin_transaction() as tx:
                    ids = [r["id"] for r in tx.run(cypher.PRODUCT_DELETE, rows=delete.product_deletes)]
                    tx.run(cypher.PRODUCT_DETACH, ids=ids).consume()
                    tx.commit()
            except BaseException as exc:  # surfaced below
                failure.append(exc)

        thread = threading.Thread(target=deleter, daemon=True)
        thread.start()
        thread.join(3.0)  # commits now (optimistic), or waits for the writer's lock (locking)
        try:
            writer.commit()
            outcome = "committed"
        except Neo4jError as exc:
            if not isinstance(exc, TransientError) and ".Transient" not in (exc.code or ""):
                raise
            outcome = "conflict"
        finally:
            writer.close()
        thread.join(30.0)
        assert not thread.is_alive(), "the delete never finished"
        assert not failure, f"the delete failed: {failure[0]!r}"
    return outcome


def _edges_on_tombstone(settings: Any, product: str) -> list[dict[str, Any]]:
    return query(
        settings,
        "MATCH (x)-[r]-(p:Product {id: $id}) WHERE p.deleted = true RETURN type(r) AS rel, x.id AS other",
        id=product,
    )


@pytest.mark.parametrize("kind", ["interaction", "relation"])
def test_an_edge_write_racing_a_product_delete_leaves_no_edge_on_the_tombstone(settings, kind):
    p = f"race-{uuid.uuid4().hex[:6]}"
    other, victim = f"{p}-P1", f"{p}-P2"
    sink = GraphSink(settings)
    try:
        sink.write(
            _batch(
                {"type": "product", "id": other, "title": "other", "ts": 1_000},
                {"type": "product", "id": victim, "title": "victim", "ts": 1_000},
            )
        )
        # an earlier incarnation had edges: the victim's edge lists exist and are empty, so the
        # racing edge lands in a list the delete does not touch (the case the race needs)
        sink.write(
            _batch(
                *(
                    {"type": "interaction", "user_id": f"{p}-U{i}", "product_id": victim, "action": "view", "ts": 1_100}
                    for i in range(5)
                )
            )
        )
        sink.write(_batch({"type": "product", "op": "delete", "id": victim, "ts": 1_200}))
        sink.write(_batch({"type": "product", "id": victim, "title": "victim again", "ts": 1_300}))
    finally:
        sink.close()
    if kind == "interaction":
        batch = _batch({"type": "interaction", "user_id": f"{p}-U", "product_id": victim, "action": "purchase", "ts": 1_500})
        ((rel, rows),) = batch.interactions.items()
        statement = cypher.interaction_upsert(rel)
    else:
        batch = _batch(
            {
                "type": "relation",
                "src": {"label": "Product", "id": other},
                "rel": "ALSO_BOUGHT",
                "dst": {"label": "Product", "id": victim},
                "ts": 1_500,
            }
        )
        ((key, rows),) = batch.relations.items()
        statement = cypher.relation_upsert(*key)
    outcome = _race(settings, statement, rows, victim)
    assert query(settings, "MATCH (p:Product {id: $id}) RETURN p.deleted AS deleted", id=victim) == [{"deleted": True}]
    assert _edges_on_tombstone(settings, victim) == [], f"edge writer {outcome}: a ghost edge on the tombstone"
