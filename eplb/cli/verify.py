"""``eplb verify PLAN.json``: prove a schedule (exit 0) or list every violation (exit 1)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from eplb.cli._common import CliError, first_problem
from eplb.ir.errors import PlanError, SerdeError
from eplb.ir.schedule import Schedule
from eplb.ir.serde import loads

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
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise CliError(f"cannot read {path}: no such file.") from None
    except OSError as exc:
        raise CliError(f"cannot read {path}: {exc.strerror}; pass a schedule `eplb plan` wrote.") from None
    try:
        return loads(data, Schedule)
    except SerdeError as exc:
        raise CliError(
            f"{path} is not a schedule document: {first_problem(exc)}; pass a schedule `eplb plan` wrote."
        ) from None


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
