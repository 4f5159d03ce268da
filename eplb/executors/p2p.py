"""The p2p executor: one ``batch_isend_irecv`` group per round (NCCL on GPUs; gloo works too).

Each Send / Recv becomes one P2P call per weight tensor, posted in the order the schedule lists
them, so the calls to one peer match on both sides. A round with ``n`` transfers on a rank posts
``n * num_tensors`` calls: schedule with ``max_ops_per_group`` set with that factor in mind
(NCCL splits larger groups into launches that can disagree across ranks, pytorch#174288).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import attrs
import torch
import torch.distributed as dist

from eplb.executors.base import Executor, RunContext, RunState, gpu_link_reason
from eplb.ir.ops import Recv, Send
from eplb.ir.schedule import Schedule
from eplb.ir.topology import Topology

__all__ = ["P2PExecutor", "global_rank", "peers_of"]


def global_rank(group: Any, rank: int) -> int:
    """The global rank of ``rank`` of ``group`` (what P2P calls take)."""
    if group is None or group is dist.GroupMember.WORLD:
        return rank
    return dist.get_global_rank(group, rank)


def peers_of(schedule_or_topology: Schedule | Topology, rank: int) -> list[int]:
    """Ranks that ``rank`` exchanges with: in the schedule, or every other rank of a topology."""
    if isinstance(schedule_or_topology, Topology):
        return [r for r in range(schedule_or_topology.num_ranks) if r != rank]
    peers = {op.peer for rnd in schedule_or_topology.rounds for op in rnd.transfers if op.rank == rank}
    return sorted(peers)


@attrs.define
class _P2PState(RunState):
    """The round's P2P calls, and the global rank of each peer (looked up once per run)."""

    ops: list[dist.P2POp] = attrs.field(factory=list)
    global_ranks: dict[int, int] = attrs.field(factory=dict)


class P2PExecutor(Executor):
    """NCCL (or gloo) ``batch_isend_irecv``, one group per round, staging pool reused by all rounds."""

    name = "p2p"

    @classmethod
    def supports(cls, topology: Topology, *, device_type: str = "cuda") -> str | None:
        if device_type != "cuda":
            return f"it runs NCCL on CUDA devices; the weights are on {device_type!r} (use cpu_staged)"
        return gpu_link_reason(topology)

    def max_transfers_per_group(self, tensors_per_expert: int) -> int | None:
        # Every transfer is one NCCL call per weight tensor, and NCCL groups of more than 256
        # calls can hang (pytorch#174288).
        return max(1, 256 // max(1, tensors_per_expert))

    def setup(self, ctx: RunContext) -> RunState:
        super().setup(ctx)
        return _P2PState()

    def begin_transfers(self, ctx: RunContext) -> None:
        self._state(ctx).ops.clear()

    def _peer(self, ctx: RunContext, peer: int) -> int:
        table = self._state(ctx).global_ranks
        if peer not in table:
            table[peer] = global_rank(ctx.group, peer)
        return table[peer]

    def send(self, op: Send, ctx: RunContext) -> None:
        peer = self._peer(ctx, op.dst_rank)
        for t in ctx.tensors(op.src_rank, op.layer, op.src):
            self._state(ctx).ops.append(dist.P2POp(dist.isend, t, peer, ctx.group))
        ctx.bytes_sent += ctx.expert_bytes

    def recv(self, op: Recv, ctx: RunContext) -> None:
        peer = self._peer(ctx, op.src_rank)
        for t in ctx.tensors(op.dst_rank, op.layer, op.dst):
            self._state(ctx).ops.append(dist.P2POp(dist.irecv, t, peer, ctx.group))
        ctx.bytes_received += ctx.expert_bytes

    def post(self, ctx: RunContext) -> None:
        ops = self._state(ctx).ops
        if ops:
            self.wait_all(dist.batch_isend_irecv(ops))
            ops.clear()

    @staticmethod
    def _state(ctx: RunContext) -> _P2PState:
        assert isinstance(ctx.state, _P2PState)
        return ctx.state

    def warmup(
        self,
        schedule_or_topology: Schedule | Topology,
        group: Any = None,
        *,
        device: torch.device | str | None = None,
    ) -> list[int]:
        """Open every peer connection ahead with a tiny exchange; returns the peers touched.

        NCCL connects P2P peers lazily, on the first call to each, which made vLLM's first
        rearrangement 10x slower than later ones; the runtime calls this in its profile step.
        Every rank must call it with the same argument. Pass a schedule to connect only the
        peers it uses, or a topology to connect all.
        """
        me = dist.get_rank(group)
        if device is None:
            device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else "cpu"
        peers = peers_of(schedule_or_topology, me)
        if not peers:
            return []
        out = [torch.full((1,), me, dtype=torch.int32, device=device) for _ in peers]
        inp = [torch.empty(1, dtype=torch.int32, device=device) for _ in peers]
        self.wait_all(dist.batch_isend_irecv(_exchange_ops(group, peers, out, inp)))
        return peers


def _exchange_ops(
    group: Any, peers: Iterable[int], out: list[torch.Tensor], inp: list[torch.Tensor]
) -> list[dist.P2POp]:
    ops = []
    for i, peer in enumerate(peers):
        g = global_rank(group, peer)
        ops.append(dist.P2POp(dist.isend, out[i], g, group))
        ops.append(dist.P2POp(dist.irecv, inp[i], g, group))
    return ops
