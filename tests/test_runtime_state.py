"""Tier 1 (CPU, one process, no process group): `EplbState`'s single-rank behaviour: map shapes
and in-place storage, the sliding window, the step interval, dummy steps, a rearrangement that
changes replicas, rollback after an injected fault, the bounded rollback backup (chunks cut to
``max_backup_bytes``), and the errors a user sees."""

from __future__ import annotations

import itertools
from typing import Any

import pytest
import torch

from eplb.executors.base import RunContext
from eplb.executors.local import LocalExecutor
from eplb.ir import InvalidValueError, ModelPlacement
from eplb.runtime import EplbState, LayerStatus, RearrangementError, RuntimeConfig
from eplb.runtime.chunking import all_peer_placement as _all_peer_placement
from eplb.runtime.chunking import budget_chunks as _budget_chunks
from eplb.runtime.state import DEFAULT_BACKUP_LAYERS
from eplb.runtime.transaction import Backup as _Backup
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


def test_step_takes_vllms_positional_call_the_same_as_keywords() -> None:
    """vLLM 0.33's model runner calls ``step(is_dummy, is_profile, log_stats=...)``."""
    x = torch.randn(16, CFG.hidden, dtype=CFG.dtype)
    states = []
    for positional in (True, False):
        model = _model()
        state = _state(model, step_interval=100, window_size=4)
        model(x)
        stats = state.step(True, False, log_stats=True) if positional else state.step(is_dummy=True, log_stats=True)
        model(x)
        state.step(False, False, True) if positional else state.step(is_dummy=False, log_stats=True)
        states.append((stats, state.expert_rearrangement_step, state.global_load().tolist()))
    assert states[0] == states[1]
    assert states[0][1] == 77 and sum(map(sum, states[0][2])) == 16 * CFG.top_k * CFG.num_layers


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


CFG6 = MoEConfig(num_layers=6, num_experts=6, slots_per_rank=9, skew=4.0)
SLOT_BYTES = 2 * CFG6.hidden * CFG6.ffn * 8  # w1 + w2 of one expert, float64


def _rearranged(monkeypatch: pytest.MonkeyPatch, **config: Any) -> tuple[Any, ...]:
    """One deepseek rearrangement of CFG6 on one rank; returns the model, the state, its report
    and the bytes of every `_Backup` taken (measured on the copies themselves), in order."""
    taken: list[int] = []
    take = _Backup.take

    def spy(weights: Any, slots: Any, device: Any) -> _Backup:
        backup = take(weights, slots, device)
        taken.append(sum(t.numel() * t.element_size() for t in backup.tensors))
        return backup

    monkeypatch.setattr(_Backup, "take", spy)
    model = ExpertParallelMoE(CFG6, rank=0, num_ranks=1)
    state = EplbState.build(
        model, config=RuntimeConfig(step_interval=100, window_size=4, policy="deepseek", **config)
    )
    model(torch.randn(64, CFG6.hidden, dtype=CFG6.dtype, generator=torch.Generator().manual_seed(3)))
    state.step()
    report = state.rearrange()
    monkeypatch.undo()
    return model, state, report, taken


@pytest.mark.parametrize("budget_slots", [5, 12])
def test_a_backup_budget_cuts_chunks_and_moves_the_same_as_one_chunk(
    monkeypatch: pytest.MonkeyPatch, budget_slots: int
) -> None:
    one_model, one_state, one, _ = _rearranged(monkeypatch, max_backup_bytes=10**12)
    budget = budget_slots * SLOT_BYTES
    model, state, report, taken = _rearranged(monkeypatch, max_backup_bytes=budget)
    assert one.chunks == 1 and len(one.layers_planned) == CFG6.num_layers
    assert report.chunks > 1 and report.backup_budget == budget and report.done
    # Consecutive chunks of the planned layers, in order, each run once.
    assert [layer for c in report.chunk_layers for layer in c] == list(report.layers_planned)
    # Measured on the copies: per chunk, its layers' backups (one take per layer).
    starts = [0]
    for c in report.chunk_layers:
        starts.append(starts[-1] + len(c))
    measured = [sum(taken[a:b]) for a, b in itertools.pairwise(starts)]
    assert measured == report.backup_bytes and sum(measured) > 0
    for layers, nbytes in zip(report.chunk_layers, measured, strict=True):
        assert nbytes <= budget or len(layers) == 1, (layers, nbytes, budget)
    if budget_slots == 5:  # some layer changes more than 5 slots: it moved alone, over budget
        assert max(measured) > budget
    else:  # some chunk holds several layers
        assert max(len(c) for c in report.chunk_layers) > 1 and max(measured) <= budget
    assert "chunk(s), backup peak" in str(report) and "(budget " in str(report)
    # Same maps, weights and outputs as the one-chunk run.
    assert state.placement == one_state.placement
    assert torch.equal(state.physical_to_logical_map, one_state.physical_to_logical_map)
    assert torch.equal(state.logical_to_physical_map, one_state.logical_to_physical_map)
    assert torch.equal(state.logical_replica_count, one_state.logical_replica_count)
    assert state.layer_status() == one_state.layer_status()
    for ws, one_ws in zip(model.expert_weights, one_model.expert_weights, strict=True):
        assert all(torch.equal(a, b) for a, b in zip(ws, one_ws, strict=True))
    x = torch.randn(32, CFG6.hidden, dtype=CFG6.dtype, generator=torch.Generator().manual_seed(4))
    ref = reference_forward(CFG6, logical_weights(CFG6), x)
    assert torch.allclose(model(x, record=False), ref, atol=1e-12, rtol=0)
    assert torch.equal(model(x, record=False), one_model(x, record=False))


def test_the_default_budget_is_eight_layers_of_a_ranks_slots_and_explicit_chunks_win(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    state = EplbState.build(ExpertParallelMoE(CFG6, rank=0, num_ranks=1))
    assert DEFAULT_BACKUP_LAYERS == 8 and state.max_backup_bytes == 8 * 9 * SLOT_BYTES
    assert EplbState.build(_model(), config=RuntimeConfig(max_backup_bytes=123)).max_backup_bytes == 123
    # An explicit layers_per_chunk wins over a budget it overshoots.
    _, _, report, taken = _rearranged(monkeypatch, max_backup_bytes=SLOT_BYTES, layers_per_chunk=6)
    assert report.chunks == 1 and report.backup_budget is None and sum(taken) > SLOT_BYTES
    # Without rollback nothing is backed up, so nothing bounds the chunk.
    _, _, report, taken = _rearranged(monkeypatch, max_backup_bytes=SLOT_BYTES, rollback=False)
    assert report.chunks == 1 and report.backup_bytes == [0] and not taken


def test_budget_chunks_fit_the_busiest_rank_and_an_oversize_layer_moves_alone() -> None:
    # 2 ranks x 3 slots, experts 0-2; each target layer rewrites some slots of one rank.
    same = [0, 1, 2, 0, 1, 2]
    targets = [
        [1, 0, 2, 0, 1, 2],  # 0: rank 0 rewrites 2 slots
        [0, 1, 2, 1, 0, 2],  # 1: rank 1 rewrites 2: fits beside layer 0 (per rank, not summed)
        [0, 1, 0, 0, 1, 2],  # 2: rank 0 rewrites 1: 3 > 2 on rank 0, a new chunk
        same,  # 3: unchanged, not in `changed`
        [0, 1, 2, 1, 2, 0],  # 4: rank 1 rewrites 3 > budget: a chunk of its own
        [0, 1, 2, 0, 2, 2],  # 5: rank 1 rewrites 1
    ]
    cur = ModelPlacement.from_lists([same] * 6, num_ranks=2, num_logical_experts=3)
    tgt = ModelPlacement.from_lists(targets, num_ranks=2, num_logical_experts=3)
    changed = [0, 1, 2, 4, 5]
    assert _budget_chunks(changed, cur, tgt, [10] * 6, 20) == [(0, 1), (2,), (4,), (5,)]
    assert _budget_chunks(changed, cur, tgt, [10] * 6, 30) == [(0, 1, 2), (4,), (5,)]
    assert _budget_chunks(changed, cur, tgt, [10] * 6, 40) == [(0, 1, 2), (4, 5)]
    assert _budget_chunks(changed, cur, tgt, [10] * 6, 10**9) == [tuple(changed)]
    assert _budget_chunks(changed, cur, tgt, [10] * 6, 1) == [(c,) for c in changed]
    assert _budget_chunks([], cur, tgt, [10] * 6, 20) == []


@pytest.mark.parametrize(("budget_slots", "reserved_slots"), [(20, 20), (5, 9), (10**6, 6 * 9)])
def test_the_profile_run_reserves_the_largest_backup_a_chunk_can_need(
    monkeypatch: pytest.MonkeyPatch, budget_slots: int, reserved_slots: int
) -> None:
    # Whole slots up to the budget; one whole layer when a layer is larger than the budget
    # (it moves alone); every slot of every layer when the budget holds them all.
    held: list[int] = []
    take = _Backup.take

    def spy(weights: Any, slots: Any, device: Any) -> _Backup:
        held.append(len(list(slots)))
        return take(weights, slots, device)

    monkeypatch.setattr(_Backup, "take", spy)
    state = EplbState.build(
        ExpertParallelMoE(CFG6, rank=0, num_ranks=1),
        config=RuntimeConfig(max_backup_bytes=budget_slots * SLOT_BYTES),
    )
    report = state.profile()
    assert sum(held) == reserved_slots and report.backup_budget == budget_slots * SLOT_BYTES


def test_errors_say_what_to_change() -> None:
    with pytest.raises(InvalidValueError, match=r"'window_size' must be an int > 0 \(got 0\)"):
        RuntimeConfig(window_size=0)
    for bad_budget in (0, -1, True, 1.5):
        with pytest.raises(
            InvalidValueError,
            match=rf"'max_backup_bytes' must be an int > 0 \(bytes\) or None \(got {bad_budget!r}\); "
            r"pass None for the default \(8 layers' worth of a rank's slots\), set layers_per_chunk",
        ):
            RuntimeConfig(max_backup_bytes=bad_budget)  # type: ignore[arg-type]
    model = _model()
    model._w1[1] = model._w1[1][:3]
    with pytest.raises(
        InvalidValueError, match=r"expert_weights\[1\]\[0\]' must be \[num_local_physical_experts=9"
    ):
        EplbState.build(model)
    bad = ModelPlacement.trivial(num_layers=3, num_logical_experts=6, num_physical_experts=9, num_ranks=1)
    with pytest.raises(InvalidValueError, match=r"pass the placement the model's weights hold"):
        EplbState.build(_model(), initial=bad)
