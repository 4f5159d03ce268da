"""``eplb inspect PLAN.json``: per-layer table of a schedule and a total (``--json`` for tools)."""

from __future__ import annotations

import argparse
import json
from typing import Any

from eplb.cli.verify import read_schedule

__all__ = ["register", "run", "summary"]


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "inspect",
        help="per-layer transfers, copies, bytes, rounds, staging and predicted time of a schedule",
    )
    p.add_argument("plan", help="schedule JSON written by `eplb plan`")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.set_defaults(func=run)


def summary(sched: Any) -> dict[str, Any]:
    """The totals ``--json`` prints, with the per-layer rows under ``layers``."""
    import attrs

    from eplb.planner.cost import layer_costs, predict_seconds

    plan = sched.plan
    return {
        "transfers": plan.transfers,
        "local_copies": plan.local_copies,
        "bytes_moved": plan.bytes_moved,
        "rounds": sched.num_rounds,
        "rounds_lower_bound": sched.rounds_lower_bound,
        "max_staging_bytes_per_rank": sched.staging_bytes_per_rank,
        "predicted_seconds": predict_seconds(sched),
        "limits": str(sched.limits),
        "layers": [attrs.asdict(row) for row in layer_costs(sched)],
    }


def run(args: argparse.Namespace) -> int:
    doc = summary(read_schedule(args.plan))
    if args.json:
        print(json.dumps(doc, indent=1))
        return 0
    cols = [("layer", 5), ("transfers", 9), ("copies", 6), ("GB", 8), ("rounds", 6), ("bound", 5)]
    cols += [("staging", 7), ("ms", 9)]
    print(" ".join(f"{name:>{width}}" for name, width in cols))
    for row in doc["layers"]:
        print(
            f"{row['layer']:>5} {row['transfers']:>9} {row['local_copies']:>6} "
            f"{row['bytes_moved'] / 1e9:>8.3f} "
            f"{row['rounds']:>6} {row['rounds_lower_bound']:>5} {row['max_staging_buffers']:>7} "
            f"{row['predicted_seconds'] * 1e3:>9.3f}"
        )
    print(
        f"{'total':>5} {doc['transfers']:>9} {doc['local_copies']:>6} {doc['bytes_moved'] / 1e9:>8.3f} "
        f"{doc['rounds']:>6} {doc['rounds_lower_bound']:>5} {doc['max_staging_bytes_per_rank']:>6}B "
        f"{doc['predicted_seconds'] * 1e3:>9.3f}"
    )
    print(f"staging column: buffers per rank (per layer); total: bytes per rank. {doc['limits']}")
    return 0
