"""Benchmark the placement policies against DeepSeek's greedy (the baseline) at real model shapes.

For every shape and skew: a fresh plan from each policy (time, balancedness, imbalance), then for
each drift (lognormal noise of sigma 1%, 5%, 20%, and 10% of experts trading popularity) a re-plan
from the plan in force: ``deepseek`` and ``balanced`` plan from scratch, ``migration_aware`` edits
the ``balanced`` plan made before the drift. Reports slots that must receive new weights.

Synthetic load (no public per-expert trace exists) is calibrated to the skew published for
DeepSeek-R1 on 32 GB200s: hottest expert ~12x the mean. Each layer draws its own load.

    python bench/bench_planner.py                 # all shapes, ~2-4 minutes on 2 cores
    python bench/bench_planner.py --shapes v3 --torch-reference
    python bench/bench_planner.py --against main.json   # main.json: a run of main's code
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from eplb.ir import ModelPlacement  # noqa: E402
from eplb.planner import metrics  # noqa: E402
from eplb.planner.entry import make_topology  # noqa: E402
from eplb.planner.policies.balanced import plan_balanced  # noqa: E402
from eplb.planner.policies.deepseek import deepseek_array, to_model_placement  # noqa: E402
from eplb.planner.policies.migration_aware import plan_migration_aware  # noqa: E402

# name: (layers, experts, groups, slots, ranks, nodes)
SHAPES: dict[str, tuple[int, int, int, int, int, int]] = {
    "v3": (58, 256, 8, 288, 32, 4),  # DeepSeek-V3/R1, EP32 over 4 nodes
    "v3-ep144": (58, 256, 8, 288, 144, 18),  # DeepSeek-V3 EP144: 8 groups do not split over 18 nodes
    "qwen3-30b": (48, 128, 1, 144, 8, 1),  # Qwen3-30B-A3B
    "kimi-k2": (60, 384, 1, 448, 64, 8),  # Kimi-K2 (n_group 1)
    "v3-no-redundancy": (58, 256, 8, 256, 32, 4),  # DeepSeek-V3 EP32, one slot per expert
}
DRIFTS = ("sigma=0.01", "sigma=0.05", "sigma=0.20", "trade=10%")
DEFAULT_TOLERANCE = 0.005  # migration_aware's default
HOT_OVER_MEAN = 12.0  # hottest expert ~12x the mean (DeepSeek-R1, TensorRT-LLM)


def _zipf_exponent(num_e: int, target: float) -> float:
    """Zipf exponent whose hottest expert is ``target`` x the mean (bisection)."""
    lo, hi = 0.0, 3.0
    ranks = np.arange(1, num_e + 1, dtype=np.float64)
    for _ in range(60):
        mid = (lo + hi) / 2
        w = ranks**-mid
        lo, hi = (mid, hi) if w[0] / w.mean() < target else (lo, mid)
    return (lo + hi) / 2


def synthetic_load(skew: str, num_l: int, num_e: int, rng: np.random.Generator) -> np.ndarray:
    """``[num_l, num_e]`` tokens per expert, each layer its own permutation of hot experts."""
    if skew == "zipf":
        s = _zipf_exponent(num_e, HOT_OVER_MEAN)
        base = np.arange(1, num_e + 1, dtype=np.float64) ** -s
        load = np.stack([rng.permutation(base) for _ in range(num_l)])
    else:  # lognormal; sigma 1.2 puts the hottest of 256 near 12x the mean
        load = rng.lognormal(0.0, 1.2, size=(num_l, num_e))
    return np.round(load / load.mean() * 4096)  # token counts, mean 4096 per expert


def drift(load: np.ndarray, kind: str, rng: np.random.Generator) -> np.ndarray:
    if kind.startswith("sigma="):
        return np.round(load * rng.lognormal(0.0, float(kind[6:]), size=load.shape))
    share = float(kind[6:].rstrip("%")) / 100
    out = load.copy()
    k = max(2, round(share * load.shape[1]))
    for layer in range(load.shape[0]):
        idx = rng.choice(load.shape[1], size=k, replace=False)
        out[layer, idx] = load[layer, rng.permutation(idx)]
    return out


def timed(fn: Callable[[], Any], repeat: int) -> tuple[Any, float]:
    times, out = [], None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return out, min(times)


def machine() -> dict[str, Any]:
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "load_average_1_5_15": [round(x, 2) for x in os.getloadavg()],
    }


def run_shape(
    name: str, skew: str, args: argparse.Namespace, rng: np.random.Generator
) -> list[dict[str, Any]]:
    num_l, num_e, groups, slots, ranks, nodes = SHAPES[name]
    topo = make_topology(ranks, slots, nodes)
    load = synthetic_load(skew, num_l, num_e, rng)
    triv = ModelPlacement.trivial(
        num_layers=num_l, num_logical_experts=num_e, num_physical_experts=slots, num_ranks=ranks
    )
    calib = {
        "hot_over_mean": float((load.max(axis=1) / load.mean(axis=1)).mean()),
        "trivial_busiest_over_mean": float((1 / metrics.balancedness(load, triv)).mean()),
    }
    rows: list[dict[str, Any]] = []

    def plan(policy: str, w: np.ndarray, current: ModelPlacement | None = None, tol: float = 0.01) -> Any:
        if policy == "deepseek":
            return to_model_placement(deepseek_array(w, topo, groups), ranks, num_e)
        if policy == "balanced":
            return to_model_placement(plan_balanced(w, topo, num_groups=groups)[0], ranks, num_e)
        if policy == "balanced-global":  # the relaxation: ignore the node hierarchy
            p2l, _ = plan_balanced(w, topo, num_groups=groups, hierarchical=False)
            return to_model_placement(p2l, ranks, num_e)
        assert current is not None
        p2l, _ = plan_migration_aware(w, topo, num_groups=groups, current=current, tolerance=tol)
        return to_model_placement(p2l, ranks, num_e)

    def record(
        case: str, policy: str, w: np.ndarray, out: ModelPlacement, secs: float, cur: Any, **kw: Any
    ) -> None:
        m = metrics.summarize(w, out, current=cur)
        ub = metrics.balancedness_upper_bound(w, num_ranks=ranks, num_physical_experts=slots)
        rows.append(
            {
                "shape": name,
                "skew": skew,
                "case": case,
                "policy": policy,
                "seconds": secs,
                "balancedness": m.balancedness,
                "min_layer_balancedness": m.min_layer_balancedness,
                "mean_imbalance": m.mean_imbalance,
                "upper_bound": float(ub.mean()),
                "slots_moved_fraction": m.slots_moved_fraction,
                **calib,
                **kw,
            }
        )

    hierarchical = nodes > 1 and groups % nodes == 0
    fresh_policies = ("deepseek", "balanced", "balanced-global") if hierarchical else ("deepseek", "balanced")
    fresh: dict[str, ModelPlacement] = {}
    for policy in fresh_policies:
        out, secs = timed(lambda p=policy: plan(p, load), args.repeat)
        fresh[policy] = out
        record("fresh", policy, load, out, secs, None)
    for kind in DRIFTS:
        new = drift(load, kind, rng)
        for policy in fresh_policies:
            out, secs = timed(lambda p=policy, w=new: plan(p, w), args.repeat)
            record(kind, policy, new, out, secs, fresh[policy])
        tols = args.tolerances if kind == "sigma=0.05" else [DEFAULT_TOLERANCE]
        for tol in tols:
            out, secs = timed(
                lambda t=tol, w=new: plan("migration_aware", w, fresh["balanced"], t), args.repeat
            )
            record(kind, "migration_aware", new, out, secs, fresh["balanced"], tolerance=tol)
    return rows


def torch_reference_time(rng: np.random.Generator) -> dict[str, Any]:
    """Time DeepSeek's original torch code (transcribed in tests/test_policies.py) at V3 shape."""
    from tests.test_policies import _torch_reference

    num_l, num_e, groups, slots, ranks, nodes = SHAPES["v3"]
    load = synthetic_load("lognormal", num_l, num_e, rng)
    topo = make_topology(ranks, slots, nodes)
    ref, secs = timed(lambda: _torch_reference(load, slots, groups, nodes, ranks).numpy(), 1)
    port, port_secs = timed(lambda: deepseek_array(load, topo, groups), 3)
    # Integer token counts tie; torch.sort is unstable past 16 items, the port is stable.
    return {
        "torch_seconds": secs,
        "numpy_port_seconds": port_secs,
        "identical_layers": int((ref == port).all(axis=1).sum()),
        "layers": num_l,
        "balancedness_torch": metrics.model_balancedness(load, ref, num_ranks=ranks),
        "balancedness_port": metrics.model_balancedness(load, port, num_ranks=ranks),
    }


def print_table(rows: list[dict[str, Any]]) -> None:
    base = {(r["shape"], r["skew"], r["case"]): r for r in rows if r["policy"] == "deepseek"}
    head = (
        f"{'shape':10} {'skew':9} {'case':11} {'policy':16} {'tol':>5} {'ms':>8} {'x ds':>6} {'bal':>7} "
        f"{'d bal':>7} {'ub':>6} {'imb':>6} {'moved':>6}"
    )
    print(head)
    print("-" * len(head))
    for r in rows:
        b = base[(r["shape"], r["skew"], r["case"])]
        moved = "" if r["slots_moved_fraction"] is None else f"{100 * r['slots_moved_fraction']:5.1f}%"
        tol = f"{r['tolerance']:.3f}" if "tolerance" in r else ""
        gap = r["balancedness"] - b["balancedness"]
        print(
            f"{r['shape']:10} {r['skew']:9} {r['case']:11} {r['policy']:16} {tol:>5} "
            f"{1e3 * r['seconds']:8.1f} {r['seconds'] / b['seconds']:6.2f} {r['balancedness']:7.4f} "
            f"{gap:+7.4f} {r['upper_bound']:6.3f} {r['mean_imbalance']:6.3f} {moved:>6}"
        )


def print_against(rows: list[dict[str, Any]], old: list[dict[str, Any]]) -> None:
    """Each re-plan of ``rows`` next to the same case of ``old``: x deepseek within each run,
    balancedness and slots moved, ``WORSE`` where either got worse."""

    def key(r: dict[str, Any]) -> tuple[Any, ...]:
        return (r["shape"], r["skew"], r["case"], r["policy"], r.get("tolerance"))

    def ds_time(rs: list[dict[str, Any]]) -> dict[tuple[Any, ...], float]:
        return {(r["shape"], r["skew"], r["case"]): r["seconds"] for r in rs if r["policy"] == "deepseek"}

    before, ds_old, ds_new = {key(r): r for r in old}, ds_time(old), ds_time(rows)
    worse = 0
    print("against the earlier run: x ds old -> new, balancedness old -> new, moved old -> new")
    for r in rows:
        o = before.get(key(r))
        if o is None or r["policy"] == "deepseek":
            continue
        case = (r["shape"], r["skew"], r["case"])
        bad = r["balancedness"] < o["balancedness"] - 1e-9
        m_old, m_new = o["slots_moved_fraction"], r["slots_moved_fraction"]
        bad |= m_new is not None and m_old is not None and m_new > m_old + 1e-12
        worse += bad
        moved = "" if m_new is None else f"{100 * m_old:6.2f}% -> {100 * m_new:6.2f}%"
        print(
            f"{r['shape']:10} {r['skew']:9} {r['case']:11} {r['policy']:16} {r.get('tolerance') or '':5} "
            f"{o['seconds'] / ds_old[case]:6.1f} -> {r['seconds'] / ds_new[case]:6.1f}  "
            f"{o['balancedness']:.4f} -> {r['balancedness']:.4f}  {moved}{'  WORSE' if bad else ''}"
        )
    print(f"worse than the earlier run in {worse} cases")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--skews", nargs="+", default=["zipf", "lognormal"], choices=["zipf", "lognormal"])
    p.add_argument("--repeat", type=int, default=3, help="timing repeats for every policy (min taken)")
    p.add_argument(
        "--tolerances",
        type=float,
        nargs="+",
        default=[0.0, 0.005, 0.01, 0.02],
        help="migration_aware tolerances tried at the 5%% drift",
    )
    p.add_argument(
        "--torch-reference", action="store_true", help="also time DeepSeek's torch original at V3 shape"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--against",
        help="JSON of an earlier run with the same --seed, --shapes and --skews (they share one "
        "random stream), e.g. of main's code: print time / deepseek's time for both and flag every "
        "case where balancedness or slots moved got worse",
    )
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "bench_planner.json"))
    args = p.parse_args()
    rng = np.random.default_rng(args.seed)
    info = machine()
    print(f"machine: {info}")
    print(
        "baseline: deepseek (DeepSeek EPLB greedy, numpy port); 'x ds' = time / deepseek's time, "
        "'d bal' = balancedness - deepseek's; moved = slots receiving new weights vs the plan in force"
    )
    rows: list[dict[str, Any]] = []
    for shape in args.shapes:
        for skew in args.skews:
            rows += run_shape(shape, skew, args, rng)
    print_table(rows)
    calib = {(r["shape"], r["skew"]): (r["hot_over_mean"], r["trivial_busiest_over_mean"]) for r in rows}
    for (shape, skew), (hot, busy) in calib.items():
        print(
            f"calibration {shape:10} {skew:9}: hottest expert {hot:5.1f}x mean; "
            f"busiest rank on trivial placement {busy:4.2f}x mean"
        )
    ref = torch_reference_time(rng) if args.torch_reference else None
    if ref:
        print(
            f"deepseek torch original at v3: {ref['torch_seconds']:.3f} s; numpy port "
            f"{1e3 * ref['numpy_port_seconds']:.1f} ms "
            f"({ref['torch_seconds'] / ref['numpy_port_seconds']:.0f}x); "
            f"identical layers {ref['identical_layers']}/{ref['layers']} (ties broken differently); "
            f"balancedness torch {ref['balancedness_torch']:.4f}, port {ref['balancedness_port']:.4f}"
        )
    bal = [r for r in rows if r["policy"] == "balanced"]
    ds = {(r["shape"], r["skew"], r["case"]): r for r in rows if r["policy"] == "deepseek"}
    worse = [
        r for r in bal if r["balancedness"] < ds[(r["shape"], r["skew"], r["case"])]["balancedness"] - 1e-12
    ]
    print(f"balanced below deepseek in {len(worse)} of {len(bal)} cases")
    if args.against:
        print_against(rows, json.loads(Path(args.against).read_text())["rows"])
    info["load_average_1_5_15_at_end"] = [round(x, 2) for x in os.getloadavg()]
    print(f"load average at end: {info['load_average_1_5_15_at_end']}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps({"machine": info, "args": vars(args), "rows": rows, "torch_reference": ref}, indent=1)
    )
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
