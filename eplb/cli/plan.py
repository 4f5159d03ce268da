"""``eplb plan``: compile and schedule a migration from a current to a target placement.

Writes the `Schedule` (which embeds its `MigrationPlan`) as JSON; ``eplb inspect`` and
``eplb verify`` read it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import attrs

from eplb.cli._common import (
    CliError,
    add_layout_options,
    check_not_input,
    check_writable,
    first_problem,
    layout_from_args,
    read_document,
    require_positive,
    write_atomic,
)
from eplb.io._raw import read_json
from eplb.io.layout import ModelLayout
from eplb.ir.errors import EplbError, PlanError
from eplb.ir.placement import ModelPlacement
from eplb.ir.plan import MigrationPlan
from eplb.ir.schedule import ScheduleLimits
from eplb.ir.serde import dumps
from eplb.ir.topology import Topology

__all__ = ["register", "run"]

# ScheduleLimits fields named in scheduler errors -> the options that set them.
_LIMIT_OPTIONS = {
    "staging_bytes_per_rank": "--staging-bytes",
    "max_peers_per_round": "--max-peers",
    "max_ops_per_group": "--max-ops",
}


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "plan",
        help="compile and schedule a migration between two placements",
        description="Compile current -> target into ops, group them into rounds under the limits, "
        "and write the schedule as JSON.",
    )
    p.add_argument(
        "--current", required=True, help="placement file, or 'trivial' (slot p holds expert p %% experts)"
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--target", help="placement file (eplb IR JSON, SGLang, TensorRT-LLM YAML, .npy, .pt)")
    src.add_argument(
        "--load", help="load file [num_layers, num_logical_experts]; the target comes from --policy"
    )
    p.add_argument("--policy", help="policy name for --load (see eplb rebalance)")
    p.add_argument("--topology", help="topology JSON file (else --ranks / --nodes)")
    p.add_argument("--ranks", type=int, help="number of ranks (default: the larger placement's)")
    p.add_argument("--nodes", type=int, default=None, help="nodes, splitting ranks evenly (default 1)")
    p.add_argument("--expert-bytes", type=int, required=True, help="bytes of one expert's weights")
    p.add_argument("--max-peers", type=int, help="peers per rank per round (default: by link class)")
    p.add_argument("--max-ops", type=int, default=256, help="transfer ops per rank per group (default 256)")
    p.add_argument("--staging-bytes", type=int, help="staging memory per rank (default: one layer)")
    p.add_argument(
        "--slots", type=int, help="physical expert slots per layer (with --current trivial --load)"
    )
    add_layout_options(p, "placement and load files")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a line")
    p.add_argument("--out", required=True, help="where to write the schedule JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from eplb.planner.pipeline import plan_migration
    from eplb.planner.schedule import default_limits

    for option in ("expert_bytes", "ranks", "nodes", "max_peers", "max_ops", "staging_bytes"):
        require_positive("--" + option.replace("_", "-"), getattr(args, option))
    if args.topology and (args.ranks is not None or args.nodes is not None):
        raise CliError("--topology gives the ranks and nodes; drop --ranks / --nodes or drop --topology.")
    if args.policy is not None and args.load is None:
        raise CliError("--policy picks the target for --load; drop it, or pass --load instead of --target.")
    check_writable(args.out)
    inputs = {"--current": args.current, "--target": args.target, "--load": args.load}
    check_not_input(args.out, {**inputs, "--topology": args.topology})
    if Path(args.out).suffix.lower() in (".npy", ".pt", ".yaml", ".yml"):
        raise CliError(f"--out {args.out}: a schedule is eplb IR JSON; name the file .json.")
    require_positive("--slots", args.slots)
    args.layout = layout_from_args(args)
    topology = _read_topology(args.topology) if args.topology else None
    current, target = _read_placements(args, topology)
    shape = target or current
    if topology is None:
        if shape is None:
            if args.slots is None or args.ranks is None:
                raise CliError(
                    "--current trivial with --load needs --ranks and --slots (or --topology) to know "
                    "the slots per rank."
                )
            if args.slots % args.ranks:
                raise CliError(
                    f"--slots ({args.slots}) must be a multiple of --ranks ({args.ranks}); "
                    f"use {args.slots - args.slots % args.ranks or args.ranks}."
                )
            topology = Topology.uniform(args.ranks, args.slots // args.ranks, args.nodes or 1)
        else:
            ranks = args.ranks or max(p.num_ranks for p in (current, target) if p is not None)
            topology = Topology.uniform(ranks, shape.slots_per_rank, args.nodes or 1)
    if target is None:
        target = _target_from_load(args, topology, current)
    if current is None:
        current = ModelPlacement.trivial(
            num_layers=target.num_layers,
            num_logical_experts=target.num_logical_experts,
            num_physical_experts=target.num_physical_experts,
            num_ranks=target.num_ranks,
        )
    def limits(plan: MigrationPlan) -> ScheduleLimits:
        base = default_limits(plan)
        return ScheduleLimits(
            max_peers_per_round=args.max_peers if args.max_peers is not None else base.max_peers_per_round,
            max_ops_per_group=args.max_ops,
            staging_bytes_per_rank=args.staging_bytes
            if args.staging_bytes is not None
            else base.staging_bytes_per_rank,
        )

    try:
        sched = plan_migration(current, target, topology, args.expert_bytes, limits)
    except PlanError as exc:  # scheduling or verification: never write a plan that does not verify
        reason = first_problem(exc)
        for name, option in _LIMIT_OPTIONS.items():
            reason = reason.replace(name, option)
        raise CliError(f"cannot schedule the migration under these limits: {reason}.") from None
    except EplbError as exc:  # compiling: the placements do not fit one another or the cluster
        reason = str(exc).splitlines()[0].rstrip(".")
        if current.num_layers != target.num_layers:
            reason += " (an SGLang map has a row per model layer: pass --model or --moe-layers)"
        raise CliError(
            f"cannot plan {args.current} -> {args.target or args.load}: {reason}; pass placements of one "
            "model for one cluster."
        ) from None
    plan = sched.plan
    write_atomic(args.out, dumps(sched))
    if args.json:
        from eplb.planner.cost import predict_seconds

        doc = {
            "wrote": args.out,
            "layers": plan.num_layers,
            "ranks": plan.topology.num_ranks,
            "transfers": plan.transfers,
            "local_copies": plan.local_copies,
            "bytes_moved": plan.bytes_moved,
            "rounds": sched.num_rounds,
            "rounds_lower_bound": sched.rounds_lower_bound,
            "predicted_seconds": predict_seconds(sched),
            "limits": attrs.asdict(sched.limits),
        }
        print(json.dumps(doc, indent=1))
        return 0
    print(f"wrote {args.out}: {sched}")
    return 0


def _read_topology(path: str) -> Topology:
    return read_document(path, Topology, "topology", "write it with eplb.ir.serde.dumps")


def _read_placements(
    args: argparse.Namespace, topology: Topology | None
) -> tuple[ModelPlacement | None, ModelPlacement | None]:
    """``(current, target)``; a file that does not record its rank count (SGLang, TensorRT-LLM,
    .npy) takes it from --ranks, --topology or the other file."""
    from eplb.io import RanksNeededError

    paths = [None if args.current == "trivial" else args.current, args.target]
    ranks = args.ranks if args.ranks is not None else (topology.num_ranks if topology else None)
    out: list[ModelPlacement | None] = [None, None]
    pending: list[int] = []
    for i, path in enumerate(paths):
        if path is not None:
            try:
                out[i] = _read_placement(path, topology, ranks, args.layout)
            except RanksNeededError:
                pending.append(i)
    for i in pending:
        known = next((p.num_ranks for p in out if p is not None), None)
        if known is None:
            raise CliError(
                f"{paths[i]} does not record the rank count; pass --ranks (the EP size it was made for)."
            )
        out[i] = _read_placement(str(paths[i]), topology, known, args.layout)
    return out[0], out[1]


def _read_placement(
    path: str, topology: Topology | None, num_ranks: int | None, layout: ModelLayout | None
) -> ModelPlacement:
    """Any placement file `eplb.io.read_any_placement` reads, or a ``[layers][slots]`` JSON list."""
    from eplb.io import read_any_placement

    doc = read_json(Path(path)) if path.lower().endswith(".json") else None
    if not isinstance(doc, list):
        return read_any_placement(path, num_ranks=num_ranks, layout=layout)
    if topology is None:
        raise CliError(f"{path} is a bare list of slots: pass --topology so the rank count is known.")
    slots = len(doc[0]) if doc and isinstance(doc[0], list) else 0
    try:
        return ModelPlacement.from_lists(doc, num_ranks=max(1, slots // topology.slots_per_rank))
    except (EplbError, TypeError) as exc:
        raise CliError(f"{path}: bad list of slots: {str(exc).splitlines()[0]}") from None


def _target_from_load(
    args: argparse.Namespace, topology: Topology, current: ModelPlacement | None
) -> ModelPlacement:
    from eplb.io import read_load
    from eplb.planner.entry import rebalance

    load = read_load(args.load, layout=args.layout)
    target = rebalance(load, topology, current=current, policy=args.policy)
    if not isinstance(target, ModelPlacement):
        raise CliError(f"policy {args.policy!r} returned {type(target).__name__}, not a ModelPlacement.")
    return target

