"""The library's errors. Every message gives the value, the rule and, where one exists, the fix."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import attrs

__all__ = [
    "EplbError",
    "InvalidValueError",
    "PlanError",
    "SerdeError",
    "Violation",
]


class EplbError(Exception):
    """Base of every error eplb raises on purpose."""


class InvalidValueError(EplbError, ValueError):
    """A value breaks a rule of the IR.

    ``path`` names the bad value relative to the object being built
    (``"dst_rank"``, ``"layers[3].ops[7].dst_rank"``); serde prefixes it with the JSON path.
    """

    def __init__(self, path: str, rule: str) -> None:
        self.path = path
        self.rule = rule
        super().__init__(f"'{path}' {rule}" if path else rule)


@attrs.frozen(kw_only=True)
class Violation:
    """One broken rule found by a whole-plan check: what, where, how to fix."""

    what: str
    fix: str = ""
    layer: int | None = None
    round: int | None = None
    rank: int | None = None
    op: str | None = None

    def __str__(self) -> str:
        where = " ".join(
            f"{k}={v}"
            for k, v in (("layer", self.layer), ("round", self.round), ("rank", self.rank))
            if v is not None
        )
        text = f"[{where}] {self.what}" if where else self.what
        if self.op is not None:
            text += f" (op: {self.op})"
        if self.fix:
            text += f"; fix: {self.fix}"
        return text


class PlanError(EplbError):
    """A plan or schedule breaks one or more rules; lists every violation at once."""

    def __init__(self, summary: str, violations: Iterable[Violation]) -> None:
        self.violations: tuple[Violation, ...] = tuple(violations)
        self.summary = summary
        lines = [f"{summary}: {len(self.violations)} violation(s)"]
        lines += [f"  - {v}" for v in self.violations]
        super().__init__("\n".join(lines))


class SerdeError(EplbError, ValueError):
    """A JSON document could not be read; lists every bad value with its JSON path."""

    def __init__(self, problems: Sequence[tuple[str, str]]) -> None:
        self.problems: tuple[tuple[str, str], ...] = tuple(problems)
        super().__init__("\n".join(f"{path}: {rule}" for path, rule in self.problems))
