"""Staging: ordering instead of staging (`_direct_landing`) and renaming plan-local staging
buffers into one pool per rank (`_rename_buffers`)."""

from __future__ import annotations

import heapq
from collections import defaultdict
from typing import Any

import attrs

from eplb.ir.errors import PlanError, Violation
from eplb.ir.ops import Copy, Loc, Recv, Send, Transfer
from eplb.planner.schedule._parse import _Layer, _Pair


@attrs.define(kw_only=True)
class _Built:
    """One window's rounds (``before[k]``, ``transfers[k]``, ``after[k]`` per round) and the
    staging buffers per rank they hold at once."""

    staging: int
    before: list[list[Copy]]
    transfers: list[list[Transfer]]
    after: list[list[Copy]]


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



# --- staging buffers: plan-local names -> one pool per rank -----------------------------------
_Value = tuple[int, int, int, int]  # a staged value: (layer, rank, plan buffer index, generation)
_Time = tuple[int, int, int]  # (round, section: 0 before / 1 group / 2 after, position)
_Use = tuple[list[Any], int, str, _Value]  # (op list, position, "src" or "dst", value it names)


def _rename_buffers(
    before: list[list[Copy]],
    transfers: list[list[Transfer]],
    after: list[list[Copy]],
) -> _Built:
    """Give every staged value a pool buffer free for its whole live range.

    Returns the pool (the most buffers any rank holds at once) and the rounds with buffers
    renamed (lists changed in place).
    """
    live, uses = _live_ranges(before, transfers, after)
    if not live:
        return _Built(staging=0, before=before, transfers=transfers, after=after)
    index, pool = _pool_indices(live)
    _rewrite(uses, index)
    return _Built(staging=pool, before=before, transfers=transfers, after=after)


def _live_ranges(
    before: list[list[Copy]], transfers: list[list[Transfer]], after: list[list[Copy]]
) -> tuple[dict[_Value, list[_Time]], list[_Use]]:
    """Every staged value's live range [start, end] in execution time, and every op naming a
    buffer with the value it names."""
    gen: dict[tuple[int, int, int], int] = {}
    live: dict[_Value, list[_Time]] = {}
    uses: list[_Use] = []

    def write(ops: list[Any], i: int, role: str, op: Copy | Recv, loc: Loc, t: _Time) -> None:
        key = (op.layer, op.rank, loc.index)
        value = (*key, gen.get(key, 0) + 1)
        gen[key] = value[3]
        live[value] = [t, t]
        uses.append((ops, i, role, value))

    def read(ops: list[Any], i: int, role: str, op: Copy | Send, loc: Loc, t: _Time) -> None:
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
    return live, uses


def _pool_indices(live: dict[_Value, list[_Time]]) -> tuple[dict[_Value, int], int]:
    """Interval colouring per rank, by start: a value reuses a buffer whose value ended strictly
    earlier. Returns each value's pool buffer and the pool size (the most held at once)."""
    index: dict[_Value, int] = {}
    by_rank: dict[int, list[tuple[_Time, _Time, _Value]]] = defaultdict(list)
    for value, (start, end) in live.items():
        by_rank[value[1]].append((start, end, value))
    pool = 0
    for items in by_rank.values():
        items.sort()
        busy: list[tuple[_Time, int]] = []
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
    return index, pool


def _rewrite(uses: list[_Use], index: dict[_Value, int]) -> None:
    """Rewrite the ops whose buffer changed name, in their lists. The fields move between
    validated ops (built unchecked); an op already naming its pool buffer is kept as it is."""
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
