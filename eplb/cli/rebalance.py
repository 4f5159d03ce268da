"""``eplb rebalance``: recorded load in, a target placement file out, its metrics printed.

eplb rebalance --load load.json --ranks 32 --slots 288 --nodes 4 --groups 8 --out placement.json
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import attrs

from eplb.cli._common import (
    CliError,
    add_layout_options,
    check_not_input,
    check_writable,
    layout_from_args,
    output_format,
    require_positive,
    write_atomic,
)
from eplb.io import PLACEMENT_FORMATS, placement_bytes, read_any_placement, read_load_file
from eplb.io.layout import ModelLayout
from eplb.ir.placement import ModelPlacement
from eplb.planner.entry import make_topology, rebalance
from eplb.planner.metrics import summarize
from eplb.planner.policies import available_policies

__all__ = ["register", "run"]


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "rebalance",
        help="compute a target placement from recorded expert load",
        description="Compute a target expert placement from recorded load [layers, experts] and "
        "print its balancedness (and slots moved when --current is given).",
    )
    p.add_argument(
        "--load",
        required=True,
        help="load [layers, experts]: .json, .npy or .pt (a tensor or an SGLang expert-distribution dump)",
    )
    p.add_argument("--ranks", type=int, required=True, help="EP ranks (GPUs)")
    p.add_argument(
        "--slots",
        type=int,
        required=True,
        help="physical expert slots per layer, all ranks together (a multiple of --ranks)",
    )
    p.add_argument("--nodes", type=int, default=1, help="nodes the ranks span (default 1)")
    p.add_argument(
        "--groups", type=int, default=1, help="expert groups for group-limited routing (default 1)"
    )
    p.add_argument(
        "--policy",
        choices=available_policies(),
        default=None,
        help="default: balanced, or migration_aware with --current",
    )
    p.add_argument(
        "--current",
        help="placement in force (eplb IR JSON, SGLang, TensorRT-LLM YAML, .npy, .pt, or 'trivial': "
        "slot p holds expert p %% experts): plan few moves from it",
    )
    p.add_argument(
        "--tolerance",
        type=float,
        default=None,
        help="migration_aware: balancedness points to give up for fewer moves (default 0.005)",
    )
    p.add_argument(
        "--global",
        dest="hierarchical",
        action="store_false",
        default=None,
        help="balanced/migration_aware: ignore the node hierarchy (better balance)",
    )
    p.add_argument("--expert-bytes", type=int, default=None, help="bytes per expert, to print bytes moved")
    p.add_argument(
        "--format",
        choices=PLACEMENT_FORMATS,
        default=None,
        help="output file format (default: from --out's extension: .json ir, .sglang.json sglang, "
        ".yaml trtllm, .npy, .pt): sglang for --init-expert-location, trtllm for TensorRT-LLM's "
        "load-balancer YAML",
    )
    add_layout_options(p, "load, --current and engine output")
    p.add_argument(
        "--layer-updates-per-iter",
        type=int,
        default=0,
        help="trtllm output: TensorRT-LLM's layer_updates_per_iter (0, the default: static placement)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the report")
    p.add_argument("--out", required=True, help="output placement file")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    for option in ("ranks", "slots", "nodes", "groups", "expert_bytes"):
        require_positive("--" + option.replace("_", "-"), getattr(args, option))
    check_writable(args.out)
    check_not_input(args.out, {"--load": args.load, "--current": args.current})
    fmt = output_format(args.out, args.format, PLACEMENT_FORMATS)
    if args.layer_updates_per_iter < 0:
        raise CliError(f"--layer-updates-per-iter must be >= 0 (got {args.layer_updates_per_iter}).")
    if args.layer_updates_per_iter and fmt != "trtllm":
        raise CliError(
            "--layer-updates-per-iter is written to TensorRT-LLM's YAML only; pass --format trtllm."
        )
    layout = layout_from_args(args)
    found = read_load_file(args.load, layout=layout)
    load = found.load
    topology = make_topology(args.ranks, args.slots, args.nodes)
    current = None
    if args.current == "trivial":
        current = ModelPlacement.trivial(
            num_layers=load.shape[0],
            num_logical_experts=load.shape[1],
            num_physical_experts=args.slots,
            num_ranks=args.ranks,
        )
    elif args.current:
        current = read_any_placement(
            args.current, num_ranks=args.ranks, num_logical_experts=load.shape[1], layout=layout
        )
        if (current.num_ranks, current.num_physical_experts) != (args.ranks, args.slots):
            raise CliError(
                f"--current {args.current} is a placement of {current.num_physical_experts} slots on "
                f"{current.num_ranks} ranks, not --slots {args.slots} on --ranks {args.ranks}; pass the "
                "placement in force on this cluster, or drop --current to plan from scratch."
            )
    options: dict[str, Any] = {}
    policy = args.policy or ("balanced" if current is None else "migration_aware")
    if args.tolerance is not None:
        if policy != "migration_aware":
            raise CliError(
                f"--tolerance applies to migration_aware, not {policy}; drop it or pass --current."
            )
        options["tolerance"] = args.tolerance
    if args.hierarchical is False:
        if policy == "deepseek":
            raise CliError("--global does not apply to deepseek (it decides by --groups % --nodes); drop it.")
        options["hierarchical"] = False
    target = rebalance(load, topology, num_groups=args.groups, current=current, policy=policy, **options)
    m = summarize(load, target, current=current, expert_bytes=args.expert_bytes)
    data = placement_bytes(
        target, fmt, layout=layout, layer_updates_per_iter=args.layer_updates_per_iter
    )
    write_atomic(args.out, data)
    now = None if current is None else summarize(load, current)
    numbering = _numbering(fmt, layout, target.num_layers)
    if args.json:
        doc: dict[str, Any] = {
            "policy": policy,
            "notes": list(found.notes),
            "shape": {
                "layers": load.shape[0],
                "logical_experts": load.shape[1],
                "slots": args.slots,
                "ranks": args.ranks,
                "nodes": args.nodes,
                "groups": args.groups,
            },
            "target": attrs.asdict(m),
            "current": None if now is None else attrs.asdict(now),
            "wrote": args.out,
            "format": fmt,
            "first_model_layer": layout.first_moe if layout is not None and fmt not in ("ir", "npy") else 0,
        }
        print(json.dumps(doc, indent=1))
        return 0
    print(f"policy              {policy}")
    for note in found.notes:
        print(f"load                {note}")
    print(
        f"shape               {load.shape[0]} layers x {load.shape[1]} experts -> {args.slots} slots on "
        f"{args.ranks} ranks, {args.nodes} node(s), {args.groups} group(s)"
    )
    for line in m.lines():
        print(line)
    if now is not None:
        print(
            f"current             balancedness {now.balancedness:.4f} (model; worst layer "
            f"{now.min_layer_balancedness:.4f}) under this load"
        )
    print(f"wrote               {args.out} ({fmt}{numbering})", file=sys.stdout)
    return 0


def _numbering(fmt: str, layout: ModelLayout | None, num_moe_layers: int) -> str:
    if fmt in ("ir", "npy") or layout is None or not layout.first_moe:
        return ""
    k = layout.first_moe
    return f", MoE layers as model layers {k}-{k + num_moe_layers - 1}"
