"""The local executor: every rank in one process. The reference for tests and the engine of dry runs."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

import attrs
import torch

from eplb.executors.base import (
    Agreement,
    Executor,
    LocalAgreement,
    RunContext,
    RunReport,
    RunState,
    Weights,
    WeightsError,
    check_weights,
    verify_schedule,
)
from eplb.ir.ops import Recv, Send
from eplb.ir.schedule import Schedule
from eplb.ir.topology import Topology

__all__ = ["LocalExecutor"]


@attrs.define
class _LocalState(RunState):
    """The round's transfers by (layer, transfer id): [send, recv], joined in ``post``."""

    pending: dict[tuple[int, int], list[Send | Recv | None]] = attrs.field(factory=dict)


class LocalExecutor(Executor):
    """Runs every rank's ops in one process, through the same loop as every backend; a Send and
    its Recv become one ``copy_`` and the agreement is `LocalAgreement` (nothing to exchange).

    ``run`` takes the physical layout, ``weights[layer][k]`` shaped
    ``[num_ranks * slots_per_rank, ...]`` (slot p on rank p // slots_per_rank), and moves views
    of it; ``run_ranks`` takes ``weights[rank][layer][k]`` as each rank would hold them. The
    round semantics are the same as every backend's: ``before`` copies of every rank, then the
    group (no location is both read and written in a verified group, so direct copies are
    exact), then ``after`` copies. A failure raises `ExecutionError` at once; bad weights,
    a schedule that fails verification or staging over the limit raise before the loop
    (`WeightsError`, `PlanError`, `ExecutorError`).
    """

    name = "local"

    @classmethod
    def supports(cls, topology: Topology, *, device_type: str = "cuda") -> str | None:
        return None

    def run(
        self,
        schedule: Schedule,
        weights: Weights,
        group: Any = None,
        *,
        rank: int | None = None,
        verified: bool = False,
    ) -> RunReport:
        """``weights[layer][k]`` shaped ``[num_ranks * slots_per_rank, ...]``; ``group``/``rank`` unused."""
        topo = schedule.plan.topology
        s, r = topo.slots_per_rank, topo.num_ranks
        for layer, tensors in enumerate(weights):
            for k, t in enumerate(tensors):
                if t.dim() < 1 or t.shape[0] != r * s:
                    raise WeightsError(
                        f"weights[{layer}][{k}] has shape {tuple(t.shape)}; the local executor takes every "
                        f"rank's slots at once, so its first dimension must be num_ranks * slots_per_rank "
                        f"({r} * {s} = {r * s}); or call run_ranks with weights[rank][layer][k]."
                    )
        by_rank = {q: [[t[q * s : (q + 1) * s] for t in tensors] for tensors in weights] for q in range(r)}
        return self.run_ranks(schedule, by_rank, verified=verified)

    def run_ranks(
        self,
        schedule: Schedule,
        weights: Sequence[Weights] | Mapping[int, Weights],
        *,
        verified: bool = False,
    ) -> RunReport:
        """Run every rank: ``weights[rank][layer][k]`` shaped ``[slots_per_rank, ...]``, in place."""
        t_start = time.perf_counter()
        if not verified:
            verify_schedule(schedule)
        num_ranks = schedule.plan.topology.num_ranks
        held = dict(weights) if isinstance(weights, Mapping) else dict(enumerate(weights))
        if sorted(held) != list(range(num_ranks)):
            raise WeightsError(
                f"the local executor needs the weights of every rank 0..{num_ranks - 1} "
                f"(got ranks {sorted(held)}); pass weights[rank][layer][k] for each."
            )
        for q, w in held.items():
            check_weights(schedule, w, f"weights[{q}]")
        self.check_staging(schedule)
        ctx = RunContext(schedule=schedule, rank=None, group=None, weights=held, device=held[0][0][0].device)
        return self._loop(ctx, None, t_start)

    def agreement(self, ctx: RunContext) -> Agreement:
        return LocalAgreement()

    def setup(self, ctx: RunContext) -> RunState:
        super().setup(ctx)
        return _LocalState()

    def begin_transfers(self, ctx: RunContext) -> None:
        self._state(ctx).pending.clear()

    def send(self, op: Send, ctx: RunContext) -> None:
        self._state(ctx).pending.setdefault((op.layer, op.transfer_id), [None, None])[0] = op
        ctx.bytes_sent += ctx.expert_bytes

    def recv(self, op: Recv, ctx: RunContext) -> None:
        self._state(ctx).pending.setdefault((op.layer, op.transfer_id), [None, None])[1] = op
        ctx.bytes_received += ctx.expert_bytes

    def post(self, ctx: RunContext) -> None:
        # A verified group never reads a location that it also writes, so the order of the
        # copies inside the group does not matter.
        for send, recv in self._state(ctx).pending.values():
            if not isinstance(send, Send) or not isinstance(recv, Recv):
                raise RuntimeError(f"{send or recv} has no matching op in round {ctx.round}")
            with torch.no_grad():
                for dst, src in zip(
                    ctx.tensors(recv.dst_rank, recv.layer, recv.dst),
                    ctx.tensors(send.src_rank, send.layer, send.src),
                    strict=True,
                ):
                    dst.copy_(src, non_blocking=True)

    @staticmethod
    def _state(ctx: RunContext) -> _LocalState:
        assert isinstance(ctx.state, _LocalState)
        return ctx.state
