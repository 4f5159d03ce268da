"""Tier 1 (pure Python): ``eplb diff`` on placements and schedules, good and bad input."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

import eplb.cli
from eplb.io import placement_bytes
from eplb.ir import ModelPlacement, Topology
from eplb.ir.serde import dumps
from eplb.planner.compile import compile_plan
from eplb.planner.schedule import schedule

CUR = ModelPlacement.from_lists([[0, 1, 2, 3, 0, 1], [0, 1, 2, 3, 2, 3]], num_ranks=2)
# Layer 0: slots 0 and 3 trade experts 0 and 3; rank 0 must receive expert 3, rank 1 copies its
# other replica of expert 0 locally. Layer 1 is unchanged.
TGT = ModelPlacement.from_lists([[3, 1, 2, 0, 0, 1], [0, 1, 2, 3, 2, 3]], num_ranks=2)


def _write(tmp: Path, name: str, data: bytes | str) -> str:
    path = tmp / name
    path.write_bytes(data if isinstance(data, bytes) else data.encode())
    return str(path)


def test_placement_diff_per_layer_and_rank(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a = _write(tmp_path, "a.json", placement_bytes(CUR, "ir"))
    b = _write(tmp_path, "b.yaml", placement_bytes(TGT, "trtllm"))  # the ranks come from A
    assert eplb.cli.main(["diff", a, b, "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["slots_changed"] == 2 and doc["slots_to_receive"] == 1 and doc["layers_changed"] == 1
    assert doc["layers"][0] == {
        "layer": 0,
        "slots_changed": 2,
        "slots_to_receive": 1,
        "replica_counts_changed": 0,
    }
    assert doc["layers"][1]["slots_changed"] == 0
    assert [r["experts_gained"] for r in doc["ranks"]] == [1, 0]
    assert [r["experts_dropped"] for r in doc["ranks"]] == [1, 1]  # rank 0 drops 0, rank 1 drops 3
    assert [r["slots_to_receive"] for r in doc["ranks"]] == [1, 0]
    assert eplb.cli.main(["diff", a, b]) == 0
    text = capsys.readouterr().out
    assert "2 slots changed in 1 layers" in text and "1 of 2 layers differ" in text


def test_exit_code_flag(tmp_path: Path) -> None:
    a = _write(tmp_path, "a.json", placement_bytes(CUR, "ir"))
    b = _write(tmp_path, "b.json", placement_bytes(TGT, "ir"))
    assert eplb.cli.main(["diff", a, a, "--exit-code"]) == 0
    assert eplb.cli.main(["diff", a, b, "--exit-code"]) == 1


def test_schedule_diff(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    topo = Topology.uniform(2, 3)
    other = ModelPlacement.from_lists([[3, 1, 2, 0, 2, 1], [1, 0, 2, 3, 2, 3]], num_ranks=2)
    s1 = schedule(compile_plan(CUR, TGT, topo, 1000))
    s2 = schedule(compile_plan(CUR, other, topo, 1000))
    a = _write(tmp_path, "a.json", dumps(s1))
    b = _write(tmp_path, "b.json", dumps(s2))
    assert eplb.cli.main(["diff", a, b, "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["same_current"] and not doc["same_target"]
    assert doc["totals"]["transfers"] == [s1.plan.transfers, s2.plan.transfers]
    assert doc["totals"]["rounds"] == [s1.num_rounds, s2.num_rounds]
    assert sum(r["bytes_received"][0] for r in doc["ranks"]) == s1.plan.bytes_moved
    assert eplb.cli.main(["diff", a, b]) == 0
    assert "current placement: same; target placement: DIFFERENT" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("setup", "match"),
    [
        ("missing", "cannot read .*missing.json: no such file; check the path"),
        ("notjson", "is not valid JSON"),
        ("mixed", "is a placement and .* a schedule; diff two placements or two plans"),
        ("shape", "placements differ in num_physical_experts: A has 6, B has 8"),
        ("noranks", "does not record the rank count; pass --ranks"),
        ("corrupt", "is not a valid schedule document: .*dst_rank"),
        ("cluster", "the plans are for different clusters"),
    ],
)
def test_bad_input_one_line_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], setup: str, match: str
) -> None:
    a = _write(tmp_path, "a.json", placement_bytes(CUR, "ir"))
    topo = Topology.uniform(2, 3)
    sched = schedule(compile_plan(CUR, TGT, topo, 1000))
    make = {
        "missing": lambda: str(tmp_path / "missing.json"),
        "notjson": lambda: _write(tmp_path, "b.json", "{nope"),
        "mixed": lambda: _write(tmp_path, "b.json", dumps(sched)),
        "shape": lambda: _write(
            tmp_path,
            "b.json",
            placement_bytes(
                ModelPlacement.trivial(
                    num_layers=2, num_logical_experts=4, num_physical_experts=8, num_ranks=2
                ),
                "ir",
            ),
        ),
        "noranks": lambda: _write(tmp_path, "b.sglang.json", placement_bytes(TGT, "sglang")),
        "corrupt": lambda: _write(
            tmp_path, "b.json", dumps(sched).replace('"dst_rank": 0', '"dst_rank": 7', 1)
        ),
        "cluster": lambda: _write(
            tmp_path, "b.json", dumps(schedule(compile_plan(CUR, TGT, Topology.uniform(2, 3, 2), 1000)))
        ),
    }
    b = make[setup]()
    if setup == "noranks":
        a = b  # both files lack the rank count
    if setup in ("corrupt", "cluster"):
        a = _write(tmp_path, "a.json", dumps(sched))
    assert eplb.cli.main(["diff", a, b]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("eplb diff: error: ")
    assert re.search(match, err[0]), err[0]
