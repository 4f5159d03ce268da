"""Tier 3, one GPU (skipped without CUDA): what a single device can prove.

- the local executor moves CUDA weights (bf16 + uint8 tensors, fp8 views) in place to their target;
- ``cpu_staged`` across 2 and 4 gloo processes that share one GPU: device -> pinned host -> gloo ->
  host -> device with side streams, every slot ends with its target bytes, storage unchanged;
- routing on CUDA gives the same slots and the same recorded load as on CPU;
- `EplbState` on CUDA weights across 2 gloo processes sharing the GPU (``cpu_staged``): a CUDA
  graph of the MoE layers captured before the first rearrangement, replayed after each, gives the
  eager result on the new placement and the same model output (maps and weights change in place).

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


def _partial_layers(model: Any, x: torch.Tensor) -> torch.Tensor:
    """This rank's experts' share of every MoE layer's output for input ``x`` (no collectives, so
    it can be captured in a CUDA graph): ``[num_layers, N, hidden]``."""
    from eplb.runtime.routing import route
    from examples.moe_ep import _gate

    cfg, s = model.cfg, model.cfg.slots_per_rank
    first = model.rank * s
    outs = []
    for layer in range(cfg.num_layers):
        gate, ids = _gate(x, model.router[layer], model.bias[layer], cfg.top_k)
        local = route(ids, model._l2p[layer], model._replicas[layer]) - first
        mine = (local >= 0) & (local < s)
        dispatch = torch.zeros(x.shape[0], s, dtype=x.dtype, device=x.device)
        dispatch.scatter_add_(1, local.clamp(0, s - 1), gate * mine)
        hidden = torch.nn.functional.silu(torch.einsum("nh,shf->snf", x, model._w1[layer]))
        outs.append(
            torch.einsum("ns,snh->nh", dispatch, torch.einsum("snf,sfh->snh", hidden, model._w2[layer]))
        )
    return torch.stack(outs)


def _runtime_graph_worker(rank: int, world: int, device_type: str) -> dict[str, Any]:
    import torch.distributed as dist

    from eplb.runtime import EplbState, RuntimeConfig
    from examples.moe_ep import ExpertParallelMoE, MoEConfig

    dev = torch.device(device_type, 0) if device_type == "cuda" else torch.device("cpu")
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    cfg = MoEConfig(num_layers=3, num_experts=4 * world, slots_per_rank=5, hidden=64, ffn=128, skew=3.0)
    # group=None: every rank routes the same full batch and computes its own slots' share; the
    # shares are summed over gloo below (gloo cannot carry this model's CUDA all_gather).
    model = ExpertParallelMoE(cfg, rank=rank, num_ranks=world, group=None, device=dev)
    state = EplbState.build(
        model,
        group=dist.group.WORLD,
        config=RuntimeConfig(window_size=4, step_interval=8, executor="cpu_staged"),
    )
    state.profile()
    x = torch.randn(128, cfg.hidden, generator=torch.Generator().manual_seed(7), dtype=cfg.dtype).to(dev)

    def total(part: torch.Tensor) -> torch.Tensor:
        t = part.cpu()
        dist.all_reduce(t)
        return t

    if dev.type == "cuda":
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                _partial_layers(model, x)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = _partial_layers(model, x)

        def replay() -> torch.Tensor:
            graph.replay()
            torch.cuda.synchronize()
            return static_out.clone()
    else:

        def replay() -> torch.Tensor:
            return _partial_layers(model, x)

    before = total(replay())
    traffic = torch.Generator().manual_seed(11)  # the same batches on every rank
    out: dict[str, Any] = {"rearrangements": 0, "moved": 0, "graph_vs_eager": [], "output_drift": []}
    for _ in range(40):
        n = len(state.reports)
        model(torch.randn(128, cfg.hidden, generator=traffic, dtype=cfg.dtype).to(dev))
        state.step()
        if len(state.reports) > n:
            graph_out = replay()
            eager = _partial_layers(model, x)
            out["rearrangements"] += 1
            out["moved"] += state.reports[-1].slots_moved
            out["graph_vs_eager"].append(float((graph_out - eager).abs().max()))
            out["output_drift"].append(float((total(graph_out) - before).abs().max()))
            model.bias.copy_(torch.roll(model.bias, shifts=3, dims=1))  # move the hot set, in place
            before = total(replay())
    return out


def test_runtime_on_shared_gpu_keeps_cuda_graphs_valid() -> None:
    results = values_or_raise(run_on_ranks(_runtime_graph_worker, 2, "cuda", timeout_s=300.0))
    for rank, r in enumerate(results):
        assert r["rearrangements"] >= 3 and r["moved"] > 0, (rank, r)
        assert max(r["graph_vs_eager"]) == 0.0, (rank, r["graph_vs_eager"])
        assert max(r["output_drift"]) < 1e-9, (rank, r["output_drift"])
