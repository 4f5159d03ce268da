"""Tier 2 (gloo processes on CPU): ``eplb run`` executes a plan on one spawned process per rank and
checks every slot; ``--backend local`` runs it in this process."""

from __future__ import annotations

from pathlib import Path

import pytest

import eplb.cli
from eplb.ir import ModelPlacement, Topology
from eplb.ir.serde import dumps
from eplb.planner.compile import compile_plan
from eplb.planner.schedule import schedule

pytestmark = pytest.mark.multiprocess


@pytest.fixture
def plan_file(tmp_path: Path) -> Path:
    cur = ModelPlacement.trivial(num_layers=2, num_logical_experts=6, num_physical_experts=8, num_ranks=2)
    tgt = ModelPlacement.from_lists([[5, 4, 3, 2, 1, 0, 0, 1], [1, 0, 2, 3, 5, 4, 4, 5]], num_ranks=2)
    path = tmp_path / "plan.json"
    path.write_text(dumps(schedule(compile_plan(cur, tgt, Topology.uniform(2, 4), 4096))))
    return path


@pytest.mark.parametrize("backend", ["cpu_staged", "local"])
def test_run_moves_every_slot_to_its_target(
    plan_file: Path, backend: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert eplb.cli.main(["run", str(plan_file), "--backend", backend, "--timeout", "60"]) == 0
    assert "every slot holds its target expert" in capsys.readouterr().out


def test_progress_lines_count_ranks_started_and_rounds_done(capsys: pytest.CaptureFixture[str]) -> None:
    from eplb.cli._launch import STARTED
    from eplb.cli.run import _Progress

    progress = _Progress(world=2, rounds=5, after_s=0.0, every_s=0.0)
    for rank, message in [(0, STARTED), (1, STARTED), (0, "round 3")]:
        progress(rank, message)
    progress.line(final=True)
    lines = capsys.readouterr().err.splitlines()
    assert [line.split(" (")[0] for line in lines] == [
        "eplb run: 1/2 ranks started, 0/5 rounds done",
        "eplb run: 2/2 ranks started, 0/5 rounds done",
        "eplb run: 2/2 ranks started, 3/5 rounds done",
        "eplb run: 2/2 ranks started, 5/5 rounds done",
    ]


def test_run_reports_progress_from_the_ranks(
    plan_file: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import functools

    import eplb.cli.run as run_mod

    monkeypatch.setattr(run_mod, "_Progress", functools.partial(run_mod._Progress, after_s=0.0, every_s=0.0))
    assert eplb.cli.main(["run", str(plan_file), "--timeout", "60"]) == 0
    err = capsys.readouterr().err
    assert "eplb run: 2/2 ranks started" in err
    assert "rounds done" in err.splitlines()[-1]
