"""Synthetic expert weights whose bytes encode (layer, logical expert, tensor index), and the check.

Used by tests, ``eplb run`` and the benchmark: fill every slot with its current expert, run a
schedule, then ``mismatches`` lists every slot that does not hold its target expert's bytes.
Every byte is below 64, so viewed as fp16 / bf16 / fp32 no value is NaN or Inf and copies are
bit-exact on every backend.
"""

from __future__ import annotations

import functools
from collections.abc import Collection, Sequence

import torch

from eplb.ir.errors import InvalidValueError
from eplb.ir.placement import ModelPlacement

__all__ = ["expert_bytes_of", "make_rank_weights", "mismatches", "pattern", "tensor_layout"]

Layout = tuple[tuple[int, torch.dtype], ...]
"""Per weight tensor k of one expert: (bytes, dtype)."""


def tensor_layout(expert_bytes: int, dtype: torch.dtype = torch.float16) -> Layout:
    """Split ``expert_bytes`` into up to three tensors like an fp8 MoE expert's.

    Two tensors of ``dtype`` (about 2/3 and 1/3, like w13 and w2) and a uint8 tensor for the
    remainder (like block scales), so layers hold tensors of different shapes and dtypes.
    """
    item = torch.empty((), dtype=dtype).element_size()
    n = expert_bytes // item
    if n < 2:
        return ((expert_bytes, torch.uint8),)
    first = max(1, 2 * n // 3)
    parts: list[tuple[int, torch.dtype]] = [(first * item, dtype), ((n - first) * item, dtype)]
    rest = expert_bytes - n * item
    if rest:
        parts.append((rest, torch.uint8))
    return tuple(parts)


def expert_bytes_of(layout: Layout) -> int:
    return sum(nbytes for nbytes, _ in layout)


@functools.lru_cache(maxsize=1 << 16)
def pattern(layer: int, expert: int, k: int, nbytes: int) -> torch.Tensor:
    """``[nbytes]`` uint8: the ids in base 64 in the first 6 bytes, then an id-seeded ramp.

    Cached (tests build the same experts many times): never write into the result."""
    head = [expert % 64, expert // 64 % 64, expert // 4096 % 64, layer % 64, layer // 64 % 64, k % 64]
    values = (torch.arange(nbytes, dtype=torch.int64) * 7 + expert * 17 + layer * 31 + k * 5) % 61
    n = min(nbytes, len(head))
    values[:n] = torch.tensor(head[:n], dtype=torch.int64)
    return values.to(torch.uint8)


def make_rank_weights(
    placement: ModelPlacement,
    rank: int,
    slots_per_rank: int,
    layout: Layout,
    device: torch.device | str = "cpu",
) -> list[list[torch.Tensor]]:
    """``weights[layer][k]`` of ``rank``, shaped ``[slots_per_rank, nbytes_k / itemsize]``.

    Slots hold their expert under ``placement``; ranks beyond the placement's rank count (a
    growing cluster) hold zeros.
    """
    out: list[list[torch.Tensor]] = []
    for layer, lp in enumerate(placement.layers):
        tensors = []
        for k, (nbytes, dtype) in enumerate(layout):
            item = torch.empty((), dtype=dtype).element_size()
            if nbytes % item:
                raise InvalidValueError(f"layout[{k}]", f"bytes ({nbytes}) must be a multiple of {item}.")
            raw = torch.zeros(slots_per_rank, nbytes, dtype=torch.uint8)
            if rank < lp.num_ranks:
                for i, expert in enumerate(lp.rank_slots(rank)):
                    raw[i] = pattern(layer, expert, k, nbytes)
            tensors.append(raw.view(dtype).to(device).contiguous())
        out.append(tensors)
    return out


def mismatches(
    weights: Sequence[Sequence[torch.Tensor]],
    placement: ModelPlacement,
    rank: int,
    *,
    layers: Collection[int] | None = None,
    limit: int = 10,
) -> list[str]:
    """Slots of ``rank`` whose bytes differ from their expert's under ``placement`` (at most
    ``limit``), in ``layers`` only if given."""
    problems: list[str] = []
    for layer, lp in enumerate(placement.layers):
        if rank >= lp.num_ranks or (layers is not None and layer not in layers):
            continue
        for k, t in enumerate(weights[layer]):
            raw = t.detach().cpu().contiguous().view(torch.uint8).reshape(t.shape[0], -1)
            for i, expert in enumerate(lp.rank_slots(rank)):
                if not torch.equal(raw[i], pattern(layer, expert, k, raw.shape[1])):
                    held = raw[i, :3].tolist()
                    problems.append(
                        f"rank {rank} layer {layer} slot {i} tensor {k}: expected expert {expert}, "
                        f"holds bytes starting {held}"
                    )
                    if len(problems) >= limit:
                        return problems
    return problems
