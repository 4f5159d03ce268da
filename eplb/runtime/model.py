"""What the runtime needs from a model: its MoE shape and its expert weights (no engine imports).

This is vLLM's ``MixtureOfExperts`` interface reduced to what `EplbState` reads. An engine's
model satisfies it structurally (a `typing.Protocol`), so vLLM, SGLang or a test model need no
base class and eplb needs no engine import.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import torch

from eplb.ir.errors import InvalidValueError

__all__ = ["EplbAwareModel", "MoEModel", "check_model", "expert_bytes"]


@runtime_checkable
class MoEModel(Protocol):
    """An MoE model served with expert parallelism, seen from one rank.

    ``expert_weights[layer][k]`` is the ``k``-th weight tensor of every local slot of MoE layer
    ``layer``, shaped ``[num_local_physical_experts, ...]`` (vLLM's layout: w13, w2, scales...;
    any shapes and dtypes). The runtime moves experts inside these tensors in place and never
    replaces them, so pointers captured by CUDA graphs stay valid.
    """

    @property
    def num_moe_layers(self) -> int: ...

    @property
    def num_logical_experts(self) -> int: ...

    @property
    def num_physical_experts(self) -> int: ...

    @property
    def num_local_physical_experts(self) -> int: ...

    @property
    def num_expert_groups(self) -> int:
        """Groups of group-limited routing (DeepSeek-V3: 8); 1 when the model has none."""
        ...

    @property
    def expert_weights(self) -> Sequence[Sequence[torch.Tensor]]: ...


@runtime_checkable
class EplbAwareModel(MoEModel, Protocol):
    """A model that wants the state's tensors handed over once (vLLM's ``set_eplb_state``).

    The tensors are ``expert_load_pass: [num_moe_layers, num_local_physical_experts]``,
    ``logical_to_physical_map: [num_moe_layers, num_logical_experts, max_replicas]`` and
    ``logical_replica_count: [num_moe_layers, num_logical_experts]``; their storage never changes.
    """

    def set_eplb_state(
        self,
        expert_load_pass: torch.Tensor,
        logical_to_physical_map: torch.Tensor,
        logical_replica_count: torch.Tensor,
    ) -> None: ...


def check_model(model: MoEModel, num_ranks: int) -> None:
    """Raise `InvalidValueError` naming the first shape rule ``model`` breaks on ``num_ranks`` ranks."""
    num_l, num_e = model.num_moe_layers, model.num_logical_experts
    num_p, num_s = model.num_physical_experts, model.num_local_physical_experts
    if num_l <= 0 or num_e <= 0 or num_s <= 0:
        raise InvalidValueError(
            "model",
            f"must have at least one MoE layer, logical expert and local slot (got num_moe_layers={num_l}, "
            f"num_logical_experts={num_e}, num_local_physical_experts={num_s}).",
        )
    if num_p != num_s * num_ranks:
        raise InvalidValueError(
            "model.num_physical_experts",
            f"({num_p}) must equal num_local_physical_experts ({num_s}) x num_ranks ({num_ranks}) "
            f"= {num_s * num_ranks}; pass the expert-parallel group the model was sharded for.",
        )
    if num_p < num_e:
        raise InvalidValueError(
            "model.num_physical_experts",
            f"({num_p}) must be >= num_logical_experts ({num_e}); every expert needs a slot.",
        )
    groups = model.num_expert_groups
    if groups <= 0 or num_e % groups:
        raise InvalidValueError(
            "model.num_expert_groups",
            f"({groups}) must be > 0 and divide num_logical_experts ({num_e}); use 1 without group routing.",
        )
    weights = model.expert_weights
    if len(weights) != num_l:
        raise InvalidValueError(
            "model.expert_weights",
            f"must have one entry per MoE layer, {num_l} (got {len(weights)}).",
        )
    for layer, tensors in enumerate(weights):
        if not tensors:
            raise InvalidValueError(
                f"model.expert_weights[{layer}]", "must hold at least one tensor (got 0)."
            )
        for k, t in enumerate(tensors):
            if t.dim() == 0 or t.shape[0] != num_s:
                raise InvalidValueError(
                    f"model.expert_weights[{layer}][{k}]",
                    f"must be [num_local_physical_experts={num_s}, ...] (got shape {tuple(t.shape)}).",
                )


def expert_bytes(model: MoEModel) -> int:
    """Bytes of one expert's weights (all its tensors), as the planner's cost model counts them.

    Layers must agree: the plan moves whole experts of one size.
    """
    sizes = [sum(t[0].numel() * t.element_size() for t in tensors) for tensors in model.expert_weights]
    if len(set(sizes)) > 1:
        raise InvalidValueError(
            "model.expert_weights",
            f"must give every layer's expert the same byte size (got {sorted(set(sizes))}); "
            "run one EplbState per group of equally shaped layers.",
        )
    return sizes[0]
