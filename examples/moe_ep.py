"""A small but real MoE model served with expert parallelism across processes, wired to `EplbState`.

Each MoE layer: a router (``[hidden, E]`` plus a bias that makes some experts hot), softmax
top-k gating, and experts ``x -> silu(x @ w1) @ w2`` held as batched weights over this rank's
slots: ``w1: [S, hidden, ffn]``, ``w2: [S, ffn, hidden]`` (the state's ``expert_weights[layer]``).
Dispatch is the simplest correct scheme: all-gather every rank's tokens, route every token with
`eplb.runtime.routing` (the same choice on every rank), compute the picks that land on this
rank's slots, all-reduce the outputs. Replicas hold equal weights, so the output does not depend
on the placement: `reference_forward` computes it densely from the logical weights.

Run on CPU with 4 gloo processes::

    python -m examples.moe_ep --ranks 4 --steps 60
"""

from __future__ import annotations

import argparse
import datetime
import os
from collections.abc import Sequence

import attrs
import torch
import torch.distributed as dist

from eplb.ir.placement import ModelPlacement
from eplb.runtime.routing import route_and_record

__all__ = ["ExpertParallelMoE", "MoEConfig", "logical_weights", "reference_forward"]


@attrs.frozen(kw_only=True)
class MoEConfig:
    """Model shape. ``skew`` scales the router bias that makes low-numbered experts hot."""

    num_layers: int = 3
    hidden: int = 16
    ffn: int = 32
    num_experts: int = 8
    slots_per_rank: int = 3
    top_k: int = 2
    skew: float = 2.0
    seed: int = 0
    dtype: torch.dtype = torch.float64


def logical_weights(cfg: MoEConfig) -> dict[str, torch.Tensor]:
    """Every logical expert's weights, the same on every rank (seeded).

    ``router: [L, hidden, E]``, ``bias: [L, E]``, ``w1: [L, E, hidden, ffn]``, ``w2: [L, E, ffn, hidden]``.
    """
    g = torch.Generator().manual_seed(cfg.seed)
    num_l, num_e, h, f = cfg.num_layers, cfg.num_experts, cfg.hidden, cfg.ffn

    def randn(*shape: int, scale: float) -> torch.Tensor:
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(cfg.dtype)

    # A different hot set per layer: expert e's bias falls with its distance from a layer offset.
    rank_of = (torch.arange(num_e)[None, :] + 3 * torch.arange(num_l)[:, None]) % num_e
    bias = (cfg.skew * torch.exp(-rank_of.double() / 2.0)).to(cfg.dtype)
    return {
        "router": randn(num_l, h, num_e, scale=h**-0.5),
        "bias": bias,
        "w1": randn(num_l, num_e, h, f, scale=h**-0.5),
        "w2": randn(num_l, num_e, f, h, scale=f**-0.5),
    }


def _gate(
    x: torch.Tensor, router: torch.Tensor, bias: torch.Tensor, top_k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``x: [N, hidden]`` -> (weights ``[N, top_k]`` summing to 1, logical ids ``[N, top_k]``)."""
    probs = torch.softmax(x @ router + bias, dim=-1)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    return weights / weights.sum(dim=-1, keepdim=True), ids


def reference_forward(cfg: MoEConfig, weights: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """The model on one process from the logical weights: ``x: [N, hidden]`` -> ``[N, hidden]``."""
    for layer in range(cfg.num_layers):
        gate, ids = _gate(x, weights["router"][layer], weights["bias"][layer], cfg.top_k)
        w1, w2 = weights["w1"][layer][ids], weights["w2"][layer][ids]  # [N, k, h, f], [N, k, f, h]
        y = torch.einsum("nkf,nkfh->nkh", torch.nn.functional.silu(torch.einsum("nh,nkhf->nkf", x, w1)), w2)
        x = x + (gate.unsqueeze(-1) * y).sum(dim=1)
    return x


class ExpertParallelMoE(torch.nn.Module):
    """This rank's share of the model: the router (replicated) and its slots' expert weights.

    Satisfies `eplb.runtime.model.EplbAwareModel`; ``placement`` is what the slots hold at
    start (default: the trivial placement).
    """

    def __init__(
        self,
        cfg: MoEConfig,
        *,
        rank: int,
        num_ranks: int,
        group: dist.ProcessGroup | None = None,
        placement: ModelPlacement | None = None,
        device: torch.device | str = "cpu",
    ) -> None:
        super().__init__()
        self.cfg, self.rank, self.num_ranks, self.group = cfg, rank, num_ranks, group
        w = {k: v.to(device) for k, v in logical_weights(cfg).items()}
        self.router, self.bias = w["router"], w["bias"]
        s = cfg.slots_per_rank
        if placement is None:
            placement = ModelPlacement.trivial(
                num_layers=cfg.num_layers,
                num_logical_experts=cfg.num_experts,
                num_physical_experts=s * num_ranks,
                num_ranks=num_ranks,
            )
        self._w1: list[torch.Tensor] = []
        self._w2: list[torch.Tensor] = []
        for layer in range(cfg.num_layers):
            mine = torch.tensor(placement.layers[layer].rank_slots(rank), device=device)
            self._w1.append(w["w1"][layer][mine].contiguous())
            self._w2.append(w["w2"][layer][mine].contiguous())
        self._load_pass: torch.Tensor | None = None
        self._l2p: torch.Tensor | None = None
        self._replicas: torch.Tensor | None = None

    # --- the MoEModel protocol --------------------------------------------------------------------
    @property
    def num_moe_layers(self) -> int:
        return self.cfg.num_layers

    @property
    def num_logical_experts(self) -> int:
        return self.cfg.num_experts

    @property
    def num_physical_experts(self) -> int:
        return self.cfg.slots_per_rank * self.num_ranks

    @property
    def num_local_physical_experts(self) -> int:
        return self.cfg.slots_per_rank

    @property
    def num_expert_groups(self) -> int:
        return 1

    @property
    def expert_weights(self) -> Sequence[Sequence[torch.Tensor]]:
        return [[w1, w2] for w1, w2 in zip(self._w1, self._w2, strict=True)]

    def set_eplb_state(
        self,
        expert_load_pass: torch.Tensor,
        logical_to_physical_map: torch.Tensor,
        logical_replica_count: torch.Tensor,
    ) -> None:
        self._load_pass, self._l2p, self._replicas = (
            expert_load_pass,
            logical_to_physical_map,
            logical_replica_count,
        )

    # --- forward --------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, *, record: bool = True) -> torch.Tensor:
        """``x: [n, hidden]`` (this rank's tokens, n equal on every rank) -> ``[n, hidden]``.

        ``record=False`` routes without adding to the load (checks that must not skew it).
        """
        if self._l2p is None or self._replicas is None or self._load_pass is None:
            raise RuntimeError("call EplbState.build(model, ...) first: it hands the model its routing maps")
        n, s = x.shape[0], self.cfg.slots_per_rank
        if self.group is not None:
            parts = [torch.empty_like(x) for _ in range(self.num_ranks)]
            dist.all_gather(parts, x.contiguous(), group=self.group)
            x_all = torch.cat(parts)
        else:
            x_all = x
        first = self.rank * s
        scratch = torch.zeros(s, dtype=self._load_pass.dtype, device=x.device)
        for layer in range(self.cfg.num_layers):
            gate, ids = _gate(x_all, self.router[layer], self.bias[layer], self.cfg.top_k)
            load = self._load_pass[layer] if record else scratch
            physical = route_and_record(ids, self._l2p[layer], self._replicas[layer], load, first_slot=first)
            local = physical - first
            mine = (local >= 0) & (local < s)
            # dispatch[t, slot]: gate weight of token t's picks that land on local slot `slot`.
            dispatch = torch.zeros(x_all.shape[0], s, dtype=x_all.dtype, device=x.device)
            dispatch.scatter_add_(1, local.clamp(0, s - 1), gate * mine)
            hidden = torch.nn.functional.silu(torch.einsum("nh,shf->snf", x_all, self._w1[layer]))
            y = torch.einsum("snf,sfh->snh", hidden, self._w2[layer])
            out = torch.einsum("ns,snh->nh", dispatch, y)
            if self.group is not None:
                dist.all_reduce(out, group=self.group)
            x_all = x_all + out
        return x_all[self.rank * n : (self.rank + 1) * n]


def _demo(rank: int, args: argparse.Namespace) -> None:
    from eplb.runtime.state import EplbState, RuntimeConfig

    dist.init_process_group("gloo", rank=rank, world_size=args.ranks, timeout=datetime.timedelta(seconds=60))
    cfg = MoEConfig(num_layers=args.layers, slots_per_rank=args.slots, num_experts=args.experts)
    model = ExpertParallelMoE(cfg, rank=rank, num_ranks=args.ranks, group=dist.group.WORLD)
    state = EplbState.build(
        model,
        group=dist.new_group(backend="gloo"),
        config=RuntimeConfig(window_size=args.interval, step_interval=args.interval),
    )
    g = torch.Generator().manual_seed(1000 + rank)
    for step in range(args.steps):
        x = torch.randn(args.tokens, cfg.hidden, generator=g, dtype=cfg.dtype)
        model(x)
        stats = state.step(log_stats=True)
        if rank == 0 and stats is not None and step % max(1, args.interval // 2) == 0:
            print(f"step {step:4d}: balancedness {stats['balancedness']:.3f}")
    if rank == 0:
        for report in state.reports:
            print(report)
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    parser.add_argument("--ranks", type=int, default=4)
    parser.add_argument("--layers", type=int, default=3)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--slots", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--interval", type=int, default=16)
    parser.add_argument("--steps", type=int, default=60)
    args = parser.parse_args()
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    # torch ships spawn untyped; it starts one process per rank and joins them.
    torch.multiprocessing.spawn(_demo, args=(args,), nprocs=args.ranks)  # type: ignore[attr-defined,no-untyped-call]


if __name__ == "__main__":
    main()
