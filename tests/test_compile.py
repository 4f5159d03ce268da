"""Tier 1 (pure Python): `compile_plan` emits a valid sequential program with few transfers and
little staging, and picks sources same rank, then same node, then evenly."""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import given

from eplb.ir import (
    Copy,
    InvalidValueError,
    MigrationPlan,
    ModelPlacement,
    Recv,
    Round,
    Schedule,
    ScheduleLimits,
    Send,
    Topology,
)
from eplb.planner.compile import compile_plan
from eplb.planner.verify import verify
from tests.test_schedule import cases


def sequential(plan: MigrationPlan) -> Schedule:
    """The plan as listed, one step per round: a copy alone, or a Send with its Recv."""
    rounds = []
    ops = list(plan.ops())
    i = 0
    while i < len(ops):
        op = ops[i]
        if isinstance(op, Copy):
            rounds.append(Round(before=[op]))
            i += 1
        else:
            rounds.append(Round(transfers=[op, ops[i + 1]]))
            i += 2
    buffers = [loc.index for op in ops for loc in _locs(op) if loc.is_buffer]
    return Schedule(
        plan=plan,
        limits=ScheduleLimits(),
        rounds=rounds,
        rounds_lower_bound=0,
        staging_buffers_per_rank=max(buffers, default=-1) + 1,
    )


def _locs(op: Send | Recv | Copy) -> tuple:
    return (op.src, op.dst) if isinstance(op, Copy) else (op.src,) if isinstance(op, Send) else (op.dst,)


def needed_transfers(current: ModelPlacement, target: ModelPlacement) -> int:
    """(layer, rank, expert) the target wants on a rank that does not hold it now."""
    s = current.slots_per_rank
    n = 0
    for cur, tgt in zip(current.layers, target.layers, strict=True):
        for r in range(tgt.num_ranks):
            have = set(cur.rank_slots(r)) if r < cur.num_ranks else set()
            changed = {
                e
                for j, e in enumerate(tgt.rank_slots(r))
                if r >= cur.num_ranks or cur.physical_to_logical[r * s + j] != e
            }
            n += len(changed - have)
    return n


@given(cases())
def test_plan_is_a_valid_sequential_program(case: tuple[ModelPlacement, ModelPlacement, Topology]) -> None:
    current, target, topo = case
    plan = compile_plan(current, target, topo, expert_bytes=8)
    verify(sequential(plan))
    assert plan.transfers == needed_transfers(current, target)
    for op in plan.ops():
        if isinstance(op, Send):
            assert op.src_rank < current.num_ranks  # joining ranks only receive
            assert not op.src.is_buffer  # every Send reads a pre-plan slot
        if isinstance(op, Recv):
            assert op.dst_rank < target.num_ranks  # leaving ranks only send


@given(cases())
def test_transfers_precede_copies(case: tuple[ModelPlacement, ModelPlacement, Topology]) -> None:
    """The order the scheduler relies on: no Send reads a location an earlier op wrote."""
    current, target, topo = case
    plan = compile_plan(current, target, topo, expert_bytes=8)
    for lp in plan.layers:
        kinds = [op.kind for op in lp.ops]
        assert "copy" not in kinds or "send" not in kinds[kinds.index("copy") :]
        written = {(op.dst_rank, op.dst) for op in lp.ops if isinstance(op, Recv)}
        assert not any((op.src_rank, op.src) in written for op in lp.ops if isinstance(op, Send))


def test_unchanged_placement_has_no_ops() -> None:
    cur = ModelPlacement.trivial(num_layers=3, num_logical_experts=6, num_physical_experts=8, num_ranks=4)
    plan = compile_plan(cur, cur, Topology.uniform(4, 2), 10)
    assert list(plan.ops()) == []


def test_same_rank_copy_first() -> None:
    """Rank 0 holds e0 twice after the move, rank 1 swaps its two experts: local copies only."""
    cur = ModelPlacement.from_lists([[0, 1, 2, 1]], num_ranks=2)
    tgt = ModelPlacement.from_lists([[0, 0, 1, 2]], num_ranks=2)
    plan = compile_plan(cur, tgt, Topology.uniform(2, 2), 10)
    assert plan.transfers == 0
    rank0 = [
        (str(op.src), str(op.dst), op.expert) for op in plan.ops() if isinstance(op, Copy) and op.rank == 0
    ]
    assert rank0 == [("s0", "s1", 0)]
    verify(sequential(plan))


def test_same_node_source_and_even_spread() -> None:
    topo = Topology.uniform(4, 2, num_nodes=2)
    # e0 on rank 0 (node 0) and rank 2 (node 1); rank 3's redundant slot s1 wants e0.
    cur = ModelPlacement.from_lists([[0, 1, 2, 3, 0, 4, 5, 5]], num_ranks=4)
    tgt = ModelPlacement.from_lists([[0, 1, 2, 3, 0, 4, 5, 0]], num_ranks=4)
    (send,) = [op for op in compile_plan(cur, tgt, topo, 10).ops() if isinstance(op, Send)]
    assert (send.src_rank, send.dst_rank) == (2, 3)
    # Rank 3 (node 1) wants e0 and e1, each held by ranks 0 and 1 (node 0): one from each.
    cur = ModelPlacement.from_lists([[0, 1, 0, 1, 2, 3, 2, 3]], num_ranks=4)
    tgt = ModelPlacement.from_lists([[0, 1, 0, 1, 2, 3, 0, 1]], num_ranks=4)
    sends = [op for op in compile_plan(cur, tgt, topo, 10).ops() if isinstance(op, Send)]
    assert sorted(op.expert for op in sends) == [0, 1]
    assert Counter(op.src_rank for op in sends) == Counter({0: 1, 1: 1})


def test_staging_only_when_needed() -> None:
    topo = Topology.uniform(2, 2)
    # Adding a replica into a slot nobody reads: no staging.
    cur = ModelPlacement.from_lists([[0, 1, 2, 2]], num_ranks=2)
    tgt = ModelPlacement.from_lists([[0, 1, 2, 0]], num_ranks=2)
    plan = compile_plan(cur, tgt, topo, 10)
    assert not any(loc.is_buffer for op in plan.ops() for loc in _locs(op))
    # A swap across ranks: each side stages exactly one buffer.
    cur = ModelPlacement.from_lists([[0, 1, 2, 3]], num_ranks=2)
    tgt = ModelPlacement.from_lists([[2, 1, 0, 3]], num_ranks=2)
    plan = compile_plan(cur, tgt, topo, 10)
    assert {(op.dst_rank, str(op.dst)) for op in plan.ops() if isinstance(op, Recv)} == {(0, "b0"), (1, "b0")}
    # A local 3-cycle on one rank: one buffer breaks it, four copies.
    topo3 = Topology.uniform(1, 3)
    cur = ModelPlacement.from_lists([[0, 1, 2]], num_ranks=1)
    tgt = ModelPlacement.from_lists([[1, 2, 0]], num_ranks=1)
    plan = compile_plan(cur, tgt, topo3, 10)
    copies = list(plan.ops())
    assert len(copies) == 4 and {str(loc) for op in copies for loc in _locs(op) if loc.is_buffer} == {"b0"}
    verify(sequential(plan))


def test_growing_and_shrinking() -> None:
    topo = Topology.uniform(4, 2)
    small = ModelPlacement.from_lists([[0, 1, 2, 3]], num_ranks=2)
    big = ModelPlacement.from_lists([[0, 1, 2, 3, 0, 1, 2, 3]], num_ranks=4)
    grow = compile_plan(small, big, topo, 10)
    assert grow.transfers == 4 and all(op.dst_rank >= 2 for op in grow.ops() if isinstance(op, Recv))
    verify(sequential(grow))
    shrink = compile_plan(big, ModelPlacement.from_lists([[3, 2, 1, 0]], num_ranks=2), topo, 10)
    verify(sequential(shrink))


def test_shape_errors_name_the_fix() -> None:
    cur = ModelPlacement.trivial(num_layers=1, num_logical_experts=4, num_physical_experts=4, num_ranks=2)
    with pytest.raises(InvalidValueError, match=r"has 2 slots per rank but the topology has 4"):
        compile_plan(cur, cur, Topology.uniform(1, 4), 10)
    with pytest.raises(InvalidValueError, match=r"spans 2 ranks but the topology has only 1"):
        compile_plan(cur, cur, Topology.uniform(1, 2), 10)
