"""The Cypher statements of the model tooling (issue 6), all parameterised.

* ``SNAPSHOT_PRODUCTS`` / ``SNAPSHOT_RELATIONSHIPS``: what ``kg-streamer train --source graph``
  reads, in one read transaction (tombstoned products and relationships skipped, as the
  worker's replica skips them). ``ts`` is an interaction's ``first_ts`` (null otherwise).
* ``USER_PRODUCTS``: the products a user has an interaction edge to (``recommend`` leaves the
  bought ones out when the vectors come from the topic).
* ``write_vectors(label)``: ``kg-streamer write-vectors`` sets ``n.embedding`` (list of floats),
  ``n.embedding_version`` and ``n.embedding_dim`` on existing nodes; ``UNWIND $rows``, one row
  per node, the label formatted only from the allowlist.

``statements()`` lists them for the Neo4j 5 linter (``sinks.cypher.all_statements()`` should
include them).
"""

from __future__ import annotations

from functools import cache

from streamer.events import NODE_LABELS

SNAPSHOT_PRODUCTS = """MATCH (p:Product)
WHERE coalesce(p.deleted, false) = false
RETURN p.id AS id, p.title AS title, p.description AS description, p.brand AS brand,
       p.categories AS categories"""

SNAPSHOT_RELATIONSHIPS = """MATCH (a)-[r]->(b)
WHERE coalesce(r.deleted, false) = false AND coalesce(a.deleted, false) = false
  AND coalesce(b.deleted, false) = false
RETURN labels(a)[0] AS a_label, a.id AS a, type(r) AS rel, labels(b)[0] AS b_label, b.id AS b,
       r.first_ts AS ts"""

USER_PRODUCTS = """MATCH (u:User {id: $id})-[r]->(p:Product)
WHERE coalesce(p.deleted, false) = false
RETURN p.id AS id, type(r) AS rel"""


@cache
def write_vectors(label: str) -> str:
    if label not in NODE_LABELS:
        raise ValueError(f"label {label!r} is not in the allowlist")
    return f"""UNWIND $rows AS row
MATCH (n:{label} {{id: row.id}})
SET n.embedding = row.vector, n.embedding_version = row.version, n.embedding_dim = size(row.vector)
RETURN count(n) AS written"""


def statements() -> list[tuple[str, str]]:
    """(name, text) of every statement this module can send."""
    out = [("SNAPSHOT_PRODUCTS", SNAPSHOT_PRODUCTS), ("SNAPSHOT_RELATIONSHIPS", SNAPSHOT_RELATIONSHIPS),
           ("USER_PRODUCTS", USER_PRODUCTS)]
    out += [(f"write_vectors[{label}]", write_vectors(label)) for label in NODE_LABELS]
    return out
