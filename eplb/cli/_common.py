"""Helpers shared by the subcommands: errors, checks of options and output paths, atomic writes."""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from eplb.io.errors import InputError
from eplb.ir.errors import PlanError, SerdeError
from eplb.ir.serde import loads

if TYPE_CHECKING:
    from eplb.io.layout import ModelLayout

# Bad command-line input: the message names the problem and the fix (exit status 2). One class
# with the file-format errors of eplb.io, which the CLI reports the same way.
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


def human_bytes(n: float) -> str:
    """``44.1 MB``: decimal units, as bandwidths in GB/s are given."""
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.3g} {unit}" if abs(n) < 100 * size else f"{n / size:.0f} {unit}"
    return f"{n:.0f} B"


def human_seconds(t: float) -> str:
    """``3.21 ms``, ``1.20 s``, ``850 us``."""
    if t >= 1:
        return f"{t:.2f} s"
    if t >= 1e-3:
        return f"{t * 1e3:.3g} ms"
    return f"{t * 1e6:.3g} us"


def _umask() -> int:
    mask = os.umask(0o022)  # read it by setting it; restored at once
    os.umask(mask)
    return mask


def check_not_input(out: str | os.PathLike[str], inputs: dict[str, Any], option: str = "--out") -> None:
    """Refuse an output path that is one of the command's inputs (``{option: path}``): writing it
    would replace the input."""
    target = Path(out)
    for name, path in inputs.items():
        if path is None or not isinstance(path, (str, os.PathLike)) or not os.fspath(path):
            continue
        src = Path(path)
        same = (
            os.path.samefile(src, target)
            if src.exists() and target.exists()
            else src.resolve() == target.resolve()
        )
        if same:
            raise CliError(
                f"{option} {target} is also {name}; writing it would replace that input. Name another file."
            )


def output_format(out: str, fmt: str | None, allowed: tuple[str, ...], option: str = "--format") -> str:
    """The placement format to write: ``fmt`` if given, else the one ``out``'s extension implies;
    an extension that implies another format than ``fmt`` is refused."""
    from eplb.io import format_of

    try:
        implied: str | None = format_of(out)
    except InputError:
        implied = None
    if fmt is None:
        if implied is None or implied not in allowed:
            raise CliError(
                f"--out {out}: cannot tell the format from its extension; pass {option} "
                f"({', '.join(allowed)}) or name it .json, .sglang.json, .yaml, .npy or .pt."
            )
        return implied
    json_formats = ("ir", "sglang")  # both are JSON: a .json name fits either
    fits = implied is None or implied == fmt or (implied in json_formats and fmt in json_formats)
    if not fits:
        raise CliError(
            f"--out {out} names a {implied} file but {option} is {fmt}; make them agree (rename the file "
            f"or change {option})."
        )
    return fmt


def add_layout_options(p: Any, what: str = "files") -> None:
    """``--model`` / ``--moe-layers`` / ``--first-layer``: which model layers are MoE layers."""
    from eplb.io.layout import MODEL_LAYOUTS

    g = p.add_mutually_exclusive_group()
    g.add_argument(
        "--model",
        help=f"model whose layer numbering the {what} use: {', '.join(MODEL_LAYOUTS)}",
    )
    g.add_argument(
        "--moe-layers",
        metavar="FIRST-LAST",
        help="model layer indices of the MoE layers, e.g. 3-60 for a 61-layer model with 3 dense layers",
    )
    g.add_argument(
        "--first-layer",
        type=int,
        default=0,
        help="model layer index of the first MoE layer, the model's layer count unknown (prefer "
        "--model or --moe-layers, which also accept MoE-only files)",
    )


def layout_from_args(args: Any) -> ModelLayout | None:
    from eplb.io import resolve_layout
    from eplb.io.layout import layout_named, parse_moe_layers

    if getattr(args, "model", None):
        return layout_named(args.model)
    if getattr(args, "moe_layers", None):
        return parse_moe_layers(args.moe_layers)
    return resolve_layout(getattr(args, "first_layer", 0) or 0, None)


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
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; a new file gets the umask's mode
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
