"""TensorRT-LLM's files: the load-balancer YAML (``moe_config.load_balancer``) and the
``ExpertStatistic`` dump folder.

The YAML: ``num_slots``, ``initial_global_assignments`` (model layer index -> the expert of every
slot) and ``layer_updates_per_iter``. It is read and written by hand, without PyYAML: the subset
TensorRT-LLM's ``generate_eplb_config.py`` writes (a block mapping of scalars and of layer -> flow
list ``[1, 2]``), plus block lists (``- 1``) and ``#`` comments. Anything else is refused with the
line.

The ExpertStatistic folder (``tensorrt_llm/_torch/expert_statistic.py``, written when
``EXPERT_STATISTIC_ITER_RANGE`` is set): ``meta_info.json`` (``num_experts``,
``num_experts_per_token``; rank 0 writes it) and ``rank{r}.safetensors`` with one 1-D count tensor
per ``"{iter}_{layer}"`` key, layer being the model layer index. With TensorRT-LLM's load balancer
on, the counts are per slot, not per expert. Reading needs ``safetensors`` (``pip install
'eplb[trtllm]'``).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import attrs
import numpy as np
import numpy.typing as npt

from eplb.io._raw import read_json, read_text
from eplb.io.errors import InputError, MissingExtraError
from eplb.ir.errors import EplbError
from eplb.ir.placement import ModelPlacement

__all__ = [
    "TrtllmConfig",
    "TrtllmStats",
    "dump_trtllm_yaml",
    "parse_trtllm_yaml",
    "read_trtllm_stats",
    "read_trtllm_yaml",
]

F64 = npt.NDArray[np.float64]


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
    text = read_text(p, "write it as TensorRT-LLM's generate_eplb_config.py does", "text YAML")
    return parse_trtllm_yaml(text, num_ranks=num_ranks, source=str(p))


# --- the ExpertStatistic folder -------------------------------------------------------------------
@attrs.frozen(kw_only=True)
class TrtllmStats:
    """An ExpertStatistic dump, summed over ranks: ``counts [iterations, layers, experts]``, rows in
    the order of ``layers`` (model layer indices), windows in the order of ``iterations``."""

    counts: F64 = attrs.field(eq=False, repr=False)
    iterations: tuple[int, ...]
    layers: tuple[int, ...]
    ranks: tuple[int, ...]

    def summary(self) -> str:
        return (
            f"TensorRT-LLM ExpertStatistic: iterations {_spans(self.iterations)}, ranks "
            f"{_spans(self.ranks)}, model layers {_spans(self.layers)}, summed over ranks"
        )


def _spans(values: tuple[int, ...]) -> str:
    """``0-3, 5`` for (0, 1, 2, 3, 5)."""
    out: list[str] = []
    start = prev = None
    for v in [*values, None]:
        if v is not None and prev is not None and v == prev + 1:
            prev = v
            continue
        if start is not None:
            out.append(str(start) if start == prev else f"{start}-{prev}")
        start = prev = v
    return ", ".join(out)


_RANK_FILE = re.compile(r"^rank(\d+)\.safetensors$")
_KEY_RE = re.compile(r"^(\d+)_(\d+)$")


def _load_safetensors(path: Path) -> dict[str, Any]:
    try:
        from safetensors.numpy import load_file
    except ImportError:
        raise MissingExtraError(
            f"{path}: reading TensorRT-LLM's ExpertStatistic files needs the safetensors package; "
            "pip install 'eplb[trtllm]' (or pip install safetensors)."
        ) from None
    try:
        return dict(load_file(str(path)))
    except Exception as exc:  # safetensors raises its own error types for a bad header
        raise InputError(
            f"{path} is not a safetensors file ({type(exc).__name__}: {exc}); pass the folder "
            "TensorRT-LLM's ExpertStatistic wrote (EXPERT_STATISTIC_PATH)."
        ) from None


def read_trtllm_stats(folder: str | Path) -> TrtllmStats:
    """The counts of an ExpertStatistic folder, summed over its ``rank{r}.safetensors`` files."""
    d = Path(folder)
    meta_path = d / "meta_info.json"
    if not meta_path.is_file():
        raise InputError(
            f"{d}: no meta_info.json; pass the folder TensorRT-LLM's ExpertStatistic wrote "
            "(EXPERT_STATISTIC_PATH, default expert_statistic)."
        )
    meta = read_json(meta_path)
    num_experts = meta.get("num_experts") if isinstance(meta, dict) else None
    if not isinstance(num_experts, int) or isinstance(num_experts, bool) or num_experts <= 0:
        raise InputError(
            f"{meta_path}: num_experts must be a positive integer (got {num_experts!r}); "
            "it is the length of every count tensor."
        )
    rank_files = sorted(
        (int(m.group(1)), p) for p in d.iterdir() if (m := _RANK_FILE.match(p.name))
    )
    if not rank_files:
        raise InputError(f"{d}: no rank{{r}}.safetensors files; the dump holds no counts.")
    sums: dict[tuple[int, int], F64] = {}
    for _rank, path in rank_files:
        for key, value in _load_safetensors(path).items():
            m = _KEY_RE.match(key)
            if m is None:
                raise InputError(
                    f"{path}: key {key!r} is not '{{iter}}_{{layer}}'; pass an ExpertStatistic rank file."
                )
            arr = np.asarray(value)
            if arr.shape != (num_experts,) or arr.dtype.kind not in "iu":
                raise InputError(
                    f"{path}: {key} holds {arr.dtype} {arr.shape}, not integer counts of "
                    f"({num_experts},) (meta_info.json num_experts); the files are of different dumps."
                )
            slot = (int(m.group(1)), int(m.group(2)))
            sums[slot] = sums.get(slot, np.zeros(num_experts)) + arr
    iters = tuple(sorted({i for i, _ in sums}))
    layers = tuple(sorted({layer for _, layer in sums}))
    at_iter = {v: k for k, v in enumerate(iters)}
    at_layer = {v: k for k, v in enumerate(layers)}
    counts = np.zeros((len(iters), len(layers), num_experts))
    for (i, layer), row in sums.items():  # a layer no rank routed a token to in an iteration stays 0
        counts[at_iter[i], at_layer[layer]] = row
    return TrtllmStats(
        counts=counts, iterations=iters, layers=layers, ranks=tuple(r for r, _ in rank_files)
    )
