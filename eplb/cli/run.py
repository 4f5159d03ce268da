"""``eplb run PLAN.json --backend NAME``: run a plan or schedule across local processes and check it.

Without torchrun: one process per rank of the plan's topology, gloo on CPU. Under torchrun
(``RANK`` / ``WORLD_SIZE`` set): this process is one rank, on ``cuda:LOCAL_RANK`` with NCCL when
CUDA is present. ``--backend local`` runs every rank in this process. Weights are synthetic:
every byte encodes (layer, logical expert, tensor index), so after the run each slot is checked
against its target expert. Exit status 0 when every slot holds its target, 1 otherwise.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import time
from pathlib import Path
from typing import Any

from eplb.cli._common import CliError, first_problem, human_bytes, human_seconds, require_positive
from eplb.cli._launch import STARTED, default_start_method, launch_ranks
from eplb.cli._launch import report as report_progress

DTYPES = ("float16", "bfloat16", "float32", "uint8")
MAX_LOCAL_PROCS = 128
"""The most processes ``eplb run`` starts on one machine (one per rank, each importing torch)."""


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "run",
        help="run a plan across local processes (gloo on CPU, or one process per GPU under torchrun)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "plan", metavar="PLAN.json", help="a schedule, or a migration plan (scheduled with defaults)"
    )
    p.add_argument("--backend", default="cpu_staged", help="local, p2p, alltoall or cpu_staged (default)")
    p.add_argument(
        "--nprocs", type=int, default=None, help="processes to spawn; must equal the topology's ranks"
    )
    p.add_argument("--dtype", choices=DTYPES, default="float16", help="dtype of the synthetic weight tensors")
    p.add_argument(
        "--expert-bytes", type=int, default=None, help="run with experts of this size instead of the plan's"
    )
    p.add_argument("--timeout", type=float, default=120.0, help="seconds before a silent peer fails the run")
    p.add_argument(
        "--agree-every-round",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="one all-reduce per round so a failing rank stops every rank with its error (default: on "
        "under torchrun, off for local processes as in eplb demo, where it costs more than the "
        "transfers; off, a failure shows on the other ranks as a timeout)",
    )
    p.set_defaults(func=run)


def _load(args: argparse.Namespace) -> Any:
    import attrs

    from eplb.ir import MigrationPlan, Schedule, loads
    from eplb.ir.errors import PlanError, SerdeError
    from eplb.planner.schedule import schedule
    from eplb.planner.verify import verify

    try:
        data = Path(args.plan).read_bytes()
    except OSError as exc:
        raise CliError(
            f"cannot read {args.plan}: {exc.strerror}; pass a plan or schedule JSON file."
        ) from None
    try:
        doc: Any = loads(data)
    except SerdeError as exc:
        raise CliError(
            f"{args.plan} is not a plan or schedule document: {first_problem(exc)}; "
            "regenerate it with eplb plan."
        ) from None
    if isinstance(doc, MigrationPlan):
        plan = doc
        sched = None
    elif isinstance(doc, Schedule):
        plan, sched = doc.plan, doc
    else:
        raise CliError(f"{args.plan} holds a {type(doc).__name__}; pass a migration plan or a schedule.")
    if args.expert_bytes is not None:
        if args.expert_bytes <= 0:
            raise CliError(f"--expert-bytes must be positive (got {args.expert_bytes}).")
        plan = attrs.evolve(plan, expert_bytes=args.expert_bytes)
        sched = attrs.evolve(sched, plan=plan) if sched is not None else None
    try:
        sched = sched if sched is not None else schedule(plan)
        verify(sched)  # before any process starts: a corrupted plan is bad input
    except PlanError as exc:
        raise CliError(
            f"{args.plan} does not verify: {first_problem(exc)}; `eplb verify {args.plan}` lists every "
            "violation."
        ) from None
    return sched


def _check_size(sched: Any, args: argparse.Namespace, procs: int) -> None:
    """Refuse runs this machine cannot hold: too many processes, or weights beyond its memory."""
    topo = sched.plan.topology
    if procs > MAX_LOCAL_PROCS:
        raise CliError(
            f"{args.plan} has {procs} ranks; eplb run starts one process per rank here, at most "
            f"{MAX_LOCAL_PROCS}: run it under torchrun, or with --backend local (every rank in one process)."
        )
    need = sched.plan.num_layers * topo.num_physical_experts * sched.plan.expert_bytes
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):  # not every platform reports it
        return
    if need > memory // 2:
        raise CliError(
            f"{args.plan}: its weights take {need / 1e9:.1f} GB ({sched.plan.num_layers} layers x "
            f"{topo.num_physical_experts} slots x {sched.plan.expert_bytes} B), more than half of this "
            f"machine's {memory / 1e9:.1f} GB; pass --expert-bytes 4096 to run it with small experts."
        )


def _layout(sched: Any, dtype_name: str) -> Any:
    import torch

    from eplb.executors.synthetic import tensor_layout

    return tensor_layout(sched.plan.expert_bytes, getattr(torch, dtype_name))


def _with_progress(cls: Any) -> Any:
    """``cls`` reporting each round it begins to the launcher (rank 0 only, through
    `eplb.cli._launch.report`), by its overridable ``begin_transfers``."""

    class WithProgress(cls):  # type: ignore[misc]  # a class from the registry
        def begin_transfers(self, ctx: Any) -> None:
            if ctx.rank == 0:
                report_progress(0, f"round {ctx.round}")
            super().begin_transfers(ctx)

    WithProgress.__name__ = WithProgress.__qualname__ = cls.__name__
    return WithProgress


def _rank_main(
    rank: int, sched: Any, backend: str, dtype_name: str, timeout: float, device: str, agree: bool = True
) -> dict[str, Any]:
    """One rank: synthetic weights, run, check. Returns a picklable summary. The schedule was
    verified before any rank started, so no rank verifies it again."""
    from eplb.executors import executor_class
    from eplb.executors.synthetic import make_rank_weights, mismatches

    cls = _with_progress(executor_class(backend))
    weights = make_rank_weights(
        sched.plan.current, rank, sched.plan.topology.slots_per_rank, _layout(sched, dtype_name), device
    )
    config = cls.Config(timeout_s=timeout, agree_every_round=agree)
    report = cls(config).run(sched, weights, verified=True)
    return {
        "rank": rank,
        "report": str(report),
        "wall": report.wall_seconds,
        "bad": mismatches(weights, sched.plan.target, rank),
    }


def run(args: argparse.Namespace) -> int:
    from eplb.executors import EXECUTORS

    if args.backend not in EXECUTORS:
        raise CliError(f"unknown backend {args.backend!r}; choose one of {', '.join(sorted(EXECUTORS))}.")
    require_positive("--timeout", args.timeout)
    sched = _load(args)
    world = sched.plan.topology.num_ranks
    if args.nprocs is not None and args.nprocs != world:
        raise CliError(
            f"--nprocs {args.nprocs} does not match the plan's topology ({world} ranks); "
            f"use --nprocs {world} or leave it out."
        )
    if args.backend == "local":
        _check_size(sched, args, 1)
        return _run_local(sched, args)
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return _run_torchrun(sched, args)
    _check_size(sched, args, world)
    return _run_spawned(sched, args, world)


def _run_local(sched: Any, args: argparse.Namespace) -> int:
    from eplb.executors import LocalExecutor
    from eplb.executors.synthetic import make_rank_weights, mismatches

    layout = _layout(sched, args.dtype)
    s = sched.plan.topology.slots_per_rank
    weights = [
        make_rank_weights(sched.plan.current, r, s, layout) for r in range(sched.plan.topology.num_ranks)
    ]
    report = LocalExecutor().run_ranks(sched, weights)
    bad = [m for r, w in enumerate(weights) for m in mismatches(w, sched.plan.target, r)]
    return _summarise(
        sched, args, [{"rank": None, "report": str(report), "wall": report.wall_seconds, "bad": bad}]
    )


def _run_torchrun(sched: Any, args: argparse.Namespace) -> int:
    import torch
    import torch.distributed as dist

    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(seconds=args.timeout * 2))
    try:
        if dist.get_world_size() != sched.plan.topology.num_ranks:
            raise CliError(
                f"torchrun started {dist.get_world_size()} processes but the plan has "
                f"{sched.plan.topology.num_ranks} ranks; use --nproc-per-node to match."
            )
        rank = dist.get_rank()
        device = f"cuda:{torch.cuda.current_device()}" if cuda else "cpu"
        agree = args.agree_every_round is not False
        out = _rank_main(rank, sched, args.backend, args.dtype, args.timeout, device, agree)
        gathered: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, out)
        return _summarise(sched, args, gathered) if rank == 0 else (1 if out["bad"] else 0)
    finally:
        dist.destroy_process_group()


class _Progress:
    """Progress lines on stderr for runs longer than ``after_s``: ranks started, rounds done."""

    def __init__(self, world: int, rounds: int, after_s: float = 2.0, every_s: float = 1.0) -> None:
        self.world, self.rounds, self.after_s, self.every_s = world, rounds, after_s, every_s
        self.started = self.done = 0
        self.t0 = time.monotonic()
        self.last = self.t0
        self.printed = False

    def __call__(self, rank: int, message: str) -> None:
        if message == STARTED:
            self.started += 1
        elif message.startswith("round "):
            self.done = int(message.split()[1])
        now = time.monotonic()
        if now - self.t0 >= self.after_s and now - self.last >= self.every_s:
            self.line()
            self.last = now

    def line(self, final: bool = False) -> None:
        if final and not self.printed:
            return
        done = self.rounds if final else self.done
        print(
            f"eplb run: {self.started}/{self.world} ranks started, {done}/{self.rounds} rounds done "
            f"({time.monotonic() - self.t0:.1f} s)",
            file=sys.stderr,
            flush=True,
        )
        self.printed = True


def _run_spawned(sched: Any, args: argparse.Namespace, world: int) -> int:
    progress = _Progress(world, sched.num_rounds)
    t0 = time.perf_counter()
    got = launch_ranks(
        _rank_main,
        world,
        (sched, args.backend, args.dtype, args.timeout, "cpu", bool(args.agree_every_round)),
        start_method=default_start_method(),
        pg_timeout_s=args.timeout * 2,
        deadline_s=args.timeout * 3 + 60,
        on_progress=progress,
    )
    seconds = time.perf_counter() - t0
    if len(got) == world and all(err is None for _, err in got.values()):
        progress.line(final=True)
    errors = [
        f"rank {r}: {got[r][1]}" if r in got else f"rank {r}: no answer"
        for r in range(world)
        if r not in got or got[r][1] is not None
    ]
    if errors:
        raise CliError("the run failed:\n" + "\n".join(errors))
    return _summarise(sched, args, [got[r][0] for r in range(world)], seconds)


def _summarise(
    sched: Any, args: argparse.Namespace, outs: list[dict[str, Any]], seconds: float | None = None
) -> int:
    bad = [m for o in outs for m in o["bad"]]
    for o in outs:
        print(o["report"])
    slowest = max(o["wall"] for o in outs)
    verdict = "every slot holds its target expert" if not bad else f"{len(bad)}+ slot(s) WRONG"
    print(
        f"eplb run: {args.backend} on {sched.plan.topology.num_ranks} rank(s), {sched.num_rounds} rounds, "
        f"{human_bytes(sched.plan.bytes_moved)} moved, slowest rank {human_seconds(slowest)}"
        + ("" if seconds is None else f", {seconds:.1f} s with the processes' start")
        + f": {verdict}"
    )
    for line in bad[:10]:
        print(f"  {line}")
    return 1 if bad else 0
