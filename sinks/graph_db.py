"""Graph DB sink: one ``GraphBatch`` -> one Bolt transaction -> the changes it made current.

Contract of ``GraphSink.write(batch)``:

* all statements of the batch run in ONE explicit transaction, nodes before relationships
  (products, product deletes, interactions, relations); it commits or nothing is applied;
* it returns ``WriteResult`` with the ``Change`` records (streamer/contracts/changes.py) of every row
  whose event is now the stored state, for the caller to publish to kg.changes; each carries
  the versions the graph stores for its entity (``rev``, ``gen``; for edges ``rev``,
  ``src_gen``, ``dst_gen``: ``sinks/cypher.py``), read in this transaction, so the embedding
  worker can order changes that reach kg.changes in another order than they committed;
* a product upsert that resurrects a tombstone deletes the relationships still attached to it
  before it writes its own (a new incarnation starts clean);
* transient failures (Neo4j ``TransientError`` such as deadlocks, connection loss, database
  unavailable) are retried ``graph_retry_attempts`` times with exponential backoff and full
  jitter; after that ``GraphUnavailable`` is raised and the caller applies backpressure;
* a unique-constraint violation (``Neo.ClientError.Schema.ConstraintValidationFailed``) is a
  write-write race, not bad data: every statement MERGEs on the constrained id, so it only
  happens when a concurrent transaction (another consumer of the group) created the same node
  first -- ArcadeDB's optimistic MVCC reports that at commit. It is retried like a transient
  error (the retry MERGEs onto the node that now exists); only if it persists through every
  attempt is it treated as a refusal (``GraphRejected``);
* refusals of the credentials or of the database itself (``Neo.ClientError.Security.*``,
  ``Neo.ClientError.Database.*``) and driver-state errors are infrastructure: retried, then
  ``GraphUnavailable``; they must never dead-letter good events;
* any other database error (the database refused the statement or its data) raises
  ``GraphRejected``: the caller bisects the batch to find the event to dead-letter;
* anything else (the driver refusing to pack a value, say) propagates; the ingest step
  bisects it like a refusal, so that one event cannot stop the consumer.

The Bolt driver's own managed-transaction retry is not used: retries are bounded here so the
consumer decides what happens next (pause partitions) instead of blocking for 30 s.
"""

from __future__ import annotations

import json
import logging
import random
import time
from dataclasses import dataclass, field, replace
from typing import Any, cast

from neo4j import Driver, GraphDatabase, Result, Transaction
from neo4j.exceptions import (
    DatabaseUnavailable,
    DriverError,
    Neo4jError,
    ServiceUnavailable,
    SessionExpired,
    TransientError,
)

from sinks import cypher
from streamer.contracts import changes as ch
from streamer.contracts.graph_batch import GraphBatch
from streamer.settings import Settings

log = logging.getLogger(__name__)

TRANSIENT = (TransientError, ServiceUnavailable, SessionExpired, DatabaseUnavailable, ConnectionError, OSError)


class GraphUnavailable(Exception):
    """The graph DB did not accept the batch after bounded retries (transient cause)."""


class GraphRejected(Exception):
    """The graph DB refused the batch (non-transient): some event in it cannot be written."""

    def __init__(self, error_class: str, message: str):
        super().__init__(message)
        self.error_class = error_class
        self.message = message


@dataclass
class WriteResult:
    changes: list[ch.Change] = field(default_factory=list)
    nodes_written: int = 0  # product rows applied (upserts + tombstones)
    relationships_written: int = 0  # interaction and relation rows applied
    attempts: int = 1


# A concurrent transaction created the same node first (see the module docstring).
CONFLICT_CODES = frozenset({"Neo.ClientError.Schema.ConstraintValidationFailed"})


def _is_conflict(exc: BaseException) -> bool:
    return isinstance(exc, Neo4jError) and (getattr(exc, "code", "") or "") in CONFLICT_CODES


# Refusals that are not about the data: the credentials or the database itself. Dead-lettering
# would empty the input into kg.dlq; they are infrastructure, so the consumer waits instead.
UNAVAILABLE_CODE_PREFIXES = ("Neo.ClientError.Security.", "Neo.ClientError.Database.")


def _is_transient(exc: BaseException) -> bool:
    """Worth retrying, then backpressure: connection and driver-state errors, transient codes
    (deadlocks, lock timeouts; some servers report those as ClientError), and refusals of the
    credentials or the database (``UNAVAILABLE_CODE_PREFIXES``)."""
    if isinstance(exc, (*TRANSIENT, DriverError)):
        return True
    code = getattr(exc, "code", "") or ""
    return isinstance(exc, Neo4jError) and (
        ".Transient." in code or "Deadlock" in code or code.startswith(UNAVAILABLE_CODE_PREFIXES)
    )


def open_driver(settings: Settings, timeout_s: float = 10.0) -> Driver:
    """The one way kg-streamer connects to the graph DB: a Bolt driver from ``settings`` (the
    password is read from its ``SecretStr`` here and nowhere else). The driver's own managed
    transaction retry is off: callers bound their retries themselves."""
    return GraphDatabase.driver(
        settings.bolt_uri,
        auth=(settings.bolt_user, settings.bolt_password.get_secret_value()),
        connection_timeout=timeout_s,
        connection_acquisition_timeout=timeout_s,
        max_transaction_retry_time=0,
    )


class GraphSink:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.driver = open_driver(settings)
        self.database = settings.bolt_database

    def close(self) -> None:
        self.driver.close()

    # --- small helpers ---------------------------------------------------------------
    def query(self, statement: str, **params: Any) -> list[dict[str, Any]]:
        """Run one read (or schema) statement in an auto-commit transaction."""
        with self.driver.session(database=self.database) as session:
            return [record.data() for record in session.run(statement, params)]

    def ping(self) -> bool:
        try:
            return bool(self.query(cypher.PING)[0]["ok"] == 1)
        except Exception:  # noqa: BLE001 - any failure means "not answering"
            return False

    def ensure_schema(self) -> None:
        for statement in cypher.schema_statements():
            self.query(statement)

    def counts(self) -> tuple[int, int]:
        return self.query(cypher.COUNT_NODES)[0]["n"], self.query(cypher.COUNT_RELATIONSHIPS)[0]["n"]

    # --- the batch write -------------------------------------------------------------
    def write(self, batch: GraphBatch, source_ms: int | None = None) -> WriteResult:
        """Write the batch; ``source_ms`` (when the batch's oldest input entered Kafka) is
        stamped on the changes with the commit time."""
        attempts = self.settings.graph_retry_attempts
        for attempt in range(1, attempts + 1):
            try:
                result = self._write_once(batch, source_ms)
                result.attempts = attempt
                return result
            except (Neo4jError, DriverError, *TRANSIENT) as exc:
                conflict = _is_conflict(exc)
                if not conflict and not _is_transient(exc):
                    code = getattr(exc, "code", None) or type(exc).__name__
                    raise GraphRejected(str(code), str(exc)) from exc
                if attempt == attempts:
                    if conflict:  # not a race after all: let the caller isolate the event
                        raise GraphRejected(str(cast(Neo4jError, exc).code), str(exc)) from exc
                    raise GraphUnavailable(f"graph write failed after {attempts} attempts: {exc}") from exc
                delay = random.uniform(0, min(self.settings.graph_retry_max_s, self.settings.graph_retry_base_s * 2**attempt))
                log.warning("transient graph error (attempt %d/%d, retry in %.2fs): %s", attempt, attempts, delay, exc)
                time.sleep(delay)
        raise AssertionError("unreachable")

    def _write_once(self, batch: GraphBatch, source_ms: int | None) -> WriteResult:
        result = WriteResult()
        now_ms = int(time.time() * 1000)
        with self.driver.session(database=self.database) as session:
            tx = session.begin_transaction()
            try:
                self._products(tx, batch, result)
                self._interactions(tx, batch, result)
                self._relations(tx, batch, result)
                tx.commit()
            except BaseException:
                if tx.closed() is False:
                    tx.rollback()
                raise
        unique = {(c.op, c.key, c.src, c.rel, c.dst): c for c in result.changes}
        result.changes = [replace(c, committed_ms=now_ms, source_ms=source_ms) for c in unique.values()]
        return result

    def _products(self, tx: Transaction, batch: GraphBatch, result: WriteResult) -> None:
        rows = [_product_params(r) for r in batch.product_upserts]
        applied: dict[str, tuple[int, int]] = {}  # product id -> (rev, gen) after this transaction
        if rows:
            records = [rec.data() for rec in _run(tx, cypher.PRODUCT_UPSERT, rows=rows)]
            applied = {rec["id"]: (rec["rev"], rec["gen"]) for rec in records}
            result.nodes_written += len(applied)
            resurrected = [rec["id"] for rec in records if rec["resurrected"]]
            if resurrected:
                _run(tx, cypher.PRODUCT_DETACH, ids=resurrected).consume()
            if applied:
                fresh = [r for r in batch.product_upserts if r["id"] in applied]
                _run(tx, cypher.PRODUCT_DROP_STALE_EDGES, rows=[{"id": r["id"], "owned": r["owned"]} for r in fresh]).consume()
                self._run_rows(
                    tx, cypher.PRODUCT_BRANDS, [{"product_id": r["id"], "id": b} for r in fresh for b in r["brand_ids"]]
                )
                categories = {c["id"]: c for r in fresh for c in r["categories_path"]}
                self._run_rows(tx, cypher.CATEGORY_NODES, sorted(categories.values(), key=lambda c: c["id"]))
                self._run_rows(tx, cypher.CATEGORY_PARENTS, _parent_rows(fresh))
                self._run_rows(
                    tx, cypher.PRODUCT_CATEGORIES, [{"product_id": r["id"], "id": c} for r in fresh for c in r["leaf_category"]]
                )
                self._run_rows(
                    tx, cypher.PRODUCT_ATTRIBUTES, [{"product_id": r["id"], **a} for r in fresh for a in r["attribute_nodes"]]
                )
        deletes = batch.product_deletes
        if deletes:
            deleted = {rec["id"]: (rec["rev"], rec["gen"]) for rec in _run(tx, cypher.PRODUCT_DELETE, rows=deletes)}
            result.nodes_written += len(deleted)
            if deleted:
                _run(tx, cypher.PRODUCT_DETACH, ids=list(deleted)).consume()
                applied.update(deleted)
        # A row this transaction applied is current (one row per product after coalescing);
        # only the others need the read that tells a replay of the stored state from a stale event.
        others = [
            {"id": r["id"], "ts": r["ts"], "version": r["version"], "deleted": False}
            for r in batch.product_upserts
            if r["id"] not in applied
        ]
        others += [
            {"id": r["id"], "ts": r["ts"], "version": r["version"], "deleted": True} for r in deletes if r["id"] not in applied
        ]
        current = dict(applied)
        if others:
            current.update((rec["id"], (rec["rev"], rec["gen"])) for rec in _run(tx, cypher.PRODUCT_CURRENT, rows=others))
        for row in batch.product_upserts:
            if row["id"] in current:
                result.changes.append(_product_change(row, *current[row["id"]]))
                for parent in _parent_rows([row]):
                    result.changes.append(
                        ch.edge_upsert(f"Category:{parent['child']}", "PARENT", f"Category:{parent['parent']}", row["ts"])
                    )
        for row in deletes:
            if row["id"] in current:
                rev, gen = current[row["id"]]
                result.changes.append(ch.node_delete("Product", row["id"], row["ts"], rev=rev, gen=gen))

    def _interactions(self, tx: Transaction, batch: GraphBatch, result: WriteResult) -> None:
        for rel in sorted(batch.interactions):
            for rec in _run(tx, cypher.interaction_upsert(rel), rows=batch.interactions[rel]):
                result.relationships_written += 1
                result.changes.append(
                    ch.edge_upsert(
                        ch.node_key("User", rec["user_id"]),
                        rel,
                        ch.node_key("Product", rec["product_id"]),
                        rec["ts"],
                        rev=rec["rev"],
                        src_gen=rec["src_gen"],
                        dst_gen=rec["dst_gen"],
                    )
                )

    def _relations(self, tx: Transaction, batch: GraphBatch, result: WriteResult) -> None:
        for (src_label, rel, dst_label), rows in sorted(batch.relations.items()):
            upserts = [r for r in rows if r["op"] == "upsert"]
            deletes = [r for r in rows if r["op"] == "delete"]
            if upserts:
                _run(tx, cypher.relation_upsert(src_label, rel, dst_label), rows=upserts).consume()
            if deletes:
                _run(tx, cypher.relation_delete(src_label, rel, dst_label), rows=deletes).consume()
            by_key = {(r["src"], r["dst"]): r for r in rows}
            for rec in _run(
                tx,
                cypher.relation_current(src_label, rel, dst_label),
                rows=[{k: r[k] for k in ("src", "dst", "ts")} for r in rows],
            ):
                row = by_key[(rec["src"], rec["dst"])]
                if rec["deleted"] != (row["op"] == "delete"):
                    continue
                result.relationships_written += 1
                make = ch.edge_delete if rec["deleted"] else ch.edge_upsert
                result.changes.append(
                    make(
                        ch.node_key(src_label, row["src"]),
                        rel,
                        ch.node_key(dst_label, row["dst"]),
                        row["ts"],
                        rev=rec["rev"],
                        src_gen=rec["src_gen"],
                        dst_gen=rec["dst_gen"],
                    )
                )

    @staticmethod
    def _run_rows(tx: Transaction, statement: str, rows: list[dict[str, Any]]) -> None:
        if rows:
            _run(tx, statement, rows=rows).consume()


def _run(tx: Transaction, statement: str, **params: Any) -> Result:
    """``tx.run`` with one difference: a parameter value the driver refuses to pack (it raises
    ValueError, TypeError or OverflowError before anything is sent) is the data's fault, so it
    becomes ``GraphRejected`` and the caller can isolate the event. Validation at the edge
    should make this unreachable; it is the last line of defence."""
    try:
        return tx.run(statement, params)
    except (ValueError, TypeError, OverflowError) as exc:
        raise GraphRejected(f"ValueRefused:{type(exc).__name__}", str(exc)) from exc


_PRODUCT_PARAM_KEYS = ("id", "ts", "version", "title", "description", "brand", "categories", "attributes", "price")


def _product_params(row: dict[str, Any]) -> dict[str, Any]:
    return {k: row[k] for k in _PRODUCT_PARAM_KEYS}


def _parent_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    pairs: set[tuple[str, str]] = set()
    for row in rows:
        path = [c["id"] for c in row["categories_path"]]
        pairs.update((child, parent) for parent, child in zip(path, path[1:]))
    return [{"child": c, "parent": p} for c, p in sorted(pairs)]


def _product_change(row: dict[str, Any], rev: int, gen: int) -> ch.Change:
    props = {k: row[k] for k in ("title", "description", "brand", "categories", "price")}
    props["attributes"] = json.loads(row["attributes"])
    props["out_edges"] = [[rel, f"{_OWNED_LABEL[rel]}:{dst}"] for rel, _, dst in (o.partition("|") for o in row["owned"])]
    return ch.node_upsert("Product", row["id"], row["ts"], props, rev=rev, gen=gen)


_OWNED_LABEL = {"HAS_BRAND": "Brand", "IN_CATEGORY": "Category", "HAS_ATTRIBUTE": "Attribute"}
