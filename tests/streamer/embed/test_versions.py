"""``streamer.embed.versions.VersionGuard``: any interleaving of a versioned changelog converges.

A tiny pure-Python model of the graph's rules (``sinks/cypher.py``: product ``rev``/``gen``,
tombstones, resurrection detaching the tombstone's edges, interactions and relations that never
touch a tombstone, relation tombstones with a ``rev``) turns random operations into the
commit-ordered change stream the ingest consumers would publish. Random permutations of it,
with duplicated records (replays, a zombie consumer), cut into random micro-batches and with
the guard's state saved and loaded midway, go through ``VersionGuard`` -> ``expand_out_edges``
-> a real ``IncrementalEngine``; the result must equal the commit-order run and the graph:
same nodes, same edges, same product text features, same vectors.
"""

from __future__ import annotations

import hashlib
import io
import random
from collections.abc import Sequence
from typing import Any

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from encoders.graph import GraphEncoder, GraphEncoderConfig
from streamer.contracts import changes as C
from streamer.embed.engine import IncrementalEngine
from streamer.embed.verify import replica_sets
from streamer.embed.versions import VersionGuard
from streamer.embed.worker import expand_out_edges

DIM = 8
PRODUCTS = ("Product:P0", "Product:P1", "Product:P2")
USERS = ("User:U0", "User:U1")


# ---- the graph's rules, in commit order ---------------------------------------------------------
class Graph:
    """What sinks/cypher.py does to the graph, and the change each committed write publishes."""

    def __init__(self) -> None:
        self.nodes: dict[str, dict[str, Any]] = {}  # key -> rev, gen, deleted
        self.rels: dict[tuple[str, str, str], dict[str, Any]] = {}  # edge -> rev, deleted
        self.changes: list[C.Change] = []
        self.ts = 0

    def _node(self, key: str) -> dict[str, Any]:
        return self.nodes.setdefault(key, {"rev": 0, "gen": 0, "deleted": False})

    def _detach(self, key: str) -> None:
        for edge in [e for e in self.rels if key in (e[0], e[2])]:
            del self.rels[edge]

    def _gen(self, key: str) -> int:
        return int(self.nodes[key]["gen"])

    def apply(self, op: tuple[Any, ...]) -> None:
        self.ts += 1
        kind, *args = op
        getattr(self, kind)(*args)

    def upsert(self, key: str, brand: int) -> None:
        p = self._node(key)
        if p["deleted"]:
            self._detach(key)  # a resurrection starts with no edges
        p["rev"] += 1
        p["deleted"] = False
        for edge in [e for e in self.rels if e[0] == key and e[1] == "HAS_BRAND"]:
            del self.rels[edge]
        self._node(f"Brand:B{brand}")
        self.rels[(key, "HAS_BRAND", f"Brand:B{brand}")] = {"rev": 0, "deleted": False}
        props = {"title": f"{key} rev {p['rev']}", "out_edges": [["HAS_BRAND", f"Brand:B{brand}"]]}
        self.changes.append(C.node_upsert(*C.split_key(key), self.ts, props, rev=p["rev"], gen=p["gen"]))

    def delete(self, key: str) -> None:
        p = self._node(key)
        p["rev"] += 1
        p["gen"] += 0 if p["deleted"] else 1
        p["deleted"] = True
        self._detach(key)
        self.changes.append(C.node_delete(*C.split_key(key), self.ts, rev=p["rev"], gen=p["gen"]))

    def interact(self, user: str, key: str) -> None:
        if self.nodes.get(key, {}).get("deleted"):
            return
        self._node(key)
        self._node(user)
        r = self.rels.setdefault((user, "VIEWED", key), {"rev": 0, "deleted": False})
        r["rev"] += 1
        self.changes.append(C.edge_upsert(user, "VIEWED", key, self.ts, rev=r["rev"], src_gen=0, dst_gen=self._gen(key)))

    def relate(self, a: str, b: str) -> None:
        if self.nodes.get(a, {}).get("deleted") or self.nodes.get(b, {}).get("deleted"):
            return
        self._node(a)
        self._node(b)
        r = self.rels.setdefault((a, "ALSO_BOUGHT", b), {"rev": 0, "deleted": False})
        r["rev"] += 1
        r["deleted"] = False
        self.changes.append(C.edge_upsert(a, "ALSO_BOUGHT", b, self.ts, rev=r["rev"], src_gen=self._gen(a), dst_gen=self._gen(b)))

    def unrelate(self, a: str, b: str) -> None:
        if a not in self.nodes or b not in self.nodes or self.nodes[a]["deleted"] or self.nodes[b]["deleted"]:
            return  # no node, or a tombstone: nothing written
        r = self.rels.setdefault((a, "ALSO_BOUGHT", b), {"rev": 0, "deleted": False})
        r["rev"] += 1
        r["deleted"] = True
        self.changes.append(C.edge_delete(a, "ALSO_BOUGHT", b, self.ts, rev=r["rev"], src_gen=self._gen(a), dst_gen=self._gen(b)))

    def live(self) -> tuple[set[str], set[tuple[str, str, str]]]:
        nodes = {k for k, n in self.nodes.items() if not n["deleted"]}
        return nodes, {e for e, r in self.rels.items() if not r["deleted"] and e[0] in nodes and e[2] in nodes}


OPS = st.one_of(
    st.tuples(st.just("upsert"), st.sampled_from(PRODUCTS), st.integers(0, 2)),
    st.tuples(st.just("delete"), st.sampled_from(PRODUCTS)),
    st.tuples(st.just("interact"), st.sampled_from(USERS), st.sampled_from(PRODUCTS)),
    st.tuples(st.just("relate"), st.sampled_from(PRODUCTS), st.sampled_from(PRODUCTS)),
    st.tuples(st.just("unrelate"), st.sampled_from(PRODUCTS), st.sampled_from(PRODUCTS)),
)


def commit_order(ops: Sequence[tuple[Any, ...]]) -> Graph:
    graph = Graph()
    for op in ops:
        graph.apply(op)
    return graph


# ---- the worker's path: guard -> out-edge expansion -> engine -------------------------------------
def text_features(changes: Sequence[C.Change]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for ch in changes:
        if ch.op == "node_upsert" and ch.props and ch.key:
            seed = int.from_bytes(hashlib.sha256(ch.props["title"].encode()).digest()[:4], "little")
            out[ch.key] = torch.randn(DIM, generator=torch.Generator().manual_seed(seed))
    return out


def new_engine() -> IncrementalEngine:
    model = GraphEncoder(GraphEncoderConfig(in_dim=DIM, hidden=6, out=5, layers=2, aggr="mean", seed=0))
    return IncrementalEngine(model, "cpu", mode="exact", featurize=text_features)


def reload(guard: VersionGuard) -> VersionGuard:
    """Through torch.save / torch.load(weights_only=True), as the checkpoint stores it."""
    buf = io.BytesIO()
    torch.save({"versions": guard.state_dict()}, buf)
    buf.seek(0)
    again = VersionGuard()
    again.load_state_dict(torch.load(buf, weights_only=True)["versions"])
    return again


def run(batches: Sequence[Sequence[C.Change]], guarded: bool, reload_at: int = -1) -> IncrementalEngine:
    engine, guard = new_engine(), VersionGuard()
    for i, batch in enumerate(batches):
        if i == reload_at:
            guard = reload(guard)
        changes = guard.admit(batch, engine.replica) if guarded else list(batch)
        engine.apply(expand_out_edges(changes, engine.replica))
    return engine


def state(engine: IncrementalEngine) -> tuple[set[str], set[tuple[str, str, str]], dict[str, torch.Tensor]]:
    nodes, edges = replica_sets(engine.replica)
    rows = {k: engine.h[0][engine.replica.index[k]].clone() for k in nodes}
    outs = {k: engine.vector(k).clone() for k in nodes}
    return nodes, edges, {k: torch.cat([rows[k], outs[k]]) for k in nodes}


def assert_same(a: IncrementalEngine, b: IncrementalEngine) -> None:
    nodes_a, edges_a, rows_a = state(a)
    nodes_b, edges_b, rows_b = state(b)
    assert nodes_a == nodes_b
    assert edges_a == edges_b
    for key in nodes_a:
        assert torch.allclose(rows_a[key], rows_b[key], atol=1e-5), key


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=st.lists(OPS, max_size=30), seed=st.integers(0, 2**32 - 1))
def test_any_interleaving_converges_to_the_commit_order(ops, seed):
    graph = commit_order(ops)
    stream = graph.changes
    rng = random.Random(seed)
    reference = run([stream], guarded=True)
    assert replica_sets(reference.replica) == graph.live()  # the rules and the replica agree
    assert_same(reference, run([stream], guarded=False))  # in commit order the guard drops nothing stale
    # a permutation with replays (duplicates of any record), cut into micro-batches
    shuffled = stream + rng.sample(stream, k=min(len(stream), rng.randint(0, 5)))
    rng.shuffle(shuffled)
    cuts = sorted(rng.sample(range(1, len(shuffled)), k=min(3, len(shuffled) - 1))) if len(shuffled) > 1 else []
    batches = [shuffled[i:j] for i, j in zip([0, *cuts], [*cuts, len(shuffled)], strict=True)]
    engine = run(batches, guarded=True, reload_at=rng.randint(0, len(batches)))
    assert_same(engine, reference)
    assert replica_sets(engine.replica) == graph.live()


def test_without_the_guard_a_late_edge_resurrects_a_deleted_product():
    """The issue's case: an interaction commits, then the product's delete; the delete reaches
    kg.changes first. Unguarded, the replica keeps the edge and a bare product; guarded, it
    matches the graph. (Shows the property above can fail.)"""
    graph = commit_order([("upsert", "Product:P0", 0), ("interact", "User:U0", "Product:P0"), ("delete", "Product:P0")])
    upsert, edge, delete = graph.changes
    late = [[upsert], [delete], [edge]]
    unguarded = run(late, guarded=False)
    assert ("User:U0", "VIEWED", "Product:P0") in replica_sets(unguarded.replica)[1]
    assert replica_sets(unguarded.replica) != graph.live()
    assert replica_sets(run(late, guarded=True).replica) == graph.live()


def test_a_newer_incarnation_drops_the_edges_of_the_old_one_before_its_delete_arrives():
    graph = commit_order(
        [
            ("upsert", "Product:P0", 0),
            ("relate", "Product:P1", "Product:P0"),
            ("delete", "Product:P0"),
            ("upsert", "Product:P0", 1),
            ("interact", "User:U0", "Product:P0"),
        ]
    )
    up0, rel, delete, up1, edge = graph.changes
    guard, engine = VersionGuard(), new_engine()
    for batch in ([up0, rel], [edge, up1], [delete]):
        engine.apply(expand_out_edges(guard.admit(batch, engine.replica), engine.replica))
    assert guard.dropped == 1  # the delete came after its incarnation's upsert
    assert replica_sets(engine.replica) == graph.live()
    assert ("Product:P1", "ALSO_BOUGHT", "Product:P0") not in replica_sets(engine.replica)[1]


def test_records_without_versions_pass_unchanged():
    guard, engine = VersionGuard(), new_engine()
    old = [
        C.edge_upsert("User:U0", "VIEWED", "Product:P0", 1),
        C.node_delete("Product", "P0", 2),
        C.node_delete("Product", "P0", 3),
    ]
    assert guard.admit(old, engine.replica) == old and guard.dropped == 0
