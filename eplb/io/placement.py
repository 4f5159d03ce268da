"""Placements (``physical_to_logical [layers, slots]``, slots rank-major as every engine numbers
them) in every format of `eplb.io.registry`: one reader and one writer per format.

- ``ir``: eplb's JSON (`eplb.ir.serde`), the only one that records the rank count;
- ``sglang``: SGLang's ``--init-expert-location`` JSON, a row per model layer; ``pt``: the same map
  as a tensor (`eplb.io.sglang`);
- ``trtllm``: TensorRT-LLM's load-balancer YAML, keyed by model layer (`eplb.io.trtllm`);
- ``npy``: the ``[layers, slots]`` int64 array of the MoE layers.

eplb's placements hold the MoE layers only; a `ModelLayout` maps them to each engine's model-layer
numbering on writing and back on reading, so one placement round-trips through every format.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import numpy as np

from eplb.io._raw import expert_count, need_file, np_array, read_json, torch_load
from eplb.io.errors import InputError, RanksNeededError
from eplb.io.layout import ModelLayout, model_rows, resolve_layout
from eplb.io.registry import format_of, formats_holding
from eplb.io.sglang import map_rows, trivial_row
from eplb.io.trtllm import dump_trtllm_yaml, read_trtllm_yaml
from eplb.ir.errors import EplbError
from eplb.ir.placement import ModelPlacement
from eplb.ir.serde import dumps, loads

__all__ = ["PLACEMENT_FORMATS", "placement_bytes", "read_any_placement"]

PLACEMENT_FORMATS = formats_holding("placement")


@attrs.frozen(kw_only=True)
class _Read:
    """What a reader found: the placement as the file lays its rows out."""

    placement: ModelPlacement
    model_rows: bool = False  # a row per model layer (SGLang)
    first_key: int | None = None  # TensorRT-LLM: the model layer of the first row


# --- writers: (placement, dense rows before the MoE rows, layer_updates_per_iter) -> bytes ----------
def _write_ir(placement: ModelPlacement, dense: int, updates: int) -> bytes:
    return dumps(placement).encode()


def _sglang_rows(placement: ModelPlacement, dense: int) -> list[list[int]]:
    row = trivial_row(placement.num_physical_experts, placement.num_logical_experts)
    return [row] * dense + placement.to_lists()


def _write_sglang(placement: ModelPlacement, dense: int, updates: int) -> bytes:
    return (json.dumps({"physical_to_logical_map": _sglang_rows(placement, dense)}) + "\n").encode()


def _write_pt(placement: ModelPlacement, dense: int, updates: int) -> bytes:
    import torch

    buf = io.BytesIO()
    table = torch.tensor(_sglang_rows(placement, dense), dtype=torch.int64)
    torch.save({"physical_to_logical_map": table}, buf)
    return buf.getvalue()


def _write_trtllm(placement: ModelPlacement, dense: int, updates: int) -> bytes:
    return dump_trtllm_yaml(placement, first_layer=dense, layer_updates_per_iter=updates).encode()


def _write_npy(placement: ModelPlacement, dense: int, updates: int) -> bytes:
    buf = io.BytesIO()
    np.save(buf, placement.to_numpy(), allow_pickle=False)
    return buf.getvalue()


_WRITERS: dict[str, Callable[[ModelPlacement, int, int], bytes]] = {
    "ir": _write_ir,
    "sglang": _write_sglang,
    "pt": _write_pt,
    "trtllm": _write_trtllm,
    "npy": _write_npy,
}


def placement_bytes(
    placement: ModelPlacement,
    fmt: str,
    *,
    first_layer: int = 0,
    layout: ModelLayout | None = None,
    layer_updates_per_iter: int = 0,
) -> bytes:
    """The file content of ``placement`` (MoE layers only) in ``fmt`` (see `PLACEMENT_FORMATS`).

    ``layout`` (or ``first_layer``: MoE layers start there): the engine formats number layers by
    model layer: sglang and pt get SGLang's trivial row for each dense layer before the MoE rows,
    trtllm keys the MoE layers by model layer index. ir and npy hold the MoE rows as they are.
    ``layer_updates_per_iter``: TensorRT-LLM's online-EPLB setting (0: static placement).
    """
    if fmt not in _WRITERS:
        raise InputError(f"unknown placement format {fmt!r}; use one of {', '.join(PLACEMENT_FORMATS)}.")
    layout = resolve_layout(first_layer, layout)
    if layout is not None:
        layout.check_moe_rows(placement.num_layers, "the placement")
        layout.check_experts(placement.num_logical_experts, "the placement")
    if layer_updates_per_iter < 0:
        raise InputError(f"layer_updates_per_iter must be >= 0 (got {layer_updates_per_iter}).")
    if layer_updates_per_iter and fmt != "trtllm":
        raise InputError(
            f"layer_updates_per_iter ({layer_updates_per_iter}) is a TensorRT-LLM setting; "
            f"the {fmt} format has no place for it."
        )
    dense = layout.first_moe if layout is not None else 0
    return _WRITERS[fmt](placement, dense, layer_updates_per_iter)


# --- readers: (path, num_ranks, num_logical_experts) -> _Read ----------------------------------------
def _ir_doc(doc: Any, path: Path) -> ModelPlacement | None:
    if not (isinstance(doc, dict) and doc.get("type") == "model_placement"):
        return None
    try:
        return loads(json.dumps(doc), ModelPlacement)
    except EplbError as exc:
        raise InputError(f"{path}: {str(exc).splitlines()[0]}") from None


def _need_ranks(path: Path, num_ranks: int | None) -> int:
    if num_ranks is None:
        raise RanksNeededError(
            f"{path} does not record the rank count; pass --ranks (the EP size it was made for)."
        )
    if num_ranks <= 0:
        raise InputError(f"--ranks must be > 0 (got {num_ranks}).")
    return num_ranks


def _from_rows(
    rows: list[list[Any]], path: Path, num_ranks: int | None, num_logical_experts: int | None, what: str
) -> ModelPlacement:
    ranks = _need_ranks(path, num_ranks)
    if num_logical_experts is None:
        flat = [v for row in rows for v in row if isinstance(v, int) and not isinstance(v, bool)]
        num_logical_experts = expert_count(np.asarray(flat, dtype=np.int64))
    try:
        return ModelPlacement.from_lists(rows, num_ranks=ranks, num_logical_experts=num_logical_experts)
    except (EplbError, TypeError) as exc:
        prefix = f"bad {what}: " if what else ""
        raise InputError(f"{path}: {prefix}{str(exc).splitlines()[0]}") from None


def _read_json(path: Path, num_ranks: int | None, num_logical_experts: int | None) -> _Read:
    """``.json``: eplb IR or an SGLang map, told apart by content."""
    doc = read_json(path)
    placement = _ir_doc(doc, path)
    if placement is not None:
        return _Read(placement=placement)
    rows = map_rows(doc, path)
    if rows is None:
        raise InputError(
            f'{path}: not a placement; expected eplb IR JSON ("type": "model_placement") or SGLang\'s '
            '{"physical_to_logical_map": [[...], ...]}.'
        )
    placement = _from_rows(rows, path, num_ranks, num_logical_experts, "physical_to_logical_map")
    return _Read(placement=placement, model_rows=True)


def _read_pt(path: Path, num_ranks: int | None, num_logical_experts: int | None) -> _Read:
    rows = map_rows(torch_load(path), path)
    if rows is None:
        raise InputError(
            f'{path}: not a placement; expected a torch file {{"physical_to_logical_map": tensor}}.'
        )
    placement = _from_rows(rows, path, num_ranks, num_logical_experts, "physical_to_logical_map")
    return _Read(placement=placement, model_rows=True)


def _read_trtllm(path: Path, num_ranks: int | None, num_logical_experts: int | None) -> _Read:
    cfg = read_trtllm_yaml(path, num_ranks=_need_ranks(path, num_ranks))
    return _Read(placement=cfg.placement, first_key=cfg.first_layer)


def _read_npy(path: Path, num_ranks: int | None, num_logical_experts: int | None) -> _Read:
    arr = np_array(path, "[layers, slots] placement")
    if arr.ndim != 2 or arr.dtype.kind not in "iu":
        got = f"{arr.dtype} {arr.shape}"
        raise InputError(f"{path}: a placement array must be integer [layers, slots] (got {got}).")
    return _Read(placement=_from_rows(arr.tolist(), path, num_ranks, num_logical_experts, ""))


_READERS: dict[str, Callable[[Path, int | None, int | None], _Read]] = {
    "ir": _read_json,
    "sglang": _read_json,
    "pt": _read_pt,
    "trtllm": _read_trtllm,
    "npy": _read_npy,
}


def read_any_placement(
    path: str | Path,
    *,
    num_ranks: int | None = None,
    num_logical_experts: int | None = None,
    first_layer: int = 0,
    layout: ModelLayout | None = None,
) -> ModelPlacement:
    """A placement (MoE layers only) from any `PLACEMENT_FORMATS` file; ``num_ranks`` is needed
    unless it is IR JSON.

    ``layout`` (or ``first_layer``): SGLang maps (JSON or ``.pt``) have a row per model layer and
    lose their dense rows (a map of MoE rows only is taken as it is when the layout's layer count
    is known); TensorRT-LLM's keys must be the layout's MoE layers; IR and ``.npy`` hold MoE rows.
    """
    layout = resolve_layout(first_layer, layout)
    p = Path(path)
    need_file(p)
    found = _READERS[format_of(p, "placement")](p, num_ranks, num_logical_experts)
    placement = found.placement
    if layout is None:
        return placement
    if found.model_rows:
        rows = model_rows(layout, placement.num_layers, str(p))
        if rows.start:
            placement = ModelPlacement.from_lists(
                placement.to_lists()[rows.start :],
                num_ranks=placement.num_ranks,
                num_logical_experts=placement.num_logical_experts,
            )
    elif found.first_key is not None and found.first_key != layout.first_moe:
        raise InputError(
            f"{p}: its layers start at model layer {found.first_key}, but {layout} has its first MoE "
            f"layer at {layout.first_moe}; pass the layout of the model it was written for."
        )
    layout.check_moe_rows(placement.num_layers, str(p))
    layout.check_experts(placement.num_logical_experts, str(p))
    return placement
