"""Which kg.changes records are newer than what the replica holds: ``VersionGuard``.

Several ingest consumers (and a zombie one after a rebalance) publish to kg.changes, so the
changes about one entity can arrive in another order than the graph committed them. Each
change carries its entity's versions from the committing transaction
(``streamer/contracts/changes.py``; how the graph keeps them: ``sinks/cypher.py``):

* a product's ``gen`` (incarnation: +1 by each delete of a live or absent product) and ``rev``
  (+1 by every applied write); an edge change carries each endpoint's ``gen`` and, for a
  relation edge, the relationship's ``rev``.

Contract of ``admit(changes, replica)`` -> the changes to hand to the engine, in order:

* a node change is applied only if it is newer: an upsert of an older incarnation than the
  newest known is dropped; an upsert of the same incarnation only with a higher ``rev``; a
  delete only when it starts an incarnation newer than any known (otherwise it is a replay,
  a delete of a tombstone, or the replica already knows the product alive after it);
* an edge change naming an endpoint incarnation older than the newest known is dropped (that
  incarnation was deleted, and the edge with it); a relation edge (``RELATION_TYPES``; the
  only edges that are deleted by their own changes) is applied only if its endpoint
  incarnations are newer than those of its last applied change, or equal with a higher ``rev``;
* a change that names an incarnation newer than the known one means the delete that started
  it has not arrived yet: a synthetic ``node_delete`` of that node is inserted before it (when
  the replica, or this batch, holds the node), dropping every edge of the older incarnations;
* records without versions (older logs, category ``PARENT`` edges) pass unchanged;
* a dropped change's transaction still created nodes in the graph that no other change may
  name: the targets of a product upsert's ``out_edges`` (brands, categories, attributes,
  never deleted) and the endpoints of an edge upsert that are not of a dead incarnation
  (its user, a placeholder product). Each of those the replica does not hold gets a bare
  ``node_upsert`` (no props: what an edge upsert would have created) in the dropped change's place.

Invariant: every edge the replica holds for a product belongs to its newest known
incarnation, so a synthetic delete only removes what the graph has removed. With it, any
permutation of a commit-ordered stream converges to the commit-order result
(``tests/streamer/embed/test_versions.py``). ``dropped`` is the number of changes the last
``admit`` dropped. ``state_dict()`` / ``load_state_dict()``: the state goes into the engine
checkpoint with the replica (``streamer.embed.state``), so the two never disagree.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from streamer.contracts.changes import Change, node_delete, node_upsert, split_key
from streamer.contracts.events import RELATION_TYPES
from streamer.embed.replica import Replica

STATE_FORMAT = 1
_RELATIONS = frozenset(RELATION_TYPES)
EdgeKey = tuple[str, str, str]


class VersionGuard:
    def __init__(self) -> None:
        self.gens: dict[str, int] = {}  # node key -> newest incarnation known (absent: 0)
        self.revs: dict[str, int] = {}  # node key -> rev of the last node change applied
        self.edges: dict[EdgeKey, tuple[int, int, int]] = {}  # relation edge -> (src_gen, dst_gen, rev) last applied
        self.dropped = 0

    def admit(self, changes: Sequence[Change], replica: Replica) -> list[Change]:
        out: list[Change] = []
        present: dict[str, bool] = {}  # this batch's effect on which keys the replica will hold
        self.dropped = 0

        def holds(key: str) -> bool:
            return present.get(key, key in replica.index)

        def enter(key: str, gen: int, ts: int) -> None:
            """Move ``key`` to incarnation ``gen`` (newer than known): drop the older ones first."""
            if holds(key):
                out.append(node_delete(*split_key(key), ts))
                present[key] = False
            self.gens[key] = gen

        def touch(key: str, ts: int) -> None:
            """A node the graph created with a dropped change: create it bare if missing."""
            if not holds(key):
                out.append(node_upsert(*split_key(key), ts))
                present[key] = True

        for change in changes:
            if self._admit(change, enter):
                out.append(change)
                if change.op == "node_upsert" and change.key:
                    present[change.key] = True
                elif change.op == "node_delete" and change.key:
                    present[change.key] = False
                elif change.op == "edge_upsert" and change.src and change.dst:
                    present[change.src] = present[change.dst] = True
                continue
            self.dropped += 1
            if change.op == "node_upsert":
                for _rel, target in (change.props or {}).get("out_edges", []):
                    touch(target, change.ts)
            elif change.op == "edge_upsert" and change.src and change.dst:
                for key, gen in ((change.src, change.src_gen), (change.dst, change.dst_gen)):
                    if gen is not None and gen >= self.gens.get(key, 0):
                        touch(key, change.ts)
        return out

    def _admit(self, change: Change, enter: Callable[[str, int, int], None]) -> bool:
        if change.op in ("node_upsert", "node_delete"):
            key, gen, rev = change.key, change.gen, change.rev
            if key is None or gen is None or rev is None:
                return True
            known = self.gens.get(key, 0)
            if change.op == "node_delete":
                if gen <= known:
                    return False
                self.gens[key], self.revs[key] = gen, rev
                return True
            if gen < known or (gen == known and rev <= self.revs.get(key, -1)):
                return False
            if gen > known:
                enter(key, gen, change.ts)
            self.revs[key] = rev
            return True
        src, dst, src_gen, dst_gen = change.src, change.dst, change.src_gen, change.dst_gen
        if src is None or dst is None or src_gen is None or dst_gen is None:
            return True
        stale = src_gen < self.gens.get(src, 0) or dst_gen < self.gens.get(dst, 0)
        for key, gen in ((src, src_gen), (dst, dst_gen)):
            if gen > self.gens.get(key, 0):  # that incarnation exists, whatever becomes of this change
                enter(key, gen, change.ts)
        if stale:
            return False
        edge = (src, change.rel or "", dst)
        if edge[1] in _RELATIONS and change.rev is not None:
            last = self.edges.get(edge)
            # endpoint incarnations never go back (checked above), so "newer" is: a newer
            # incarnation of either end, or the same ones with a higher rev
            if last is not None and (src_gen, dst_gen) == last[:2] and change.rev <= last[2]:
                return False
            self.edges[edge] = (src_gen, dst_gen, change.rev)
        return True

    # --- persistence (inside the engine checkpoint) ----------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Plain str/int containers (``torch.load(weights_only=True)`` reads them)."""
        return {
            "format": STATE_FORMAT,
            "gens": dict(self.gens),
            "revs": dict(self.revs),
            "edges": [[s, r, d, *v] for (s, r, d), v in self.edges.items()],
        }

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        """Restore ``state_dict()`` output; ``None`` (a checkpoint from before versions): empty."""
        state = state or {"format": STATE_FORMAT, "gens": {}, "revs": {}, "edges": []}
        if state.get("format") != STATE_FORMAT:
            raise ValueError(f"unknown version guard state format {state.get('format')}")
        self.gens = dict(state["gens"])
        self.revs = dict(state["revs"])
        self.edges = {(s, r, d): (sg, dg, rev) for s, r, d, sg, dg, rev in state["edges"]}
