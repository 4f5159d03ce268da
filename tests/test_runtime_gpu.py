"""Tier 3 (GPUs, NCCL; skipped without enough CUDA devices): the example MoE model on 2 and 4
GPUs with `EplbState` over NCCL: profile run, several rearrangements, outputs equal to the dense
reference before and after each; prints the profile run's time and each rearrangement's
execute time (the first comes after the profile run opened the NCCL connections).

Run: ``python -m pytest tests/test_runtime_gpu.py -m gpu -q -s``.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.distributed as dist

from tests.multiproc import run_on_ranks, values_or_raise

pytestmark = pytest.mark.gpu
TOKENS = 64
TIMEOUT_S = 300.0


def _worker(rank: int, world: int) -> dict[str, Any]:
    from eplb.runtime import EplbState, RuntimeConfig
    from examples.moe_ep import ExpertParallelMoE, MoEConfig, logical_weights, reference_forward

    dev = torch.device("cuda", rank)  # the harness set it as the current device
    cfg = MoEConfig(num_layers=4, num_experts=4 * world, slots_per_rank=5, hidden=64, ffn=128, skew=3.0)
    model = ExpertParallelMoE(cfg, rank=rank, num_ranks=world, group=dist.group.WORLD, device=dev)
    state = EplbState.build(
        model, group=dist.new_group(backend="nccl"), config=RuntimeConfig(window_size=4, step_interval=8)
    )
    prof = state.profile()
    g = torch.Generator().manual_seed(10 + rank)
    x_fixed = torch.randn(TOKENS, cfg.hidden, generator=g, dtype=cfg.dtype).to(dev)
    parts = [torch.empty_like(x_fixed) for _ in range(world)]

    def error() -> float:
        dist.all_gather(parts, x_fixed)
        w = {k: v.to(dev) for k, v in logical_weights(cfg).items()}
        w["bias"] = model.bias
        ref = reference_forward(cfg, w, torch.cat(parts))[rank * TOKENS : (rank + 1) * TOKENS]
        return float((model(x_fixed, record=False) - ref).abs().max())

    out: dict[str, Any] = {"errors": [], "balancedness": [], "seconds": [], "moved": []}
    out["profile_s"] = prof.total_seconds
    for _ in range(2 + 8 * 3):
        n = len(state.reports)
        out["errors"].append(error())
        model(torch.randn(TOKENS, cfg.hidden, generator=g, dtype=cfg.dtype).to(dev))
        stats = state.step(log_stats=True)
        if len(state.reports) > n:
            rep = state.reports[-1]
            out["errors"].append(error())
            out["balancedness"].append((stats or {}).get("balancedness"))
            out["seconds"].append(rep.timings.get("execute", 0.0))
            out["moved"].append(rep.slots_moved)
            model.bias = torch.roll(model.bias, shifts=3, dims=1)
    return out


@pytest.mark.parametrize("world", [2, 4])
def test_rearrangements_on_gpus_keep_outputs(world: int) -> None:
    if not torch.cuda.is_available() or torch.cuda.device_count() < world:
        pytest.skip(f"needs {world} CUDA devices")
    outs = values_or_raise(
        run_on_ranks(_worker, world, timeout_s=TIMEOUT_S, pg_timeout_s=120, backend="nccl")
    )
    r0 = outs[0]
    print(
        f"\n{world} GPUs: profile {r0['profile_s']:.3f} s; execute s per rearrangement {r0['seconds']}; "
        f"slots moved {r0['moved']}"
    )
    for rank, r in enumerate(outs):
        assert max(r["errors"]) < 1e-9, (rank, r["errors"])
    assert len(r0["seconds"]) >= 3 and sum(r0["moved"]) > 0
