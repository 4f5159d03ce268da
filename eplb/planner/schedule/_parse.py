"""Parsing and pairing: a layer's ops as matched (Send, Recv) pairs in levels, and the one round
bound every part of the scheduler counts (`_Load`)."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import attrs

from eplb.ir.errors import PlanError, Violation
from eplb.ir.ops import Copy, Op, Recv, Send
from eplb.ir.plan import MigrationPlan
from eplb.ir.schedule import ScheduleLimits


def _ceil(a: float, b: int = 1) -> int:
    return int(-(-a // b))


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

    @classmethod
    def empty(cls) -> _Load:
        return cls(ops={}, peers={})

    def bound(self, limits: ScheduleLimits) -> int:
        """Rounds these pairs need at least: ceil(ops / max_ops) and ceil(peers / k) per rank."""
        m, k = limits.max_ops_per_group, limits.max_peers_per_round
        best = max((_ceil(n, m) for n in self.ops.values()), default=0)
        if k is not None:
            best = max(best, max((_ceil(len(s), k) for s in self.peers.values()), default=0))
        return best

    def bound_with(self, other: _Load, limits: ScheduleLimits, own: int) -> int:
        """`bound` of this load and ``other`` together, given ``own`` (this load's bound): only
        ``other``'s ranks are walked, so a growing window costs its new units only."""
        m, k = limits.max_ops_per_group, limits.max_peers_per_round
        best = own
        for r, n in other.ops.items():
            best = max(best, _ceil(self.ops.get(r, 0) + n, m))
        if k is not None:
            for r, s in other.peers.items():
                best = max(best, _ceil(len(self.peers.get(r, set()) | s), k))
        return best

    def add(self, other: _Load) -> None:
        """Merge ``other`` into this load (in place: only for a load no unit shares)."""
        for r, n in other.ops.items():
            self.ops[r] = self.ops.get(r, 0) + n
        for r, s in other.peers.items():
            if r in self.peers:
                self.peers[r] |= s
            else:
                self.peers[r] = set(s)


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
