"""``similar``, ``recommend`` and ``search`` on the real embedded broker and graph DB: a readable
``rank id score title`` table by default (titles read from the graph DB over Bolt), JSON with
``--json`` (the fields as before, plus ``title``)."""

from __future__ import annotations

import json
import re
import uuid

from streamer.cli import build_parser
from streamer.embed.worker import embed_consumer
from streamer.ingest.step import ingest_consumer
from tests.helpers import produce_events, query, sample_events
from training.candidates import Candidate, titles
from training.commands import candidate_table

ROW = re.compile(r"^\s+(\d+)\s+(\S+)\s+(-?\d+\.\d{4})\s+(.*)$")


def _run_cli(argv: list[str], settings) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args, settings)


def _rows(out: str) -> list[tuple[int, str, float, str]]:
    rows = []
    for line in out.splitlines():
        m = ROW.match(line)
        if m:
            rows.append((int(m[1]), m[2], float(m[3]), m[4]))
    return rows


def test_candidate_commands_print_titles_and_json(settings, capsys):
    prefix = f"t{uuid.uuid4().hex[:6]}-"
    settings = settings.model_copy(update={"torch_threads": 1, "device": "cpu"})
    produce_events(settings, sample_events(prefix, products=30, users=9))
    ingest_consumer(settings).run(until_caught_up=True, max_seconds=120)
    embed_consumer(settings).run(until_caught_up=True, max_seconds=180)
    graph_titles = {
        f"Product:{r['id']}": r["title"]
        for r in query(settings, "MATCH (p:Product) WHERE coalesce(p.deleted, false) = false RETURN p.id AS id, p.title AS title")
    }
    node = f"Product:{prefix}P3"
    user = f"{prefix}U1"  # U1 purchases (actions cycle view/purchase/rate over j % 9 users)
    capsys.readouterr()

    # similar: a table whose rows carry the products' titles from the graph DB
    assert _run_cli(["similar", "--node", node, "--k", "5"], settings) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0] == f'products similar to {node} "Product 3"'
    assert "rank" in out and "title" in out
    rows = _rows(out)
    assert [r[0] for r in rows] == [1, 2, 3, 4, 5]
    for _, pid, _, title in rows:
        assert title == graph_titles[f"Product:{pid}"], (pid, title)
    assert [r[2] for r in rows] == sorted((r[2] for r in rows), reverse=True)
    assert f"{prefix}P3" not in {r[1] for r in rows}

    # ... and --json: the same candidates, the fields as before plus title
    assert _run_cli(["similar", "--node", node, "--k", "5", "--json"], settings) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["node"] == node and doc["source"].startswith("checkpoint") and doc["model_versions"]
    assert [r["id"] for r in doc["results"]] == [r[1] for r in rows]
    for r in doc["results"]:
        assert set(r) == {"key", "id", "title", "score"}
        assert r["title"] == graph_titles[r["key"]]

    # recommend: table (bought products left out) and JSON
    assert _run_cli(["recommend", "--user", user, "--k", "4"], settings) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"recommendations for User:{user} (")
    rows = _rows(out)
    assert len(rows) == 4 and all(title == graph_titles[f"Product:{pid}"] for _, pid, _, title in rows)
    assert _run_cli(["recommend", "--user", user, "--k", "4", "--json"], settings) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["user"] == user and doc["excluded"] > 0 and doc["excluded_rels"] == ["PURCHASED", "RATED"]
    assert [r["id"] for r in doc["results"]] == [r[1] for r in rows]
    assert all(r["title"] == graph_titles[r["key"]] for r in doc["results"])

    # an unknown user or node: one clear line and exit code 2, no traceback
    capsys.readouterr()
    assert _run_cli(["recommend", "--user", f"{prefix}nobody"], settings) == 2
    err = capsys.readouterr().err
    assert f"User:{prefix}nobody: no vector" in err and "Traceback" not in err
    assert _run_cli(["similar", "--node", f"Product:{prefix}nope"], settings) == 2
    assert f"Product:{prefix}nope: no vector" in capsys.readouterr().err

    # search (from the topic this time): table and JSON
    assert _run_cli(["search", "--text", "Product 7", "--k", "3", "--source", "topic"], settings) == 0
    out = capsys.readouterr().out
    assert out.startswith('products for "Product 7" (text only')
    rows = _rows(out)
    assert len(rows) == 3 and all(title == graph_titles[f"Product:{pid}"] for _, pid, _, title in rows)
    assert _run_cli(["search", "--text", "Product 7", "--k", "3", "--source", "topic", "--json"], settings) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["text"] == "Product 7" and doc["aligned"] is False and len(doc["results"]) == 3
    assert all(r["title"] == graph_titles[r["key"]] for r in doc["results"])

    # titles: only live products are looked up; deleted or unknown ones have none
    found = titles(settings, [node, f"Product:{prefix}P1", f"Product:{prefix}nope", f"User:{user}"])
    assert found == {node: "Product 3"}


def test_titles_without_a_graph_db_leave_the_ids(settings, caplog):
    gone = settings.model_copy(update={"bolt_uri": "bolt://127.0.0.1:9"})
    assert titles(gone, ["Product:x"], timeout_s=2.0) == {}
    assert "no titles" in caplog.text


def test_candidate_table_layout():
    cands = [
        Candidate("Product:85123A", 0.91234, "WHITE   HANGING HEART\nT-LIGHT HOLDER"),
        Candidate("Product:7", -0.5, None),
        Candidate("Product:22", 0.1, "x" * 100),
    ]
    lines = candidate_table(cands, title_width=20, indent="  ")
    assert lines[0] == "  rank  id        score  title"
    assert lines[1] == "     1  85123A   0.9123  WHITE HANGING HEA..."
    assert lines[2] == "     2  7       -0.5000  (no title)"
    assert lines[3].endswith("x" * 17 + "...") and len(lines[3]) == len(lines[1])
    assert candidate_table([]) == ["(no candidates)"]
