"""eplb's vLLM policy plugin against vLLM's own default policy, on the same loads, in one run.

For each case the placement in force is the baseline's plan for the load before the drift (what
a vLLM deployment has after its last rebalance); then both policies are called as vLLM calls
them, ``rebalance_experts(window, num_replicas, num_groups, num_nodes, num_ranks, old_map)``:

- baseline: vLLM's ``DefaultEplbPolicy``, imported from vLLM's source files when ``--vllm-src``
  (or ``EPLB_VLLM_SRC``) names a tree holding them (see `tests.vllm_standin.load_vllm_source`),
  else eplb's ``deepseek`` policy (the same greedy, without vLLM's keep-slots-on-the-same-GPU
  post-pass); the run says which one ran;
- eplb: the plugin's policy class (``EPLB_POLICY`` unset: ``migration_aware``), registered over
  that baseline exactly as `eplb.integrations.vllm.register` does.

Loads: eplb's built-in DeepSeek-V3 example trace (next window after windows 0, 3, 6, and a 5%
lognormal drift of window 0), and synthetic Zipf loads at Qwen3-30B-A3B and Kimi-K2 shapes
with the drifts of ``bench/bench_planner.py`` (its generators are reused, not copied).
Reports slots needing new weights (expert changes in the slot), slots fed over links
(expert not already on the rank), balancedness on the new window, ms per call (min of repeats).
Columns and JSON entries named "vllm" are the baseline's; ``machine.baseline`` says which ran.

    python bench/bench_vllm_policy.py --vllm-src /work/engines/vllm
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_planner import DRIFTS, SHAPES, drift, machine, synthetic_load  # noqa: E402

from eplb.examples_data import load_example  # noqa: E402
from eplb.integrations.vllm import register_into  # noqa: E402
from eplb.planner import metrics  # noqa: E402
from tests.vllm_standin import load_vllm_source, standin_policy_module  # noqa: E402

Call = Callable[..., torch.Tensor]


def baseline_module(src: str | None) -> tuple[Any, str]:
    if src:
        ns = load_vllm_source(src)
        if ns is not None:
            return ns.policy, f"vLLM DefaultEplbPolicy from {ns.root}"
        print(f"no vLLM policy files under {src}; falling back to eplb's deepseek")
    return standin_policy_module(), "eplb deepseek (vLLM's files not given)"


def cases(rng: np.random.Generator) -> list[tuple[str, str, np.ndarray, np.ndarray, tuple[int, ...]]]:
    """(shape, drift, load before, load after, (num_replicas, num_groups, num_nodes, num_ranks))."""
    out = []
    ex = load_example("deepseek_v3")
    v3 = (ex.num_physical_experts, ex.num_groups, ex.num_nodes, ex.num_ranks)
    for w in (0, 3, 6):
        out.append(("v3-example", f"window {w}->{w + 1}", ex.trace[w], ex.trace[w + 1], v3))
    out.append(("v3-example", "sigma=0.05", ex.trace[0], drift(ex.trace[0], "sigma=0.05", rng), v3))
    for name in ("qwen3-30b", "kimi-k2"):
        num_l, num_e, groups, slots, ranks, nodes = SHAPES[name]
        base = synthetic_load("zipf", num_l, num_e, rng)
        for kind in DRIFTS:
            out.append((name, kind, base, drift(base, kind, rng), (slots, groups, nodes, ranks)))
    return out


def timed(fn: Callable[[], torch.Tensor], repeat: int) -> tuple[torch.Tensor, float]:
    best, out = float("inf"), None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    assert out is not None
    return out, best * 1e3


def measure(
    call: Call, load: np.ndarray, old: torch.Tensor, cfg: tuple[int, ...], repeat: int
) -> dict[str, Any]:
    weight = torch.from_numpy(load).to(torch.int32)
    new, ms = timed(lambda: call(weight, *cfg, old.clone()), repeat)
    ranks = cfg[3]
    return {
        "changed": int((new != old).sum()),
        "over_links": metrics.slots_moved(old.numpy(), new.numpy(), num_ranks=ranks),
        "balancedness": metrics.model_balancedness(load, new.numpy(), num_ranks=ranks),
        "ms": ms,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--vllm-src", default=os.environ.get("EPLB_VLLM_SRC"), help="folder holding vllm/")
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "bench_vllm_policy.json"))
    args = p.parse_args()
    logging.getLogger("vllm.eplb_plugin").setLevel(logging.WARNING)
    mod, label = baseline_module(args.vllm_src)
    baseline = mod.EPLB_POLICIES["default"]
    plugin = register_into(mod.EPLB_POLICIES, mod.AbstractEplbPolicy, env={})
    assert plugin is not None and plugin.vllm_default is baseline
    git = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    commit = git.stdout.strip()
    info = machine() | {"baseline": label, "eplb_commit": commit}
    print(f"machine: {info}")
    print(f"baseline ('base' / 'vllm' below): {label}")
    rows = []
    rng = np.random.default_rng(args.seed)
    for shape, kind, before, after, cfg in cases(rng):
        old = baseline.rebalance_experts(torch.from_numpy(before).to(torch.int32), *cfg, None)
        row: dict[str, Any] = {"shape": shape, "drift": kind, "slots": int(old.numel())}
        row["vllm"] = measure(baseline.rebalance_experts, after, old, cfg, args.repeat)
        row["eplb"] = measure(plugin.rebalance_experts, after, old, cfg, args.repeat)
        rows.append(row)
        v, e = row["vllm"], row["eplb"]
        print(
            f"{shape:10} {kind:13} slots {row['slots']:6} | new weights base {v['changed']:6} eplb "
            f"{e['changed']:6} ({e['changed'] / max(v['changed'], 1):6.1%}) | over links {v['over_links']:6} "
            f"{e['over_links']:6} | bal {v['balancedness']:.4f} {e['balancedness']:.4f} "
            f"(d {e['balancedness'] - v['balancedness']:+.4f}) | ms {v['ms']:7.1f} {e['ms']:7.1f}",
            flush=True,
        )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"machine": info, "rows": rows}, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
