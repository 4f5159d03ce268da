"""Helpers shared by the subcommands: errors, atomic writes."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from eplb.ir.errors import EplbError


class CliError(EplbError):
    """Bad command-line input: the message names the problem and the fix (exit status 2)."""


def write_atomic(path: str | os.PathLike[str], data: str | bytes) -> None:
    """Write ``data`` to ``path`` all at once: a failure leaves no partial file behind."""
    target = Path(path)
    if target.parent and not target.parent.exists():
        raise CliError(f"cannot write {target}: folder {target.parent} does not exist; create it first.")
    mode = "wb" if isinstance(data, bytes) else "w"
    fd, tmp = tempfile.mkstemp(dir=target.parent or ".", prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as fh:
            fh.write(data)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
