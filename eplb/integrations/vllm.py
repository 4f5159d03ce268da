"""vLLM EPLB policy plugin: vLLM's own EPLB plans with eplb, after ``pip install eplb``.

vLLM loads the entry points of group ``vllm.general_plugins`` in every process, maybe more
than once, and calls each. `register` (the entry point) replaces the class vLLM registers as
``EPLB_POLICIES["default"]`` (vLLM's config accepts no other name) with a subclass of vLLM's
``AbstractEplbPolicy`` that plans with eplb. Call order inside vLLM::

    load_general_plugins() -> register()          # every process, any number of times
    EplbState.add_model: policy = EPLB_POLICIES["default"]
    rearrange / async worker: policy.rebalance_experts(weight, num_replicas, num_groups,
                                                       num_nodes, num_ranks, old_map)

Switches (environment, read by `register`; every rank must see the same values):

- ``EPLB_POLICY``: an eplb policy name (default ``migration_aware``), or ``vllm`` to keep vLLM's.
- ``EPLB_POLICY_OPTIONS``: a JSON object of that policy's options, e.g. ``{"tolerance": 0.01}``.
- ``EPLB_DUMP_DIR``: a folder; global rank 0 writes each rebalance's placements (and compiled
  plan) as eplb IR JSON there, for ``eplb inspect`` / ``diff`` / ``verify``.

Each rebalance logs one info line on global rank 0 (debug on the others, which plan the same).
Never takes serving down: a bad switch logs a warning and keeps vLLM's default; an error inside
a rebalance logs one warning with the reason and returns vLLM's default plan for that call.
Importing this module imports no vLLM.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, MutableMapping
from pathlib import Path
from typing import Any

import attrs
import torch

from eplb.integrations.vllm_plan import VllmPlan, plan_for_vllm
from eplb.ir.errors import InvalidValueError
from eplb.ir.serde import dumps
from eplb.planner import available_policies, compile_plan

__all__ = ["PluginConfig", "config_from_env", "make_policy_class", "register", "register_into"]

# A child of vLLM's "vllm" logger, so vLLM's handler prints it the way it prints its own lines.
logger = logging.getLogger("vllm.eplb_plugin")

KEEP_VLLM = "vllm"
DEFAULT_POLICY = "migration_aware"
EXPERT_BYTES_FOR_DUMPS = 1  # vLLM does not pass expert sizes; the dumped plan counts slots


def _sorted_dict(options: Mapping[str, Any]) -> dict[str, Any]:
    return dict(sorted(dict(options).items()))


@attrs.frozen(kw_only=True)
class PluginConfig:
    """What the plugin plans with; `config_from_env` reads it from ``EPLB_*`` variables."""

    policy: str = DEFAULT_POLICY
    options: Mapping[str, Any] = attrs.field(factory=dict, converter=_sorted_dict)
    dump_dir: Path | None = None


def config_from_env(env: Mapping[str, str] | None = None) -> PluginConfig:
    """`PluginConfig` from ``EPLB_POLICY``, ``EPLB_POLICY_OPTIONS`` and ``EPLB_DUMP_DIR``."""
    env = os.environ if env is None else env
    policy = env.get("EPLB_POLICY", "").strip() or DEFAULT_POLICY
    if policy != KEEP_VLLM and policy not in available_policies():
        raise InvalidValueError(
            "EPLB_POLICY",
            f"must be one of {', '.join((*available_policies(), KEEP_VLLM))} (got {policy!r}); "
            f"unset it for {DEFAULT_POLICY}.",
        )
    raw = env.get("EPLB_POLICY_OPTIONS", "").strip() or "{}"
    try:
        options = json.loads(raw)
    except json.JSONDecodeError:
        options = None
    if not isinstance(options, dict):
        raise InvalidValueError(
            "EPLB_POLICY_OPTIONS", f"must be a JSON object (got {raw!r}); e.g. '{{\"tolerance\": 0.01}}'."
        )
    dump = env.get("EPLB_DUMP_DIR", "").strip()
    return PluginConfig(policy=policy, options=options, dump_dir=Path(dump) if dump else None)


def _dump(plan: VllmPlan, folder: Path, seq: int) -> None:
    """Write this rebalance's IR files, each replaced atomically (a reader never sees half a file)."""
    folder.mkdir(parents=True, exist_ok=True)
    files: dict[str, Any] = {"target": plan.target}
    if plan.current is not None:
        files["current"] = plan.current
        files["plan"] = compile_plan(plan.current, plan.target, plan.topology, EXPERT_BYTES_FOR_DUMPS)
    for kind, value in files.items():
        path = folder / f"rebalance-{seq:04d}.{kind}.json"
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        tmp.write_text(dumps(value))
        os.replace(tmp, path)


def _first_rank() -> bool:
    """True on global rank 0 or without torch.distributed: every rank plans, one logs at info."""
    dist = torch.distributed
    try:
        return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0
    except Exception:  # a log level is not worth a failed rebalance
        return True


def make_policy_class(base: type, fallback: type, config: PluginConfig) -> type:
    """A subclass of vLLM's ``AbstractEplbPolicy`` (``base``) planning with eplb under ``config``;
    ``fallback`` (vLLM's default policy) plans any call eplb fails on."""
    counter = [0]

    def rebalance_experts(
        cls: type,
        weight: torch.Tensor,
        num_replicas: int,
        num_groups: int,
        num_nodes: int,
        num_ranks: int,
        old_global_expert_indices: torch.Tensor | None = None,
    ) -> torch.Tensor:
        args = (weight, num_replicas, num_groups, num_nodes, num_ranks, old_global_expert_indices)
        try:
            plan = plan_for_vllm(*args, policy=config.policy, options=config.options)
        except Exception as exc:  # never take serving down: vLLM's own plan for this call
            logger.warning(
                "eplb could not plan this rebalance (%s: %s); using vLLM's default policy for it.",
                type(exc).__name__,
                exc,
            )
            out: torch.Tensor = getattr(fallback, "rebalance_experts")(*args)  # noqa: B009
            return out
        first = _first_rank()
        logger.log(logging.INFO if first else logging.DEBUG, plan.log_line())
        counter[0] += 1
        if config.dump_dir is not None and first:  # every rank has the same plan; one writes it
            try:
                _dump(plan, config.dump_dir, counter[0])
            except Exception as exc:  # a dump is a convenience; the plan stands
                logger.warning(
                    "eplb could not dump rebalance %d to %s (%s).", counter[0], config.dump_dir, exc
                )
        return torch.from_numpy(plan.physical_to_logical.copy())

    namespace = {
        "__doc__": f"eplb's {config.policy!r} policy behind vLLM's EPLB (eplb.integrations.vllm).",
        "__module__": __name__,
        "is_eplb_plugin": True,
        "eplb_config": config,
        "vllm_default": fallback,
        "rebalance_experts": classmethod(rebalance_experts),
    }
    return type("EplbPolicy", (base,), namespace)


def register_into(
    policies: MutableMapping[str, type], base: type, env: Mapping[str, str] | None = None
) -> type | None:
    """Put eplb's policy class under ``policies["default"]``; idempotent. Returns the class in
    place, or None when vLLM's default is kept (``EPLB_POLICY=vllm`` or a bad switch)."""
    present = policies["default"]
    if getattr(present, "is_eplb_plugin", False):
        return present
    try:
        config = config_from_env(env)
    except InvalidValueError as exc:
        logger.warning("eplb plugin not enabled, vLLM's default EPLB policy stays: %s", exc)
        return None
    if config.policy == KEEP_VLLM:
        logger.info("eplb plugin: EPLB_POLICY=vllm, vLLM's default EPLB policy stays.")
        return None
    cls = make_policy_class(base, present, config)
    policies["default"] = cls
    logger.info("eplb plugin: vLLM's EPLB now plans with eplb's %r policy.", config.policy)
    return cls


def register() -> None:
    """The ``vllm.general_plugins`` entry point. Does nothing where vLLM is not importable."""
    try:
        from vllm.distributed.eplb import policy as vllm_policy  # type: ignore[import-not-found,unused-ignore]
    except ImportError as exc:
        logger.debug("eplb plugin: vLLM's EPLB policies not importable (%s); nothing registered.", exc)
        return
    register_into(vllm_policy.EPLB_POLICIES, vllm_policy.AbstractEplbPolicy)
