"""Tier 1 (CPU, one process, no process group): `EplbState`'s single-rank behaviour: map shapes
and in-place storage, the sliding window, the step interval, dummy steps, a rearrangement that
changes replicas, rollback after an injected fault, and the errors a user sees."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from eplb.executors.base import RunContext
from eplb.executors.local import LocalExecutor
from eplb.ir import InvalidValueError, ModelPlacement
from eplb.runtime import EplbState, LayerStatus, RearrangementError, RuntimeConfig
from eplb.runtime.state import _all_peer_placement
from examples.moe_ep import ExpertParallelMoE, MoEConfig, logical_weights, reference_forward

CFG = MoEConfig(num_layers=2, num_experts=6, slots_per_rank=9, skew=4.0)


def _model() -> ExpertParallelMoE:
    return ExpertParallelMoE(CFG, rank=0, num_ranks=1)


def _state(model: ExpertParallelMoE, **config: Any) -> EplbState:
    return EplbState.build(model, config=RuntimeConfig(**config))


def _ptrs(state: EplbState, model: ExpertParallelMoE) -> list[int]:
    maps = [state.physical_to_logical_map, state.logical_to_physical_map, state.logical_replica_count]
    return [t.data_ptr() for t in maps] + [w.data_ptr() for ws in model.expert_weights for w in ws]


def test_maps_have_the_seeds_shapes_and_are_handed_to_the_model() -> None:
    model = _model()
    state = _state(model)
    num_l, num_e, num_p = 2, 6, 9
    assert state.physical_to_logical_map.shape == (num_l, num_p)
    assert state.logical_to_physical_map.shape == (num_l, num_e, num_p - num_e + 1)
    assert state.logical_replica_count.shape == (num_l, num_e)
    assert state.expert_load_pass.shape == (num_l, 9) and state.expert_load_pass.dtype == torch.int32
    assert state.physical_to_logical_map[0].tolist() == [0, 1, 2, 3, 4, 5, 0, 1, 2]
    assert state.logical_to_physical_map[0, 0].tolist() == [0, 6, -1, -1]
    assert state.logical_replica_count[0].tolist() == [2, 2, 2, 1, 1, 1]
    # The model routes with the state's own tensors, not copies.
    assert model._l2p is state.logical_to_physical_map and model._load_pass is state.expert_load_pass


def test_first_rearrangement_comes_at_three_quarters_of_the_interval() -> None:
    model = _model()
    state = _state(model, step_interval=8, window_size=4)
    for step in range(1, 11):
        state.step()
        assert len(state.reports) == (1 if step >= 2 else 0) + (1 if step >= 10 else 0), step


def test_dummy_steps_advance_the_interval_but_record_no_load() -> None:
    model = _model()
    state = _state(model, step_interval=100, window_size=4)
    x = torch.randn(16, CFG.hidden, dtype=CFG.dtype)
    model(x)
    state.step(is_dummy=True)
    assert state.expert_rearrangement_step == 76 and int(state.global_load().sum()) == 0
    model(x)
    state.step()
    assert int(state.global_load().sum()) == 16 * CFG.top_k * CFG.num_layers


def test_the_window_keeps_the_last_passes_per_logical_expert() -> None:
    # A placement where logical expert 5 sits in local slot 0: the window must say expert 5.
    p2l = [[5, 1, 2, 3, 4, 0, 0, 1, 2]] * 2
    initial = ModelPlacement.from_lists(p2l, num_ranks=1, num_logical_experts=6)
    model = ExpertParallelMoE(CFG, rank=0, num_ranks=1, placement=initial)
    state = EplbState.build(model, config=RuntimeConfig(window_size=3, step_interval=100), initial=initial)
    for n in (1, 2, 3, 4):  # pass n puts n tokens on local slot 0
        state.expert_load_pass[:, 0] = n
        state.step()
        assert int(state.expert_load_pass.sum()) == 0
    load = state.global_load()
    assert load.shape == (2, 6) and load[:, 5].tolist() == [2 + 3 + 4] * 2  # pass 1 slid out
    assert int(load.sum()) == 2 * 9


def test_balancedness_is_returned_as_a_dict() -> None:
    model = _model()
    state = _state(model, step_interval=100)
    model(torch.randn(8, CFG.hidden, dtype=CFG.dtype))
    stats = state.step(log_stats=True)
    assert stats is not None and set(stats) == {"avg_tokens", "max_tokens", "balancedness"}
    assert stats["avg_tokens"] == stats["max_tokens"] == 8 * CFG.top_k * CFG.num_layers
    assert stats["balancedness"] == 1.0 and state.last_stats == stats


def test_rearrangement_updates_maps_in_place_and_keeps_outputs() -> None:
    model = _model()
    # One rank is always balanced, so migration-aware keeps everything; DeepSeek's greedy
    # re-derives replicas from the load and reorders slots, which exercises the move.
    state = _state(model, step_interval=4, window_size=4, policy="deepseek")
    x = torch.randn(64, CFG.hidden, dtype=CFG.dtype, generator=torch.Generator().manual_seed(0))
    ref = reference_forward(CFG, logical_weights(CFG), x)
    ptrs = _ptrs(state, model)
    before = state.physical_to_logical_map.clone()
    for _ in range(2):
        model(x)
        state.step()
    (report,) = state.reports
    assert report.done and report.layers_migrated, report  # the skew buys hot experts replicas
    assert not torch.equal(before, state.physical_to_logical_map)
    assert _ptrs(state, model) == ptrs, "a map or weight tensor was replaced instead of updated"
    assert state.physical_to_logical_map.tolist() == [list(p) for p in state.placement.physical_to_logical]
    assert state.logical_replica_count.tolist() == state.placement.replica_count_array().tolist()
    assert {"gather", "policy", "compile", "schedule", "verify", "execute", "commit"} <= set(report.timings)
    assert torch.allclose(model(x, record=False), ref, atol=1e-12, rtol=0)
    assert set(state.layer_status()) <= {LayerStatus.MIGRATED, LayerStatus.STABLE}


class _FailingLocal(LocalExecutor):
    """Runs the layer's copies until the second one, then raises (the layer is left half-moved)."""

    calls = 0

    def copy(self, op: Any, ctx: RunContext) -> None:
        self.calls += 1
        if self.calls == 2:
            raise RuntimeError("injected")
        super().copy(op, ctx)


def test_a_fault_restores_the_old_weights_and_says_so() -> None:
    model = _model()
    state = _state(model, step_interval=100, window_size=4, executor=_FailingLocal(), policy="deepseek")
    x = torch.randn(64, CFG.hidden, dtype=CFG.dtype, generator=torch.Generator().manual_seed(1))
    model(x)
    state.step()
    weights = [w.clone() for ws in model.expert_weights for w in ws]
    maps = state.physical_to_logical_map.clone()
    with pytest.raises(RearrangementError, match=r"rolled back to their old placement and weights: \[0, 1\]"):
        state.rearrange()
    assert state.layer_status() == (LayerStatus.ROLLED_BACK, LayerStatus.ROLLED_BACK)
    assert torch.equal(state.physical_to_logical_map, maps)
    assert all(
        torch.equal(a, b)
        for a, b in zip(weights, [w for ws in model.expert_weights for w in ws], strict=True)
    )
    assert state.reports[-1].error is not None and state.reports[-1].done


def test_incremental_mode_moves_one_layer_per_step() -> None:
    model = _model()
    state = _state(model, step_interval=4, window_size=4, incremental=True, policy="deepseek")
    x = torch.randn(64, CFG.hidden, dtype=CFG.dtype, generator=torch.Generator().manual_seed(2))
    ref = reference_forward(CFG, logical_weights(CFG), x)
    seen = []
    for _ in range(4):
        model(x)
        state.step()
        seen.append(state.layer_status())
        assert torch.allclose(model(x, record=False), ref, atol=1e-12, rtol=0)
    assert (LayerStatus.MIGRATED, LayerStatus.PENDING) in seen and state.reports[0].chunks == 2
    assert not state.rearranging


def test_all_peer_placement_reaches_every_peer_and_keeps_the_experts() -> None:
    p = ModelPlacement.trivial(num_layers=2, num_logical_experts=10, num_physical_experts=12, num_ranks=4)
    q = _all_peer_placement(p)
    for a, b in zip(p.layers, q.layers, strict=True):
        assert sorted(a.physical_to_logical) == sorted(b.physical_to_logical)
        for r in range(4):  # rank r's slot k went to rank (r + 1 + k) % 4: all 3 peers
            for k in range(3):
                dst = (r + 1 + k) % 4
                assert b.physical_to_logical[dst * 3 + k] == a.physical_to_logical[r * 3 + k]


def test_errors_say_what_to_change() -> None:
    with pytest.raises(InvalidValueError, match=r"'window_size' must be an int > 0 \(got 0\)"):
        RuntimeConfig(window_size=0)
    model = _model()
    model._w1[1] = model._w1[1][:3]
    with pytest.raises(
        InvalidValueError, match=r"expert_weights\[1\]\[0\]' must be \[num_local_physical_experts=9"
    ):
        EplbState.build(model)
    bad = ModelPlacement.trivial(num_layers=3, num_logical_experts=6, num_physical_experts=9, num_ranks=1)
    with pytest.raises(InvalidValueError, match=r"pass the placement the model's weights hold"):
        EplbState.build(_model(), initial=bad)
