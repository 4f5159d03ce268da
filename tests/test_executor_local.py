"""Tier 1: the local executor (every rank in one process) and backend selection, no processes.

Property: for random (current, target) pairs, the compiled, scheduled and verified plan run by
the local executor leaves every slot holding its target expert's bytes, in the same storage.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from eplb.executors import (
    EXECUTORS,
    ExecutionError,
    ExecutorError,
    LocalExecutor,
    WeightsError,
    select_executor,
)
from eplb.executors.synthetic import expert_bytes_of, make_rank_weights, mismatches, tensor_layout
from eplb.ir import ModelPlacement, PlanError, ScheduleLimits, Topology, Transport
from eplb.planner.compile import compile_plan
from eplb.planner.schedule import schedule as make_schedule
from tests.strategies import placement_pairs

LAYOUT = tensor_layout(2 * 2 * 4 + 3, torch.float16)
EB = expert_bytes_of(LAYOUT)


@st.composite
def cases(draw: Any) -> tuple[Any, Any, Any]:
    num_nodes = draw(st.sampled_from([1, 2]))
    num_ranks = num_nodes * draw(st.integers(1, 3))
    slots = draw(st.integers(1, 4))
    cur, tgt = draw(placement_pairs(num_ranks=num_ranks, slots_per_rank=slots))
    limits = draw(
        st.sampled_from([None, ScheduleLimits(max_peers_per_round=1), ScheduleLimits(max_ops_per_group=2)])
    )
    topo = Topology.uniform(num_ranks, slots, num_nodes)
    return make_schedule(compile_plan(cur, tgt, topo, expert_bytes=EB), limits), cur, tgt


@given(cases())
def test_local_executor_reaches_target_in_place(case: tuple[Any, Any, Any]) -> None:
    sched, cur, tgt = case
    num_ranks, slots = sched.plan.topology.num_ranks, sched.plan.topology.slots_per_rank
    weights = [make_rank_weights(cur, r, slots, LAYOUT) for r in range(num_ranks)]
    ptrs = [t.data_ptr() for w in weights for layer in w for t in layer]
    report = LocalExecutor().run_ranks(sched, weights)
    assert [m for r in range(num_ranks) for m in mismatches(weights[r], tgt, r)] == []
    assert ptrs == [t.data_ptr() for w in weights for layer in w for t in layer]
    assert report.staging_bytes == sched.staging_bytes_per_rank
    assert report.bytes_sent == report.bytes_received == sched.plan.bytes_moved
    assert report.layers_completed == tuple(range(sched.plan.num_layers))


@given(cases())
def test_local_run_on_physical_layout_matches_run_ranks(case: tuple[Any, Any, Any]) -> None:
    sched, cur, tgt = case
    num_ranks, slots = sched.plan.topology.num_ranks, sched.plan.topology.slots_per_rank
    per_rank = [make_rank_weights(cur, r, slots, LAYOUT) for r in range(num_ranks)]
    physical = [
        [torch.cat([per_rank[r][layer][k] for r in range(num_ranks)]) for k in range(len(LAYOUT))]
        for layer in range(cur.num_layers)
    ]
    LocalExecutor().run(sched, physical)
    for r in range(num_ranks):
        view = [[t[r * slots : (r + 1) * slots] for t in layer] for layer in physical]
        assert mismatches(view, tgt, r) == []


def _swap_schedule(num_layers: int = 3) -> tuple[Any, Any, Any]:
    topo = Topology.uniform(2, 2)
    cur = ModelPlacement.from_lists([[0, 1, 2, 3]] * num_layers, num_ranks=2)
    tgt = ModelPlacement.from_lists([[2, 3, 0, 1]] * num_layers, num_ranks=2)
    sched = make_schedule(compile_plan(cur, tgt, topo, expert_bytes=EB), ScheduleLimits(max_ops_per_group=2))
    return sched, cur, tgt


def test_unverifiable_schedule_is_refused_before_any_weight_moves() -> None:
    import attrs

    sched, cur, _ = _swap_schedule()
    broken = attrs.evolve(sched, rounds=sched.rounds[:-1])  # drop the last round
    weights = [make_rank_weights(cur, r, 2, LAYOUT) for r in range(2)]
    with pytest.raises(PlanError):
        LocalExecutor().run_ranks(broken, weights)
    assert all(mismatches(weights[r], cur, r) == [] for r in range(2))


def test_weights_that_do_not_fit_the_plan_name_the_fix() -> None:
    sched, cur, _ = _swap_schedule()
    weights = [make_rank_weights(cur, r, 2, LAYOUT) for r in range(2)]
    weights[1][2][0] = weights[1][2][0][:1]
    with pytest.raises(
        WeightsError,
        match=r"weights\[1\]\[2\]\[0\] has shape \(1, 6\); its first dimension must be slots_per_rank \(2\)",
    ):
        LocalExecutor().run_ranks(sched, weights)
    small = [make_rank_weights(cur, r, 2, tensor_layout(EB - 1, torch.float16)) for r in range(2)]
    with pytest.raises(
        WeightsError, match=rf"hold {EB - 1} bytes per expert .* compile the plan with expert_bytes={EB - 1}"
    ):
        LocalExecutor().run_ranks(sched, small)
    with pytest.raises(
        WeightsError, match=r"first dimension must be num_ranks \* slots_per_rank \(2 \* 2 = 4\)"
    ):
        LocalExecutor().run(sched, weights[0])


def test_failure_names_op_layer_round_rank_and_layer_states() -> None:
    sched, cur, tgt = _swap_schedule()
    fail_round = sched.num_rounds - 1

    class Faulty(LocalExecutor):
        def recv(self, op: Any, ctx: Any) -> None:
            if ctx.round == fail_round and op.rank == 1:
                raise RuntimeError("injected")
            super().recv(op, ctx)

    weights = [make_rank_weights(cur, r, 2, LAYOUT) for r in range(2)]
    with pytest.raises(
        ExecutionError, match=rf"while executing L\d\d r1 <-recv.* \(layer \d, round {fail_round}, rank 1\)"
    ) as info:
        Faulty().run_ranks(sched, weights)
    err = info.value
    assert err.rank == 1 and err.round == fail_round
    assert set(err.completed_layers) | set(err.partial_layers) | set(err.untouched_layers) == {0, 1, 2}
    assert err.layer in err.partial_layers
    assert all(mismatches(weights[r], tgt, r, layers=err.completed_layers) == [] for r in range(2))
    assert all(mismatches(weights[r], cur, r, layers=err.untouched_layers) == [] for r in range(2))


def test_select_prefers_p2p_on_one_nvlink_node_and_explains_refusals() -> None:
    one = Topology.uniform(4, 72)
    assert select_executor(one).name == "p2p"
    assert select_executor(one, device_type="cpu").name == "cpu_staged"
    assert select_executor(one, "alltoall").name == "alltoall"
    host_only = Topology.uniform(8, 36, 2, transports=(Transport.HOST,))
    assert select_executor(host_only).name == "cpu_staged"
    with pytest.raises(ExecutorError, match=r"executor 'p2p' cannot run .* no GPUDirect"):
        select_executor(host_only, "p2p")
    nothing = Topology.uniform(8, 36, 2, transports=(Transport.P2P,))
    with pytest.raises(
        ExecutorError, match=r"(?s)no executor can run.*- p2p: .*- alltoall: .*- cpu_staged: "
    ):
        select_executor(nothing)
    with pytest.raises(
        ExecutorError, match=r"unknown executor 'nccl'; choose one of alltoall, cpu_staged, local, p2p"
    ):
        select_executor(one, "nccl")
    assert set(EXECUTORS) == {"local", "p2p", "alltoall", "cpu_staged"}


def test_p2p_caps_transfers_per_group_by_tensor_count() -> None:
    # One NCCL call per tensor per transfer, at most 256 calls per group (pytorch#174288).
    from eplb.executors import CpuStagedExecutor, LocalExecutor, P2PExecutor

    assert P2PExecutor().max_transfers_per_group(4) == 64
    assert P2PExecutor().max_transfers_per_group(300) == 1
    assert LocalExecutor().max_transfers_per_group(4) is None
    assert CpuStagedExecutor().max_transfers_per_group(4) is None


def test_staging_over_the_executors_limit_is_refused_before_anything_moves() -> None:
    sched, cur, _ = _swap_schedule()
    need = sched.staging_bytes_per_rank
    assert need > 0
    weights = [make_rank_weights(cur, r, 2, LAYOUT) for r in range(2)]
    before = [t.clone() for w in weights for layer in w for t in layer]
    with pytest.raises(
        ExecutorError,
        match=rf"needs {need} bytes of staging per rank .*max_staging_bytes is {need - 1}; schedule with "
        rf"ScheduleLimits\(staging_bytes_per_rank={need - 1}\)",
    ):
        LocalExecutor(LocalExecutor.Config(max_staging_bytes=need - 1)).run_ranks(sched, weights)
    after = [t for w in weights for layer in w for t in layer]
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))
    LocalExecutor(LocalExecutor.Config(max_staging_bytes=need)).run_ranks(sched, weights)


def test_a_failure_names_the_section_kind_and_the_layer_states_come_from_one_place() -> None:
    from eplb.executors.base import Section, layer_states

    sched, cur, _ = _swap_schedule()

    class Faulty(LocalExecutor):
        def begin_transfers(self, ctx: Any) -> None:
            if ctx.round == 0:
                raise RuntimeError("injected")
            super().begin_transfers(ctx)

    weights = [make_rank_weights(cur, r, 2, LAYOUT) for r in range(2)]
    with pytest.raises(ExecutionError, match=r"local executor: failed in round 0 transfers") as info:
        Faulty().run_ranks(sched, weights)
    done, untouched, partial = layer_states(sched, 0)
    assert (info.value.completed_layers, info.value.untouched_layers, info.value.partial_layers) == (
        done,
        untouched,
        partial,
    )
    assert info.value.group_usable and info.value.waited_seconds is None
    assert Section.TRANSFERS.label == "transfers" and int(Section.AFTER) == 2


def test_fingerprint_tells_schedules_of_one_shape_apart_and_is_stable() -> None:
    from eplb.executors.base import schedule_fingerprint

    sched, cur, _ = _swap_schedule()
    again, *_ = _swap_schedule()
    assert schedule_fingerprint(sched) == schedule_fingerprint(again)
    other_tgt = ModelPlacement.from_lists([[3, 2, 1, 0]] * 3, num_ranks=2)
    other = make_schedule(
        compile_plan(cur, other_tgt, Topology.uniform(2, 2), expert_bytes=EB), ScheduleLimits(max_ops_per_group=2)
    )
    assert schedule_fingerprint(other) != schedule_fingerprint(sched)
    assert 0 <= schedule_fingerprint(sched) < 1 << 63  # fits the agreement's int64
