"""Tier 1 (pure Python; one test uses torch on CPU as DeepSeek's reference does): placement
policies, the registry and `rebalance`'s input checks."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from eplb.ir import InvalidValueError, ModelPlacement, Topology
from eplb.planner import metrics
from eplb.planner.entry import make_topology, rebalance
from eplb.planner.policies import available_policies, get_policy, register_policy
from eplb.planner.policies._common import use_hierarchy
from eplb.planner.policies.balanced import plan_balanced
from eplb.planner.policies.deepseek import rebalance_experts
from eplb.planner.policies.migration_aware import plan_migration_aware
from tests.strategies import load_matrices

README_LOAD = [
    [90, 132, 40, 61, 104, 165, 39, 4, 73, 56, 183, 86],
    [20, 107, 104, 64, 19, 197, 187, 157, 172, 86, 16, 27],
]
README_P2L = [
    [5, 6, 5, 7, 8, 4, 3, 4, 10, 9, 10, 2, 0, 1, 11, 1],
    [7, 10, 6, 8, 6, 11, 8, 9, 2, 4, 5, 1, 5, 0, 3, 1],
]


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


@st.composite
def cases(draw: Any, max_ranks: int = 12, max_slots: int = 6) -> tuple[np.ndarray, Topology, int]:
    """(load, topology, num_groups), half of them eligible for the node hierarchy."""
    num_n = draw(st.integers(1, 4))
    per = draw(st.integers(1, max(1, max_ranks // num_n)))
    s = draw(st.integers(1, max_slots))
    topo = Topology.uniform(num_n * per, s, num_n)
    p = topo.num_physical_experts
    if num_n > 1 and draw(st.booleans()):
        k = draw(st.integers(1, p // num_n))
        num_e, groups = num_n * k, num_n * draw(st.sampled_from(_divisors(k)))
    else:
        num_e = draw(st.integers(1, p))
        groups = draw(st.sampled_from(_divisors(num_e)))
    load = draw(load_matrices(num_logical_experts=num_e, num_layers=draw(st.integers(1, 3))))
    return load, topo, groups


def _spread_ok(p2l: list[int], topo: Topology, scope: int) -> bool:
    counts: dict[int, int] = {}
    for e in p2l:
        counts[e] = counts.get(e, 0) + 1
    s = topo.slots_per_rank
    for r in range(topo.num_ranks):
        here: dict[int, int] = {}
        for e in p2l[r * s : (r + 1) * s]:
            here[e] = here.get(e, 0) + 1
        if any(c > math.ceil(counts[e] / scope) for e, c in here.items()):
            return False
    return True


# --- DeepSeek's greedy ----------------------------------------------------------------------------
def test_deepseek_reproduces_readme_example() -> None:
    topo = make_topology(8, 16, 2)
    out = rebalance(README_LOAD, topo, num_groups=4, policy="deepseek")
    assert out.to_lists() == README_P2L


def test_rebalance_experts_maps_agree() -> None:
    p2l, l2p, cnt = rebalance_experts(np.array(README_LOAD), 16, 4, 2, 8)
    assert cnt.tolist() == [[1, 2, 1, 1, 2, 2, 1, 1, 1, 1, 2, 1], [1, 2, 1, 1, 1, 2, 2, 1, 2, 1, 1, 1]]
    for layer in range(2):
        for e in range(12):
            slots = [p for p in l2p[layer, e] if p >= 0]
            assert len(slots) == cnt[layer, e]
            assert all(p2l[layer, p] == e for p in slots)


def _torch_reference(weight: Any, num_replicas: int, num_groups: int, num_nodes: int, num_gpus: int) -> Any:
    """DeepSeek's eplb.py (github.com/deepseek-ai/EPLB), transcribed: the port must match it."""
    import torch

    def balanced_packing(weight: Any, num_packs: int) -> Any:
        num_layers, num_groups = weight.shape
        groups_per_pack = num_groups // num_packs
        if groups_per_pack == 1:
            pack_index = torch.arange(weight.size(-1), dtype=torch.int64).expand(weight.shape)
            return pack_index, torch.zeros_like(weight, dtype=torch.int64)
        indices = weight.float().sort(-1, descending=True).indices
        pack_index = torch.full_like(weight, fill_value=-1, dtype=torch.int64)
        rank_in_pack = torch.full_like(pack_index, fill_value=-1)
        for i in range(num_layers):
            pack_weights = [0] * num_packs
            pack_items = [0] * num_packs
            for group in indices[i]:
                pack = min(
                    (j for j in range(num_packs) if pack_items[j] < groups_per_pack),
                    key=pack_weights.__getitem__,
                )
                pack_index[i, group] = pack
                rank_in_pack[i, group] = pack_items[pack]
                pack_weights[pack] += weight[i, group]
                pack_items[pack] += 1
        return pack_index, rank_in_pack

    def replicate_experts(weight: Any, num_phy: int) -> Any:
        n, num_log = weight.shape
        phy2log = torch.arange(num_phy, dtype=torch.int64).repeat(n, 1)
        rank = torch.zeros(n, num_phy, dtype=torch.int64)
        logcnt = torch.ones(n, num_log, dtype=torch.int64)
        arangen = torch.arange(n, dtype=torch.int64)
        for i in range(num_log, num_phy):
            redundant_indices = (weight / logcnt).max(dim=-1).indices
            phy2log[:, i] = redundant_indices
            rank[:, i] = logcnt[arangen, redundant_indices]
            logcnt[arangen, redundant_indices] += 1
        return phy2log, rank, logcnt

    def inverse(perm: Any) -> Any:
        inv = torch.empty_like(perm)
        inv.scatter_(1, perm, torch.arange(perm.size(1), dtype=torch.int64).expand(perm.shape))
        return inv

    def hierarchical(weight: Any, num_phy: int, num_groups: int, num_nodes: int, num_gpus: int) -> Any:
        num_layers, num_log = weight.shape
        group_size = num_log // num_groups
        groups_per_node = num_groups // num_nodes
        per_gpu = num_phy // num_gpus
        tokens_per_group = weight.unflatten(-1, (num_groups, group_size)).sum(-1)
        group_pack_index, group_rank_in_pack = balanced_packing(tokens_per_group, num_nodes)
        log2mlog = (
            ((group_pack_index * groups_per_node + group_rank_in_pack) * group_size).unsqueeze(-1)
            + torch.arange(group_size, dtype=torch.int64)
        ).flatten(-2)
        mlog2log = inverse(log2mlog)
        tokens_per_mlog = weight.gather(-1, mlog2log).view(-1, num_log // num_nodes)
        phy2mlog, _phyrank, mlogcnt = replicate_experts(tokens_per_mlog, num_phy // num_nodes)
        tokens_per_phy = (tokens_per_mlog / mlogcnt).gather(-1, phy2mlog)
        pack_index, rank_in_pack = balanced_packing(tokens_per_phy, num_gpus // num_nodes)
        pphy2phy = inverse(pack_index * per_gpu + rank_in_pack)
        pphy2mlog = phy2mlog.gather(-1, pphy2phy)
        pphy2mlog = (
            pphy2mlog.view(num_layers, num_nodes, -1)
            + torch.arange(0, num_log, num_log // num_nodes).view(1, -1, 1)
        ).flatten(-2)
        return mlog2log.gather(-1, pphy2mlog)

    weight = torch.as_tensor(weight).float()
    if num_groups % num_nodes == 0:
        return hierarchical(weight, num_replicas, num_groups, num_nodes, num_gpus)
    return hierarchical(weight, num_replicas, 1, 1, num_gpus)


@settings(max_examples=50)
@given(cases(max_ranks=8, max_slots=4), st.integers(0, 2**32 - 1))
def test_deepseek_port_matches_torch_reference(case: Any, seed: int) -> None:
    pytest.importorskip("torch")
    drawn, topo, groups = case
    num_e = drawn.shape[1]
    # Continuous loads: no two experts tie, where torch's unstable sort and ours may differ.
    load = np.random.default_rng(seed).lognormal(0, 1, (2, num_e)).astype(np.float32)
    ours = get_policy("deepseek")(load.astype(np.float64), topo, num_groups=groups)
    ref = _torch_reference(load, topo.num_physical_experts, groups, topo.num_nodes, topo.num_ranks)
    assert ours.to_lists() == ref.tolist()


# --- properties of every policy -------------------------------------------------------------------
@given(cases(), st.sampled_from(["deepseek", "balanced", "migration_aware"]))
def test_every_policy_is_valid_pure_and_deterministic(case: Any, name: str) -> None:
    load, topo, groups = case
    before = load.copy()
    out = rebalance(load, topo, num_groups=groups, policy=name)
    assert isinstance(out, ModelPlacement)
    assert (out.num_layers, out.num_logical_experts) == load.shape
    assert (out.num_ranks, out.num_physical_experts) == (topo.num_ranks, topo.num_physical_experts)
    assert np.array_equal(load, before)
    assert rebalance(load, topo, num_groups=groups, policy=name) == out


@given(cases())
def test_balanced_never_below_deepseek_where_it_keeps_the_spread_rule(case: Any) -> None:
    """On a layer where DeepSeek's plan stacks copies the spread rule forbids, `balanced` may be
    below it (it de-duplicates what it takes); everywhere else it is never below."""
    load, topo, groups = case
    ds_plan = rebalance(load, topo, num_groups=groups, policy="deepseek")
    ds = metrics.balancedness(load, ds_plan)
    ours = metrics.balancedness(load, rebalance(load, topo, num_groups=groups, policy="balanced"))
    hier = use_hierarchy(topo, groups, None)
    scope = topo.num_ranks // topo.num_nodes if hier else topo.num_ranks
    keeps = np.array([_spread_ok(row, topo, scope) for row in ds_plan.to_numpy().tolist()])
    assert (ours[keeps] >= ds[keeps] - 1e-9).all(), (ours, ds)


@given(cases())
def test_balanced_spreads_replicas_and_keeps_nodes(case: Any) -> None:
    """Without the DeepSeek floor, an expert never has two copies on one rank unless it has more
    replicas than ranks in scope; in hierarchical mode each group lives on one node."""
    load, topo, groups = case
    p2l, info = plan_balanced(load, topo, num_groups=groups, deepseek_floor=False)
    scope = topo.num_ranks // topo.num_nodes if info.hierarchical else topo.num_ranks
    assert all(_spread_ok(row, topo, scope) for row in p2l.tolist())
    if info.hierarchical:
        per_node = topo.num_physical_experts // topo.num_nodes
        gs = load.shape[1] // groups
        for row in p2l.tolist():
            nodes_of_group: dict[int, set[int]] = {}
            for p, e in enumerate(row):
                nodes_of_group.setdefault(e // gs, set()).add(p // per_node)
            assert all(len(n) == 1 for n in nodes_of_group.values())


@given(cases())
def test_balanced_with_the_floor_keeps_the_spread_rule(case: Any) -> None:
    """Layers taken from DeepSeek's greedy are de-duplicated: no layer stacks avoidable copies."""
    load, topo, groups = case
    p2l, info = plan_balanced(load, topo, num_groups=groups)
    scope = topo.num_ranks // topo.num_nodes if info.hierarchical else topo.num_ranks
    for row in p2l.tolist():
        assert _spread_ok(row, topo, scope)


def test_balanced_reaches_bound_on_easy_load() -> None:
    # 64 equal experts over 8 ranks x 8 slots: a perfect split exists and must be found.
    topo = make_topology(8, 64)
    out = rebalance(np.full((2, 64), 5.0), topo)
    assert np.allclose(metrics.balancedness(np.full((2, 64), 5.0), out), 1.0)


def test_balanced_hierarchical_option() -> None:
    rng = np.random.default_rng(1)
    load = rng.lognormal(0, 1.5, (4, 64))
    topo = make_topology(8, 72, 2)
    hier = rebalance(load, topo, num_groups=8)
    flat = rebalance(load, topo, num_groups=8, hierarchical=False)
    assert metrics.model_balancedness(load, flat) >= metrics.model_balancedness(load, hier) - 1e-9
    with pytest.raises(
        InvalidValueError, match=r"'hierarchical' needs num_groups \(3\) to be a multiple of num_nodes \(2\)"
    ):
        rebalance(rng.random((1, 12)), make_topology(8, 16, 2), num_groups=3, hierarchical=True)


# --- migration_aware ------------------------------------------------------------------------------
@given(cases(), st.sampled_from([0.0, 0.01, 0.05]))
def test_migration_aware_moves_nothing_when_load_is_unchanged(case: Any, tol: float) -> None:
    load, topo, groups = case
    first = rebalance(load, topo, num_groups=groups, policy="balanced")
    again = rebalance(load, topo, num_groups=groups, current=first, tolerance=tol)
    assert again == first
    own = rebalance(load, topo, num_groups=groups, current=again, tolerance=tol)
    assert own == again


@given(cases(), st.data(), st.sampled_from([0.0, 0.005, 0.02, 0.1]))
def test_migration_aware_within_tolerance_of_fresh_plan(case: Any, data: Any, tol: float) -> None:
    load, topo, groups = case
    old = data.draw(load_matrices(num_layers=load.shape[0], num_logical_experts=load.shape[1]))
    current = rebalance(
        old, topo, num_groups=groups, policy=data.draw(st.sampled_from(["deepseek", "balanced"]))
    )
    out = rebalance(load, topo, num_groups=groups, current=current, tolerance=tol)
    fresh = metrics.balancedness(load, rebalance(load, topo, num_groups=groups))
    assert (metrics.balancedness(load, out) >= fresh - tol - 1e-9).all()


def test_migration_aware_moves_few_slots_after_small_drift() -> None:
    rng = np.random.default_rng(7)
    load = rng.lognormal(0, 1.2, (4, 64)) * 100
    topo = make_topology(8, 72, 2)
    current = rebalance(load, topo, num_groups=8)
    drifted = load * rng.lognormal(0, 0.05, load.shape)
    fresh = rebalance(drifted, topo, num_groups=8)
    out = rebalance(drifted, topo, num_groups=8, current=current)
    assert metrics.slots_moved(current, out) < metrics.slots_moved(current, fresh) / 2
    assert metrics.model_balancedness(drifted, out) >= metrics.model_balancedness(drifted, fresh) - 0.01


@pytest.mark.parametrize("seed", [1, 2])
def test_migration_aware_changes_replica_counts_cheaply(seed: int) -> None:
    """Two slots per rank (as DeepSeek-V3 at EP144): after a drift some replica alone is above the
    limit, so replica counts must change and each heavy replica's rank needs a light partner.
    Recounting to the fresh plan's counts, then swapping, moves a few slots; single moves from
    the current placement got stuck and fell back to the renumbered fresh plan (8-13% here)."""
    rng = np.random.default_rng(seed)
    load = np.round(rng.lognormal(0, 1.2, (6, 64)) * 1000)
    topo = make_topology(36, 72, 6)
    current = rebalance(load, topo)
    drifted = np.round(load * rng.lognormal(0, 0.05, load.shape))
    out = rebalance(drifted, topo, current=current)
    fresh = rebalance(drifted, topo)
    assert metrics.slots_moved(current, out) < 0.05 * 6 * 72
    assert (metrics.balancedness(drifted, out) >= metrics.balancedness(drifted, fresh) - 0.005 - 1e-9).all()


def test_migration_aware_without_current_is_balanced() -> None:
    load = np.random.default_rng(3).random((2, 16))
    topo = make_topology(4, 20)
    assert rebalance(load, topo, policy="migration_aware") == rebalance(load, topo)


def test_migration_aware_rejects_bad_tolerance() -> None:
    load = np.ones((1, 4))
    topo = make_topology(2, 4)
    cur = rebalance(load, topo)
    with pytest.raises(
        InvalidValueError, match=r"'tolerance' must be in \[0, 1\) balancedness points \(got -0.1\)"
    ):
        plan_migration_aware(load, topo, num_groups=1, current=cur, tolerance=-0.1)


# --- registry -------------------------------------------------------------------------------------
def test_registry_lists_builtins_and_accepts_new_policies(monkeypatch: pytest.MonkeyPatch) -> None:
    # A private copy of the registry: a test policy left behind would show in every later
    # `--policy` choice list (tests/test_docs.py compares --help with docs/cli.md).
    from eplb.planner import policies

    monkeypatch.setattr(policies, "_REGISTRY", dict(policies._REGISTRY))
    assert {"deepseek", "balanced", "migration_aware"} <= set(available_policies())

    @register_policy("test_trivial")
    def trivial(
        load: np.ndarray, topology: Topology, *, num_groups: int, current: Any = None
    ) -> ModelPlacement:
        return ModelPlacement.trivial(
            num_layers=load.shape[0],
            num_logical_experts=load.shape[1],
            num_physical_experts=topology.num_physical_experts,
            num_ranks=topology.num_ranks,
        )

    assert get_policy("test_trivial") is trivial
    out = rebalance(np.ones((1, 4)), make_topology(2, 4), policy="test_trivial")
    assert out.to_lists() == [[0, 1, 2, 3]]
    with pytest.raises(InvalidValueError, match="'name' 'test_trivial' is already registered"):
        register_policy("test_trivial")(lambda *a, **k: out)


def test_unknown_policy_lists_available() -> None:
    with pytest.raises(
        InvalidValueError,
        match=r"'policy' must be one of balanced, deepseek, .*migration_aware.* \(got 'nope'\)",
    ):
        get_policy("nope")


def test_policy_returning_wrong_shape_is_reported() -> None:
    def bad(load: np.ndarray, topology: Topology, *, num_groups: int, current: Any = None) -> ModelPlacement:
        return ModelPlacement.trivial(
            num_layers=1, num_logical_experts=2, num_physical_experts=2, num_ranks=1
        )

    with pytest.raises(Exception, match=r"policy .*bad.* returned \(layers, experts, slots, ranks\)"):
        rebalance(np.ones((1, 4)), make_topology(2, 4), policy=bad)


# --- bad input ------------------------------------------------------------------------------------
TOPO = make_topology(4, 8)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (
            {"load": [[1.0, float("nan"), 1.0, 1.0]]},
            r"'load\[0, 1\]' must be finite \(got nan; 1 such entries\)",
        ),
        ({"load": [[1.0, float("inf"), 1.0, 1.0]]}, r"'load\[0, 1\]' must be finite \(got inf"),
        ({"load": [[1.0, -2.0, 1.0, 1.0]]}, r"'load\[0, 1\]' must be >= 0 \(got -2.0"),
        ({"load": [1.0, 2.0]}, r"'load' must have 2 dimensions .* \(got shape \(2,\)\); wrap a single layer"),
        ({"load": [[[1.0]]]}, r"'load' must have 2 dimensions .* \(got shape \(1, 1, 1\)\); sum over steps"),
        ({"load": [[1.0, 2.0], [1.0]]}, r"'load' must be a rectangular"),
        (
            {"load": np.ones((1, 9))},
            r"'load' has 9 experts but the topology has only 8 slots \(4 ranks x 2\); .* use at least 3 slots per rank",
        ),
        (
            {"load": np.ones((1, 6)), "num_groups": 4},
            r"'num_groups' \(4\) must divide num_logical_experts \(6\); use one of",
        ),
        ({"load": np.ones((1, 6)), "num_groups": 0}, r"'num_groups' must be an int > 0 \(got 0\)"),
        ({"load": np.ones((1, 6)), "policy": "nope"}, r"'policy' must be one of"),
        (
            {"load": np.ones((1, 6)), "frobnicate": 1},
            r"'options' \['frobnicate'\] are not options of policy 'balanced'; it accepts",
        ),
    ],
)
def test_bad_input_is_rejected(kwargs: dict[str, Any], match: str) -> None:
    load = kwargs.pop("load")
    with pytest.raises(InvalidValueError, match=match):
        rebalance(load, TOPO, **kwargs)


@pytest.mark.parametrize(
    ("current", "match"),
    [
        (
            ModelPlacement.trivial(num_layers=1, num_logical_experts=6, num_physical_experts=8, num_ranks=2),
            r"'current.num_ranks' is 2 but the topology has 4; plan from scratch with current=None",
        ),
        (
            ModelPlacement.trivial(num_layers=1, num_logical_experts=6, num_physical_experts=12, num_ranks=4),
            r"'current.num_physical_experts' is 12 but the topology has 8",
        ),
        (
            ModelPlacement.trivial(num_layers=1, num_logical_experts=5, num_physical_experts=8, num_ranks=4),
            r"'current.num_logical_experts' is 5 but the load has 6",
        ),
        (
            ModelPlacement.trivial(num_layers=2, num_logical_experts=6, num_physical_experts=8, num_ranks=4),
            r"'current.num_layers' is 2 but the load has 1",
        ),
    ],
)
def test_current_of_wrong_shape_is_rejected(current: ModelPlacement, match: str) -> None:
    with pytest.raises(InvalidValueError, match=match):
        rebalance(np.ones((1, 6)), TOPO, current=current)


def test_slots_not_multiple_of_ranks() -> None:
    with pytest.raises(
        InvalidValueError,
        match=r"'num_physical_experts' \(300\) must be a multiple of num_ranks \(32\); use 288 or 320",
    ):
        make_topology(32, 300)


def test_torch_tensor_load_is_accepted() -> None:
    torch = pytest.importorskip("torch")
    out = rebalance(torch.tensor(README_LOAD), make_topology(8, 16, 2), num_groups=4, policy="deepseek")
    assert out.to_lists() == README_P2L
