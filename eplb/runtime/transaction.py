"""One chunk of a rearrangement as a transaction: backup -> run -> vote -> commit or restore.

`run_chunk` never raises: whatever fails on this rank (compiling, backing up, the executor, a
transport error from a dead peer, a timeout) becomes a failed `Outcome`, and the vote (one
all-reduce on the control group, waited on until a deadline) tells every surviving rank whether
the chunk failed anywhere. A vote that itself fails (the peer died, or never came) counts as a
failure of the chunk and of both groups. The caller commits the layers the outcome says
completed on every rank and restores the others from the `Backup`.
"""

from __future__ import annotations

import datetime
import time
from collections.abc import Callable, Sequence
from typing import Any

import attrs
import torch
import torch.distributed as dist

from eplb.executors.base import ExecutionError

__all__ = ["Backup", "Outcome", "run_step", "vote"]


@attrs.frozen(kw_only=True)
class Outcome:
    """What one chunk did, as this rank knows it (after `vote`: as every rank agreed).

    ``completed`` / ``untouched``: per layer of the chunk (the executor's numbering).
    ``error``: this rank's exception (None if it saw none). ``failed``: the chunk failed on some
    rank. ``group_ok``: the transfer group is still usable. ``vote_ok``: the vote itself went
    through (False: the control group must be replaced too)."""

    completed: tuple[bool, ...]
    untouched: tuple[bool, ...]
    error: BaseException | None = None
    failed: bool = False
    group_ok: bool = True
    vote_ok: bool = True

    @classmethod
    def ok(cls, n: int) -> Outcome:
        return cls(completed=(True,) * n, untouched=(False,) * n)

    @classmethod
    def from_error(cls, n: int, exc: BaseException, *, ran: bool) -> Outcome:
        """A failure on this rank; ``ran``: the executor was called (else nothing was written)."""
        if isinstance(exc, ExecutionError):
            done, same = set(exc.completed_layers), set(exc.untouched_layers)
            # Every rank agreed on it inside the executor: the group is still usable.
            return cls(
                completed=tuple(i in done for i in range(n)),
                untouched=tuple(i in same for i in range(n)),
                error=exc,
                failed=True,
                group_ok=bool(exc.failed_ranks),
            )
        # A backend bug or a broken group: nothing is known about the layers it touched.
        return cls(
            completed=(False,) * n, untouched=(not ran,) * n, error=exc, failed=True, group_ok=not ran
        )


def run_step(n: int, outcome: Outcome | None, fn: Callable[[], None], *, ran: bool) -> Outcome | None:
    """Call ``fn`` unless a step before it failed; its exception becomes a failed outcome."""
    if outcome is not None:
        return outcome
    try:
        fn()
    except Exception as exc:
        return Outcome.from_error(n, exc, ran=ran)
    return None


def vote(outcome: Outcome, control_group: Any, deadline: float) -> Outcome:
    """Every rank agrees: a layer is complete (untouched) only if it is on every rank, the chunk
    failed if it failed anywhere, the group is usable only if usable everywhere.

    Waits until ``deadline`` (`time.monotonic`); a vote that fails or times out returns a failed
    outcome in which no layer completed (each rank then restores its own backup), so the ranks
    that survive agree without hearing from the one that did not."""
    if control_group is None:
        return outcome
    n = len(outcome.completed)
    flags = torch.tensor(
        [*outcome.completed, *outcome.untouched, not outcome.failed, outcome.group_ok], dtype=torch.int64
    )
    try:
        work = dist.all_reduce(flags, op=dist.ReduceOp.MIN, group=control_group, async_op=True)
        # At least 50 ms: timeout 0 would mean "no timeout" to some backends.
        left = max(deadline - time.monotonic(), 0.05)
        work.wait(datetime.timedelta(seconds=left))
    except Exception as exc:  # gloo raises RuntimeError when a peer died or the wait ran out
        cause = outcome.error if outcome.error is not None else exc
        return Outcome(
            completed=(False,) * n,
            untouched=outcome.untouched,
            error=cause,
            failed=True,
            group_ok=False,
            vote_ok=False,
        )
    out = [bool(x) for x in flags.tolist()]
    return attrs.evolve(
        outcome,
        completed=tuple(out[:n]),
        untouched=tuple(out[n : 2 * n]),
        failed=not out[-2],
        group_ok=out[-1],
    )


@attrs.define
class Backup:
    """Copies of some slots of one layer (all its tensors), to restore after a fault."""

    slots: torch.Tensor
    tensors: list[torch.Tensor]

    @classmethod
    def take(
        cls, weights: Sequence[torch.Tensor], slots: Sequence[int] | range, device: str | None
    ) -> Backup:
        idx = torch.tensor(list(slots), dtype=torch.long, device=weights[0].device)
        return cls(
            slots=idx,
            tensors=[w.index_select(0, idx).to(device or w.device) for w in weights],
        )

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors)

    def restore(self, weights: Sequence[torch.Tensor]) -> None:
        if self.slots.numel() == 0:
            return
        for w, saved in zip(weights, self.tensors, strict=True):
            w.index_copy_(0, self.slots, saved.to(w.device))
