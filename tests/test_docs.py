"""Tier 1 (pure Python): the JSON examples in docs/ parse and still say what the code does."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import eplb.cli
from eplb.ir import Schedule
from eplb.ir.serde import loads

ROOT = Path(__file__).parent.parent
DOCS = ROOT / "docs"
_BLOCK = re.compile(r"```json\n(.*?)```", re.S)


def _examples() -> list[tuple[str, str]]:
    out = []
    for md in sorted(DOCS.glob("*.md")):
        for i, block in enumerate(_BLOCK.findall(md.read_text())):
            if '"schema_version"' in block:
                out.append((f"{md.name}#{i}", block))
    return out


@pytest.mark.parametrize(("name", "text"), _examples(), ids=[n for n, _ in _examples()])
def test_doc_examples_load(name: str, text: str) -> None:
    value = loads(text)
    if isinstance(value, Schedule):
        from eplb.planner.verify import verify

        verify(value)


def test_ir_doc_text_form_matches_example() -> None:
    md = (DOCS / "ir.md").read_text()
    text_block = md.split("```text\nL00", 1)[1].split("```", 1)[0]
    schedule = loads(_BLOCK.findall(md)[0], Schedule)
    lines = ("L00" + text_block).strip().splitlines()
    assert lines == [str(op) for op in schedule.ops()]


def _help_text(argv: list[str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> str:
    monkeypatch.setenv("COLUMNS", "80")  # argparse wraps to the terminal width
    with pytest.raises(SystemExit):
        eplb.cli.main([*argv, "--help"])
    return capsys.readouterr().out.strip()


@pytest.mark.parametrize("command", ["", *eplb.cli.SUBCOMMANDS])
def test_cli_reference_shows_real_help(
    command: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    text = _help_text([command] if command else [], monkeypatch, capsys)
    doc = (DOCS / "cli.md").read_text()
    assert f"## `eplb{' ' + command if command else ''}`" in doc
    assert text in doc, f"docs/cli.md is out of date for `eplb {command} --help`; paste its output"


def test_doc_links_resolve() -> None:
    pages = [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]
    for page in pages:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
            if "://" in target:
                continue
            assert (page.parent / target).exists(), f"{page.name} links to {target}, which does not exist"


def _heading_anchors(page: Path) -> set[str]:
    """GitHub's anchors for a page's headings: lower case, punctuation dropped, spaces to
    hyphens, ``-1``, ``-2`` ... for repeats."""
    out: set[str] = set()
    seen: dict[str, int] = {}
    for line in page.read_text().splitlines():
        m = re.match(r"^#{1,6} (.+)$", line)
        if m:
            slug = re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-")
            n = seen.get(slug, 0)
            seen[slug] = n + 1
            out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def test_doc_anchors_resolve() -> None:
    """Every ``page.md#anchor`` link (and ``#anchor`` within a page) names a heading there."""
    pages = [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]
    for page in pages:
        for target, anchor in re.findall(r"\]\(([^)#\s]*)#([^)\s]+)\)", page.read_text()):
            if "://" in target:
                continue
            linked = page.parent / target if target else page
            assert anchor in _heading_anchors(linked), f"{page.name} links to {target}#{anchor}: no such heading"
