"""Which logical expert each physical slot holds: one layer (`Placement`) and a model (`ModelPlacement`).

Slot ``p`` of a layer lives on rank ``p // slots_per_rank`` at local index ``p % slots_per_rank``,
as in vLLM's and SGLang's ``physical_to_logical_map``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from functools import cached_property
from typing import TYPE_CHECKING, Any

import attrs

from eplb.ir._validate import int_tuple, positive_int
from eplb.ir.errors import InvalidValueError

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

__all__ = ["ModelPlacement", "Placement"]


def _multiple_hint(value: int, base: int) -> str:
    lo = value // base * base
    options = [str(x) for x in (lo, lo + base) if x > 0]
    return " or ".join(options)


@attrs.frozen(kw_only=True, cache_hash=True)
class Placement:
    """One MoE layer's map from physical slot to logical expert.

    ``physical_to_logical: [num_physical_experts]``, values in ``[0, num_logical_experts)``;
    every logical expert has at least one replica; ``num_physical_experts % num_ranks == 0``.
    """

    num_logical_experts: int = attrs.field(validator=positive_int)
    num_ranks: int = attrs.field(validator=positive_int)
    physical_to_logical: tuple[int, ...] = attrs.field(converter=int_tuple, repr=True)

    def __attrs_post_init__(self) -> None:
        p2l, num_e, num_r = self.physical_to_logical, self.num_logical_experts, self.num_ranks
        num_p = len(p2l)
        if num_p < num_e:
            raise InvalidValueError(
                "physical_to_logical",
                f"has {num_p} slots, fewer than num_logical_experts ({num_e}); "
                f"every expert needs a slot: use at least {num_e} slots.",
            )
        if num_p % num_r:
            raise InvalidValueError(
                "physical_to_logical",
                f"has {num_p} slots (num_physical_experts), which must be a multiple of num_ranks "
                f"({num_r}); use {_multiple_hint(num_p, num_r)} slots.",
            )
        seen = [False] * num_e
        for p, e in enumerate(p2l):
            if not 0 <= e < num_e:
                raise InvalidValueError(f"physical_to_logical[{p}]", f"must be in [0, {num_e}) (got {e}).")
            seen[e] = True
        if not all(seen):
            missing = [e for e, s in enumerate(seen) if not s]
            raise InvalidValueError(
                "physical_to_logical",
                f"must give every logical expert a replica; experts {_short(missing)} have "
                "none: place each in at least one slot.",
            )

    # --- shape -------------------------------------------------------------------------------
    @property
    def num_physical_experts(self) -> int:
        return len(self.physical_to_logical)

    @property
    def slots_per_rank(self) -> int:
        return len(self.physical_to_logical) // self.num_ranks

    def rank_of(self, slot: int) -> int:
        return slot // self.slots_per_rank

    def rank_slots(self, rank: int) -> tuple[int, ...]:
        """Logical experts held by ``rank``'s local slots, in local order."""
        s = self.slots_per_rank
        return self.physical_to_logical[rank * s : (rank + 1) * s]

    # --- derived maps, in vLLM's shapes ---------------------------------------------------
    @cached_property
    def replica_count(self) -> tuple[int, ...]:
        """``[num_logical_experts]``: how many slots hold each expert."""
        counts = [0] * self.num_logical_experts
        for e in self.physical_to_logical:
            counts[e] += 1
        return tuple(counts)

    @property
    def max_replicas(self) -> int:
        """Width of ``logical_to_physical`` as vLLM sizes it: ``num_redundant_experts + 1``."""
        return self.num_physical_experts - self.num_logical_experts + 1

    @cached_property
    def logical_to_physical(self) -> tuple[tuple[int, ...], ...]:
        """``[num_logical_experts, max_replicas]``: slots of each expert, ascending, -1 padded."""
        rows: list[list[int]] = [[] for _ in range(self.num_logical_experts)]
        for p, e in enumerate(self.physical_to_logical):
            rows[e].append(p)
        width = self.max_replicas
        return tuple(tuple(r + [-1] * (width - len(r))) for r in rows)

    @cached_property
    def holders(self) -> tuple[frozenset[int], ...]:
        """``[num_logical_experts]``: the ranks holding at least one replica of each expert."""
        out: list[set[int]] = [set() for _ in range(self.num_logical_experts)]
        s = self.slots_per_rank
        for p, e in enumerate(self.physical_to_logical):
            out[e].add(p // s)
        return tuple(frozenset(h) for h in out)

    # --- constructors and conversions ---------------------------------------------------------
    @classmethod
    def trivial(cls, num_logical_experts: int, num_physical_experts: int, num_ranks: int) -> Placement:
        """The seed's initial layout: experts in order, then redundant slots ``i % E``."""
        p2l = list(range(num_logical_experts))
        p2l += [i % num_logical_experts for i in range(num_physical_experts - num_logical_experts)]
        return cls(num_logical_experts=num_logical_experts, num_ranks=num_ranks, physical_to_logical=p2l)

    def to_list(self) -> list[int]:
        return list(self.physical_to_logical)

    def __str__(self) -> str:
        return (
            f"Placement(E={self.num_logical_experts}, P={self.num_physical_experts}, "
            f"R={self.num_ranks}: {_short(self.physical_to_logical)})"
        )


def _placements(layers: Iterable[Placement]) -> tuple[Placement, ...]:
    return tuple(layers)


@attrs.frozen(kw_only=True, cache_hash=True)
class ModelPlacement:
    """Placements of every MoE layer; all share expert count, slot count and rank count."""

    layers: tuple[Placement, ...] = attrs.field(converter=_placements)

    def __attrs_post_init__(self) -> None:
        if not self.layers:
            raise InvalidValueError("layers", "must hold at least one layer (got 0).")
        first = self.layers[0]
        for i, layer in enumerate(self.layers):
            if not isinstance(layer, Placement):
                raise InvalidValueError(f"layers[{i}]", f"must be a Placement (got {layer!r}).")
            for name in ("num_logical_experts", "num_ranks", "num_physical_experts"):
                a, b = getattr(layer, name), getattr(first, name)
                if a != b:
                    raise InvalidValueError(
                        f"layers[{i}]",
                        f"has {name}={a} but layer 0 has {b}; every layer must have the same shape.",
                    )

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def num_logical_experts(self) -> int:
        return self.layers[0].num_logical_experts

    @property
    def num_physical_experts(self) -> int:
        return self.layers[0].num_physical_experts

    @property
    def num_ranks(self) -> int:
        return self.layers[0].num_ranks

    @property
    def slots_per_rank(self) -> int:
        return self.layers[0].slots_per_rank

    @property
    def physical_to_logical(self) -> tuple[tuple[int, ...], ...]:
        """``[num_layers, num_physical_experts]``."""
        return tuple(layer.physical_to_logical for layer in self.layers)

    @classmethod
    def from_lists(
        cls,
        physical_to_logical: Sequence[Sequence[int]] | Any,
        *,
        num_ranks: int,
        num_logical_experts: int | None = None,
    ) -> ModelPlacement:
        """Build from ``[num_layers, num_physical_experts]`` nested lists or an array.

        ``num_logical_experts`` defaults to the largest id plus one.
        """
        rows = [int_tuple(row) for row in physical_to_logical]
        if num_logical_experts is None:
            num_logical_experts = max((max(r) for r in rows if r), default=-1) + 1
        return cls(
            layers=tuple(
                Placement(num_logical_experts=num_logical_experts, num_ranks=num_ranks, physical_to_logical=r)
                for r in rows
            )
        )

    @classmethod
    def trivial(
        cls, *, num_layers: int, num_logical_experts: int, num_physical_experts: int, num_ranks: int
    ) -> ModelPlacement:
        layer = Placement.trivial(num_logical_experts, num_physical_experts, num_ranks)
        return cls(layers=(layer,) * num_layers)

    def to_lists(self) -> list[list[int]]:
        return [layer.to_list() for layer in self.layers]

    def to_numpy(self) -> npt.NDArray[np.int64]:
        """``physical_to_logical: [num_layers, num_physical_experts]`` as int64."""
        import numpy as np

        return np.asarray(self.physical_to_logical, dtype=np.int64)

    def logical_to_physical_array(self) -> npt.NDArray[np.int64]:
        """``[num_layers, num_logical_experts, max_replicas]``, -1 padded (vLLM's shape)."""
        import numpy as np

        return np.asarray([layer.logical_to_physical for layer in self.layers], dtype=np.int64)

    def replica_count_array(self) -> npt.NDArray[np.int64]:
        """``[num_layers, num_logical_experts]``."""
        import numpy as np

        return np.asarray([layer.replica_count for layer in self.layers], dtype=np.int64)

    def __str__(self) -> str:
        return (
            f"ModelPlacement(L={self.num_layers}, E={self.num_logical_experts}, "
            f"P={self.num_physical_experts}, R={self.num_ranks})"
        )


def _short(values: Sequence[int], limit: int = 12) -> str:
    if len(values) <= limit:
        return "[" + ", ".join(map(str, values)) + "]"
    head = ", ".join(map(str, values[:limit]))
    return f"[{head}, ... ({len(values)} in all)]"
