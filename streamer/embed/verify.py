"""``kg-streamer verify``: is the incremental state what a full recompute gives?

Loads the worker's checkpoint (replica, features and every cached layer), runs the full PyG
forward pass over the whole replica with the same weights and compares: max abs error and
the number of rows over the tolerance. With ``against_topic`` it also reads kg.embeddings
and checks that the last record per key is the engine's current vector (same model version,
equal within the tolerance) and that deleted nodes end in a tombstone. With ``against_graph``
it exports the live nodes and relationships of the graph DB over Bolt and checks that the
worker's replica holds exactly those (the replica is built from kg.changes only, so this is
what catches a graph write whose change was never published), and that the worker's version
guard (``streamer.embed.versions``) knows every live product at the graph's ``gen`` and
``rev`` (``products_behind``: a product whose newest write or incarnation the replica missed,
which the topology alone may not show). ``--repair`` publishes the changes that take the
replica to the graph, carrying the graph's current versions so the guard admits them (and a
graph that moved on meanwhile is not rolled back by them).
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any

import numpy as np
import torch

from streamer.contracts.changes import Change, edge_delete, edge_upsert, node_delete, node_upsert, split_key
from streamer.contracts.vectors import F16_TOLERANCE, VectorRecord, decode_vector
from streamer.embed.replica import Replica, block_ranges
from streamer.embed.state import open_checkpoint
from streamer.embed.versions import VersionGuard
from streamer.settings import Settings

Edge = tuple[str, str, str]


def verify(
    settings: Settings,
    against_topic: bool = False,
    tol: float | None = None,
    against_graph: bool = False,
    topic_vectors: dict[str, VectorRecord] | None = None,
    repair: bool = False,
) -> dict[str, Any]:
    """``tol`` defaults to 1e-5 plus the engine's reported error bound (0 in exact mode).
    ``topic_vectors``: the last record per key, when the caller has already read kg.embeddings
    (a monitor that followed it); otherwise it is read here."""
    opened = open_checkpoint(settings, require=True, progress=False)
    engine = opened.engine
    if tol is None:
        tol = 1e-5 + engine.error_bound
    topic_tol = tol + (F16_TOLERANCE if settings.vector_encoding == "f16" else 0.0)
    max_err, rows_over = engine.verify(tol=tol)
    report: dict[str, Any] = {
        "nodes": engine.replica.num_nodes,
        "edges": engine.replica.num_edges,
        "model_version": engine.model_version,
        "max_abs_err": max_err,
        "rows_over_tol": rows_over,
        "tol": tol,
    }
    ok = rows_over == 0
    if against_topic:
        topic = dict(topic_vectors) if topic_vectors is not None else last_vectors(settings)
        slots = engine.replica.live_slots()
        keys = [str(engine.replica.keys[int(s)]) for s in slots]
        current = engine.vectors(torch.as_tensor(slots, dtype=torch.long)).cpu().numpy()
        missing = stale = wrong_version = 0
        worst = 0.0
        for key, vec in zip(keys, current):
            rec = topic.pop(key, None)
            if rec is None or rec.vector is None:
                missing += 1
                continue
            if rec.model_version != engine.model_version:
                wrong_version += 1
            err = float(np.abs(rec.vector - vec).max())
            worst = max(worst, err)
            stale += err > topic_tol
        # what is left on the topic is a key the engine no longer has: it must be a tombstone
        not_tombstoned = sum(1 for rec in topic.values() if rec.vector is not None)
        report["topic"] = {
            "keys_missing": missing,
            "keys_stale": stale,
            "wrong_version": wrong_version,
            "max_abs_err": worst,
            "deleted_without_tombstone": not_tombstoned,
            "tol": topic_tol,
        }
        ok = ok and missing == stale == wrong_version == not_tombstoned == 0
    if against_graph:
        report["graph"] = compare_with_graph(engine.replica, settings, repair=repair, versions=opened.versions)
        ok = ok and report["graph"]["ok"]
    report["ok"] = ok
    return report


def replica_sets(replica: Replica) -> tuple[set[str], set[tuple[str, str, str]]]:
    """The replica's live node keys and typed edges (src key, rel, dst key)."""
    live = replica.live_slots()
    keys = np.asarray(replica.keys, dtype=object)
    seg, pos = block_ranges(replica.start[live], replica.length[live])
    code = replica.code[pos].astype(np.int64)
    out = code % 2 == 0  # each typed edge once: the half in its source's block
    src = keys[live[seg[out]]]
    dst = keys[replica.nbr[pos[out]].astype(np.int64)]
    rels = np.asarray(replica.rels, dtype=object)[code[out] // 2]
    return set(keys[live].tolist()), set(zip(src.tolist(), rels.tolist(), dst.tolist(), strict=True))


def graph_sets(settings: Settings) -> tuple[dict[str, tuple[int, int]], dict[Edge, tuple[int, int, int]]]:
    """The graph DB's live node keys -> (rev, gen) and relationships -> (rev, src gen, dst gen),
    in one read transaction."""
    from sinks import cypher
    from sinks.graph_db import open_driver

    nodes: dict[str, tuple[int, int]] = {}
    edges: dict[Edge, tuple[int, int, int]] = {}

    def read(tx: Any) -> None:
        nodes.update((f"{r['label']}:{r['id']}", (r["rev"], r["gen"])) for r in tx.run(cypher.EXPORT_NODES))
        edges.update(
            ((f"{r['a_label']}:{r['a']}", r["rel"], f"{r['b_label']}:{r['b']}"), (r["rev"], r["a_gen"], r["b_gen"]))
            for r in tx.run(cypher.EXPORT_RELATIONSHIPS)
        )

    with open_driver(settings) as driver, driver.session(database=settings.bolt_database) as session:
        session.execute_read(read)
    return nodes, edges


def compare_with_graph(
    replica: Replica, settings: Settings, examples: int = 5, repair: bool = False, versions: VersionGuard | None = None
) -> dict[str, Any]:
    """Replica vs graph DB: nodes and edges each side has that the other does not, and (with
    the worker's ``versions``) the products whose graph versions the guard has not seen. With
    ``repair``, the changes that take the replica to the graph are published to kg.changes
    (``repair_changes``); the worker applies them like any other change."""
    r_nodes, r_edges = replica_sets(replica)
    g_versions, g_edge_versions = graph_sets(settings)
    g_nodes, g_edges = set(g_versions), set(g_edge_versions)
    behind: set[str] = set()
    if versions is not None:
        behind = {k for k in g_nodes & r_nodes if products_behind(k, g_versions[k], versions)}
    diff: dict[str, list[Any]] = {
        "nodes_only_in_graph": sorted(g_nodes - r_nodes),
        "nodes_only_in_replica": sorted(r_nodes - g_nodes),
        "edges_only_in_graph": sorted(g_edges - r_edges),
        "edges_only_in_replica": sorted(r_edges - g_edges),
        "products_behind": sorted(behind),
    }
    out: dict[str, Any] = {"nodes": len(g_nodes), "edges": len(g_edges)}
    for name, items in diff.items():
        out[name] = len(items)
        if items:
            out[name + "_examples"] = [list(x) if isinstance(x, tuple) else x for x in items[:examples]]
    out["ok"] = not any(diff.values())
    if repair and not out["ok"]:
        from sinks.kafka_publisher import KafkaPublisher

        # a product the replica holds at an older version is sent again, with its edges: a newer
        # incarnation drops the old one's edges in the worker, so they must follow it
        again = {e for e in g_edges if e[0] in behind or e[2] in behind}
        changes = repair_changes(
            settings,
            (g_nodes - r_nodes) | behind,
            r_nodes - g_nodes,
            (g_edges - r_edges) | again,
            r_edges - g_edges,
            g_edge_versions,
        )
        publisher = KafkaPublisher(settings, client_id="kgs-repair")
        try:
            out["repair_changes_published"] = publisher.publish(
                settings.topic_changes, ((c.partition_key.encode(), c.to_json(), []) for c in changes)
            )
        finally:
            publisher.close()
    return out


def products_behind(key: str, graph: tuple[int, int], versions: VersionGuard) -> bool:
    """Whether the guard knows product ``key`` at an older (gen, rev) than the graph's."""
    rev, gen = graph
    if split_key(key)[0] != "Product":
        return False
    known = versions.gens.get(key, 0)
    return gen > known or (gen == known and rev > versions.revs.get(key, 0))


def repair_changes(
    settings: Settings,
    add_nodes: set[str],
    drop_nodes: set[str],
    add_edges: set[Edge],
    drop_edges: set[Edge],
    edge_versions: dict[Edge, tuple[int, int, int]] | None = None,
) -> list[Change]:
    """Changes that take the replica to the graph: edge deletes, node deletes, node upserts
    (products with their text and versions from the graph; a product no longer live is left
    out), edge upserts (with ``edge_versions``: (rev, src gen, dst gen) from the graph export);
    stamped now. A product's node delete carries its tombstone's versions; the other deletes
    (of what the graph does not hold at all) carry none, so the worker applies them as they are."""
    from sinks import cypher
    from sinks.graph_db import open_driver

    now = int(time.time() * 1000)

    def product_ids(keys: set[str]) -> list[str]:
        return sorted(split_key(k)[1] for k in keys if split_key(k)[0] == "Product")

    texts: dict[str, dict[str, Any]] = {}
    tombstones: dict[str, dict[str, Any]] = {}
    with open_driver(settings) as driver:
        if product_ids(add_nodes):
            rows, _, _ = driver.execute_query(cypher.PRODUCTS_BY_ID, ids=product_ids(add_nodes), database_=settings.bolt_database)
            texts = {r["id"]: dict(r) for r in rows}
        if product_ids(drop_nodes):
            rows, _, _ = driver.execute_query(
                cypher.TOMBSTONES_BY_ID, ids=product_ids(drop_nodes), database_=settings.bolt_database
            )
            tombstones = {r["id"]: dict(r) for r in rows}
    out = [edge_delete(s, r, d, now) for s, r, d in sorted(drop_edges)]
    for key in sorted(drop_nodes):
        label, node_id = split_key(key)
        dead = tombstones.get(node_id) if label == "Product" else None
        rev, gen = (dead["rev"], dead["gen"]) if dead else (None, None)
        out.append(node_delete(label, node_id, now, rev=rev, gen=gen))
    for key in sorted(add_nodes):
        label, node_id = split_key(key)
        if label != "Product":
            out.append(node_upsert(label, node_id, now))
        elif node_id in texts:
            props = {k: v for k, v in texts[node_id].items() if k not in ("id", "rev", "gen")}
            out.append(node_upsert(label, node_id, now, props, rev=texts[node_id]["rev"], gen=texts[node_id]["gen"]))
    for edge in sorted(add_edges):
        rev, src_gen, dst_gen = (edge_versions or {}).get(edge, (None, None, None))
        out.append(edge_upsert(*edge, now, rev=rev, src_gen=src_gen, dst_gen=dst_gen))
    return [replace(c, committed_ms=now, source_ms=now) for c in out]


def last_vectors(settings: Settings, timeout_s: float = 600.0) -> dict[str, Any]:
    """The last record per key on kg.embeddings (what compaction converges to)."""
    from streamer.kafka.topics import read_to_end

    last: dict[str, Any] = {}
    for r in read_to_end(settings, settings.topic_embeddings, timeout_s):
        last[r.key.decode()] = decode_vector(r.key, r.value, r.headers)
    return last
