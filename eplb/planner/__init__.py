"""Pure planning functions: policies (load -> target placement), compile (two placements ->
migration plan), schedule (plan -> rounds), verify (proof or PlanError), cost (predicted time),
and `plan_migration` (compile, schedule and verify in one call).

``eplb.planner.schedule`` and ``eplb.planner.verify`` are the modules (their functions are
``eplb.planner.schedule.schedule`` and ``eplb.planner.verify.verify``).

Nothing here imports torch or mutates its inputs, so N ranks can be simulated in one process.
"""

from eplb.planner import schedule, verify
from eplb.planner.compile import compile_plan
from eplb.planner.cost import predict_seconds
from eplb.planner.entry import make_topology, rebalance
from eplb.planner.pipeline import plan_migration
from eplb.planner.policies import available_policies, get_policy, register_policy
from eplb.planner.schedule import default_limits, rounds_lower_bound

__all__ = [
    "available_policies",
    "compile_plan",
    "default_limits",
    "get_policy",
    "make_topology",
    "plan_migration",
    "predict_seconds",
    "rebalance",
    "register_policy",
    "rounds_lower_bound",
    "schedule",
    "verify",
]
