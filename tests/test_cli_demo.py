"""Tier 2 (gloo processes on CPU): ``eplb demo`` runs the whole pipeline on the built-in example,
executing the plan on 32 local processes; bad input fails fast with one line and writes nothing."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

import eplb.cli
from eplb.io import read_any_placement
from eplb.ir import ModelPlacement, Schedule
from eplb.ir.serde import loads
from eplb.planner.verify import verify

pytestmark = pytest.mark.multiprocess


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    out = tmp_path_factory.mktemp("demo") / "eplb-demo"
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert eplb.cli.main(["demo", "--out", str(out), "--json"]) == 0
    return out, json.loads(buf.getvalue())


def test_demo_executes_and_checks_every_rank(demo: tuple[Path, dict[str, Any]]) -> None:
    _, report = demo
    ex = report["execution"]
    assert ex["ranks"] == 32 and ex["ranks_ok"] == 32 and ex["problems"] == []
    assert ex["executor"] == "cpu_staged"
    bal, ma = report["candidates"]
    assert (bal["policy"], ma["policy"]) == ("balanced", "migration_aware")
    # Migration-aware: about the same balance as from scratch for far fewer bytes.
    assert ma["balancedness"] >= bal["balancedness"] - 0.02
    assert ma["bytes_moved"] < 0.5 * bal["bytes_moved"]
    assert report["balancedness"]["in_force"] < ma["balancedness"]
    assert ex["bytes_received"] == ma["transfers"] * ex["expert_bytes"]


def test_demo_writes_files_that_other_commands_read(demo: tuple[Path, dict[str, Any]]) -> None:
    out, report = demo
    assert sorted(p.name for p in out.iterdir()) == report["files"]
    sched = loads((out / "plan.json").read_bytes(), Schedule)
    verify(sched)
    assert sched.plan.expert_bytes == 44_100_000
    assert sched.plan.bytes_moved == report["candidates"][1]["bytes_moved"]
    target = loads((out / "target.json").read_bytes(), ModelPlacement)
    assert sched.plan.target == target
    assert read_any_placement(out / "target.trtllm.yaml", num_ranks=32) == target
    # SGLang has a row per model layer: DeepSeek-V3's 3 dense layers, then the 58 MoE layers.
    sglang = json.loads((out / "target.sglang.json").read_text())["physical_to_logical_map"]
    assert len(sglang) == 61
    assert read_any_placement(out / "target.sglang.json", num_ranks=32, first_layer=3) == target
    assert (out / "target.trtllm.yaml").read_text().splitlines()[1].startswith("  3: [")  # DeepSeek's layer 3


@pytest.mark.parametrize(
    ("case", "match"),
    [
        ("out_is_file", "--out .* is a file; name a folder"),
        ("window", r"--window must be in \[1, 8\) \(got 0\)"),
        ("executor_local", "--executor local runs every rank in one process"),
        ("executor_unknown", "unknown executor 'nccl2'; choose one of"),
        ("bytes", "--exec-expert-bytes must be >= 2"),
    ],
)
def test_bad_input_one_line_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], case: str, match: str
) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("mine")
    out = str(tmp_path / "out")
    argv = {
        "out_is_file": ["demo", "--out", str(blocker)],
        "window": ["demo", "--out", out, "--window", "0"],
        "executor_local": ["demo", "--out", out, "--executor", "local"],
        "executor_unknown": ["demo", "--out", out, "--executor", "nccl2"],
        "bytes": ["demo", "--out", out, "--exec-expert-bytes", "1"],
    }[case]
    assert eplb.cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert re.search(match, err[0]), err[0]
    assert not Path(out).exists()
    assert blocker.read_text() == "mine"
