"""In-memory replica of the knowledge graph's topology, built for streams of inserts and deletes.

Contract
--------
* Nodes: a node key (``"Label:id"``) maps to a dense *slot* (``index[key]``); ``keys[slot]`` maps
  back. Slots grow by doubling. A deleted node's slot is **reused**, but only after
  ``release(slots)``: the engine releases the slots of a micro-batch's deletions at the end of
  that batch, so inside one batch a slot never names two nodes. ``alive[slot]`` says whether a
  slot holds a node; ``ntype[slot]`` indexes ``labels``.
* Edges are typed and directed, ``(src, rel, dst)``, and unique (an upsert of an existing edge
  changes nothing; a delete of a missing one changes nothing). Message passing treats them as
  undirected, so each edge is stored as two *half-edges*: one in ``src``'s block (the neighbour
  ``dst``, code ``2*rel+0``) and one in ``dst``'s (neighbour ``src``, code ``2*rel+1``); a
  self-loop is one half-edge. The number of half-edges in a node's block is its degree, and
  the messages a node receives are exactly its block's neighbours.
* Layout: all blocks live in three flat arrays ``nbr`` (int32), ``code`` (int16) and ``twin``
  (int32: the position of the other half of the same edge), with per-node ``start`` (int64),
  ``length`` (int32) and ``capacity`` (int32). A full block moves to the end of the arrays with
  twice the capacity (amortised O(1) per insert; the twins of the moved entries are
  re-pointed); the space it leaves is garbage until ``maybe_compact()`` rewrites everything
  once garbage passes half of the used space.
* Cost: insert O(1) amortised after a scan of the *smaller* endpoint's block for an existing
  copy; delete = the same scan + O(1) through ``twin`` (holes filled from the block's end), so
  a hub's block is never scanned to add or remove one of its edges; deleting a node is
  O(its degree). ``gather(nodes)`` returns every half-edge of a set of nodes with vectorised
  numpy, touching only those blocks (never all edges).
* Batched, vectorised forms (what the engine's ``apply`` uses; no Python loop per edge):
  ``find_edges`` (lookup), ``add_edges`` (absent, distinct edges), ``remove_edges_at``
  (present edges by position); ``remove_node`` and ``bulk_add_edges`` are vectorised too.
  The scalar ``add_edge`` / ``remove_edge`` / ``find_edge`` remain for callers of one edge.
* Memory: 10 bytes per half-edge (20 per edge) plus block slack (< 2x on blocks that grew; a
  bulk load and a compaction leave 1/8 slack), 18 bytes per slot in arrays, plus the Python
  key dict and key list (~100-150 bytes per node, depending on key length). ``nbytes()``
  measures it. Limits: < 2^31 slots and half-edge positions, < 2^15 relation types.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, cast

import numpy as np
import torch

from streamer.contracts.changes import split_key

_MIN_BLOCK = 4


def sorted_unique(a: np.ndarray) -> np.ndarray:
    """``np.unique`` of a 1-d integer array by sort + mask (numpy 2.4's ``np.unique`` is ~100x
    slower on large int64 arrays)."""
    a = np.sort(a)
    if len(a) < 2:
        return a
    keep = np.empty(len(a), dtype=bool)
    keep[0] = True
    np.not_equal(a[1:], a[:-1], out=keep[1:])
    return a[keep]


def _remap(values: np.ndarray, old: np.ndarray, new: np.ndarray) -> np.ndarray:
    """``values`` with every element found in ``old`` replaced by the matching ``new``."""
    order = np.argsort(old)
    sorted_old = old[order]
    at = np.minimum(np.searchsorted(sorted_old, values), len(old) - 1)
    hit = sorted_old[at] == values
    out = values.copy()
    out[hit] = new[order[at[hit]]]
    return out


def block_ranges(starts: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(segment id, position) for every element of the ranges [start, start+length)."""
    lengths = lengths.astype(np.int64)
    total = int(lengths.sum())
    seg = np.repeat(np.arange(len(lengths), dtype=np.int64), lengths)
    if total == 0:
        return seg, np.zeros(0, dtype=np.int64)
    first = np.cumsum(lengths) - lengths
    pos = np.repeat(starts.astype(np.int64) - first, lengths) + np.arange(total, dtype=np.int64)
    return seg, pos


class Replica:
    def __init__(self, node_capacity: int = 1024, edge_capacity: int = 4096) -> None:
        self.index: dict[str, int] = {}
        self.keys: list[str | None] = []
        self.labels: list[str] = []
        self._label_id: dict[str, int] = {}
        self.rels: list[str] = []
        self.rel_index: dict[str, int] = {}  # relationship type -> id (read-only outside)
        self.free: list[int] = []
        self.num_slots = 0  # high-water mark of slots ever used
        self.num_edges = 0  # typed edges
        self.top = 0  # bump pointer into the half-edge arrays
        self.garbage = 0  # half-edge positions in abandoned blocks
        self.compact_min_garbage = 1 << 16
        self.alive = np.zeros(node_capacity, dtype=bool)
        self.ntype = np.zeros(node_capacity, dtype=np.int16)
        self.start = np.zeros(node_capacity, dtype=np.int64)
        self.length = np.zeros(node_capacity, dtype=np.int32)
        self.capacity = np.zeros(node_capacity, dtype=np.int32)
        self.nbr = np.zeros(edge_capacity, dtype=np.int32)
        self.code = np.zeros(edge_capacity, dtype=np.int16)
        self.twin = np.zeros(edge_capacity, dtype=np.int32)
        # write tracking for a device mirror of ``nbr`` (``track_writes``; off by default)
        self._writes: list[np.ndarray] | None = None
        self._writes_n = 0
        self._writes_all = True

    # ---- vocabularies ------------------------------------------------------------------
    def label_id(self, label: str) -> int:
        i = self._label_id.get(label)
        if i is None:
            i = self._label_id[label] = len(self.labels)
            self.labels.append(label)
        return i

    def rel_id(self, rel: str) -> int:
        i = self.rel_index.get(rel)
        if i is None:
            if len(self.rels) >= 1 << 14:
                raise ValueError("too many relation types")
            i = self.rel_index[rel] = len(self.rels)
            self.rels.append(rel)
        return i

    def label_of(self, slot: int) -> str:
        return self.labels[int(self.ntype[slot])]

    # ---- nodes -------------------------------------------------------------------------
    @property
    def num_nodes(self) -> int:
        return len(self.index)

    def _grow_nodes(self, need: int) -> None:
        cap = len(self.alive)
        if need <= cap:
            return
        new = max(need, 2 * cap)
        for name in ("alive", "ntype", "start", "length", "capacity"):
            old = getattr(self, name)
            arr = np.zeros(new, dtype=old.dtype)
            arr[:cap] = old
            setattr(self, name, arr)

    def add_node(self, key: str, label: str | None = None) -> tuple[int, bool]:
        """(slot, created): the node's slot, allocating one when the key is new."""
        slot = self.index.get(key)
        if slot is not None:
            return slot, False
        if self.free:
            slot = self.free.pop()
        else:
            slot = self.num_slots
            self._grow_nodes(slot + 1)
            self.num_slots += 1
            self.keys.append(None)
        self.index[key] = slot
        self.keys[slot] = key
        self.alive[slot] = True
        self.ntype[slot] = self.label_id(label if label is not None else split_key(key)[0])
        self.length[slot] = 0
        self.capacity[slot] = 0
        self.start[slot] = 0
        return slot, True

    def remove_node(self, slot: int) -> np.ndarray:
        """Remove a node and all its edges; returns the neighbour of each removed half-edge
        (one per incident edge, the node itself for a self-loop). The slot stays reserved
        until ``release``. Vectorised: the partner halves are removed from their blocks with
        ``_delete_positions`` (O(degree) numpy, no Python loop per edge)."""
        s, n = int(self.start[slot]), int(self.length[slot])
        nbrs = self.nbr[s : s + n].astype(np.int64)
        twins = self.twin[s : s + n].astype(np.int64)
        other = nbrs != slot
        self._delete_positions(twins[other], nbrs[other])
        self.num_edges -= n
        self.garbage += int(self.capacity[slot])
        self.length[slot] = 0
        self.capacity[slot] = 0
        key = self.keys[slot]
        if key is not None:
            del self.index[key]
        self.keys[slot] = None
        self.alive[slot] = False
        return nbrs

    def release(self, slots: Iterable[int]) -> None:
        """Make removed slots reusable."""
        for s in slots:
            assert not self.alive[s], "release of a live slot"
            self.free.append(int(s))

    def live_slots(self) -> np.ndarray:
        return np.flatnonzero(self.alive[: self.num_slots])

    # ---- half-edge blocks --------------------------------------------------------------
    def _grow_edges(self, need: int) -> None:
        cap = len(self.nbr)
        if need <= cap:
            return
        new = max(need, 2 * cap)
        if new >= 1 << 31:
            raise MemoryError("half-edge storage would pass 2^31 positions")
        for name in ("nbr", "code", "twin"):
            old = getattr(self, name)
            arr = np.zeros(new, dtype=old.dtype)
            arr[: self.top] = old[: self.top]
            setattr(self, name, arr)

    def _room(self, v: int, extra: int = 1) -> None:
        """Make room for ``extra`` more half-edges in v's block (moving it when full)."""
        n, cap, s = int(self.length[v]), int(self.capacity[v]), int(self.start[v])
        if n + extra <= cap:
            return
        new_cap = max(_MIN_BLOCK, 2 * cap, n + extra)
        if cap and s + cap == self.top:  # last block: grow in place
            self._grow_edges(s + new_cap)
            self.top = s + new_cap
            self.capacity[v] = new_cap
            return
        p = self.top
        self._grow_edges(p + new_cap)
        if n:
            tw = self.twin[s : s + n].astype(np.int64)
            inside = (tw >= s) & (tw < s + n)  # self-loops point into the block itself
            tw[inside] += p - s
            self.nbr[p : p + n] = self.nbr[s : s + n]
            self.code[p : p + n] = self.code[s : s + n]
            self.twin[p : p + n] = tw
            self.twin[tw] = np.arange(p, p + n, dtype=np.int32)
            self._mark(np.arange(p, p + n, dtype=np.int64))
        self.garbage += cap
        self.start[v] = p
        self.capacity[v] = new_cap
        self.top = p + new_cap

    def _append(self, v: int, w: int, code: int) -> int:
        p = int(self.start[v]) + int(self.length[v])
        self.nbr[p] = w
        self._mark(p)
        self.code[p] = code
        self.length[v] += 1
        return p

    def _remove_entry(self, v: int, p: int) -> None:
        """Remove the half-edge at position p of v's block (swap with the block's last)."""
        last = int(self.start[v]) + int(self.length[v]) - 1
        if p != last:
            self.nbr[p] = self.nbr[last]
            self._mark(p)
            self.code[p] = self.code[last]
            t = int(self.twin[last])
            if t == last:  # a moved self-loop is its own twin
                t = p
            self.twin[p] = t
            self.twin[t] = p
        self.length[v] -= 1

    def find_edge(self, s: int, rel: str, d: int) -> int:
        """Position of the half-edge of (s, rel, d) in the smaller endpoint's block, or -1."""
        r = self.rel_index.get(rel)
        if r is None:
            return -1
        if s == d or self.length[s] <= self.length[d]:
            owner, other, code = s, d, 2 * r
        else:
            owner, other, code = d, s, 2 * r + 1
        b, n = int(self.start[owner]), int(self.length[owner])
        hit = np.flatnonzero((self.nbr[b : b + n] == other) & (self.code[b : b + n] == code))
        return b + int(hit[0]) if len(hit) else -1

    def has_edge(self, s: int, rel: str, d: int) -> bool:
        return self.find_edge(s, rel, d) >= 0

    def add_edge(self, s: int, rel: str, d: int) -> bool:
        """Insert (s, rel, d); False when it was already there."""
        if self.find_edge(s, rel, d) >= 0:
            return False
        r = self.rel_id(rel)
        self._room(s)
        if s == d:
            p = self._append(s, s, 2 * r)
            self.twin[p] = p
        else:
            self._room(d)
            p = self._append(s, d, 2 * r)
            q = self._append(d, s, 2 * r + 1)
            self.twin[p] = q
            self.twin[q] = p
        self.num_edges += 1
        return True

    def remove_edge(self, s: int, rel: str, d: int) -> bool:
        """Delete (s, rel, d); False when it was not there."""
        p = self.find_edge(s, rel, d)
        if p < 0:
            return False
        if s == d:
            self._remove_entry(s, p)
        else:
            owner = s if self.start[s] <= p < self.start[s] + self.length[s] else d
            other = d if owner == s else s
            q = int(self.twin[p])
            self._remove_entry(owner, p)
            self._remove_entry(other, q)
        self.num_edges -= 1
        return True

    # ---- batched edge operations (vectorised numpy; what the engine's apply uses) -----------
    def find_edges(self, s: np.ndarray, r: np.ndarray, d: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(position, owner) of the half-edge of each typed edge (s, r, d) (``r``: rel ids) in
        its smaller endpoint's block; position -1 where the edge is absent. Reads only those
        blocks (sum of the smaller degrees), never a hub's block for an edge to a small node."""
        s, r, d = (np.asarray(a, dtype=np.int64) for a in (s, r, d))
        out = np.full(len(s), -1, dtype=np.int64)
        own_s = (s == d) | (self.length[s] <= self.length[d])
        owner = np.where(own_s, s, d)
        if not len(s):
            return out, owner
        other = np.where(own_s, d, s)
        code = 2 * r + (~own_s).astype(np.int64)
        seg, pos = block_ranges(self.start[owner], self.length[owner])
        hit = (self.nbr[pos] == other[seg]) & (self.code[pos] == code[seg])
        out[seg[hit]] = pos[hit]
        return out, owner

    def add_edges(self, s: np.ndarray, r: np.ndarray, d: np.ndarray) -> None:
        """Insert typed edges that are all absent and pairwise distinct (``apply`` makes sure):
        amortised O(1) per edge, vectorised; full blocks move to the end with doubled capacity."""
        s, r, d = (np.asarray(a, dtype=np.int64) for a in (s, r, d))
        m = len(s)
        if not m:
            return
        k = np.flatnonzero(s != d)  # edges with a second half
        owner = np.concatenate([s, d[k]])
        nbr = np.concatenate([d, s[k]])
        code = np.concatenate([2 * r, 2 * r[k] + 1])
        order = np.argsort(owner, kind="stable")
        own_sorted = owner[order]
        first = np.ones(len(order), dtype=bool)
        first[1:] = own_sorted[1:] != own_sorted[:-1]
        grp = np.flatnonzero(first)
        uniq = own_sorted[grp]
        cnt = np.diff(np.append(grp, len(order)))
        self._make_room(uniq, cnt)
        rank = np.arange(len(order), dtype=np.int64) - np.repeat(grp, cnt)
        pos = np.empty(len(order), dtype=np.int64)
        pos[order] = self.start[own_sorted] + self.length[own_sorted] + rank
        mate = np.arange(m, dtype=np.int64)
        mate[k] = m + np.arange(len(k))
        mate = np.concatenate([mate, k])
        self.nbr[pos] = nbr
        self.code[pos] = code
        self.twin[pos] = pos[mate]
        self._mark(pos)
        self.length[uniq] += cnt.astype(np.int32)
        self.num_edges += m

    def remove_edges_at(self, pos: np.ndarray, owner: np.ndarray, s: np.ndarray, d: np.ndarray) -> None:
        """Delete edges (s, ., d) given the position of one half in ``owner``'s block (as
        ``find_edges`` returns them); the edges must be distinct. O(1) per half-edge through
        ``twin``: holes are filled from the end of their block."""
        pos, owner, s, d = (np.asarray(a, dtype=np.int64) for a in (pos, owner, s, d))
        if not len(pos):
            return
        k = s != d
        twin = self.twin[pos[k]].astype(np.int64)
        other = (s + d - owner)[k]
        self._delete_positions(np.concatenate([pos, twin]), np.concatenate([owner, other]))
        self.num_edges -= len(pos)

    def _delete_positions(self, pos: np.ndarray, owner: np.ndarray) -> None:
        """Remove the half-edges at ``pos`` (distinct; ``owner[i]`` holds ``pos[i]``). Every kept
        half-edge whose partner is kept stays consistent: the partner of each removed half must
        be removed too (or lie in a block being discarded). Per block, the k removed entries
        leave k holes; the kept entries among the block's last k fill the holes before them."""
        if not len(pos):
            return
        order = np.lexsort((pos, owner))
        pos, owner = pos[order], owner[order]
        first = np.ones(len(pos), dtype=bool)
        first[1:] = owner[1:] != owner[:-1]
        grp = np.flatnonzero(first)
        uniq = owner[grp]
        cnt = np.diff(np.append(grp, len(pos)))
        new_len = self.length[uniq].astype(np.int64) - cnt
        tail_start = self.start[uniq] + new_len
        holes = pos[pos < np.repeat(tail_start, cnt)]
        _, tail = block_ranges(tail_start, cnt)
        gone = np.sort(pos)
        at = np.minimum(np.searchsorted(gone, tail), len(gone) - 1)
        movers = tail[gone[at] != tail]
        if len(movers):
            tw = _remap(self.twin[movers].astype(np.int64), movers, holes)
            self.nbr[holes] = self.nbr[movers]
            self._mark(holes)
            self.code[holes] = self.code[movers]
            self.twin[holes] = tw
            self.twin[tw] = holes
        self.length[uniq] = new_len.astype(np.int32)

    def _make_room(self, v: np.ndarray, extra: np.ndarray) -> None:
        """Vectorised ``_room``: blocks of ``v`` too small for ``extra`` more entries move to the
        end of the arrays with capacity max(4, 2*cap, len+extra); their partners are re-pointed."""
        n = self.length[v].astype(np.int64)
        cap = self.capacity[v].astype(np.int64)
        need = n + extra > cap
        if not need.any():
            return
        v, n, cap, extra = v[need], n[need], cap[need], extra[need]
        new_cap = np.maximum(np.maximum(_MIN_BLOCK, 2 * cap), n + extra)
        new_start = self.top + np.cumsum(new_cap) - new_cap
        total = int(new_cap.sum())
        self._grow_edges(self.top + total)
        _, old_pos = block_ranges(self.start[v], n)
        _, new_pos = block_ranges(new_start, n)
        if len(old_pos):
            tw = _remap(self.twin[old_pos].astype(np.int64), old_pos, new_pos)
            self.nbr[new_pos] = self.nbr[old_pos]
            self._mark(new_pos)
            self.code[new_pos] = self.code[old_pos]
            self.twin[new_pos] = tw
            self.twin[tw] = new_pos
        self.garbage += int(cap.sum())
        self.start[v] = new_start
        self.capacity[v] = new_cap.astype(np.int32)
        self.top += total

    # ---- write tracking (a device mirror of ``nbr``) -------------------------------------
    def track_writes(self) -> None:
        """Start recording which ``nbr`` positions are written, for ``take_writes``. Every
        write site of ``nbr`` marks its positions; a compaction or bulk load marks everything,
        and so does a backlog past 1/8 of the used positions (a full copy is cheaper then)."""
        self._writes, self._writes_n, self._writes_all = [], 0, True

    def _mark(self, pos: int | np.ndarray) -> None:
        if self._writes is None or self._writes_all:
            return
        a = np.asarray(pos, dtype=np.int64).reshape(-1)
        self._writes.append(a)
        self._writes_n += len(a)
        if self._writes_n > max(self.top >> 3, 1 << 16):
            self._mark_all()

    def _mark_all(self) -> None:
        if self._writes is not None:
            self._writes, self._writes_n, self._writes_all = [], 0, True

    def take_writes(self) -> np.ndarray | None:
        """Positions of ``nbr`` written since the last call (may repeat), then start afresh;
        None means "everything" (or tracking is off): copy ``nbr[:top]`` whole."""
        if self._writes is None:
            return None
        out = None if self._writes_all else (np.concatenate(self._writes) if self._writes else np.zeros(0, dtype=np.int64))
        self._writes, self._writes_n, self._writes_all = [], 0, False
        return out

    # ---- reads -------------------------------------------------------------------------
    def neighbors(self, v: int) -> np.ndarray:
        s, n = int(self.start[v]), int(self.length[v])
        return self.nbr[s : s + n].copy()

    def gather(self, nodes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Every half-edge of ``nodes``: (i, w) arrays, meaning nodes[i] and w share an edge."""
        nodes = np.asarray(nodes, dtype=np.int64)
        seg, pos = block_ranges(self.start[nodes], self.length[nodes])
        return seg, self.nbr[pos].astype(np.int64)

    def edge_index(self) -> tuple[np.ndarray, np.ndarray]:
        """All messages (source, target): one per half-edge, target = the block's owner."""
        owners = self.live_slots()
        seg, pos = block_ranges(self.start[owners], self.length[owners])
        return self.nbr[pos].astype(np.int64), owners[seg]

    def csr(self) -> tuple[np.ndarray, np.ndarray]:
        """The adjacency as CSR over all slots: row v (a block owner) holds the neighbours whose
        messages v aggregates, ``crow`` int64 [num_slots + 1], ``col`` int64. Dead slots are
        empty rows."""
        n = self.num_slots
        length = np.where(self.alive[:n], self.length[:n], 0).astype(np.int64)
        crow = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(length, out=crow[1:])
        _, pos = block_ranges(self.start[:n], length)
        return crow, self.nbr[pos].astype(np.int64)

    def edges(self) -> list[tuple[str, str, str]]:
        """Every typed edge as (src key, rel, dst key) (for tests and debugging)."""
        keys = cast(list[str], self.keys)  # live slots (and their neighbours) always have a key
        out: list[tuple[str, str, str]] = []
        for v in self.live_slots():
            s, n = int(self.start[v]), int(self.length[v])
            for w, c in zip(self.nbr[s : s + n], self.code[s : s + n]):
                if c % 2 == 0:
                    out.append((keys[v], self.rels[c // 2], keys[int(w)]))
        return out

    def out_edges(self, key: str, rels: set[str] | None = None) -> set[tuple[str, str]]:
        """The node's outgoing typed edges as {(rel, dst key)} (optionally only these rels)."""
        v = self.index.get(key)
        if v is None:
            return set()
        keys = cast(list[str], self.keys)  # a live slot's neighbours always have a key
        s, n = int(self.start[v]), int(self.length[v])
        out: set[tuple[str, str]] = set()
        for w, c in zip(self.nbr[s : s + n], self.code[s : s + n]):
            if c % 2 == 0:
                rel = self.rels[c // 2]
                if rels is None or rel in rels:
                    out.add((rel, keys[int(w)]))
        return out

    # ---- bulk load and compaction ------------------------------------------------------
    def bulk_add_edges(self, src: np.ndarray, rel: np.ndarray | int, dst: np.ndarray) -> int:
        """Load many edges at once into a replica that has nodes but no edges yet.
        ``rel`` holds ids from ``rel_id`` (one per edge, or one id for all of them). Duplicates
        are dropped; returns the edges stored."""
        if self.num_edges or self.top:
            raise ValueError("bulk_add_edges needs a replica without edges")
        src, dst = np.asarray(src, np.int64), np.asarray(dst, np.int64)
        rel = np.broadcast_to(np.asarray(rel, np.int64), src.shape)
        if len(src) and (not self.alive[src].all() or not self.alive[dst].all()):
            raise ValueError("bulk_add_edges: unknown node slot")
        n, nr = max(self.num_slots, 1), max(len(self.rels), 1)
        if n * n * nr < 1 << 62:  # dedupe on one int64 key (fast path)
            key = sorted_unique((src * nr + rel) * n + dst)
            s, r, d = key // (n * nr), (key // n) % nr, key % n
        else:
            trip = np.unique(np.stack([src, rel, dst], axis=1), axis=0)
            s, r, d = trip[:, 0], trip[:, 1], trip[:, 2]
        m = len(s)
        n = self.num_slots
        # (s, r, d) come sorted by s, so the first halves (in s's block) are already grouped by
        # owner; only the second halves (in d's block) need a sort. The order inside a block
        # does not matter, so that sort need not be stable.
        k = np.flatnonzero(s != d)  # edges that get a second half
        dk = d[k]
        cnt_s = np.bincount(s, minlength=n).astype(np.int64)
        cnt_d = np.bincount(dk, minlength=n).astype(np.int64)
        counts = cnt_s + cnt_d
        caps = counts + (counts >> 3)
        starts = np.cumsum(caps) - caps
        pos_s = starts[s] + np.arange(m, dtype=np.int64) - (np.cumsum(cnt_s) - cnt_s)[s]
        order = np.argsort(dk)
        dk_sorted = dk[order]
        pos_d = np.empty(len(k), dtype=np.int64)
        pos_d[order] = (
            starts[dk_sorted] + cnt_s[dk_sorted] + np.arange(len(k), dtype=np.int64) - (np.cumsum(cnt_d) - cnt_d)[dk_sorted]
        )
        del order, dk_sorted
        self._grow_edges(int(caps.sum()) + 1)
        self.nbr[pos_s] = d
        self.code[pos_s] = 2 * r
        self.twin[pos_s] = pos_s  # self-loops are their own twin
        self.nbr[pos_d] = s[k]
        self.code[pos_d] = 2 * r[k] + 1
        self.twin[pos_s[k]] = pos_d
        self.twin[pos_d] = pos_s[k]
        self.start[:n], self.length[:n], self.capacity[:n] = starts, counts, caps
        self.top = int(caps.sum())
        self._mark_all()
        self.num_edges = m
        return m

    def maybe_compact(self) -> bool:
        """Rewrite all blocks contiguously when garbage passes half the used space."""
        if self.garbage < max(self.compact_min_garbage, self.top // 2):
            return False
        self.compact()
        return True

    def compact(self) -> None:
        n = self.num_slots
        length = self.length[:n].astype(np.int64)
        caps = length + (length >> 3)
        starts = np.cumsum(caps) - caps
        _, old = block_ranges(self.start[:n], length)
        _, new = block_ranges(starts, length)
        remap = np.zeros(max(self.top, 1), dtype=np.int64)
        remap[old] = new
        size = max(int(caps.sum()), 1)
        nbr, code, twin = (np.zeros(max(size, 16), dtype=a.dtype) for a in (self.nbr, self.code, self.twin))
        nbr[new], code[new], twin[new] = self.nbr[old], self.code[old], remap[self.twin[old]]
        self.nbr, self.code, self.twin = nbr, code, twin
        self.start[:n], self.capacity[:n] = starts, caps
        self.top, self.garbage = int(caps.sum()), 0
        self._mark_all()

    # ---- size and persistence ----------------------------------------------------------
    def nbytes(self) -> dict[str, int]:
        arrays = sum(a.nbytes for a in (self.nbr, self.code, self.twin))
        per_node = sum(a.nbytes for a in (self.alive, self.ntype, self.start, self.length, self.capacity))
        return {
            "half_edge_arrays": arrays,
            "half_edges_used": self.top,
            "node_arrays": per_node,
            "bytes_per_half_edge": 10,
            "bytes_per_slot": 18,
        }

    def state_dict(self) -> dict[str, Any]:
        n, t = self.num_slots, self.top
        arr = {
            name: torch.from_numpy(getattr(self, name)[:n].copy()) for name in ("alive", "ntype", "start", "length", "capacity")
        }
        arr.update({name: torch.from_numpy(getattr(self, name)[:t].copy()) for name in ("nbr", "code", "twin")})
        return {
            "arrays": arr,
            "keys": list(self.keys),
            "labels": list(self.labels),
            "rels": list(self.rels),
            "free": list(self.free),
            "num_slots": n,
            "num_edges": self.num_edges,
            "top": t,
            "garbage": self.garbage,
        }

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> Replica:
        n, t = int(state["num_slots"]), int(state["top"])
        rep = cls(node_capacity=max(n, 16), edge_capacity=max(t, 16))
        for name, tensor in state["arrays"].items():
            getattr(rep, name)[: len(tensor)] = tensor.numpy()
        rep.keys = list(state["keys"])
        rep.index = {k: i for i, k in enumerate(rep.keys) if k is not None}
        rep.labels = list(state["labels"])
        rep._label_id = {x: i for i, x in enumerate(rep.labels)}
        rep.rels = list(state["rels"])
        rep.rel_index = {x: i for i, x in enumerate(rep.rels)}
        rep.free = list(state["free"])
        rep.num_slots, rep.num_edges, rep.top, rep.garbage = n, int(state["num_edges"]), t, int(state["garbage"])
        return rep

    def add_nodes(self, keys: Sequence[str]) -> np.ndarray:
        """Slots of many keys (allocating new ones), in order. An empty replica and distinct
        keys take a fast path (one dict build, labels by their prefix)."""
        if not self.num_slots and not self.free:
            index = dict(zip(keys, range(len(keys))))
            if len(index) == len(keys):
                n = len(keys)
                self._grow_nodes(n)
                self.index, self.keys, self.num_slots = index, list(keys), n
                labels = [k.partition(":")[0] for k in keys]
                names = sorted(set(labels))
                table = np.asarray([self.label_id(x) for x in names], dtype=np.int16)
                lookup = {x: i for i, x in enumerate(names)}
                self.ntype[:n] = table[np.fromiter((lookup[x] for x in labels), dtype=np.int64, count=n)]
                self.alive[:n] = True
                self.length[:n] = 0
                self.capacity[:n] = 0
                self.start[:n] = 0
                return np.arange(n, dtype=np.int64)
        return np.fromiter((self.add_node(k)[0] for k in keys), dtype=np.int64, count=len(keys))
