"""Tier 1 (pure Python): round trips through SGLang, TensorRT-LLM, .npy and .pt files, trace files,
and the built-in example's calibration."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from eplb.cli._common import CliError
from eplb.examples_data import (
    IMBALANCE_MEAN,
    IMBALANCE_RANGE,
    generate_trace,
    load_example,
    trivial_imbalance,
)
from eplb.io import (
    PLACEMENT_FORMATS,
    RanksNeededError,
    dump_trtllm_yaml,
    parse_trtllm_yaml,
    placement_bytes,
    read_any_placement,
    read_trace,
    trace_bytes,
)
from eplb.ir import ModelPlacement
from tests.strategies import model_placements

SUFFIX = {"ir": ".json", "sglang": ".sglang.json", "trtllm": ".yaml", "npy": ".npy", "pt": ".pt"}


@given(placement=model_placements(), first_layer=st.integers(0, 5), updates=st.integers(0, 3))
def test_trtllm_yaml_round_trip(placement: ModelPlacement, first_layer: int, updates: int) -> None:
    text = dump_trtllm_yaml(placement, first_layer=first_layer, layer_updates_per_iter=updates)
    cfg = parse_trtllm_yaml(text, num_ranks=placement.num_ranks)
    assert cfg.placement.physical_to_logical == placement.physical_to_logical
    assert (cfg.first_layer, cfg.layer_updates_per_iter, cfg.num_slots) == (
        first_layer,
        updates,
        placement.num_physical_experts,
    )


def test_trtllm_yaml_as_written_by_pyyaml_block_style() -> None:
    # PyYAML's default style (block lists), with comments, as a user might hand-edit it.
    text = """# from generate_eplb_config.py
initial_global_assignments:
  3:
  - 0
  - 1
  - 2
  - 0
  4: [1, 0, 2, 2]   # trailing comment
layer_updates_per_iter: 0
num_slots: 4
"""
    cfg = parse_trtllm_yaml(text, num_ranks=2)
    assert cfg.first_layer == 3
    assert cfg.placement.to_lists() == [[0, 1, 2, 0], [1, 0, 2, 2]]


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("num_slots: 4\n", "no initial_global_assignments"),
        ("initial_global_assignments:\n  3: [0, 1]\n  5: [1, 0]\n", r"consecutive; missing \[4\]"),
        ("initial_global_assignments:\n  3: [0, 1, 1]\nnum_slots: 4\n", "lists 3 slots but num_slots is 4"),
        ("initial_global_assignments:\n  3: [0, 1]\nfoo: 1\n", r"unknown key\(s\) \['foo'\]"),
        ("initial_global_assignments:\n  3: [0, x]\n", "line 2: expected an integer, got 'x'"),
        ("initial_global_assignments:\n\t3: [0, 1]\n", "line 2: tabs in indentation"),
        ("initial_global_assignments:\n  3: [0, 1]\n  3: [1, 0]\n", "layer 3 appears twice"),
        ("initial_global_assignments:\n  3: [0, 2, 2]\n", r"experts \[1\] have none"),
        ("&anchor [1]\n", "outside the YAML subset"),
    ],
)
def test_trtllm_yaml_errors_name_line_and_fix(text: str, match: str) -> None:
    with pytest.raises(CliError, match=match):
        parse_trtllm_yaml(text, num_ranks=1)


@pytest.mark.parametrize("fmt", PLACEMENT_FORMATS)
@given(placement=model_placements())
def test_placement_files_round_trip(
    tmp_path_factory: pytest.TempPathFactory, fmt: str, placement: ModelPlacement
) -> None:
    path = tmp_path_factory.mktemp("p") / f"placement{SUFFIX[fmt]}"
    path.write_bytes(placement_bytes(placement, fmt))
    back = read_any_placement(
        path, num_ranks=placement.num_ranks, num_logical_experts=placement.num_logical_experts
    )
    assert back == placement


def test_placement_without_rank_count_needs_ranks(tmp_path: Path) -> None:
    placement = ModelPlacement.trivial(
        num_layers=2, num_logical_experts=4, num_physical_experts=6, num_ranks=2
    )
    path = tmp_path / "p.sglang.json"
    path.write_bytes(placement_bytes(placement, "sglang"))
    with pytest.raises(RanksNeededError, match="does not record the rank count; pass --ranks"):
        read_any_placement(path)
    assert read_any_placement(path, num_ranks=2) == placement
    with pytest.raises(CliError, match="no such file"):
        read_any_placement(tmp_path / "missing.json")
    (tmp_path / "p.txt").write_text("x")
    with pytest.raises(CliError, match="unknown placement file type"):
        read_any_placement(tmp_path / "p.txt")


@given(placement=model_placements(), first_layer=st.integers(0, 4))
def test_sglang_map_has_a_row_per_model_layer(placement: ModelPlacement, first_layer: int) -> None:
    import json
    import tempfile

    doc = json.loads(placement_bytes(placement, "sglang", first_layer=first_layer))
    rows = doc["physical_to_logical_map"]
    assert len(rows) == first_layer + placement.num_layers
    # Dense layers get SGLang's trivial row; the MoE layers follow in order.
    trivial = [p % placement.num_logical_experts for p in range(placement.num_physical_experts)]
    assert rows[:first_layer] == [trivial] * first_layer
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "p.sglang.json"
        path.write_text(json.dumps(doc))
        back = read_any_placement(
            path,
            num_ranks=placement.num_ranks,
            num_logical_experts=placement.num_logical_experts,
            first_layer=first_layer,
        )
    assert back == placement


def test_first_layer_beyond_the_rows_is_refused(tmp_path: Path) -> None:
    placement = ModelPlacement.trivial(
        num_layers=2, num_logical_experts=4, num_physical_experts=6, num_ranks=2
    )
    path = tmp_path / "p.sglang.json"
    path.write_bytes(placement_bytes(placement, "sglang"))
    with pytest.raises(CliError, match=r"has 2 layer rows, not more than --first-layer 2; pass the model"):
        read_any_placement(path, num_ranks=2, first_layer=2)


@pytest.mark.parametrize(("fmt", "suffix"), [("npy", ".npy"), ("json", ".json"), ("sglang", ".pt")])
def test_trace_files_round_trip(tmp_path: Path, fmt: str, suffix: str) -> None:
    trace = np.arange(4 * 2 * 3, dtype=np.float64).reshape(4, 2, 3)
    path = tmp_path / f"trace{suffix}"
    path.write_bytes(trace_bytes(trace, fmt))
    np.testing.assert_array_equal(read_trace(path), trace)
    # Steps summed into windows of 2; SGLang dumps hold one step per forward pass.
    np.testing.assert_array_equal(read_trace(path, window_steps=2), trace[0::2] + trace[1::2])


def test_trace_errors(tmp_path: Path) -> None:
    two_d = tmp_path / "load.npy"
    np.save(two_d, np.ones((2, 3)))
    with pytest.raises(
        CliError, match=r"3 dimensions \[windows, layers, experts\] \(got shape \(2, 3\)\); stack"
    ):
        read_trace(two_d)
    neg = tmp_path / "neg.npy"
    np.save(neg, -np.ones((1, 2, 3)))
    with pytest.raises(CliError, match=r"trace\[0\]\[0, 0\]' must be >= 0"):
        read_trace(neg)
    with pytest.raises(CliError, match="no full window of 5"):
        read_trace(neg, window_steps=5)
    with pytest.raises(CliError, match=r"unknown trace format '\.csv'"):
        read_trace(tmp_path / "t.csv")


def test_example_is_calibrated_to_the_measured_skew() -> None:
    ex = load_example()
    assert ex.trace.shape == (8, 58, 256)
    assert (ex.num_ranks, ex.num_physical_experts, ex.num_nodes) == (32, 288, 4)
    # Trivial placement of 256 experts on 32 ranks, as TensorRT-LLM measured it: per-layer
    # imbalance averaged over windows spans the measured range with the measured mean.
    per_layer = trivial_imbalance(ex.trace, 8).mean(axis=0)
    lo, hi = IMBALANCE_RANGE
    assert per_layer.min() == pytest.approx(lo, abs=0.02) and per_layer.max() == pytest.approx(hi, abs=0.02)
    assert per_layer.mean() == pytest.approx(IMBALANCE_MEAN, abs=0.03)
    hottest = ex.trace.max(axis=2) / ex.trace.mean(axis=2)
    assert 10 <= np.median(hottest) <= 14
    # Hot experts persist: the top-8 of a layer mostly stays the top-8 in the next window, except
    # at the traffic change (window 5).
    top = np.argsort(-ex.trace, axis=2)[:, :, :8]
    kept = [
        np.mean([len(set(top[w, layer]) & set(top[w + 1, layer])) / 8 for layer in range(58)])
        for w in range(7)
    ]
    assert min(k for w, k in enumerate(kept) if w != 4) > 0.6
    assert kept[4] < min(k for w, k in enumerate(kept) if w != 4)


def test_example_file_is_what_the_generator_makes() -> None:
    np.testing.assert_array_equal(load_example().trace, generate_trace())
    size = (Path(__file__).parent.parent / "eplb" / "data" / "deepseek_v3_trace.npz").stat().st_size
    assert size < 300_000
