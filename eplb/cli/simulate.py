"""``eplb simulate``: replay a load trace, rebalancing every N windows with one or more policies.

Timeline, per policy: the cluster starts on the trivial placement. In window ``w`` it serves
``trace[w]`` with the placement in force (that window's balancedness is what the engine sees);
after every ``--every`` windows it rebalances with the load recorded over those windows, passing
the placement in force as ``current``, and the slots whose new expert is not on their rank yet
are moved (bytes = slots x expert bytes). The ``static`` row never rebalances.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

import numpy as np

from eplb.cli._common import (
    CliError,
    add_layout_options,
    check_not_input,
    check_writable,
    layout_from_args,
    require_positive,
    write_atomic,
)

__all__ = ["register", "run", "simulate"]


def register(subparsers: Any) -> None:
    from eplb.planner.policies import available_policies

    p = subparsers.add_parser(
        "simulate",
        help="replay a load trace, rebalancing every N windows; balancedness over time, bytes moved",
        description="Replay a load trace [windows, layers, experts] (.npy, .npz, .pt, .json or an SGLang "
        "expert-distribution dump) and rebalance every --every windows with each --policy; report "
        "balancedness per window and bytes moved per rebalance. --example replays the built-in "
        "DeepSeek-V3-shaped trace on its cluster.",
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--load", help="trace file [windows, layers, experts]")
    src.add_argument(
        "--example", action="store_true", help="the built-in DeepSeek-V3-shaped trace and cluster"
    )
    p.add_argument(
        "--window-steps",
        type=int,
        default=1,
        help="consecutive steps (first axis) summed into one window (default 1; SGLang dumps "
        "record one step per forward pass)",
    )
    p.add_argument("--every", type=int, default=1, help="rebalance after every N windows (default 1)")
    p.add_argument(
        "--policy",
        action="append",
        choices=available_policies(),
        dest="policies",
        help="policy to replay; repeat for several (default: balanced and migration_aware)",
    )
    p.add_argument("--ranks", type=int, help="EP ranks (required with --load)")
    p.add_argument("--slots", type=int, help="physical slots per layer, all ranks (required with --load)")
    p.add_argument("--nodes", type=int, default=None, help="nodes the ranks span (default 1)")
    p.add_argument("--groups", type=int, default=None, help="expert groups (default 1)")
    p.add_argument(
        "--expert-bytes",
        type=int,
        default=None,
        help="bytes per expert for bytes moved (default 44100000, a DeepSeek-V3 fp8 expert)",
    )
    add_layout_options(p, "trace")
    p.add_argument("--plot", help="draw balancedness over time to this .png (needs matplotlib)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    p.set_defaults(func=run)


def simulate(
    trace: Any,
    topology: Any,
    policies: list[str],
    *,
    every: int = 1,
    num_groups: int = 1,
    expert_bytes: int = 44_100_000,
    progress: Any = None,
) -> dict[str, Any]:
    """Replay ``trace: [windows, layers, experts]``; returns per-policy timelines (see module doc)."""
    from eplb.ir.placement import ModelPlacement
    from eplb.planner.entry import rebalance
    from eplb.planner.metrics import model_balancedness, slots_moved

    trace = np.asarray(trace, dtype=np.float64)
    num_w, num_l, num_e = trace.shape
    trivial = ModelPlacement.trivial(
        num_layers=num_l,
        num_logical_experts=num_e,
        num_physical_experts=topology.num_physical_experts,
        num_ranks=topology.num_ranks,
    )
    timelines: dict[str, Any] = {
        "static": {
            "balancedness": [model_balancedness(trace[w], trivial) for w in range(num_w)],
            "rebalances": [],
        }
    }
    for policy in policies:
        placement = trivial
        series: list[float] = []
        events: list[dict[str, Any]] = []
        for w in range(num_w):
            series.append(model_balancedness(trace[w], placement))
            if (w + 1) % every or w + 1 == num_w:
                continue  # a rebalance after the last window would never serve a window
            if progress is not None:
                progress(f"{policy}: rebalancing after window {w}")
            recorded = trace[w + 1 - every : w + 1].sum(axis=0)
            t = time.perf_counter()
            new = rebalance(recorded, topology, num_groups=num_groups, current=placement, policy=policy)
            took = time.perf_counter() - t
            moved = slots_moved(placement, new)
            events.append(
                {
                    "after_window": w,
                    "slots_moved": moved,
                    "slots_moved_fraction": moved / (num_l * topology.num_physical_experts),
                    "bytes_moved": moved * expert_bytes,
                    "plan_seconds": took,
                }
            )
            placement = new
        timelines[policy] = {"balancedness": series, "rebalances": events}
    for tl in timelines.values():
        served = tl["balancedness"][every:] if num_w > every else tl["balancedness"]
        tl["mean_balancedness"] = float(np.mean(served))
        tl["min_balancedness"] = float(np.min(served))
        tl["bytes_moved"] = sum(e["bytes_moved"] for e in tl["rebalances"])
    return {
        "windows": num_w,
        "layers": num_l,
        "logical_experts": num_e,
        "ranks": topology.num_ranks,
        "slots": topology.num_physical_experts,
        "nodes": topology.num_nodes,
        "every": every,
        "expert_bytes": expert_bytes,
        "mean_over": f"windows {every}..{num_w - 1} (after the first rebalance)"
        if num_w > every
        else "all windows",
        "policies": timelines,
    }


def _check_plot(path: str) -> None:
    if not path.lower().endswith(".png"):
        raise CliError(f"--plot {path}: name a .png file.")
    check_writable(path, "--plot")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise CliError(
            "--plot needs matplotlib, which is not installed: pip install matplotlib (or drop --plot)."
        ) from None


def run(args: argparse.Namespace) -> int:
    from eplb.io import read_trace_file
    from eplb.planner.entry import make_topology

    for option in ("every", "window_steps", "ranks", "slots", "nodes", "groups", "expert_bytes"):
        require_positive("--" + option.replace("_", "-"), getattr(args, option))
    if args.plot:
        check_not_input(args.plot, {"--load": args.load}, "--plot")
        _check_plot(args.plot)  # before the work, so a missing matplotlib costs nothing
    policies = args.policies or ["balanced", "migration_aware"]
    if len(set(policies)) != len(policies):
        raise CliError(f"--policy names {policies} repeat one; give each policy once.")
    if args.example:
        from eplb.examples_data import load_example

        ex = load_example()
        if args.window_steps != 1:
            raise CliError("--window-steps applies to --load; the example's windows are fixed.")
        trace = ex.trace
        ranks = ex.num_ranks if args.ranks is None else args.ranks
        slots = ex.num_physical_experts if args.slots is None else args.slots
        nodes = ex.num_nodes if args.nodes is None else args.nodes
        groups = ex.num_groups if args.groups is None else args.groups
        expert_bytes = ex.expert_bytes if args.expert_bytes is None else args.expert_bytes
    else:
        if args.ranks is None or args.slots is None:
            raise CliError(
                "--load needs --ranks and --slots (the cluster to replay it on), e.g. --ranks 32 --slots 288."
            )
        found = read_trace_file(args.load, window_steps=args.window_steps, layout=layout_from_args(args))
        for note in found.notes:
            print(f"read {args.load}: {note}", file=sys.stderr)
        trace = found.trace
        ranks, slots = args.ranks, args.slots
        nodes = 1 if args.nodes is None else args.nodes
        groups = 1 if args.groups is None else args.groups
        expert_bytes = 44_100_000 if args.expert_bytes is None else args.expert_bytes
    topology = make_topology(ranks, slots, nodes)
    if trace.shape[2] > slots:
        raise CliError(
            f"the trace has {trace.shape[2]} experts but --slots is {slots}; every expert needs a "
            f"slot: use --slots >= {trace.shape[2]}."
        )
    if trace.shape[2] % groups:
        fits = [g for g in range(1, trace.shape[2] + 1) if trace.shape[2] % g == 0][:8]
        raise CliError(
            f"--groups {groups} must divide the trace's {trace.shape[2]} experts; use one of {fits} "
            "(the model's n_group), or 1."
        )
    if trace.shape[0] <= args.every:
        raise CliError(
            f"the trace has {trace.shape[0]} window(s); --every {args.every} never rebalances before "
            f"the end: use --every < {trace.shape[0]}."
        )

    def progress(msg: str) -> None:
        print(f"eplb simulate: {msg}", file=sys.stderr, flush=True)

    doc = simulate(
        trace,
        topology,
        policies,
        every=args.every,
        num_groups=groups,
        expert_bytes=expert_bytes,
        progress=progress,
    )
    doc["source"] = "built-in example deepseek_v3" if args.example else str(args.load)
    if args.plot:
        write_atomic(args.plot, _plot(doc))
        doc["plot"] = args.plot
    if args.json:
        print(json.dumps(doc, indent=1))
    else:
        _print(doc)
    return 0


def _print(doc: dict[str, Any]) -> None:
    print(
        f"{doc['source']}: {doc['windows']} windows x {doc['layers']} layers x {doc['logical_experts']} "
        f"experts on {doc['ranks']} ranks ({doc['slots']} slots, {doc['nodes']} node(s)); rebalance every "
        f"{doc['every']} window(s)"
    )
    names = list(doc["policies"])
    print("\nbalancedness (mean / max rank load) per window")
    print(f"{'window':>6} " + " ".join(f"{n:>16}" for n in names))
    for w in range(doc["windows"]):
        print(f"{w:>6} " + " ".join(f"{doc['policies'][n]['balancedness'][w]:>16.3f}" for n in names))
    print(
        f"{'mean':>6} "
        + " ".join(f"{doc['policies'][n]['mean_balancedness']:>16.3f}" for n in names)
        + f"   ({doc['mean_over']})"
    )
    print(f"\nbytes moved per rebalance (GB; expert {doc['expert_bytes'] / 1e6:.1f} MB)")
    moving = [n for n in names if doc["policies"][n]["rebalances"]]
    print(f"{'after':>6} " + " ".join(f"{n:>16}" for n in moving))
    for i, ev in enumerate(doc["policies"][moving[0]]["rebalances"] if moving else []):
        cells = []
        for n in moving:
            e = doc["policies"][n]["rebalances"][i]
            cells.append(f"{e['bytes_moved'] / 1e9:.1f} ({100 * e['slots_moved_fraction']:.0f}%)")
        print(f"{ev['after_window']:>6} " + " ".join(f"{c:>16}" for c in cells))
    print(f"{'total':>6} " + " ".join(f"{doc['policies'][n]['bytes_moved'] / 1e9:>16.1f}" for n in moving))
    if "plot" in doc:
        print(f"\nwrote {doc['plot']}")


def _figure(doc: dict[str, Any]) -> Any:
    """Balancedness over windows above, bytes moved per rebalance below; one colour per policy in
    both panels (a policy that never moves anything has no line below, which would otherwise shift
    the colour cycle there)."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    windows = range(doc["windows"])
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (name, tl) in enumerate(doc["policies"].items()):
        colour = colours[i % len(colours)]
        top.plot(windows, tl["balancedness"], marker="o", label=name, color=colour)
        if tl["rebalances"]:
            xs = [e["after_window"] + 0.5 for e in tl["rebalances"]]
            gb = [e["bytes_moved"] / 1e9 for e in tl["rebalances"]]
            bottom.plot(xs, gb, marker="s", label=name, color=colour)
    top.set_ylabel("balancedness (mean / max)")
    top.set_ylim(0, 1.05)
    top.legend()
    bottom.set_ylabel("GB moved per rebalance")
    bottom.set_xlabel("window")
    bottom.legend()
    fig.suptitle(f"{doc['source']}: rebalance every {doc['every']} window(s)")
    return fig


def _plot(doc: dict[str, Any]) -> bytes:
    import io

    import matplotlib.pyplot as plt

    fig = _figure(doc)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()
