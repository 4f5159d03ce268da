"""Tier 1 (pure Python; .pt cases use torch on CPU): model layouts map eplb's MoE-only rows to each
engine's model-layer numbering and back, and the CLI never replaces an input or hides a file."""

from __future__ import annotations

import json
import os
import re
import stat
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from eplb.cli import main
from eplb.io import (
    PLACEMENT_FORMATS,
    InputError,
    format_of,
    placement_bytes,
    read_any_placement,
    read_load,
    read_load_file,
)
from eplb.io.layout import MODEL_LAYOUTS, ModelLayout, layout_named, parse_moe_layers
from eplb.ir import ModelPlacement
from tests.strategies import model_placements

SUFFIX = {"ir": ".json", "sglang": ".sglang.json", "trtllm": ".yaml", "npy": ".npy", "pt": ".pt"}
MOE, DENSE, EXPERTS = 4, 3, 8  # a small DeepSeek-shaped model: 7 layers, MoE layers 3-6
SHAPE = ["--ranks", "2", "--slots", "10"]


def _moe_load() -> np.ndarray:
    return np.random.default_rng(0).integers(1, 100, (MOE, EXPERTS)).astype(np.int64)


def _model_load() -> np.ndarray:
    full = np.zeros((DENSE + MOE, EXPERTS), dtype=np.int64)
    full[DENSE:] = _moe_load()
    return full


@given(
    placement=model_placements(),
    first_moe=st.integers(0, 4),
    fmt=st.sampled_from(PLACEMENT_FORMATS),
    known_count=st.booleans(),
)
def test_every_format_round_trips_under_a_layout(
    tmp_path_factory: pytest.TempPathFactory,
    placement: ModelPlacement,
    first_moe: int,
    fmt: str,
    known_count: bool,
) -> None:
    total = first_moe + placement.num_layers if known_count else None
    layout = ModelLayout(name="m", first_moe=first_moe, num_layers=total)
    path = tmp_path_factory.mktemp("rt") / f"p{SUFFIX[fmt]}"
    path.write_bytes(placement_bytes(placement, fmt, layout=layout))
    back = read_any_placement(
        path,
        num_ranks=placement.num_ranks,
        num_logical_experts=placement.num_logical_experts,
        layout=layout,
    )
    assert back == placement


@pytest.mark.parametrize("fmt", ["sglang", "pt"])
def test_sglang_maps_have_a_row_per_model_layer(tmp_path: Path, fmt: str) -> None:
    """pt used to drop first_layer: 58 rows, read by SGLang three layers late."""
    import torch

    placement = ModelPlacement.trivial(
        num_layers=MOE, num_logical_experts=EXPERTS, num_physical_experts=10, num_ranks=2
    )
    data = placement_bytes(placement, fmt, layout=parse_moe_layers("3-6"))
    path = tmp_path / f"p{SUFFIX[fmt]}"
    path.write_bytes(data)
    if fmt == "pt":
        rows = torch.load(path, weights_only=True)["physical_to_logical_map"].tolist()
    else:
        rows = json.loads(data)["physical_to_logical_map"]
    assert len(rows) == DENSE + MOE
    assert rows[:DENSE] == [[p % EXPERTS for p in range(10)]] * DENSE
    assert rows[DENSE:] == placement.to_lists()


def test_trtllm_keys_are_the_moe_model_layers() -> None:
    placement = ModelPlacement.trivial(
        num_layers=MOE, num_logical_experts=EXPERTS, num_physical_experts=10, num_ranks=2
    )
    text = placement_bytes(placement, "trtllm", layout=parse_moe_layers("3-6"), layer_updates_per_iter=2)
    keys = [line.split(":")[0].strip() for line in text.decode().splitlines() if line.startswith("  ")]
    assert keys == ["3", "4", "5", "6"]
    assert b"layer_updates_per_iter: 2\n" in text


def test_a_placement_of_other_layers_than_the_layout_is_refused() -> None:
    placement = ModelPlacement.trivial(num_layers=3, num_logical_experts=8, num_physical_experts=10, num_ranks=2)
    with pytest.raises(InputError, match=r"has 3 MoE layer rows but --moe-layers 3-6 \(7 model layers"):
        placement_bytes(placement, "sglang", layout=parse_moe_layers("3-6"))


def test_a_58_and_a_61_row_load_read_the_same(tmp_path: Path) -> None:
    np.save(tmp_path / "moe.npy", _moe_load())
    np.save(tmp_path / "model.npy", _model_load())
    layout = parse_moe_layers("3-6")
    moe = read_load_file(tmp_path / "moe.npy", layout=layout)
    full = read_load_file(tmp_path / "model.npy", layout=layout)
    np.testing.assert_array_equal(moe.load, full.load)
    assert moe.notes == ()
    assert full.notes == ("model layers 0-2 dense (no load), dropped",)


def test_rows_that_fit_no_layout_count_are_refused(tmp_path: Path) -> None:
    np.save(tmp_path / "l.npy", np.ones((5, EXPERTS)))
    with pytest.raises(InputError, match=r"has 5 layer rows, but --moe-layers 3-6 .* needs 7 .* or 4"):
        read_load(tmp_path / "l.npy", layout=parse_moe_layers("3-6"))


def test_a_moe_only_load_with_first_layer_names_the_moe_layers_to_pass(tmp_path: Path) -> None:
    """--first-layer 3 used to drop three real MoE rows of a MoE-only load."""
    np.save(tmp_path / "l.npy", _moe_load())
    with pytest.raises(InputError, match=r"rows \[0, 1, 2\] hold load.*pass --moe-layers 3-6\."):
        read_load(tmp_path / "l.npy", first_layer=3)


def test_dense_rows_with_load_under_a_known_model_are_refused(tmp_path: Path) -> None:
    load = _model_load()
    load[1, 0] = 5
    np.save(tmp_path / "l.npy", load)
    with pytest.raises(InputError, match=r"rows \[1\] hold load, but --moe-layers 3-6"):
        read_load(tmp_path / "l.npy", layout=parse_moe_layers("3-6"))


def test_known_models_and_bad_names() -> None:
    assert layout_named("DeepSeek-V3") == MODEL_LAYOUTS["deepseek-v3"]
    assert MODEL_LAYOUTS["deepseek-v3"].moe_range() == "3-60"
    with pytest.raises(InputError, match=r"unknown model 'llama'; known: deepseek-v3"):
        layout_named("llama")
    with pytest.raises(InputError, match=r"--moe-layers '3:60' is not FIRST-LAST"):
        parse_moe_layers("3:60")
    with pytest.raises(InputError, match=r"the last layer \(2\) is before the first \(3\)"):
        parse_moe_layers("3-2")


def test_the_expert_count_of_a_known_model_is_checked(tmp_path: Path) -> None:
    np.save(tmp_path / "l.npy", np.ones((58, 12)))
    with pytest.raises(InputError, match=r"has 12 logical experts per layer but deepseek-v3 has 256"):
        read_load(tmp_path / "l.npy", layout=layout_named("deepseek-v3"))


# --- the command line ---------------------------------------------------------------------------
@pytest.fixture
def loads_dir(tmp_path: Path) -> Path:
    np.save(tmp_path / "moe.npy", _moe_load())
    np.save(tmp_path / "model.npy", _model_load())
    return tmp_path


@pytest.mark.parametrize("fmt", ["sglang", "pt", "trtllm"])
def test_cli_58_and_61_row_loads_give_the_same_engine_file(loads_dir: Path, fmt: str) -> None:
    outs = []
    for name in ("moe", "model"):
        out = loads_dir / f"{name}{SUFFIX[fmt]}"
        argv = ["rebalance", "--load", str(loads_dir / f"{name}.npy"), *SHAPE, "--moe-layers", "3-6"]
        assert main([*argv, "--out", str(out)]) == 0
        outs.append(read_any_placement(out, num_ranks=2, layout=parse_moe_layers("3-")))
    assert outs[0] == outs[1]
    if fmt != "pt":  # torch's zip records differ in nothing but are not promised byte-equal
        assert (loads_dir / f"moe{SUFFIX[fmt]}").read_bytes() == (loads_dir / f"model{SUFFIX[fmt]}").read_bytes()


def test_cli_pt_output_with_first_layer_keeps_the_dense_rows(loads_dir: Path) -> None:
    """``--format pt --first-layer 3`` used to write the MoE rows only: SGLang read model layer L
    from row L, three layers late."""
    import torch

    out = loads_dir / "t.pt"
    argv = ["rebalance", "--load", str(loads_dir / "model.npy"), *SHAPE, "--first-layer", "3"]
    assert main([*argv, "--format", "pt", "--out", str(out)]) == 0
    table = torch.load(out, weights_only=True)["physical_to_logical_map"]
    assert tuple(table.shape) == (DENSE + MOE, 10)
    assert read_any_placement(out, num_ranks=2, first_layer=3).num_layers == MOE


def test_cli_plan_and_diff_compare_a_model_row_map_with_moe_rows(loads_dir: Path) -> None:
    d = loads_dir
    base = ["rebalance", "--load", str(d / "model.npy"), *SHAPE, "--moe-layers", "3-6"]
    assert main([*base, "--out", str(d / "t.sglang.json")]) == 0
    assert main([*base, "--out", str(d / "t.json")]) == 0
    assert main(["diff", str(d / "t.sglang.json"), str(d / "t.json"), "--moe-layers", "3-6", "--exit-code"]) == 0
    plan = ["plan", "--current", str(d / "t.sglang.json"), "--target", str(d / "t.json")]
    assert main([*plan, "--moe-layers", "3-6", "--expert-bytes", "8", "--out", str(d / "p.json")]) == 0
    assert main([*plan, "--expert-bytes", "8", "--out", str(d / "q.json")]) == 2
    assert not (d / "q.json").exists()


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (["rebalance", "--load", "{d}/moe.npy", *SHAPE, "--out", "{d}/moe.npy"], r"--out .*moe.npy is also --load"),
        (
            ["rebalance", "--load", "{d}/moe.npy", *SHAPE, "--current", "{d}/cur.json", "--out", "{d}/cur.json"],
            r"is also --current",
        ),
        (
            ["plan", "--current", "{d}/cur.json", "--target", "{d}/cur.json", "--expert-bytes", "8", "--out",
             "{d}/cur.json"],
            r"is also --current",
        ),
        (["rebalance", "--load", "{d}/moe.npy", *SHAPE, "--format", "ir", "--out", "{d}/o.npy"],
         r"names a npy file but --format is ir"),
        (["rebalance", "--load", "{d}/moe.npy", *SHAPE, "--out", "{d}/o.txt"], r"cannot tell the format"),
        (["rebalance", "--load", "{d}/moe.npy", *SHAPE, "--out", "{d}/o.json", "--layer-updates-per-iter", "1"],
         r"--layer-updates-per-iter is written to TensorRT-LLM's YAML only"),
        (["plan", "--current", "{d}/cur.json", "--target", "{d}/cur.json", "--expert-bytes", "8", "--out",
          "{d}/o.npy"], r"a schedule is eplb IR JSON"),
    ],
)
def test_cli_refuses_and_leaves_every_file_as_it_was(
    loads_dir: Path, argv: list[str], match: str, capsys: pytest.CaptureFixture[str]
) -> None:
    d = loads_dir
    cur = ModelPlacement.trivial(num_layers=MOE, num_logical_experts=EXPERTS, num_physical_experts=10, num_ranks=2)
    (d / "cur.json").write_bytes(placement_bytes(cur, "ir"))
    before = {p.name: p.read_bytes() for p in d.iterdir()}
    assert main([a.format(d=d) for a in argv]) == 2
    assert {p.name: p.read_bytes() for p in d.iterdir()} == before
    assert re.search(match, capsys.readouterr().err)


@pytest.fixture
def umask() -> Iterator[None]:
    old = os.umask(0o022)
    yield
    os.umask(old)


@pytest.mark.parametrize(("mask", "mode"), [(0o022, 0o644), (0o027, 0o640), (0o002, 0o664)])
def test_cli_files_get_the_umask_mode(loads_dir: Path, umask: None, mask: int, mode: int) -> None:
    """mkstemp's 0600 used to stay: an engine running as another user could not read the file."""
    os.umask(mask)
    out = loads_dir / "t.sglang.json"
    assert main(["rebalance", "--load", str(loads_dir / "moe.npy"), *SHAPE, "--out", str(out)]) == 0
    assert stat.S_IMODE(out.stat().st_mode) == mode


def test_format_of_names() -> None:
    assert [format_of(f"x{s}") for s in SUFFIX.values()] == list(SUFFIX)
