"""``eplb verify PLAN.json``: prove a schedule (exit 0) or list every violation (exit 1)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from eplb.cli._common import read_document
from eplb.ir.errors import PlanError
from eplb.ir.schedule import Schedule

__all__ = ["read_schedule", "register", "run"]


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "verify",
        help="prove a schedule correct or list every violation",
        description="Run the schedule on abstract slots: exit 0 if it reaches the target under its "
        "limits, 1 with every violation listed otherwise.",
    )
    p.add_argument("plan", help="schedule JSON written by `eplb plan`")
    p.set_defaults(func=run)


def read_schedule(path: str) -> Schedule:
    return read_document(path, Schedule, "schedule", "pass a schedule `eplb plan` wrote")


def run(args: argparse.Namespace) -> int:
    from eplb.planner.verify import verify

    sched = read_schedule(args.plan)
    try:
        verify(sched)
    except PlanError as exc:
        print(f"{args.plan}: {exc}", file=sys.stderr)
        return 1
    print(f"{args.plan}: OK ({sched.num_rounds} rounds, {sched.plan.transfers} transfers)")
    return 0
