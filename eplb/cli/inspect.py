"""``eplb inspect PLAN.json``: per-layer table of a schedule and a total (``--json`` for tools)."""

from __future__ import annotations

import argparse
import json
from typing import Any

from eplb.cli._common import human_bytes, human_seconds
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
    layers = layer_costs(sched)
    return {
        "transfers": plan.transfers,
        # The copies the rounds run: direct landing drops some of the plan's.
        "local_copies": sum(row.local_copies for row in layers),
        "bytes_moved": plan.bytes_moved,
        "rounds": sched.num_rounds,
        "rounds_lower_bound": sched.rounds_lower_bound,
        "max_staging_bytes_per_rank": sched.staging_bytes_per_rank,
        "predicted_seconds": predict_seconds(sched),
        "limits": attrs.asdict(sched.limits),
        "layers": [attrs.asdict(row) for row in layers],
    }


def run(args: argparse.Namespace) -> int:
    sched = read_schedule(args.plan)
    doc = summary(sched)
    if args.json:
        print(json.dumps(doc, indent=1))
        return 0
    cols = [("layer", 5), ("transfers", 9), ("copies", 6), ("moved", 9), ("rounds", 6), ("bound", 5)]
    cols += [("staging", 7), ("time", 9)]
    print(" ".join(f"{name:>{width}}" for name, width in cols))
    for row in doc["layers"]:
        print(
            f"{row['layer']:>5} {row['transfers']:>9} {row['local_copies']:>6} "
            f"{human_bytes(row['bytes_moved']):>9} "
            f"{row['rounds']:>6} {row['rounds_lower_bound']:>5} {row['max_staging_buffers']:>7} "
            f"{human_seconds(row['predicted_seconds']):>9}"
        )
    print(
        f"{'total':>5} {doc['transfers']:>9} {doc['local_copies']:>6} {human_bytes(doc['bytes_moved']):>9} "
        f"{doc['rounds']:>6} {doc['rounds_lower_bound']:>5} "
        f"{human_bytes(doc['max_staging_bytes_per_rank']):>7} "
        f"{human_seconds(doc['predicted_seconds']):>9}"
    )
    lim = sched.limits
    peers = "all" if lim.max_peers_per_round is None else lim.max_peers_per_round
    staging = "none" if lim.staging_bytes_per_rank is None else human_bytes(lim.staging_bytes_per_rank)
    print(
        "staging column: buffers per rank (per layer); total: bytes per rank. Limits: "
        f"peers/round {peers}, ops/group {lim.max_ops_per_group}, staging {staging} per rank."
    )
    layer_sum = sum(row["predicted_seconds"] for row in doc["layers"])
    if layer_sum > doc["predicted_seconds"] * (1 + 1e-9):
        print(
            f"layers share rounds: the per-layer times add up to {human_seconds(layer_sum)}, more than the "
            f"total {human_seconds(doc['predicted_seconds'])}, because rounds move several layers at once."
        )
    return 0
