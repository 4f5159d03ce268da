"""``eplb diff A B``: what changed between two placements, or between two plans / schedules.

Placements (any format `eplb.io` reads; ``--ranks`` for files that do not record it): per
layer, slots whose expert changed, slots that must receive weights from another rank, experts
whose replica count changed; per rank, the same summed over layers and the (layer, expert) pairs
it gains and drops. Plans or schedules (IR JSON): whether they start and end at the same
placements, their totals side by side (transfers, bytes, rounds, predicted time), and per layer
and per rank the transfers and bytes of each. Only rows that differ are printed unless ``--all``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from eplb.cli._common import CliError, add_layout_options, first_problem

__all__ = ["diff_placements", "diff_schedules", "register", "run"]


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "diff",
        help="what changed between two placements or two plans, per layer and per rank",
        description="Compare two placements (eplb IR JSON, SGLang JSON, TensorRT-LLM YAML, .npy, .pt) or two "
        "plans / schedules (eplb IR JSON): per layer and per rank. Exit 0, or with --exit-code 1 when they "
        "differ; 2 on bad input.",
    )
    p.add_argument("a", help="first placement, plan or schedule file")
    p.add_argument("b", help="second file, of the same kind")
    p.add_argument(
        "--ranks",
        type=int,
        default=None,
        help="EP ranks, for placement files that do not record it (SGLang, TensorRT-LLM, .npy)",
    )
    add_layout_options(p, "placement files")
    p.add_argument(
        "--all", action="store_true", help="print every layer and rank, not only those that differ"
    )
    p.add_argument("--exit-code", action="store_true", help="exit 1 when A and B differ (like git diff)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    p.set_defaults(func=run)


def _read(path: str, num_ranks: int | None, layout: Any = None) -> tuple[str, Any]:
    """``("placement" | "schedule", value)``; a MigrationPlan counts as a schedule-less plan."""
    from eplb.io import read_any_placement
    from eplb.ir.errors import SerdeError
    from eplb.ir.placement import ModelPlacement
    from eplb.ir.schedule import Schedule
    from eplb.ir.serde import loads

    p = Path(path)
    if p.is_dir():
        raise CliError(f"cannot read {p}: it is a folder; name a placement, plan or schedule file.")
    if not p.is_file():
        raise CliError(f"cannot read {p}: no such file; check the path.")
    if p.suffix.lower() == ".json":
        try:
            doc = json.loads(p.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CliError(f"{p} is not valid JSON ({exc}); pass a placement or plan file.") from None
        kind = doc.get("type") if isinstance(doc, dict) else None
        if kind in ("schedule", "migration_plan"):
            try:
                value: Any = loads(p.read_bytes())
            except SerdeError as exc:
                raise CliError(
                    f"{p} is not a valid {kind} document: {first_problem(exc)}; regenerate it with eplb plan."
                ) from None
            return ("schedule" if isinstance(value, Schedule) else "plan"), value
        if kind is not None and kind != "model_placement":
            raise CliError(f"{p} is a {kind!r} document; diff compares placements, plans or schedules.")
    value = read_any_placement(p, num_ranks=num_ranks, layout=layout)
    assert isinstance(value, ModelPlacement)
    return "placement", value


def _num_ranks(value: Any) -> int:
    from eplb.ir.placement import ModelPlacement
    from eplb.ir.schedule import Schedule

    if isinstance(value, ModelPlacement):
        return value.num_ranks
    plan = value.plan if isinstance(value, Schedule) else value
    return int(plan.topology.num_ranks)


def _same_shape(a: Any, b: Any, what: str) -> None:
    for name in ("num_layers", "num_logical_experts", "num_physical_experts", "num_ranks"):
        x, y = getattr(a, name), getattr(b, name)
        if x != y:
            raise CliError(
                f"{what} differ in {name}: A has {x}, B has {y}; diff compares {what} of one model on one "
                "cluster (pass --ranks if a file does not record its rank count"
                + (
                    ", and --model or --moe-layers when one has a row per model layer, e.g. an SGLang map)."
                    if name == "num_layers"
                    else ")."
                )
            )


def diff_placements(a: Any, b: Any) -> dict[str, Any]:
    """Per-layer and per-rank changes from placement ``a`` to ``b`` (same shape)."""
    from eplb.planner.metrics import transfer_mask

    _same_shape(a, b, "placements")
    pa, pb = a.to_numpy(), b.to_numpy()
    changed = pa != pb
    receive = np.asarray(transfer_mask(a, b), dtype=bool)
    rc_a, rc_b = a.replica_count_array(), b.replica_count_array()
    num_l, num_p = pa.shape
    s, r, e = a.slots_per_rank, a.num_ranks, a.num_logical_experts
    rank_of = np.arange(num_p) // s
    # held[l, rank, expert]: the rank holds at least one replica.
    held_a = np.zeros((num_l, r, e), dtype=bool)
    held_b = np.zeros((num_l, r, e), dtype=bool)
    rows = np.arange(num_l)[:, None]
    held_a[rows, rank_of[None, :], pa] = True
    held_b[rows, rank_of[None, :], pb] = True
    layers = [
        {
            "layer": layer,
            "slots_changed": int(changed[layer].sum()),
            "slots_to_receive": int(receive[layer].sum()),
            "replica_counts_changed": int((rc_a[layer] != rc_b[layer]).sum()),
        }
        for layer in range(num_l)
    ]
    ranks = [
        {
            "rank": q,
            "slots_changed": int(changed[:, rank_of == q].sum()),
            "slots_to_receive": int(receive[:, rank_of == q].sum()),
            "experts_gained": int((held_b[:, q] & ~held_a[:, q]).sum()),
            "experts_dropped": int((held_a[:, q] & ~held_b[:, q]).sum()),
        }
        for q in range(r)
    ]
    return {
        "kind": "placement",
        "identical": not changed.any(),
        "shape": {"layers": num_l, "logical_experts": e, "slots": num_p, "ranks": r},
        "slots_changed": int(changed.sum()),
        "slots_to_receive": int(receive.sum()),
        "layers_changed": sum(1 for row in layers if row["slots_changed"]),
        "layers": layers,
        "ranks": ranks,
    }


def _plan_figures(value: Any) -> dict[str, Any]:
    from eplb.ir.ops import Send
    from eplb.ir.schedule import Schedule

    plan = value.plan if isinstance(value, Schedule) else value
    r = plan.topology.num_ranks
    sent = np.zeros(r, dtype=np.int64)
    recv = np.zeros(r, dtype=np.int64)
    for op in plan.ops():
        if isinstance(op, Send):
            sent[op.src_rank] += plan.expert_bytes
            recv[op.dst_rank] += plan.expert_bytes
    out: dict[str, Any] = {
        "transfers": plan.transfers,
        "local_copies": plan.local_copies,
        "bytes_moved": plan.bytes_moved,
        "layer_transfers": [lp.transfers for lp in plan.layers],
        "rank_bytes_sent": sent.tolist(),
        "rank_bytes_received": recv.tolist(),
    }
    if isinstance(value, Schedule):
        from eplb.planner.cost import predict_seconds

        rounds_of = [set() for _ in range(plan.num_layers)]  # type: list[set[int]]
        for k, rnd in enumerate(value.rounds):
            for op in rnd.ops():
                rounds_of[op.layer].add(k)
        out |= {
            "rounds": value.num_rounds,
            "rounds_lower_bound": value.rounds_lower_bound,
            "staging_bytes_per_rank": value.staging_bytes_per_rank,
            "predicted_seconds": predict_seconds(value),
            "layer_rounds": [len(x) for x in rounds_of],
        }
    return out


def diff_schedules(a: Any, b: Any) -> dict[str, Any]:
    """Totals, per-layer and per-rank figures of two plans or schedules of one model and cluster."""
    from eplb.ir.schedule import Schedule

    pa = a.plan if isinstance(a, Schedule) else a
    pb = b.plan if isinstance(b, Schedule) else b
    _same_shape(pa.target, pb.target, "plans")
    if pa.topology != pb.topology:
        raise CliError(
            f"the plans are for different clusters: A {pa.topology}, B {pb.topology}; "
            "diff compares plans for one cluster."
        )
    fa, fb = _plan_figures(a), _plan_figures(b)
    total_keys = ["transfers", "local_copies", "bytes_moved"]
    if isinstance(a, Schedule) and isinstance(b, Schedule):
        total_keys += ["rounds", "rounds_lower_bound", "staging_bytes_per_rank", "predicted_seconds"]
    layers = []
    for layer in range(pa.num_layers):
        row: dict[str, Any] = {
            "layer": layer,
            "transfers": [fa["layer_transfers"][layer], fb["layer_transfers"][layer]],
        }
        if "layer_rounds" in fa and "layer_rounds" in fb:
            row["rounds"] = [fa["layer_rounds"][layer], fb["layer_rounds"][layer]]
        layers.append(row)
    ranks = [
        {
            "rank": q,
            "bytes_sent": [fa["rank_bytes_sent"][q], fb["rank_bytes_sent"][q]],
            "bytes_received": [fa["rank_bytes_received"][q], fb["rank_bytes_received"][q]],
        }
        for q in range(pa.topology.num_ranks)
    ]
    targets = diff_placements(pa.target, pb.target)
    return {
        "kind": "plan",
        "same_current": pa.current == pb.current,
        "same_target": targets["identical"],
        "target_slots_changed": targets["slots_changed"],
        "identical": a == b,
        "totals": {k: [fa[k], fb[k]] for k in total_keys},
        "layers": layers,
        "ranks": ranks,
    }


def _differs(row: dict[str, Any]) -> bool:
    for key, value in row.items():
        if key in ("layer", "rank"):
            continue
        if isinstance(value, list) and value[0] != value[1]:
            return True
        if isinstance(value, int) and value:
            return True
    return False


def run(args: argparse.Namespace) -> int:
    if args.ranks is not None and args.ranks <= 0:
        raise CliError(f"--ranks must be > 0 (got {args.ranks}).")
    from eplb.cli._common import layout_from_args
    from eplb.io import RanksNeededError

    layout = layout_from_args(args)
    try:
        kind_a, a = _read(args.a, args.ranks, layout)
    except RanksNeededError:
        # B may record the rank count (eplb IR JSON); A was made for the same cluster.
        kind_b, b = _read(args.b, args.ranks, layout)
        kind_a, a = _read(args.a, _num_ranks(b), layout)
    else:
        kind_b, b = _read(args.b, args.ranks if args.ranks is not None else _num_ranks(a), layout)
    if (kind_a == "placement") != (kind_b == "placement"):
        raise CliError(f"{args.a} is a {kind_a} and {args.b} a {kind_b}; diff two placements or two plans.")
    doc = diff_placements(a, b) if kind_a == "placement" else diff_schedules(a, b)
    if args.json:
        print(json.dumps(doc, indent=1))
    else:
        _print(doc, args)
    return 1 if args.exit_code and not doc["identical"] else 0


def _cell(value: Any) -> str:
    return f"{value[0]} -> {value[1]}" if isinstance(value, list) else str(value)


def _print(doc: dict[str, Any], args: argparse.Namespace) -> None:
    w = sys.stdout.write
    if doc["kind"] == "placement":
        sh = doc["shape"]
        w(f"A {args.a}\nB {args.b}\n")
        w(
            f"placements of {sh['layers']} layers x {sh['logical_experts']} experts, {sh['slots']} slots on "
            f"{sh['ranks']} ranks: {doc['slots_changed']} slots changed in {doc['layers_changed']} layers; "
            f"{doc['slots_to_receive']} must receive weights from another rank\n"
        )
        cols = ["slots_changed", "slots_to_receive", "replica_counts_changed"]
        rank_cols = ["slots_changed", "slots_to_receive", "experts_gained", "experts_dropped"]
    else:
        w(f"A {args.a}\nB {args.b}\n")
        same = "same" if doc["same_current"] else "DIFFERENT"
        tgt = "same" if doc["same_target"] else f"DIFFERENT ({doc['target_slots_changed']} slots)"
        w(f"current placement: {same}; target placement: {tgt}\n")
        w(f"{'total':<22} {'A':>16} {'B':>16} {'B - A':>16}\n")
        for key, (x, y) in doc["totals"].items():
            if key == "predicted_seconds":
                cells = (f"{x * 1e3:.2f} ms", f"{y * 1e3:.2f} ms", f"{(y - x) * 1e3:+.2f} ms")
            else:
                cells = (str(x), str(y), f"{y - x:+d}")
            w(f"{key:<22} {cells[0]:>16} {cells[1]:>16} {cells[2]:>16}\n")
        cols = [k for k in ("transfers", "rounds") if k in doc["layers"][0]]
        rank_cols = ["bytes_sent", "bytes_received"]
    for title, rows, keys in (("layer", doc["layers"], cols), ("rank", doc["ranks"], rank_cols)):
        shown = [row for row in rows if args.all or _differs(row)]
        w(f"\n{len(shown)} of {len(rows)} {title}s {'listed' if args.all else 'differ'}\n")
        if not shown:
            continue
        w(f"{title:>5} " + " ".join(f"{k:>24}" for k in keys) + "\n")
        for row in shown:
            shown_cells = [_cell(row[k]) for k in keys]
            w(f"{row[title]:>5} " + " ".join(f"{c:>24}" for c in shown_cells) + "\n")
