"""Tier 1 (pure Python): the report commands' figures and their ``--json`` forms: ``score``,
``rebalance --current``, ``plan``, ``verify``, ``inspect``, and ``eplb topology``'s file."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from eplb.cli import main
from eplb.io import placement_bytes
from eplb.ir import ModelPlacement, Topology, loads
from eplb.ir.serde import dumps
from eplb.planner.compile import compile_plan
from eplb.planner.metrics import model_balancedness
from eplb.planner.schedule import schedule

SHAPE = ["--ranks", "2", "--slots", "10"]


def _json(argv: list[str], capsys: pytest.CaptureFixture[str], status: int = 0) -> Any:
    assert main(argv) == status
    return json.loads(capsys.readouterr().out)


@pytest.fixture
def load(tmp_path: Path) -> Path:
    rng = np.random.default_rng(3)
    np.save(tmp_path / "load.npy", rng.integers(0, 100, (4, 8)) ** 2)
    return tmp_path / "load.npy"


def test_score_gives_rebalances_figures_for_its_target_and_the_current(
    tmp_path: Path, load: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "t.json"
    reb = _json(
        ["rebalance", "--load", str(load), *SHAPE, "--current", "trivial", "--out", str(out), "--json"], capsys
    )
    trivial = ModelPlacement.trivial(num_layers=4, num_logical_experts=8, num_physical_experts=10, num_ranks=2)
    (tmp_path / "c.npy").write_bytes(placement_bytes(trivial, "npy"))
    doc = _json(
        ["score", "--load", str(load), "--placement", str(out), "--placement", str(tmp_path / "c.npy"),
         "--ranks", "2", "--json"],
        capsys,
    )
    target, current = doc["placements"]
    assert target["balancedness"] == pytest.approx(reb["target"]["balancedness"])
    assert current["balancedness"] == pytest.approx(reb["current"]["balancedness"])
    assert current["balancedness"] == pytest.approx(model_balancedness(np.load(load), trivial))
    assert target["balancedness"] > current["balancedness"]


def test_score_table_names_the_worst_layer_by_model_layer(
    tmp_path: Path, load: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    full = np.zeros((7, 8))
    full[3:] = np.load(load)
    np.save(tmp_path / "full.npy", full)
    trivial = ModelPlacement.trivial(num_layers=4, num_logical_experts=8, num_physical_experts=10, num_ranks=2)
    (tmp_path / "c.json").write_bytes(placement_bytes(trivial, "ir"))
    doc = _json(["score", "--load", str(load), "--placement", str(tmp_path / "c.json"), "--json"], capsys)
    worst = doc["placements"][0]["worst_layer"]
    argv = ["score", "--load", str(tmp_path / "full.npy"), "--placement", str(tmp_path / "c.json")]
    assert main([*argv, "--moe-layers", "3-6"]) == 0
    printed = capsys.readouterr().out
    assert "model layers 0-2 dense (no load), dropped" in printed
    assert f"({worst + 3})" in printed.splitlines()[-1]


def test_topology_file_is_what_plan_reads(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    topo = tmp_path / "topo.json"
    argv = ["topology", "--ranks", "4", "--slots", "8", "--nodes", "2", "--inter-gbps", "20", "--out", str(topo)]
    assert main(argv) == 0
    assert "4 ranks on 2 node(s), 2 slots per rank" in capsys.readouterr().out
    t = loads(topo.read_text(), Topology)
    assert (t.num_ranks, t.slots_per_rank, t.rank_to_node, t.bandwidth.inter_node_gbps) == (4, 2, (0, 0, 1, 1), 20)
    cur = ModelPlacement.trivial(num_layers=1, num_logical_experts=8, num_physical_experts=8, num_ranks=4)
    tgt = ModelPlacement.from_lists([[7, 1, 2, 3, 4, 5, 6, 0]], num_ranks=4)
    (tmp_path / "c.json").write_bytes(placement_bytes(cur, "ir"))
    (tmp_path / "t.json").write_bytes(placement_bytes(tgt, "ir"))
    doc = _json(
        ["plan", "--current", str(tmp_path / "c.json"), "--target", str(tmp_path / "t.json"), "--topology",
         str(topo), "--expert-bytes", "1000", "--out", str(tmp_path / "s.json"), "--json"],
        capsys,
    )
    assert (doc["transfers"], doc["ranks"]) == (2, 4)
    assert set(doc["limits"]) == {"max_peers_per_round", "max_ops_per_group", "staging_bytes_per_rank"}


def _two_layer_schedule(tmp_path: Path) -> Path:
    """Layer 0 swaps between ranks 0 and 1, layer 1 between ranks 2 and 3: one round moves both."""
    cur = ModelPlacement.trivial(num_layers=2, num_logical_experts=4, num_physical_experts=4, num_ranks=4)
    tgt = ModelPlacement.from_lists([[1, 0, 2, 3], [0, 1, 3, 2]], num_ranks=4)
    sched = schedule(compile_plan(cur, tgt, Topology.uniform(4, 1), 44_100_000))
    path = tmp_path / "s.json"
    path.write_text(dumps(sched))
    return path


def test_inspect_json_limits_are_an_object_and_tables_use_units(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _two_layer_schedule(tmp_path)
    doc = _json(["inspect", str(path), "--json"], capsys)
    assert doc["limits"]["max_ops_per_group"] == 256
    assert doc["rounds"] == 1
    assert main(["inspect", str(path)]) == 0
    printed = capsys.readouterr().out
    assert "88.2 MB" in printed  # two experts of 44.1 MB
    assert re.search(r" \d[\d.]* (us|ms|s)$", printed.splitlines()[1])
    assert "layers share rounds: the per-layer times add up to" in printed


def test_verify_json_reports_ok_and_violations(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _two_layer_schedule(tmp_path)
    assert _json(["verify", str(path), "--json"], capsys) == {
        "plan": str(path), "ok": True, "rounds": 1, "transfers": 4, "violations": []
    }
    doc = json.loads(path.read_text())
    doc["rounds"][0]["transfers"] = doc["rounds"][0]["transfers"][:1]  # drop ops: the target is missed
    path.write_text(json.dumps(doc))
    bad = _json(["verify", str(path), "--json"], capsys, status=1)
    assert bad["ok"] is False and bad["violations"]
