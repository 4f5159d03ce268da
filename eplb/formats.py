"""Files the CLI reads and writes: expert load, and placements in eplb's IR JSON or SGLang's form.

Load: ``.json`` (``[[...], ...]`` or ``{"load": [[...], ...]}``), ``.npy``, or ``.pt`` (a tensor,
or an SGLang expert-distribution dump ``{"logical_count": [steps, layers, experts], ...}``, summed
over steps). Placements: IR JSON (`eplb.ir.serde`) or SGLang's ``{"physical_to_logical_map":
[[...], ...]}``, the file ``--init-expert-location`` reads. Every problem raises `CliError` with
one line naming the file, the problem and the fix.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from eplb.cli._common import CliError
from eplb.ir.errors import EplbError
from eplb.ir.placement import ModelPlacement
from eplb.ir.serde import dumps, loads
from eplb.planner.load import as_load_matrix

__all__ = ["LOAD_SUFFIXES", "dump_placement", "read_json", "read_load", "read_placement", "torch_load"]

LOAD_SUFFIXES = (".json", ".npy", ".pt")


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except OSError as exc:
        raise CliError(f"cannot read {path}: {exc.strerror}; check the path.") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CliError(f"{path} is not valid JSON ({exc}); write it with json.dump.") from None


def torch_load(path: Path) -> Any:
    import torch  # only .pt files need torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CliError(f"cannot read {path}: no such file; check the path.") from None
    except Exception as exc:  # torch raises many kinds (pickle, zip, unsupported global)
        raise CliError(
            f"{path} is not a torch file loadable with weights_only=True ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}); save a plain tensor or dict of tensors."
        ) from None


def read_load(path: str | Path) -> npt.NDArray[np.float64]:
    """``[num_layers, num_logical_experts]`` float64 from a ``.json``, ``.npy`` or ``.pt`` file."""
    p = Path(path)
    suffix = p.suffix.lower()
    if suffix not in LOAD_SUFFIXES:
        raise CliError(
            f"{p}: unknown load format {suffix or '(none)'!r}; use one of {', '.join(LOAD_SUFFIXES)}."
        )
    data: Any
    if suffix == ".json":
        data = read_json(p)
        if isinstance(data, dict):
            if "load" not in data:
                raise CliError(
                    f"{p}: a JSON object needs a 'load' key (found {sorted(data)[:5]}); "
                    'write {"load": [[...], ...]}.'
                )
            data = data["load"]
    elif suffix == ".npy":
        try:
            data = np.load(p, allow_pickle=False)
        except FileNotFoundError:
            raise CliError(f"cannot read {p}: no such file; check the path.") from None
        except (OSError, ValueError) as exc:
            raise CliError(f"{p} is not a numeric .npy array ({exc}); save it with numpy.save.") from None
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
                raise CliError(
                    f"{p}: a dict needs 'logical_count' (SGLang dump) or 'load' (found "
                    f"{sorted(map(str, data))[:5]}); save the load tensor itself."
                )
    try:
        return as_load_matrix(data)
    except EplbError as exc:
        raise CliError(f"{p}: {exc}") from None


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
        try:
            return ModelPlacement.from_lists(
                rows, num_ranks=num_ranks, num_logical_experts=num_logical_experts
            )
        except (EplbError, TypeError) as exc:
            raise CliError(f"{p}: bad physical_to_logical_map: {exc}") from None
    if isinstance(doc, dict) and doc.get("type") == "model_placement":
        try:
            return loads(json.dumps(doc), ModelPlacement)
        except EplbError as exc:
            raise CliError(f"{p}: {str(exc).splitlines()[0]}") from None
    raise CliError(
        f'{p}: not a placement; expected eplb IR JSON ("type": "model_placement") or SGLang\'s '
        '{"physical_to_logical_map": [[...], ...]}.'
    )


def dump_placement(placement: ModelPlacement, fmt: str = "ir") -> str:
    """The text of a placement file: ``ir`` (eplb IR JSON) or ``sglang``."""
    if fmt == "ir":
        return dumps(placement)
    if fmt == "sglang":
        return json.dumps({"physical_to_logical_map": placement.to_lists()}) + "\n"
    raise CliError(f"unknown placement format {fmt!r}; use 'ir' or 'sglang'.")
