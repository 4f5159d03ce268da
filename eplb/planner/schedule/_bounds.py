"""Round lower bounds under the limits in force: transfer ops and peers per rank (`_Load`),
levels, and the staging budget (`staging_bound`).

The staging bound. Call a Recv constrained when the plan stages it and every slot it is copied
to is still read by a Send of its layer (its slot's old expert must leave first). In a round it
either is staged (its rank holds it in a buffer at the end of the group) or lands in a slot
already freed (every Send reading it ran earlier, or its expert was copied to a buffer). Count,
over the schedule so far: each transfer frees at most one slot, each landing or unstaging fills
one, so the slots free and unfilled are at most the values held in buffers plus the ``U``
unconstrained transfers. Buffers on a rank hold at most ``S`` = ``staging_bytes_per_rank //
expert_bytes`` values at once. So a round completes at most ``K + U`` constrained Recvs, ``K`` =
sum over ranks of min(S, the rank's constrained Recvs), and round 1 at most ``K`` (nothing is
free yet): ``rounds >= 1 + ceil((N - K) / (K + U))`` for N constrained Recvs. This is the
"N / S rounds" of a rank in a cycle of such transfers, summed over ranks.
"""

from __future__ import annotations

from collections import defaultdict

from eplb.ir.schedule import ScheduleLimits
from eplb.planner.schedule._parse import _ceil, _Layer


def staging_bound(layers: list[_Layer], limits: ScheduleLimits, expert_bytes: int) -> int:
    """Fewest rounds any schedule of ``layers`` needs for the staging budget (module docstring);
    0 without a budget or nothing constrained."""
    if limits.staging_bytes_per_rank is None:
        return 0
    budget = limits.staging_bytes_per_rank // expert_bytes
    per_rank: dict[int, int] = defaultdict(int)
    free = 0  # transfers not limited by staging
    for lay in layers:
        n = _constrained(lay, per_rank)
        free += sum(len(u.pairs) for u in lay.units) - n
    need = sum(per_rank.values())
    if need == 0:
        return 0
    k = sum(min(budget, n) for n in per_rank.values())
    if k + free == 0:
        return 1  # nothing can land: no schedule exists (`schedule` raises)
    return 1 + _ceil(max(0, need - k), k + free)


def _constrained(lay: _Layer, per_rank: dict[int, int]) -> int:
    """Count (into ``per_rank``, by receiving rank) the layer's staged Recvs whose every wanted
    slot a Send of the layer reads; return how many. Layers of several levels count none (their
    level count bounds them)."""
    if len(lay.units) != 1:
        return 0
    pairs = lay.units[0].pairs
    read = {(p.send.src_rank, p.send.src.index) for p in pairs if p.send.src.kind == "slot"}
    wants: dict[tuple[int, int], list[int]] = defaultdict(list)  # (rank, buffer) -> slots copied to
    for _, c in lay.copies:
        if c.src.kind == "buffer" and c.dst.kind == "slot":
            wants[(c.rank, c.src.index)].append(c.dst.index)
    n = 0
    for p in pairs:
        dst, r = p.recv.dst, p.recv.dst_rank
        if dst.kind != "buffer":
            continue
        slots = wants.get((r, dst.index))
        if slots and all((r, s) in read for s in slots):
            per_rank[r] += 1
            n += 1
    return n
