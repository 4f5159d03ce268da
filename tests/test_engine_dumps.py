"""Tier 1 (pure Python; torch and safetensors on CPU): eplb reads each engine's load dumps, written
here in the engine's own structure."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from eplb.cli import main
from eplb.io import (
    InputError,
    MissingExtraError,
    parse_moe_layers,
    read_load_file,
    read_trace_file,
    read_trtllm_stats,
)
from eplb.io.layout import layout_named

torch = pytest.importorskip("torch")

LAYERS, EXPERTS, SLOTS, DENSE = 7, 8, 10, 3  # model layers 0-6, MoE 3-6, 10 slots on 2 ranks
MOE = LAYERS - DENSE


def _trtllm_folder(d: Path, iters: range, ranks: int, seed: int = 0) -> np.ndarray:
    """A folder as TensorRT-LLM's ``tensorrt_llm/_torch/expert_statistic.py`` writes it
    (``ExpertStatistic._write``): rank 0's ``meta_info.json`` {num_experts, num_experts_per_token},
    ``rank{r}.safetensors`` with a bincount per ``"{iter}_{layer}"`` (layer: the MoE module's
    ``layer_idx``, a model layer index), and the side files eplb must ignore. Returns the expected
    counts [iters, moe layers, experts] summed over ranks."""
    from safetensors.torch import save_file

    rng = np.random.default_rng(seed)
    total = np.zeros((len(iters), MOE, EXPERTS), dtype=np.int64)
    (d / "meta_info.json").write_text(json.dumps({"num_experts": EXPERTS, "num_experts_per_token": 2}))
    for r in range(ranks):
        records = {}
        for i, it in enumerate(iters):
            for m, layer in enumerate(range(DENSE, LAYERS)):
                selected = torch.from_numpy(rng.integers(0, EXPERTS, (5, 2)))
                counts = torch.bincount(selected.flatten(), minlength=EXPERTS)
                records[f"{it}_{layer}"] = counts
                total[i, m] += counts.numpy()
        save_file(records, str(d / f"rank{r}.safetensors"))
        save_file({"x": torch.zeros(2, 2)}, str(d / f"cooccurrence_rank{r}.safetensors"))
    return total


def test_trtllm_expert_statistic_folder_is_summed_over_iterations_and_ranks(tmp_path: Path) -> None:
    want = _trtllm_folder(tmp_path, range(10, 13), ranks=2)
    found = read_load_file(tmp_path, layout=parse_moe_layers("3-6"))
    np.testing.assert_array_equal(found.load, want.sum(axis=0))
    assert found.notes == (
        "TensorRT-LLM ExpertStatistic: iterations 10-12, ranks 0-1, model layers 3-6, summed over ranks",
    )
    trace = read_trace_file(tmp_path)
    np.testing.assert_array_equal(trace.trace, want)


def test_trtllm_folder_of_other_layers_than_the_model_is_refused(tmp_path: Path) -> None:
    _trtllm_folder(tmp_path, range(2), ranks=1)
    with pytest.raises(InputError, match=r"names model layers 3-6 \(4 layers\), but deepseek-v3 .* MoE layers 3-60"):
        read_load_file(tmp_path, layout=layout_named("deepseek-v3"))


def test_trtllm_counts_of_another_length_are_refused(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    (tmp_path / "meta_info.json").write_text(json.dumps({"num_experts": 8, "num_experts_per_token": 2}))
    save_file({"0_3": torch.zeros(6, dtype=torch.int64)}, str(tmp_path / "rank0.safetensors"))
    with pytest.raises(InputError, match=r"0_3 holds int64 \(6,\), not integer counts of \(8,\)"):
        read_trtllm_stats(tmp_path)


def test_trtllm_without_safetensors_says_which_extra(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _trtllm_folder(tmp_path, range(1), ranks=1)
    monkeypatch.setitem(sys.modules, "safetensors.numpy", None)
    with pytest.raises(MissingExtraError, match=r"needs the safetensors package; pip install 'eplb\[trtllm\]'"):
        read_trtllm_stats(tmp_path)


def _stat_dump(path: Path, filled: int, buffer: int = 10) -> np.ndarray:
    """An SGLang ``stat`` dump as ``sglang/srt/eplb/expert_distribution.py`` writes it
    (``_StatAccumulator.dump`` -> ``_dump_to_file``): ``logical_count`` [buffer, model layers,
    experts] from a ``_CircularBuffer`` whose unwritten rows stay zero. Returns the filled rows."""
    rng = np.random.default_rng(1)
    counts = np.zeros((buffer, LAYERS, EXPERTS), dtype=np.int32)
    counts[:filled, DENSE:] = rng.integers(1, 50, (filled, MOE, EXPERTS))
    torch.save(
        {"rank": 0, "logical_count": torch.from_numpy(counts), "average_utilization_rate_over_window": None},
        path,
    )
    return counts[:filled]


def test_sglang_stat_dump_trace_keeps_only_the_filled_buffer_rows(tmp_path: Path) -> None:
    want = _stat_dump(tmp_path / "d.pt", filled=3)
    found = read_trace_file(tmp_path / "d.pt", layout=parse_moe_layers("3-6"))
    np.testing.assert_array_equal(found.trace, want[:, DENSE:])
    assert found.notes[0].startswith("SGLang stat dump: 3 of 10 buffer rows filled")
    assert found.notes[1] == "model layers 0-2 dense (no load), dropped"


def test_simulate_replays_the_filled_rows_of_a_stat_dump(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _stat_dump(tmp_path / "d.pt", filled=4, buffer=50)
    argv = ["simulate", "--load", str(tmp_path / "d.pt"), "--ranks", "2", "--slots", "10"]
    assert main([*argv, "--moe-layers", "3-6", "--policy", "balanced", "--json"]) == 0
    out = capsys.readouterr()
    doc = json.loads(out.out)
    assert doc["windows"] == 4
    assert "4 of 50 buffer rows filled" in out.err


def _per_pass_dump(path: Path, rank: int, passes: int, p2l: np.ndarray) -> np.ndarray:
    """An SGLang ``per_pass`` dump as ``_DetailAccumulator.append`` / ``.dump`` write it: records of
    {forward_pass_id, rank, gatherer_key, global_physical_count [layers, slots]} and the
    ``last_physical_to_logical_map``. Returns the logical counts [passes, layers, experts]."""
    rng = np.random.default_rng(rank)
    records, want = [], np.zeros((passes, LAYERS, EXPERTS))
    for f in range(passes):
        phys = np.zeros((LAYERS, SLOTS), dtype=np.int64)
        phys[DENSE:] = rng.integers(0, 9, (MOE, SLOTS))
        for layer in range(LAYERS):
            np.add.at(want[f, layer], p2l[layer], phys[layer])
        records.append(
            {"forward_pass_id": f, "rank": rank, "gatherer_key": "primary",
             "global_physical_count": torch.from_numpy(phys)}
        )
    torch.save({"records": records, "last_physical_to_logical_map": torch.from_numpy(p2l)}, path)
    return want


def test_sglang_per_pass_dump_maps_slots_to_experts(tmp_path: Path) -> None:
    p2l = np.array([[(s * 3 + layer) % EXPERTS for s in range(SLOTS)] for layer in range(LAYERS)])
    want = _per_pass_dump(tmp_path / "p.pt", rank=0, passes=3, p2l=p2l)
    found = read_load_file(tmp_path / "p.pt", layout=parse_moe_layers("3-6"))
    np.testing.assert_allclose(found.load, want.sum(axis=0)[DENSE:])
    assert found.notes[0].startswith("SGLang per_pass dump: 3 forward passes, rank(s) [0]")
    trace = read_trace_file(tmp_path / "p.pt", layout=parse_moe_layers("3-6"))
    np.testing.assert_allclose(trace.trace, want[:, DENSE:])


def test_sglang_per_pass_folder_sums_the_ranks_pass_by_pass(tmp_path: Path) -> None:
    """``_DetailAccumulator.dump`` writes ``expert_distribution_recorder_{time}_{rank}.pt`` per rank
    into ``SGLANG_EXPERT_DISTRIBUTION_RECORDER_DIR``."""
    p2l = np.array([[(s + layer) % EXPERTS for s in range(SLOTS)] for layer in range(LAYERS)])
    want = sum(
        _per_pass_dump(tmp_path / f"expert_distribution_recorder_17.5_{r}.pt", rank=r, passes=3, p2l=p2l)
        for r in range(2)
    )
    trace = read_trace_file(tmp_path, layout=parse_moe_layers("3-6"))
    np.testing.assert_allclose(trace.trace, np.asarray(want)[:, DENSE:])
    assert trace.notes[0].startswith("SGLang per_pass dump: 3 forward passes, rank(s) [0, 1]")
    assert trace.notes[0].endswith(", 2 file(s)")
    found = read_load_file(tmp_path, layout=parse_moe_layers("3-6"))
    np.testing.assert_allclose(found.load, np.asarray(want).sum(axis=0)[DENSE:])


def test_a_folder_of_other_torch_files_is_refused(tmp_path: Path) -> None:
    torch.save({"x": torch.zeros(2)}, tmp_path / "a.pt")
    with pytest.raises(InputError, match=r"a.pt in .* is not an SGLang expert-distribution dump"):
        read_load_file(tmp_path)


def test_rebalance_reports_what_it_read(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "stats").mkdir()
    _trtllm_folder(tmp_path / "stats", range(5, 9), ranks=2)
    out = tmp_path / "t.yaml"
    argv = ["rebalance", "--load", str(tmp_path / "stats"), "--ranks", "2", "--slots", "10"]
    assert main([*argv, "--moe-layers", "3-6", "--out", str(out)]) == 0
    assert "iterations 5-8, ranks 0-1, model layers 3-6" in capsys.readouterr().out
    assert [ln.split(":")[0].strip() for ln in out.read_text().splitlines() if ln.startswith("  ")] == [
        "3", "4", "5", "6"
    ]
