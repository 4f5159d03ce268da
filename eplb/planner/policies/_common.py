"""Helpers every policy shares (private): the current placement's check, the hierarchy option,
the busiest rank's load, the spread rule, and arrays to `ModelPlacement`."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from eplb.ir.errors import InvalidValueError
from eplb.ir.placement import ModelPlacement
from eplb.ir.topology import Topology
from eplb.planner.metrics import slot_loads

F64 = npt.NDArray[np.float64]
I64 = npt.NDArray[np.int64]
B = npt.NDArray[np.bool_]


def to_model_placement(p2l: I64, num_ranks: int, num_logical_experts: int) -> ModelPlacement:
    """``[num_layers, num_physical_experts]`` ints -> `ModelPlacement` (Python ints convert ~10x
    faster than numpy scalars)."""
    return ModelPlacement.from_lists(
        p2l.tolist(), num_ranks=num_ranks, num_logical_experts=num_logical_experts
    )


def is_uniform_nodes(topology: Topology) -> bool:
    """Whether nodes hold equal, contiguous rank ranges (what the hierarchical greedy assumes)."""
    per_node = topology.num_ranks // topology.num_nodes
    return topology.num_ranks % topology.num_nodes == 0 and all(
        node == r // per_node for r, node in enumerate(topology.rank_to_node)
    )


def use_hierarchy(topology: Topology, num_groups: int, hierarchical: bool | None) -> bool:
    """Resolve the ``hierarchical`` option: None means 'when groups split evenly over nodes'."""
    nodes = topology.num_nodes
    possible = nodes > 1 and num_groups % nodes == 0 and is_uniform_nodes(topology)
    if hierarchical is None:
        return possible
    if hierarchical and not possible:
        raise InvalidValueError(
            "hierarchical",
            f"needs num_groups ({num_groups}) to be a multiple of num_nodes ({nodes}) on nodes of equal, "
            "contiguous rank ranges; pass hierarchical=False (or None to decide automatically).",
        )
    return bool(hierarchical)


def max_rank_load(load: F64, p2l: I64, num_ranks: int) -> F64:
    """``[num_layers]``: the busiest rank's load (`eplb.planner.metrics.slot_loads` summed per rank)."""
    return np.asarray(slot_loads(load, p2l).reshape(p2l.shape[0], num_ranks, -1).sum(axis=2).max(axis=1))


def check_current(current: ModelPlacement, load: F64, topology: Topology) -> None:
    """``current`` must describe this model on this cluster; the error names the mismatch."""
    num_l, num_e = load.shape
    for name, have, want, fix in (
        ("num_ranks", current.num_ranks, topology.num_ranks, "plan from scratch with current=None"),
        (
            "num_physical_experts",
            current.num_physical_experts,
            topology.num_physical_experts,
            "plan from scratch with current=None",
        ),
        ("num_logical_experts", current.num_logical_experts, num_e, "pass the load of the same model"),
        ("num_layers", current.num_layers, num_l, "pass one load row per MoE layer of the placement"),
    ):
        if have != want:
            source = "load" if name in ("num_logical_experts", "num_layers") else "topology"
            raise InvalidValueError(f"current.{name}", f"is {have} but the {source} has {want}; {fix}.")


def copies_per_rank(p2l: I64, num_logical_experts: int, num_ranks: int) -> I64:
    """``[E, R]`` copies of each expert on each rank (one layer, ``p2l: [P]``)."""
    cnt = np.zeros((num_logical_experts, num_ranks), dtype=np.int64)
    np.add.at(cnt, (p2l, np.arange(p2l.size) // (p2l.size // num_ranks)), 1)
    return cnt


def spread_breaks(
    p2l: I64, num_logical_experts: int, num_ranks: int, scope: int, current: I64 | None = None
) -> B:
    """``[E, R]``: cells where a rank holds more than ``ceil(replicas / scope)`` copies of an
    expert (``scope``: the ranks an expert may spread over). With ``current``, a cell the current
    placement already broke the rule in is excused while it holds no more copies than then
    (nothing moved there). One layer, ``p2l: [P]``."""
    cnt = copies_per_rank(p2l, num_logical_experts, num_ranks)
    bad: B = cnt > -(-cnt.sum(axis=1, keepdims=True) // scope)
    if current is not None:
        was = copies_per_rank(current, num_logical_experts, num_ranks)
        bad &= ~((was > -(-was.sum(axis=1, keepdims=True) // scope)) & (cnt <= was))
    return bad


def unstack(load: F64, p2l: I64, num_ranks: int, scope: int) -> I64 | None:
    """``p2l: [P]`` (one layer) with every copy the spread rule forbids swapped away: the stacked
    copy trades slots with a copy of another expert on a rank of the same scope (its node when
    ``scope < num_ranks``) that may take it, the pair whose busier rank ends lightest first. Each
    swap lowers the stacked copies by one, so it ends; None when some copy finds no partner."""
    out: I64 = p2l.copy()
    s = out.size // num_ranks
    rank_of = np.arange(out.size) // s
    num_e = load.size
    while True:
        cnt = copies_per_rank(out, num_e, num_ranks)
        counts = cnt.sum(axis=1)
        cap = -(-counts // scope)
        bad = np.argwhere(cnt > cap[:, None])
        if bad.size == 0:
            return out
        e, r = (int(x) for x in bad[0])
        share = load / np.maximum(counts, 1)
        loads = np.bincount(rank_of, weights=share[out], minlength=num_ranks)
        i = int(np.flatnonzero((out == e) & (rank_of == r))[0])
        q = rank_of
        f = out
        ok = (q // scope == r // scope) & (q != r) & (f != e) & (cnt[e, q] < cap[e]) & (cnt[f, r] < cap[f])
        if not ok.any():
            return None
        d = share[e] - share[f]
        worst = np.maximum(loads[r] - d, loads[q] + d)
        j = int(np.flatnonzero(ok)[np.argmin(worst[ok])])
        out[i], out[j] = out[j], out[i]
