"""Tier 1 (pure Python): ``eplb simulate`` replays a trace; good and bad input."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

import eplb.cli
from eplb.io import trace_bytes


def _trace(windows: int = 4) -> np.ndarray:
    # 2 layers x 8 experts; expert 0 hot in every window, expert 5 hot from window 2 on.
    t = np.full((windows, 2, 8), 100.0)
    t[:, :, 0] = 900.0
    t[2:, :, 5] = 700.0
    return t


def _file(tmp: Path, trace: np.ndarray, name: str = "trace.npy", fmt: str = "npy") -> str:
    path = tmp / name
    path.write_bytes(trace_bytes(trace, fmt))
    return str(path)


def test_replay_reports_balancedness_and_bytes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _file(tmp_path, _trace())
    argv = [
        "simulate",
        "--load",
        path,
        "--ranks",
        "4",
        "--slots",
        "12",
        "--expert-bytes",
        "1000",
        "--json",
        "--policy",
        "balanced",
        "--policy",
        "migration_aware",
    ]
    assert eplb.cli.main(argv) == 0
    doc = json.loads(capsys.readouterr().out)
    assert list(doc["policies"]) == ["static", "balanced", "migration_aware"]
    static, bal, ma = (doc["policies"][k] for k in ("static", "balanced", "migration_aware"))
    assert len(static["balancedness"]) == 4 and static["rebalances"] == []
    # Window 0 runs on the trivial placement for everyone; later windows are rebalanced.
    assert bal["balancedness"][0] == pytest.approx(static["balancedness"][0])
    assert bal["mean_balancedness"] > static["mean_balancedness"]
    assert [e["after_window"] for e in bal["rebalances"]] == [0, 1, 2]
    for e in ma["rebalances"]:
        assert e["bytes_moved"] == e["slots_moved"] * 1000
    # Window 1 repeats window 0's load: the migration-aware policy keeps its placement.
    assert ma["rebalances"][1]["slots_moved"] == 0


def test_every_n_windows_and_sglang_dump(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # An SGLang dump holds one step per forward pass: 8 steps, 2 per window -> 4 windows.
    steps = np.repeat(_trace(), 2, axis=0) / 2
    path = _file(tmp_path, steps, "dump.pt", "sglang")
    argv = [
        "simulate",
        "--load",
        path,
        "--window-steps",
        "2",
        "--every",
        "2",
        "--ranks",
        "4",
        "--slots",
        "12",
        "--policy",
        "balanced",
        "--json",
    ]
    assert eplb.cli.main(argv) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["windows"] == 4
    assert [e["after_window"] for e in doc["policies"]["balanced"]["rebalances"]] == [1]
    assert eplb.cli.main(argv[:-1]) == 0  # the table form
    out = capsys.readouterr().out
    assert "balancedness (mean / max rank load) per window" in out and "bytes moved per rebalance" in out


def test_plot(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    path = _file(tmp_path, _trace())
    png = tmp_path / "sim.png"
    assert (
        eplb.cli.main(["simulate", "--load", path, "--ranks", "4", "--slots", "12", "--plot", str(png)]) == 0
    )
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    ("case", "match"),
    [
        ("missing", "cannot read .*nope.npy: no such file"),
        ("two_d", r"a trace has 3 dimensions \[windows, layers, experts\]"),
        ("no_ranks", "--load needs --ranks and --slots"),
        ("too_few_slots", r"the trace has 8 experts but --slots is 4; .* use --slots >= 8"),
        ("every", "--every 4 never rebalances before the end: use --every < 4"),
        (
            "slots_multiple",
            r"num_physical_experts' \(10\) must be a multiple of num_ranks \(4\); use 8 or 12",
        ),
        ("plot_suffix", "--plot .*out.jpg: name a .png file"),
        ("repeat", "repeat one; give each policy once"),
    ],
)
def test_bad_input_one_line_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], case: str, match: str
) -> None:
    good = _file(tmp_path, _trace())
    two_d = tmp_path / "load.npy"
    np.save(two_d, np.ones((2, 8)))
    base = ["simulate", "--load", good, "--ranks", "4", "--slots", "12"]
    argv = {
        "missing": ["simulate", "--load", str(tmp_path / "nope.npy"), "--ranks", "4", "--slots", "12"],
        "two_d": ["simulate", "--load", str(two_d), "--ranks", "4", "--slots", "12"],
        "no_ranks": ["simulate", "--load", good],
        "too_few_slots": ["simulate", "--load", good, "--ranks", "4", "--slots", "4"],
        "every": [*base, "--every", "4"],
        "slots_multiple": ["simulate", "--load", good, "--ranks", "4", "--slots", "10"],
        "plot_suffix": [*base, "--plot", str(tmp_path / "out.jpg")],
        "repeat": [*base, "--policy", "balanced", "--policy", "balanced"],
    }[case]
    assert eplb.cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert re.search(match, err[0]), err[0]
    assert not (tmp_path / "out.jpg").exists()


def test_plot_without_matplotlib_fails_before_work(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import builtins

    real_import = builtins.__import__

    def no_matplotlib(name: str, *args: object, **kwargs: object) -> object:
        if name.startswith("matplotlib"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    png = tmp_path / "sim.png"
    argv = [
        "simulate",
        "--load",
        _file(tmp_path, _trace()),
        "--ranks",
        "4",
        "--slots",
        "12",
        "--plot",
        str(png),
    ]
    assert eplb.cli.main(argv) == 2
    assert "--plot needs matplotlib" in capsys.readouterr().err
    assert not png.exists()


def test_plot_gives_each_policy_one_colour_in_both_panels() -> None:
    """``static`` never rebalances, so it has no line below: the colours used to shift there."""
    pytest.importorskip("matplotlib")
    from eplb.cli.simulate import _figure

    moves = [{"after_window": 0, "bytes_moved": 5e9}, {"after_window": 1, "bytes_moved": 1e9}]
    doc = {
        "windows": 3,
        "every": 1,
        "source": "t",
        "policies": {
            "static": {"balancedness": [0.5, 0.5, 0.5], "rebalances": []},
            "balanced": {"balancedness": [0.5, 0.9, 0.9], "rebalances": moves},
            "migration_aware": {"balancedness": [0.5, 0.8, 0.9], "rebalances": moves},
        },
    }
    top, bottom = _figure(doc).axes
    above = {line.get_label(): line.get_color() for line in top.get_lines()}
    below = {line.get_label(): line.get_color() for line in bottom.get_lines()}
    assert set(below) == {"balanced", "migration_aware"}
    assert all(below[name] == above[name] for name in below)
    assert len(set(above.values())) == 3
