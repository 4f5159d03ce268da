"""SGLang's files: the ``--init-expert-location`` map and the expert-distribution recorder's dumps.

The map ``{"physical_to_logical_map": [[...], ...]}`` (JSON, or ``.pt`` with a tensor) has a row per
model layer (``num_hidden_layers``; SGLang's dense layers get its trivial row, slot p holding expert
p % experts). The dumps (``sglang/srt/eplb/expert_distribution.py``, ``torch.save`` by
``_dump_to_file``), one row per model layer as well:

- ``stat`` mode (``_StatAccumulator.dump``): ``{"rank", "logical_count": [buffer, layers, experts],
  ...}``, all ranks reduced. The buffer is ``--expert-distribution-recorder-buffer-size`` rows, zero
  where no forward pass was recorded (``_CircularBuffer``); only the filled rows are steps.
- ``per_pass`` mode (``_DetailAccumulator.dump``), one file per rank: ``{"records": [{
  "forward_pass_id", "rank", "gatherer_key", "global_physical_count": [layers, slots]}, ...],
  "last_physical_to_logical_map": [layers, slots]}``. Slot counts become expert counts through the
  last map (the one in force when the dump was written).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import attrs
import numpy as np
import numpy.typing as npt

from eplb.io.errors import InputError

__all__ = ["SglangDump", "dump_counts", "map_rows", "read_dump_folder", "trivial_row"]

F64 = npt.NDArray[np.float64]


def trivial_row(num_physical_experts: int, num_logical_experts: int) -> list[int]:
    """SGLang's map of a layer without rebalancing (``init_trivial``): slot p holds p % experts."""
    return [p % num_logical_experts for p in range(num_physical_experts)]


def map_rows(doc: Any, path: Path) -> list[list[Any]] | None:
    """The ``[layers][slots]`` rows of an SGLang map document, None if ``doc`` is not one."""
    if not isinstance(doc, dict) or "physical_to_logical_map" not in doc:
        return None
    rows = doc["physical_to_logical_map"]
    if hasattr(rows, "tolist"):
        rows = rows.tolist()
    if not isinstance(rows, list) or not all(isinstance(row, list) for row in rows):
        raise InputError(
            f"{path}: physical_to_logical_map must be [layers][slots] expert ids, a list of lists "
            f"(got {type(rows).__name__} {str(rows)[:40]}); write one list of expert ids per layer."
        )
    ragged = next((i for i, row in enumerate(rows) if len(row) != len(rows[0])), None)
    if ragged is not None:
        raise InputError(
            f"{path}: physical_to_logical_map layer {ragged} lists {len(rows[ragged])} slots but layer 0 "
            f"lists {len(rows[0])}; every layer needs one expert per slot."
        )
    return rows


@attrs.frozen(kw_only=True)
class SglangDump:
    """``counts [steps, layers, experts]`` of a dump, model-layer rows; ``note`` says what was read;
    ``passes``: the forward pass id of each step (``per_pass``), None for ``stat`` buffer rows."""

    counts: F64 = attrs.field(eq=False, repr=False)
    note: str
    passes: tuple[int, ...] | None = None
    ranks: tuple[int, ...] = ()


def _array(value: Any) -> npt.NDArray[Any]:
    if type(value).__module__.startswith("torch"):
        return np.asarray(value.detach().cpu().numpy())
    return np.asarray(value)


def dump_counts(doc: Any, path: Path) -> SglangDump | None:
    """The counts of an SGLang dump (``stat`` or ``per_pass``), None if ``doc`` is neither."""
    if isinstance(doc, dict) and "records" in doc and "last_physical_to_logical_map" in doc:
        return _per_pass(doc, path)
    if isinstance(doc, dict) and "logical_count" in doc:
        counts = _array(doc["logical_count"])
        if counts.ndim != 3:
            return SglangDump(counts=counts[None] if counts.ndim == 2 else counts, note="SGLang stat dump")
        filled = np.flatnonzero(counts.reshape(counts.shape[0], -1).sum(axis=1))
        note = (
            f"SGLang stat dump: {len(filled)} of {counts.shape[0]} buffer rows filled (empty rows "
            "dropped; a buffer that wrapped around holds its steps out of order)"
        )
        return SglangDump(counts=np.asarray(counts[filled], dtype=np.float64), note=note)
    return None


def _per_pass(doc: dict[str, Any], path: Path) -> SglangDump:
    p2l = _array(doc["last_physical_to_logical_map"]).astype(np.int64)
    records = doc["records"]
    if p2l.ndim != 2 or not isinstance(records, list):
        raise InputError(
            f"{path}: a per_pass dump holds records (a list) and last_physical_to_logical_map "
            f"[layers, slots] (got {type(records).__name__}, shape {p2l.shape}); pass SGLang's own dump."
        )
    layers, slots = p2l.shape
    experts = int(p2l.max()) + 1 if p2l.size else 1
    index = (np.arange(layers)[:, None] * experts + p2l).ravel()
    steps: dict[int, F64] = {}
    ranks: set[int] = set()
    for n, rec in enumerate(records):
        phys = _array(rec.get("global_physical_count")) if isinstance(rec, dict) else None
        if phys is None or phys.shape != (layers, slots):
            got = None if phys is None else phys.shape
            raise InputError(
                f"{path}: record {n} has global_physical_count of shape {got}, not ({layers}, {slots}) "
                "like last_physical_to_logical_map; pass SGLang's own per_pass dump."
            )
        logical = np.bincount(index, weights=phys.ravel().astype(np.float64), minlength=layers * experts)
        step = int(rec.get("forward_pass_id", n))
        prev = steps.get(step)
        row: F64 = np.asarray(logical, dtype=np.float64).reshape(layers, experts)
        steps[step] = row if prev is None else prev + row
        ranks.add(int(rec.get("rank", 0)))
    if not steps:
        raise InputError(f"{path}: the per_pass dump has no records; record some forward passes first.")
    order = sorted(steps)
    return SglangDump(
        counts=np.stack([steps[s] for s in order]),
        note=_per_pass_note(len(order), sorted(ranks)),
        passes=tuple(order),
        ranks=tuple(sorted(ranks)),
    )


def _per_pass_note(passes: int, ranks: list[int]) -> str:
    return (
        f"SGLang per_pass dump: {passes} forward passes, rank(s) {ranks}; slots mapped to experts by "
        "each file's last_physical_to_logical_map"
    )


def read_dump_folder(folder: Path) -> SglangDump:
    """The ``.pt`` dumps of a folder (``SGLANG_EXPERT_DISTRIBUTION_RECORDER_DIR``): ``per_pass``
    files (one per rank) summed pass by pass; ``stat`` files (rank 0's, one per dump) one after
    the other in name order, which is time order (``expert_distribution_recorder_{time}.pt``)."""
    from eplb.io._raw import torch_load

    files = sorted(folder.glob("*.pt"))
    dumps = []
    for f in files:
        dump = dump_counts(torch_load(f), f)
        if dump is None:
            raise InputError(
                f"{f} in {folder} is not an SGLang expert-distribution dump; keep only the recorder's "
                "files in the folder."
            )
        dumps.append(dump)
    kinds = {d.passes is None for d in dumps}
    if len(kinds) > 1:
        raise InputError(
            f"{folder} mixes stat and per_pass dumps; pass one recording's files (one mode) at a time."
        )
    shapes = {d.counts.shape[1:] for d in dumps}
    if len(shapes) > 1:
        raise InputError(f"{folder}: the dumps have different [layers, experts] shapes {sorted(shapes)}.")
    if dumps[0].passes is None:
        note = f"{len(dumps)} SGLang stat dump(s): " + "; ".join(d.note.split(": ", 1)[1] for d in dumps)
        return SglangDump(counts=np.concatenate([d.counts for d in dumps]), note=note)
    steps: dict[int, F64] = {}
    for d in dumps:
        for step, row in zip(d.passes or (), d.counts, strict=True):
            prev = steps.get(step)
            steps[step] = row if prev is None else prev + row
    ranks = sorted({r for d in dumps for r in d.ranks})
    order = sorted(steps)
    return SglangDump(
        counts=np.stack([steps[s] for s in order]),
        note=_per_pass_note(len(order), ranks) + f", {len(dumps)} file(s)",
        passes=tuple(order),
        ranks=tuple(ranks),
    )
