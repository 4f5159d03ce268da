"""One gloo process per rank on this machine, for `eplb run` and `eplb demo`.

Each process joins a gloo group through a file store, runs ``fn(rank, *args)`` and reports its
result (or its exception) through a queue; the launcher waits until every rank answered, all of
them exited, or the deadline passed, then ends the processes it started (and only those). While it
waits, ``on_progress(rank, message)`` hears each rank's "started" (its group joined) and whatever
``fn`` passes to `report`.
"""

from __future__ import annotations

import datetime
import multiprocessing as mp
import os
import queue
import tempfile
import time
from collections.abc import Callable
from typing import Any

__all__ = ["STARTED", "RankOutcome", "default_start_method", "launch_ranks", "report"]

RankOutcome = tuple[Any, str | None]
"""A rank's ``(result, error)``: error is ``"Type: message"`` when ``fn`` raised, else None."""

STARTED = "started"
_DONE, _PROGRESS = "done", "progress"
_QUEUE: Any = None  # this rank's queue to the launcher, set in each rank process


def default_start_method() -> str:
    """"fork" where the platform has it: ranks start without importing torch again (32 imports
    take ~45 s on 2 cores); "spawn" elsewhere."""
    return "fork" if "fork" in mp.get_all_start_methods() else "spawn"


def report(rank: int, message: str) -> None:
    """From inside ``fn``: tell the launcher's ``on_progress`` (no-op outside a launched rank)."""
    if _QUEUE is not None:
        _QUEUE.put((_PROGRESS, rank, message, None))


def launch_ranks(
    fn: Callable[..., Any],
    world: int,
    args: tuple[Any, ...],
    *,
    start_method: str,
    pg_timeout_s: float,
    deadline_s: float,
    on_progress: Callable[[int, str], None] | None = None,
) -> dict[int, RankOutcome]:
    """``fn(rank, *args)`` on ``world`` local gloo processes; the outcome of each rank that answered
    within ``deadline_s``. ``start_method`` "fork" skips re-importing torch in every process (the
    caller must not have started threads that matter); "spawn" starts clean interpreters."""
    ctx: Any = mp.get_context(start_method)
    results: Any = ctx.Queue()
    got: dict[int, RankOutcome] = {}
    with tempfile.TemporaryDirectory(prefix="eplb-ranks-") as tmp:
        store = os.path.join(tmp, "store")
        procs = [
            ctx.Process(target=_rank, args=(fn, r, world, store, pg_timeout_s, args, results), daemon=True)
            for r in range(world)
        ]
        for proc in procs:
            proc.start()
        deadline = time.monotonic() + deadline_s
        while len(got) < world and time.monotonic() < deadline:
            try:
                kind, rank, result, error = results.get(
                    timeout=min(1.0, max(0.01, deadline - time.monotonic()))
                )
            except queue.Empty:
                if all(not proc.is_alive() for proc in procs) and results.empty():
                    break
                continue
            if kind == _DONE:
                got[rank] = (result, error)
            elif on_progress is not None:
                on_progress(rank, result)
        for proc in procs:  # only the processes started here, each by its own handle
            proc.join(timeout=5.0)
            if proc.is_alive():
                proc.terminate()
                proc.join(timeout=5.0)
    return got


def _rank(
    fn: Callable[..., Any],
    rank: int,
    world: int,
    store: str,
    pg_timeout_s: float,
    args: tuple[Any, ...],
    results: Any,
) -> None:
    global _QUEUE
    _QUEUE = results
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)  # the ranks share this machine's cores
    try:
        dist.init_process_group(
            "gloo",
            store=dist.FileStore(store, world),  # type: ignore[attr-defined]  # exported at runtime
            rank=rank,
            world_size=world,
            timeout=datetime.timedelta(seconds=pg_timeout_s),
        )
        results.put((_PROGRESS, rank, STARTED, None))
        results.put((_DONE, rank, fn(rank, *args), None))
    except BaseException as exc:
        results.put((_DONE, rank, None, f"{type(exc).__name__}: {exc}"))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
