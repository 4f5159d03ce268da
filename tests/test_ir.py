"""Tier 1 (pure Python): IR invariants, derived maps, validators, text forms and reprs."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import eplb.ir as ir
from eplb.ir import (
    Copy,
    InvalidValueError,
    LayerPlan,
    Loc,
    MigrationPlan,
    ModelPlacement,
    Placement,
    Recv,
    Round,
    Schedule,
    ScheduleLimits,
    Send,
    Topology,
)
from tests.strategies import migration_plans, model_placements, placements, topologies


def test_ir_imports_no_torch() -> None:
    code = "import eplb.ir, eplb.ir.serde, sys; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


# --- placements -------------------------------------------------------------------------------
@given(placements())
def test_derived_maps_agree_with_physical_to_logical(p: Placement) -> None:
    assert p.num_physical_experts % p.num_ranks == 0
    assert all(c >= 1 for c in p.replica_count)
    assert sum(p.replica_count) == p.num_physical_experts
    for e, row in enumerate(p.logical_to_physical):
        assert len(row) == p.max_replicas
        slots = [s for s in row if s != -1]
        assert len(slots) == p.replica_count[e]
        assert all(p.physical_to_logical[s] == e for s in slots)
        assert row[len(slots) :] == (-1,) * (len(row) - len(slots))
    for e, ranks in enumerate(p.holders):
        assert ranks == {p.rank_of(s) for s, x in enumerate(p.physical_to_logical) if x == e}


@given(model_placements())
def test_model_placement_conversions_round_trip(mp: ModelPlacement) -> None:
    arr = mp.to_numpy()
    assert arr.shape == (mp.num_layers, mp.num_physical_experts)
    back = ModelPlacement.from_lists(arr, num_ranks=mp.num_ranks, num_logical_experts=mp.num_logical_experts)
    assert back == mp
    assert (
        ModelPlacement.from_lists(
            mp.to_lists(), num_ranks=mp.num_ranks, num_logical_experts=mp.num_logical_experts
        )
        == mp
    )
    l2p = mp.logical_to_physical_array()
    assert l2p.shape == (
        mp.num_layers,
        mp.num_logical_experts,
        mp.num_physical_experts - mp.num_logical_experts + 1,
    )
    assert (mp.replica_count_array() == (l2p != -1).sum(-1)).all()


def test_seed_example_maps() -> None:
    # The seed's docstring example: 2 layers, 6 slots, 4 experts, 3 ranks.
    mp = ModelPlacement.from_lists([[0, 1, 2, 3, 0, 1], [0, 2, 0, 1, 0, 3]], num_ranks=3)
    assert mp.logical_to_physical_array().tolist() == [
        [[0, 4, -1], [1, 5, -1], [2, -1, -1], [3, -1, -1]],
        [[0, 2, 4], [3, -1, -1], [1, -1, -1], [5, -1, -1]],
    ]
    assert mp.replica_count_array().tolist() == [[2, 2, 1, 1], [3, 1, 1, 1]]


def test_trivial_is_the_seeds_initial_layout() -> None:
    p = Placement.trivial(4, 6, 3)
    assert p.physical_to_logical == (0, 1, 2, 3, 0, 1)
    mp = ModelPlacement.trivial(num_layers=2, num_logical_experts=4, num_physical_experts=6, num_ranks=3)
    assert mp.num_layers == 2 and mp.layers[1] == p


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (
            {"physical_to_logical": [0, 1, 2, 3, 0], "num_ranks": 2},
            r"has 5 slots \(num_physical_experts\), which must be a multiple of num_ranks \(2\); use 4 or 6 slots",
        ),
        (
            {"physical_to_logical": [0, 1, 5, 2], "num_ranks": 2},
            r"'physical_to_logical\[2\]' must be in \[0, 4\) \(got 5\)",
        ),
        ({"physical_to_logical": [0, 1, 1, 2], "num_ranks": 2}, r"experts \[3\] have none"),
        ({"physical_to_logical": [0, 1], "num_ranks": 1}, r"fewer than num_logical_experts \(4\)"),
        ({"physical_to_logical": [0, 1, 2, 3], "num_ranks": 0}, r"'num_ranks' must be > 0 \(got 0\)"),
        ({"physical_to_logical": [0, 1, 2, 3.5], "num_ranks": 1}, r"expected a sequence of ints"),
    ],
)
def test_placement_rejects_bad_values(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(InvalidValueError, match=match):
        Placement(num_logical_experts=4, **kwargs)  # type: ignore[arg-type]


def test_model_placement_rejects_mixed_shapes() -> None:
    a = Placement.trivial(4, 4, 2)
    b = Placement.trivial(4, 6, 2)
    with pytest.raises(
        InvalidValueError, match=r"'layers\[1\]' has num_physical_experts=6 but layer 0 has 4"
    ):
        ModelPlacement(layers=(a, b))
    with pytest.raises(InvalidValueError, match="at least one layer"):
        ModelPlacement(layers=())


def test_placement_accepts_numpy() -> None:
    p = Placement(num_logical_experts=2, num_ranks=1, physical_to_logical=np.array([1, 0], dtype=np.int32))
    assert p.physical_to_logical == (1, 0)
    assert all(type(x) is int for x in p.physical_to_logical)


# --- topology ---------------------------------------------------------------------------------
@given(topologies())
def test_topology_links(t: Topology) -> None:
    for a in range(t.num_ranks):
        assert t.link(a, a) is ir.LinkClass.LOCAL
        b = (a + 1) % t.num_ranks
        if a != b:
            same = t.node_of(a) == t.node_of(b)
            assert (t.link(a, b) is ir.LinkClass.INTRA_NODE) == same


@pytest.mark.parametrize(
    ("build", "match"),
    [
        (lambda: Topology.uniform(6, 2, 4), r"'num_nodes' must divide num_ranks \(6\) \(got 4\)"),
        (lambda: Topology(num_ranks=2, slots_per_rank=1, rank_to_node=(0,)), r"one entry per rank"),
        (lambda: Topology(num_ranks=2, slots_per_rank=1, rank_to_node=(0, 2)), r"without gaps"),
        (
            lambda: Topology(num_ranks=1, slots_per_rank=1, rank_to_node=(0,), transports=()),
            r"at least one transport",
        ),
        (
            lambda: ir.Bandwidth(intra_node_gbps=0, inter_node_gbps=1, host_device_gbps=1),
            r"'intra_node_gbps' must be finite and > 0 \(got 0\)",
        ),
        (lambda: Topology(num_ranks=1, slots_per_rank=0, rank_to_node=(0,)), r"'slots_per_rank' must be > 0"),
    ],
)
def test_topology_rejects_bad_values(build, match: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(InvalidValueError, match=match):
        build()


# --- ops --------------------------------------------------------------------------------------
def test_op_text_forms() -> None:
    send = Send(layer=3, transfer_id=12, src_rank=0, dst_rank=5, src=Loc.slot(2), expert=17)
    recv = Recv(layer=3, transfer_id=12, src_rank=0, dst_rank=5, dst=Loc.buffer(0), expert=17)
    copy = Copy(layer=3, rank=2, src=Loc.slot(1), dst=Loc.buffer(0), expert=17)
    assert str(send) == "L03 r0 -send[e17 s2]-> r5 #12"
    assert str(recv) == "L03 r5 <-recv[e17 b0]- r0 #12"
    assert str(copy) == "L03 r2 copy[e17 s1->b0]"
    assert (send.rank, recv.rank, copy.rank) == (0, 5, 2)


@pytest.mark.parametrize(
    ("build", "match"),
    [
        (
            lambda: Send(layer=0, transfer_id=0, src_rank=1, dst_rank=1, src=Loc.slot(0), expert=0),
            r"'dst_rank' must differ from src_rank \(1\)",
        ),
        (
            lambda: Recv(layer=-1, transfer_id=0, src_rank=0, dst_rank=1, dst=Loc.slot(0), expert=0),
            r"'layer' must be >= 0 \(got -1\)",
        ),
        (
            lambda: Copy(layer=0, rank=0, src=Loc.slot(1), dst=Loc.slot(1), expert=0),
            r"'dst' must differ from src \(s1\)",
        ),
        (lambda: Loc.slot(-1), r"'index' must be >= 0 \(got -1\)"),
        (lambda: Loc.parse("x3"), r"must be a location like 's3'"),
    ],
)
def test_op_validators(build, match: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(InvalidValueError, match=match):
        build()


@given(st.sampled_from(["slot", "buffer"]), st.integers(0, 10**6))
def test_loc_parse_inverts_str(kind: str, index: int) -> None:
    loc = Loc(kind, index)  # type: ignore[arg-type]
    assert Loc.parse(str(loc)) == loc


# --- plans and schedules ----------------------------------------------------------------------
def _tiny_plan() -> MigrationPlan:
    topo = Topology.uniform(2, 2)
    cur = ModelPlacement.from_lists([[0, 1, 2, 3]], num_ranks=2)
    tgt = ModelPlacement.from_lists([[2, 1, 0, 3]], num_ranks=2)
    ops = (
        Send(layer=0, transfer_id=0, src_rank=0, dst_rank=1, src=Loc.slot(0), expert=0),
        Recv(layer=0, transfer_id=0, src_rank=0, dst_rank=1, dst=Loc.slot(0), expert=0),
    )
    return MigrationPlan(
        topology=topo, expert_bytes=10, current=cur, target=tgt, layers=(LayerPlan(layer=0, ops=ops),)
    )


def test_plan_rejects_ops_outside_topology() -> None:
    plan = _tiny_plan()
    bad = Send(layer=0, transfer_id=1, src_rank=0, dst_rank=7, src=Loc.slot(0), expert=0)
    with pytest.raises(
        InvalidValueError, match=r"'layers\[0\]\.ops\[0\]\.dst_rank' must be in \[0, 2\) \(got 7\)"
    ):
        MigrationPlan(
            topology=plan.topology,
            expert_bytes=1,
            current=plan.current,
            target=plan.target,
            layers=(LayerPlan(layer=0, ops=(bad,)),),
        )
    bad_slot = Copy(layer=0, rank=0, src=Loc.slot(0), dst=Loc.slot(5), expert=0)
    with pytest.raises(InvalidValueError, match=r"ops\[0\]\.dst' must be a slot in \[s0, s2\) \(got s5\)"):
        MigrationPlan(
            topology=plan.topology,
            expert_bytes=1,
            current=plan.current,
            target=plan.target,
            layers=(LayerPlan(layer=0, ops=(bad_slot,)),),
        )
    with pytest.raises(InvalidValueError, match=r"'layers' must have one entry per layer, 1 \(got 0\)"):
        MigrationPlan(
            topology=plan.topology, expert_bytes=1, current=plan.current, target=plan.target, layers=()
        )


def test_plan_summary_figures() -> None:
    plan = _tiny_plan()
    assert plan.transfers == 1 and plan.bytes_moved == 10 and plan.local_copies == 0
    assert str(plan) == "MigrationPlan(1 layers on 2 ranks: 1 transfers, 0 local copies, 0.000 GB)"


def test_schedule_checks_staging_pool_and_sections() -> None:
    plan = _tiny_plan()
    stage = Copy(layer=0, rank=0, src=Loc.slot(0), dst=Loc.buffer(1), expert=0)
    with pytest.raises(
        InvalidValueError, match=r"rounds\[0\]\.before\[0\]\.dst' must be a staging buffer in \[b0, b1\)"
    ):
        Schedule(
            plan=plan, rounds=(Round(before=(stage,)),), rounds_lower_bound=1, staging_buffers_per_rank=1
        )
    with pytest.raises(InvalidValueError, match=r"'transfers\[0\]' must be a Send or Recv"):
        Round(transfers=(stage,))  # type: ignore[arg-type]
    with pytest.raises(InvalidValueError, match=r"'max_peers_per_round' must be > 0"):
        ScheduleLimits(max_peers_per_round=0)


@given(migration_plans())
def test_repr_is_valid_python(plan: MigrationPlan) -> None:
    assert eval(repr(plan), vars(ir)) == plan


# --- the planner's private fast construction -------------------------------------------------------
@given(plan=migration_plans())
def test_trusted_ops_equal_validated_ones(plan: ir.MigrationPlan) -> None:
    for op in plan.ops():
        fields = {a.name: getattr(op, a.name) for a in type(op).__attrs_attrs__}
        fast = type(op)._trusted(**fields)
        assert fast == op and hash(fast) == hash(op) and repr(fast) == repr(op)


@given(plan=migration_plans(), data=st.data())
def test_ops_fit_agrees_with_op_problems(plan: ir.MigrationPlan, data: st.DataObject) -> None:
    from eplb.ir.plan import op_problems, ops_fit

    # A smaller topology or expert count puts some ops out of range.
    topo = plan.topology
    smaller = Topology.uniform(
        data.draw(st.integers(1, topo.num_ranks)), data.draw(st.integers(1, topo.slots_per_rank))
    )
    num_e = data.draw(st.integers(1, plan.target.num_logical_experts))
    num_buffers = data.draw(st.none() | st.integers(0, 4))
    ops = list(plan.ops())
    expected = not any(next(op_problems(op, smaller, num_e, num_buffers), None) for op in ops)
    assert ops_fit(ops, smaller, num_e, num_buffers, range(plan.num_layers)) == expected


def test_trusted_mode_ends_with_its_plan() -> None:
    from eplb.ir._validate import ops_trusted
    from eplb.planner.compile import compile_plan

    topo = Topology.uniform(2, 2)
    cur = ModelPlacement.from_lists([[0, 1, 2, 3]], num_ranks=2)
    compile_plan(cur, ModelPlacement.from_lists([[3, 1, 2, 0]], num_ranks=2), topo, 10)
    assert not ops_trusted()
    # So a plan a user builds afterwards is checked op by op again.
    bad = ir.Send(layer=0, transfer_id=0, src_rank=0, dst_rank=5, src=ir.Loc.slot(0), expert=0)
    with pytest.raises(
        InvalidValueError, match=r"'layers\[0\]\.ops\[0\]\.dst_rank' must be in \[0, 2\) \(got 5\)"
    ):
        ir.MigrationPlan(
            topology=topo, expert_bytes=10, current=cur, target=cur, layers=[ir.LayerPlan(layer=0, ops=[bad])]
        )
