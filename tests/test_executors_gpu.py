"""Tier 3: p2p, alltoall and cpu_staged with NCCL on 2 and 4 GPUs (skipped without them).

Same checks as tier 2 (random layer pairs reach their target bytes, storage unchanged), plus
peak extra GPU memory measured with ``torch.cuda.max_memory_allocated`` and held to the
schedule's staging figure plus the transport buffers the executor reports, and the warm-up.
Run: ``NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
python -m pytest -m gpu tests/test_executors_gpu.py -v``.
"""

from __future__ import annotations

import random
import time
from typing import Any

import pytest
import torch

from tests.multiproc import run_on_ranks, values_or_raise
from tests.test_executors_gloo import random_case

pytestmark = pytest.mark.gpu

PAIRS = 200


def _gpu_worker(rank: int, world: int, pairs: int, seed: int) -> dict[str, Any]:
    from eplb.executors import AllToAllExecutor, CpuStagedExecutor, P2PExecutor
    from eplb.executors.synthetic import expert_bytes_of, make_rank_weights, mismatches, tensor_layout
    from eplb.ir import Topology
    from eplb.planner.compile import compile_plan
    from eplb.planner.schedule import schedule as make_schedule

    device = torch.device("cuda", rank)
    slots = 6
    # fp8-like uint8 views would be bytes anyway; bf16 + a uint8 tail exercises mixed dtypes.
    layout = tensor_layout(4096 * 2 + 37, torch.bfloat16)
    eb = expert_bytes_of(layout)
    topo = Topology.uniform(world, slots, 1)
    executors = [
        cls(cls.Config(timeout_s=60.0)) for cls in (P2PExecutor, AllToAllExecutor, CpuStagedExecutor)
    ]
    executors[0].warmup(topo)
    stats: dict[str, Any] = {"pairs": 0, "problems": [], "max_extra": {}, "seconds": {}}
    i = 0
    while stats["pairs"] < pairs and len(stats["problems"]) < 5:
        rng = random.Random(seed * 7919 + i)
        i += 1
        num_experts = rng.randint(world * slots // 2, world * slots)
        cur, tgt, limits = random_case(
            rng, num_ranks=world, slots=slots, num_experts=num_experts, num_layers=rng.randint(1, 16)
        )
        sched = make_schedule(compile_plan(cur, tgt, topo, expert_bytes=eb), limits)
        stats["pairs"] += cur.num_layers
        for j, ex in enumerate(executors):
            weights = make_rank_weights(cur, rank, slots, layout, device)
            ptrs = [t.data_ptr() for layer in weights for t in layer]
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
            t0 = time.perf_counter()
            report = ex.run(sched, weights, verified=j > 0)
            torch.cuda.synchronize(device)
            stats["seconds"][ex.name] = stats["seconds"].get(ex.name, 0.0) + time.perf_counter() - t0
            extra = torch.cuda.max_memory_allocated(device) - base
            stats["max_extra"][ex.name] = max(stats["max_extra"].get(ex.name, 0), extra)
            # The caching allocator rounds blocks up to 512 B; agreement tensors add a little.
            budget = sched.staging_bytes_per_rank + report.buffer_bytes
            slack = 512 * (len(layout) * (sched.staging_buffers_per_rank + 2) + 8) + 64 * 1024
            problems = mismatches(weights, tgt, rank, limit=3)
            if ptrs != [t.data_ptr() for layer in weights for t in layer]:
                problems.append("weights storage moved")
            if extra > budget + slack:
                problems.append(
                    f"extra GPU memory {extra} B > staging {sched.staging_bytes_per_rank} + buffers {report.buffer_bytes}"
                )
            if problems:
                stats["problems"].append(f"run {i} ({ex.name}): {problems}")
    return stats


@pytest.mark.parametrize("world", [2, 4])
def test_nccl_executors_reach_target(world: int) -> None:
    if not torch.cuda.is_available() or torch.cuda.device_count() < world:
        pytest.skip(f"needs {world} CUDA devices")
    results = values_or_raise(
        run_on_ranks(_gpu_worker, world, PAIRS, world, timeout_s=580.0, pg_timeout_s=120.0, backend="nccl")
    )
    for rank, stats in enumerate(results):
        assert stats["problems"] == [], f"rank {rank}: {stats['problems']}"
        assert stats["pairs"] >= PAIRS
    print(
        f"{world} GPUs: per-backend seconds {results[0]['seconds']}, peak extra bytes {results[0]['max_extra']}"
    )


def _failure_worker(rank: int, world: int) -> dict[str, Any]:
    from eplb.executors import ExecutionError, P2PExecutor
    from eplb.executors.synthetic import make_rank_weights
    from tests.test_executors_gloo import _failure_case

    sched, cur, _, layout = _failure_case(world)
    bad_round = next(
        k for k, rnd in enumerate(sched.rounds) if any(op.rank == 1 for op in rnd.before + rnd.after)
    )

    class Faulty(P2PExecutor):
        def copy(self, op: Any, ctx: Any) -> None:
            if ctx.rank == 1 and ctx.round == bad_round:
                raise RuntimeError("injected fault")
            super().copy(op, ctx)

    weights = make_rank_weights(cur, rank, 2, layout, torch.device("cuda", rank))
    try:
        Faulty(P2PExecutor.Config(timeout_s=10.0)).run(sched, weights)
    except ExecutionError as exc:
        return {"type": "ExecutionError", "rank": exc.rank, "round": exc.round, "message": str(exc)}
    return {"type": None}


def test_nccl_rank_raising_ends_every_rank() -> None:
    if not torch.cuda.is_available() or torch.cuda.device_count() < 2:
        pytest.skip("needs 2 CUDA devices")
    for out in values_or_raise(run_on_ranks(_failure_worker, 2, timeout_s=240.0, backend="nccl")):
        assert out["type"] == "ExecutionError" and out["rank"] == 1, out
