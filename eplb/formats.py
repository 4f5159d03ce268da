"""Files the CLI reads and writes: expert load, and placements in eplb's IR JSON or SGLang's form.

Load: ``.json`` (``[[...], ...]`` or ``{"load": [[...], ...]}``), ``.npy``, or ``.pt`` (a tensor,
or an SGLang expert-distribution dump ``{"logical_count": [steps, layers, experts], ...}``, summed
over steps). Placements: IR JSON (`eplb.ir.serde`) or SGLang's ``{"physical_to_logical_map":
[[...], ...]}``, the file ``--init-expert-location`` reads. Every problem raises `InputError` with
one line naming the file, the problem and the fix.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from eplb.ir.errors import EplbError
from eplb.ir.placement import ModelPlacement
from eplb.ir.serde import loads
from eplb.planner.load import as_load_matrix

if TYPE_CHECKING:
    from eplb.io.layout import ModelLayout, RowMap

__all__ = [
    "LOAD_SUFFIXES",
    "InputError",
    "check_numeric",
    "np_load",
    "read_json",
    "read_load",
    "read_load_rows",
    "read_placement",
    "resolve_layout",
    "torch_load",
]


class InputError(EplbError, ValueError):
    """A file or option a user gave cannot be used: the message names the problem and the fix
    (the CLI prints it as one line and exits with status 2)."""


LOAD_SUFFIXES = (".json", ".npy", ".pt")


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except OSError as exc:
        raise InputError(f"cannot read {path}: {exc.strerror}; check the path.") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"{path} is not valid JSON ({exc}); write it with json.dump.") from None


def torch_load(path: Path) -> Any:
    import torch  # only .pt files need torch

    try:
        with warnings.catch_warnings():  # e.g. the pickle-protocol warning of a non-torch pickle
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise InputError(f"cannot read {path}: no such file; check the path.") from None
    except OSError as exc:
        if not exc.strerror:  # torch's own "not a zip file" errors carry no errno
            raise InputError(f"{path} is not a torch file ({exc}); save it with torch.save.") from None
        raise InputError(f"cannot read {path}: {exc.strerror}; check the path.") from None
    except Exception as exc:  # torch raises many kinds (pickle, zip, unsupported global)
        raise InputError(
            f"{path} is not a torch file eplb can load safely (torch.load with weights_only=True: "
            f"{_torch_reason(exc)}); save a plain tensor or dict of tensors with torch.save."
        ) from None


def _torch_reason(exc: Exception) -> str:
    """The useful part of a torch.load error: the unpickler's own reason, else the first line."""
    text = str(exc)
    if "WeightsUnpickler error:" in text:
        after = text.split("WeightsUnpickler error:", 1)[1]
        reason = next((line.strip() for line in after.splitlines() if line.strip()), "")
        return reason.split(". ")[0].rstrip(".") or type(exc).__name__
    first = text.splitlines()[0] if text else ""
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def np_load(path: Path) -> Any:
    """``numpy.load`` of a ``.npy`` / ``.npz`` without pickles; every failure is a `InputError`."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(6)
    except FileNotFoundError:
        raise InputError(f"cannot read {path}: no such file; check the path.") from None
    except OSError as exc:
        raise InputError(f"cannot read {path}: {exc.strerror}; check the path.") from None
    if head != b"\x93NUMPY" and head[:4] != b"PK\x03\x04":
        what = "empty" if not head else "not a numpy file (no .npy or .npz header)"
        raise InputError(f"{path} is {what}; save it with numpy.save.")
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        raise InputError(f"{path} is not a numeric .npy array ({exc}); save it with numpy.save.") from None


def check_numeric(data: Any, path: Path) -> None:
    """Refuse arrays and tensors of booleans, complex numbers or other non-numbers as load."""
    dtype = getattr(data, "dtype", None)
    if dtype is None:
        return
    name = str(dtype).removeprefix("torch.")
    numeric = (
        dtype.kind in "iuf"
        if isinstance(dtype, np.dtype)
        else not (name == "bool" or name.startswith("complex"))
    )
    if not numeric:
        raise InputError(f"{path}: the load holds {name} values; save token counts as integers or floats.")


def read_load(
    path: str | Path, *, first_layer: int = 0, layout: ModelLayout | None = None
) -> npt.NDArray[np.float64]:
    """``[num_moe_layers, num_logical_experts]`` float64 from a ``.json``, ``.npy`` or ``.pt`` file.

    ``layout`` (or ``first_layer``, a layout whose layer count is unknown): the model layers that
    are MoE layers; a file with a row per model layer (SGLang's dumps: 61 for DeepSeek-V3) loses
    its dense rows, which must hold no load. See `read_load_rows`.
    """
    return read_load_rows(path, first_layer=first_layer, layout=layout)[0]


def read_load_rows(
    path: str | Path, *, first_layer: int = 0, layout: ModelLayout | None = None
) -> tuple[npt.NDArray[np.float64], RowMap]:
    """`read_load` and how the file's rows mapped to MoE layers (``RowMap.note`` for the report)."""
    from eplb.io.layout import load_rows

    p = Path(path)
    layout = resolve_layout(first_layer, layout)
    load = _read_load_matrix(p)
    rows = load_rows(layout, load, str(p))
    if layout is not None:
        layout.check_experts(load.shape[1], str(p))
    return load[rows.start : rows.start + rows.count], rows


def resolve_layout(first_layer: int, layout: ModelLayout | None) -> ModelLayout | None:
    """The layout a ``first_layer`` (legacy: MoE layers from there, layer count unknown) means."""
    from eplb.io.layout import ModelLayout

    if first_layer < 0:
        raise InputError(f"--first-layer must be >= 0 (got {first_layer}).")
    if layout is not None:
        if first_layer and first_layer != layout.first_moe:
            raise InputError(
                f"first_layer {first_layer} contradicts {layout}; give one of them."
            )
        return layout
    if not first_layer:
        return None
    return ModelLayout(name=f"--first-layer {first_layer}", first_moe=first_layer)


def _read_load_matrix(p: Path) -> npt.NDArray[np.float64]:
    suffix = p.suffix.lower()
    if suffix not in LOAD_SUFFIXES:
        raise InputError(
            f"{p}: unknown load format {suffix or '(none)'!r}; use one of {', '.join(LOAD_SUFFIXES)}."
        )
    data: Any
    if suffix == ".json":
        data = read_json(p)
        if isinstance(data, dict):
            if "load" not in data:
                raise InputError(
                    f"{p}: a JSON object needs a 'load' key (found {sorted(data)[:5]}); "
                    'write {"load": [[...], ...]}.'
                )
            data = data["load"]
    elif suffix == ".npy":
        data = np_load(p)
        if not isinstance(data, np.ndarray):
            data.close()
            raise InputError(f"{p} is an .npz archive, not an .npy array; save the load with numpy.save.")
    else:
        data = torch_load(p)
        if isinstance(data, dict):
            if "logical_count" in data:
                data = data["logical_count"]
                if getattr(data, "ndim", 0) == 3:  # SGLang records [steps, layers, experts]
                    data = data.sum(0)
            elif "load" in data:
                data = data["load"]
            else:
                raise InputError(
                    f"{p}: a dict needs 'logical_count' (SGLang dump) or 'load' (found "
                    f"{sorted(map(str, data))[:5]}); save the load tensor itself."
                )
    check_numeric(data, p)
    try:
        return as_load_matrix(data)
    except EplbError as exc:
        raise InputError(f"{p}: {exc}") from None


def read_placement(path: str | Path, *, num_ranks: int, num_logical_experts: int) -> ModelPlacement:
    """A `ModelPlacement` from IR JSON or SGLang's ``{"physical_to_logical_map": ...}`` (``.json``
    or ``.pt``)."""
    p = Path(path)
    if p.suffix.lower() == ".pt":
        doc: Any = torch_load(p)
    else:
        doc = read_json(p)
    if isinstance(doc, dict) and "physical_to_logical_map" in doc:
        rows = doc["physical_to_logical_map"]
        if hasattr(rows, "tolist"):
            rows = rows.tolist()
        if not isinstance(rows, list) or not all(isinstance(row, list) for row in rows):
            raise InputError(
                f"{p}: physical_to_logical_map must be [layers][slots] expert ids, a list of lists "
                f"(got {type(rows).__name__} {str(rows)[:40]}); write one list of expert ids per layer."
            )
        ragged = next((i for i, row in enumerate(rows) if len(row) != len(rows[0])), None)
        if ragged is not None:
            raise InputError(
                f"{p}: physical_to_logical_map layer {ragged} lists {len(rows[ragged])} slots but layer 0 "
                f"lists {len(rows[0])}; every layer needs one expert per slot."
            )
        try:
            return ModelPlacement.from_lists(
                rows, num_ranks=num_ranks, num_logical_experts=num_logical_experts
            )
        except (EplbError, TypeError) as exc:
            raise InputError(f"{p}: bad physical_to_logical_map: {exc}") from None
    if isinstance(doc, dict) and doc.get("type") == "model_placement":
        try:
            return loads(json.dumps(doc), ModelPlacement)
        except EplbError as exc:
            raise InputError(f"{p}: {str(exc).splitlines()[0]}") from None
    raise InputError(
        f'{p}: not a placement; expected eplb IR JSON ("type": "model_placement") or SGLang\'s '
        '{"physical_to_logical_map": [[...], ...]}.'
    )
