"""Hypothesis strategies shared by the test tiers: topologies, placements, load matrices, ops."""

from __future__ import annotations

from typing import Any

import numpy as np
from hypothesis import strategies as st

from eplb.ir import (
    Bandwidth,
    Copy,
    LayerPlan,
    Loc,
    MigrationPlan,
    ModelPlacement,
    Op,
    Placement,
    Recv,
    Send,
    Topology,
    Transport,
)

Draw = Any


@st.composite
def topologies(
    draw: Draw,
    *,
    max_ranks: int = 64,
    max_nodes: int = 8,
    max_slots_per_rank: int = 16,
    min_ranks: int = 1,
) -> Topology:
    """1-64 ranks over 1-8 nodes (nodes divide ranks evenly), 1-16 slots per rank."""
    num_nodes = draw(st.integers(1, max_nodes))
    per_node = draw(st.integers(max(1, -(-min_ranks // num_nodes)), max(1, max_ranks // num_nodes)))
    bandwidth = draw(
        st.builds(
            Bandwidth,
            intra_node_gbps=st.floats(1.0, 1000.0),
            inter_node_gbps=st.floats(1.0, 1000.0),
            host_device_gbps=st.floats(1.0, 1000.0),
        )
    )
    transports = draw(st.lists(st.sampled_from(list(Transport)), min_size=1, max_size=3, unique=True))
    return Topology.uniform(
        num_nodes * per_node,
        draw(st.integers(1, max_slots_per_rank)),
        num_nodes,
        bandwidth=bandwidth,
        transports=tuple(transports),
    )


@st.composite
def placements(
    draw: Draw,
    *,
    num_ranks: int | None = None,
    slots_per_rank: int | None = None,
    num_logical_experts: int | None = None,
    max_ranks: int = 16,
    max_slots_per_rank: int = 8,
) -> Placement:
    """A valid one-layer placement: every expert placed, the rest replicas of random experts."""
    r = num_ranks if num_ranks is not None else draw(st.integers(1, max_ranks))
    s = slots_per_rank if slots_per_rank is not None else draw(st.integers(1, max_slots_per_rank))
    p = r * s
    e = num_logical_experts if num_logical_experts is not None else draw(st.integers(1, p))
    extra = draw(st.lists(st.integers(0, e - 1), min_size=p - e, max_size=p - e))
    p2l = draw(st.permutations(list(range(e)) + extra))
    return Placement(num_logical_experts=e, num_ranks=r, physical_to_logical=p2l)


@st.composite
def model_placements(
    draw: Draw,
    *,
    num_layers: int | None = None,
    num_ranks: int | None = None,
    slots_per_rank: int | None = None,
    num_logical_experts: int | None = None,
    max_layers: int = 4,
) -> ModelPlacement:
    first = draw(
        placements(
            num_ranks=num_ranks, slots_per_rank=slots_per_rank, num_logical_experts=num_logical_experts
        )
    )
    n = num_layers if num_layers is not None else draw(st.integers(1, max_layers))
    rest = [
        draw(
            placements(
                num_ranks=first.num_ranks,
                slots_per_rank=first.slots_per_rank,
                num_logical_experts=first.num_logical_experts,
            )
        )
        for _ in range(n - 1)
    ]
    return ModelPlacement(layers=(first, *rest))


@st.composite
def placement_pairs(draw: Draw, **kwargs: Any) -> tuple[ModelPlacement, ModelPlacement]:
    """(current, target) of one model shape: random, or the target a few swaps away."""
    current = draw(model_placements(**kwargs))
    target = draw(
        model_placements(
            num_layers=current.num_layers,
            num_ranks=current.num_ranks,
            slots_per_rank=current.slots_per_rank,
            num_logical_experts=current.num_logical_experts,
        )
    )
    return current, target


@st.composite
def load_matrices(
    draw: Draw, *, num_layers: int | None = None, num_logical_experts: int | None = None
) -> np.ndarray:
    """``[num_layers, num_logical_experts]`` non-negative loads: uniform, Zipf-like or sparse."""
    num_l = num_layers if num_layers is not None else draw(st.integers(1, 4))
    num_e = num_logical_experts if num_logical_experts is not None else draw(st.integers(1, 64))
    shape = draw(st.sampled_from(["uniform", "zipf", "sparse", "integer"]))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    if shape == "uniform":
        load = rng.uniform(0, 100, size=(num_l, num_e))
    elif shape == "zipf":
        ranks = np.argsort(rng.random((num_l, num_e)), axis=1) + 1
        load = 1000.0 / ranks ** draw(st.floats(0.5, 2.0))
    elif shape == "sparse":
        load = rng.uniform(0, 100, size=(num_l, num_e)) * (rng.random((num_l, num_e)) < 0.3)
    else:
        load = rng.integers(0, 1000, size=(num_l, num_e)).astype(np.float64)
    return load


@st.composite
def ops(draw: Draw, *, topology: Topology, num_logical_experts: int, layer: int = 0) -> Op:
    """A structurally valid op on ``topology`` (not necessarily a useful one)."""
    r, s = topology.num_ranks, topology.slots_per_rank
    locs = st.one_of(st.builds(Loc.slot, st.integers(0, s - 1)), st.builds(Loc.buffer, st.integers(0, 3)))
    expert = st.integers(0, num_logical_experts - 1)
    kinds = ["copy"] + (["send", "recv"] if r > 1 else [])
    kind = draw(st.sampled_from(kinds))
    if kind == "copy":
        src = draw(locs)
        dst = draw(locs.filter(lambda loc: loc != src))
        return Copy(layer=layer, rank=draw(st.integers(0, r - 1)), src=src, dst=dst, expert=draw(expert))
    a = draw(st.integers(0, r - 1))
    b = draw(st.integers(0, r - 1).filter(lambda x: x != a))
    tid = draw(st.integers(0, 10_000))
    if kind == "send":
        return Send(layer=layer, transfer_id=tid, src_rank=a, dst_rank=b, src=draw(locs), expert=draw(expert))
    return Recv(layer=layer, transfer_id=tid, src_rank=a, dst_rank=b, dst=draw(locs), expert=draw(expert))


@st.composite
def migration_plans(draw: Draw) -> MigrationPlan:
    """A structurally valid plan (ops in range); its ops need not reach the target."""
    topo = draw(topologies(max_ranks=8, max_slots_per_rank=6))
    current, target = draw(placement_pairs(num_ranks=topo.num_ranks, slots_per_rank=topo.slots_per_rank))
    num_e = current.num_logical_experts
    layers = [
        LayerPlan(
            layer=i,
            ops=tuple(draw(st.lists(ops(topology=topo, num_logical_experts=num_e, layer=i), max_size=6))),
        )
        for i in range(current.num_layers)
    ]
    expert_bytes = draw(st.integers(1, 2**40))
    return MigrationPlan(
        topology=topo, expert_bytes=expert_bytes, current=current, target=target, layers=tuple(layers)
    )
