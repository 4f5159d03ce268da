"""Route logical top-k choices to physical slots and count the load each slot receives.

The router of an MoE layer picks logical experts; an EP engine must send each pick to one
physical slot holding that expert. With ``logical_to_physical: [num_logical_experts,
max_replicas]`` (-1 padded) and ``replica_count: [num_logical_experts]`` (vLLM's maps, one
layer's row), token ``t``'s pick of expert ``e`` goes to replica ``(t + token_offset) %
replica_count[e]``: deterministic (every rank that routes the same tokens makes the same choice,
so exactly one rank computes each pick) and even over replicas for a batch of many tokens.

Everything is vectorised torch with static shapes (no boolean indexing, no host sync), so it
runs on CPU and CUDA and can be captured in a CUDA graph.
"""

from __future__ import annotations

import torch

from eplb.ir.errors import InvalidValueError

__all__ = ["record_load", "route", "route_and_record"]


def route(
    topk_ids: torch.Tensor,
    logical_to_physical: torch.Tensor,
    replica_count: torch.Tensor,
    *,
    token_offset: int = 0,
) -> torch.Tensor:
    """Physical slot of every pick: ``topk_ids: [num_tokens, top_k]`` -> ``[num_tokens, top_k]`` int64.

    ``logical_to_physical: [num_logical_experts, max_replicas]`` and ``replica_count:
    [num_logical_experts]`` are one layer's maps (``state.logical_to_physical_map[layer]``).
    ``token_offset`` is the index of the first token in the batch the ranks agree on, so a rank
    routing a slice of a larger batch picks the same replicas as one routing the whole batch.
    """
    if topk_ids.dim() != 2:
        raise InvalidValueError(
            "topk_ids",
            f"must be [num_tokens, top_k] (got shape {tuple(topk_ids.shape)}); unsqueeze a 1-D batch.",
        )
    if logical_to_physical.dim() != 2 or replica_count.dim() != 1:
        raise InvalidValueError(
            "logical_to_physical",
            f"must be one layer's maps, [E, max_replicas] and [E] (got shapes "
            f"{tuple(logical_to_physical.shape)} and {tuple(replica_count.shape)}); index them by layer.",
        )
    ids = topk_ids.long()
    token = torch.arange(ids.shape[0], device=ids.device, dtype=torch.long).unsqueeze(1) + token_offset
    # replica_count >= 1 for every expert (a placement invariant), so the modulo is defined.
    replica = torch.remainder(token, replica_count.to(ids.device)[ids])
    return logical_to_physical.to(ids.device)[ids, replica]


def record_load(
    load: torch.Tensor,
    physical_ids: torch.Tensor,
    *,
    first_slot: int = 0,
    token_mask: torch.Tensor | None = None,
) -> None:
    """Add each pick of slots ``first_slot .. first_slot + len(load) - 1`` to ``load`` in place.

    ``load: [num_local_slots]`` (one layer's row of ``state.expert_load_pass``);
    ``physical_ids: [num_tokens, top_k]`` from `route`. Picks of other ranks' slots are ignored;
    ``token_mask: [num_tokens]`` (True = real token) drops padding tokens of a padded batch.
    """
    if load.dim() != 1:
        raise InvalidValueError(
            "load", f"must be one layer's [num_local_slots] row (got shape {tuple(load.shape)})."
        )
    num_slots = load.shape[0]
    local = physical_ids.to(load.device).long() - first_slot
    hit = (local >= 0) & (local < num_slots)
    if token_mask is not None:
        hit = hit & token_mask.to(load.device).reshape(-1, *([1] * (local.dim() - 1)))
    # Out-of-range picks are clamped into range with weight 0: static shapes, no host sync.
    load.scatter_add_(0, local.clamp(0, num_slots - 1).reshape(-1), hit.reshape(-1).to(load.dtype))


def route_and_record(
    topk_ids: torch.Tensor,
    logical_to_physical: torch.Tensor,
    replica_count: torch.Tensor,
    load: torch.Tensor,
    *,
    first_slot: int,
    token_offset: int = 0,
    token_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """`route`, then `record_load` of this rank's slots; returns ``[num_tokens, top_k]`` slots."""
    physical = route(topk_ids, logical_to_physical, replica_count, token_offset=token_offset)
    record_load(load, physical, first_slot=first_slot, token_mask=token_mask)
    return physical
