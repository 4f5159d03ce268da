"""Predicted time of a schedule from the topology's bandwidths: `predict_seconds(schedule)`.

A round costs ``round_latency_us`` plus its slowest rank: for every rank, link class and
direction, the bytes it sends (or receives) over that class divided by the class's bandwidth;
the round waits for the largest. Rounds run one after another. Local copies are not counted
(device memory copies run an order of magnitude faster than the links and are not modelled).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable

import attrs

from eplb.ir.ops import Copy, Send, Transfer
from eplb.ir.schedule import Round, Schedule
from eplb.ir.topology import Topology

__all__ = ["LayerCost", "layer_costs", "predict_seconds", "round_seconds", "transfer_seconds"]


def round_seconds(rnd: Round, topology: Topology, expert_bytes: int, layer: int | None = None) -> float:
    """Transfer time of one round (without its latency); only ``layer``'s transfers if given."""
    return transfer_seconds(rnd.transfers, topology, expert_bytes, layer)


def transfer_seconds(
    transfers: Iterable[Transfer], topology: Topology, expert_bytes: int, layer: int | None = None
) -> float:
    """Time of one group of ``transfers`` (a round's, before it is a `Round`)."""
    load: dict[tuple[int, str, bool], int] = defaultdict(int)  # (rank, link, sending) -> bytes
    for op in transfers:
        if not isinstance(op, Send) or (layer is not None and op.layer != layer):
            continue
        link = topology.link(op.src_rank, op.dst_rank)
        load[(op.src_rank, link.value, True)] += expert_bytes
        load[(op.dst_rank, link.value, False)] += expert_bytes
    bw = topology.bandwidth
    return max(
        (
            n / (bw.inter_node_gbps if link == "inter_node" else bw.intra_node_gbps) / 1e9
            for (_, link, _), n in load.items()
        ),
        default=0.0,
    )


def predict_seconds(schedule: Schedule) -> float:
    """Sum over rounds of round latency plus the slowest rank's transfer time."""
    plan = schedule.plan
    latency = plan.topology.round_latency_us * 1e-6
    return sum(latency + round_seconds(r, plan.topology, plan.expert_bytes) for r in schedule.rounds)


@attrs.frozen(kw_only=True)
class LayerCost:
    """One layer's share of a schedule, for ``eplb inspect``.

    ``local_copies``: copies into slots the rounds run (direct landing drops some of the plan's);
    ``rounds``: rounds holding any of its ops; ``rounds_lower_bound``: its bound if scheduled
    alone; ``max_staging_buffers``: most staging buffers its ops name on one rank;
    ``predicted_seconds``: its own transfer time per round plus its share of each round's latency
    (split evenly between the layers in the round).
    """

    layer: int
    transfers: int
    local_copies: int
    bytes_moved: int
    rounds: int
    rounds_lower_bound: int
    max_staging_buffers: int
    predicted_seconds: float


def layer_costs(schedule: Schedule) -> list[LayerCost]:
    """Per-layer breakdown of ``schedule``; the whole schedule's time is `predict_seconds`."""
    from eplb.planner.schedule import (
        layer_lower_bound,
    )  # schedule imports networkx; cost is imported by light callers

    plan = schedule.plan
    latency = plan.topology.round_latency_us * 1e-6
    rounds_of: dict[int, set[int]] = defaultdict(set)
    buffers: dict[tuple[int, int], set[int]] = defaultdict(set)
    seconds: dict[int, float] = defaultdict(float)
    copies: dict[int, int] = defaultdict(int)  # local copies into slots that the rounds run
    for k, rnd in enumerate(schedule.rounds):
        layers = {op.layer for op in rnd.ops()}
        for layer in layers:
            rounds_of[layer].add(k)
            seconds[layer] += latency / len(layers) + round_seconds(
                rnd, plan.topology, plan.expert_bytes, layer
            )
        for op in rnd.ops():
            if isinstance(op, Copy) and not op.dst.is_buffer:
                copies[op.layer] += 1
            locs = (
                (op.src, op.dst) if isinstance(op, Copy) else (op.src,) if isinstance(op, Send) else (op.dst,)
            )
            for loc in locs:
                if loc.is_buffer:
                    buffers[(op.layer, op.rank)].add(loc.index)
    out = []
    for lp in plan.layers:
        staged = [len(v) for (layer, _), v in buffers.items() if layer == lp.layer]
        out.append(
            LayerCost(
                layer=lp.layer,
                transfers=lp.transfers,
                local_copies=copies[lp.layer],
                bytes_moved=lp.transfers * plan.expert_bytes,
                rounds=len(rounds_of[lp.layer]),
                rounds_lower_bound=layer_lower_bound(plan, lp.layer, schedule.limits),
                max_staging_buffers=max(staged, default=0),
                predicted_seconds=seconds[lp.layer],
            )
        )
    return out
