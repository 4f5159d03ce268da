"""The local executor: every rank in one process. The reference for tests and the engine of dry runs."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from eplb.executors.base import (
    ExecutionError,
    Executor,
    RunContext,
    RunReport,
    Weights,
    WeightsError,
    check_weights,
    layer_last_rounds,
    layer_states,
    verify_schedule,
)
from eplb.ir.ops import Op, Recv, Send
from eplb.ir.schedule import Schedule
from eplb.ir.topology import Topology

__all__ = ["LocalExecutor"]


class LocalExecutor(Executor):
    """Runs every rank's ops in one process; a Send and its Recv become one ``copy_``.

    ``run`` takes the physical layout, ``weights[layer][k]`` shaped
    ``[num_ranks * slots_per_rank, ...]`` (slot p on rank p // slots_per_rank), and moves views
    of it; ``run_ranks`` takes ``weights[rank][layer][k]`` as each rank would hold them. The
    round semantics are the same as every backend's: ``before`` copies of every rank, then the
    group (no location is both read and written in a verified group, so direct copies are
    exact), then ``after`` copies. A failure raises `ExecutionError` at once.
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
        ctx = RunContext(schedule=schedule, rank=None, group=None, weights=held, device=held[0][0][0].device)
        self.setup(ctx)
        setup_seconds = time.perf_counter() - t_start
        round_seconds = []
        try:
            for k, rnd in enumerate(schedule.rounds):
                t0 = time.perf_counter()
                ctx.round = k
                self._run_ops(ctx, rnd.before)
                ctx.state["pending"] = {}
                self._run_ops(ctx, rnd.transfers)
                self._finish_group(ctx)
                self._run_ops(ctx, rnd.after)
                round_seconds.append(time.perf_counter() - t0)
        finally:
            self.teardown(ctx)
        return RunReport(
            backend=self.name,
            rank=None,
            num_rounds=schedule.num_rounds,
            layers_completed=tuple(range(schedule.plan.num_layers)),
            layer_last_round=layer_last_rounds(schedule),
            bytes_sent=ctx.bytes_sent,
            bytes_received=ctx.bytes_received,
            bytes_copied=ctx.bytes_copied,
            staging_bytes=ctx.staging_bytes,
            buffer_bytes=0,
            host_buffer_bytes=0,
            setup_seconds=setup_seconds,
            round_seconds=tuple(round_seconds),
            wall_seconds=time.perf_counter() - t_start,
        )

    def _run_ops(self, ctx: RunContext, ops: Sequence[Op]) -> None:
        for op in ops:
            try:
                getattr(self, op.kind)(op, ctx)
            except Exception as exc:
                raise self._local_error(ctx, op, exc) from exc

    def _local_error(self, ctx: RunContext, op: Op | None, exc: Exception) -> ExecutionError:
        done, untouched, partial = layer_states(ctx.schedule, ctx.round)
        where = ctx.describe(op) if op is not None else f"in the group of round {ctx.round}"
        return ExecutionError(
            f"local executor: failed {where}: {type(exc).__name__}: {exc}",
            rank=op.rank if op is not None else None,
            round=ctx.round,
            layer=op.layer if op is not None else None,
            op=str(op) if op is not None else None,
            failed_ranks=(op.rank,) if op is not None else (),
            completed_layers=done,
            untouched_layers=untouched,
            partial_layers=partial,
        )

    def send(self, op: Send, ctx: RunContext) -> None:
        pair = ctx.state["pending"].setdefault((op.layer, op.transfer_id), [None, None])
        pair[0] = op
        ctx.bytes_sent += ctx.expert_bytes

    def recv(self, op: Recv, ctx: RunContext) -> None:
        pair = ctx.state["pending"].setdefault((op.layer, op.transfer_id), [None, None])
        pair[1] = op
        ctx.bytes_received += ctx.expert_bytes

    def post_transfers(self, ctx: RunContext) -> None:
        self._finish_group(ctx)

    def _finish_group(self, ctx: RunContext) -> None:
        # A verified group never reads a location that it also writes, so the order of the
        # copies inside the group does not matter.
        for send, recv in ctx.state.pop("pending", {}).values():
            if send is None or recv is None:
                raise self._local_error(
                    ctx, send or recv, RuntimeError("a Send without its Recv in the same round")
                )
            with torch.no_grad():
                for dst, src in zip(
                    ctx.tensors(recv.dst_rank, recv.layer, recv.dst),
                    ctx.tensors(send.src_rank, send.layer, send.src),
                    strict=True,
                ):
                    dst.copy_(src, non_blocking=True)
