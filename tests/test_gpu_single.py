"""Tier 3, one GPU (skipped without CUDA): what a single device can prove.

- the local executor moves CUDA weights (bf16 + uint8 tensors, fp8 views) in place to their target;
- ``cpu_staged`` across 2 and 4 gloo processes that share one GPU: device -> pinned host -> gloo ->
  host -> device with side streams, every slot ends with its target bytes, storage unchanged;
- routing on CUDA gives the same slots and the same recorded load as on CPU.

NCCL needs one GPU per rank, so p2p and alltoall are covered by tests/test_executors_gpu.py on 2+
GPUs. Run: ``python -m pytest -m gpu tests/test_gpu_single.py -v``.
"""

from __future__ import annotations

import random
from typing import Any

import pytest
import torch

from tests.multiproc import run_on_ranks, values_or_raise
from tests.test_executors_gloo import random_case

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def test_local_executor_moves_cuda_weights_in_place() -> None:
    from eplb.executors import LocalExecutor
    from eplb.executors.synthetic import expert_bytes_of, make_rank_weights, mismatches, tensor_layout
    from eplb.ir import Topology
    from eplb.planner.compile import compile_plan
    from eplb.planner.schedule import schedule as make_schedule

    device = torch.device("cuda", 0)
    layout = tensor_layout(4096 * 2 + 37, torch.bfloat16)
    eb = expert_bytes_of(layout)
    ex = LocalExecutor()
    for i in range(60):
        rng = random.Random(i)
        ranks, slots = rng.choice([(2, 3), (4, 5), (8, 2)])
        topo = Topology.uniform(ranks, slots, rng.choice([n for n in (1, 2) if ranks % n == 0]))
        cur, tgt, limits = random_case(
            rng,
            num_ranks=ranks,
            slots=slots,
            num_experts=rng.randint(ranks * slots // 2, ranks * slots),
            num_layers=rng.randint(1, 8),
        )
        sched = make_schedule(compile_plan(cur, tgt, topo, expert_bytes=eb), limits)
        weights = [make_rank_weights(cur, r, slots, layout, device) for r in range(ranks)]
        ptrs = [t.data_ptr() for w in weights for layer in w for t in layer]
        ex.run_ranks(sched, weights)
        torch.cuda.synchronize()
        for r in range(ranks):
            assert mismatches(weights[r], tgt, r, limit=3) == [], f"case {i}, rank {r}"
        assert ptrs == [t.data_ptr() for w in weights for layer in w for t in layer]


def _cpu_staged_worker(rank: int, world: int, runs: int) -> dict[str, Any]:
    from eplb.executors import CpuStagedExecutor
    from eplb.executors.synthetic import expert_bytes_of, make_rank_weights, mismatches, tensor_layout
    from eplb.ir import Topology
    from eplb.planner.compile import compile_plan
    from eplb.planner.schedule import schedule as make_schedule

    device = torch.device("cuda", 0)  # every rank shares the one GPU; gloo carries the bytes
    torch.cuda.set_device(device)
    slots = 4
    layout = tensor_layout(8192 + 37, torch.bfloat16)
    eb = expert_bytes_of(layout)
    topo = Topology.uniform(world, slots, 1)
    ex = CpuStagedExecutor(CpuStagedExecutor.Config(timeout_s=60.0))
    problems: list[str] = []
    pairs = 0
    for i in range(runs):
        rng = random.Random(1000 * world + i)
        cur, tgt, limits = random_case(
            rng,
            num_ranks=world,
            slots=slots,
            num_experts=rng.randint(world * slots // 2, world * slots),
            num_layers=rng.randint(1, 16),
        )
        sched = make_schedule(compile_plan(cur, tgt, topo, expert_bytes=eb), limits)
        weights = make_rank_weights(cur, rank, slots, layout, device)
        ptrs = [t.data_ptr() for layer in weights for t in layer]
        report = ex.run(sched, weights)
        torch.cuda.synchronize()
        pairs += cur.num_layers
        bad = mismatches(weights, tgt, rank, limit=3)
        if ptrs != [t.data_ptr() for layer in weights for t in layer]:
            bad.append("weights storage moved")
        if report.staging_bytes != sched.staging_bytes_per_rank:
            bad.append(f"staging {report.staging_bytes} != {sched.staging_bytes_per_rank}")
        if bad:
            problems.append(f"run {i}: {bad}")
    return {"pairs": pairs, "problems": problems}


@pytest.mark.parametrize("world", [2, 4])
def test_cpu_staged_on_one_shared_gpu(world: int) -> None:
    results = values_or_raise(run_on_ranks(_cpu_staged_worker, world, 25, timeout_s=300.0))
    for rank, stats in enumerate(results):
        assert stats["problems"] == [], f"rank {rank}: {stats['problems']}"
        assert stats["pairs"] >= 25


def test_routing_on_cuda_matches_cpu() -> None:
    from eplb.ir import ModelPlacement
    from eplb.runtime.routing import record_load, route

    gen = torch.Generator().manual_seed(0)
    mp = ModelPlacement.from_lists(
        [[e % 16 for e in torch.randperm(24, generator=gen).tolist()]], num_ranks=4, num_logical_experts=16
    )
    l2p = torch.as_tensor(mp.logical_to_physical_array()[0])
    counts = torch.as_tensor(mp.replica_count_array()[0])
    topk = torch.randint(0, 16, (4096, 8), generator=gen)
    slots_cpu = route(topk, l2p, counts)
    slots_gpu = route(topk.cuda(), l2p.cuda(), counts.cuda())
    assert torch.equal(slots_cpu, slots_gpu.cpu())
    load_cpu = torch.zeros(6, dtype=torch.int32)
    load_gpu = load_cpu.cuda()
    record_load(load_cpu, slots_cpu, first_slot=6)
    record_load(load_gpu, slots_gpu, first_slot=6)
    assert torch.equal(load_cpu, load_gpu.cpu())
    assert int(load_cpu.sum()) > 0
