"""The alltoall executor: one ``all_to_all_single`` per round over packed send / receive buffers.

Each rank packs the experts it sends, peer by peer (peers ascending, each peer's experts in the
order the schedule lists them, every expert's tensors back to back as bytes), runs one
all-to-all, and unpacks in the same order. Every rank calls the collective in every round that
has a transfer anywhere, even with nothing of its own to move. The packed buffers are transport
memory on top of the staging pool (`RunReport.buffer_bytes`); ``Config.max_buffer_bytes`` caps
them by splitting a round into several all-to-alls, the same number on every rank (each rank
derives it from the whole schedule).
"""

from __future__ import annotations

import math
from collections import Counter

import attrs
import torch
import torch.distributed as dist

from eplb.executors.base import (
    Executor,
    ExecutorError,
    PackedExecutor,
    PackedState,
    RunContext,
    RunState,
    gpu_link_reason,
    iter_peer_order,
    pack_expert,
    unpack_expert,
)
from eplb.ir.ops import Recv, Send
from eplb.ir.topology import Topology

__all__ = ["AllToAllExecutor"]

_UNBOUNDED = 1 << 62


@attrs.define
class _AllToAllState(PackedState):
    """All-to-alls per round, experts per peer per all-to-all, and the packed buffers."""

    chunks: list[int] = attrs.field(factory=list)
    per_peer: int = _UNBOUNDED
    send_buf: torch.Tensor | None = None
    recv_buf: torch.Tensor | None = None


class AllToAllExecutor(PackedExecutor):
    """``all_to_all_single`` per round (NCCL on GPUs, gloo on CPUs)."""

    name = "alltoall"
    collective = True

    @attrs.frozen(kw_only=True)
    class Config(Executor.Config):
        """``max_buffer_bytes``: cap on each packed buffer (send and receive); None packs a whole
        round at once (fastest, most memory)."""

        max_buffer_bytes: int | None = attrs.field(default=None)

    config: AllToAllExecutor.Config

    @classmethod
    def supports(cls, topology: Topology, *, device_type: str = "cuda") -> str | None:
        return gpu_link_reason(topology) if device_type == "cuda" else None

    def setup(self, ctx: RunContext) -> RunState:
        super().setup(ctx)
        assert ctx.rank is not None
        eb, me = ctx.expert_bytes, ctx.rank
        num_ranks = ctx.schedule.plan.topology.num_ranks
        cap = self.config.max_buffer_bytes
        if cap is not None and cap < eb:
            raise ExecutorError(
                f"alltoall Config.max_buffer_bytes ({cap}) is below one expert ({eb} bytes); "
                f"use at least {eb}, or None."
            )
        # Experts per peer per all-to-all: a chunk to every peer must fit the cap.
        per_peer = _UNBOUNDED if cap is None else max(1, cap // (eb * max(1, num_ranks - 1)))
        chunks, send_max, recv_max = [], 0, 0
        for rnd in ctx.schedule.rounds:
            pairs = Counter((op.src_rank, op.dst_rank) for op in rnd.transfers if isinstance(op, Send))
            chunks.append(0 if not pairs else math.ceil(max(pairs.values()) / per_peer))
            sends = sum(min(n, per_peer) for (a, _), n in pairs.items() if a == me)
            recvs = sum(min(n, per_peer) for (_, b), n in pairs.items() if b == me)
            send_max, recv_max = max(send_max, sends), max(recv_max, recvs)
        ctx.buffer_bytes = (send_max + recv_max) * eb
        return _AllToAllState(
            chunks=chunks,
            per_peer=per_peer,
            send_buf=torch.empty(send_max * eb, dtype=torch.uint8, device=ctx.device),
            recv_buf=torch.empty(recv_max * eb, dtype=torch.uint8, device=ctx.device),
        )

    def post(self, ctx: RunContext) -> None:
        state = ctx.state
        assert isinstance(state, _AllToAllState)
        num_chunks = state.chunks[ctx.round]
        if not num_chunks:
            return
        num_ranks = ctx.schedule.plan.topology.num_ranks
        eb, per_peer = ctx.expert_bytes, state.per_peer
        sends = dict(iter_peer_order(state.sends))
        recvs = dict(iter_peer_order(state.recvs))
        send_buf, recv_buf = state.send_buf, state.recv_buf
        assert send_buf is not None and recv_buf is not None
        deadline = self.deadline()
        for c in range(num_chunks):
            lo = c * per_peer
            hi = lo + per_peer
            in_splits, out_splits = [0] * num_ranks, [0] * num_ranks
            offset = 0
            for peer, ops in sends.items():
                part = ops[lo:hi] if lo < len(ops) else []
                for op in part:
                    assert isinstance(op, Send)
                    offset += pack_expert(send_buf[offset:], ctx.tensors(op.rank, op.layer, op.src))
                in_splits[peer] = len(part) * eb
            used_out = 0
            for peer, ops in recvs.items():
                n_recv = max(0, min(len(ops), hi) - lo)
                out_splits[peer] = n_recv * eb
                used_out += n_recv * eb
            work = dist.all_to_all_single(
                recv_buf[:used_out],
                send_buf[:offset],
                output_split_sizes=out_splits,
                input_split_sizes=in_splits,
                group=ctx.group,
                async_op=True,
            )
            deadline.wait(work)
            offset = 0
            for _peer, ops in recvs.items():
                for op in ops[lo:hi] if lo < len(ops) else []:
                    assert isinstance(op, Recv)
                    offset += unpack_expert(recv_buf[offset:], ctx.tensors(op.rank, op.layer, op.dst))

