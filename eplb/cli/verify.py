"""``eplb verify PLAN.json``: prove a schedule (exit 0) or list every violation (exit 1)."""

from __future__ import annotations

import argparse
import json
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
    p.add_argument(
        "--json",
        action="store_true",
        help='print {"ok", "rounds", "transfers", "violations"} (same exit status)',
    )
    p.set_defaults(func=run)


def read_schedule(path: str) -> Schedule:
    return read_document(path, Schedule, "schedule", "pass a schedule `eplb plan` wrote")


def run(args: argparse.Namespace) -> int:
    from eplb.planner.verify import verify

    sched = read_schedule(args.plan)
    violations: list[str] = []
    try:
        verify(sched)
    except PlanError as exc:
        if not args.json:
            print(f"{args.plan}: {exc}", file=sys.stderr)
            return 1
        violations = [str(v) for v in exc.violations] or [exc.summary]
    if args.json:
        doc = {
            "plan": args.plan,
            "ok": not violations,
            "rounds": sched.num_rounds,
            "transfers": sched.plan.transfers,
            "violations": violations,
        }
        print(json.dumps(doc, indent=1))
        return 1 if violations else 0
    print(f"{args.plan}: OK ({sched.num_rounds} rounds, {sched.plan.transfers} transfers)")
    return 0
