"""Group a plan's ops into rounds: `schedule(plan, limits) -> Schedule`.

1. Levels. Within a layer, a transfer that must follow another (it reads what a Recv wrote, or
   overwrites what a Send reads) gets a higher level; copies sit between levels. Plans from
   `compile_plan` have every transfer at level 0 and copies after them, so a layer's transfers may
   go in any rounds.
2. Windows. Consecutive (layer, level) units share rounds while the lower bound of the union is
   no worse than the sum of their own bounds and an estimate of their staging fits
   ``staging_bytes_per_rank``: small layers do not pay one round each.
3. Rounds of a window. Without a peer limit, transfers are packed under ``max_ops_per_group``
   per rank (best fit). With ``max_peers_per_round = k`` the rank-to-rank pair graph (networkx)
   is edge coloured: best-fit first; if that needs more than the lower bound, Misra–Gries gives a
   proper colouring with at most max degree + 1 colours, grouped k per round, so rounds <=
   ceil((degree + 1) / k) <= lower bound + 1 whenever the op limit does not bind. A window's
   rounds may run in any order; rounds whose Recvs land in clean slots go first.
4. Ordering instead of staging (`_direct_landing`). Once transfers have rounds, a Recv the plan
   stages lands straight in its slot when every Send reading the slot's old expert ran in an
   earlier round (and no local copy reads it); a Recv still staged is unstaged right after its
   slot's last read, not at the end of the layer.
5. Copies go after the rank's last transfer of their unit (before its first, for copies that
   precede every transfer). Staging buffers are renamed into one pool per rank by interval
   colouring of their live ranges, so the pool is the peak number held at once.
6. Staging check. A window whose pool exceeds the budget is cut in proportion to the excess and
   rebuilt; if still over, into windows bounded by the buffers each layer's plan names (which
   fit whenever every layer fits alone). Windows are built independently, each at most once.

The lower bound (`rounds_lower_bound`) is, over all ranks, the most of ceil(distinct peers / k)
and ceil(transfer ops / max_ops_per_group), and at least the deepest layer's level count. It
ignores staging: with a staging budget of S experts per rank, a rank whose N Recvs all land in
slots still to be read needs about N / S rounds whatever the order (docs/scheduler.md).
"""

from __future__ import annotations

import heapq
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import attrs
import networkx as nx

from eplb.ir.errors import PlanError, Violation
from eplb.ir.ops import Copy, Loc, Op, Recv, Send, Transfer
from eplb.ir.plan import MigrationPlan
from eplb.ir.schedule import Round, Schedule, ScheduleLimits

__all__ = ["default_limits", "layer_lower_bound", "rounds_lower_bound", "schedule"]

# Peers per round across nodes. One NIC flow can fill a 400 Gb/s link, so a few peers at a time
# suffice; inside an NVSwitch node all peers at once is faster (DESIGN.md, "Why rounds").
# Not yet measured on a multi-node cluster: calibrate when one is available.
MULTI_NODE_PEERS = 4

# Staging a window of several rounds holds, against the buffers its layers' plans name, after
# direct landing and early unstaging: 0.3-0.45 measured on DeepSeek-V3-shaped plans (bench/).
# Only picks first windows; `schedule` checks the real figure and splits windows over budget.
SPREAD_STAGING = 0.6


def default_limits(plan: MigrationPlan) -> ScheduleLimits:
    """Limits for ``plan``'s link class: all peers at once on one node, `MULTI_NODE_PEERS` across
    nodes; 256 ops per group (pytorch#174288); staging of one layer (``slots_per_rank`` experts),
    the buffer vLLM and SGLang allocate."""
    topo = plan.topology
    return ScheduleLimits(
        max_peers_per_round=None if topo.num_nodes == 1 else MULTI_NODE_PEERS,
        max_ops_per_group=256,
        staging_bytes_per_rank=topo.slots_per_rank * plan.expert_bytes,
    )


@attrs.define
class _Pair:
    """A Send and its Recv, scheduled together."""

    send: Send
    recv: Recv
    level: int
    round: int = -1


@attrs.define
class _Load:
    """Transfer ops and distinct peers per rank of some pairs: all that round bounds count.

    Kept per unit (`_parse`), so windows and the schedule's bound merge loads instead of
    walking every pair again."""

    ops: dict[int, int]
    peers: dict[int, set[int]]

    @classmethod
    def of(cls, pairs: Sequence[_Pair]) -> _Load:
        ops: dict[int, int] = defaultdict(int)
        peers: dict[int, set[int]] = defaultdict(set)
        for p in pairs:
            a, b = p.send.src_rank, p.recv.dst_rank
            ops[a] += 1
            ops[b] += 1
            peers[a].add(b)
            peers[b].add(a)
        return cls(ops=dict(ops), peers=dict(peers))

    @classmethod
    def union(cls, loads: Sequence[_Load]) -> _Load:
        if len(loads) == 1:
            return loads[0]
        ops: dict[int, int] = defaultdict(int)
        peers: dict[int, set[int]] = defaultdict(set)
        for load in loads:
            for r, n in load.ops.items():
                ops[r] += n
            for r, s in load.peers.items():
                peers[r] |= s
        return cls(ops=dict(ops), peers=dict(peers))

    def bound(self, limits: ScheduleLimits) -> int:
        """Rounds these pairs need at least: ceil(ops / max_ops) and ceil(peers / k) per rank."""
        m, k = limits.max_ops_per_group, limits.max_peers_per_round
        best = max((_ceil(n, m) for n in self.ops.values()), default=0)
        if k is not None:
            best = max(best, max((_ceil(len(s), k) for s in self.peers.values()), default=0))
        return best


@attrs.define
class _Unit:
    """The transfers of one (layer, level)."""

    layer: int
    level: int
    pairs: list[_Pair]
    load: _Load


@attrs.define
class _Layer:
    units: list[_Unit]
    copies: list[tuple[int, Copy]]  # (level, copy) in plan order
    buffers: dict[int, int]  # rank -> distinct staging buffers the layer's plan uses
    staged: list[tuple[_Pair, list[Copy]]] | None = None  # `_staged`, computed once


def rounds_lower_bound(plan: MigrationPlan, limits: ScheduleLimits | None = None) -> int:
    """Fewest rounds any schedule of ``plan`` needs under ``limits`` (default: `default_limits`)."""
    limits = limits or default_limits(plan)
    layers = [_parse(plan, i) for i in range(plan.num_layers)]
    depth = max((len(lay.units) for lay in layers), default=0)
    return max(_Load.union([u.load for lay in layers for u in lay.units]).bound(limits), depth)


def layer_lower_bound(plan: MigrationPlan, layer: int, limits: ScheduleLimits | None = None) -> int:
    """Fewest rounds layer ``layer`` alone needs under ``limits``."""
    limits = limits or default_limits(plan)
    units = _parse(plan, layer).units
    return max(_Load.union([u.load for u in units]).bound(limits), len(units))


def schedule(plan: MigrationPlan, limits: ScheduleLimits | None = None) -> Schedule:
    """Rounds for ``plan`` under ``limits`` (None: `default_limits` for the plan's topology).

    Raises `PlanError` when the plan is not a valid sequential program of matched transfers, or
    when one layer alone needs more staging than ``limits.staging_bytes_per_rank``.
    """
    limits = limits or default_limits(plan)
    layers = [_parse(plan, i) for i in range(plan.num_layers)]
    budget = None
    if limits.staging_bytes_per_rank is not None:
        budget = limits.staging_bytes_per_rank // plan.expert_bytes
    units = [u for lay in layers for u in lay.units]

    # Windows by the round bound and an estimate of their staging; what they really hold (after
    # direct landing and early unstaging) is known only once rounds exist. A window over the
    # budget is cut into parts in proportion to its excess; if one is still over, it is replaced
    # by windows that bound the staging each layer's plan names, which always fit when every
    # layer fits alone. Windows are built independently, each once.
    homes = _copy_homes(layers)
    cache: dict[tuple[tuple[int, int], ...], _Built] = {}

    def build(window: list[_Unit], first: bool) -> _Built:
        key = (*((u.layer, u.level) for u in window), (-1, int(first)))
        got = cache.get(key)
        if got is None:
            got = cache[key] = _build_window(plan, layers, window, homes, first, limits)
        return got

    windows = _windows(units, layers, limits, budget, spread=True) or [[]]
    for last_try in (False, True):
        needs = [build(w, i == 0)[0] for i, w in enumerate(windows)]
        if budget is None or max(needs) <= budget:
            break
        windows = [
            sub
            for w, need in zip(windows, needs, strict=True)
            for sub in ([w] if need <= budget else _split(w, layers, limits, budget, need, last_try))
        ]
    parts = [build(w, i == 0) for i, w in enumerate(windows)]
    pool = max(part[0] for part in parts)
    before = [rnd for part in parts for rnd in part[1]]
    transfers = [rnd for part in parts for rnd in part[2]]
    after = [rnd for part in parts for rnd in part[3]]
    if budget is not None and pool > budget:
        raise PlanError(
            "plan needs more staging than the limits allow",
            [
                Violation(
                    what=f"the schedule holds {pool} staging buffer(s) per rank at once "
                    f"({pool * plan.expert_bytes} B) but staging_bytes_per_rank is "
                    f"{limits.staging_bytes_per_rank} B",
                    fix=f"raise staging_bytes_per_rank to at least {pool * plan.expert_bytes}",
                )
            ],
        )
    out_rounds = tuple(Round._trusted(b, t, a) for b, t, a in zip(before, transfers, after, strict=True))
    depth = max((len(lay.units) for lay in layers), default=0)
    # The rounds hold the plan's ops (checked when the plan was built) with buffers renamed into
    # the pool: no per-op scan; `verify` still checks every buffer against the pool.
    return Schedule._trusted(
        plan=plan,
        limits=limits,
        rounds=out_rounds,
        rounds_lower_bound=max(_Load.union([u.load for u in units]).bound(limits), depth),
        staging_buffers_per_rank=pool,
    )


class _Tally:
    """Transfer ops and distinct peers per rank of a growing set of units: its round bound."""

    def __init__(self, limits: ScheduleLimits) -> None:
        self.m, self.k = limits.max_ops_per_group, limits.max_peers_per_round
        self.ops: dict[int, int] = defaultdict(int)
        self.peers: dict[int, set[int]] = defaultdict(set)
        self.bound = 0

    def bound_with(self, load: _Load) -> int:
        """The bound if ``load`` were added (nothing is added)."""
        best = self.bound
        m, k = self.m, self.k
        for r, n in load.ops.items():
            best = max(best, _ceil(self.ops[r] + n, m))
        if k is not None:
            for r, s in load.peers.items():
                best = max(best, _ceil(len(self.peers[r] | s), k))
        return best

    def add(self, load: _Load) -> None:
        self.bound = self.bound_with(load)
        for r, n in load.ops.items():
            self.ops[r] += n
        for r, s in load.peers.items():
            self.peers[r] |= s


def _windows(
    units: list[_Unit], layers: list[_Layer], limits: ScheduleLimits, budget: int | None, *, spread: bool
) -> list[list[_Unit]]:
    """Consecutive units that share rounds: while the union's bound is no worse than the sum of
    the parts' and (with ``budget``) the staging their plans name fits it; with ``spread``, that
    staging times `SPREAD_STAGING` when the window takes more than one round (an estimate of
    direct landing, checked by `schedule` after building)."""
    windows: list[list[_Unit]] = []
    tally = _Tally(limits)
    w_bufs: dict[int, int] = defaultdict(int)
    w_layers: set[int] = set()
    for unit in units:
        u_bound = unit.load.bound(limits)
        bufs = layers[unit.layer].buffers if unit.layer not in w_layers else {}
        fits = (
            windows
            and unit.layer not in w_layers  # a layer's next level starts a new window
            and (new_bound := tally.bound_with(unit.load)) <= tally.bound + u_bound
            and (
                budget is None
                or all(
                    (_ceil(SPREAD_STAGING * (w_bufs[r] + n)) if spread and new_bound > 1 else w_bufs[r] + n)
                    <= budget
                    for r, n in bufs.items()
                )
            )
        )
        if fits:
            windows[-1].append(unit)
        else:
            windows.append([unit])
            tally, w_bufs, w_layers = _Tally(limits), defaultdict(int), set()
        tally.add(unit.load)
        w_layers.add(unit.layer)
        for r, n in bufs.items():
            w_bufs[r] += n
    return windows


def _split(
    window: list[_Unit], layers: list[_Layer], limits: ScheduleLimits, budget: int, need: int, last: bool
) -> list[list[_Unit]]:
    """A window whose staging (``need``) exceeds ``budget``, in smaller windows: in proportion to
    the excess, or (``last``) bounding the staging each layer's plan names."""
    if last or len(window) == 1:
        return _windows(window, layers, limits, budget, spread=False)
    parts = min(len(window), -(-need // budget) + 1)
    size = -(-len(window) // parts)
    return [window[i : i + size] for i in range(0, len(window), size)]


_Built = tuple[int, list[list[Copy]], list[list[Transfer]], list[list[Copy]]]
_Home = tuple[int, int]  # (layer, level) of the unit whose window runs a copy; level -1: no unit


def _copy_homes(layers: list[_Layer]) -> dict[_Home, list[tuple[int, Copy]]]:
    """Each layer's copies by the unit whose window runs them: their level's (the first unit for
    copies before any transfer); ``(layer, -1)`` for layers of copies only."""
    homes: dict[_Home, list[tuple[int, Copy]]] = defaultdict(list)
    for li, lay in enumerate(layers):
        levels = {u.level for u in lay.units}
        for item in lay.copies:  # (level, copy), shared rather than rebuilt
            key = max(item[0], 0)
            if key not in levels:
                key = min(levels, default=-1)
            homes[(li, key)].append(item)
    return homes


def _build_window(
    plan: MigrationPlan,
    layers: list[_Layer],
    window: list[_Unit],
    homes: dict[_Home, list[tuple[int, Copy]]],
    first: bool,
    limits: ScheduleLimits,
) -> _Built:
    """One window's rounds, its copies placed, its staging buffers pooled.

    Returns (staging buffers per rank it needs, before, transfers, after). The ``first`` window
    also runs the layers of copies only, before its first group.
    """
    pairs = [p for u in window for p in u.pairs]
    bound = _Load.union([u.load for u in window]).bound(limits)
    assignment = _colour(pairs, limits, plan.topology.num_ranks, bound)
    n = max(assignment, default=-1) + 1
    order = _round_order(pairs, assignment, n)
    rounds: list[list[_Pair]] = [[] for _ in range(n)]
    for p, k in zip(pairs, assignment, strict=True):
        p.round = order[k]
        rounds[order[k]].append(p)
    extra = [c for (_, lv), cs in homes.items() if lv == -1 for _, c in cs] if first else []
    if not rounds and (extra or any(homes.get((u.layer, u.level)) for u in window)):
        rounds.append([])  # local copies only still need one round to hold them

    # --- copies: after the rank's last transfer of their unit, or before its first -------------
    before: list[list[Copy]] = [[] for _ in rounds]
    after: list[list[Copy]] = [[] for _ in rounds]
    before[0:1] = [list(extra)] if rounds else []
    recv_of: dict[int, Recv] = {}  # id(pair) -> Recv landing directly instead of in a buffer
    here = {id(u) for u in window}
    for u in window:
        lay = layers[u.layer]
        replace, early = _direct_landing(lay, recv_of) if len(lay.units) == 1 else ({}, {})
        last: dict[tuple[int, int], int] = {}
        for un in lay.units:
            if id(un) in here:
                for p in un.pairs:
                    for r in (p.send.src_rank, p.recv.dst_rank):
                        if last.get((un.level, r), -1) < p.round:
                            last[(un.level, r)] = p.round
        for level, c in homes.get((u.layer, u.level), ()):
            new = replace.get(id(c), c)
            if new is None:
                continue
            at = early.get(id(c))
            if at is None:
                at = last.get((level, c.rank))
            if at is not None:
                after[at].append(new)
            else:
                before[0].append(new)

    # --- transfers in a fixed order; both sides of a pair list them alike ----------------------
    transfers: list[list[Transfer]] = []
    for rnd in rounds:
        rnd.sort(key=lambda p: (p.send.layer, p.send.transfer_id))
        transfers.append([op for p in rnd for op in (p.send, recv_of.get(id(p), p.recv))])
    need, before, transfers, after = _rename_buffers(before, transfers, after)
    return need, before, transfers, after


def _round_order(pairs: Sequence[_Pair], assignment: Sequence[int], n: int) -> list[int]:
    """A window's rounds may run in any order: rounds that read many slots go first, so that more
    Recvs find their slot already read and land directly (`_direct_landing`)."""
    if n <= 1:
        return list(range(n))
    score = [0] * n
    for p, k in zip(pairs, assignment, strict=True):
        if p.recv.dst.is_buffer:
            score[k] -= 1  # wants to come late: its slot's readers should run first
        else:
            score[k] += 1
    ranked = sorted(range(n), key=lambda k: (-score[k], k))
    order = [0] * n
    for pos, k in enumerate(ranked):
        order[k] = pos
    return order


def _direct_landing(lay: _Layer, recv_of: dict[int, Recv]) -> tuple[dict[int, Copy | None], dict[int, int]]:
    """Ordering instead of staging, once a layer's transfers have rounds.

    A Recv the plan stages (lands in a buffer, then copied to slots) lands straight in one of
    those slots when every Send reading the slot's old expert runs in an earlier round and no local
    copy reads it: the buffer and one copy go away, the other copies read that slot. A Recv that
    stays staged is unstaged right after the later of its round and its slots' last reads, not at
    the end of the layer, so the buffer is free for later rounds. Only layers of one level (every
    plan from `compile_plan`). Returns copy replacements (None: dropped) and copies' new rounds
    (in ``after``); fills ``recv_of`` (id of pair -> new Recv).
    """
    if lay.staged is None:
        lay.staged = _staged(lay)
    replace: dict[int, Copy | None] = {}
    early: dict[int, int] = {}
    if not lay.staged:
        return replace, early
    read_at: dict[tuple[int, int], int] = {}  # (rank, slot) -> last round a Send reads it
    for p in lay.units[0].pairs:
        key = (p.send.src_rank, p.send.src.index)
        if read_at.get(key, -1) < p.round:
            read_at[key] = p.round
    for p, outs in lay.staged:
        k, r = p.round, p.recv.dst_rank
        # Last round a Send reads each wanting slot; land in the first already read (if any).
        reads: list[int] = []
        land = None
        for i, c in enumerate(outs):
            reads.append(read_at.get((r, c.dst.index), -1))
            if land is None and reads[i] < k:
                land = i
        if land is None:
            for c, j in zip(outs, reads, strict=True):
                early[id(c)] = max(k, j)
            continue
        # The new ops only move validated fields between ops: built unchecked (`Recv._trusted`).
        slot = outs[land].dst
        recv = p.recv
        recv_of[id(p)] = Recv._trusted(recv.layer, recv.transfer_id, recv.src_rank, r, slot, recv.expert)
        for i, (c, j) in enumerate(zip(outs, reads, strict=True)):
            if i == land:
                replace[id(c)] = None
            else:
                replace[id(c)] = Copy._trusted(c.layer, r, slot, c.dst, c.expert)
                early[id(c)] = max(k, j)
    return replace, early


def _staged(lay: _Layer) -> list[tuple[_Pair, list[Copy]]]:
    """The layer's staged Recvs that `_direct_landing` may move, each with its unstaging copies.

    A candidate lands in a buffer nothing else writes, and every copy out of that buffer goes to
    a slot that nothing else writes or copies from: such copies commute with every other copy
    of the layer, so they may run at any time after their slot's reads.
    """
    if len(lay.units) != 1:
        return []
    pairs = lay.units[0].pairs
    # Keyed by (rank, kind, index), not by `Loc` (a Python-level hash), as in `_parse`.
    writes: dict[tuple[int, str, int], int] = defaultdict(int)
    staged: list[_Pair] = []  # pairs whose Recv lands in a buffer
    for p in pairs:
        if p.send.src.kind == "buffer":
            return []
        dst = p.recv.dst
        writes[(p.recv.dst_rank, dst.kind, dst.index)] += 1
        if dst.kind == "buffer":
            staged.append(p)
    slot_read: set[tuple[int, int]] = set()  # (rank, slot) a copy reads
    from_buffer: dict[tuple[int, int], list[Copy]] = defaultdict(list)  # (rank, buffer) -> copies
    for _, c in lay.copies:
        src, dst = c.src, c.dst
        writes[(c.rank, dst.kind, dst.index)] += 1
        if src.kind == "buffer":
            from_buffer[(c.rank, src.index)].append(c)
        else:
            slot_read.add((c.rank, src.index))
    out = []
    for p in staged:
        r, b = p.recv.dst_rank, p.recv.dst.index
        if writes[(r, "buffer", b)] != 1:
            continue
        outs = from_buffer.get((r, b))
        if outs and _to_private_slots(outs, r, writes, slot_read):
            out.append((p, outs))
    return out


# A loop rather than a generator: it runs once per staged Recv (~1e4 per model).
def _to_private_slots(
    copies: list[Copy], rank: int, writes: dict[tuple[int, str, int], int], slot_read: set[tuple[int, int]]
) -> bool:
    """Whether every copy writes a slot that nothing else writes and no copy reads."""
    for c in copies:
        dst = c.dst
        if dst.kind != "slot" or writes[(rank, "slot", dst.index)] != 1 or (rank, dst.index) in slot_read:
            return False
    return True


# --- parsing a layer: pairs, levels, copies ---------------------------------------------------
def _parse(plan: MigrationPlan, li: int) -> _Layer:
    """Match Sends with Recvs and give every op its level (see the module docstring)."""
    ops = plan.layers[li].ops
    send_ops = [op for op in ops if isinstance(op, Send)]
    recv_ops = [op for op in ops if isinstance(op, Recv)]
    sends = {op.transfer_id: op for op in send_ops}
    recvs = {op.transfer_id: op for op in recv_ops}
    clash = len(sends) != len(send_ops) or len(recvs) != len(recv_ops)  # a transfer id used twice
    if clash or sends.keys() != recvs.keys() or not _agree(sends, recvs):
        _unmatched(ops, li)

    # Per location (rank, kind, index): ``written`` is the level of its last writer, ``busy``
    # the highest level that wrote or read it since (-1 when missing). A transfer goes in a later
    # group than any earlier access it conflicts with (Sends and Recvs of one group may not share
    # a location; a copy at level L runs after group L); a copy after them. Keys hold a
    # location's kind and index rather than the `Loc`, whose hash is a Python call: this loop
    # runs over every op of the plan.
    written: dict[tuple[int, str, int], int] = {}
    busy: dict[tuple[int, str, int], int] = {}
    units: dict[int, list[_Pair]] = defaultdict(list)
    copies: list[tuple[int, Copy]] = []
    buffers: dict[int, set[int]] = defaultdict(set)
    for op in ops:
        if isinstance(op, Copy):
            rank, from_loc, to_loc = op.rank, op.src, op.dst
            src, dst = (rank, from_loc.kind, from_loc.index), (rank, to_loc.kind, to_loc.index)
            level = max(-1, written.get(src, -1), busy.get(dst, -1))
            if busy.get(src, -1) < level:
                busy[src] = level
            written[dst] = busy[dst] = level
            copies.append((level, op))
            if from_loc.kind == "buffer":
                buffers[rank].add(from_loc.index)
            if to_loc.kind == "buffer":
                buffers[rank].add(to_loc.index)
            continue
        # A pair takes its place at the first of its Send and Recv: popped then, skipped after.
        send = sends.pop(op.transfer_id, None)
        if send is None:
            continue
        recv = recvs[op.transfer_id]
        from_loc, to_loc = send.src, recv.dst
        src = (send.src_rank, from_loc.kind, from_loc.index)
        dst = (recv.dst_rank, to_loc.kind, to_loc.index)
        level = max(0, written.get(src, -1) + 1, busy.get(dst, -1) + 1)
        if busy.get(src, -1) < level:
            busy[src] = level
        written[dst] = busy[dst] = level
        units[level].append(_Pair(send=send, recv=recv, level=level))
        if from_loc.kind == "buffer":
            buffers[send.src_rank].add(from_loc.index)
        if to_loc.kind == "buffer":
            buffers[recv.dst_rank].add(to_loc.index)
    return _Layer(
        units=[_Unit(layer=li, level=lv, pairs=units[lv], load=_Load.of(units[lv])) for lv in sorted(units)],
        copies=copies,
        buffers={r: len(b) for r, b in buffers.items()},
    )


def _agree(sends: dict[int, Send], recvs: dict[int, Recv]) -> bool:
    """Whether each Send and the Recv of its transfer id name the same ranks and expert."""
    for tid, s in sends.items():
        r = recvs[tid]
        if s.src_rank != r.src_rank or s.dst_rank != r.dst_rank or s.expert != r.expert:
            return False
    return True


def _unmatched(ops: Sequence[Op], li: int) -> None:
    """Raise `PlanError` naming every transfer id without exactly one matching Send and Recv."""
    by_tid: dict[int, list[Send | Recv]] = defaultdict(list)
    for op in ops:
        if isinstance(op, (Send, Recv)):
            by_tid[op.transfer_id].append(op)
    bad = [
        Violation(
            what=f"transfer #{tid} has {sum(isinstance(o, Send) for o in group)} Send(s) and "
            f"{sum(isinstance(o, Recv) for o in group)} Recv(s); it needs exactly one of each, with the "
            "same ranks and expert",
            fix="give every transfer id one Send and one Recv",
            layer=li,
            op=str(group[0]),
        )
        for tid, group in sorted(by_tid.items())
        if len(group) != 2
        or sorted(o.kind for o in group) != ["recv", "send"]
        or len({(o.src_rank, o.dst_rank, o.expert) for o in group}) != 1
    ]
    raise PlanError(f"layer {li} of the plan cannot be scheduled", bad)


# --- bounds and colouring ---------------------------------------------------------------------
def _ceil(a: float, b: int = 1) -> int:
    return int(-(-a // b))


def _colour(pairs: Sequence[_Pair], limits: ScheduleLimits, num_ranks: int, bound: int) -> list[int]:
    """A round index per pair: every rank <= k peers and <= max_ops_per_group ops per round.
    ``bound``: the pairs' round lower bound."""
    if not pairs:
        return []
    greedy = _best_fit(pairs, limits, num_ranks, bound)
    rounds = max(greedy) + 1
    if limits.max_peers_per_round is None or rounds <= bound:
        return greedy
    mg = _misra_gries_rounds(pairs, limits)
    if mg is not None and max(mg) + 1 < rounds:
        return mg
    return greedy


def _best_fit(pairs: Sequence[_Pair], limits: ScheduleLimits, num_ranks: int, start: int) -> list[int]:
    """Pairs of ranks, busiest first, into the open round with the most room; new rounds as needed."""
    k, m = limits.max_peers_per_round, limits.max_ops_per_group
    groups: dict[tuple[int, int], list[int]] = defaultdict(list)
    degree = [0] * num_ranks
    for i, p in enumerate(pairs):
        a, b = p.send.src_rank, p.recv.dst_rank
        key = (a, b) if a < b else (b, a)
        if key not in groups:
            degree[a] += 1
            degree[b] += 1
        groups[key].append(i)
    # Per rank, per open round: its transfer ops and its peers (rank-major: the inner loop below
    # walks the rounds of two ranks).
    load: list[list[int]] = [[0] * start for _ in range(num_ranks)]
    peers: list[list[set[int]]] = [[set() for _ in range(start)] for _ in range(num_ranks)]
    num_rounds = start
    out = [0] * len(pairs)
    order = sorted(groups, key=lambda ab: (-max(degree[ab[0]], degree[ab[1]]), -len(groups[ab]), ab))
    for a, b in order:
        todo = groups[(a, b)]
        load_a, load_b, peers_a, peers_b = load[a], load[b], peers[a], peers[b]
        while todo:
            best, room = -1, 0
            for r in range(num_rounds):
                if k is not None and b not in peers_a[r] and (len(peers_a[r]) >= k or len(peers_b[r]) >= k):
                    continue
                free = m - max(load_a[r], load_b[r])
                if free > room:
                    best, room = r, free
            if best < 0:
                for rank in range(num_ranks):
                    load[rank].append(0)
                    peers[rank].append(set())
                best, room = num_rounds, m
                num_rounds += 1
            take, todo = todo[:room], todo[room:]
            for i in take:
                out[i] = best
            load_a[best] += len(take)
            load_b[best] += len(take)
            peers_a[best].add(b)
            peers_b[best].add(a)
    used = sorted(set(out))
    renumber = {r: j for j, r in enumerate(used)}
    return [renumber[r] for r in out]


def _misra_gries_rounds(pairs: Sequence[_Pair], limits: ScheduleLimits) -> list[int] | None:
    """Proper edge colouring of the pair graph (<= max degree + 1 colours), k colours a round.

    None if some round would exceed ``max_ops_per_group`` (pairs with many transfers).
    """
    k = limits.max_peers_per_round
    assert k is not None
    graph = nx.Graph()
    for p in pairs:
        a, b = p.send.src_rank, p.recv.dst_rank
        if graph.has_edge(a, b):
            graph[a][b]["n"] += 1
        else:
            graph.add_edge(a, b, n=1)
    colours = _misra_gries(graph)
    used = sorted(set(colours.values()))
    rank_of = {c: j // k for j, c in enumerate(used)}
    out = []
    load: dict[tuple[int, int], int] = defaultdict(int)
    for p in pairs:
        a, b = p.send.src_rank, p.recv.dst_rank
        r = rank_of[colours[(a, b) if a < b else (b, a)]]
        load[(r, a)] += 1
        load[(r, b)] += 1
        out.append(r)
    if max(load.values()) > limits.max_ops_per_group:
        return None
    return out


def _misra_gries(graph: nx.Graph) -> dict[tuple[int, int], int]:
    """Misra & Gries (1992): a proper edge colouring with at most max degree + 1 colours."""
    num_colours = max((d for _, d in graph.degree()), default=0) + 1
    at: dict[int, dict[int, int]] = {v: {} for v in graph}  # vertex -> colour -> neighbour

    def free(v: int) -> int:
        used = at[v]
        return next(c for c in range(num_colours) if c not in used)

    def colour_of(u: int, v: int) -> int | None:
        return next((c for c, w in at[u].items() if w == v), None)

    def set_colour(u: int, v: int, c: int | None) -> None:
        old = colour_of(u, v)
        if old is not None:
            del at[u][old]
            del at[v][old]
        if c is not None:
            at[u][c] = v
            at[v][c] = u

    for x, f in sorted((min(e), max(e)) for e in graph.edges()):
        # Maximal fan of x starting at f: colour(x, fan[i]) is free on fan[i - 1].
        fan = [f]
        in_fan = {f}
        grown = True
        while grown:
            grown = False
            for c, w in at[x].items():
                if w not in in_fan and c not in at[fan[-1]]:
                    fan.append(w)
                    in_fan.add(w)
                    grown = True
                    break
        c, d = free(x), free(fan[-1])
        # Invert the path from x alternating colours d, c (c is free on x).
        path = []
        v, col = x, d
        while col in at[v]:
            w = at[v][col]
            path.append((v, w, col))
            v, col = w, (c if col == d else d)
        for v, w, col in path:
            del at[v][col]
            del at[w][col]
        for v, w, col in path:
            new = c if col == d else d
            at[v][new] = w
            at[w][new] = v
        # The first fan vertex on which d is free, keeping the prefix a fan.
        end = 0
        for i, w in enumerate(fan):
            if i > 0 and colour_of(x, w) in at[fan[i - 1]]:
                break
            end = i
            if d not in at[w]:
                break
        # Rotate the fan prefix: each edge takes its successor's colour; the last takes d.
        for i in range(end):
            nxt = colour_of(x, fan[i + 1])
            set_colour(x, fan[i + 1], None)
            set_colour(x, fan[i], nxt)
        set_colour(x, fan[end], d)
    return {(min(u, v), max(u, v)): c for u, nbrs in at.items() for c, v in nbrs.items()}


# --- staging buffers: plan-local names -> one pool per rank -----------------------------------
def _rename_buffers(
    before: list[list[Copy]],
    transfers: list[list[Transfer]],
    after: list[list[Copy]],
) -> _Built:
    """Give every staged value a pool buffer free for its whole live range.

    Returns the pool (the most buffers any rank holds at once) and the rounds with buffers
    renamed (lists changed in place).
    """
    # value: (layer, rank, plan index, generation); live range [start, end] in execution time.
    gen: dict[tuple[int, int, int], int] = {}
    live: dict[tuple[int, int, int, int], list[tuple[int, int, int]]] = {}
    # (list, position, role) of every op naming a buffer, and the value it names.
    uses: list[tuple[list[Any], int, str, tuple[int, int, int, int]]] = []

    def write(ops: list[Any], i: int, role: str, op: Copy | Recv, loc: Loc, t: tuple[int, int, int]) -> None:
        key = (op.layer, op.rank, loc.index)
        value = (*key, gen.get(key, 0) + 1)
        gen[key] = value[3]
        live[value] = [t, t]
        uses.append((ops, i, role, value))

    def read(ops: list[Any], i: int, role: str, op: Copy | Send, loc: Loc, t: tuple[int, int, int]) -> None:
        key = (op.layer, op.rank, loc.index)
        value = (*key, gen.get(key, 0))
        span = live.get(value)
        if span is None:
            raise PlanError(
                "plan cannot be scheduled",
                [
                    Violation(
                        what=f"reads staging buffer {loc} before any op of the layer wrote it",
                        fix="write the buffer earlier in the same layer",
                        layer=op.layer,
                        rank=op.rank,
                    )
                ],
            )
        span[1] = t
        uses.append((ops, i, role, value))

    for k in range(len(transfers)):
        for sec, copies in ((0, before[k]), (2, after[k])):
            for i, c in enumerate(copies):
                if c.src.kind == "buffer":
                    read(copies, i, "src", c, c.src, (k, sec, i))
                if c.dst.kind == "buffer":
                    write(copies, i, "dst", c, c.dst, (k, sec, i))
            if sec == 0:  # the group: its Sends read before its Recvs write
                group, t = transfers[k], (k, 1, 0)
                staged: list[tuple[int, Recv]] = []
                for i, op in enumerate(group):
                    if isinstance(op, Send):
                        if op.src.kind == "buffer":
                            read(group, i, "src", op, op.src, t)
                    elif op.dst.kind == "buffer":
                        staged.append((i, op))
                for i, recv in staged:
                    write(group, i, "dst", recv, recv.dst, t)
    if not live:
        return 0, before, transfers, after

    # Interval colouring per rank, by start: reuse a buffer whose value ended strictly earlier.
    index: dict[tuple[int, int, int, int], int] = {}
    by_rank: dict[int, list[tuple[tuple[int, int, int], tuple[int, int, int], tuple[int, int, int, int]]]] = (
        defaultdict(list)
    )
    for value, (start, end) in live.items():
        by_rank[value[1]].append((start, end, value))
    pool = 0
    for items in by_rank.values():
        items.sort()
        busy: list[tuple[tuple[int, int, int], int]] = []
        free: list[int] = []
        count = 0
        for start, end, value in items:
            while busy and busy[0][0] < start:
                heapq.heappush(free, heapq.heappop(busy)[1])
            if free:
                idx = heapq.heappop(free)
            else:
                idx, count = count, count + 1
            index[value] = idx
            heapq.heappush(busy, (end, idx))
        pool = max(pool, count)

    # Rewrite the ops whose buffer changed name (the fields move between validated ops: built
    # unchecked); an op already naming its pool buffer is kept as it is.
    for ops, i, role, value in uses:
        op, new = ops[i], index[value]
        if isinstance(op, Copy):
            if (op.src if role == "src" else op.dst).index == new:
                continue
            loc = Loc.buffer(new)
            src, dst = (loc, op.dst) if role == "src" else (op.src, loc)
            ops[i] = Copy._trusted(op.layer, op.rank, src, dst, op.expert)
        elif isinstance(op, Send):
            if op.src.index != new:
                ops[i] = Send._trusted(
                    op.layer, op.transfer_id, op.src_rank, op.dst_rank, Loc.buffer(new), op.expert
                )
        elif op.dst.index != new:
            ops[i] = Recv._trusted(
                op.layer, op.transfer_id, op.src_rank, op.dst_rank, Loc.buffer(new), op.expert
            )
    return pool, before, transfers, after
