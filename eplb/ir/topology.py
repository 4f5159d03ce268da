"""The cluster a plan runs on: ranks, the node of each, slots per rank, links and transports."""

from __future__ import annotations

import enum

import attrs

from eplb.ir._validate import int_tuple, positive, positive_int
from eplb.ir.errors import InvalidValueError

__all__ = ["Bandwidth", "LinkClass", "Topology", "Transport"]


class _Enum(enum.Enum):
    def __repr__(self) -> str:  # valid Python, so a failing value can be pasted back
        return f"{type(self).__name__}.{self.name}"


class LinkClass(_Enum):
    """How two ranks are connected."""

    LOCAL = "local"  # the same rank: a device-to-device copy
    INTRA_NODE = "intra_node"  # NVLink / PCIe inside one node
    INTER_NODE = "inter_node"  # NICs (RDMA or TCP) between nodes


class Transport(_Enum):
    """What can carry expert weights between ranks."""

    P2P = "p2p"  # GPU peer access inside a node (NVLink / PCIe P2P)
    GPUDIRECT = "gpudirect"  # GPU memory straight to the NIC across nodes
    HOST = "host"  # device -> pinned host memory -> network -> host -> device


@attrs.frozen(kw_only=True)
class Bandwidth:
    """Achievable one-direction bandwidth per rank in GB/s (1e9 bytes/s) for each link class."""

    intra_node_gbps: float = attrs.field(validator=positive)
    inter_node_gbps: float = attrs.field(validator=positive)
    host_device_gbps: float = attrs.field(validator=positive)

    def of(self, link: LinkClass) -> float:
        if link is LinkClass.INTER_NODE:
            return self.inter_node_gbps
        return self.intra_node_gbps


# Defaults from measurements on 4x H200 over NVLink (2026-11-28, before this repository): all-peer
# groups reach ~306-327 GB/s per GPU per direction; pinned host<->device 22-55 GB/s (54.6 measured
# in docs/gpu_runs.md). Inter-node: one 400 Gb/s NIC per GPU.
H200_NVLINK = Bandwidth(intra_node_gbps=300.0, inter_node_gbps=45.0, host_device_gbps=25.0)


@attrs.frozen(kw_only=True, cache_hash=True)
class Topology:
    """Ranks (GPUs), the node each sits on, and what connects them.

    ``rank_to_node: [num_ranks]`` numbers nodes ``0..num_nodes-1``. ``slots_per_rank`` is the size
    of each rank's expert buffer (``weights[layer][k].shape[0]``). ``round_latency_us`` is the
    fixed cost of one communication round (launch + synchronisation), used by the cost model.
    """

    num_ranks: int = attrs.field(validator=positive_int)
    slots_per_rank: int = attrs.field(validator=positive_int)
    rank_to_node: tuple[int, ...] = attrs.field(converter=int_tuple)
    bandwidth: Bandwidth = H200_NVLINK
    transports: tuple[Transport, ...] = (Transport.P2P, Transport.GPUDIRECT, Transport.HOST)
    round_latency_us: float = attrs.field(default=50.0, validator=positive)

    def __attrs_post_init__(self) -> None:
        if len(self.rank_to_node) != self.num_ranks:
            raise InvalidValueError(
                "rank_to_node",
                f"must have one entry per rank, num_ranks ({self.num_ranks}) (got {len(self.rank_to_node)}).",
            )
        nodes = sorted(set(self.rank_to_node))
        if nodes != list(range(len(nodes))):
            raise InvalidValueError(
                "rank_to_node", f"must number nodes 0..N-1 without gaps (got nodes {nodes})."
            )
        if not self.transports:
            raise InvalidValueError("transports", "must name at least one transport (got none).")
        if len(set(self.transports)) != len(self.transports):
            raise InvalidValueError("transports", f"must not repeat a transport (got {self.transports}).")

    @classmethod
    def uniform(
        cls,
        num_ranks: int,
        slots_per_rank: int,
        num_nodes: int = 1,
        **kwargs: object,
    ) -> Topology:
        """``num_ranks`` ranks split evenly and contiguously over ``num_nodes`` nodes."""
        if num_nodes <= 0 or num_ranks % num_nodes:
            raise InvalidValueError(
                "num_nodes",
                f"must divide num_ranks ({num_ranks}) (got {num_nodes}); "
                "pass rank_to_node to Topology(...) for uneven nodes.",
            )
        per_node = num_ranks // num_nodes
        return cls(
            num_ranks=num_ranks,
            slots_per_rank=slots_per_rank,
            rank_to_node=tuple(r // per_node for r in range(num_ranks)),
            **kwargs,  # type: ignore[arg-type]
        )

    @property
    def num_nodes(self) -> int:
        return max(self.rank_to_node) + 1

    @property
    def num_physical_experts(self) -> int:
        return self.num_ranks * self.slots_per_rank

    def node_of(self, rank: int) -> int:
        return self.rank_to_node[rank]

    def link(self, a: int, b: int) -> LinkClass:
        if a == b:
            return LinkClass.LOCAL
        if self.rank_to_node[a] == self.rank_to_node[b]:
            return LinkClass.INTRA_NODE
        return LinkClass.INTER_NODE

    def __str__(self) -> str:
        return (
            f"Topology({self.num_ranks} ranks x {self.slots_per_rank} slots on {self.num_nodes} "
            f"node(s); {self.bandwidth.intra_node_gbps:g}/{self.bandwidth.inter_node_gbps:g}/"
            f"{self.bandwidth.host_device_gbps:g} GB/s intra/inter/host; "
            f"{','.join(t.value for t in self.transports)})"
        )
