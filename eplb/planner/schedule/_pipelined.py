"""Staging-aware rounds for the whole plan at once: `_pipelined_rounds`.

Windows (`_windows`) give each few layers rounds of their own. Under a staging budget of one
layer's buffers, a plan that moves most slots then takes about two rounds per layer (DeepSeek-V3
after a popularity trade: 118 rounds against a bound of 9). Here the transfers of every layer
compete for the same rounds, filled one after another by a list scheduler:

- a transfer needing no buffer goes first: its Recv lands in a slot nothing reads, or in a slot
  every Send reading it has left in an earlier round (`_direct_landing` lands it there);
- a transfer that must be staged takes one of its receiving rank's buffers, only while one is
  free; the buffer is held until every Send reading the slots it is unstaged into has run (the
  unstaging copy follows that round: `_direct_landing`), for a Recv `_direct_landing` cannot
  move until the rank's last transfer of the layer (where its copies go);
- each rank within ``max_peers_per_round`` peers and ``max_ops_per_group`` ops a round;
- earlier layers first, so that one layer's Sends free the slots its later Recvs land in.

The result is a round per pair; `_build_window` places the copies and pools the buffers as for
any window, and `schedule` keeps it only when the pool fits the budget and the rounds are fewer.
Only for plans of one level per layer (every plan from `compile_plan`).
"""

from __future__ import annotations

from collections import defaultdict

import attrs

from eplb.ir.schedule import ScheduleLimits
from eplb.planner.schedule._parse import _Layer, _Pair
from eplb.planner.schedule._staging import _staged

_Slot = tuple[int, int, int]  # (layer, rank, slot)


@attrs.define(eq=False)
class _Hold:
    """A staging buffer in use on ``rank``: free after round ``until`` once ``waits`` is 0."""

    rank: int
    waits: int  # pairs still to be scheduled before it can be unstaged
    until: int  # the latest round of those scheduled so far (and of its own Recv)
    size: int = 1  # buffers held (a layer's local copies may hold several)


@attrs.define(eq=False)
class _Item:
    """One pair, with what decides whether it needs a buffer."""

    pair: _Pair
    read: _Slot | None  # the slot its Send reads
    wants: list[_Slot] | None  # staged and movable: the slots it may land in (else None)
    staged: bool  # its Recv lands in a buffer in the plan
    index: int  # position in plan order
    round: int = -1
    frees: list[_Hold] = attrs.field(factory=list)  # holds waiting for this item


def _pipelined_rounds(
    layers: list[_Layer], limits: ScheduleLimits, budget: int, reserve: int = 0
) -> list[_Pair] | None:
    """Every pair of ``layers`` with its ``round`` set, or None when the layers are not all of
    one level or the greedy stalls (every free buffer waits on a Send that cannot run).
    ``reserve``: buffers per rank left to the plan's own local copies."""
    if any(len(lay.units) != 1 for lay in layers if lay.units):
        return None
    items = _items(layers)
    st = _State(items, limits, budget - reserve, _copy_buffers(layers))
    k = 0
    while st.unplaced:
        if not st.fill(k):
            return None
        st.close(k)
        k += 1
    for it in items:
        it.pair.round = it.round
    return [it.pair for it in items]


class _State:
    """The list scheduler's state between rounds (module docstring)."""

    def __init__(
        self, items: list[_Item], limits: ScheduleLimits, budget: int, copy_bufs: dict[tuple[int, int], int]
    ) -> None:
        self.limits, self.budget = limits, budget
        # (layer, rank) -> buffers the layer's copies before its transfers hold on the rank:
        # from its first transfer there (the copies go just before it) to its last.
        self.copy_bufs = copy_bufs
        self.readers: dict[_Slot, list[_Item]] = defaultdict(list)  # slot -> Sends reading it
        self.wanted_by: dict[_Slot, list[_Item]] = defaultdict(list)  # slot -> items landing there
        self.by_layer_rank: dict[tuple[int, int], list[_Item]] = defaultdict(list)
        self.free: list[_Item] = []  # unplaced items that need no buffer (now or from next round)
        self.staged_at: dict[int, list[_Item]] = defaultdict(list)  # receiving rank -> the others
        for it in items:
            if it.read is not None:
                self.readers[it.read].append(it)
            for w in it.wants or ():
                self.wanted_by[w].append(it)
            layer = it.pair.send.layer
            self.by_layer_rank[(layer, it.pair.send.src_rank)].append(it)
            self.by_layer_rank[(layer, it.pair.recv.dst_rank)].append(it)
            (self.staged_at[it.pair.recv.dst_rank] if it.staged else self.free).append(it)
        self.pending = {s: len(v) for s, v in self.readers.items()}  # Sends still to read a slot
        self.last_read: dict[_Slot, int] = {}
        self.in_use: dict[int, int] = defaultdict(int)
        self.held: list[_Hold] = []
        self.freed_next: list[_Item] = []  # items that land directly from the next round
        self.touched: set[int] = set()  # receiving ranks whose staged list lost an item this round
        self.unplaced = len(items)

    def lands(self, it: _Item, k: int) -> bool:
        """Whether ``it`` in round ``k`` needs no buffer."""
        if not it.staged:
            return True
        pending, last_read = self.pending, self.last_read
        return any(pending.get(w, 0) == 0 and last_read.get(w, -1) < k for w in it.wants or ())

    def fill(self, k: int) -> int:
        """Round ``k``: items needing no buffer first, in plan order; then, rank by rank (the one
        with the earliest staged item first), staged items while the rank has a buffer free.
        Returns how many were placed."""
        self.ops: dict[int, int] = defaultdict(int)
        self.peers: dict[int, set[int]] = defaultdict(set)
        placed = sum(self.admit(it, k, staged=False) for it in self.free if it.round < 0)
        waiting = {b: its for b, its in self.staged_at.items() if its}
        for b in sorted(waiting, key=lambda r: waiting[r][0].index):
            for it in waiting[b]:
                if self.in_use[b] >= self.budget:
                    break
                if it.round < 0:
                    placed += self.admit(it, k, staged=not self.lands(it, k))
        return placed

    def admit(self, it: _Item, k: int, *, staged: bool) -> bool:
        """Place ``it`` in round ``k`` if both its ranks stay within the round's limits."""
        a, b = it.pair.send.src_rank, it.pair.recv.dst_rank
        peer_cap, op_cap = self.limits.max_peers_per_round, self.limits.max_ops_per_group
        ops, peers = self.ops, self.peers
        if ops[a] >= op_cap or ops[b] >= op_cap:
            return False
        layer = it.pair.send.layer
        for r in (a, b):
            need = self.copy_bufs.get((layer, r), 0) + (staged and r == b)
            if need and self.in_use[r] + need > self.budget:
                return False
        if peer_cap is not None and any(
            q not in peers[r] and len(peers[r]) >= peer_cap for r, q in ((a, b), (b, a))
        ):
            return False
        ops[a] += 1
        ops[b] += 1
        peers[a].add(b)
        peers[b].add(a)
        self.place(it, k, staged)
        return True

    def place(self, it: _Item, k: int, staged: bool) -> None:
        it.round = k
        if it.staged:
            self.touched.add(it.pair.recv.dst_rank)
        self.unplaced -= 1
        if staged:
            waits = _blockers(it, self.readers, self.by_layer_rank)
            hold = _Hold(rank=it.pair.recv.dst_rank, waits=0, until=k)
            for o in waits:
                if o.round < 0:
                    hold.waits += 1
                    o.frees.append(hold)
                else:
                    hold.until = max(hold.until, o.round)
            self.held.append(hold)
            self.in_use[hold.rank] += 1
        for r in {it.pair.send.src_rank, it.pair.recv.dst_rank}:
            key = (it.pair.send.layer, r)
            n = self.copy_bufs.pop(key, 0)
            if n:  # the layer's first transfer on r: its local copies' buffers from now on
                rest = [o for o in self.by_layer_rank[key] if o.round < 0]
                hold = _Hold(rank=r, waits=len(rest), until=k, size=n)
                for o in rest:
                    o.frees.append(hold)
                self.held.append(hold)
                self.in_use[r] += n
        for hold in it.frees:
            hold.waits -= 1
            hold.until = max(hold.until, k)
        if it.read is not None:
            self.pending[it.read] -= 1
            self.last_read[it.read] = k
            if self.pending[it.read] == 0:
                for o in self.wanted_by.get(it.read, ()):
                    if o.round < 0:
                        self.freed_next.append(o)
                        self.touched.add(o.pair.recv.dst_rank)

    def close(self, k: int) -> None:
        """After round ``k``: buffers unstaged by then are free, items that now land directly
        join the free list (in plan order), placed items leave the lists."""
        done = [h for h in self.held if h.waits == 0 and h.until <= k]
        for hold in done:
            self.in_use[hold.rank] -= hold.size
        self.held = [h for h in self.held if not (h.waits == 0 and h.until <= k)]
        moved = {id(it) for it in self.freed_next}
        self.free = sorted(
            [it for it in self.free if it.round < 0] + [it for it in self.freed_next if it.round < 0],
            key=lambda it: it.index,
        )
        self.freed_next = []
        for b in self.touched:  # receiving ranks that placed or freed a staged item
            self.staged_at[b] = [it for it in self.staged_at[b] if it.round < 0 and id(it) not in moved]
        self.touched = set()


def _items(layers: list[_Layer]) -> list[_Item]:
    """Every pair of ``layers`` in plan order, with its read slot and where it may land."""
    out: list[_Item] = []
    for li, lay in enumerate(layers):
        if not lay.units:
            continue
        if lay.staged is None:
            lay.staged = _staged(lay)
        movable = {id(p): [(li, p.recv.dst_rank, c.dst.index) for c in outs] for p, outs in lay.staged}
        for p in lay.units[0].pairs:
            src = p.send.src
            out.append(
                _Item(
                    pair=p,
                    read=(li, p.send.src_rank, src.index) if src.kind == "slot" else None,
                    wants=movable.get(id(p)),
                    staged=p.recv.dst.kind == "buffer",
                    index=len(out),
                )
            )
    return out


def _copy_buffers(layers: list[_Layer]) -> dict[tuple[int, int], int]:
    """(layer, rank) -> distinct buffers written by the layer's copies before its transfers."""
    bufs: dict[tuple[int, int], set[int]] = defaultdict(set)
    for li, lay in enumerate(layers):
        for level, c in lay.copies:
            if level < 0 and c.dst.kind == "buffer":
                bufs[(li, c.rank)].add(c.dst.index)
    return {key: len(v) for key, v in bufs.items()}


def _blockers(
    it: _Item, readers: dict[_Slot, list[_Item]], by_layer_rank: dict[tuple[int, int], list[_Item]]
) -> list[_Item]:
    """The items that must run before ``it``'s buffer is free: the Sends reading the slots it is
    unstaged into, or (a Recv `_direct_landing` cannot move) the rank's transfers of the layer."""
    if it.wants is not None:
        return [o for w in it.wants for o in readers.get(w, ())]
    return by_layer_rank[(it.pair.send.layer, it.pair.recv.dst_rank)]
