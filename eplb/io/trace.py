"""Load traces ``[windows, num_moe_layers, num_logical_experts]`` for ``eplb simulate``.

- ``.npy`` / ``.npz`` (key ``trace``), ``.json`` (a nested list, ``{"trace": ...}`` or
  ``{"logical_count": ...}``), ``.pt`` (a tensor or ``{"trace": ...}``);
- SGLang's dumps (``.pt``): a ``stat`` dump's filled buffer rows, a ``per_pass`` dump's forward
  passes (`eplb.io.sglang`);
- a folder: TensorRT-LLM's ExpertStatistic dump, one step per iteration (`eplb.io.trtllm`), or
  SGLang's recorder folder of ``.pt`` dumps (``per_pass`` files of all ranks summed pass by pass).

Steps are summed into windows of ``window_steps``; a `ModelLayout` maps model-layer rows to MoE rows.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import attrs
import numpy as np
import numpy.typing as npt

from eplb.io._raw import check_numeric, dump_folder, need_file, np_load, read_json, torch_load
from eplb.io.errors import InputError
from eplb.io.layout import ModelLayout, keyed_layers, load_rows
from eplb.io.sglang import dump_counts, read_dump_folder
from eplb.io.trtllm import read_trtllm_stats
from eplb.ir.errors import EplbError
from eplb.planner.load import as_load_matrix

__all__ = ["TRACE_SUFFIXES", "TraceFile", "read_trace", "read_trace_file", "trace_bytes"]

TRACE_SUFFIXES = (".npy", ".npz", ".pt", ".json")
F64 = npt.NDArray[np.float64]


@attrs.frozen(kw_only=True)
class TraceFile:
    """``trace [windows, layers, experts]`` and what reading it found, one line each."""

    trace: F64 = attrs.field(eq=False, repr=False)
    notes: tuple[str, ...] = ()


def read_trace(path: str | Path, *, window_steps: int = 1, layout: ModelLayout | None = None) -> F64:
    """``[windows, layers, experts]`` float64 load; ``window_steps`` consecutive steps per window."""
    return read_trace_file(path, window_steps=window_steps, layout=layout).trace


def read_trace_file(
    path: str | Path, *, window_steps: int = 1, layout: ModelLayout | None = None
) -> TraceFile:
    p = Path(path)
    if window_steps <= 0:
        raise InputError(f"--window-steps must be > 0 (got {window_steps}).")
    notes: list[str] = []
    folder = dump_folder(p)
    if folder == "trtllm":
        stats = read_trtllm_stats(p)
        keyed_layers(layout, stats.layers, str(p))
        arr, notes = stats.counts, [stats.summary()]
    elif folder == "sglang":
        dump = read_dump_folder(p)
        arr, notes = dump.counts, [dump.note]
    else:
        arr = _steps(p, notes)
    windows = arr.shape[0] // window_steps
    if windows == 0:
        raise InputError(
            f"{p}: {arr.shape[0]} steps make no full window of {window_steps}; lower --window-steps."
        )
    steps = arr[: windows * window_steps].reshape(windows, window_steps, *arr.shape[1:])
    arr = np.asarray(steps.sum(axis=1), dtype=np.float64)
    if folder != "trtllm":  # TensorRT-LLM names MoE layers only; the others have model-layer rows
        rows = load_rows(layout, arr.sum(axis=0), str(p))
        arr = arr[:, rows.start : rows.start + rows.count]
        if rows.note:
            notes.append(rows.note)
        if layout is not None:
            layout.check_experts(arr.shape[2], str(p))
    for w in range(windows):
        try:
            as_load_matrix(arr[w], name=f"trace[{w}]")
        except EplbError as exc:
            raise InputError(f"{p}: {exc}") from None
    return TraceFile(trace=arr, notes=tuple(notes))


def _steps(p: Path, notes: list[str]) -> F64:
    """``[steps, rows, experts]`` of a trace file."""
    suffix = p.suffix.lower()
    if suffix not in TRACE_SUFFIXES:
        raise InputError(
            f"{p}: unknown trace format {suffix or '(none)'!r}; use one of {', '.join(TRACE_SUFFIXES)}, "
            "or a TensorRT-LLM ExpertStatistic folder."
        )
    need_file(p)
    data: Any
    if suffix in (".npy", ".npz"):
        data = np_load(p)
        if isinstance(data, np.lib.npyio.NpzFile):
            with data:
                if "trace" not in data.files:
                    raise InputError(f"{p}: an .npz needs a 'trace' array (found {data.files[:5]}).")
                data = data["trace"]
        elif suffix == ".npz":
            raise InputError(f"{p} is an .npy array, not an .npz archive; name it .npy.")
    elif suffix == ".pt":
        data = torch_load(p)
    else:
        data = read_json(p)
    if isinstance(data, dict):
        dump = dump_counts(data, p) if suffix == ".pt" else None
        if dump is not None:
            notes.append(dump.note)
            data = dump.counts
        else:
            key = next((k for k in ("logical_count", "trace") if k in data), None)
            if key is None:
                raise InputError(
                    f"{p}: a mapping needs 'logical_count' or 'records' (SGLang dumps) or 'trace' "
                    f"(found {sorted(map(str, data))[:5]})."
                )
            data = data[key]
    check_numeric(data, p)
    if type(data).__module__.startswith("torch"):
        data = data.detach().cpu().double().numpy()
    try:
        arr = np.asarray(data, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise InputError(f"{p}: not a rectangular array of numbers ({exc}).") from None
    if arr.ndim != 3:
        fix = (
            "stack the windows as [windows, layers, experts]"
            if arr.ndim == 2
            else "save [windows, layers, experts]"
        )
        raise InputError(
            f"{p}: a trace has 3 dimensions [windows, layers, experts] (got shape {arr.shape}); {fix}."
        )
    return arr


def trace_bytes(trace: Any, fmt: str) -> bytes:
    """A ``[windows, layers, experts]`` trace as ``npy``, ``json`` or ``sglang`` (a ``.pt`` dump
    ``{"logical_count": int tensor [steps, layers, experts]}``)."""
    arr = np.asarray(trace)
    if arr.ndim != 3:
        raise InputError(f"a trace must be [windows, layers, experts] (got shape {arr.shape}).")
    if fmt == "json":
        return (json.dumps({"trace": arr.tolist()}) + "\n").encode()
    buf = io.BytesIO()
    if fmt == "npy":
        np.save(buf, arr, allow_pickle=False)
    elif fmt == "sglang":
        import torch

        torch.save({"logical_count": torch.from_numpy(np.rint(arr).astype(np.int64))}, buf)
    else:
        raise InputError(f"unknown trace format {fmt!r}; use npy, json or sglang.")
    return buf.getvalue()
