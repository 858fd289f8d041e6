"""Lint Cypher statements as Neo4j 5 would parse and analyse them, without a Neo4j server.

Production runs Neo4j 5, which cannot run in CI, so the tests check every statement with
Neo4j's own ``@neo4j-cypher/language-support`` (its Cypher parser and Neo4j's semantic
analysis compiled to JavaScript), driven by ``tools/cypher-lint/lint.mjs`` under node.

    from cypher_lint import lint
    problems = lint([("PING", "RETURN 1 AS ok")])   # [] when clean

``lint`` returns every diagnostic (errors and warnings) as a ``Problem``; the tests decide
which ones fail. Install the linter once with ``scripts/install_node_tool.sh tools/cypher-lint`` (or
``npm ci --prefix tools/cypher-lint``); without it ``lint`` raises ``CypherLintUnavailable``
rather than passing silently.

The statements are linted against Cypher 5 with Neo4j's built-in functions and procedures
only (APOC and GDS are removed, so using them is an error), and with our labels and
relationship types (``streamer.contracts.events``), so a misspelt one is a warning.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LINT_DIR = ROOT / "tools" / "cypher-lint"
LINT_SCRIPT = LINT_DIR / "lint.mjs"
PACKAGE = "@neo4j-cypher/language-support"
# `sinks` (the project package) must not resolve to tests/sinks, a directory without
# __init__.py that Python would take as a namespace package whenever tests/ is on sys.path
# (pytest puts it there for any test module directly under tests/). A regular package found
# anywhere on sys.path wins over namespace portions, so having the repository root on it is enough.
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))

INSTALL_HINT = "install it with `scripts/install_node_tool.sh tools/cypher-lint` (needs node >= 20 and npm)"
# A statement takes 25-900 ms to lint (Neo4j's semantic analysis dominates), a node process
# ~0.5 s to start and ~350 MB: large inputs are split over a few processes run side by side.
_MIN_PER_PROCESS = 32
_MAX_PROCESSES = 8
_TIMEOUT_S = 300


class CypherLintUnavailable(RuntimeError):
    """node or the linter package is missing: the statements could not be checked."""


@dataclass(frozen=True)
class Problem:
    statement: str  # the statement's name
    severity: str  # "error" | "warning" | "information" | "hint"
    message: str
    start: int  # character offsets into the statement text
    end: int
    line: int  # 1-based
    column: int  # 1-based
    source: str  # "neo4j" (the package) or "kg-streamer" (checks lint.mjs adds)
    excerpt: str  # the statement text at [start, end), shortened

    @property
    def is_error(self) -> bool:
        return self.severity == "error"

    def __str__(self) -> str:
        where = f"{self.line}:{self.column}"
        shown = f" near {self.excerpt!r}" if self.excerpt else ""
        return f"{self.statement}: {self.severity} at {where}{shown}: {self.message}"


def installed_version() -> str | None:
    """The installed version of the linter package, or None when it is not installed."""
    manifest = LINT_DIR / "node_modules" / PACKAGE / "package.json"
    try:
        return json.loads(manifest.read_text())["version"]
    except (OSError, ValueError, KeyError):
        return None


def pinned_version() -> str:
    """The version package-lock.json pins (what ``npm ci`` installs)."""
    lock = json.loads((LINT_DIR / "package-lock.json").read_text())
    return lock["packages"][f"node_modules/{PACKAGE}"]["version"]


def _node() -> str:
    node = shutil.which("node")
    if node is None:
        raise CypherLintUnavailable(f"`node` is not on PATH, so Cypher cannot be linted; {INSTALL_HINT}")
    if installed_version() is None:
        raise CypherLintUnavailable(f"{PACKAGE} is not installed in {LINT_DIR}; {INSTALL_HINT}")
    return node


def _default_schema() -> tuple[list[str], list[str]]:
    from streamer.contracts.events import ALL_REL_TYPES, NODE_LABELS

    return list(NODE_LABELS), list(ALL_REL_TYPES)


def _run(node: str, payload: dict) -> list[dict]:
    try:
        done = subprocess.run(
            [node, str(LINT_SCRIPT)],
            input=json.dumps(payload),
            capture_output=True,
            text=True,
            cwd=LINT_DIR,
            timeout=_TIMEOUT_S,
            env={**os.environ, "NODE_NO_WARNINGS": "1"},
        )
    except subprocess.TimeoutExpired as exc:
        raise RuntimeError(f"cypher-lint timed out after {_TIMEOUT_S}s") from exc
    if done.returncode != 0:
        raise RuntimeError(f"cypher-lint failed (exit {done.returncode}):\n{done.stderr.strip()}")
    results = json.loads(done.stdout)
    if len(results) != len(payload["statements"]):
        raise RuntimeError(f"cypher-lint answered for {len(results)} statements, expected {len(payload['statements'])}")
    return results


def _excerpt(text: str, start: int, end: int, limit: int = 60) -> str:
    piece = " ".join(text[start:end].split())
    return piece if len(piece) <= limit else piece[: limit - 1] + "…"


def lint(
    statements: Iterable[tuple[str, str]],
    *,
    labels: Sequence[str] | None = None,
    relationship_types: Sequence[str] | None = None,
) -> list[Problem]:
    """Every diagnostic for ``(name, cypher)`` pairs, in input order.

    ``labels`` / ``relationship_types`` default to ``streamer.contracts.events``' allowlists.
    Raises ``CypherLintUnavailable`` when node or the package is missing.
    """
    pairs = [(str(name), str(text)) for name, text in statements]
    if not pairs:
        return []
    node = _node()
    if labels is None or relationship_types is None:
        default_labels, default_rels = _default_schema()
        labels = default_labels if labels is None else labels
        relationship_types = default_rels if relationship_types is None else relationship_types
    schema = {"labels": list(labels), "relationshipTypes": list(relationship_types)}

    processes = max(1, min(_MAX_PROCESSES, os.cpu_count() or 1, len(pairs) // _MIN_PER_PROCESS))
    size = -(-len(pairs) // processes)
    chunks = [pairs[i : i + size] for i in range(0, len(pairs), size)]
    payloads = [{**schema, "statements": [{"name": name, "query": text} for name, text in chunk]} for chunk in chunks]
    with ThreadPoolExecutor(max_workers=len(payloads)) as pool:
        answers = list(pool.map(lambda payload: _run(node, payload), payloads))

    problems: list[Problem] = []
    for chunk, results in zip(chunks, answers):
        for (name, text), result in zip(chunk, results):
            for d in result["diagnostics"]:
                start, end = d["offsets"]["start"], d["offsets"]["end"]
                position = d.get("range", {}).get("start", {})
                problems.append(
                    Problem(
                        statement=name,
                        severity=d["severity"],
                        message=d["message"],
                        start=start,
                        end=end,
                        line=position.get("line", 0) + 1,
                        column=position.get("character", 0) + 1,
                        source=d.get("source", "neo4j"),
                        excerpt=_excerpt(text, start, end),
                    )
                )
    return problems


def lint_one(text: str, name: str = "query", **kwargs) -> list[Problem]:
    """``lint`` for a single statement."""
    return lint([(name, text)], **kwargs)


def describe(problems: Iterable[Problem]) -> str:
    """One line per problem, for assertion messages."""
    return "\n".join(f"  {p}" for p in problems)
