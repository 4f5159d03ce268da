"""Executors on real hardware: NCCL ceiling, then a DeepSeek-V3-sized migration through every backend.

Run (one process per GPU; keep the NVLS variables set on the lent machines):

    NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 \\
        torchrun --nproc-per-node 4 bench/bench_executors.py --out bench_executors_4gpu.json

What it measures, in one run:
1. the raw NCCL ceiling: one large ``batch_isend_irecv`` ring per rank, and one group to all
   peers (GB/s per rank per direction, median of ``--repeat``);
2. placements: 256 logical experts + 32 redundant (288 slots) over the ranks; loads drawn from
   a Zipf-like skew (seeded); the current placement from ``rebalance`` on that load, then a 5%
   drift of the load, re-planned migration-aware (``current=``) and from scratch;
3. each placement pair compiled, scheduled (all peers per round on one node, at most
   ``256 // num_tensors`` transfers per group since every expert is ``num_tensors`` NCCL calls)
   and verified once, then run by p2p, alltoall, cpu_staged and a vLLM-like baseline (each
   layer's transfers in one ``batch_isend_irecv`` into a one-layer buffer, then copied into
   place: `vllm_like_schedule`, run by the p2p backend's loop): the first run after
   ``P2PExecutor.warmup`` (cold) apart from ``--repeat`` warm runs;
   every run is followed by the reverse migration (untimed) so each starts from the same state;
4. for each: wall time (slowest rank), busiest rank's bytes / wall (GB/s per rank), share of
   the ceiling, ms per layer, and peak extra GPU memory (``max_memory_allocated`` above the
   weights).

Experts are three fp8 (uint8) matrices and two fp32 block-scale tensors: w13 [4096, 7168], w2
[7168, 2048], scales [32, 56] and [56, 16], 44.05 MB. Layers default to 4 per GPU (16 on 4 GPUs,
~51 GB of weights per GPU). ``--device cpu`` runs the same code on gloo for a smoke test.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time
from typing import Any

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from eplb.executors import AllToAllExecutor, CpuStagedExecutor, Executor, P2PExecutor
from eplb.executors.base import RunReport
from eplb.ir import ModelPlacement, Round, Schedule, ScheduleLimits, Topology
from eplb.ir.ops import Copy, Loc, Recv, Send
from eplb.ir.plan import MigrationPlan

NUM_EXPERTS, NUM_SLOTS = 256, 288
EXPERT_SHAPES = (
    ((4096, 7168), torch.uint8),
    ((7168, 2048), torch.uint8),
    ((32, 56), torch.float32),
    ((56, 16), torch.float32),
)


def log(msg: str) -> None:
    if dist.get_rank() == 0:
        print(msg, flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    dist.barrier()


def slowest(seconds: float) -> float:
    t = torch.tensor([seconds], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=_cpu_group())
    return float(t.item())


_CPU_GROUP: Any = None


def _cpu_group() -> Any:
    global _CPU_GROUP
    if _CPU_GROUP is None:
        _CPU_GROUP = dist.new_group(backend="gloo")
    return _CPU_GROUP


# --- 1. ceiling ---------------------------------------------------------------------------------
def ceiling(device: torch.device, nbytes: int, repeat: int) -> dict[str, float]:
    """GB/s per rank per direction: a ring (one peer each way) and one group to all peers."""
    rank, world = dist.get_rank(), dist.get_world_size()
    out: dict[str, float] = {}
    if world < 2:
        return out
    send = torch.empty(nbytes, dtype=torch.uint8, device=device)
    recv = torch.empty_like(send)
    peers = [p for p in range(world) if p != rank]
    chunk = nbytes // len(peers)
    cases = {
        "ring": lambda: [
            dist.P2POp(dist.isend, send, (rank + 1) % world),
            dist.P2POp(dist.irecv, recv, (rank - 1) % world),
        ],
        "all_peers": lambda: [
            op
            for i, p in enumerate(peers)
            for op in (
                dist.P2POp(dist.isend, send[i * chunk : (i + 1) * chunk], p),
                dist.P2POp(dist.irecv, recv[i * chunk : (i + 1) * chunk], p),
            )
        ],
    }
    for name, make in cases.items():
        times = []
        for i in range(repeat + 1):
            sync(device)
            t0 = time.perf_counter()
            for w in dist.batch_isend_irecv(make()):
                w.wait()
            sync(device)
            if i:  # the first connects
                times.append(slowest(time.perf_counter() - t0))
        sent = nbytes if name == "ring" else chunk * len(peers)
        out[name] = sent / statistics.median(times) / 1e9
    return out


# --- 2. placements ------------------------------------------------------------------------------
def placements(num_layers: int, topo: Topology, seed: int) -> dict[str, Any]:
    """current, and targets after a 5% load drift: migration-aware and from scratch."""
    import numpy as np

    rng = np.random.default_rng(seed)
    ranks = np.argsort(rng.random((num_layers, NUM_EXPERTS)), axis=1) + 1
    load = 1000.0 / ranks**1.2
    drift = load * (1 + 0.05 * rng.standard_normal(load.shape))
    drift = np.clip(drift, 0, None)
    try:
        from eplb.planner.entry import rebalance

        current = rebalance(load, topo)
        aware = rebalance(drift, topo, current=current)
        scratch = rebalance(drift, topo)
        source = "eplb.planner.rebalance (balanced; migration_aware with current=)"
    except ImportError:
        # Documented stand-in: scratch re-places every slot at random, aware changes 5% of slots.
        perm = [list(rng.permutation(NUM_SLOTS) % NUM_EXPERTS) for _ in range(num_layers)]
        current = ModelPlacement.from_lists(perm, num_ranks=topo.num_ranks, num_logical_experts=NUM_EXPERTS)
        scratch = ModelPlacement.from_lists(
            [list(rng.permutation(NUM_SLOTS) % NUM_EXPERTS) for _ in range(num_layers)],
            num_ranks=topo.num_ranks,
            num_logical_experts=NUM_EXPERTS,
        )
        rows = []
        for row in perm:
            row = list(row)
            idx = rng.choice(NUM_SLOTS, size=NUM_SLOTS // 20, replace=False)
            vals = [row[i] for i in idx]
            vals = vals[1:] + vals[:1]
            for i, v in zip(idx, vals, strict=True):
                row[i] = v
            rows.append(row)
        aware = ModelPlacement.from_lists(rows, num_ranks=topo.num_ranks, num_logical_experts=NUM_EXPERTS)
        source = "synthetic drift (no eplb.planner.rebalance)"
    return {"current": current, "aware": aware, "scratch": scratch, "source": source}


def make_schedule(cur: ModelPlacement, tgt: ModelPlacement, topo: Topology, expert_bytes: int) -> Schedule:
    import attrs

    from eplb.planner import plan_migration
    from eplb.planner.schedule import default_limits

    def limits(plan: MigrationPlan) -> ScheduleLimits:
        return attrs.evolve(default_limits(plan), max_ops_per_group=max(1, 256 // len(EXPERT_SHAPES)))

    return plan_migration(cur, tgt, topo, expert_bytes, limits)


# --- 3. the vLLM-like baseline --------------------------------------------------------------------
def vllm_like_schedule(schedule: Schedule) -> Schedule:
    """What vLLM's ``rearrange_expert_weights_inplace`` does on ``schedule``'s placements, as a
    schedule of one round per layer (the schedule's own rounds are ignored).

    Per layer and rank: experts it needs that it already holds are copied into a one-layer buffer
    (``before``); the others are received once per rank into that buffer from a holder (rotating
    over holders), in one group (``transfers``); then the buffer is copied into the slots whose
    expert changed (``after``). The staging pool is one layer: ``slots_per_rank`` experts.
    """
    plan = schedule.plan
    s, num_ranks = plan.topology.slots_per_rank, plan.topology.num_ranks
    rounds = []
    for layer in range(plan.num_layers):
        cur = plan.current.layers[layer].physical_to_logical
        tgt = plan.target.layers[layer].physical_to_logical
        holders: dict[int, list[int]] = {}
        for p, e in enumerate(cur):
            holders.setdefault(e, []).append(p)
        before: list[Copy] = []
        transfers: list[Send | Recv] = []
        after: list[Copy] = []
        for me in range(num_ranks):
            local_slot = {e: i for i, e in enumerate(cur[me * s : (me + 1) * s])}
            changed = [i for i in range(s) if tgt[me * s + i] != cur[me * s + i]]
            first_slot: dict[int, int] = {}
            for i in changed:
                e = tgt[me * s + i]
                if e in local_slot:
                    src_loc = Loc.slot(local_slot[e])
                    before.append(Copy(layer=layer, rank=me, src=src_loc, dst=Loc.buffer(i), expert=e))
                elif e not in first_slot:
                    first_slot[e] = i
                    hs = holders[e]
                    src = hs[me % len(hs)]  # a holder, rotating over them
                    transfers += _fetch(layer, len(transfers), src, s, me, i, e)
                else:
                    after.append(
                        Copy(layer=layer, rank=me, src=Loc.buffer(first_slot[e]), dst=Loc.buffer(i), expert=e)
                    )
            after += [
                Copy(layer=layer, rank=me, src=Loc.buffer(i), dst=Loc.slot(i), expert=tgt[me * s + i])
                for i in changed
            ]
        rounds.append(Round(before=before, transfers=transfers, after=after))
    return Schedule(
        plan=plan, limits=schedule.limits, rounds=rounds, rounds_lower_bound=0, staging_buffers_per_rank=s
    )


def _fetch(layer: int, tid: int, src: int, s: int, me: int, i: int, e: int) -> tuple[Send, Recv]:
    """Expert ``e`` from global slot ``src`` into buffer ``i`` of rank ``me``."""
    ends = {"layer": layer, "transfer_id": tid, "src_rank": src // s, "dst_rank": me, "expert": e}
    return Send(**ends, src=Loc.slot(src % s)), Recv(**ends, dst=Loc.buffer(i))


class VllmLikeExecutor(P2PExecutor):
    """The p2p backend run on `vllm_like_schedule`: vLLM's per-layer algorithm through the same
    loop, hooks and agreement as every backend (so the comparison is of schedules alone)."""

    name = "vllm_like"

    def run(
        self,
        schedule: Schedule,
        weights: Any,
        group: Any = None,
        *,
        rank: int | None = None,
        verified: bool = False,
    ) -> RunReport:
        # Its transfers are not the plan's (other sources), so `verify` would refuse them; the
        # benchmark checks the weights instead.
        return super().run(vllm_like_schedule(schedule), weights, group, rank=rank, verified=True)


# --- 4. timing ------------------------------------------------------------------------------------
def time_run(
    ex: Executor, sched: Schedule, back: Schedule, weights: Any, device: torch.device
) -> dict[str, Any]:
    sync(device)
    base = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    report = ex.run(sched, weights, verified=True)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    wall = time.perf_counter() - t0
    peak = (torch.cuda.max_memory_allocated(device) - base) if device.type == "cuda" else -1
    dist.barrier()
    ex.run(back, weights, verified=True)  # restore the current placement, untimed
    moved = max(report.bytes_sent, report.bytes_received)
    t = torch.tensor([wall, moved, peak], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=_cpu_group())
    return {"wall_s": t[0].item(), "busiest_bytes": int(t[1].item()), "peak_extra_bytes": int(t[2].item())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="JSON file for the results (written by rank 0)")
    ap.add_argument("--layers", type=int, default=None, help="MoE layers (default 4 per GPU)")
    ap.add_argument("--repeat", type=int, default=3, help="warm runs per executor")
    ap.add_argument("--ceiling-mb", type=int, default=1024, help="bytes per rank in the ceiling test (MiB)")
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    ap.add_argument("--scale", type=float, default=1.0, help="shrink experts (smoke tests: 0.001)")
    ap.add_argument("--executors", default="p2p,p2p_noagree,alltoall,cpu_staged,vllm_like")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    cuda = args.device == "cuda"
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(seconds=600))
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    num_layers = args.layers or 4 * world
    shapes = [((max(1, int(a * args.scale)), b), dt) for (a, b), dt in EXPERT_SHAPES]
    expert_bytes = sum(a * b * torch.empty((), dtype=dt).element_size() for (a, b), dt in shapes)
    slots = NUM_SLOTS // world
    topo = Topology.uniform(world, slots)
    result: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(device) if cuda else "cpu",
        "num_gpus": world if cuda else 0,
        "torch": torch.__version__,
        "nccl": ".".join(map(str, torch.cuda.nccl.version())) if cuda else None,
        "layers": num_layers,
        "slots_per_rank": slots,
        "expert_bytes": expert_bytes,
        "command": " ".join(sys.argv),
    }
    log(
        f"eplb bench: {world} ranks on {result['device']}, {num_layers} layers x {NUM_SLOTS} slots x "
        f"{expert_bytes / 1e6:.2f} MB"
    )

    result["ceiling_gbps"] = ceiling(device, args.ceiling_mb << 20, args.repeat)
    ceil = max(result["ceiling_gbps"].values(), default=float("nan"))
    log(f"ceiling GB/s per rank: {result['ceiling_gbps']}")

    pl = placements(num_layers, topo, args.seed)
    result["placements"] = pl["source"]
    weights = [
        [torch.empty((slots, *shape), dtype=dt, device=device) for shape, dt in shapes]
        for _ in range(num_layers)
    ]
    executors: dict[str, Executor] = {
        "p2p": P2PExecutor(P2PExecutor.Config(timeout_s=600)),
        # The same without the per-round agreement: the difference is what failure detection costs.
        "p2p_noagree": P2PExecutor(P2PExecutor.Config(timeout_s=600, agree_every_round=False)),
        "alltoall": AllToAllExecutor(AllToAllExecutor.Config(timeout_s=600)),
        "cpu_staged": CpuStagedExecutor(CpuStagedExecutor.Config(timeout_s=600)),
        "vllm_like": VllmLikeExecutor(),
    }
    chosen = [n for n in args.executors.split(",") if n]
    result["runs"] = {}
    for kind in ("aware", "scratch"):
        t0 = time.perf_counter()
        fwd = make_schedule(pl["current"], pl[kind], topo, expert_bytes)
        back = make_schedule(pl[kind], pl["current"], topo, expert_bytes)
        plan_s = time.perf_counter() - t0
        info: dict[str, Any] = {
            "transfers": fwd.plan.transfers,
            "bytes_moved": fwd.plan.bytes_moved,
            "rounds": fwd.num_rounds,
            "rounds_lower_bound": fwd.rounds_lower_bound,
            "staging_bytes_per_rank": fwd.staging_bytes_per_rank,
            "plan_seconds_rank0": plan_s,
            "executors": {},
        }
        log(f"{kind}: {fwd}")
        for name in chosen:
            ex = executors[name]
            if isinstance(ex, P2PExecutor):
                sync(device)
                t0 = time.perf_counter()
                ex.warmup(topo, device=device)
                sync(device)
                info.setdefault("warmup_s", slowest(time.perf_counter() - t0))
            cold = time_run(ex, fwd, back, weights, device)
            warm = [time_run(ex, fwd, back, weights, device) for _ in range(args.repeat)]
            wall = statistics.median(w["wall_s"] for w in warm)
            busiest = warm[0]["busiest_bytes"]
            gbps = busiest / wall / 1e9 if wall > 0 else float("nan")
            row = {
                "cold_s": cold["wall_s"],
                "warm_s": wall,
                "warm_all_s": [w["wall_s"] for w in warm],
                "cold_over_warm": cold["wall_s"] / wall if wall > 0 else float("nan"),
                "busiest_rank_bytes": busiest,
                "gbps_per_rank": gbps,
                "share_of_ceiling": gbps / ceil if ceil == ceil else None,
                "ms_per_layer": wall / num_layers * 1e3,
                "peak_extra_bytes": max(w["peak_extra_bytes"] for w in [cold, *warm]),
            }
            info["executors"][name] = row
            log(
                f"  {name:10s} cold {cold['wall_s'] * 1e3:8.1f} ms  warm {wall * 1e3:8.1f} ms  "
                f"{gbps:7.1f} GB/s/rank ({(row['share_of_ceiling'] or 0) * 100:5.1f}% of ceiling)  "
                f"{row['ms_per_layer']:6.2f} ms/layer  peak extra {row['peak_extra_bytes'] / 1e9:6.2f} GB"
            )
        result["runs"][kind] = info
    if rank == 0:
        with open(args.out, "w", encoding="utf-8") as fh:
            json.dump(result, fh, indent=1)
        print(f"wrote {args.out}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
