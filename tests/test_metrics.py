"""Tier 1 (pure Python): load validation and placement metrics against brute-force definitions."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from eplb.ir import InvalidValueError, ModelPlacement
from eplb.planner import metrics
from eplb.planner.load import as_load_matrix
from tests.strategies import load_matrices, model_placements, placement_pairs


def _brute_rank_loads(load: np.ndarray, mp: ModelPlacement) -> list[list[float]]:
    out = []
    for layer, pl in enumerate(mp.layers):
        ranks = [0.0] * pl.num_ranks
        for p, e in enumerate(pl.physical_to_logical):
            ranks[pl.rank_of(p)] += load[layer, e] / pl.replica_count[e]
        out.append(ranks)
    return out


@st.composite
def load_and_placement(draw: Any) -> tuple[np.ndarray, ModelPlacement]:
    mp = draw(model_placements())
    load = draw(load_matrices(num_layers=mp.num_layers, num_logical_experts=mp.num_logical_experts))
    return load, mp


def test_rank_loads_split_replicas_evenly() -> None:
    mp = ModelPlacement.from_lists([[0, 1, 2, 0]], num_ranks=2)
    load = [[4.0, 3.0, 1.0]]
    assert metrics.rank_loads(load, mp).tolist() == [[5.0, 3.0]]
    assert metrics.balancedness(load, mp).tolist() == [0.8]
    assert metrics.imbalance(load, mp).tolist() == pytest.approx([0.25])


@given(load_and_placement())
def test_metrics_match_their_definitions(case: tuple[np.ndarray, ModelPlacement]) -> None:
    load, mp = case
    brute = np.array(_brute_rank_loads(load, mp))
    assert np.allclose(metrics.rank_loads(load, mp), brute)
    mean, top = brute.mean(axis=1), brute.max(axis=1)
    bal = np.array([m / t if t > 0 else 1.0 for m, t in zip(mean, top, strict=True)])
    assert np.allclose(metrics.balancedness(load, mp), bal)
    imb = np.array([(t - m) / m if m > 0 else 0.0 for m, t in zip(mean, top, strict=True)])
    assert np.allclose(metrics.imbalance(load, mp), imb)
    expect = mean.sum() / top.sum() if top.sum() > 0 else 1.0
    assert metrics.model_balancedness(load, mp) == pytest.approx(expect)


@given(load_and_placement())
def test_lower_bound_holds_for_any_placement(case: tuple[np.ndarray, ModelPlacement]) -> None:
    load, mp = case
    lb = metrics.max_rank_load_lower_bound(
        load, num_ranks=mp.num_ranks, num_physical_experts=mp.num_physical_experts
    )
    assert (metrics.rank_loads(load, mp).max(axis=1) >= lb * (1 - 1e-12)).all()
    ub = metrics.balancedness_upper_bound(
        load, num_ranks=mp.num_ranks, num_physical_experts=mp.num_physical_experts
    )
    assert (metrics.balancedness(load, mp) <= ub + 1e-12).all()


def test_lower_bound_counts_the_hot_expert() -> None:
    # 2 ranks: the mean (102 / 2) binds.
    lb = metrics.max_rank_load_lower_bound([[100.0, 1.0, 1.0]], num_ranks=2, num_physical_experts=4)
    assert lb.tolist() == [51.0]
    # 4 ranks x 1 slot, 3 experts: only 2 replicas for the hot one, so 100 / 2 binds.
    lb = metrics.max_rank_load_lower_bound([[100.0, 1.0, 1.0]], num_ranks=4, num_physical_experts=4)
    assert lb.tolist() == [50.0]
    # One redundant slot for two hot experts: one of them keeps a single replica of 60.
    lb = metrics.max_rank_load_lower_bound([[60.0, 60.0, 1.0, 1.0]], num_ranks=5, num_physical_experts=5)
    assert lb.tolist() == [60.0]
    # Replicas beyond the rank count stack: 100 over 2 ranks is 50 however many slots.
    lb = metrics.max_rank_load_lower_bound([[100.0, 0.0]], num_ranks=2, num_physical_experts=8)
    assert lb.tolist() == [50.0]


@given(placement_pairs())
def test_transfer_mask_matches_definition(pair: tuple[ModelPlacement, ModelPlacement]) -> None:
    cur, tgt = pair
    mask = metrics.transfer_mask(cur, tgt)
    for layer in range(cur.num_layers):
        c, t = cur.layers[layer], tgt.layers[layer]
        for p, e in enumerate(t.physical_to_logical):
            assert mask[layer, p] == (e not in c.rank_slots(t.rank_of(p)))
    assert metrics.slots_moved(cur, tgt) == int(mask.sum())
    assert metrics.bytes_moved(cur, tgt, expert_bytes=44) == 44 * int(mask.sum())
    assert metrics.slots_moved(cur, cur) == 0


def test_reordering_slots_within_a_rank_moves_nothing() -> None:
    cur = ModelPlacement.from_lists([[0, 1, 2, 3]], num_ranks=2)
    tgt = ModelPlacement.from_lists([[1, 0, 3, 2]], num_ranks=2)
    assert metrics.slots_moved(cur, tgt) == 0
    swapped = ModelPlacement.from_lists([[2, 1, 0, 3]], num_ranks=2)
    assert metrics.transfer_mask(cur, swapped).tolist() == [[True, False, True, False]]


def test_summarize() -> None:
    cur = ModelPlacement.from_lists([[0, 1, 2, 0]], num_ranks=2)
    tgt = ModelPlacement.from_lists([[0, 2, 1, 0]], num_ranks=2)
    m = metrics.summarize([[4.0, 3.0, 1.0]], tgt, current=cur, expert_bytes=10)
    assert m.balancedness == pytest.approx(4.0 / 5.0)
    assert (m.slots_moved, m.bytes_moved, m.slots_moved_fraction) == (2, 20, 0.5)
    assert any("slots moved" in line for line in m.lines())


def test_metric_errors_name_the_mismatch() -> None:
    mp = ModelPlacement.from_lists([[0, 1]], num_ranks=1)
    with pytest.raises(InvalidValueError, match=r"'load' has 2 layers but the placement has 1"):
        metrics.balancedness(np.ones((2, 2)), mp)
    with pytest.raises(InvalidValueError, match=r"names experts outside \[0, 1\)"):
        metrics.balancedness(np.ones((1, 1)), mp)
    with pytest.raises(InvalidValueError, match=r"'num_ranks' is required when the placement is an array"):
        metrics.balancedness(np.ones((1, 2)), [[0, 1]])
    other = ModelPlacement.from_lists([[0, 1, 0, 1]], num_ranks=1)
    with pytest.raises(InvalidValueError, match=r"'target' has shape \(1, 4\) but current has \(1, 2\)"):
        metrics.slots_moved(mp, other)


# --- load validation ------------------------------------------------------------------------------
def test_load_is_copied_and_float64() -> None:
    src = np.array([[1, 2], [3, 4]], dtype=np.int32)
    out = as_load_matrix(src)
    assert out.dtype == np.float64 and out.tolist() == [[1, 2], [3, 4]]
    out[0, 0] = 99
    assert src[0, 0] == 1
    f64 = np.ones((1, 2))
    assert as_load_matrix(f64) is not f64


def test_load_from_torch_tensor() -> None:
    torch = pytest.importorskip("torch")
    t = torch.tensor([[1.0, 2.0]], requires_grad=True)
    assert as_load_matrix(t).tolist() == [[1.0, 2.0]]


@pytest.mark.parametrize(
    ("value", "match"),
    [
        ([[1.0, float("nan")]], r"'load\[0, 1\]' must be finite \(got nan; 1 such entries\); drop or zero"),
        ([[0.0], [-1.0]], r"'load\[1, 0\]' must be >= 0 \(got -1.0; 1 negative entries\)"),
        ([[float("-inf")]], r"'load\[0, 0\]' must be finite \(got -inf"),
        ([], r"'load' must have 2 dimensions"),
        (np.ones((0, 4)), r"'load' must have at least one layer and one expert \(got shape \(0, 4\)\)"),
        ([["a", "b"]], r"'load' must be a rectangular \[num_layers, num_logical_experts\] array of numbers"),
        ("1,2", r"'load' must be a \[num_layers, num_logical_experts\] array \(got '1,2'\)"),
    ],
)
def test_bad_load_is_rejected(value: Any, match: str) -> None:
    with pytest.raises(InvalidValueError, match=match):
        as_load_matrix(value)
