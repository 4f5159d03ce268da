"""Placements and load traces in the files other engines read and write.

Placements (``physical_to_logical [layers, slots]``, slots rank-major as every engine numbers them):

- ``ir``: eplb's JSON (`eplb.ir.serde`), the only one that records the rank count;
- ``sglang``: ``{"physical_to_logical_map": [[...], ...]}``, what SGLang's
  ``--init-expert-location`` reads (``.json``; ``.pt`` holds the same key as a tensor). SGLang has
  one row per model layer (``num_hidden_layers``: 61 for DeepSeek-V3, whose first 3 are dense), so
  writing with ``first_layer=k`` puts k trivial rows first and reading with it drops them;
- ``trtllm``: TensorRT-LLM's load-balancer YAML (``moe_config.load_balancer``): ``num_slots``,
  ``initial_global_assignments`` (model layer index -> the expert of every slot) and
  ``layer_updates_per_iter``. Layer keys are the model's layer indices (DeepSeek-V3's MoE layers
  are 3..60), so reading returns ``first_layer`` and writing takes it;
- ``npy``: the ``[layers, slots]`` int64 array.

The YAML is read and written by hand, without PyYAML (not a dependency): the subset TensorRT-LLM's
``generate_eplb_config.py`` writes (a block mapping of scalars and of layer -> flow list
``[1, 2]``), plus block lists (``- 1``) and ``#`` comments. Anything else is refused with the line.

Load traces ``[windows, layers, experts]``: ``.npy`` / ``.npz`` (key ``trace``), ``.pt`` (a tensor,
or SGLang's expert-distribution dump ``{"logical_count": [steps, layers, experts]}``), ``.json``
(a nested list, ``{"trace": ...}`` or ``{"logical_count": ...}``). Steps are summed into windows of
``window_steps``.
"""

from __future__ import annotations

import io
import json
import re
from pathlib import Path
from typing import Any

import attrs
import numpy as np
import numpy.typing as npt

from eplb.formats import (
    InputError,
    check_numeric,
    np_load,
    read_json,
    read_placement,
    resolve_layout,
    torch_load,
)
from eplb.io.layout import ModelLayout, model_rows
from eplb.ir.errors import EplbError
from eplb.ir.placement import ModelPlacement
from eplb.ir.serde import dumps, loads
from eplb.planner.load import as_load_matrix

__all__ = [
    "PLACEMENT_FORMATS",
    "TRACE_SUFFIXES",
    "RanksNeededError",
    "TrtllmConfig",
    "dump_trtllm_yaml",
    "format_of",
    "parse_trtllm_yaml",
    "placement_bytes",
    "read_any_placement",
    "read_trace",
    "read_trtllm_yaml",
    "trace_bytes",
]

PLACEMENT_FORMATS = ("ir", "sglang", "trtllm", "npy", "pt")
TRACE_SUFFIXES = (".npy", ".npz", ".pt", ".json")
F64 = npt.NDArray[np.float64]


class RanksNeededError(InputError):
    """A placement file does not record its rank count and none was given."""


# --- TensorRT-LLM ---------------------------------------------------------------------------------
@attrs.frozen(kw_only=True)
class TrtllmConfig:
    """A TensorRT-LLM load-balancer config: the placement and the keys around it."""

    placement: ModelPlacement
    first_layer: int = 0
    layer_updates_per_iter: int = 0

    @property
    def num_slots(self) -> int:
        return self.placement.num_physical_experts


def dump_trtllm_yaml(
    placement: ModelPlacement, *, first_layer: int = 0, layer_updates_per_iter: int = 0
) -> str:
    """The YAML TensorRT-LLM reads, keys sorted as its ``generate_eplb_config.py`` writes them.

    ``first_layer``: the model layer index of MoE layer 0 (3 for DeepSeek-V3 / R1).
    ``layer_updates_per_iter``: 0 keeps the placement static (offline EPLB).
    """
    if first_layer < 0 or layer_updates_per_iter < 0:
        raise InputError(
            f"first_layer ({first_layer}) and layer_updates_per_iter ({layer_updates_per_iter}) must be >= 0."
        )
    lines = ["initial_global_assignments:"]
    for i, row in enumerate(placement.physical_to_logical):
        lines.append(f"  {first_layer + i}: [{', '.join(map(str, row))}]")
    lines.append(f"layer_updates_per_iter: {layer_updates_per_iter}")
    lines.append(f"num_slots: {placement.num_physical_experts}")
    return "\n".join(lines) + "\n"


_KEY = re.compile(r"^( *)([A-Za-z_][A-Za-z0-9_]*|-?\d+)\s*:\s*(.*)$")
_ITEM = re.compile(r"^( *)-\s+(.*)$")


def _int(text: str, where: str) -> int:
    try:
        return int(text.strip())
    except ValueError:
        raise InputError(f"{where}: expected an integer, got {text.strip()!r}.") from None


def _flow_list(text: str, where: str) -> list[int]:
    body = text.strip()
    if not (body.startswith("[") and body.endswith("]")):
        raise InputError(f"{where}: expected a list like [3, 1, 4], got {body[:40]!r}.")
    inner = body[1:-1].strip()
    return [_int(v, where) for v in inner.split(",")] if inner else []


def parse_trtllm_yaml(text: str, *, num_ranks: int, source: str = "<yaml>") -> TrtllmConfig:
    """Parse a load-balancer YAML; ``num_ranks`` (TensorRT-LLM's ep_size) is not in the file."""
    top: dict[str, Any] = {}
    layers: dict[int, list[int]] = {}
    section: str | None = None
    current_layer: int | None = None
    layer_indent: int | None = None
    for n, raw in enumerate(text.splitlines(), 1):
        where = f"{source} line {n}"
        line = raw.split("#", 1)[0].rstrip()
        if not line.strip() or line.strip() in ("---", "..."):
            continue
        if "\t" in raw[: len(raw) - len(raw.lstrip())]:
            raise InputError(f"{where}: tabs in indentation are not YAML; indent with spaces.")
        item = _ITEM.match(line)
        if item:
            if section != "initial_global_assignments" or current_layer is None:
                raise InputError(
                    f"{where}: a '- value' list item outside a layer of initial_global_assignments."
                )
            layers[current_layer].append(_int(item.group(2), where))
            continue
        m = _KEY.match(line)
        if not m:
            raise InputError(
                f"{where}: {line.strip()[:40]!r} is outside the YAML subset eplb reads (key: value, "
                "layer: [ids]); write it as TensorRT-LLM's generate_eplb_config.py does."
            )
        indent, key, value = len(m.group(1)), m.group(2), m.group(3).strip()
        if indent == 0:
            section, current_layer = key, None
            if key == "initial_global_assignments":
                if value and value != "{}":
                    raise InputError(
                        f"{where}: initial_global_assignments must be a block mapping 'layer: [ids]'."
                    )
            elif value:
                top[key] = value
            else:
                raise InputError(
                    f"{where}: key {key!r} has no value; eplb reads only num_slots, "
                    "initial_global_assignments and layer_updates_per_iter."
                )
            continue
        if section != "initial_global_assignments":
            raise InputError(f"{where}: unexpected indented key {key!r} under {section!r}.")
        if layer_indent is None:
            layer_indent = indent
        elif indent != layer_indent:
            raise InputError(
                f"{where}: layer {key} is indented {indent} spaces, the layers above {layer_indent}; "
                "indent every layer of initial_global_assignments alike."
            )
        layer = _int(key, where)
        if layer < 0:
            raise InputError(
                f"{where}: layer {layer} is negative; keys are the model's layer indices (>= 0)."
            )
        if layer in layers:
            raise InputError(f"{where}: layer {layer} appears twice; keep one entry per layer.")
        layers[layer] = _flow_list(value, where) if value else []
        current_layer = layer
    if not layers:
        raise InputError(
            f"{source}: no initial_global_assignments; it must map each MoE layer to its slots' experts."
        )
    unknown = sorted(set(top) - {"num_slots", "layer_updates_per_iter"})
    if unknown:
        raise InputError(
            f"{source}: unknown key(s) {unknown}; eplb reads num_slots, initial_global_assignments, "
            "layer_updates_per_iter."
        )
    keys = sorted(layers)
    if keys != list(range(keys[0], keys[0] + len(keys))):
        missing = sorted(set(range(keys[0], keys[-1] + 1)) - set(keys))
        raise InputError(
            f"{source}: layers must be consecutive; missing {missing[:8]}. Give every MoE layer a row."
        )
    rows = [layers[k] for k in keys]
    empty = next((k for k in keys if not layers[k]), None)
    if empty is not None:
        raise InputError(f"{source}: layer {empty} lists no slots; give it one expert id per slot.")
    num_slots = _int(top["num_slots"], f"{source}: num_slots") if "num_slots" in top else len(rows[0])
    bad = [k for k, r in zip(keys, rows, strict=True) if len(r) != num_slots]
    if bad:
        than = f"num_slots is {num_slots}" if "num_slots" in top else f"layer {keys[0]} lists {num_slots}"
        raise InputError(
            f"{source}: layer {bad[0]} lists {len(layers[bad[0]])} slots but {than}; every layer needs "
            "one expert per slot."
        )
    updates = _int(top.get("layer_updates_per_iter", "0"), f"{source}: layer_updates_per_iter")
    try:
        placement = ModelPlacement.from_lists(rows, num_ranks=num_ranks)
    except EplbError as exc:
        raise InputError(f"{source}: {str(exc).splitlines()[0]}") from None
    return TrtllmConfig(placement=placement, first_layer=keys[0], layer_updates_per_iter=updates)


def read_trtllm_yaml(path: str | Path, *, num_ranks: int) -> TrtllmConfig:
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise InputError(f"cannot read {p}: {exc.strerror}; check the path.") from None
    except UnicodeDecodeError as exc:
        raise InputError(
            f"{p} is not a text YAML file ({exc}); write it as generate_eplb_config.py does."
        ) from None
    return parse_trtllm_yaml(text, num_ranks=num_ranks, source=str(p))


# --- placements in any format ---------------------------------------------------------------------
def format_of(path: str | Path) -> str:
    """The placement format a file name implies: ``.yaml``/``.yml`` trtllm, ``.npy``, ``.pt``,
    ``.sglang.json`` sglang, other ``.json`` ir."""
    name = Path(path).name.lower()
    if name.endswith((".yaml", ".yml")):
        return "trtllm"
    if name.endswith(".npy"):
        return "npy"
    if name.endswith(".pt"):
        return "pt"
    if name.endswith(".sglang.json"):
        return "sglang"
    if name.endswith(".json"):
        return "ir"
    raise InputError(
        f"{path}: unknown placement file type; use .json (eplb IR), .sglang.json, .yaml "
        "(TensorRT-LLM), .npy or .pt."
    )


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
    model layer: sglang and pt get SGLang's trivial map for each dense layer before the MoE rows,
    trtllm keys the MoE layers by model layer index. ir and npy hold the MoE rows as they are.
    ``layer_updates_per_iter``: TensorRT-LLM's online-EPLB setting (0: static placement).
    """
    layout = resolve_layout(first_layer, layout)
    if layout is not None:
        layout.check_moe_rows(placement.num_layers, "the placement")
        layout.check_experts(placement.num_logical_experts, "the placement")
    dense_rows = layout.first_moe if layout is not None else 0
    if fmt == "ir":
        return dumps(placement).encode()
    if fmt == "trtllm":
        return dump_trtllm_yaml(
            placement, first_layer=dense_rows, layer_updates_per_iter=layer_updates_per_iter
        ).encode()
    if layer_updates_per_iter:
        raise InputError(
            f"layer_updates_per_iter ({layer_updates_per_iter}) is a TensorRT-LLM setting; "
            f"the {fmt} format has no place for it."
        )
    if fmt in ("sglang", "pt"):
        # SGLang's own trivial map for the dense layers (init_trivial: slot p holds p % experts).
        dense = [p % placement.num_logical_experts for p in range(placement.num_physical_experts)]
        rows = [dense] * dense_rows + placement.to_lists()
        if fmt == "sglang":
            return (json.dumps({"physical_to_logical_map": rows}) + "\n").encode()
        import torch

        buf = io.BytesIO()
        table = torch.tensor(rows, dtype=torch.int64)
        torch.save({"physical_to_logical_map": table}, buf)
        return buf.getvalue()
    if fmt == "npy":
        buf = io.BytesIO()
        np.save(buf, placement.to_numpy(), allow_pickle=False)
        return buf.getvalue()
    raise InputError(f"unknown placement format {fmt!r}; use one of {', '.join(PLACEMENT_FORMATS)}.")


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
    placement, kind, first_key = _read_any_placement(p, num_ranks, num_logical_experts)
    if layout is None:
        return placement
    if kind == "sglang":
        rows = model_rows(layout, placement.num_layers, str(p))
        if rows.start:
            placement = ModelPlacement.from_lists(
                placement.to_lists()[rows.start :],
                num_ranks=placement.num_ranks,
                num_logical_experts=placement.num_logical_experts,
            )
    elif kind == "trtllm" and first_key != layout.first_moe:
        raise InputError(
            f"{p}: its layers start at model layer {first_key}, but {layout} has its first MoE layer "
            f"at {layout.first_moe}; pass the layout of the model it was written for."
        )
    layout.check_moe_rows(placement.num_layers, str(p))
    layout.check_experts(placement.num_logical_experts, str(p))
    return placement


def _read_any_placement(
    path: Path, num_ranks: int | None, num_logical_experts: int | None
) -> tuple[ModelPlacement, str, int]:
    """``(placement, kind, first key)``: kind ``ir`` / ``sglang`` / ``trtllm`` / ``npy`` by content."""
    p = path
    _need_file(p)
    fmt = format_of(p)
    if fmt == "ir" or fmt == "sglang":
        doc = read_json(p)
        if isinstance(doc, dict) and doc.get("type") == "model_placement":
            try:
                return loads(json.dumps(doc), ModelPlacement), "ir", 0
            except EplbError as exc:
                raise InputError(f"{p}: {str(exc).splitlines()[0]}") from None
    ranks = _need_ranks(p, num_ranks)
    if fmt == "trtllm":
        cfg = read_trtllm_yaml(p, num_ranks=ranks)
        return cfg.placement, "trtllm", cfg.first_layer
    if fmt == "npy":
        arr = np_load(p)
        if not isinstance(arr, np.ndarray):
            arr.close()
            raise InputError(f"{p} is an .npz archive; save the [layers, slots] array with numpy.save.")
        if arr.ndim != 2 or arr.dtype.kind not in "iu":
            got = f"{arr.dtype} {arr.shape}"
            raise InputError(f"{p}: a placement array must be integer [layers, slots] (got {got}).")
        if num_logical_experts is None:
            num_logical_experts = _expert_count(arr)
        try:
            placement = ModelPlacement.from_lists(
                arr.tolist(), num_ranks=ranks, num_logical_experts=num_logical_experts
            )
        except EplbError as exc:
            raise InputError(f"{p}: {str(exc).splitlines()[0]}") from None
        return placement, "npy", 0
    if num_logical_experts is None:
        doc = read_json(p) if fmt != "pt" else torch_load(p)
        rows = doc.get("physical_to_logical_map") if isinstance(doc, dict) else None
        if rows is None:
            raise InputError(
                f'{p}: not a placement; expected eplb IR JSON or {{"physical_to_logical_map": ...}}.'
            )
        ids = rows.tolist() if hasattr(rows, "tolist") else rows
        flat = [v for row in ids if isinstance(row, list) for v in row] if isinstance(ids, list) else []
        ints = [v for v in flat if isinstance(v, int) and not isinstance(v, bool)]
        num_logical_experts = _expert_count(np.asarray(ints, dtype=np.int64))
    placement = read_placement(p, num_ranks=ranks, num_logical_experts=num_logical_experts)
    return placement, "sglang", 0


def _expert_count(ids: npt.NDArray[Any]) -> int:
    """The expert count a file of expert ids implies (the largest id + 1; at least 1, so that a
    negative id is reported as out of range rather than as an empty model)."""
    if not ids.size or ids.dtype.kind not in "iu":
        return 1
    return max(int(ids.max()) + 1, 1)


def _need_file(path: Path) -> None:
    if path.is_dir():
        raise InputError(f"cannot read {path}: it is a folder; name a file.")
    if not path.is_file():
        raise InputError(f"cannot read {path}: no such file; check the path.")


def _need_ranks(path: Path, num_ranks: int | None) -> int:
    if num_ranks is None:
        raise RanksNeededError(
            f"{path} does not record the rank count; pass --ranks (the EP size it was made for)."
        )
    if num_ranks <= 0:
        raise InputError(f"--ranks must be > 0 (got {num_ranks}).")
    return num_ranks


# --- load traces ----------------------------------------------------------------------------------
def read_trace(path: str | Path, *, window_steps: int = 1) -> F64:
    """``[windows, layers, experts]`` float64 load; ``window_steps`` consecutive steps per window."""
    p = Path(path)
    if window_steps <= 0:
        raise InputError(f"--window-steps must be > 0 (got {window_steps}).")
    suffix = p.suffix.lower()
    if suffix not in TRACE_SUFFIXES:
        raise InputError(
            f"{p}: unknown trace format {suffix or '(none)'!r}; use one of {', '.join(TRACE_SUFFIXES)}."
        )
    _need_file(p)
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
        key = next((k for k in ("logical_count", "trace") if k in data), None)
        if key is None:
            raise InputError(
                f"{p}: a mapping needs 'logical_count' (SGLang dump) or 'trace' (found "
                f"{sorted(map(str, data))[:5]})."
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
    windows = arr.shape[0] // window_steps
    if windows == 0:
        raise InputError(
            f"{p}: {arr.shape[0]} steps make no full window of {window_steps}; lower --window-steps."
        )
    steps = arr[: windows * window_steps].reshape(windows, window_steps, *arr.shape[1:])
    arr = np.asarray(steps.sum(axis=1), dtype=np.float64)
    for w in range(windows):
        try:
            as_load_matrix(arr[w], name=f"trace[{w}]")
        except EplbError as exc:
            raise InputError(f"{p}: {exc}") from None
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
