"""Executors: run a verified schedule's rounds on real tensors, one backend per transport.

`Executor` (the ABC, its call order in `eplb.executors.base`), backends `LocalExecutor` (every
rank in one process), `P2PExecutor` (``batch_isend_irecv`` per round), `AllToAllExecutor`
(``all_to_all_single`` per round), `CpuStagedExecutor` (device -> host -> gloo -> device), and
`select_executor(topology, preferred)`.
"""

from eplb.executors.alltoall import AllToAllExecutor
from eplb.executors.base import ExecutionError, Executor, ExecutorError, RunReport, Weights, WeightsError
from eplb.executors.cpu_staged import CpuStagedExecutor
from eplb.executors.local import LocalExecutor
from eplb.executors.p2p import P2PExecutor
from eplb.executors.select import EXECUTORS, executor_class, predicted_gbps, select_executor

__all__ = [
    "EXECUTORS",
    "AllToAllExecutor",
    "CpuStagedExecutor",
    "ExecutionError",
    "Executor",
    "ExecutorError",
    "LocalExecutor",
    "P2PExecutor",
    "RunReport",
    "Weights",
    "WeightsError",
    "executor_class",
    "predicted_gbps",
    "select_executor",
]
