"""How good a placement is for a load, and what moving to it costs.

Rank load: each replica of an expert serves an equal share of the expert's load (the router
spreads tokens evenly over replicas), so rank ``r`` carries ``sum over its slots of
load[e] / replica_count[e]``. Balancedness is mean rank load / max rank load per layer, the
figure vLLM logs; imbalance is (max - mean) / mean.

Shapes: ``load: [num_layers, num_logical_experts]``; placements are `ModelPlacement` or
``physical_to_logical: [num_layers, num_physical_experts]`` int arrays.
"""

from __future__ import annotations

from typing import Any

import attrs
import numpy as np
import numpy.typing as npt

from eplb.ir.errors import InvalidValueError
from eplb.ir.placement import ModelPlacement
from eplb.planner.load import as_load_matrix

__all__ = [
    "PlacementMetrics",
    "balancedness",
    "balancedness_upper_bound",
    "bytes_moved",
    "imbalance",
    "max_rank_load_lower_bound",
    "model_balancedness",
    "rank_loads",
    "slots_moved",
    "summarize",
    "transfer_mask",
]

F64 = npt.NDArray[np.float64]
I64 = npt.NDArray[np.int64]


def _p2l(placement: ModelPlacement | Any) -> I64:
    if isinstance(placement, ModelPlacement):
        return placement.to_numpy()
    arr = np.asarray(placement, dtype=np.int64)
    if arr.ndim != 2:
        raise InvalidValueError(
            "physical_to_logical", f"must be [num_layers, num_physical_experts] (got shape {arr.shape})."
        )
    return arr


def _check(load: F64, p2l: I64, num_ranks: int) -> None:
    if load.shape[0] != p2l.shape[0]:
        raise InvalidValueError(
            "load", f"has {load.shape[0]} layers but the placement has {p2l.shape[0]}; pass matching layers."
        )
    if p2l.size and (p2l.min() < 0 or p2l.max() >= load.shape[1]):
        raise InvalidValueError(
            "physical_to_logical",
            f"names experts outside [0, {load.shape[1]}) of the load matrix; pass the load of this model.",
        )
    if p2l.shape[1] % num_ranks:
        raise InvalidValueError(
            "num_ranks", f"must divide num_physical_experts ({p2l.shape[1]}) (got {num_ranks})."
        )


def _ranks(placement: ModelPlacement | Any, num_ranks: int | None) -> int:
    if num_ranks is not None:
        return num_ranks
    if isinstance(placement, ModelPlacement):
        return placement.num_ranks
    raise InvalidValueError("num_ranks", "is required when the placement is an array.")


def slot_loads(load: F64, p2l: I64) -> F64:
    """``[num_layers, num_physical_experts]``: each slot's share of its expert's load."""
    num_l, num_e = load.shape
    rows = np.arange(num_l)[:, None]
    counts = np.zeros((num_l, num_e), dtype=np.int64)
    np.add.at(counts, (np.broadcast_to(rows, p2l.shape), p2l), 1)
    share = np.divide(load, counts, out=np.zeros_like(load), where=counts > 0)
    return share[rows, p2l]


def rank_loads(load: Any, placement: ModelPlacement | Any, *, num_ranks: int | None = None) -> F64:
    """``[num_layers, num_ranks]`` load each rank carries, replicas sharing their expert's load evenly."""
    arr = as_load_matrix(load)
    p2l = _p2l(placement)
    r = _ranks(placement, num_ranks)
    _check(arr, p2l, r)
    return np.asarray(slot_loads(arr, p2l).reshape(p2l.shape[0], r, -1).sum(axis=2), dtype=np.float64)


def _ratio(num: F64, den: F64, empty: float) -> F64:
    return np.divide(num, den, out=np.full_like(num, empty), where=den > 0)


def balancedness(load: Any, placement: ModelPlacement | Any, *, num_ranks: int | None = None) -> F64:
    """``[num_layers]`` mean rank load / max rank load, in (0, 1]; a layer with no load counts as 1."""
    rl = rank_loads(load, placement, num_ranks=num_ranks)
    return _ratio(rl.mean(axis=1), rl.max(axis=1), 1.0)


def model_balancedness(load: Any, placement: ModelPlacement | Any, *, num_ranks: int | None = None) -> float:
    """vLLM's logged figure: sum over layers of mean rank load / sum over layers of max rank load."""
    rl = rank_loads(load, placement, num_ranks=num_ranks)
    top = float(rl.max(axis=1).sum())
    return float(rl.mean(axis=1).sum()) / top if top > 0 else 1.0


def imbalance(load: Any, placement: ModelPlacement | Any, *, num_ranks: int | None = None) -> F64:
    """``[num_layers]`` (max - mean) / mean rank load; 0 is perfect, a layer with no load counts as 0."""
    rl = rank_loads(load, placement, num_ranks=num_ranks)
    mean = rl.mean(axis=1)
    return _ratio(rl.max(axis=1) - mean, mean, 0.0)


def max_rank_load_lower_bound(load: Any, *, num_ranks: int, num_physical_experts: int) -> F64:
    """``[num_layers]`` no placement can bring the busiest rank below this.

    Three facts bound it: the busiest rank carries at least the mean, total / num_ranks; some
    replica carries at least ``m*``, the least possible max load per replica when the ``P`` slots
    are shared out (every expert needs one; the greedy "next slot to the highest load per replica"
    reaches ``m*`` exactly), and the rank holding it carries at least that; and an expert's load
    splits over at most ``num_ranks`` ranks, replicas stacked on one rank adding up.
    """
    arr = as_load_matrix(load)
    num_l, num_e = arr.shape
    if num_physical_experts < num_e:
        raise InvalidValueError(
            "num_physical_experts", f"({num_physical_experts}) must be >= num_logical_experts ({num_e})."
        )
    counts = np.ones_like(arr)
    rows = np.arange(num_l)
    for _ in range(num_physical_experts - num_e):
        counts[rows, np.argmax(arr / counts, axis=1)] += 1
    per_replica = (arr / counts).max(axis=1)
    bound = np.maximum.reduce([arr.sum(axis=1) / num_ranks, per_replica, arr.max(axis=1) / num_ranks])
    return np.asarray(bound, dtype=np.float64)


def balancedness_upper_bound(load: Any, *, num_ranks: int, num_physical_experts: int) -> F64:
    """``[num_layers]`` the best balancedness any placement could reach (mean / lower bound)."""
    arr = as_load_matrix(load)
    lb = max_rank_load_lower_bound(arr, num_ranks=num_ranks, num_physical_experts=num_physical_experts)
    return _ratio(arr.sum(axis=1) / num_ranks, lb, 1.0)


def transfer_mask(
    current: ModelPlacement | Any, target: ModelPlacement | Any, *, num_ranks: int | None = None
) -> Any:
    """``[num_layers, num_physical_experts]`` bool: the target slot's expert must come from another rank.

    A slot needs no transfer when its rank already holds the target expert in some slot of the
    current placement (a local copy or no-op); slot order within a rank is free.
    """
    cur, tgt = _p2l(current), _p2l(target)
    r = _ranks(current, num_ranks)
    if cur.shape != tgt.shape:
        raise InvalidValueError(
            "target", f"has shape {tgt.shape} but current has {cur.shape}; compare placements of one model."
        )
    if cur.shape[1] % r:
        raise InvalidValueError("num_ranks", f"must divide num_physical_experts ({cur.shape[1]}) (got {r}).")
    num_l, num_p = cur.shape
    num_e = int(max(cur.max(), tgt.max())) + 1
    rank = np.arange(num_p) // (num_p // r)
    rows = np.arange(num_l)[:, None]
    held = np.zeros((num_l, r, num_e), dtype=bool)
    held[rows, rank[None, :], cur] = True
    return ~held[rows, rank[None, :], tgt]


def slots_moved(
    current: ModelPlacement | Any, target: ModelPlacement | Any, *, num_ranks: int | None = None
) -> int:
    """Slots whose target expert must arrive from another rank, over all layers."""
    return int(transfer_mask(current, target, num_ranks=num_ranks).sum())


def bytes_moved(
    current: ModelPlacement | Any,
    target: ModelPlacement | Any,
    *,
    expert_bytes: int,
    num_ranks: int | None = None,
) -> int:
    """Bytes received over links: one expert's weights per slot that needs a transfer."""
    return slots_moved(current, target, num_ranks=num_ranks) * int(expert_bytes)


@attrs.frozen(kw_only=True)
class PlacementMetrics:
    """Summary of one placement under one load (and the move from ``current`` when given)."""

    balancedness: float  # vLLM's model-level figure (sum of means / sum of maxes)
    min_layer_balancedness: float
    mean_imbalance: float
    max_imbalance: float
    balancedness_upper_bound: float  # same aggregation, each layer at its lower bound
    slots_moved: int | None = None
    slots_moved_fraction: float | None = None
    bytes_moved: int | None = None

    def lines(self) -> list[str]:
        out = [
            f"balancedness        {self.balancedness:.4f} (model; worst layer "
            f"{self.min_layer_balancedness:.4f}; upper bound {self.balancedness_upper_bound:.4f})",
            f"imbalance           mean {self.mean_imbalance:.4f}, max {self.max_imbalance:.4f}",
        ]
        if self.slots_moved is not None:
            out.append(
                f"slots moved         {self.slots_moved} ({100 * (self.slots_moved_fraction or 0):.1f}%)"
            )
        if self.bytes_moved is not None:
            out.append(f"bytes moved         {self.bytes_moved} ({self.bytes_moved / 1e9:.2f} GB)")
        return out


def summarize(
    load: Any,
    placement: ModelPlacement,
    *,
    current: ModelPlacement | None = None,
    expert_bytes: int | None = None,
) -> PlacementMetrics:
    """Every metric above for ``placement`` (and the move from ``current``) in one value."""
    arr = as_load_matrix(load)
    rl = rank_loads(arr, placement)
    mean, top = rl.mean(axis=1), rl.max(axis=1)
    lb = max_rank_load_lower_bound(
        arr, num_ranks=placement.num_ranks, num_physical_experts=placement.num_physical_experts
    )
    moved = None if current is None else slots_moved(current, placement)
    total = placement.num_layers * placement.num_physical_experts
    imb = _ratio(top - mean, mean, 0.0)
    return PlacementMetrics(
        balancedness=float(mean.sum() / top.sum()) if top.sum() > 0 else 1.0,
        min_layer_balancedness=float(_ratio(mean, top, 1.0).min()),
        mean_imbalance=float(imb.mean()),
        max_imbalance=float(imb.max()),
        balancedness_upper_bound=float(mean.sum() / lb.sum()) if lb.sum() > 0 else 1.0,
        slots_moved=moved,
        slots_moved_fraction=None if moved is None else moved / total,
        bytes_moved=None if moved is None or expert_bytes is None else moved * int(expert_bytes),
    )
