"""Placement policies, by name: ``load [num_layers, num_logical_experts] -> ModelPlacement``.

A policy is a callable ``(load, topology, *, num_groups, current, **options) -> ModelPlacement``
where ``load`` is a validated float64 array (see `eplb.planner.load.as_load_matrix`), ``num_groups``
divides the expert count (1 when the model has no group-limited routing) and ``current`` is the
placement in force or None, of the same model and cluster (`eplb.planner.rebalance` validates
the load and ``current`` once, so policies do not). Policies are pure: same input, same output;
inputs are never mutated.

Built in: ``deepseek`` (DeepSeek's published greedy), ``balanced`` (default without a current
placement), ``migration_aware`` (default with one). Add your own with `register_policy`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from eplb.ir.errors import InvalidValueError
from eplb.ir.placement import ModelPlacement

__all__ = ["available_policies", "get_policy", "register_policy"]


_REGISTRY: dict[str, Callable[..., ModelPlacement]] = {}

F = TypeVar("F", bound=Callable[..., ModelPlacement])


def register_policy(name: str) -> Callable[[F], F]:
    """Decorator: make ``fn`` available as ``get_policy(name)`` and ``rebalance(..., policy=name)``."""
    if not name or not name.replace("_", "").isalnum():
        raise InvalidValueError("name", f"must be letters, digits and '_' (got {name!r}).")

    def deco(fn: F) -> F:
        if name in _REGISTRY and _REGISTRY[name] is not fn:
            raise InvalidValueError(
                "name",
                f"{name!r} is already registered to {_REGISTRY[name].__qualname__}; pick another name.",
            )
        _REGISTRY[name] = fn
        return fn

    return deco


def get_policy(name: str) -> Callable[..., ModelPlacement]:
    """The policy registered as ``name``; an unknown name raises listing the available ones."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise InvalidValueError(
            "policy", f"must be one of {', '.join(available_policies())} (got {name!r})."
        ) from None


def available_policies() -> tuple[str, ...]:
    """Registered policy names, sorted."""
    return tuple(sorted(_REGISTRY))


# Registering the built-ins needs `register_policy` defined above.
from eplb.planner.policies import balanced, deepseek, migration_aware  # noqa: E402, F401
