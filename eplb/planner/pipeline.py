"""One call from two placements to a verified schedule: `plan_migration`.

The sequence every caller needs (compile, schedule, verify), written once, so that no caller
forgets the proof or schedules under other limits than it verifies.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from contextlib import AbstractContextManager

from eplb.ir.placement import ModelPlacement
from eplb.ir.plan import MigrationPlan
from eplb.ir.schedule import Schedule, ScheduleLimits
from eplb.ir.topology import Topology
from eplb.planner.compile import compile_plan
from eplb.planner.schedule import schedule
from eplb.planner.verify import verify

__all__ = ["Limits", "plan_migration"]

# Fixed limits, limits derived from the compiled plan (its sizes), or None for the defaults.
Limits = ScheduleLimits | Callable[[MigrationPlan], ScheduleLimits] | None


def plan_migration(
    current: ModelPlacement,
    target: ModelPlacement,
    topology: Topology,
    expert_bytes: int,
    limits: Limits = None,
    *,
    phase: Callable[[str], AbstractContextManager[object]] | None = None,
) -> Schedule:
    """The verified schedule turning ``current`` into ``target`` on ``topology``.

    ``limits`` None: `eplb.planner.schedule.default_limits` for the plan; a callable gets the
    compiled plan and returns them. ``phase``, if given, is entered around each step with its
    name (``"compile"``, ``"schedule"``, ``"verify"``), for callers that time them. Raises
    `InvalidValueError` for placements that do not fit ``topology`` and `PlanError` when the
    plan cannot be scheduled under ``limits`` (or, a bug, the schedule does not verify).
    """
    step = phase or (lambda _name: contextlib.nullcontext())
    with step("compile"):
        plan = compile_plan(current, target, topology, expert_bytes)
    with step("schedule"):
        out = schedule(plan, limits(plan) if callable(limits) else limits)
    with step("verify"):
        verify(out)
    return out
