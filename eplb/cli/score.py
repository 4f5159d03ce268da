"""``eplb score``: the balancedness of placements under a recorded load, to compare the placement
in force with a new one.

eplb score --load load.pt --model deepseek-v3 --ranks 32 \\
    --placement current.sglang.json --placement target.json
"""

from __future__ import annotations

import argparse
import json
from typing import Any

import attrs

from eplb.cli._common import CliError, add_layout_options, layout_from_args, require_positive

__all__ = ["register", "run", "score"]


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "score",
        help="balancedness of placements under a recorded load",
        description="Print the balancedness (model and worst layer) of each --placement under --load: "
        "mean over max rank load, 1.0 when every rank gets the same.",
    )
    p.add_argument("--load", required=True, help="load file (as eplb rebalance --load reads)")
    p.add_argument(
        "--placement",
        action="append",
        required=True,
        help="placement file (any format eplb reads); repeat to compare several",
    )
    p.add_argument(
        "--ranks",
        type=int,
        help="EP ranks, for placement files that do not record it (SGLang, TensorRT-LLM, .npy)",
    )
    add_layout_options(p, "load and placements")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.set_defaults(func=run)


def score(load: Any, placement: Any) -> dict[str, Any]:
    """Balancedness figures of ``placement`` under ``load`` and its worst layer's index."""
    from eplb.planner.metrics import balancedness, summarize

    m = summarize(load, placement)
    per_layer = balancedness(load, placement)
    return {**attrs.asdict(m, filter=lambda a, v: v is not None), "worst_layer": int(per_layer.argmin())}


def run(args: argparse.Namespace) -> int:
    from eplb.io import read_any_placement, read_load_file

    require_positive("--ranks", args.ranks)
    layout = layout_from_args(args)
    found = read_load_file(args.load, layout=layout)
    load = found.load
    rows = []
    for path in args.placement:
        placement = read_any_placement(
            path, num_ranks=args.ranks, num_logical_experts=load.shape[1], layout=layout
        )
        if placement.num_layers != load.shape[0] or placement.num_logical_experts != load.shape[1]:
            raise CliError(
                f"--placement {path} has {placement.num_layers} layers x {placement.num_logical_experts} "
                f"experts but --load has {load.shape[0]} x {load.shape[1]}; pass files of one model "
                "(--model / --moe-layers when one has a row per model layer)."
            )
        rows.append({"placement": path, **score(load, placement)})
    first = layout.first_moe if layout is not None else 0
    if args.json:
        doc = {"load": args.load, "notes": list(found.notes), "first_moe_layer": first, "placements": rows}
        print(json.dumps(doc, indent=1))
        return 0
    for note in found.notes:
        print(f"load: {note}")
    width = max(len(r["placement"]) for r in rows)
    print(f"{'placement':<{width}}  balancedness  worst layer (model layer)  upper bound")
    for r in rows:
        worst = f"{r['min_layer_balancedness']:.4f} ({r['worst_layer'] + first})"
        print(
            f"{r['placement']:<{width}}  {r['balancedness']:>12.4f}  {worst:>25}  "
            f"{r['balancedness_upper_bound']:>11.4f}"
        )
    return 0
