"""``eplb.planner.entry``: the planner's front door, `rebalance`. Validates everything once, then
runs one policy. (The module is not named after the function, which `eplb.planner` exports.)

    load [num_layers, num_logical_experts] ─┐
    topology, num_groups, current ──────────┴─► policy ─► target ModelPlacement

Bad input raises `InvalidValueError` (value, rule, fix) before any policy runs, so nothing is
half-computed.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable
from typing import Any

from eplb.ir.errors import EplbError, InvalidValueError
from eplb.ir.placement import ModelPlacement
from eplb.ir.topology import Topology
from eplb.planner.load import as_load_matrix
from eplb.planner.policies import get_policy
from eplb.planner.policies._common import check_current

__all__ = ["make_topology", "rebalance"]


def make_topology(num_ranks: int, num_physical_experts: int, num_nodes: int = 1) -> Topology:
    """A uniform topology from the counts engines are configured with (ranks, total slots, nodes)."""
    for name, value in (
        ("num_ranks", num_ranks),
        ("num_physical_experts", num_physical_experts),
        ("num_nodes", num_nodes),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise InvalidValueError(name, f"must be an int > 0 (got {value!r}).")
    if num_physical_experts % num_ranks:
        lo = num_physical_experts // num_ranks * num_ranks
        hint = " or ".join(str(x) for x in (lo, lo + num_ranks) if x > 0)
        raise InvalidValueError(
            "num_physical_experts",
            f"({num_physical_experts}) must be a multiple of num_ranks ({num_ranks}); use {hint}.",
        )
    return Topology.uniform(num_ranks, num_physical_experts // num_ranks, num_nodes)


def rebalance(
    load: Any,
    topology: Topology,
    *,
    num_groups: int = 1,
    current: ModelPlacement | None = None,
    policy: str | Callable[..., ModelPlacement] | None = None,
    **options: Any,
) -> ModelPlacement:
    """A target placement for ``load: [num_layers, num_logical_experts]`` on ``topology``.

    ``policy`` is a registered name or a policy callable; default ``balanced`` without
    ``current`` and ``migration_aware`` with it. ``options`` go to the policy (unknown ones raise).
    """
    arr = as_load_matrix(load)
    num_e = arr.shape[1]
    num_p = topology.num_physical_experts
    if num_e > num_p:
        raise InvalidValueError(
            "load",
            f"has {num_e} experts but the topology has only {num_p} slots ({topology.num_ranks} ranks x "
            f"{topology.slots_per_rank}); every expert needs a slot: use at least "
            f"{-(-num_e // topology.num_ranks)} slots per rank.",
        )
    _check_fits_in_memory(arr.shape[0], num_p)
    if isinstance(num_groups, bool) or not isinstance(num_groups, int) or num_groups <= 0:
        raise InvalidValueError("num_groups", f"must be an int > 0 (got {num_groups!r}); 1 means no groups.")
    if num_e % num_groups:
        divisors = [g for g in range(1, num_e + 1) if num_e % g == 0 and abs(g - num_groups) <= num_groups]
        raise InvalidValueError(
            "num_groups",
            f"({num_groups}) must divide num_logical_experts ({num_e}); use one of {divisors[-4:]} "
            "(the model's n_group), or 1.",
        )
    if current is not None:
        if not isinstance(current, ModelPlacement):
            raise InvalidValueError("current", f"must be a ModelPlacement (got {type(current).__name__}).")
        check_current(current, arr, topology)
    name = policy if policy is not None else ("balanced" if current is None else "migration_aware")
    fn = get_policy(name) if isinstance(name, str) else name
    _check_options(fn, options)
    result = fn(arr, topology, num_groups=num_groups, current=current, **options)
    label = name if isinstance(name, str) else getattr(fn, "__qualname__", repr(fn))
    if not isinstance(result, ModelPlacement):
        raise EplbError(f"policy {label!r} returned {type(result).__name__}, not a ModelPlacement.")
    shape = (result.num_layers, result.num_logical_experts, result.num_physical_experts, result.num_ranks)
    want = (arr.shape[0], num_e, num_p, topology.num_ranks)
    if shape != want:
        raise EplbError(
            f"policy {label!r} returned (layers, experts, slots, ranks) = {shape}, expected {want}."
        )
    return result


# Peak memory of planning one slot: `balanced` and `deepseek` at 720,000 slots (1 layer, 8 ranks,
# 256 experts) peaked at 2.1 KB per slot on the dev box (2026-12-02).
_BYTES_PER_SLOT = 2200


def _physical_memory() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not on this platform
        return None


def _check_fits_in_memory(num_layers: int, num_physical_experts: int) -> None:
    """Refuse, before any work, a plan whose working memory exceeds this machine's RAM."""
    have = _physical_memory()
    need = num_layers * num_physical_experts * _BYTES_PER_SLOT
    if have is not None and need > have:
        most = max(1, have // (_BYTES_PER_SLOT * num_layers))
        raise InvalidValueError(
            "num_physical_experts",
            f"({num_physical_experts} slots x {num_layers} layers) needs about {need / 2**30:.1f} GiB "
            f"to plan (~{_BYTES_PER_SLOT} bytes a slot) but this machine has {have / 2**30:.1f} GiB; "
            f"use at most {most} slots per layer (engines use the expert count plus a few per rank).",
        )


def _check_options(fn: Callable[..., ModelPlacement], options: dict[str, Any]) -> None:
    params = inspect.signature(fn).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    accepted = sorted(
        n
        for n, p in params.items()
        if p.kind is inspect.Parameter.KEYWORD_ONLY and n not in ("num_groups", "current")
    )
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise InvalidValueError(
            "options",
            f"{unknown} are not options of policy {getattr(fn, '__name__', fn)!r}; "
            f"it accepts {accepted or 'none'}.",
        )
