"""Run a function on N gloo (or NCCL) ranks in fresh processes, with timeouts (a helper for tier-2 tests).

``run_on_ranks(fn, nprocs, *args)`` spawns ``nprocs`` processes, each initialises a gloo process
group over a `FileStore` (so no port is needed), calls ``fn(rank, nprocs, *args)`` and sends back
its return value (must pickle) or its error. A rank that has not answered by ``timeout_s`` is
terminated and reported, so a broken test fails instead of hanging; a rank whose process exits
without answering (a fault test's ``os._exit``) is reported as soon as every other rank answered
or exited. ``fn`` must be a module-level function (spawn pickles it by name).
"""

from __future__ import annotations

import datetime
import os
import queue
import tempfile
import time
import traceback
from collections.abc import Callable
from typing import Any

import attrs
import torch.multiprocessing as mp

__all__ = ["RankResult", "run_on_ranks", "values_or_raise"]


@attrs.frozen
class RankResult:
    """What one rank returned (``ok``) or raised (``error``: ``Type: message``, ``trace``)."""

    rank: int
    ok: bool
    value: Any = None
    error: str = ""
    trace: str = ""


def _worker(
    rank: int,
    nprocs: int,
    store_path: str,
    pg_timeout_s: float,
    fn: Callable[..., Any],
    args: tuple[Any, ...],
    results: Any,
    backend: str,
) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)  # N ranks share a few cores
    try:
        if backend == "nccl":
            torch.cuda.set_device(rank)
        store = dist.FileStore(store_path, nprocs)
        dist.init_process_group(
            backend,
            store=store,
            rank=rank,
            world_size=nprocs,
            timeout=datetime.timedelta(seconds=pg_timeout_s),
        )
        value = fn(rank, nprocs, *args)
        results.put(RankResult(rank, True, value))
    except BaseException as exc:
        results.put(
            RankResult(rank, False, error=f"{type(exc).__name__}: {exc}", trace=traceback.format_exc())
        )
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_on_ranks(
    fn: Callable[..., Any],
    nprocs: int,
    *args: Any,
    timeout_s: float = 120.0,
    pg_timeout_s: float = 30.0,
    backend: str = "gloo",
) -> list[RankResult]:
    """``fn(rank, nprocs, *args)`` on ``nprocs`` ranks; one `RankResult` per rank, by rank.

    ``backend="nccl"`` puts rank r on ``cuda:r`` (tier 3)."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        store_path = os.path.join(tmp, "store")
        procs = [
            ctx.Process(
                target=_worker,
                args=(r, nprocs, store_path, pg_timeout_s, fn, args, results, backend),
                daemon=True,
            )
            for r in range(nprocs)
        ]
        for p in procs:
            p.start()
        got: dict[int, RankResult] = {}
        deadline = time.monotonic() + timeout_s
        while len(got) < nprocs:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                res = results.get(timeout=min(left, 1.0))
            except queue.Empty:
                missing = [r for r in range(nprocs) if r not in got]
                if all(not procs[r].is_alive() for r in missing) and results.empty():
                    break
                continue
            got[res.rank] = res
        for p in procs:
            p.join(timeout=5.0)
        for p in procs:  # only the processes started here, each by its own handle
            if p.is_alive():
                p.terminate()
                p.join(timeout=5.0)
            if p.is_alive():
                p.kill()
                p.join()
    for r in range(nprocs):
        if r not in got:
            code = procs[r].exitcode
            error = (
                f"ProcessExited: rank {r} exited with code {code} without answering"
                if code is not None and code != -15
                else f"TimeoutError: rank {r} did not answer within {timeout_s:g} s"
            )
            got[r] = RankResult(r, False, error=error)
    return [got[r] for r in range(nprocs)]


def values_or_raise(results: list[RankResult]) -> list[Any]:
    """The ranks' return values; an AssertionError with every failing rank's trace otherwise."""
    bad = [r for r in results if not r.ok]
    if bad:
        raise AssertionError("\n".join(f"rank {r.rank}: {r.error}\n{r.trace}" for r in bad))
    return [r.value for r in results]


def error_fields(exc: Any) -> dict[str, Any]:
    """What a worker sends back of an `ExecutionError` (or any exception): type, message and the
    attributes the executors set, None where missing."""
    return {
        "type": type(exc).__name__,
        "message": str(exc),
        **{
            k: getattr(exc, k, None)
            for k in (
                "rank",
                "round",
                "layer",
                "op",
                "failed_ranks",
                "completed_layers",
                "untouched_layers",
                "partial_layers",
                "peer",
                "waited_seconds",
                "group_usable",
            )
        },
    }
