"""Stands in for vLLM in the plugin tests and the plugin bench (vLLM is not installed in CI).

Two things, neither of them vLLM itself:

- `standin_policy_module()`: a module with the names the plugin touches in
  ``vllm.distributed.eplb.policy``: ``AbstractEplbPolicy``, ``EPLB_POLICIES`` and a default
  policy class (which plans with eplb's ``deepseek`` policy, the plan vLLM's default makes).
- `load_vllm_source(src)`: vLLM's *real* ``distributed/eplb/policy/*.py`` and
  ``plugins/__init__.py`` imported from a source tree (e.g. ``/work/engines/vllm``), with empty
  parent packages so vLLM's heavy ``__init__`` files do not run, and two small stand-ins for what
  those files import: ``vllm.config.parallel.EPLBPolicyOption`` (vLLM's ``Literal["default"]``)
  and ``vllm.envs.VLLM_PLUGINS`` (None: load every plugin). Returns None where the files are absent.
"""

from __future__ import annotations

import importlib
import sys
import types
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Literal

import torch

from eplb.planner.entry import make_topology
from eplb.planner.policies.deepseek import deepseek_array

__all__ = ["VLLM_MODULES", "forget_vllm", "load_vllm_source", "standin_policy_module"]

VLLM_MODULES = ("vllm", "vllm.")


def standin_policy_module() -> types.ModuleType:
    """A fresh module with vLLM's policy names (see the module docstring)."""
    mod = types.ModuleType("standin_vllm_policy")

    class AbstractEplbPolicy(ABC):
        @classmethod
        @abstractmethod
        def rebalance_experts(
            cls,
            weight: torch.Tensor,
            num_replicas: int,
            num_groups: int,
            num_nodes: int,
            num_ranks: int,
            old_global_expert_indices: torch.Tensor | None = None,
        ) -> torch.Tensor: ...

    class StandinDefaultPolicy(AbstractEplbPolicy):
        calls = 0

        @classmethod
        def rebalance_experts(
            cls,
            weight: torch.Tensor,
            num_replicas: int,
            num_groups: int,
            num_nodes: int,
            num_ranks: int,
            old_global_expert_indices: torch.Tensor | None = None,
        ) -> torch.Tensor:
            cls.calls += 1
            topology = make_topology(num_ranks, num_replicas, num_nodes)
            p2l = deepseek_array(weight.double().numpy(), topology, num_groups)
            return torch.from_numpy(p2l.astype("int64"))

    mod.AbstractEplbPolicy = AbstractEplbPolicy  # type: ignore[attr-defined]
    mod.DefaultEplbPolicy = StandinDefaultPolicy  # type: ignore[attr-defined]
    mod.EPLB_POLICIES = {"default": StandinDefaultPolicy}  # type: ignore[attr-defined]
    return mod


def forget_vllm() -> dict[str, types.ModuleType]:
    """Remove every ``vllm`` module from ``sys.modules``; returns them so they can be put back."""
    gone = {k: v for k, v in sys.modules.items() if k == "vllm" or k.startswith("vllm.")}
    for k in gone:
        del sys.modules[k]
    return gone


def _package(name: str, path: Path) -> None:
    mod = types.ModuleType(name)
    mod.__path__ = [str(path)]
    sys.modules[name] = mod


def load_vllm_source(src: str | Path) -> Any:
    """vLLM's real policy and plugin modules from ``src`` (the folder holding ``vllm/``), as a
    namespace with ``policy`` and ``plugins``; None where the files are missing.

    Replaces any ``vllm`` modules in ``sys.modules``; call `forget_vllm` afterwards.
    """
    root = Path(src) / "vllm"
    if not (root / "distributed" / "eplb" / "policy" / "default.py").is_file():
        return None
    forget_vllm()
    for name, sub in (
        ("vllm", "."),
        ("vllm.distributed", "distributed"),
        ("vllm.distributed.eplb", "distributed/eplb"),
        ("vllm.config", "config"),
    ):
        _package(name, root / sub)
    parallel = types.ModuleType("vllm.config.parallel")
    parallel.EPLBPolicyOption = Literal["default"]  # type: ignore[attr-defined]
    sys.modules["vllm.config.parallel"] = parallel
    envs = types.ModuleType("vllm.envs")
    envs.VLLM_PLUGINS = None  # type: ignore[attr-defined]
    sys.modules["vllm.envs"] = envs
    policy = importlib.import_module("vllm.distributed.eplb.policy")
    plugins = importlib.import_module("vllm.plugins")
    return types.SimpleNamespace(policy=policy, plugins=plugins, root=root)
