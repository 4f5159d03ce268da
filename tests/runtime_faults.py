"""Fault injection for runtime tests: wraps the executor the runtime runs, nothing inside it.

`arm_fault(executor, ...)` replaces ``executor.run`` on this instance only, so the fault fires
at the boundary the runtime sees (the contract ``Executor.run``), whatever the backend's insides.
"""

from __future__ import annotations

import os
import time
from typing import Any

import attrs

__all__ = ["Fault", "arm_fault"]

KINDS = ("raise", "raise_after", "exit", "sleep")


@attrs.define
class Fault:
    """On rank ``rank``, the ``on_run``-th run after arming (1-based) fails as ``kind``:
    ``raise`` before running, ``raise_after`` after a run that succeeded, ``exit``
    (``os._exit``) before running, ``sleep`` for ``sleep_s`` and then run."""

    kind: str
    rank: int
    on_run: int = 1
    sleep_s: float = 0.0
    armed: bool = False
    runs: int = 0
    fired: bool = False


def arm_fault(executor: Any, fault: Fault, my_rank: int) -> Fault:
    assert fault.kind in KINDS, fault.kind
    inner = executor.run

    def run(*args: Any, **kwargs: Any) -> Any:
        if not fault.armed:
            return inner(*args, **kwargs)
        fault.runs += 1
        if my_rank != fault.rank or fault.runs != fault.on_run:
            return inner(*args, **kwargs)
        fault.fired = True
        if fault.kind == "exit":
            os._exit(3)
        if fault.kind == "raise":
            raise RuntimeError(f"injected fault on rank {my_rank}")
        if fault.kind == "sleep":
            time.sleep(fault.sleep_s)
            return inner(*args, **kwargs)
        inner(*args, **kwargs)
        raise RuntimeError(f"injected fault on rank {my_rank} after its run")

    executor.run = run
    return fault
