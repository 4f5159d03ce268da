"""Choosing an executor: an explicit choice wins; else candidates are asked in order.

Candidates for CUDA weights: one node -> ``p2p`` (NVLink all-peer groups reach the link ceiling:
306-327 GB/s per GPU measured on 4 H200s), then ``alltoall``, then ``cpu_staged``; several nodes ->
the candidates sorted by the throughput each is predicted to reach on the topology's links
(`predicted_gbps`; ties keep the order above, since p2p needs neither packing copies nor packed
buffers). CPU weights -> ``cpu_staged`` (gloo), then ``alltoall``. ``local`` runs every rank in
one process and is only used when named. If no candidate fits, the error lists each and why it
declined: no silent fallback.
"""

from __future__ import annotations

from collections.abc import Mapping

from eplb.executors.alltoall import AllToAllExecutor
from eplb.executors.base import Executor, ExecutorError
from eplb.executors.cpu_staged import CpuStagedExecutor
from eplb.executors.local import LocalExecutor
from eplb.executors.p2p import P2PExecutor
from eplb.ir.topology import Topology, Transport

__all__ = ["EXECUTORS", "executor_class", "predicted_gbps", "select_executor"]

EXECUTORS: Mapping[str, type[Executor]] = {
    cls.name: cls for cls in (LocalExecutor, P2PExecutor, AllToAllExecutor, CpuStagedExecutor)
}


def executor_class(name: str) -> type[Executor]:
    """The backend registered as ``name``; the error lists the names."""
    try:
        return EXECUTORS[name]
    except KeyError:
        raise ExecutorError(
            f"unknown executor {name!r}; choose one of {', '.join(sorted(EXECUTORS))}."
        ) from None


def predicted_gbps(name: str, topology: Topology) -> float:
    """Per-rank GB/s a backend is predicted to reach on ``topology``'s slowest link in use.

    p2p and alltoall move GPU memory straight over the links (NVLink in a node, GPUDirect NICs
    across nodes); cpu_staged pipelines host copies with the network, so it runs at the slower
    of the two (and needs the host path even inside a node).
    """
    bw = topology.bandwidth
    link = bw.inter_node_gbps if topology.num_nodes > 1 else bw.intra_node_gbps
    if name == CpuStagedExecutor.name:
        network = bw.inter_node_gbps if topology.num_nodes > 1 else bw.host_device_gbps
        return min(network, bw.host_device_gbps)
    return link


def select_executor(
    topology: Topology,
    preferred: str | None = None,
    *,
    device_type: str = "cuda",
    config: Executor.Config | None = None,
) -> Executor:
    """An executor for ``topology`` with weights on ``device_type`` ("cuda" or "cpu")."""
    if preferred is not None:
        cls = executor_class(preferred)
        reason = cls.supports(topology, device_type=device_type)
        if reason is not None:
            raise ExecutorError(
                f"executor {preferred!r} cannot run on {topology} with {device_type} weights: {reason}; "
                "choose another backend, or pass preferred=None to pick one."
            )
        return cls(config)
    if device_type == "cuda":
        names = ["p2p", "alltoall", "cpu_staged"]
        if topology.num_nodes > 1:
            names.sort(key=lambda n: -predicted_gbps(n, topology))
    else:
        names = ["cpu_staged", "alltoall"]
    declined = []
    for name in names:
        cls = EXECUTORS[name]
        reason = cls.supports(topology, device_type=device_type)
        if reason is None:
            return cls(config if config is not None and isinstance(config, cls.Config) else None)
        declined.append(f"  - {name}: {reason}")
    transports = ", ".join(t.value for t in topology.transports)
    raise ExecutorError(
        f"no executor can run on {topology} with {device_type} weights (transports: {transports}):\n"
        + "\n".join(declined)
        + f"\nadd a transport the cluster has (e.g. {Transport.HOST.value!r} for cpu_staged), or "
        "name a backend with preferred=."
    )
