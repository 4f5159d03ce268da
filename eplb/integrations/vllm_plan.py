"""The planning behind eplb's vLLM policy, as a pure function of what vLLM passes it.

vLLM calls ``rebalance_experts(weight, num_replicas, num_groups, num_nodes, num_ranks,
old_global_expert_indices)`` on every rank with the same input and commits the returned
``physical_to_logical: [num_layers, num_replicas]`` (CPU int64). `plan_for_vllm` maps that call
onto `eplb.planner.rebalance` and makes every input eplb can use into a plan:

- an old map of another width or holding -1 (after an elastic scale-up or -down): the slots of
  the ranks that remain keep their experts, holes are filled, then the policy edits that seed;
- ``num_groups`` that does not divide the expert count: planned without groups (eplb itself
  plans globally when the groups do not divide the nodes, as vLLM does);
- an all-zero load (vLLM's profile run): the placement in force is kept (uniform load if none);
- a load of another layer or expert count than the old map: planned without it.

Imports no vLLM; torch only to read and return tensors.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import attrs
import numpy as np
import numpy.typing as npt
import torch

from eplb.ir.placement import ModelPlacement
from eplb.ir.topology import Topology
from eplb.planner import metrics
from eplb.planner.entry import make_topology, rebalance

__all__ = ["VllmPlan", "plan_for_vllm", "seed_from_old"]

F64 = npt.NDArray[np.float64]
I64 = npt.NDArray[np.int64]


@attrs.frozen(kw_only=True)
class VllmPlan:
    """One rebalance: the new map, the placements on both sides and what the log line reports.

    ``physical_to_logical: [num_layers, num_replicas]`` int64. ``current`` is the placement in
    force when it had this width (None after an elastic change or without an old map).
    """

    physical_to_logical: I64 = attrs.field(eq=False, repr=False)
    policy: str
    current: ModelPlacement | None = attrs.field(repr=False)
    target: ModelPlacement = attrs.field(repr=False)
    topology: Topology = attrs.field(repr=False)
    balancedness_before: float | None
    balancedness_after: float
    slots_changed: int  # slots whose expert changes (new weights in that slot)
    num_slots: int
    planning_ms: float
    notes: tuple[str, ...] = ()

    def log_line(self) -> str:
        before = "n/a" if self.balancedness_before is None else f"{self.balancedness_before:.4f}"
        notes = f" ({'; '.join(self.notes)})" if self.notes else ""
        return (
            f"eplb rebalance: policy={self.policy} balancedness {before} -> {self.balancedness_after:.4f} "
            f"on the window, {self.slots_changed}/{self.num_slots} slots need new weights, "
            f"planning {self.planning_ms:.1f} ms{notes}"
        )


def _load_matrix(weight: Any, notes: list[str]) -> F64:
    arr = weight.detach().to("cpu", torch.float64).numpy() if isinstance(weight, torch.Tensor) else weight
    load = np.array(arr, dtype=np.float64)
    if load.ndim == 1:
        notes.append("1-D load read as one layer")
        load = load[None, :]
    elif load.ndim > 2:
        notes.append(f"load of shape {load.shape} summed over its leading axes")
        load = load.reshape(-1, *load.shape[-2:]).sum(axis=0)
    bad = ~np.isfinite(load) | (load < 0)
    if bad.any():
        notes.append(f"{int(bad.sum())} negative or non-finite load entries read as 0")
        load[bad] = 0.0
    return load


def _old_map(old: Any, num_l: int, notes: list[str]) -> I64 | None:
    if old is None:
        return None
    arr = old.detach().to("cpu").numpy() if isinstance(old, torch.Tensor) else old
    out = np.array(arr, dtype=np.int64)
    if out.ndim != 2 or out.shape[0] != num_l:
        notes.append(f"old map of shape {out.shape} does not fit {num_l} layers; planned without it")
        return None
    return out


def _is_full(p2l: I64, num_e: int) -> bool:
    """Every id in [0, num_e) and every expert held at least once in every layer."""
    if p2l.size == 0 or p2l.min() < 0 or p2l.max() >= num_e:
        return False
    return all(np.unique(row).size == num_e for row in p2l)


def seed_from_old(old: I64, load: F64, num_replicas: int) -> I64:
    """``[num_layers, num_replicas]``: the old map's surviving slots kept, every hole filled.

    Slot ``p`` survives when ``p < min(old width, num_replicas)`` and holds a valid expert: vLLM
    keeps slots per rank fixed across elastic changes, so the first ranks stay. Experts left
    without a slot take free slots (evicting surplus replicas, last slot first, if there are not
    enough); the remaining free slots go to the experts with most load per replica.
    """
    num_l, num_e = load.shape
    seed = np.full((num_l, num_replicas), -1, dtype=np.int64)
    width = min(old.shape[1], num_replicas)
    seed[:, :width] = old[:, :width]
    seed[(seed < 0) | (seed >= num_e)] = -1
    for layer in range(num_l):
        _fill_row(seed[layer], load[layer])
    return seed


def _fill_row(row: I64, load: F64) -> None:
    num_e = load.size
    counts = np.bincount(row[row >= 0], minlength=num_e)
    missing = [int(e) for e in np.flatnonzero(counts == 0)]
    free = [int(p) for p in np.flatnonzero(row < 0)]
    for p in range(row.size - 1, -1, -1):
        if len(free) >= len(missing):
            break
        if row[p] >= 0 and counts[row[p]] > 1:
            counts[row[p]] -= 1
            row[p] = -1
            free.append(p)
    free.sort()
    # Heaviest missing experts first, so they take the lowest free slots (deterministic).
    missing.sort(key=lambda e: (-load[e], e))
    for p, e in zip(free, missing, strict=False):  # len(free) >= len(missing)
        row[p] = e
        counts[e] += 1
    for p in free[len(missing) :]:
        e = int(np.argmax(load / counts))  # ties: lowest expert id
        row[p] = e
        counts[e] += 1


def _changed(old: I64 | None, new: I64) -> int:
    if old is None:
        return int(new.size)
    width = min(old.shape[1], new.shape[1])
    same = int((old[:, :width] == new[:, :width]).sum())
    return int(new.size) - same


def _before(load: F64, old: I64 | None, slots_per_rank: int) -> float | None:
    if old is None or not _is_full(old, load.shape[1]) or old.shape[1] % slots_per_rank:
        return None
    return metrics.model_balancedness(load, old, num_ranks=old.shape[1] // slots_per_rank)


def _starting_point(
    old: I64 | None, load: F64, num_ranks: int, num_replicas: int, notes: list[str]
) -> tuple[ModelPlacement | None, ModelPlacement | None]:
    """(the placement in force if it has this width, the placement the policy edits)."""
    num_e = load.shape[1]
    if old is None:
        return None, None
    if old.shape[1] == num_replicas and _is_full(old, num_e):
        current = ModelPlacement.from_lists(old, num_ranks=num_ranks, num_logical_experts=num_e)
        return current, current
    notes.append(
        f"elastic: old map {old.shape[1]} slots wide, or holding -1 or ids outside the load; "
        "surviving slots kept"
    )
    seed = seed_from_old(old, load, num_replicas)
    return None, ModelPlacement.from_lists(seed, num_ranks=num_ranks, num_logical_experts=num_e)


def plan_for_vllm(
    weight: Any,
    num_replicas: int,
    num_groups: int,
    num_nodes: int,
    num_ranks: int,
    old_global_expert_indices: Any = None,
    *,
    policy: str = "migration_aware",
    options: Mapping[str, Any] | None = None,
) -> VllmPlan:
    """eplb's plan for one vLLM ``rebalance_experts`` call (arguments in vLLM's order).

    ``weight: [num_layers, num_logical_experts]``; ``old_global_expert_indices:
    [num_layers, P_old]`` or None. Raises what `eplb.planner.rebalance` raises on input no plan
    fits (for example fewer slots than experts); the vLLM policy class falls back on that.
    """
    start = time.perf_counter()
    notes: list[str] = []
    load = _load_matrix(weight, notes)
    num_l, num_e = load.shape
    nodes = num_nodes if num_nodes > 0 and num_ranks % num_nodes == 0 else 1
    topology = make_topology(num_ranks, num_replicas, nodes)
    groups = num_groups if num_groups > 0 and num_e % num_groups == 0 else 1
    if groups != num_groups:
        notes.append(f"num_groups={num_groups} does not divide {num_e} experts; planned without groups")
    old = _old_map(old_global_expert_indices, num_l, notes)
    current, base = _starting_point(old, load, num_ranks, num_replicas, notes)
    if not load.any() and base is not None:
        notes.append("all-zero load: placement kept")
        target = base
    else:
        if not load.any():
            notes.append("all-zero load: planned for a uniform load")
        plan_load = load if load.any() else np.ones_like(load)
        opts = dict(options or {})
        target = rebalance(plan_load, topology, num_groups=groups, current=base, policy=policy, **opts)
    p2l = np.ascontiguousarray(target.to_numpy(), dtype=np.int64)
    return VllmPlan(
        physical_to_logical=p2l,
        policy=policy,
        current=current,
        target=target,
        topology=topology,
        balancedness_before=_before(load, old, topology.slots_per_rank),
        balancedness_after=metrics.model_balancedness(load, p2l, num_ranks=num_ranks),
        slots_changed=_changed(old, p2l),
        num_slots=int(p2l.size),
        planning_ms=(time.perf_counter() - start) * 1e3,
        notes=tuple(notes),
    )
