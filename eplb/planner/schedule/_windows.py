"""Windows: consecutive (layer, level) units that share rounds, and one window's rounds built
(colouring, copies placed, staging pooled)."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

from eplb.ir.ops import Copy, Recv, Transfer
from eplb.ir.plan import MigrationPlan
from eplb.ir.schedule import ScheduleLimits
from eplb.planner.schedule._colour import _colour
from eplb.planner.schedule._parse import _ceil, _Layer, _Load, _Pair, _Unit
from eplb.planner.schedule._staging import _Built, _direct_landing, _rename_buffers

# Staging a window of several rounds holds, against the buffers its layers' plans name, after
# direct landing and early unstaging: 0.3-0.45 measured on DeepSeek-V3-shaped plans (bench/).
# Only picks first windows; `schedule` checks the real figure and splits windows over budget.
SPREAD_STAGING = 0.6


def _windows(
    units: list[_Unit], layers: list[_Layer], limits: ScheduleLimits, budget: int | None, *, spread: bool
) -> list[list[_Unit]]:
    """Consecutive units that share rounds: while the union's bound is no worse than the sum of
    the parts' and (with ``budget``) the staging their plans name fits it; with ``spread``, that
    staging times `SPREAD_STAGING` when the window takes more than one round (an estimate of
    direct landing, checked by `schedule` after building)."""
    windows: list[list[_Unit]] = []
    tally, t_bound = _Load.empty(), 0  # the open window's load and its bound
    w_bufs: dict[int, int] = defaultdict(int)
    w_layers: set[int] = set()
    for unit in units:
        u_bound = unit.load.bound(limits)
        bufs = layers[unit.layer].buffers if unit.layer not in w_layers else {}
        fits = (
            windows
            and unit.layer not in w_layers  # a layer's next level starts a new window
            and (new_bound := tally.bound_with(unit.load, limits, t_bound)) <= t_bound + u_bound
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
            tally, t_bound, w_bufs, w_layers = _Load.empty(), 0, defaultdict(int), set()
        t_bound = tally.bound_with(unit.load, limits, t_bound)
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
    *,
    preset: bool = False,
) -> _Built:
    """One window's rounds, its copies placed, its staging buffers pooled. The ``first`` window
    also runs the layers of copies only, before its first group. ``preset``: the pairs' rounds
    are given (`_pipelined_rounds`), in order, instead of coloured here.
    """
    pairs = [p for u in window for p in u.pairs]
    if preset:
        assignment = [p.round for p in pairs]
        n = max(assignment, default=-1) + 1
        order = list(range(n))
    else:
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
        opens: dict[int, int] = {}  # rank -> its first round of the unit (preset rounds only)
        for un in lay.units:
            if id(un) in here:
                for p in un.pairs:
                    for r in (p.send.src_rank, p.recv.dst_rank):
                        if last.get((un.level, r), -1) < p.round:
                            last[(un.level, r)] = p.round
                        if preset and opens.get(r, p.round + 1) > p.round:
                            opens[r] = p.round
        start = min(opens.values(), default=0)
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
                # Before the rank's first transfer of the layer (a copy only touches its rank):
                # with the whole plan in one window, round 0 would hold its buffer for long.
                before[opens.get(c.rank, start)].append(new)

    # --- transfers in a fixed order; both sides of a pair list them alike ----------------------
    transfers: list[list[Transfer]] = []
    for rnd in rounds:
        rnd.sort(key=lambda p: (p.send.layer, p.send.transfer_id))
        transfers.append([op for p in rnd for op in (p.send, recv_of.get(id(p), p.recv))])
    return _rename_buffers(before, transfers, after)


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


