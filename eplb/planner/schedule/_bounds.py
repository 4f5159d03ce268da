"""Round lower bounds under the limits in force: transfer ops and peers per rank (`_Load`),
levels, and the staging budget (`staging_bound`).

The staging bound. A Recv the plan stages, whose every wanted slot is still read by a Send of
its layer, either stays staged (at most ``S`` = ``staging_bytes_per_rank // expert_bytes`` per
rank per round: they all hold a buffer at the end of the group) or lands directly in a slot whose
every Send ran in an earlier round (at most one per Send already run: each Send frees at most
one slot). Recvs landing in slots nothing reads are not limited (all may run in round 1). So with
``K`` = sum over ranks of min(S, its such Recvs) and ``U`` the others, the constrained transfers
done by round j grow at most as ``c_j <= c_{j-1} + K + done_{j-1}``: the fewest rounds that
reach every constrained Recv is a lower bound. It grows like log2(N / K): staging limits the
first rounds, not every round, when later rounds may land in slots already read.
"""

from __future__ import annotations

from collections import defaultdict

from eplb.ir.schedule import ScheduleLimits
from eplb.planner.schedule._parse import _Layer


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
    done = c = rounds = 0
    while c < need:
        rounds += 1
        new = min(need - c, k + done)
        if new == 0:
            return rounds  # no schedule exists (`schedule` raises); the bound stops here
        c += new
        done += new + (free if rounds == 1 else 0)
    return rounds


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
