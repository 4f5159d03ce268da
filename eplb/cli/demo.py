"""``eplb demo``: the whole pipeline on the built-in DeepSeek-V3-shaped example.

The placement in force was planned (``balanced``) on the previous load window; the latest window
has drifted. The demo plans from scratch (``balanced``) and migration-aware from the placement in
force, compiles and schedules both, verifies both, executes the migration-aware schedule on real
tensors across one local gloo process per rank (each expert a small tensor whose bytes encode its
id, so the check is exact), checks that every slot holds its target expert, and reports. Bytes and
predicted times are for the real expert size on the example's named GPU cluster.

Files written (``--out``, default ``./eplb-demo``): ``plan.json`` (the migration-aware schedule:
``eplb inspect`` / ``eplb verify`` read it), ``plan_balanced.json`` (the from-scratch one, for
``eplb diff``), ``current.json`` and ``target.json`` (IR placements), ``target.sglang.json`` and
``target.trtllm.yaml`` (the target for SGLang / TensorRT-LLM), ``report.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

import attrs

from eplb.cli._common import CliError, check_writable_folder, require_positive, write_atomic
from eplb.cli._launch import launch_ranks

__all__ = ["execute_on_processes", "register", "run"]


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "demo",
        help="plan, verify and run a migration on the built-in DeepSeek-V3-shaped example",
        description="On a built-in DeepSeek-V3-shaped example (58 layers x 256 experts, 288 slots on 32 "
        "H200s in 4 nodes, drifting load): plan from scratch and migration-aware, compile, schedule, "
        "verify, execute the migration-aware plan on small tensors across one local gloo process per "
        "rank, check every slot, report, and write the plan files to --out.",
    )
    p.add_argument(
        "--out",
        default="eplb-demo",
        help="folder for the plan files (default ./eplb-demo; created; the demo's own files "
        "in it are replaced)",
    )
    p.add_argument(
        "--window",
        type=int,
        default=None,
        help="load window to plan for (default: the last); the placement in force was planned "
        "on the window before it",
    )
    p.add_argument(
        "--exec-expert-bytes",
        type=int,
        default=96,
        help="bytes of each expert's tensors in the execution check (default 96; the report's "
        "bytes and times use the real 44.1 MB)",
    )
    p.add_argument(
        "--executor",
        default=None,
        help="backend for the execution (default: chosen for CPU weights, cpu_staged)",
    )
    p.add_argument("--no-execute", action="store_true", help="skip the execution on local processes")
    p.add_argument(
        "--timeout",
        type=float,
        default=120.0,
        help="seconds the execution may take before it is stopped (default 120)",
    )
    p.add_argument("--json", action="store_true", help="print the report as one JSON object")
    p.set_defaults(func=run)


def _progress(msg: str) -> None:
    print(f"eplb demo: {msg}", file=sys.stderr, flush=True)


@attrs.frozen(kw_only=True)
class _Candidate:
    policy: str
    balancedness: float
    slots_moved: int
    slots_moved_fraction: float
    bytes_moved: int
    transfers: int
    rounds: int
    rounds_lower_bound: int
    predicted_seconds: float
    plan_seconds: float


def run(args: argparse.Namespace) -> int:
    out = check_writable_folder(args.out)
    if args.exec_expert_bytes < 2:
        raise CliError(f"--exec-expert-bytes must be >= 2 (got {args.exec_expert_bytes}).")
    require_positive("--timeout", args.timeout)
    if args.no_execute and args.executor is not None:
        raise CliError("--executor picks the backend of the execution that --no-execute skips; drop one.")

    from eplb.examples_data import load_example
    from eplb.io import layout_named, placement_bytes
    from eplb.ir.serde import dumps
    from eplb.planner.entry import rebalance
    from eplb.planner.metrics import model_balancedness, summarize
    from eplb.planner.pipeline import plan_migration

    model = layout_named("deepseek-v3")  # the example's shape: 61 layers, MoE 3-60, 256 experts

    ex = load_example()
    window = ex.num_windows - 1 if args.window is None else args.window
    if not 1 <= window < ex.num_windows:
        why = "window 0 has no previous one" if window == 0 else f"the example has {ex.num_windows} windows"
        raise CliError(f"--window must be in [1, {ex.num_windows}) (got {window}); {why}.")
    if args.executor is not None:
        _check_executor(args.executor, ex.topology())
    topo = ex.topology()
    load = ex.trace[window]
    t0 = time.perf_counter()
    _progress(f"planning the placement in force from window {window - 1} (balanced)")
    current = rebalance(ex.trace[window - 1], topo, num_groups=ex.num_groups, policy="balanced")

    candidates: list[_Candidate] = []
    schedules: dict[str, Any] = {}
    targets: dict[str, Any] = {}
    for policy in ("balanced", "migration_aware"):
        _progress(f"planning window {window} with {policy}; compiling, scheduling, verifying")
        t = time.perf_counter()
        target = rebalance(load, topo, num_groups=ex.num_groups, current=current, policy=policy)
        sched = plan_migration(current, target, topo, ex.expert_bytes)
        took = time.perf_counter() - t
        from eplb.planner.cost import predict_seconds

        m = summarize(load, target, current=current, expert_bytes=ex.expert_bytes)
        candidates.append(
            _Candidate(
                policy=policy,
                balancedness=m.balancedness,
                slots_moved=m.slots_moved or 0,
                slots_moved_fraction=m.slots_moved_fraction or 0.0,
                bytes_moved=sched.plan.bytes_moved,
                transfers=sched.plan.transfers,
                rounds=sched.num_rounds,
                rounds_lower_bound=sched.rounds_lower_bound,
                predicted_seconds=predict_seconds(sched),
                plan_seconds=took,
            )
        )
        schedules[policy], targets[policy] = sched, target

    chosen = "migration_aware"
    execution: dict[str, Any] | None = None
    if not args.no_execute:
        _progress(
            f"executing the {chosen} plan on {topo.num_ranks} local gloo processes "
            f"({args.exec_expert_bytes} B per expert)"
        )
        execution = execute_on_processes(
            schedules[chosen],
            expert_bytes=args.exec_expert_bytes,
            executor=args.executor,
            timeout_s=args.timeout,
        )
        if execution["ranks_ok"] != topo.num_ranks:
            raise CliError(
                f"execution check failed: {execution['ranks_ok']}/{topo.num_ranks} ranks hold their target "
                f"experts; first problem: {execution['problems'][0]}. Report this with the output of "
                "`eplb verify` on the plan."
            )

    report: dict[str, Any] = {
        "example": ex.description,
        "cluster": f"{topo.num_ranks} x {ex.gpu} in {topo.num_nodes} nodes "
        f"({topo.bandwidth.intra_node_gbps:g} GB/s NVLink, {topo.bandwidth.inter_node_gbps:g} GB/s per GPU "
        "across nodes, cost model eplb.planner.cost)",
        "expert_bytes": ex.expert_bytes,
        "window": window,
        "balancedness": {
            "trivial": model_balancedness(load, ex.trivial()),
            "in_force": model_balancedness(load, current),
            **{c.policy: c.balancedness for c in candidates},
        },
        "candidates": [attrs.asdict(c) for c in candidates],
        "executed": chosen if execution else None,
        "execution": execution,
        "out": str(out.resolve()),
        "files": [],
        "seconds": 0.0,
    }
    files = {
        "plan.json": dumps(schedules[chosen]).encode(),
        "plan_balanced.json": dumps(schedules["balanced"]).encode(),
        "current.json": placement_bytes(current, "ir"),
        "target.json": placement_bytes(targets[chosen], "ir"),
        "target.sglang.json": placement_bytes(targets[chosen], "sglang", layout=model),
        "target.trtllm.yaml": placement_bytes(targets[chosen], "trtllm", layout=model),
    }
    report["files"] = sorted([*files, "report.json"])
    report["seconds"] = time.perf_counter() - t0
    files["report.json"] = (json.dumps(report, indent=1) + "\n").encode()
    # All work is done; only now touch the disk, each file atomically.
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CliError(f"cannot create --out {out}: {exc.strerror}; name a writable folder.") from None
    for name, data in files.items():
        write_atomic(out / name, data)
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        _print_report(report, ex.num_windows)
    return 0


def _check_executor(name: str, topology: Any) -> None:
    from eplb.executors.base import ExecutorError
    from eplb.executors.select import select_executor

    if name == "local":
        raise CliError(
            "--executor local runs every rank in one process; the demo runs one process per rank: "
            "choose cpu_staged or alltoall."
        )
    try:
        select_executor(topology, name, device_type="cpu")
    except ExecutorError as exc:
        raise CliError(str(exc).splitlines()[0]) from None




def _print_report(r: dict[str, Any], num_windows: int) -> None:
    gb = r["expert_bytes"] / 1e6
    print(f"example   {r['example']}")
    print(f"cluster   {r['cluster']}; expert {gb:.1f} MB")
    print(
        f"load      window {r['window']} of {num_windows}; the placement in force was planned on window "
        f"{r['window'] - 1}"
    )
    b = r["balancedness"]
    print(
        f"balancedness (mean / max rank load) on this window: trivial {b['trivial']:.3f}, in force "
        f"{b['in_force']:.3f}"
    )
    print()
    head = f"{'policy':<16} {'balancedness':>12} {'slots moved':>16} {'GB moved':>9} {'rounds':>6} "
    print(head + f"{'bound':>5} {'predicted':>10} {'planned in':>10}")
    for c in r["candidates"]:
        moved = f"{c['slots_moved']} ({100 * c['slots_moved_fraction']:.1f}%)"
        print(
            f"{c['policy']:<16} {c['balancedness']:>12.3f} {moved:>16} {c['bytes_moved'] / 1e9:>9.2f} "
            f"{c['rounds']:>6} {c['rounds_lower_bound']:>5} {c['predicted_seconds'] * 1e3:>8.1f}ms "
            f"{c['plan_seconds']:>9.2f}s"
        )
    print()
    e = r["execution"]
    if e is None:
        print("execution skipped (--no-execute)")
    else:
        print(
            f"executed  {r['executed']} on {e['ranks']} local processes with the {e['executor']} executor "
            f"({e['expert_bytes']} B per expert, {e['rounds']} rounds): {e['ranks_ok']}/{e['ranks']} "
            f"ranks hold their target experts in every slot ({e['seconds']:.1f} s)"
        )
    print(f"wrote     {r['out']}/: {', '.join(r['files'])}")
    print(
        f"next      eplb inspect {r['out']}/plan.json; eplb diff {r['out']}/plan_balanced.json "
        f"{r['out']}/plan.json"
    )


# --- execution on local processes ----------------------------------------------------------------
def execute_on_processes(
    sched: Any, *, expert_bytes: int, executor: str | None = None, timeout_s: float = 120.0
) -> dict[str, Any]:
    """Run ``sched``'s rounds on one forked gloo process per rank with ``expert_bytes`` experts.

    The schedule is rescaled to the small expert size (same rounds and ops; staging limit scaled
    with it) and re-verified. Each rank fills its slots with its current experts' byte patterns,
    runs the executor, and checks every slot against the target. Processes are forked from this
    one, so each rank starts without importing torch again (32 imports take ~45 s on 2 cores).
    """
    from eplb.executors.synthetic import expert_bytes_of, tensor_layout
    from eplb.planner.verify import verify

    layout = tensor_layout(expert_bytes)
    small = expert_bytes_of(layout)
    plan = sched.plan
    limits = sched.limits
    if limits.staging_bytes_per_rank is not None:
        limits = attrs.evolve(
            limits, staging_bytes_per_rank=-(-limits.staging_bytes_per_rank * small // plan.expert_bytes)
        )
    scaled = attrs.evolve(sched, plan=attrs.evolve(plan, expert_bytes=small), limits=limits)
    verify(scaled)
    n = plan.topology.num_ranks
    t0 = time.perf_counter()
    outcomes = launch_ranks(
        _check_rank,
        n,
        (scaled, layout, executor, timeout_s),
        start_method="fork",
        pg_timeout_s=timeout_s,
        deadline_s=timeout_s,
    )
    got = {r: _outcome(r, result, error, executor) for r, (result, error) in outcomes.items()}
    problems = [p for r in sorted(got) for p in got[r]["problems"]]
    problems += [f"rank {r} did not answer within {timeout_s:g} s" for r in range(n) if r not in got]
    names = {g["executor"] for g in got.values() if g["executor"]}
    return {
        "executor": ", ".join(sorted(names)) or (executor or "?"),
        "ranks": n,
        "ranks_ok": sum(1 for g in got.values() if not g["problems"]),
        "expert_bytes": small,
        "rounds": scaled.num_rounds,
        "bytes_received": sum(g["bytes_received"] for g in got.values()),
        "seconds": time.perf_counter() - t0,
        "problems": problems[:10],
    }


def _check_rank(rank: int, sched: Any, layout: Any, executor: str | None, timeout_s: float) -> dict[str, Any]:
    """One rank: its current experts' byte patterns, the executor's run, every slot checked."""
    from eplb.executors.synthetic import make_rank_weights, mismatches

    plan = sched.plan
    weights = make_rank_weights(plan.current, rank, plan.topology.slots_per_rank, layout)
    backend = _executor(plan.topology, executor, timeout_s)
    report = backend.run(sched, weights, verified=True)
    return {
        "problems": mismatches(weights, plan.target, rank),
        "bytes_received": report.bytes_received,
        "executor": backend.name,
    }


def _outcome(rank: int, result: Any, error: str | None, executor: str | None) -> dict[str, Any]:
    if error is None:
        return dict(result)
    first = error.splitlines()[0] if error else ""
    return {"problems": [f"rank {rank}: {first}"], "bytes_received": 0, "executor": executor}


def _executor(topology: Any, name: str | None, timeout_s: float) -> Any:
    from eplb.executors.select import select_executor

    backend = select_executor(topology, name, device_type="cpu")
    # 32 processes on a few cores: one agreement all-reduce per round costs more than the
    # transfers; a failing rank still stops the run (the others time out) and is reported.
    backend.config = attrs.evolve(backend.config, timeout_s=timeout_s, agree_every_round=False)
    return backend
