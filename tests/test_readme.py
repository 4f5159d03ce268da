"""CI runs the README's test command; this file runs its first command as written (in CI)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

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


@pytest.mark.skipif(
    os.environ.get("EPLB_TEST_README_COMMANDS") != "1",
    reason="reinstalls the package with pip; .ci/run sets EPLB_TEST_README_COMMANDS=1",
)
def test_readme_main_command_runs_as_written() -> None:
    torch = pytest.importorskip("torch")
    if not torch.__version__.startswith("2.13.0"):
        pytest.skip(f"the command pins torch 2.13.0 and would replace this environment's {torch.__version__}")
    main = _bash_blocks()[0].strip()
    # `pip` and `eplb` are this interpreter's, as in the activated environment of a new user.
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    out = ROOT / "eplb-demo"
    existed = out.exists()
    try:
        proc = subprocess.run(
            ["bash", "-c", main], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900
        )
        assert proc.returncode == 0, f"`{main}` failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
        assert re.search(r"(\d+)/\1 ranks hold their target experts in every slot", proc.stdout)
        assert (out / "plan.json").is_file()
    finally:
        if not existed:
            shutil.rmtree(out, ignore_errors=True)
