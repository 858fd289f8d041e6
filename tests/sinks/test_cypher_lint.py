"""Every Cypher statement kg-streamer can send is valid Neo4j 5 (Cypher 5).

Neo4j itself cannot run in CI, so the statements are checked with Neo4j's own linter
(``@neo4j-cypher/language-support``, see ``cypher_lint.py``). The first tests prove the
harness can fail: the linter must still catch known-bad statements, or a clean result for the
project's statements would mean nothing. Install the linter with
``scripts/install_node_tool.sh tools/cypher-lint``; without it these tests error (they do not skip).

Policy: any diagnostic fails ``test_every_statement_is_valid_neo4j5`` -- errors, and warnings
too (unknown labels / relationship types are misspellings; deprecations are removed in
Cypher 25; performance warnings are real). The only exceptions are listed in
``ALLOWED_WARNINGS`` below, each with its reason; an entry that no longer matches anything
fails the test, so the list stays minimal.
"""

from __future__ import annotations

import json
import re
import subprocess

import pytest

from tests.sinks import cypher_lint
from tests.sinks.cypher_lint import CypherLintUnavailable, Problem, describe, lint

# (statement-name regex, message regex, why it is acceptable). Matched with re.search.
# Empty: nothing the project sends draws a warning today. Add an entry only with a reason that
# holds on production Neo4j 5 (e.g. "CALL subquery without a variable scope clause is
# deprecated" could be allowed if a statement must also run on Neo4j < 5.23, which lacks the
# `CALL (x) { ... }` form).
ALLOWED_WARNINGS: tuple[tuple[str, str, str], ...] = ()


def _allowed(problem: Problem) -> bool:
    return not problem.is_error and any(
        re.search(name, problem.statement) and re.search(message, problem.message) for name, message, _why in ALLOWED_WARNINGS
    )


def blocking(problems: list[Problem]) -> list[Problem]:
    """The problems that fail the build: every error, and warnings not in ALLOWED_WARNINGS."""
    return [p for p in problems if not _allowed(p)]


# --- the harness can fail -----------------------------------------------------------------
# name -> (statement, severity expected, regex the message must match)
BAD = {
    "syntax_error": ("MATCH (p:Product RETURN p", "error", r"Invalid input 'RETURN'"),
    "misspelt_keyword": ("MATCH (p:Product) RETRN p", "error", r"Invalid input 'RETRN'"),
    "unknown_function": ("RETURN frobnicate(1) AS x", "error", r"Function frobnicate is not present"),
    "apoc_procedure": (
        "CALL apoc.create.node(['Product'], {id: $id}) YIELD node RETURN node",
        "error",
        r"Procedure apoc\.create\.node is not present",
    ),
    "apoc_function": ("RETURN apoc.coll.sum([1, 2]) AS s", "error", r"Function apoc\.coll\.sum is not present"),
    "gds_function": ("RETURN gds.similarity.cosine([1.0], [1.0]) AS s", "error", r"Function gds\.similarity\.cosine"),
    "unknown_procedure": ("CALL db.indexes()", "error", r"Procedure db\.indexes is not present"),
    "undefined_variable": ("MATCH (p:Product) RETURN q", "error", r"Variable `q` not defined"),
    "redeclared_variable": ("MATCH (p:Product) CREATE (p:Product {id: 1})", "error", r"Variable `p` already declared"),
    "wrong_arity": ("RETURN toUpper('a', 'b') AS x", "error", r"Too many parameters for function 'toUpper'"),
    "no_return": ("MATCH (p:Product)", "error", r"Query cannot conclude with MATCH"),
    "implicit_grouping": ("MATCH (p:Product) RETURN p.id, count(*) + p.price", "error", r"implicit grouping"),
    "cypher25_prefix": ("CYPHER 25 MATCH (p:Product) RETURN p", "error", r"CYPHER 25 selected"),
    "cypher25_when": ("WHEN true THEN RETURN 1 AS x ELSE RETURN 2 AS x", "error", r"Invalid input 'WHEN'"),
    "cypher25_filter": ("MATCH (p:Product) FILTER p.price > 1 RETURN p", "error", r"Invalid input 'FILTER'"),
    "cypher25_let": ("LET x = 1 RETURN x", "error", r"Invalid input 'LET'"),
    "cypher25_next": ("MATCH (p:Product) RETURN p NEXT RETURN 1 AS y", "error", r"Invalid input 'NEXT'"),
    "cypher25_coll_function": ("RETURN coll.sort([3, 1, 2]) AS s", "error", r"Function coll\.sort is not present"),
    "neo4j4_exists_property": ("MATCH (p:Product) WHERE exists(p.id) RETURN p", "error", r"no longer supported"),
    "neo4j4_constraint_syntax": (
        "CREATE CONSTRAINT ON (n:Product) ASSERT n.id IS UNIQUE",
        "error",
        r"ON and ASSERT should not be used",
    ),
    "neo4j4_periodic_commit": (
        "USING PERIODIC COMMIT 500 LOAD CSV FROM 'file:///x.csv' AS line CREATE (:Product {id: line[0]})",
        "error",
        r"PERIODIC COMMIT query hint is no longer supported",
    ),
    "neo4j4_drop_index_on": ("DROP INDEX ON :Product(id)", "error", r"Indexes cannot be dropped by schema"),
    "two_statements": ("RETURN 1 AS a; RETURN 2 AS b", "error", r"2 statements in one query"),
    "empty": ("   ", "error", r"Empty statement"),
    "console_command": (":param x => 1", "error", r"Console commands are unsupported"),
    "sql": ("SELECT FROM Product WHERE id = 1", "error", r"Invalid input 'SELECT'"),
    "unknown_label": ("MATCH (p:Prodcut) RETURN p", "warning", r"Label Prodcut is not present"),
    "unknown_relationship_type": (
        "MATCH (:User)-[:PURCHASD]->(p:Product) RETURN p",
        "warning",
        r"Relationship type PURCHASD is not present",
    ),
    "deprecated_id": ("MATCH (p:Product) WHERE id(p) = 0 RETURN p", "warning", r"Function id is deprecated"),
    "deprecated_call_without_scope": (
        "UNWIND $rows AS row CALL { WITH row MERGE (:Product {id: row.id}) } IN TRANSACTIONS OF 1000 ROWS",
        "warning",
        r"CALL subquery without a variable scope clause is deprecated",
    ),
    "unbounded_shortest_path": (
        "MATCH p = shortestPath((a:Product)-[*]-(b:Product)) RETURN p",
        "warning",
        r"unbounded pattern",
    ),
}

# Constructs the project relies on (or may): all must lint clean as Neo4j 5.
GOOD = {
    "cypher5_prefix": "CYPHER 5 MATCH (p:Product {id: $id}) RETURN p",
    "explain": "EXPLAIN MATCH (p:Product {id: $id}) RETURN p",
    "unwind_merge": (
        "UNWIND $rows AS row MERGE (p:Product {id: row.id}) "
        "ON CREATE SET p.created = timestamp() SET p += row.props, p.ts = row.ts RETURN count(p) AS n"
    ),
    "relationship_merge": (
        "UNWIND $rows AS row MATCH (u:User {id: row.src}) MATCH (p:Product {id: row.dst}) "
        "MERGE (u)-[r:PURCHASED]->(p) SET r.ts = row.ts"
    ),
    "version_guard": (
        "UNWIND $rows AS row MERGE (p:Product {id: row.id}) WITH p, row "
        "WHERE p.ts IS NULL OR row.ts > p.ts SET p.ts = row.ts, p.deleted = false RETURN row.id AS id"
    ),
    "case_guard": "MATCH (p:Product {id: $id}) SET p.ts = CASE WHEN p.ts IS NULL OR p.ts < $ts THEN $ts ELSE p.ts END",
    "call_in_transactions": ("UNWIND $rows AS row CALL (row) { MERGE (:Product {id: row.id}) } IN TRANSACTIONS OF 1000 ROWS"),
    "foreach": (
        "MATCH (p:Product {id: $id}) FOREACH (c IN $categories | MERGE (k:Category {id: c}) MERGE (p)-[:IN_CATEGORY]->(k))"
    ),
    "list_comprehension": (
        "MATCH (p:Product) RETURN [x IN p.categories WHERE x <> '' | toUpper(x)] AS c, "
        "[(p)-[:HAS_BRAND]->(b:Brand) | b.id] AS brands, reduce(s = 0, x IN [1, 2] | s + x) AS s"
    ),
    "subqueries": (
        "MATCH (p:Product) WHERE EXISTS { (p)-[:HAS_BRAND]->(:Brand) } "
        "RETURN COUNT { (p)--() } AS degree, COLLECT { MATCH (p)-[:IN_CATEGORY]->(c) RETURN c.id } AS cats"
    ),
    "variable_length": "MATCH (c:Category {id: $id})-[:PARENT*1..8]->(a:Category) RETURN a.id AS id",
    "detach_delete": "MATCH (p:Product {id: $id}) DETACH DELETE p",
    "temporal": "RETURN datetime({epochMillis: $ts}) AS t, elementId(null) AS e",
    "show_indexes": "SHOW INDEXES",
    "show_indexes_yield": "SHOW INDEXES YIELD name, type, state WHERE state = 'ONLINE' RETURN name, type",
    "show_constraints": "SHOW CONSTRAINTS YIELD name RETURN name",
    "unique_constraint": "CREATE CONSTRAINT product_id IF NOT EXISTS FOR (n:Product) REQUIRE n.id IS UNIQUE",
    "unnamed_constraint": "CREATE CONSTRAINT IF NOT EXISTS FOR (n:Product) REQUIRE n.id IS UNIQUE",
    "range_index": "CREATE INDEX product_ts IF NOT EXISTS FOR (n:Product) ON (n.ts)",
    "drop_index_by_name": "DROP INDEX product_ts IF EXISTS",
    "count": "MATCH (n) RETURN count(n) AS n",
}


@pytest.fixture(scope="module")
def linted() -> dict[str, list[Problem]]:
    """BAD and GOOD linted in one run (the linter takes ~0.5 s to start)."""
    statements = [(f"bad:{k}", q) for k, (q, _, _) in BAD.items()] + [(f"good:{k}", q) for k, q in GOOD.items()]
    by_name: dict[str, list[Problem]] = {name: [] for name, _ in statements}
    for problem in lint(statements):
        by_name[problem.statement].append(problem)
    return by_name


@pytest.mark.parametrize("case", sorted(BAD))
def test_linter_catches_known_bad_statement(linted, case):
    _query, severity, pattern = BAD[case]
    problems = linted[f"bad:{case}"]
    assert any(p.severity == severity and re.search(pattern, p.message) for p in problems), (
        f"expected a {severity} matching {pattern!r}, got:\n{describe(problems) or '  nothing'}"
    )
    assert blocking(problems), "a known-bad statement must fail the gate"


@pytest.mark.parametrize("case", sorted(GOOD))
def test_linter_accepts_valid_neo4j5_statement(linted, case):
    problems = linted[f"good:{case}"]
    assert not problems, describe(problems)


def test_problems_point_at_the_offending_text():
    [problem] = lint([("q", "MATCH (p:Product)\nRETURN frobnicate(p) AS x")])
    assert (problem.severity, problem.source) == ("error", "neo4j")
    assert (problem.line, problem.column, problem.excerpt) == (2, 8, "frobnicate")
    assert str(problem).startswith("q: error at 2:8 near 'frobnicate': Function frobnicate")


def test_parameters_need_no_declaration():
    assert lint([("q", "UNWIND $rows AS row MATCH (p:Product {id: row.id}) WHERE p.ts < $ts RETURN p")]) == []


def test_labels_come_from_streamer_events_and_lint_mjs_agrees():
    from streamer.contracts.events import ALL_REL_TYPES, NODE_LABELS

    assert lint([("q", "MATCH (:Widget) RETURN 1 AS x")], labels=["Widget"], relationship_types=[]) == []
    script = subprocess.run(["node", str(cypher_lint.LINT_SCRIPT), "--schema"], capture_output=True, text=True, check=True)
    schema = json.loads(script.stdout)
    assert schema["labels"] == list(NODE_LABELS), "update DEFAULT_LABELS in tools/cypher-lint/lint.mjs"
    assert sorted(schema["relationshipTypes"]) == sorted(ALL_REL_TYPES), (
        "update DEFAULT_RELATIONSHIP_TYPES in tools/cypher-lint/lint.mjs"
    )
    assert schema["cypherVersion"] == "CYPHER 5"
    assert {"apoc.", "gds."} <= set(schema["pluginPrefixesRemoved"])
    assert schema["functions"] > 100 and schema["procedures"] > 50, "the built-in registry went missing"


def test_linter_is_the_pinned_version():
    package = json.loads((cypher_lint.LINT_DIR / "package.json").read_text())
    pin = package["dependencies"][cypher_lint.PACKAGE]
    assert re.fullmatch(r"\d+\.\d+\.\d+(-[0-9A-Za-z.]+)?", pin), f"pin an exact version, not {pin!r}"
    assert cypher_lint.pinned_version() == pin
    assert cypher_lint.installed_version() == pin, "run scripts/install_node_tool.sh tools/cypher-lint"


def test_missing_install_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setattr(cypher_lint, "LINT_DIR", tmp_path)
    with pytest.raises(CypherLintUnavailable, match=r"scripts/install_node_tool.sh tools/cypher-lint"):
        lint([("q", "RETURN 1 AS x")])


# --- the project's statements -------------------------------------------------------------
def test_every_statement_is_valid_neo4j5():
    from sinks.cypher import all_statements

    statements = all_statements()
    assert statements, "sinks.cypher.all_statements() returned nothing"
    names = [name for name, _ in statements]
    assert len(set(names)) == len(names), "statement names must be unique"

    problems = lint(statements)
    failing = blocking(problems)
    assert not failing, (
        f"{len(failing)} problem(s) in {len({p.statement for p in failing})} of {len(statements)} "
        f"statements (Neo4j 5 / Cypher 5):\n{describe(failing)}"
    )
    stale = [
        (name, message)
        for name, message, _why in ALLOWED_WARNINGS
        if not any(re.search(name, p.statement) and re.search(message, p.message) for p in problems)
    ]
    assert not stale, f"ALLOWED_WARNINGS entries that match nothing any more; remove them: {stale}"


def test_labels_and_types_outside_the_allowlists_are_refused():
    from sinks import cypher

    injection = "Product {id: 1}) DETACH DELETE n //"
    for build in (
        lambda: cypher.write_vectors(injection),
        lambda: cypher.relation_upsert(injection, "ALSO_BOUGHT", "Product"),
        lambda: cypher.relation_upsert("Product", "KNOWS]->() DETACH DELETE n //", "Product"),
        lambda: cypher.interaction_upsert("HAS_BRAND"),
    ):
        with pytest.raises(ValueError, match="allowlist"):
            build()
