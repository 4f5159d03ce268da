"""``eplb plan``: compile and schedule a migration from a current to a target placement.

Writes the `Schedule` (which embeds its `MigrationPlan`) as JSON; ``eplb inspect`` and
``eplb verify`` read it.
"""

from __future__ import annotations

import argparse
import importlib
import json
from pathlib import Path
from typing import Any

from eplb.cli._common import CliError, write_atomic
from eplb.formats import read_json
from eplb.ir.errors import SerdeError
from eplb.ir.placement import ModelPlacement
from eplb.ir.schedule import ScheduleLimits
from eplb.ir.serde import dumps, loads
from eplb.ir.topology import Topology

__all__ = ["register", "run"]


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "plan",
        help="compile and schedule a migration between two placements",
        description="Compile current -> target into ops, group them into rounds under the limits, "
        "and write the schedule as JSON.",
    )
    p.add_argument("--current", required=True, help="placement JSON file, or 'trivial' (the seed's layout)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--target", help="placement JSON file")
    src.add_argument(
        "--load", help="load file [num_layers, num_logical_experts]; the target comes from --policy"
    )
    p.add_argument("--policy", help="policy name for --load (see eplb rebalance)")
    p.add_argument("--topology", help="topology JSON file (else --ranks / --nodes)")
    p.add_argument("--ranks", type=int, help="number of ranks (default: the larger placement's)")
    p.add_argument("--nodes", type=int, default=1, help="nodes, splitting ranks evenly (default 1)")
    p.add_argument("--expert-bytes", type=int, required=True, help="bytes of one expert's weights")
    p.add_argument("--max-peers", type=int, help="peers per rank per round (default: by link class)")
    p.add_argument("--max-ops", type=int, default=256, help="transfer ops per rank per group (default 256)")
    p.add_argument("--staging-bytes", type=int, help="staging memory per rank (default: one layer)")
    p.add_argument("--out", required=True, help="where to write the schedule JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from eplb.planner.compile import compile_plan
    from eplb.planner.schedule import default_limits, schedule
    from eplb.planner.verify import verify

    if args.expert_bytes <= 0:
        raise CliError(f"--expert-bytes must be > 0 (got {args.expert_bytes}).")
    topology = _read_topology(args.topology) if args.topology else None
    target = _read_placement(args.target, topology) if args.target else None
    current = None if args.current == "trivial" else _read_placement(args.current, topology)
    shape = target or current
    if topology is None:
        if shape is None:
            raise CliError("--current trivial with --load needs --topology to know the slots per rank.")
        ranks = args.ranks or max(p.num_ranks for p in (current, target) if p is not None)
        topology = Topology.uniform(ranks, shape.slots_per_rank, args.nodes)
    if target is None:
        target = _target_from_load(args, topology, current)
    if current is None:
        current = ModelPlacement.trivial(
            num_layers=target.num_layers,
            num_logical_experts=target.num_logical_experts,
            num_physical_experts=target.num_physical_experts,
            num_ranks=target.num_ranks,
        )
    plan = compile_plan(current, target, topology, args.expert_bytes)
    base = default_limits(plan)
    limits = ScheduleLimits(
        max_peers_per_round=args.max_peers if args.max_peers is not None else base.max_peers_per_round,
        max_ops_per_group=args.max_ops,
        staging_bytes_per_rank=args.staging_bytes
        if args.staging_bytes is not None
        else base.staging_bytes_per_rank,
    )
    sched = schedule(plan, limits)
    verify(sched)  # never write a plan that does not verify
    write_atomic(args.out, dumps(sched))
    print(f"wrote {args.out}: {sched}")
    return 0


def _read_topology(path: str) -> Topology:
    try:
        return loads(Path(path).read_text(), Topology)
    except FileNotFoundError:
        raise CliError(f"cannot read {path}: no such file.") from None
    except SerdeError as exc:
        raise CliError(f"{path} is not a topology document: {exc}") from None


def _read_placement(path: str, topology: Topology | None) -> ModelPlacement:
    """An IR ``model_placement`` document or a ``[layers][slots]`` JSON list."""
    doc = read_json(Path(path)) if path.endswith(".json") else None
    if isinstance(doc, dict):
        try:
            return loads(json.dumps(doc), ModelPlacement)
        except SerdeError as exc:
            raise CliError(f"{path} is not a placement document: {exc}") from None
    if isinstance(doc, list):
        if topology is None:
            raise CliError(f"{path} is a bare list of slots: pass --topology so the rank count is known.")
        slots = len(doc[0]) if doc and isinstance(doc[0], list) else 0
        return ModelPlacement.from_lists(doc, num_ranks=max(1, slots // topology.slots_per_rank))
    # eplb.formats.read_placement needs the expert count, which a bare file does not carry.
    raise CliError(f"cannot read {path}: use a JSON placement (eplb.ir.serde.dumps of a ModelPlacement).")


def _target_from_load(
    args: argparse.Namespace, topology: Topology, current: ModelPlacement | None
) -> ModelPlacement:
    rebalance_mod = _optional("eplb.planner.rebalance")
    if rebalance_mod is None:
        raise CliError("--load needs eplb.planner.rebalance, which this build lacks; pass --target instead.")
    formats = _optional("eplb.formats")
    reader = getattr(formats, "read_load", None)
    if reader is not None:
        load = reader(args.load)
    else:
        import numpy as np

        load = np.load(args.load) if args.load.endswith(".npy") else np.asarray(read_json(Path(args.load)))
    target = rebalance_mod.rebalance(load, topology, current=current, policy=args.policy)
    if not isinstance(target, ModelPlacement):
        raise CliError(f"policy {args.policy!r} returned {type(target).__name__}, not a ModelPlacement.")
    return target


def _optional(module: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError:
        return None
