"""One call from two placements to a verified schedule: `plan_migration`.

The sequence every caller needs (compile, schedule, verify), written once, so that no caller
forgets the proof or schedules under other limits than it verifies.
"""

from __future__ import annotations

from eplb.ir.placement import ModelPlacement
from eplb.ir.schedule import Schedule, ScheduleLimits
from eplb.ir.topology import Topology
from eplb.planner.compile import compile_plan
from eplb.planner.schedule import schedule
from eplb.planner.verify import verify

__all__ = ["plan_migration"]


def plan_migration(
    current: ModelPlacement,
    target: ModelPlacement,
    topology: Topology,
    expert_bytes: int,
    limits: ScheduleLimits | None = None,
) -> Schedule:
    """The verified schedule turning ``current`` into ``target`` on ``topology``.

    ``limits`` None: `eplb.planner.schedule.default_limits` for the plan. Raises
    `InvalidValueError` for placements that do not fit ``topology`` and `PlanError` when the
    plan cannot be scheduled under ``limits`` (or, a bug, the schedule does not verify).
    """
    plan = compile_plan(current, target, topology, expert_bytes)
    out = schedule(plan, limits)
    verify(out)
    return out
