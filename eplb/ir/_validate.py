"""Single-field validators and converters with attrs' message shape: ``'x' must be >= 0 (got -1).``"""

from __future__ import annotations

import math
import operator
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

from eplb.ir.errors import InvalidValueError


def non_negative(_inst: object, attr: Any, value: int) -> None:
    if type(value) is int and value >= 0:  # fast path: plans hold ~1e5 of these
        return
    _check_int(attr.name, value)
    if value < 0:
        raise InvalidValueError(attr.name, f"must be >= 0 (got {value}).")


def positive(_inst: object, attr: Any, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidValueError(attr.name, f"must be a number (got {value!r}).")
    if not (value > 0 and math.isfinite(value)):
        raise InvalidValueError(attr.name, f"must be finite and > 0 (got {value}).")


def positive_int(_inst: object, attr: Any, value: int) -> None:
    _check_int(attr.name, value)
    if value <= 0:
        raise InvalidValueError(attr.name, f"must be > 0 (got {value}).")


def optional_positive_int(inst: object, attr: Any, value: int | None) -> None:
    if value is not None:
        positive_int(inst, attr, value)


def _check_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidValueError(name, f"must be an int (got {value!r}).")


def int_tuple(values: Iterable[Any]) -> tuple[int, ...]:
    """Accept any iterable of integers (list, tuple, numpy array) and freeze it."""
    if type(values) in (list, tuple) and all(type(v) is int for v in values):
        return tuple(values)  # fast path: placements hold ~1e4 ids per model
    tolist = getattr(values, "tolist", None)
    if tolist is not None and getattr(getattr(values, "dtype", None), "kind", "") in ("i", "u"):
        return tuple(tolist())  # numpy / torch integer arrays
    if isinstance(values, (str, bytes)):
        raise InvalidValueError("", f"expected a sequence of ints (got {values!r}).")
    out = []
    for v in values:
        if isinstance(v, (bool, float)):
            raise InvalidValueError("", f"expected a sequence of ints (got element {v!r}).")
        try:
            out.append(operator.index(v))
        except TypeError:
            raise InvalidValueError("", f"expected a sequence of ints (got element {v!r}).") from None
    return tuple(out)


# Set while the planner builds a `MigrationPlan` or `Schedule` from ops it derived from validated
# placements, topology and plan (`MigrationPlan._trusted`, `Schedule._trusted`): their ranks,
# slots, experts and buffers are in range by construction, so the per-op range scan (~1e5 ops at
# DeepSeek-V3) is skipped. A context variable, not a global switch: other threads and tasks
# building values at the same time still check everything.
_OPS_TRUSTED: ContextVar[bool] = ContextVar("eplb_ops_trusted", default=False)


def ops_trusted() -> bool:
    return _OPS_TRUSTED.get()


@contextmanager
def trusting_ops() -> Iterator[None]:
    token = _OPS_TRUSTED.set(True)
    try:
        yield
    finally:
        _OPS_TRUSTED.reset(token)
