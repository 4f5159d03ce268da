"""Tier 1: CI runs the README's test command, and the README's commands name real things."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).parent.parent


def _bash_blocks() -> list[str]:
    return re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S)


def test_ci_runs_the_readme_test_command() -> None:
    blocks = _bash_blocks()
    assert len(blocks) >= 2, "README opens with an install-and-run command and a test command"
    test_command = blocks[1].strip()
    assert "pytest" in test_command
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert test_command in ci_lines, f".ci/run must run the README's test command verbatim: {test_command}"


def test_readme_main_command_installs_then_runs_eplb() -> None:
    main = _bash_blocks()[0].strip()
    assert "pip install" in main
    assert re.search(r"&& eplb \S+", main), "the first command ends by running eplb"
