"""Tier 1: rules every policy's plan keeps, as hypothesis properties, plus the cases where
`migration_aware` and `balanced` broke them (issue 12) as regression tests.

The spread rule: no rank holds more copies of an expert than ``ceil(replicas / ranks)`` (ranks of
its node in hierarchical mode), unless the current placement already did there and no copy moved
there."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from eplb.ir import InvalidValueError, ModelPlacement, Topology
from eplb.planner.entry import make_topology, rebalance
from eplb.planner.policies import balanced as balanced_mod
from eplb.planner.policies._common import spread_breaks, unstack, use_hierarchy
from eplb.planner.policies.balanced import plan_balanced, replica_counts
from eplb.planner.policies.migration_aware import plan_migration_aware
from tests.strategies import load_matrices
from tests.test_policies import cases


def _scope(topo: Topology, groups: int) -> int:
    return topo.num_ranks // topo.num_nodes if use_hierarchy(topo, groups, None) else topo.num_ranks


def _breaks(p2l: np.ndarray, topo: Topology, groups: int, num_e: int, cur: np.ndarray | None = None) -> int:
    scope = _scope(topo, groups)
    return sum(
        int(spread_breaks(row, num_e, topo.num_ranks, scope, None if cur is None else cur[i]).sum())
        for i, row in enumerate(p2l)
    )


# --- the rule's own definition ----------------------------------------------------------------------
def test_spread_breaks_counts_stacked_copies_and_excuses_unchanged_ones() -> None:
    # 2 ranks x 2 slots: expert 0 has 2 copies, both on rank 0 (cap ceil(2/2) = 1).
    stacked = np.array([0, 0, 1, 2])
    assert spread_breaks(stacked, 3, 2, 2).sum() == 1
    assert spread_breaks(stacked, 3, 2, 2, current=stacked).sum() == 0  # nothing moved there
    spread = np.array([0, 1, 0, 2])
    assert spread_breaks(stacked, 3, 2, 2, current=spread).sum() == 1  # a copy moved there


def test_unstack_swaps_a_stacked_copy_apart() -> None:
    load = np.array([95.0, 51.0, 14.0])
    out = unstack(load, np.array([0, 0, 1, 2]), 2, 2)
    assert out is not None
    assert spread_breaks(out, 3, 2, 2).sum() == 0
    assert sorted(out.tolist()) == [0, 0, 1, 2]


# --- properties --------------------------------------------------------------------------------------
@given(cases())
def test_every_fresh_policy_but_deepseek_keeps_the_spread_rule(case: Any) -> None:
    load, topo, groups = case
    for policy in ("balanced", "migration_aware"):
        p2l = rebalance(load, topo, num_groups=groups, policy=policy).to_numpy()
        assert _breaks(p2l, topo, groups, load.shape[1]) == 0, policy


@settings(max_examples=150)
@given(cases(), st.data(), st.sampled_from([0.0, 0.005, 0.05]), st.sampled_from(["deepseek", "balanced"]))
def test_migration_aware_keeps_the_spread_rule(case: Any, data: Any, tol: float, start: str) -> None:
    """Re-planned from any current placement (DeepSeek's may stack copies: those stay excused
    while nothing moves there)."""
    load, topo, groups = case
    old = data.draw(load_matrices(num_layers=load.shape[0], num_logical_experts=load.shape[1]))
    current = rebalance(old, topo, num_groups=groups, policy=start)
    out = rebalance(load, topo, num_groups=groups, current=current, tolerance=tol).to_numpy()
    assert _breaks(out, topo, groups, load.shape[1], current.to_numpy()) == 0


# --- regression cases at real shapes (issue 12) --------------------------------------------------------
def _zipf(num_l: int, num_e: int, rng: np.random.Generator) -> np.ndarray:
    """The bench's Zipf load: hottest expert ~12x the mean, each layer its own permutation."""
    lo, hi = 0.0, 3.0
    ranks = np.arange(1, num_e + 1, dtype=np.float64)
    for _ in range(60):
        mid = (lo + hi) / 2
        w = ranks**-mid
        lo, hi = (mid, hi) if w[0] / w.mean() < 12.0 else (lo, mid)
    base = ranks ** -((lo + hi) / 2)
    load = np.stack([rng.permutation(base) for _ in range(num_l)])
    return np.round(load / load.mean() * 4096)


def _trade(load: np.ndarray, share: float, rng: np.random.Generator) -> np.ndarray:
    """``share`` of the experts of each layer trade popularity (the bench's ``trade=10%``)."""
    out = load.copy()
    k = max(2, round(share * load.shape[1]))
    for layer in range(load.shape[0]):
        idx = rng.choice(load.shape[1], size=k, replace=False)
        out[layer, idx] = load[layer, rng.permutation(idx)]
    return out


def test_v3_ep32_zipf_trade_keeps_the_spread_rule() -> None:
    """DeepSeek-V3 EP32 (4 nodes), Zipf load, then 10% of the experts trade popularity: the
    bench's draws with seed 1 at 48 layers. On layers 6 and 38 the fresh `balanced` plan took
    DeepSeek's layer, which stacks two copies of an expert on a rank, and `migration_aware`
    kept that stack on layer 38."""
    rng = np.random.default_rng(1)
    topo = make_topology(32, 288, 4)
    load = _zipf(48, 256, rng)
    rng.lognormal(0.0, 0.05, size=load.shape)  # the 5% drift the bench draws first
    drifted = _trade(load, 0.10, rng)[[6, 38]]
    load = load[[6, 38]]
    fresh, _ = plan_balanced(load, topo, num_groups=8)
    again, _ = plan_balanced(drifted, topo, num_groups=8)
    assert _breaks(again, topo, 8, 256) == 0
    current = ModelPlacement.from_lists(fresh.tolist(), num_ranks=32, num_logical_experts=256)
    out, _ = plan_migration_aware(drifted, topo, num_groups=8, current=current, tolerance=0.01)
    assert _breaks(out, topo, 8, 256, fresh) == 0


def test_qwen3_30b_lognormal_trade_keeps_the_spread_rule() -> None:
    """Qwen3-30B-A3B (128 experts, 144 slots on 8 ranks, 1 node), lognormal load, then 10% of
    the experts trade popularity: the bench's draws with seed 3, layer 0. The search turned a
    replica of an expert with 9 copies into another expert, leaving 2 of its 8 on one rank."""
    rng = np.random.default_rng(3)
    topo = make_topology(8, 144, 1)
    full = rng.lognormal(0.0, 1.2, size=(48, 128))
    load = np.round(full / full.mean() * 4096)
    drifted = _trade(load[:1], 0.10, rng)  # layer 0 draws first
    fresh, _ = plan_balanced(load[:1], topo, num_groups=1)
    current = ModelPlacement.from_lists(fresh.tolist(), num_ranks=8, num_logical_experts=128)
    out, _ = plan_migration_aware(drifted, topo, num_groups=1, current=current, tolerance=0.005)
    assert _breaks(out, topo, 1, 128, fresh) == 0


# --- replica counts: the threshold search gives the greedy's counts -----------------------------------
def _greedy_counts(w: np.ndarray, num_phy: int, num_ranks: int) -> np.ndarray:
    """The slot-by-slot greedy `replica_counts` replaced (O(P) steps)."""
    counts = np.ones(w.shape, dtype=np.int64)
    rows = np.arange(w.shape[0])
    for _ in range(num_phy - w.shape[1]):
        score = w / counts
        full = (counts >= num_ranks).all(axis=1)
        idx = np.argmax(np.where(full[:, None] | (counts < num_ranks), score, -1.0), axis=1)
        counts[rows, idx] += 1
    return counts


@settings(max_examples=300)
@given(
    st.integers(1, 10),
    st.integers(1, 6),
    st.integers(0, 80),
    st.sampled_from(["ties", "uniform", "extremes"]),
    st.integers(0, 2**32 - 1),
)
def test_replica_counts_match_the_slot_by_slot_greedy(n: int, ranks: int, more: int, kind: str, seed: int) -> None:
    rng = np.random.default_rng(seed)
    if kind == "ties":
        w = rng.integers(0, 4, size=(3, n)).astype(np.float64)
    elif kind == "uniform":
        w = rng.random((3, n)) * 100
    else:
        w = rng.choice([0.0, 1e-300, 1.0, 3.0, 1e300], size=(3, n))
    want = _greedy_counts(w, n + more, ranks)
    assert np.array_equal(replica_counts(w, n + more, ranks), want)
    saved, balanced_mod._SLOT_BY_SLOT = balanced_mod._SLOT_BY_SLOT, 0  # the bisection path too
    try:
        assert np.array_equal(replica_counts(w, n + more, ranks), want)
    finally:
        balanced_mod._SLOT_BY_SLOT = saved


def test_rebalance_refuses_a_size_that_cannot_fit_in_memory(monkeypatch: Any) -> None:
    """The error comes before any work: 800,000,000 slots would take minutes to even start."""
    import eplb.planner.entry as rb

    monkeypatch.setattr(rb, "_physical_memory", lambda: 16 * 2**30)
    with pytest.raises(InvalidValueError, match=r"800000000 slots x 1 layers.*GiB.*use at most \d+ slots"):
        rebalance(np.ones((1, 8)), make_topology(8, 800_000_000), num_groups=1)
    out = rebalance(np.ones((1, 8)), make_topology(8, 16), num_groups=1)  # small sizes still plan
    assert out.num_physical_experts == 16
