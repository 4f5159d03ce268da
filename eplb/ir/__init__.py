"""The migration IR: value types only (attrs, no torch).

Start here: `Placement` / `ModelPlacement` (which expert each slot holds), `Topology` (the
cluster), ops `Send` / `Recv` / `Copy` on rank-local locations `Loc`, `MigrationPlan` (ops per
layer) and `Schedule` (the ops in rounds). `serde.dumps` / `serde.loads` read and write JSON.
"""

from eplb.ir.errors import EplbError, InvalidValueError, PlanError, SerdeError, Violation
from eplb.ir.ops import Copy, Loc, Op, Recv, Send, Transfer
from eplb.ir.placement import ModelPlacement, Placement
from eplb.ir.plan import LayerPlan, MigrationPlan
from eplb.ir.schedule import Round, Schedule, ScheduleLimits
from eplb.ir.serde import dumps, loads
from eplb.ir.topology import Bandwidth, LinkClass, Topology, Transport

__all__ = [
    "Bandwidth",
    "Copy",
    "EplbError",
    "InvalidValueError",
    "LayerPlan",
    "LinkClass",
    "Loc",
    "MigrationPlan",
    "ModelPlacement",
    "Op",
    "Placement",
    "PlanError",
    "Recv",
    "Round",
    "Schedule",
    "ScheduleLimits",
    "Send",
    "SerdeError",
    "Topology",
    "Transfer",
    "Transport",
    "Violation",
    "dumps",
    "loads",
]
