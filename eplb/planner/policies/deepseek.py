"""DeepSeek's EPLB greedy (github.com/deepseek-ai/EPLB, ``eplb.py``), ported to numpy.

The compatibility baseline, and what vLLM and SGLang ship. Three greedy steps:

1. ``balanced_packing`` of expert groups onto nodes (hierarchical mode only);
2. ``replicate_experts``: each redundant slot goes to the expert with the highest load per replica;
3. ``balanced_packing`` of the replicas onto ranks: heaviest first, each to the lightest rank
   that still has a free slot.

Hierarchical when ``num_groups % num_nodes == 0`` (replicas stay on their group's node), else one
global pass. Arithmetic is float32 as in the reference. Sorting breaks ties by index (stable);
the reference's ``torch.sort`` is unstable on rows longer than 16, so on loads where two
*different* experts tie exactly the two may be placed differently. Functions are vectorised over
layers (the reference loops over them in Python) and return the reference's arrays.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

from eplb.ir.placement import ModelPlacement
from eplb.ir.topology import Topology
from eplb.planner.policies import register_policy
from eplb.planner.policies._common import is_uniform_nodes, to_model_placement

__all__ = [
    "balanced_packing",
    "busiest_rank_floor",
    "deepseek",
    "deepseek_array",
    "is_uniform_nodes",
    "rebalance_experts",
    "rebalance_experts_hierarchical",
    "replicate_experts",
    "to_model_placement",
]

I64 = npt.NDArray[np.int64]
F32 = npt.NDArray[np.floating[Any]]  # float32 in the reference; any float works


def balanced_packing(weight: F32, num_packs: int) -> tuple[I64, I64]:
    """Pack ``n`` weighted items into ``num_packs`` packs of exactly ``n / num_packs`` items each.

    ``weight: [X, n]``. Returns ``pack_index: [X, n]`` and ``rank_in_pack: [X, n]``.
    """
    rows_n, n = weight.shape
    per_pack = n // num_packs
    if per_pack == 1:
        return np.broadcast_to(np.arange(n, dtype=np.int64), (rows_n, n)).copy(), np.zeros(
            (rows_n, n), dtype=np.int64
        )
    order = np.argsort(-weight, axis=1, kind="stable")
    pack_index = np.full((rows_n, n), -1, dtype=np.int64)
    rank_in_pack = np.full((rows_n, n), -1, dtype=np.int64)
    pack_w = np.zeros((rows_n, num_packs), dtype=weight.dtype)
    pack_n = np.zeros((rows_n, num_packs), dtype=np.int64)
    rows = np.arange(rows_n)
    inf = np.array(np.inf, dtype=weight.dtype)
    for k in range(n):
        item = order[:, k]
        # The lightest pack with room; argmin takes the first on ties, as Python's min() does.
        pack = np.argmin(np.where(pack_n < per_pack, pack_w, inf), axis=1)
        pack_index[rows, item] = pack
        rank_in_pack[rows, item] = pack_n[rows, pack]
        pack_w[rows, pack] += weight[rows, item]
        pack_n[rows, pack] += 1
    return pack_index, rank_in_pack


def replicate_experts(weight: F32, num_phy: int) -> tuple[I64, I64, I64]:
    """Replicate ``num_log`` experts into ``num_phy`` slots, minimising the max load per replica.

    ``weight: [X, num_log]``. Returns ``phy2log: [X, num_phy]``, ``rank: [X, num_phy]`` (replica
    index within its expert) and ``logcnt: [X, num_log]``.
    """
    rows_n, num_log = weight.shape
    phy2log = np.tile(np.arange(num_phy, dtype=np.int64), (rows_n, 1))
    rank = np.zeros((rows_n, num_phy), dtype=np.int64)
    logcnt = np.ones((rows_n, num_log), dtype=np.int64)
    rows = np.arange(rows_n)
    for i in range(num_log, num_phy):
        idx = np.argmax(weight / logcnt.astype(weight.dtype), axis=1)
        phy2log[:, i] = idx
        rank[:, i] = logcnt[rows, idx]
        logcnt[rows, idx] += 1
    return phy2log, rank, logcnt


def _inverse(perm: I64) -> I64:
    inv = np.empty_like(perm)
    np.put_along_axis(inv, perm, np.broadcast_to(np.arange(perm.shape[1]), perm.shape), axis=1)
    return inv


def _groups_and_replicas(
    weight: F32, num_physical_experts: int, num_groups: int, num_nodes: int
) -> tuple[I64, I64, F32, I64, I64, I64]:
    """Steps 1 and 2 of the hierarchical greedy; rows of the later arrays are (layer, node)."""
    num_layers, num_log = weight.shape
    group_size = num_log // num_groups
    groups_per_node = num_groups // num_nodes

    # Step 1: pack groups to nodes.
    tokens_per_group = weight.reshape(num_layers, num_groups, group_size).sum(-1)
    group_pack, group_rank = balanced_packing(tokens_per_group, num_nodes)
    log2mlog = (
        ((group_pack * groups_per_node + group_rank) * group_size)[:, :, None] + np.arange(group_size)
    ).reshape(num_layers, num_log)
    mlog2log = _inverse(log2mlog)

    # Step 2: replicate within nodes. Rows are (layer, node): [num_layers * num_nodes, num_log / num_nodes].
    tokens_per_mlog = np.take_along_axis(weight, mlog2log, axis=1).reshape(-1, num_log // num_nodes)
    phy2mlog, phyrank, mlogcnt = replicate_experts(tokens_per_mlog, num_physical_experts // num_nodes)
    return log2mlog, mlog2log, tokens_per_mlog, phy2mlog, phyrank, mlogcnt


def busiest_rank_floor(
    weight: Any, num_physical_experts: int, num_groups: int, num_nodes: int, num_gpus: int
) -> npt.NDArray[np.float64]:
    """``[num_layers]``: a lower bound on the busiest rank of `rebalance_experts`' placement, from
    its first two steps only (cheap): a node's load spreads over at most its GPUs, and a replica
    is not split. Lets a caller skip running the full greedy where it cannot win."""
    w = np.asarray(weight, dtype=np.float32)
    if num_groups % num_nodes:
        num_groups, num_nodes = 1, 1
    _, _, tokens, _, _, cnt = _groups_and_replicas(w, num_physical_experts, num_groups, num_nodes)
    tokens64 = tokens.astype(np.float64)
    per_row = np.maximum(tokens64.sum(axis=1) / (num_gpus // num_nodes), (tokens64 / cnt).max(axis=1))
    # float32 rounding in the greedy's own arithmetic: shade the bound so it stays a bound.
    return np.asarray(per_row.reshape(w.shape[0], num_nodes).max(axis=1) * (1 - 1e-6))


def rebalance_experts_hierarchical(
    weight: F32, num_physical_experts: int, num_groups: int, num_nodes: int, num_gpus: int
) -> tuple[I64, I64, I64]:
    """Groups to nodes, replicas within nodes, replicas to GPUs.

    ``weight: [num_layers, num_logical_experts]``. Returns ``phy2log: [num_layers,
    num_physical_experts]``, ``phyrank`` (same shape) and ``logcnt: [num_layers, num_logical_experts]``.
    """
    num_layers, num_log = weight.shape
    per_gpu = num_physical_experts // num_gpus
    log2mlog, mlog2log, tokens_per_mlog, phy2mlog, phyrank, mlogcnt = _groups_and_replicas(
        weight, num_physical_experts, num_groups, num_nodes
    )

    # Step 3: pack replicas to the GPUs of each node.
    tokens_per_phy = np.take_along_axis(tokens_per_mlog / mlogcnt.astype(weight.dtype), phy2mlog, axis=1)
    pack_index, rank_in_pack = balanced_packing(tokens_per_phy, num_gpus // num_nodes)
    pphy2phy = _inverse(pack_index * per_gpu + rank_in_pack)

    pphy2mlog = np.take_along_axis(phy2mlog, pphy2phy, axis=1)
    offsets = np.arange(0, num_log, num_log // num_nodes)[None, :, None]
    pphy2mlog = (pphy2mlog.reshape(num_layers, num_nodes, -1) + offsets).reshape(num_layers, -1)
    pphy2log = np.take_along_axis(mlog2log, pphy2mlog, axis=1)
    pphyrank = np.take_along_axis(phyrank, pphy2phy, axis=1).reshape(num_layers, -1)
    logcnt = np.take_along_axis(mlogcnt.reshape(num_layers, -1), log2mlog, axis=1)
    return pphy2log, pphyrank, logcnt


def rebalance_experts(
    weight: Any, num_replicas: int, num_groups: int, num_nodes: int, num_gpus: int
) -> tuple[I64, I64, I64]:
    """The reference entry point: ``(physical_to_logical, logical_to_physical, logical_count)``.

    ``weight: [num_layers, num_logical_experts]``; ``logical_to_physical`` is
    ``[num_layers, num_logical_experts, num_replicas - num_logical_experts + 1]``, -1 padded.
    """
    w = np.asarray(weight, dtype=np.float32)
    num_layers, num_log = w.shape
    if num_groups % num_nodes == 0:
        phy2log, phyrank, logcnt = rebalance_experts_hierarchical(
            w, num_replicas, num_groups, num_nodes, num_gpus
        )
    else:
        phy2log, phyrank, logcnt = rebalance_experts_hierarchical(w, num_replicas, 1, 1, num_gpus)
    width = num_replicas - num_log + 1
    log2phy = np.full((num_layers, num_log * width), -1, dtype=np.int64)
    np.put_along_axis(
        log2phy, phy2log * width + phyrank, np.broadcast_to(np.arange(num_replicas), phy2log.shape), axis=1
    )
    return phy2log, log2phy.reshape(num_layers, num_log, width), logcnt


def deepseek_array(load: Any, topology: Topology, num_groups: int) -> I64:
    """`deepseek`'s ``physical_to_logical: [num_layers, num_physical_experts]`` as an array."""
    num_nodes = topology.num_nodes if is_uniform_nodes(topology) else 1
    # The reference goes global when groups do not split evenly over nodes (num_nodes=1 does that).
    if num_groups % num_nodes:
        num_groups, num_nodes = 1, 1
    phy2log, _, _ = rebalance_experts(
        load, topology.num_physical_experts, num_groups, num_nodes, topology.num_ranks
    )
    return phy2log


@register_policy("deepseek")
def deepseek(
    load: npt.NDArray[np.float64],
    topology: Topology,
    *,
    num_groups: int,
    current: ModelPlacement | None = None,
) -> ModelPlacement:
    """DeepSeek's greedy; ignores ``current``. Hierarchical when ``num_groups % num_nodes == 0``
    and nodes are uniform (the reference's assumption), else global."""
    return to_model_placement(deepseek_array(load, topology, num_groups), topology.num_ranks, load.shape[1])
