"""Recorded expert load ``[num_moe_layers, num_logical_experts]`` from every format that holds it.

- ``.json``: ``[[...], ...]`` or ``{"load": [[...], ...]}``; ``.npy``: the array;
- ``.pt``: a tensor, ``{"load": tensor}``, or an SGLang expert-distribution dump (``stat`` or
  ``per_pass``, `eplb.io.sglang`), summed over steps;
- a folder: TensorRT-LLM's ExpertStatistic dump (`eplb.io.trtllm`), summed over iterations and
  ranks, or SGLang's recorder folder of ``.pt`` dumps (``per_pass``: one file per rank).

A `ModelLayout` maps files with a row per model layer (SGLang's) to MoE rows; their dense rows must
hold no load. `LoadFile.notes` says what was read, for the report.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import attrs
import numpy as np
import numpy.typing as npt

from eplb.io._raw import check_numeric, dump_folder, np_array, read_json, torch_load
from eplb.io.errors import InputError
from eplb.io.layout import ModelLayout, keyed_layers, load_rows, resolve_layout
from eplb.io.registry import format_of
from eplb.io.sglang import dump_counts, read_dump_folder
from eplb.io.trtllm import read_trtllm_stats
from eplb.ir.errors import EplbError
from eplb.planner.load import as_load_matrix

__all__ = ["LOAD_SUFFIXES", "LoadFile", "read_load", "read_load_file"]

LOAD_SUFFIXES = (".json", ".npy", ".pt")
F64 = npt.NDArray[np.float64]


@attrs.frozen(kw_only=True)
class LoadFile:
    """``load [num_moe_layers, num_logical_experts]`` and what reading it found (dumps summed,
    dense rows dropped), one line each."""

    load: F64 = attrs.field(eq=False, repr=False)
    notes: tuple[str, ...] = ()


def read_load(path: str | Path, *, first_layer: int = 0, layout: ModelLayout | None = None) -> F64:
    """``[num_moe_layers, num_logical_experts]`` float64; see `read_load_file`."""
    return read_load_file(path, first_layer=first_layer, layout=layout).load


def read_load_file(
    path: str | Path, *, first_layer: int = 0, layout: ModelLayout | None = None
) -> LoadFile:
    """The load of a file or ExpertStatistic folder, mapped to MoE rows by ``layout`` (or
    ``first_layer``: MoE layers from there, the layer count unknown)."""
    p = Path(path)
    layout = resolve_layout(first_layer, layout)
    notes: list[str] = []
    folder = dump_folder(p)
    if folder == "trtllm":
        stats = read_trtllm_stats(p)
        keyed_layers(layout, stats.layers, str(p))
        load = _matrix(stats.counts.sum(axis=0), p)
        return LoadFile(load=load, notes=(stats.summary(),))
    if folder == "sglang":
        dump = read_dump_folder(p)
        return _model_rows(dump.counts.sum(axis=0), p, layout, [dump.note + ", summed"])
    if p.suffix.lower() not in LOAD_SUFFIXES:
        raise InputError(
            f"{p}: unknown load format {p.suffix.lower() or '(none)'!r}; use one of "
            f"{', '.join(LOAD_SUFFIXES)}, or a TensorRT-LLM ExpertStatistic folder."
        )
    data = _READERS[format_of(p, "load")](p, notes)
    check_numeric(data, p)
    return _model_rows(data, p, layout, notes)


def _model_rows(data: Any, p: Path, layout: ModelLayout | None, notes: list[str]) -> LoadFile:
    """The MoE rows of a load with a row per model layer (or MoE rows only)."""
    load = _matrix(data, p)
    rows = load_rows(layout, load, str(p))
    if layout is not None:
        layout.check_experts(load.shape[1], str(p))
    if rows.note:
        notes.append(rows.note)
    return LoadFile(load=load[rows.start : rows.start + rows.count], notes=tuple(notes))


def _matrix(data: Any, p: Path) -> F64:
    try:
        return as_load_matrix(data)
    except EplbError as exc:
        raise InputError(f"{p}: {exc}") from None


def _read_json(p: Path, notes: list[str]) -> Any:
    data = read_json(p)
    if isinstance(data, dict):
        if "load" not in data:
            raise InputError(
                f"{p}: a JSON object needs a 'load' key (found {sorted(data)[:5]}); "
                'write {"load": [[...], ...]}.'
            )
        data = data["load"]
    return data


def _read_npy(p: Path, notes: list[str]) -> Any:
    return np_array(p, "load")


def _read_pt(p: Path, notes: list[str]) -> Any:
    data = torch_load(p)
    if not isinstance(data, dict):
        return data
    dump = dump_counts(data, p)
    if dump is not None:
        notes.append(dump.note + ", summed")
        return dump.counts.sum(axis=0)
    if "load" in data:
        return data["load"]
    raise InputError(
        f"{p}: a dict needs 'logical_count' or 'records' (SGLang dumps) or 'load' (found "
        f"{sorted(map(str, data))[:5]}); save the load tensor itself."
    )


_READERS = {"ir": _read_json, "npy": _read_npy, "pt": _read_pt}
