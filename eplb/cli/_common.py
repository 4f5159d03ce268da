"""Helpers shared by the subcommands: errors, checks of options and output paths, atomic writes."""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path
from typing import TypeVar

from eplb.formats import InputError
from eplb.ir.errors import PlanError, SerdeError
from eplb.ir.serde import loads

# Bad command-line input: the message names the problem and the fix (exit status 2). One class
# with the file-format errors of eplb.formats, which the CLI reports the same way.
CliError = InputError


def first_problem(exc: SerdeError | PlanError) -> str:
    """One line for a multi-line error: its first problem, and how many more there are."""
    if isinstance(exc, PlanError):
        found = [str(v) for v in exc.violations] or [exc.summary]
    else:
        found = [f"{path}: {rule}" for path, rule in exc.problems] or [str(exc)]
    more = f" (and {len(found) - 1} more)" if len(found) > 1 else ""
    return found[0].rstrip(".?") + more


def require_positive(option: str, value: float | None) -> None:
    """``option`` (e.g. ``"--ranks"``) must be a finite number > 0 when given."""
    if value is not None and not (math.isfinite(value) and value > 0):
        raise CliError(f"{option} must be > 0 (got {value:g}).")


def check_writable(path: str | os.PathLike[str], option: str = "--out") -> Path:
    """Fail before any work if the file ``path`` cannot be written: a folder in its place, a
    missing or read-only folder. Probes with a temporary file that is removed at once."""
    if not os.fspath(path):
        raise CliError(f"{option} is empty; name a file.")
    target = Path(path)
    if target.is_dir():
        raise CliError(f"{option} {target} is a folder; name a file in it, e.g. {target / 'out.json'}.")
    _check_folder(target.parent, target)
    return target


def check_writable_folder(path: str | os.PathLike[str], option: str = "--out") -> Path:
    """Fail before any work if the folder ``path`` can neither be used nor created."""
    if not os.fspath(path):
        raise CliError(f"{option} is empty; name a folder.")
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise CliError(f"{option} {folder} is a file; name a folder (it is created if missing).")
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise CliError(f"{option} {folder}: {existing} is a file, not a folder; name another folder.")
    _check_folder(existing, folder)
    return folder


def _missing_folder(folder: Path, target: Path) -> CliError:
    if folder.exists():
        return CliError(f"cannot write {target}: {folder} is a file, not a folder; name a file in a folder.")
    return CliError(f"cannot write {target}: folder {folder} does not exist; create it first.")


def _check_folder(folder: Path, target: Path) -> None:
    if not folder.is_dir():
        raise _missing_folder(folder, target)
    try:
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".eplb-probe.", suffix=".tmp")
    except OSError as exc:
        raise CliError(
            f"cannot write {target}: folder {folder} is not writable ({exc.strerror}); choose another."
        ) from None
    os.close(fd)
    os.unlink(tmp)


def write_atomic(path: str | os.PathLike[str], data: str | bytes) -> None:
    """Write ``data`` to ``path`` all at once: a failure leaves no partial file behind."""
    target = Path(path)
    if target.is_dir():
        raise CliError(f"cannot write {target}: it is a folder; name a file.")
    folder = target.parent
    if not folder.is_dir():
        raise _missing_folder(folder, target)
    mode = "wb" if isinstance(data, bytes) else "w"
    tmp: str | None = None
    try:
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{target.name}.", suffix=".tmp")
        with os.fdopen(fd, mode) as fh:
            fh.write(data)
        os.replace(tmp, target)
    except OSError as exc:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        raise CliError(f"cannot write {target}: {exc.strerror}; choose a writable file.") from None
    except BaseException:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        raise


T = TypeVar("T")


def read_document(path: str, cls: type[T], what: str, fix: str) -> T:
    """The IR document of type ``cls`` at ``path``; one-line errors naming ``what`` it should be
    and ``fix`` (how to get one)."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise CliError(f"cannot read {path}: no such file.") from None
    except OSError as exc:
        raise CliError(f"cannot read {path}: {exc.strerror}; {fix}.") from None
    try:
        return loads(data, cls)
    except SerdeError as exc:
        raise CliError(f"{path} is not a {what} document: {first_problem(exc)}; {fix}.") from None
