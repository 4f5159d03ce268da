"""Validate and normalise recorded expert load into a float64 ``[num_layers, num_logical_experts]`` array.

Accepts a numpy array, a nested list, or a torch tensor (read through its own methods, so this
module never imports torch). The result is always a fresh array: callers may mutate it freely and
the input is never aliased.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

from eplb.ir.errors import InvalidValueError

__all__ = ["as_load_matrix"]


def as_load_matrix(load: Any, *, name: str = "load") -> npt.NDArray[np.float64]:
    """``load: [num_layers, num_logical_experts]`` of finite numbers >= 0, as a new float64 array.

    Raises `InvalidValueError` naming the first bad entry (NaN, inf, negative), a wrong number of
    dimensions, an empty axis, or values that are not numbers.
    """
    if type(load).__module__.startswith("torch"):
        # A tensor may live on a GPU and need grad tracking cut; its own methods handle both.
        load = load.detach().to("cpu").double().numpy()
    if isinstance(load, (str, bytes)):
        raise InvalidValueError(name, f"must be a [num_layers, num_logical_experts] array (got {load!r}).")
    try:
        arr = np.array(load, dtype=np.float64, copy=True)
    except (TypeError, ValueError) as exc:
        raise InvalidValueError(
            name,
            f"must be a rectangular [num_layers, num_logical_experts] array of numbers ({exc}); "
            "give every layer the same number of experts.",
        ) from None
    if arr.ndim != 2:
        fix = "wrap a single layer as [load]" if arr.ndim == 1 else "sum over steps or ranks first"
        raise InvalidValueError(
            name, f"must have 2 dimensions [num_layers, num_logical_experts] (got shape {arr.shape}); {fix}."
        )
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise InvalidValueError(name, f"must have at least one layer and one expert (got shape {arr.shape}).")
    bad = ~np.isfinite(arr)
    if bad.any():
        layer, expert = (int(i) for i in np.argwhere(bad)[0])
        raise InvalidValueError(
            f"{name}[{layer}, {expert}]",
            f"must be finite (got {arr[layer, expert]}; {int(bad.sum())} such entries); "
            "drop or zero the steps that recorded it.",
        )
    neg = arr < 0
    if neg.any():
        layer, expert = (int(i) for i in np.argwhere(neg)[0])
        raise InvalidValueError(
            f"{name}[{layer}, {expert}]",
            f"must be >= 0 (got {arr[layer, expert]}; {int(neg.sum())} negative entries); "
            "load is a token count per expert, check the recorder.",
        )
    return arr
