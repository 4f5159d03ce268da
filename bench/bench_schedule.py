"""Benchmark compile + schedule + verify at real model shapes: rounds, staging and planner time.

For every shape of the planner benchmark (``bench/bench_planner.py``: its shapes, synthetic load
and drifts are imported, not copied) and every drift (lognormal noise of sigma 1%, 5%, 20%, and
10% of experts trading popularity), the target placement comes from a real policy through
`eplb.planner.rebalance`: ``deepseek`` and ``balanced`` re-plan from scratch (current:
their own plan before the drift), ``migration_aware`` edits the ``balanced`` plan in force.
DeepSeek-V3 also gets a random current and target (every slot changes: the worst case).

Reported per case:

- rounds of `schedule(plan)` under `default_limits` against its own lower bound (which counts the
  peer, op and staging limits: `eplb.planner.schedule.rounds_lower_bound`);
- rounds at one peer per rank per round (the textbook matching) against the max-degree bound and
  against greedy first-fit batching, what vLLM does (`vllm_first_fit_rounds`): one batch list per
  layer, each rank-pair taken in plan order into the first batch where neither rank has a peer;
- staging buffers per rank against a one-layer buffer (``slots_per_rank`` experts, what vLLM and
  SGLang allocate);
- CPU seconds to compile + schedule + verify the whole model (best of ``--repeat``; wall time
  too, in the JSON), each step timed through `eplb.planner.plan_migration`'s ``phase`` hook.

    python bench/bench_schedule.py            # all shapes, a few minutes on 2 cores
    python bench/bench_schedule.py --quick    # DeepSeek-V3 only, 5% drift and random
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.bench_planner import DRIFTS, SHAPES, drift, machine, synthetic_load  # noqa: E402
from eplb.ir import MigrationPlan, ModelPlacement, ScheduleLimits, Send  # noqa: E402
from eplb.planner import plan_migration  # noqa: E402
from eplb.planner.entry import make_topology, rebalance  # noqa: E402
from eplb.planner.schedule import layer_lower_bound, schedule  # noqa: E402

EXPERT_BYTES = {
    "v3": 44_100_000,
    "v3-ep144": 44_100_000,
    "qwen3-30b": 9_400_000,
    "kimi-k2": 44_100_000,
    "v3-no-redundancy": 44_100_000,
}


def vllm_first_fit_rounds(plan: MigrationPlan) -> tuple[int, int]:
    """(batches, max-degree lower bound) summed over layers for vLLM-style greedy batching.

    One layer at a time (vLLM runs one ``batch_isend_irecv`` chain per layer); each rank talks to
    one peer per batch; rank pairs, in the order the plan lists their first transfer, go into the
    first batch where both ranks are still free (first fit). The bound is the most distinct
    peers any rank has in the layer.
    """
    batches = bound = 0
    for lp in plan.layers:
        pairs: dict[tuple[int, int], None] = {}
        for op in lp.ops:
            if isinstance(op, Send):
                a, b = op.src_rank, op.dst_rank
                pairs.setdefault((min(a, b), max(a, b)), None)
        busy: list[set[int]] = []
        degree: dict[int, int] = {}
        for a, b in pairs:
            degree[a] = degree.get(a, 0) + 1
            degree[b] = degree.get(b, 0) + 1
            for used in busy:
                if a not in used and b not in used:
                    used.update((a, b))
                    break
            else:
                busy.append({a, b})
        batches += len(busy)
        bound += max(degree.values(), default=0)
    return batches, bound


def timed(fn: Callable[[], Any], repeat: int) -> tuple[Any, float]:
    best, out = float("inf"), None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return out, best


def random_pair(num_l: int, num_e: int, slots: int, ranks: int, rng: np.random.Generator) -> list[Any]:
    def one() -> ModelPlacement:
        rows = []
        for _ in range(num_l):
            row = np.concatenate([np.arange(num_e), rng.integers(0, num_e, slots - num_e)])
            rows.append(rng.permutation(row))
        return ModelPlacement.from_lists(rows, num_ranks=ranks, num_logical_experts=num_e)

    return [one(), one()]


def measure(
    shape: str, case: str, policy: str, cur: ModelPlacement, tgt: ModelPlacement, repeat: int
) -> dict[str, Any]:
    num_l, _, _, slots, ranks, nodes = SHAPES[shape]
    topo = make_topology(ranks, slots, nodes)
    eb = EXPERT_BYTES[shape]
    phases: dict[str, float] = {}

    @contextlib.contextmanager
    def phase(name: str) -> Iterator[None]:
        # CPU time of this process: the machine is shared, wall time is kept as well.
        t0 = time.process_time()
        yield
        phases[name] = time.process_time() - t0

    def pipeline() -> Any:
        s = plan_migration(cur, tgt, topo, eb, phase=phase)
        phases["total"] = phases["compile"] + phases["schedule"] + phases["verify"]
        return s

    best_phases: dict[str, float] = {}
    s, total, wall = None, float("inf"), 0.0
    for _ in range(repeat):
        out, secs = timed(pipeline, 1)
        if phases["total"] < total:
            s, total, wall, best_phases = out, phases["total"], secs, dict(phases)
    assert s is not None
    plan = s.plan
    one_peer = schedule(plan, ScheduleLimits(max_peers_per_round=1, staging_bytes_per_rank=None))
    ff, ff_bound = vllm_first_fit_rounds(plan)
    # A layer's rounds in the shared schedule against its own bound.
    rounds_of: dict[int, set[int]] = {}
    for k, rnd in enumerate(s.rounds):
        for op in rnd.ops():
            rounds_of.setdefault(op.layer, set()).add(k)
    layer_excess = max(
        (len(rounds_of.get(i, ())) - layer_lower_bound(plan, i, s.limits) for i in range(num_l)), default=0
    )
    layer_bytes = slots // ranks * eb
    return {
        "shape": shape,
        "case": case,
        "policy": policy,
        "layers": num_l,
        "ranks": ranks,
        "nodes": nodes,
        "transfers": plan.transfers,
        "local_copies": plan.local_copies,
        "slots_changed_fraction": float(
            (np.asarray(cur.physical_to_logical) != np.asarray(tgt.physical_to_logical)).mean()
        ),
        "rounds": s.num_rounds,
        "rounds_lower_bound": s.rounds_lower_bound,
        "max_peers_per_round": s.limits.max_peers_per_round,
        "layer_rounds_over_own_bound_max": layer_excess,
        "one_peer_rounds": one_peer.num_rounds,
        "one_peer_lower_bound": one_peer.rounds_lower_bound,
        "vllm_first_fit_batches": ff,
        "vllm_first_fit_bound": ff_bound,
        "staging_buffers_per_rank": s.staging_buffers_per_rank,
        "staging_bytes_per_rank": s.staging_bytes_per_rank,
        "one_layer_buffer_bytes": layer_bytes,
        "staging_over_one_layer": s.staging_bytes_per_rank / layer_bytes,
        "staging_budget_bytes": s.limits.staging_bytes_per_rank,
        "seconds_compile": best_phases["compile"],
        "seconds_schedule": best_phases["schedule"],
        "seconds_verify": best_phases["verify"],
        "seconds_total": total,
        "seconds_total_wall": wall,
    }


def run_shape(shape: str, drifts: list[str], args: argparse.Namespace) -> list[dict[str, Any]]:
    rng = np.random.default_rng(args.seed)
    num_l, num_e, groups, slots, ranks, nodes = SHAPES[shape]
    topo = make_topology(ranks, slots, nodes)
    load = synthetic_load("zipf", num_l, num_e, rng)
    fresh = {p: rebalance(load, topo, num_groups=groups, policy=p) for p in ("deepseek", "balanced")}
    rows = []
    for kind in drifts:
        new = drift(load, kind, rng)
        for policy in ("deepseek", "balanced", "migration_aware"):
            cur = fresh["balanced" if policy == "migration_aware" else policy]
            tgt = rebalance(new, topo, num_groups=groups, policy=policy, current=cur)
            rows.append(measure(shape, kind, policy, cur, tgt, args.repeat))
            print_row(rows[-1])
    if shape == "v3":
        cur, tgt = random_pair(num_l, num_e, slots, ranks, rng)
        rows.append(measure(shape, "random", "-", cur, tgt, args.repeat))
        print_row(rows[-1])
    return rows


HEADER = (
    f"{'shape':<10} {'case':<11} {'policy':<15} {'xfers':>6} {'rounds':>6} {'lb':>3} "
    f"{'1peer':>5} {'lb1':>4} {'vllmFF':>6} {'ffLB':>5} {'stage/rk':>8} {'1layer':>6} "
    f"{'compile':>7} {'sched':>6} {'verify':>6} {'total':>6}"
)


def print_row(r: dict[str, Any]) -> None:
    print(
        f"{r['shape']:<10} {r['case']:<11} {r['policy']:<15} {r['transfers']:>6} {r['rounds']:>6} "
        f"{r['rounds_lower_bound']:>3} {r['one_peer_rounds']:>5} {r['one_peer_lower_bound']:>4} "
        f"{r['vllm_first_fit_batches']:>6} {r['vllm_first_fit_bound']:>5} "
        f"{r['staging_buffers_per_rank']:>8} {r['one_layer_buffer_bytes'] // EXPERT_BYTES[r['shape']]:>6} "
        f"{r['seconds_compile']:>7.3f} {r['seconds_schedule']:>6.3f} {r['seconds_verify']:>6.3f} "
        f"{r['seconds_total']:>6.3f}",
        flush=True,
    )


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--quick", action="store_true", help="DeepSeek-V3 only: 5%% drift and random")
    p.add_argument("--repeat", type=int, default=2, help="timing repeats (best taken)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "bench_schedule.json"))
    args = p.parse_args()
    info = machine()  # date and load average at the start
    print(f"machine: {info}")
    shapes, drifts = (["v3"], ["sigma=0.05"]) if args.quick else (args.shapes, list(DRIFTS))
    print(HEADER)
    rows = [r for shape in shapes for r in run_shape(shape, drifts, args)]
    ratios = {
        "rounds_over_bound_max": max(r["rounds"] - r["rounds_lower_bound"] for r in rows),
        "rounds_within_bound_plus_one": f"{sum(r['rounds'] <= r['rounds_lower_bound'] + 1 for r in rows)} "
        f"of {len(rows)}",
        "one_peer_over_vllm_first_fit_mean": float(
            np.mean([r["one_peer_rounds"] / max(1, r["vllm_first_fit_batches"]) for r in rows])
        ),
        "staging_over_one_layer_max": max(r["staging_over_one_layer"] for r in rows),
        "staging_over_one_layer_mean": float(np.mean([r["staging_over_one_layer"] for r in rows])),
        "seconds_total_v3_realistic_max": max(
            (r["seconds_total"] for r in rows if r["shape"] == "v3" and r["case"] != "random"), default=0.0
        ),
    }
    info["load_average_1_5_15_at_end"] = [round(x, 2) for x in os.getloadavg()]
    if "torch" in sys.modules:  # not used by the planner; recorded if something imported it
        info["torch"] = sys.modules["torch"].__version__
    print(f"load average at end: {info['load_average_1_5_15_at_end']}")
    doc = {"machine": info, "command": " ".join(sys.argv), "ratios": ratios, "rows": rows}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1))
    print(json.dumps(ratios, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
