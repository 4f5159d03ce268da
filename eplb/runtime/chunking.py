"""Pure helpers that cut a rearrangement into chunks and size its backups.

Every function here depends only on the agreed placements and the configuration, so every rank
computes the same chunks without talking to the others.
"""

from __future__ import annotations

from collections.abc import Sequence

import attrs
import numpy as np

from eplb.ir.placement import ModelPlacement
from eplb.ir.schedule import Schedule

__all__ = ["all_peer_placement", "budget_chunks", "chunk_size", "chunks", "largest_backup", "written_slots"]


def chunk_size(layers_per_chunk: int | None, incremental: bool) -> int | None:
    """Layers per chunk fixed by the configuration (None: cut by the backup budget or all at once)."""
    if layers_per_chunk is None and incremental:
        return 1
    return layers_per_chunk


def chunks(
    changed: Sequence[int],
    current: ModelPlacement,
    target: ModelPlacement,
    *,
    size: int | None,
    rollback: bool,
    slot_bytes: Sequence[int],
    budget: int,
) -> tuple[list[tuple[int, ...]], int | None]:
    """The chunks ``changed`` moves in, and the backup budget they were cut to (or None).

    ``size`` (from `chunk_size`) wins; else with ``rollback`` the chunks fit ``budget``; else one
    chunk holds every changed layer."""
    if size is None and rollback:
        return budget_chunks(changed, current, target, slot_bytes, budget), budget
    if size is None:
        size = max(1, len(changed))
    return [tuple(changed[i : i + size]) for i in range(0, len(changed), size)], None


def largest_backup(
    *, num_layers: int, slots_per_rank: int, size: int | None, slot_bytes: Sequence[int], budget: int
) -> list[int]:
    """Slots per layer (from layer 0) whose backup is the most one chunk can take on a rank:
    every slot of a fixed chunk's layers; under the budget, whole slots up to it, or every
    slot of one layer when a single layer is larger than the budget (it moves alone)."""
    if size is not None:
        return [slots_per_rank] * min(size, num_layers)
    left, out = budget, []
    for nbytes in slot_bytes:
        n = min(slots_per_rank, left // nbytes) if nbytes else slots_per_rank
        if n == 0:
            break
        out.append(n)
        left -= n * nbytes
    return out if out and out[0] == slots_per_rank else [slots_per_rank]


def all_peer_placement(placement: ModelPlacement) -> ModelPlacement:
    """Every layer's slots rotated so slot ``k`` of rank ``r`` moves to rank ``(r + 1 + k) % R``:
    with ``S >= R - 1`` slots each rank sends to every peer; the multiset of experts is kept, so
    the result is a valid placement."""
    r, s = placement.num_ranks, placement.slots_per_rank
    layers = []
    for layer in placement.layers:
        p2l = layer.physical_to_logical
        # Slot k of every rank goes to a distinct rank, so each rank receives exactly s slots.
        out = [-1] * len(p2l)
        for p, e in enumerate(p2l):
            src, k = divmod(p, s)
            out[(src + 1 + k) % r * s + k] = e
        layers.append(attrs.evolve(layer, physical_to_logical=out))
    return ModelPlacement(layers=layers)


def budget_chunks(
    changed: Sequence[int],
    current: ModelPlacement,
    target: ModelPlacement,
    slot_bytes: Sequence[int],
    budget: int,
) -> list[tuple[int, ...]]:
    """``changed`` cut into consecutive chunks whose backup fits ``budget`` on every rank.

    A layer's backup on rank ``r`` is the slots of ``r`` whose expert changes (the compiler
    writes exactly those; staging buffers are not backed up) times ``slot_bytes[layer]``. A chunk
    grows while the busiest rank's sum fits; a layer larger than the budget alone is its own
    chunk."""
    out: list[tuple[int, ...]] = []
    layers: list[int] = []
    held = np.zeros(current.num_ranks, dtype=np.int64)
    for layer in changed:
        cur = np.asarray(current.layers[layer].physical_to_logical)
        tgt = np.asarray(target.layers[layer].physical_to_logical)
        cost = (cur != tgt).reshape(current.num_ranks, -1).sum(axis=1) * slot_bytes[layer]
        if layers and int((held + cost).max()) > budget:
            out.append(tuple(layers))
            layers, held = [], np.zeros_like(held)
        layers.append(layer)
        held += cost
    if layers:
        out.append(tuple(layers))
    return out


def written_slots(sched: Schedule, rank: int) -> list[list[int]]:
    """``[num_layers]``: the slots of ``rank`` that some op of the schedule overwrites."""
    out: list[set[int]] = [set() for _ in range(sched.plan.num_layers)]
    for op in sched.ops():
        if op.rank != rank:
            continue
        dst = getattr(op, "dst", None)
        if dst is not None and not dst.is_buffer:
            out[op.layer].add(dst.index)
    return [sorted(s) for s in out]
