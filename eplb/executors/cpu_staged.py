"""The cpu_staged executor: device -> pinned host -> gloo -> host -> device.

For clusters without GPU peer access or GPUDirect. Per round on a CUDA rank: every receive is
posted first (into pinned host rows); the sent experts are copied device-to-host on a side
stream, and each is sent as soon as its copy is done; each received expert is copied
host-to-device as soon as it arrives, while later ones are still in flight. One gloo message per
expert, tagged by its position among the transfers to that peer, so the pairing holds whatever
order gloo completes them in. CPU weights skip the host copies and are sent from the slots.

The transfers go over a gloo group: the group passed to ``run`` when it is gloo, else one made
once per group with ``dist.new_group(backend="gloo")`` (a collective: every rank calls ``run``).
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import attrs
import torch
import torch.distributed as dist

from eplb.executors.base import (
    Executor,
    PackedExecutor,
    PackedState,
    RunContext,
    RunState,
    pack_expert,
    unpack_expert,
)
from eplb.executors.p2p import global_rank
from eplb.ir.ops import Recv, Send
from eplb.ir.topology import Topology, Transport

__all__ = ["CpuStagedExecutor"]


@attrs.define
class _StagedState(PackedState):
    """Pinned host rows for the busiest round's sends and receives, and the copy stream (CUDA
    weights only; None on CPU weights, which are sent from the slots)."""

    host_send: torch.Tensor | None = None
    host_recv: torch.Tensor | None = None
    stream: Any = None


class CpuStagedExecutor(PackedExecutor):
    """Host-staged transfers over gloo, overlapping host copies with the network."""

    name = "cpu_staged"

    def __init__(self, config: Executor.Config | None = None) -> None:
        super().__init__(config)
        self._host_groups: dict[int, Any] = {}

    @classmethod
    def supports(cls, topology: Topology, *, device_type: str = "cuda") -> str | None:
        if Transport.HOST not in topology.transports:
            return "the topology lists no host transport (Transport.HOST)"
        return None

    def host_group(self, group: Any = None) -> Any:
        """``group`` if it is a gloo group, else a gloo group over the same ranks (made once)."""
        if "gloo" in str(dist.get_backend(group)).lower():
            return group
        key = id(group)
        if key not in self._host_groups:
            ranks = [global_rank(group, r) for r in range(dist.get_world_size(group))]
            self._host_groups[key] = dist.new_group(ranks=ranks, backend="gloo")
        return self._host_groups[key]

    def transport_group(self, group: Any) -> Any:
        return self.host_group(group)

    def setup(self, ctx: RunContext) -> RunState:
        super().setup(ctx)
        if ctx.device.type != "cuda":
            return _StagedState()
        me = ctx.rank
        sends = recvs = 0
        for rnd in ctx.schedule.rounds:
            kinds = Counter(type(op) for op in rnd.transfers if op.rank == me)
            sends, recvs = max(sends, kinds[Send]), max(recvs, kinds[Recv])
        eb = ctx.expert_bytes
        ctx.host_buffer_bytes = (sends + recvs) * eb
        return _StagedState(
            host_send=torch.empty((sends, eb), dtype=torch.uint8, pin_memory=True),
            host_recv=torch.empty((recvs, eb), dtype=torch.uint8, pin_memory=True),
            stream=torch.cuda.Stream(device=ctx.device),  # type: ignore[no-untyped-call]
        )

    def post(self, ctx: RunContext) -> None:
        state = ctx.state
        assert isinstance(state, _StagedState)
        sends, recvs = list(state.sends), list(state.recvs)
        state.sends.clear()
        state.recvs.clear()
        if not sends and not recvs:
            return
        if ctx.device.type == "cuda":
            self._post_cuda(ctx, state, sends, recvs)
        else:
            self._post_host(ctx, sends, recvs)

    def _tags(self, ops: list[Send] | list[Recv]) -> list[int]:
        """Position of each op among this rank's transfers with the same peer, in listed order."""
        seen: Counter[int] = Counter()
        tags = []
        for op in ops:
            tags.append(seen[op.peer])
            seen[op.peer] += 1
        return tags

    def _post_host(self, ctx: RunContext, sends: list[Send], recvs: list[Recv]) -> None:
        k_count = ctx.num_tensors
        works = []
        for op, tag in zip(recvs, self._tags(recvs), strict=True):
            peer = global_rank(ctx.group, op.src_rank)
            for k, t in enumerate(ctx.tensors(op.rank, op.layer, op.dst)):
                works.append(dist.irecv(t, peer, ctx.group, tag * k_count + k))
        for sop, tag in zip(sends, self._tags(sends), strict=True):
            peer = global_rank(ctx.group, sop.dst_rank)
            for k, t in enumerate(ctx.tensors(sop.rank, sop.layer, sop.src)):
                works.append(dist.isend(t, peer, ctx.group, tag * k_count + k))
        self.wait_all(works)

    def _post_cuda(self, ctx: RunContext, state: _StagedState, sends: list[Send], recvs: list[Recv]) -> None:
        host_send, host_recv, stream = state.host_send, state.host_recv, state.stream
        assert host_send is not None and host_recv is not None
        deadline = self.deadline()
        # Receives first, so peers' sends find them posted.
        recv_works = []
        for j, (op, tag) in enumerate(zip(recvs, self._tags(recvs), strict=True)):
            recv_works.append(dist.irecv(host_recv[j], global_rank(ctx.group, op.src_rank), ctx.group, tag))
        # Device -> host on a side stream, after whatever the compute stream wrote.
        stream.wait_stream(torch.cuda.current_stream(ctx.device))
        events = []
        with torch.cuda.stream(stream):
            for j, sop in enumerate(sends):
                pack_expert(host_send[j], ctx.tensors(sop.rank, sop.layer, sop.src))
                event = torch.cuda.Event()  # type: ignore[no-untyped-call]
                event.record(stream)
                events.append(event)
        send_works = []
        for j, (sop, tag) in enumerate(zip(sends, self._tags(sends), strict=True)):
            events[j].synchronize()  # send each expert as soon as its copy is done
            send_works.append(dist.isend(host_send[j], global_rank(ctx.group, sop.dst_rank), ctx.group, tag))
        for j, op in enumerate(recvs):
            deadline.wait(recv_works[j])
            unpack_expert(host_recv[j], ctx.tensors(op.rank, op.layer, op.dst))
        self.wait_all(send_works, deadline)
        # The host rows are reused next round: the host-to-device copies must be done.
        torch.cuda.current_stream(ctx.device).synchronize()

