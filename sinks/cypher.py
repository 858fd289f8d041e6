"""Every Cypher statement kg-streamer sends, in one place.

Rules (checked by tests/sinks/test_cypher_lint.py with Neo4j's own Cypher 5 linter, and run
against ArcadeDB over Bolt by the integration tests):

* every value is a ``$parameter``; rows go in as ``UNWIND $rows AS row``;
* labels and relationship types are formatted into the text only from the allowlists in
  ``streamer.contracts.events`` (``_label`` and ``_rel`` refuse anything else), never from event text;
* each statement touches one entity per row: ``streamer.ingest.plan.plan_batch`` coalesces first.

Version guard: a node or relationship stores the ``ts`` (and for products the producer
``version``) of the event that last wrote it; a write applies only when the row is strictly
newer, so replays and out-of-order events change nothing. The "current" reads return the rows
whose event *is* the stored state (just written or written before an earlier crash) so their
changes are (re)published to kg.changes: that is what makes a crash between the graph commit
and the changelog publish lose nothing.

A relation delete leaves a tombstone relationship (``deleted = true``) between the two
nodes when both exist and are live, so a stale upsert that arrives later cannot bring the edge
back; a delete naming a node that does not exist or is a tombstone changes nothing (no
placeholder nodes for deletes; a tombstone has no relationships, and a resurrection would
delete that relation tombstone, resetting the relationship's ``rev`` within one incarnation).
Readers (the embedding worker's snapshot) skip tombstoned relationships.

Entity versions (what the embedding worker's ``streamer.embed.versions.VersionGuard`` orders
kg.changes by, docs/design.md "Idempotency and order"): every Product stores ``rev`` (+1 by each
transaction that applies an upsert or delete to it) and ``gen``, its incarnation (+1 when a
delete turns a live or absent product into a tombstone; an upsert keeps it). A product upsert
that resurrects a tombstone first deletes every relationship still attached to it, so a new
incarnation starts with only the edges written after it. Relation and interaction
relationships store ``rev`` (+1 per applied write). Statements that produce changes return
these (``rev``, ``gen``; for edges ``rev``, ``src_gen``, ``dst_gen``: each endpoint's
``coalesce(gen, 0)``, as this transaction sees it), and so do the "current" reads, so a
republished change carries the stored versions. Other labels are never deleted: gen 0.

``all_statements()`` lists every statement for the linter.
"""

from __future__ import annotations

from functools import cache

from streamer.contracts.events import ACTION_TYPES, NODE_LABELS, RELATION_TYPES


def _label(label: str) -> str:
    if label not in NODE_LABELS:
        raise ValueError(f"label {label!r} is not in the allowlist")
    return label


def _rel(rel: str) -> str:
    if rel not in RELATION_TYPES and rel not in ACTION_TYPES.values():
        raise ValueError(f"relationship type {rel!r} is not in the allowlist")
    return rel


# --- schema -----------------------------------------------------------------------------
def schema_statements() -> list[str]:
    """One uniqueness constraint per label (this also gives Neo4j and ArcadeDB an index on id)."""
    return [f"CREATE CONSTRAINT {label.lower()}_id IF NOT EXISTS FOR (n:{label}) REQUIRE n.id IS UNIQUE" for label in NODE_LABELS]


# --- products ---------------------------------------------------------------------------
_NEWER = "(p.ts IS NULL OR row.version > coalesce(p.version, 0) OR (row.version = coalesce(p.version, 0) AND row.ts > p.ts))"

PRODUCT_UPSERT = f"""UNWIND $rows AS row
MERGE (p:Product {{id: row.id}})
WITH p, row
WHERE {_NEWER}
WITH p, row, coalesce(p.deleted, false) AS was_deleted
SET p.title = row.title, p.description = row.description, p.brand = row.brand,
    p.categories = row.categories, p.attributes = row.attributes, p.price = row.price,
    p.ts = row.ts, p.version = row.version, p.deleted = false,
    p.rev = coalesce(p.rev, 0) + 1, p.gen = coalesce(p.gen, 0)
RETURN row.id AS id, p.rev AS rev, p.gen AS gen, was_deleted AS resurrected"""

# Structural edges the product no longer has (applied rows only; row.owned = "REL|dst id").
PRODUCT_DROP_STALE_EDGES = """UNWIND $rows AS row
MATCH (p:Product {id: row.id})-[r:HAS_BRAND|IN_CATEGORY|HAS_ATTRIBUTE]->(x)
WHERE NOT ((type(r) + '|' + x.id) IN row.owned)
DELETE r"""

PRODUCT_BRANDS = """UNWIND $rows AS row
MATCH (p:Product {id: row.product_id})
MERGE (b:Brand {id: row.id})
MERGE (p)-[:HAS_BRAND]->(b)"""

CATEGORY_NODES = """UNWIND $rows AS row
MERGE (c:Category {id: row.id})
ON CREATE SET c.name = row.name"""

CATEGORY_PARENTS = """UNWIND $rows AS row
MATCH (child:Category {id: row.child})
MATCH (parent:Category {id: row.parent})
MERGE (child)-[:PARENT]->(parent)"""

PRODUCT_CATEGORIES = """UNWIND $rows AS row
MATCH (p:Product {id: row.product_id})
MATCH (c:Category {id: row.id})
MERGE (p)-[:IN_CATEGORY]->(c)"""

PRODUCT_ATTRIBUTES = """UNWIND $rows AS row
MATCH (p:Product {id: row.product_id})
MERGE (a:Attribute {id: row.id})
ON CREATE SET a.key = row.key, a.value = row.value
MERGE (p)-[:HAS_ATTRIBUTE]->(a)"""

PRODUCT_DELETE = f"""UNWIND $rows AS row
MERGE (p:Product {{id: row.id}})
WITH p, row
WHERE {_NEWER}
WITH p, row, coalesce(p.deleted, false) AS was_deleted
SET p.deleted = true, p.ts = row.ts, p.version = row.version, p.title = null, p.description = null,
    p.brand = null, p.categories = null, p.attributes = null, p.price = null,
    p.rev = coalesce(p.rev, 0) + 1, p.gen = CASE WHEN was_deleted THEN coalesce(p.gen, 0) ELSE coalesce(p.gen, 0) + 1 END
RETURN row.id AS id, p.rev AS rev, p.gen AS gen"""

# After a delete, and before a resurrecting upsert writes anything (a tombstone should have no
# relationships, but a concurrent read-committed transaction can attach one).
PRODUCT_DETACH = """UNWIND $ids AS id
MATCH (p:Product {id: id})-[r]-()
DELETE r"""

PRODUCT_CURRENT = """UNWIND $rows AS row
MATCH (p:Product {id: row.id})
WHERE p.ts = row.ts AND coalesce(p.version, 0) = row.version AND coalesce(p.deleted, false) = row.deleted
RETURN row.id AS id, coalesce(p.rev, 0) AS rev, coalesce(p.gen, 0) AS gen"""


# Write-lock the endpoints before reading whether they are tombstones. Without it, an edge
# write that read a product as live can commit after a concurrent delete (or delete and
# resurrection) of that product has detached its edges: a ghost edge on a newer incarnation
# that no change describes (the worker drops the edge's change as stale). With it, the two
# transactions serialise: Neo4j's exclusive node lock is taken before the read, so the read sees
# the committed delete; ArcadeDB's optimistic MVCC fails one of the two commits, and
# ``GraphSink.write`` retries it. (Found by tests/streamer/ingest/test_racing_ingest.py under load.)
def _lock(*names: str) -> str:
    """The lock clauses for the named Product variables ("" when none: other labels are never deleted)."""
    if not names:
        return ""
    return f"SET {', '.join(f'{n}.locked = true' for n in names)}\nREMOVE {', '.join(f'{n}.locked' for n in names)}\n"


def _product_ends(*pairs: tuple[str, str]) -> list[str]:
    """The variables of ``(variable, label)`` pairs whose label is Product."""
    return [name for name, label in pairs if label == "Product"]


# --- interactions: User-[:<ACTION>]->Product ----------------------------------------------
@cache
def interaction_upsert(rel: str) -> str:
    return f"""UNWIND $rows AS row
MERGE (p:Product {{id: row.product_id}})
{_lock("p")}WITH p, row
WHERE coalesce(p.deleted, false) = false
MERGE (u:User {{id: row.user_id}})
MERGE (u)-[r:{_rel(rel)}]->(p)
WITH u, p, r, row, [t IN row.tss WHERE r.last_ts IS NULL OR t > r.last_ts] AS fresh
WITH u, p, r, row, fresh,
     CASE WHEN r.first_ts IS NULL OR row.tss[0] < r.first_ts THEN row.tss[0] ELSE r.first_ts END AS first_ts,
     CASE WHEN r.last_ts IS NULL OR row.tss[-1] > r.last_ts THEN row.tss[-1] ELSE r.last_ts END AS last_ts,
     CASE WHEN row.rating_ts IS NOT NULL AND (r.rating_ts IS NULL OR row.rating_ts > r.rating_ts)
          THEN [row.rating, row.rating_ts] ELSE [r.rating, r.rating_ts] END AS rating
SET r.count = coalesce(r.count, 0) + size(fresh), r.first_ts = first_ts, r.last_ts = last_ts,
    r.rating = rating[0], r.rating_ts = rating[1], r.rev = coalesce(r.rev, 0) + 1
RETURN row.user_id AS user_id, row.product_id AS product_id, last_ts AS ts, r.rev AS rev,
       coalesce(u.gen, 0) AS src_gen, coalesce(p.gen, 0) AS dst_gen"""


# --- relations between allowlisted labels -------------------------------------------------
@cache
def relation_upsert(src_label: str, rel: str, dst_label: str) -> str:
    # Tombstones are checked before either end is created: a relation naming a deleted node
    # must not leave the other end behind as a bare node (the graph would then hold a node no
    # change was published for).
    return f"""UNWIND $rows AS row
OPTIONAL MATCH (a0:{_label(src_label)} {{id: row.src}})
OPTIONAL MATCH (b0:{_label(dst_label)} {{id: row.dst}})
{_lock(*_product_ends(("a0", src_label), ("b0", dst_label)))}WITH row, a0, b0
WHERE coalesce(a0.deleted, false) = false AND coalesce(b0.deleted, false) = false
MERGE (a:{_label(src_label)} {{id: row.src}})
MERGE (b:{_label(dst_label)} {{id: row.dst}})
MERGE (a)-[r:{_rel(rel)}]->(b)
WITH r, row
WHERE r.ts IS NULL OR row.ts > r.ts
WITH r, row, coalesce(r.rev, 0) + 1 AS rev
SET r = row.props
SET r.ts = row.ts, r.deleted = false, r.rev = rev"""


@cache
def relation_delete(src_label: str, rel: str, dst_label: str) -> str:
    return f"""UNWIND $rows AS row
MATCH (a:{_label(src_label)} {{id: row.src}})
MATCH (b:{_label(dst_label)} {{id: row.dst}})
{_lock(*_product_ends(("a", src_label), ("b", dst_label)))}WITH row, a, b
WHERE coalesce(a.deleted, false) = false AND coalesce(b.deleted, false) = false
MERGE (a)-[r:{_rel(rel)}]->(b)
WITH r, row
WHERE r.ts IS NULL OR row.ts > r.ts
WITH r, row, coalesce(r.rev, 0) + 1 AS rev
SET r = {{deleted: true, ts: row.ts, rev: rev}}"""


@cache
def relation_current(src_label: str, rel: str, dst_label: str) -> str:
    return f"""UNWIND $rows AS row
MATCH (a:{_label(src_label)} {{id: row.src}})-[r:{_rel(rel)}]->(b:{_label(dst_label)} {{id: row.dst}})
WHERE r.ts = row.ts AND coalesce(a.deleted, false) = false AND coalesce(b.deleted, false) = false
RETURN row.src AS src, row.dst AS dst, coalesce(r.deleted, false) AS deleted, coalesce(r.rev, 0) AS rev,
       coalesce(a.gen, 0) AS src_gen, coalesce(b.gen, 0) AS dst_gen"""


# --- reads ------------------------------------------------------------------------------
COUNT_NODES = "MATCH (n) RETURN count(n) AS n"
COUNT_RELATIONSHIPS = "MATCH ()-[r]->() RETURN count(r) AS n"
PING = "RETURN 1 AS ok"

# --- model tooling: graph snapshots, a user's history, vector write-back -----------------
# ``SNAPSHOT_PRODUCTS`` / ``SNAPSHOT_RELATIONSHIPS``: what ``kg-streamer train --source graph``
# reads in one read transaction (tombstoned products and relationships skipped, as the worker's
# replica skips them); ``ts`` is an interaction's ``first_ts`` (null otherwise).
SNAPSHOT_PRODUCTS = """MATCH (p:Product)
WHERE coalesce(p.deleted, false) = false
RETURN p.id AS id, p.title AS title, p.description AS description, p.brand AS brand,
       p.categories AS categories"""

SNAPSHOT_RELATIONSHIPS = """MATCH (a)-[r]->(b)
WHERE coalesce(r.deleted, false) = false AND coalesce(a.deleted, false) = false
  AND coalesce(b.deleted, false) = false
RETURN labels(a)[0] AS a_label, a.id AS a, type(r) AS rel, labels(b)[0] AS b_label, b.id AS b,
       r.first_ts AS ts"""

# The text and versions of some products, for `kg-streamer verify --against-graph --repair`.
PRODUCTS_BY_ID = """UNWIND $ids AS id
MATCH (p:Product {id: id})
WHERE coalesce(p.deleted, false) = false
RETURN p.id AS id, p.title AS title, p.description AS description, p.brand AS brand,
       p.categories AS categories, p.price AS price, coalesce(p.rev, 0) AS rev, coalesce(p.gen, 0) AS gen"""

# The versions of some tombstoned products (a repair's node deletes).
TOMBSTONES_BY_ID = """UNWIND $ids AS id
MATCH (p:Product {id: id})
WHERE p.deleted = true
RETURN p.id AS id, coalesce(p.rev, 0) AS rev, coalesce(p.gen, 0) AS gen"""

# Every live node and relationship with its versions, for `kg-streamer verify --against-graph`.
EXPORT_NODES = """MATCH (n)
WHERE coalesce(n.deleted, false) = false
RETURN labels(n)[0] AS label, n.id AS id, coalesce(n.rev, 0) AS rev, coalesce(n.gen, 0) AS gen"""

EXPORT_RELATIONSHIPS = """MATCH (a)-[r]->(b)
WHERE coalesce(r.deleted, false) = false AND coalesce(a.deleted, false) = false
  AND coalesce(b.deleted, false) = false
RETURN labels(a)[0] AS a_label, a.id AS a, type(r) AS rel, labels(b)[0] AS b_label, b.id AS b,
       coalesce(r.rev, 0) AS rev, coalesce(a.gen, 0) AS a_gen, coalesce(b.gen, 0) AS b_gen"""

# The products a user has an interaction edge to (``recommend`` leaves the bought ones out).
USER_PRODUCTS = """MATCH (u:User {id: $id})-[r]->(p:Product)
WHERE coalesce(p.deleted, false) = false
RETURN p.id AS id, type(r) AS rel"""

# ``recommend``'s popularity terms (training/blend.py): the newest interaction time (the
# serving "now"), then per live product the distinct users who took it ever and since $since.
NEWEST_INTERACTION = """MATCH (:User)-[r]->(p:Product)
WHERE type(r) IN $rels
RETURN max(r.last_ts) AS now"""

PRODUCT_POPULARITY = """MATCH (u:User)-[r]->(p:Product)
WHERE type(r) IN $rels AND coalesce(p.deleted, false) = false
RETURN p.id AS id, count(DISTINCT u) AS users,
       count(DISTINCT CASE WHEN $since IS NULL OR r.last_ts >= $since THEN u END) AS recent"""


@cache
def write_vectors(label: str) -> str:
    """``kg-streamer write-vectors``: ``n.embedding`` (list of floats), ``n.embedding_version``
    and ``n.embedding_dim`` on existing nodes, one row per node."""
    return f"""UNWIND $rows AS row
MATCH (n:{_label(label)} {{id: row.id}})
SET n.embedding = row.vector, n.embedding_version = row.version, n.embedding_dim = size(row.vector)
RETURN count(n) AS written"""


def all_statements() -> list[tuple[str, str]]:
    """(name, text) of every statement the project can send: the linter's input."""
    out = [(f"schema[{i}]", s) for i, s in enumerate(schema_statements())]
    for name in (
        "PRODUCT_UPSERT",
        "PRODUCT_DROP_STALE_EDGES",
        "PRODUCT_BRANDS",
        "CATEGORY_NODES",
        "CATEGORY_PARENTS",
        "PRODUCT_CATEGORIES",
        "PRODUCT_ATTRIBUTES",
        "PRODUCT_DELETE",
        "PRODUCT_DETACH",
        "PRODUCT_CURRENT",
        "COUNT_NODES",
        "COUNT_RELATIONSHIPS",
        "PING",
        "SNAPSHOT_PRODUCTS",
        "SNAPSHOT_RELATIONSHIPS",
        "USER_PRODUCTS",
        "NEWEST_INTERACTION",
        "PRODUCT_POPULARITY",
        "EXPORT_NODES",
        "EXPORT_RELATIONSHIPS",
        "PRODUCTS_BY_ID",
        "TOMBSTONES_BY_ID",
    ):
        out.append((name, globals()[name]))
    for rel in ACTION_TYPES.values():
        out.append((f"interaction_upsert[{rel}]", interaction_upsert(rel)))
    for src in NODE_LABELS:
        for rel in RELATION_TYPES:
            for dst in NODE_LABELS:
                for fn in (relation_upsert, relation_delete, relation_current):
                    out.append((f"{fn.__name__}[{src},{rel},{dst}]", fn(src, rel, dst)))
    out += [(f"write_vectors[{label}]", write_vectors(label)) for label in NODE_LABELS]
    return out
