"""Time each phase of a rearrangement at DeepSeek-V3-like shape: eplb's flow against the seed's.

eplb: migration-aware policy from the current placement, one compile / schedule / verify of all
changed layers (layers share rounds). Seed (vLLM's ``EplbState.rearrange``): DeepSeek's greedy
re-plans from scratch, one batch per layer (here: one schedule per layer).

CPU (default): one process simulates the ranks; the planning phases (policy, compile, schedule,
verify) dominate, and the plan's bytes and rounds are reported. GPUs: under torchrun, every rank
builds an `EplbState` over synthetic expert weights and runs real rearrangements with both flows::

    python bench/bench_runtime.py                       # CPU planning phases, 32 ranks
    torchrun --nproc-per-node 4 bench/bench_runtime.py --gpu --layers 12 --expert-mb 44
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bench_planner import machine
from eplb.ir import ModelPlacement, Topology
from eplb.planner import metrics
from eplb.planner.entry import rebalance
from eplb.planner.pipeline import plan_migration


def skewed_load(num_layers: int, num_experts: int, seed: int) -> np.ndarray[Any, Any]:
    """Zipf-like per-layer loads, hottest expert ~12x the mean (TensorRT-LLM's DeepSeek-R1 figure)."""
    rng = np.random.default_rng(seed)
    ranks = np.argsort(rng.random((num_layers, num_experts)), axis=1) + 1
    return 1000.0 / ranks**0.9 + rng.uniform(0, 5, size=(num_layers, num_experts))


def drift(load: np.ndarray[Any, Any], frac: float, seed: int) -> np.ndarray[Any, Any]:
    rng = np.random.default_rng(seed)
    out: np.ndarray[Any, Any] = load * (1 + frac * rng.standard_normal(load.shape)).clip(0.0, None)
    return out


def timed(fn: Any) -> tuple[Any, float]:
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def plan_flow(
    name: str, current: ModelPlacement, load: Any, topo: Topology, expert_bytes: int
) -> dict[str, Any]:
    """Phase times of one flow, planning only (what every rank computes)."""
    row: dict[str, Any] = {"flow": name}
    if name == "eplb":
        target, row["policy_s"] = timed(
            lambda: rebalance(load, topo, current=current, policy="migration_aware")
        )
        changed = [i for i in range(current.num_layers) if current.layers[i] != target.layers[i]]
        groups = [changed] if changed else []
    else:
        target, row["policy_s"] = timed(lambda: rebalance(load, topo, policy="deepseek"))
        groups = [[i] for i in range(current.num_layers) if current.layers[i] != target.layers[i]]
    row.update(compile_s=0.0, schedule_s=0.0, verify_s=0.0, rounds=0, transfers=0)

    @contextlib.contextmanager
    def phase(name: str) -> Iterator[None]:  # sums each step's wall time into the row
        t0 = time.perf_counter()
        yield
        row[f"{name}_s"] += time.perf_counter() - t0

    for layers in groups:
        cur = ModelPlacement(layers=[current.layers[i] for i in layers])
        tgt = ModelPlacement(layers=[target.layers[i] for i in layers])
        sched = plan_migration(cur, tgt, topo, expert_bytes, phase=phase)
        row["rounds"] += sched.num_rounds
        row["transfers"] += sched.plan.transfers
    row["plan_s"] = row["policy_s"] + row["compile_s"] + row["schedule_s"] + row["verify_s"]
    row["bytes_moved"] = row["transfers"] * expert_bytes
    row["balancedness"] = metrics.model_balancedness(load, target)
    return row


def cpu_main(args: argparse.Namespace) -> dict[str, Any]:
    topo = Topology.uniform(args.ranks, args.slots // args.ranks, args.nodes)
    expert_bytes = int(args.expert_mb * 1e6)
    base = skewed_load(args.layers, args.experts, 0)
    current = rebalance(base, topo, policy="deepseek")  # a balanced placement in force
    load = drift(base, args.drift, 1)
    rows = [plan_flow(flow, current, load, topo, expert_bytes) for flow in ("eplb", "seed")]
    print(
        f"{'flow':6} {'policy':>9} {'compile':>9} {'schedule':>9} {'verify':>9} {'plan':>9} "
        f"{'rounds':>7} {'GB moved':>9} {'balanced':>9}"
    )
    for r in rows:
        print(
            f"{r['flow']:6} {r['policy_s']:9.3f} {r['compile_s']:9.3f} {r['schedule_s']:9.3f} "
            f"{r['verify_s']:9.3f} {r['plan_s']:9.3f} {r['rounds']:7d} {r['bytes_moved'] / 1e9:9.2f} "
            f"{r['balancedness']:9.4f}"
        )
    e, s = rows
    print(
        f"seed/eplb: planning time {s['plan_s'] / e['plan_s']:.2f}x, bytes "
        f"{s['bytes_moved'] / max(e['bytes_moved'], 1):.1f}x, rounds {s['rounds'] / max(e['rounds'], 1):.1f}x"
    )
    return {"rows": rows}


def gpu_main(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    import torch.distributed as dist

    from eplb.executors.synthetic import make_rank_weights, mismatches, tensor_layout
    from eplb.runtime import EplbState, RuntimeConfig

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
        dev = torch.device("cuda", torch.cuda.current_device())
        dist.init_process_group("nccl", device_id=dev)
    else:  # a CPU smoke run of the same flow (gloo); the times mean little
        dev = torch.device("cpu")
        dist.init_process_group("gloo")

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize()

    slots = args.slots // world
    topo = Topology.uniform(world, slots)
    layout = tensor_layout(int(args.expert_mb * 1e6))

    class Model:  # the MoEModel protocol over synthetic weights
        num_moe_layers, num_logical_experts = args.layers, args.experts
        num_physical_experts, num_local_physical_experts, num_expert_groups = args.slots, slots, 1

        def __init__(self, placement: ModelPlacement) -> None:
            self.expert_weights = make_rank_weights(placement, rank, slots, layout, device=dev)

    base = skewed_load(args.layers, args.experts, 0)
    start = rebalance(base, topo, policy="deepseek")
    rows: list[dict[str, Any]] = []
    for flow, config in (
        ("eplb", RuntimeConfig(window_size=1, step_interval=10**9, layers_per_chunk=args.chunk)),
        (
            "seed",
            RuntimeConfig(
                window_size=1, step_interval=10**9, policy="deepseek", layers_per_chunk=1, rollback=False
            ),
        ),
    ):
        model = Model(start)
        state = EplbState.build(model, topo, group=dist.group.WORLD, config=config, initial=start)
        t0 = time.perf_counter()
        state.profile()
        sync()
        profile_s = time.perf_counter() - t0
        for i in range(args.repeats):
            load = torch.from_numpy(drift(base, args.drift, 10 + i)).round().int()
            share = load // world  # each rank recorded a share; the all-reduce sums them back
            state.expert_load_window.zero_()
            state.expert_load_window[0].copy_(share.to(dev))
            t0 = time.perf_counter()
            rep = state.rearrange()
            sync()
            bad = mismatches(model.expert_weights, state.placement, rank)
            if bad:
                raise RuntimeError(f"rank {rank}: weights do not match the committed placement: {bad}")
            rows.append(
                {
                    "flow": flow,
                    "run": i,
                    "wall_s": time.perf_counter() - t0,
                    "profile_s": profile_s,
                    "bytes_moved": rep.bytes_moved,
                    **{f"{k}_s": v for k, v in rep.timings.items()},
                }
            )
            if rank == 0:
                print(flow, i, f"wall {rows[-1]['wall_s'] * 1e3:.1f} ms", rep)
    dist.destroy_process_group()
    return {"rows": rows, "ranks": world}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    ap.add_argument("--gpu", action="store_true", help="run real rearrangements under torchrun")
    ap.add_argument("--layers", type=int, default=58)
    ap.add_argument("--experts", type=int, default=256)
    ap.add_argument("--slots", type=int, default=288)
    ap.add_argument("--ranks", type=int, default=32)
    ap.add_argument("--nodes", type=int, default=4)
    ap.add_argument("--expert-mb", type=float, default=44.1)
    ap.add_argument("--drift", type=float, default=0.05)
    ap.add_argument("--chunk", type=int, default=None, help="layers per executor run (eplb flow)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="bench/results/bench_runtime.json")
    args = ap.parse_args()
    info = machine()  # date and load average at the start
    result = gpu_main(args) if args.gpu else cpu_main(args)
    info["load_average_1_5_15_at_end"] = [round(x, 2) for x in os.getloadavg()]
    if "torch" in sys.modules:  # the GPU flow imports it; the CPU flow does not
        info["torch"] = sys.modules["torch"].__version__
    info["args"] = vars(args)
    result["machine"] = info
    result["command"] = " ".join(sys.argv)
    if int(os.environ.get("RANK", "0")) == 0:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
