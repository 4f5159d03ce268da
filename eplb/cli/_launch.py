"""One gloo process per rank on this machine, for `eplb run` and `eplb demo`.

Each process joins a gloo group through a file store, runs ``fn(rank, *args)`` and reports its
result (or its exception) through a queue; the launcher waits until every rank answered, all of
them exited, or the deadline passed, then ends the processes it started (and only those).
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

__all__ = ["RankOutcome", "launch_ranks"]

RankOutcome = tuple[Any, str | None]
"""A rank's ``(result, error)``: error is ``"Type: message"`` when ``fn`` raised, else None."""


def launch_ranks(
    fn: Callable[..., Any],
    world: int,
    args: tuple[Any, ...],
    *,
    start_method: str,
    pg_timeout_s: float,
    deadline_s: float,
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
                rank, result, error = results.get(timeout=min(1.0, max(0.01, deadline - time.monotonic())))
            except queue.Empty:
                if all(not proc.is_alive() for proc in procs) and results.empty():
                    break
                continue
            got[rank] = (result, error)
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
        results.put((rank, fn(rank, *args), None))
    except BaseException as exc:
        results.put((rank, None, f"{type(exc).__name__}: {exc}"))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
