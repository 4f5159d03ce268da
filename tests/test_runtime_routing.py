"""Tier 1 (pure CPU, one process): `eplb.runtime.routing` maps logical top-k picks to slots that
hold the expert, spreads them evenly and deterministically over replicas, and counts per-slot load."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from eplb.ir import InvalidValueError, Placement
from eplb.runtime.routing import record_load, route, route_and_record
from tests.strategies import placements


def _maps(p: Placement) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.tensor(p.logical_to_physical), torch.tensor(p.replica_count)


@given(
    placements(max_ranks=6, max_slots_per_rank=5), st.integers(1, 40), st.integers(1, 4), st.integers(0, 99)
)
def test_every_pick_lands_on_a_slot_holding_its_expert(p: Placement, n: int, k: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, p.num_logical_experts, (n, k), generator=g)
    l2p, rc = _maps(p)
    phys = route(ids, l2p, rc)
    assert phys.shape == ids.shape and phys.dtype == torch.long
    p2l = torch.tensor(p.physical_to_logical)
    assert torch.equal(p2l[phys], ids)


@given(placements(max_ranks=4, max_slots_per_rank=4), st.integers(0, 50))
def test_replicas_share_an_expert_evenly(p: Placement, offset: int) -> None:
    # Every token picks expert e; a batch of lcm-many tokens splits exactly evenly over replicas.
    l2p, rc = _maps(p)
    for e, count in enumerate(p.replica_count):
        ids = torch.full((count * 6, 1), e)
        phys = route(ids, l2p, rc, token_offset=offset)
        hits = torch.bincount(phys.flatten(), minlength=p.num_physical_experts)
        slots = [s for s, x in enumerate(p.physical_to_logical) if x == e]
        assert hits[slots].tolist() == [6] * count
        assert int(hits.sum()) == count * 6


def test_routing_a_slice_with_its_offset_equals_routing_the_whole_batch() -> None:
    p = Placement(num_logical_experts=4, num_ranks=2, physical_to_logical=[0, 1, 2, 0, 3, 0])
    l2p, rc = _maps(p)
    ids = torch.randint(0, 4, (30, 2), generator=torch.Generator().manual_seed(0))
    whole = route(ids, l2p, rc)
    parts = torch.cat([route(ids[i : i + 7], l2p, rc, token_offset=i) for i in range(0, 30, 7)])
    assert torch.equal(whole, parts)


def test_record_load_counts_only_this_ranks_slots_and_real_tokens() -> None:
    phys = torch.tensor([[0, 3], [4, 5], [3, 3], [1, 5]])
    load = torch.zeros(3, dtype=torch.int32)
    record_load(load, phys, first_slot=3)  # slots 3, 4, 5 are this rank's local 0, 1, 2
    assert load.tolist() == [3, 1, 2]
    masked = torch.zeros(3, dtype=torch.int32)
    record_load(masked, phys, first_slot=3, token_mask=torch.tensor([True, True, False, True]))
    assert masked.tolist() == [1, 1, 2]


def test_route_and_record_accumulates_across_calls() -> None:
    p = Placement(num_logical_experts=3, num_ranks=2, physical_to_logical=[0, 1, 2, 0])
    l2p, rc = _maps(p)
    load = torch.zeros(2, dtype=torch.int32)
    ids = torch.tensor([[0], [0], [1], [2]])
    for _ in range(2):
        phys = route_and_record(ids, l2p, rc, load, first_slot=2)
    # Expert 0 alternates slots 0 and 3 by token index; expert 2 is slot 2.
    assert phys.flatten().tolist() == [0, 3, 1, 2]
    assert load.tolist() == [2, 2]


def test_shape_errors_name_the_argument_and_the_fix() -> None:
    p = Placement(num_logical_experts=2, num_ranks=1, physical_to_logical=[0, 1])
    l2p, rc = _maps(p)
    with pytest.raises(InvalidValueError, match=r"'topk_ids' must be \[num_tokens, top_k\].*unsqueeze"):
        route(torch.tensor([0, 1]), l2p, rc)
    with pytest.raises(InvalidValueError, match=r"one layer's maps.*index them by layer"):
        route(torch.tensor([[0]]), l2p.unsqueeze(0), rc.unsqueeze(0))
    with pytest.raises(InvalidValueError, match=r"'load' must be one layer's"):
        record_load(torch.zeros(2, 2), torch.tensor([[0]]))
