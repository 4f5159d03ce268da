"""Tier 1 (pure Python; .pt cases use torch on CPU): ``eplb rebalance`` and the file readers."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from eplb.cli._common import CliError
from eplb.cli.rebalance import register
from eplb.ir import EplbError, ModelPlacement, loads
from eplb.planner import metrics

README_LOAD = [
    [90, 132, 40, 61, 104, 165, 39, 4, 73, 56, 183, 86],
    [20, 107, 104, 64, 19, 197, 187, 157, 172, 86, 16, 27],
]
README_P2L = [
    [5, 6, 5, 7, 8, 4, 3, 4, 10, 9, 10, 2, 0, 1, 11, 1],
    [7, 10, 6, 8, 6, 11, 8, 9, 2, 4, 5, 1, 5, 0, 3, 1],
]
SHAPE = ["--ranks", "8", "--slots", "16", "--nodes", "2", "--groups", "4"]


def run(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="eplb")
    sub = parser.add_subparsers(dest="command")
    register(sub)
    args = parser.parse_args(["rebalance", *argv])
    return int(args.func(args))


def write_json(path: Path, doc: Any) -> Path:
    path.write_text(json.dumps(doc))
    return path


def test_readme_example_as_ir_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    load = write_json(tmp_path / "load.json", README_LOAD)
    out = tmp_path / "p.json"
    assert run("--load", str(load), *SHAPE, "--policy", "deepseek", "--out", str(out)) == 0
    placement = loads(out.read_text(), ModelPlacement)
    assert placement.to_lists() == README_P2L
    printed = capsys.readouterr().out
    assert "policy              deepseek" in printed and "balancedness" in printed


def test_sglang_format_and_load_object(tmp_path: Path) -> None:
    load = write_json(tmp_path / "load.json", {"load": README_LOAD})
    out = tmp_path / "sglang.json"
    assert (
        run("--load", str(load), *SHAPE, "--policy", "deepseek", "--format", "sglang", "--out", str(out)) == 0
    )
    assert json.loads(out.read_text()) == {"physical_to_logical_map": README_P2L}


def test_npy_and_default_policy(tmp_path: Path) -> None:
    load = tmp_path / "load.npy"
    np.save(load, np.array(README_LOAD, dtype=np.float32))
    out = tmp_path / "p.json"
    assert run("--load", str(load), *SHAPE, "--out", str(out)) == 0
    balanced = loads(out.read_text(), ModelPlacement)
    ds = ModelPlacement.from_lists(README_P2L, num_ranks=8)
    assert (metrics.balancedness(README_LOAD, balanced) >= metrics.balancedness(README_LOAD, ds) - 1e-9).all()


def test_pt_tensor_and_sglang_dump(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    tensor = tmp_path / "load.pt"
    torch.save(torch.tensor(README_LOAD), tensor)
    dump = tmp_path / "dump.pt"
    steps = torch.tensor(README_LOAD).unsqueeze(0).repeat(3, 1, 1)  # [steps, layers, experts]
    torch.save({"rank": 0, "logical_count": steps}, dump)
    for src in (tensor, dump):
        out = tmp_path / f"{src.stem}.json"
        assert run("--load", str(src), *SHAPE, "--policy", "deepseek", "--out", str(out)) == 0
        assert loads(out.read_text(), ModelPlacement).to_lists() == README_P2L


@pytest.mark.parametrize("fmt", ["ir", "sglang"])
def test_current_placement_makes_migration_aware_plan(
    tmp_path: Path, fmt: str, capsys: pytest.CaptureFixture[str]
) -> None:
    load = write_json(tmp_path / "load.json", README_LOAD)
    first = tmp_path / "first.json"
    assert run("--load", str(load), *SHAPE, "--format", fmt, "--out", str(first)) == 0
    second = tmp_path / "second.json"
    capsys.readouterr()
    assert run("--load", str(load), *SHAPE, "--current", str(first), "--out", str(second)) == 0
    printed = capsys.readouterr().out
    assert "policy              migration_aware" in printed
    assert "slots moved         0 (0.0%)" in printed


@pytest.mark.parametrize(
    ("setup", "argv", "match"),
    [
        (None, ["--load", "{d}/missing.json"], r"cannot read .*missing.json: .*check the path"),
        ("bad.json:{", ["--load", "{d}/bad.json"], r"bad.json is not valid JSON"),
        (
            "load.csv:1,2",
            ["--load", "{d}/load.csv"],
            r"unknown load format '.csv'; use one of .json, .npy, .pt",
        ),
        ('obj.json:{"x": 1}', ["--load", "{d}/obj.json"], r"a JSON object needs a 'load' key"),
        ("nan.json:[[1, NaN]]", ["--load", "{d}/nan.json"], r"nan.json: 'load\[0, 1\]' must be finite"),
        ("neg.json:[[1, -1]]", ["--load", "{d}/neg.json"], r"neg.json: 'load\[0, 1\]' must be >= 0"),
        ("flat.json:[1, 2]", ["--load", "{d}/flat.json"], r"must have 2 dimensions"),
    ],
)
def test_bad_load_files(tmp_path: Path, setup: str | None, argv: list[str], match: str) -> None:
    if setup:
        name, text = setup.split(":", 1)
        (tmp_path / name).write_text(text)
    out = tmp_path / "out.json"
    argv = [a.format(d=tmp_path) for a in argv]
    with pytest.raises(CliError, match=match):
        run(*argv, *SHAPE, "--out", str(out))
    assert not out.exists()


def test_bad_npy(tmp_path: Path) -> None:
    bad = tmp_path / "obj.npy"
    np.save(bad, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(CliError, match=r"obj.npy is not a numeric .npy array"):
        run("--load", str(bad), *SHAPE, "--out", str(tmp_path / "o.json"))


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        (
            ["--ranks", "7", "--slots", "16"],
            r"'num_physical_experts' \(16\) must be a multiple of num_ranks \(7\); use 14 or 21",
        ),
        (["--slots", "8", "--ranks", "8"], r"has 12 experts but the topology has only 8 slots"),
        (["--groups", "5"], r"'num_groups' \(5\) must divide num_logical_experts \(12\)"),
        (["--tolerance", "0.1"], r"--tolerance applies to migration_aware, not balanced"),
        (["--global", "--policy", "deepseek"], r"--global does not apply to deepseek"),
    ],
)
def test_bad_arguments(tmp_path: Path, extra: list[str], match: str) -> None:
    load = write_json(tmp_path / "load.json", README_LOAD)
    out = tmp_path / "out.json"
    with pytest.raises(EplbError, match=match):
        run("--load", str(load), *SHAPE, *extra, "--out", str(out))
    assert not out.exists()


def test_bad_current_files(tmp_path: Path) -> None:
    load = write_json(tmp_path / "load.json", README_LOAD)
    out = tmp_path / "out.json"
    wrong = write_json(tmp_path / "wrong.json", {"physical_to_logical_map": [[0, 1, 2]]})
    with pytest.raises(
        CliError,
        match=r"wrong.json: bad physical_to_logical_map: .*has 3 slots, fewer than num_logical_experts \(12\)",
    ):
        run("--load", str(load), *SHAPE, "--current", str(wrong), "--out", str(out))
    other = write_json(tmp_path / "other.json", {"foo": 1})
    with pytest.raises(CliError, match=r"other.json: not a placement; expected eplb IR JSON"):
        run("--load", str(load), *SHAPE, "--current", str(other), "--out", str(out))
    small = ModelPlacement.trivial(num_layers=1, num_logical_experts=12, num_physical_experts=16, num_ranks=8)
    (tmp_path / "layers.json").write_text(json.dumps({"physical_to_logical_map": small.to_lists()}))
    with pytest.raises(EplbError, match=r"'current.num_layers' is 1 but the load has 2"):
        run("--load", str(load), *SHAPE, "--current", str(tmp_path / "layers.json"), "--out", str(out))
    assert not out.exists()


def test_sglang_round_trip_with_dense_layers(tmp_path: Path) -> None:
    # An SGLang dump and map have a row per model layer; here 2 dense layers, then the 2 MoE layers.
    import torch

    steps = np.zeros((3, 4, 12))
    steps[:, 2:] = np.array(README_LOAD) / 3
    dump = tmp_path / "dump.pt"
    torch.save({"logical_count": torch.from_numpy(steps)}, dump)
    first = tmp_path / "first.sglang.json"
    args = ("--load", str(dump), *SHAPE, "--first-layer", "2", "--format", "sglang")
    assert run(*args, "--policy", "deepseek", "--out", str(first)) == 0
    rows = json.loads(first.read_text())["physical_to_logical_map"]
    assert len(rows) == 4 and rows[2:] == README_P2L
    # The map in force goes back in as --current; unchanged load moves nothing.
    again = tmp_path / "again.sglang.json"
    assert run(*args, "--current", str(first), "--out", str(again)) == 0
    assert json.loads(again.read_text()) == json.loads(first.read_text())
