"""The built-in example: a DeepSeek-V3-shaped model with skewed, drifting expert load.

No public per-expert trace of a production MoE exists, so the example is synthetic, calibrated to
the one public measurement (TensorRT-LLM on DeepSeek-R1, 32 GPUs, trivial placement of 256 experts
at 8 per rank): per-layer rank imbalance ``(max - mean) / mean`` from 0.46 to 2.46, 1.56 on
average (busiest rank 2.56x the mean), hottest expert ~12x the mean expert. Hot experts persist:
popularity drifts a little from window to window, and once, at `DATASET_SWITCH`, the traffic
changes (translation -> math) and the hot set moves more.

``load_example()`` reads the shipped ``eplb/data/deepseek_v3_trace.npz`` (token counts
``trace: [windows, layers, experts]``) and ``deepseek_v3.json`` (the model and cluster it
belongs to). ``python -m eplb.examples_data --write`` regenerates both from `SEED`; the random
numbers come from numpy's PCG64 ``random()`` (a stable stream) through transforms written here,
so the file does not depend on numpy's distribution algorithms.
"""

from __future__ import annotations

import argparse
import json
import math
from importlib import resources
from pathlib import Path
from typing import Any

import attrs
import numpy as np
import numpy.typing as npt

from eplb.ir.errors import InvalidValueError
from eplb.ir.placement import ModelPlacement
from eplb.ir.topology import Topology

__all__ = [
    "EXAMPLES",
    "Example",
    "generate_trace",
    "load_example",
    "trivial_imbalance",
]

EXAMPLES = ("deepseek_v3",)
SEED = 20261128
NUM_WINDOWS = 8
NUM_LAYERS = 58  # DeepSeek-V3's MoE layers are model layers 3..60
FIRST_LAYER = 3
NUM_EXPERTS = 256
NUM_GROUPS = 8
# One window = 50 iterations at 1024 routed tokens per rank per iteration on 32 ranks (TensorRT-LLM's
# measurement averaged 1024 per rank); 50 rather than its 100 keeps the shipped file under 300 KB.
TOKENS_PER_WINDOW = 50 * 1024 * 32
DRIFT = 0.995  # correlation of log-popularity between consecutive windows (~5-10% load drift)
DATASET_SWITCH = 5  # window where the traffic changes; correlation there
SWITCH_DRIFT = 0.6
IMBALANCE_RANGE = (0.46, 2.46)  # per layer, mean over windows; trivial placement, 8 experts/rank
IMBALANCE_MEAN = 1.56

F64 = npt.NDArray[np.float64]


@attrs.frozen(kw_only=True)
class Example:
    """A load trace and the deployment it belongs to.

    ``trace: [num_windows, num_layers, num_logical_experts]`` token counts per window.
    ``expert_bytes`` is the real expert size (fp8 weights with block scales), used for reports.
    """

    name: str
    description: str
    trace: F64 = attrs.field(eq=False, repr=False)
    num_ranks: int
    num_nodes: int
    slots_per_rank: int
    num_groups: int
    expert_bytes: int
    first_layer: int
    gpu: str
    source: str

    @property
    def num_windows(self) -> int:
        return int(self.trace.shape[0])

    @property
    def num_layers(self) -> int:
        return int(self.trace.shape[1])

    @property
    def num_logical_experts(self) -> int:
        return int(self.trace.shape[2])

    @property
    def num_physical_experts(self) -> int:
        return self.num_ranks * self.slots_per_rank

    def topology(self) -> Topology:
        """The named cluster: ``num_nodes`` nodes of H200s, default H200 bandwidths."""
        return Topology.uniform(self.num_ranks, self.slots_per_rank, self.num_nodes)

    def trivial(self) -> ModelPlacement:
        return ModelPlacement.trivial(
            num_layers=self.num_layers,
            num_logical_experts=self.num_logical_experts,
            num_physical_experts=self.num_physical_experts,
            num_ranks=self.num_ranks,
        )


def load_example(name: str = "deepseek_v3") -> Example:
    """The shipped example ``name`` (see `EXAMPLES`)."""
    if name not in EXAMPLES:
        raise InvalidValueError("name", f"must be one of {', '.join(EXAMPLES)} (got {name!r}).")
    data = resources.files("eplb") / "data"
    meta = json.loads((data / f"{name}.json").read_text())
    with resources.as_file(data / f"{name}_trace.npz") as path, np.load(path) as npz:
        trace = npz["trace"].astype(np.float64)
    return Example(trace=trace, **meta)


# --- generation ---------------------------------------------------------------------------------
def _normal(rng: np.random.Generator, shape: tuple[int, ...]) -> F64:
    """Standard normals by Box-Muller from ``random()``, whose stream numpy keeps stable."""
    u1 = 1.0 - rng.random(shape)  # (0, 1]: log is finite
    u2 = rng.random(shape)
    return np.sqrt(-2.0 * np.log(u1)) * np.cos(2.0 * math.pi * u2)


def trivial_imbalance(load: F64, experts_per_rank: int) -> F64:
    """``load: [..., E]`` -> ``[...]`` (max - mean) / mean rank load, experts in order on ranks."""
    ranks = load.reshape(*load.shape[:-1], -1, experts_per_rank).sum(axis=-1)
    mean = ranks.mean(axis=-1)
    return np.asarray((ranks.max(axis=-1) - mean) / mean, dtype=np.float64)


def _sigma_for(z: F64, target: float, experts_per_rank: int) -> float:
    """Spread of log-popularity giving ``target`` mean imbalance over the windows of one layer's
    ``z: [windows, experts]`` (bisection)."""
    lo, hi = 0.0, 4.0
    for _ in range(60):
        mid = (lo + hi) / 2
        if trivial_imbalance(np.exp(mid * z), experts_per_rank).mean() < target:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def generate_trace(seed: int = SEED) -> npt.NDArray[np.int64]:
    """``[NUM_WINDOWS, NUM_LAYERS, NUM_EXPERTS]`` token counts, calibrated as the module says.

    Per layer: log-popularity ``sigma_l * z`` with ``z`` standard normal, ``sigma_l`` chosen so that
    the layer's trivial-placement imbalance, averaged over the windows, hits its target (targets
    spread over `IMBALANCE_RANGE` with mean `IMBALANCE_MEAN`). ``z`` follows an AR(1) process across windows
    (`DRIFT`, `SWITCH_DRIFT` at `DATASET_SWITCH`); counts get Poisson-like noise.
    """
    rng = np.random.Generator(np.random.PCG64(seed))
    lo, hi = IMBALANCE_RANGE
    # Targets: evenly spaced quantiles of lo + (hi - lo) * u**p with E[u**p] = (mean - lo) / (hi - lo),
    # so the extremes are the measured ones and the average is the measured average.
    p = (hi - lo) / (IMBALANCE_MEAN - lo) - 1.0
    u = (np.arange(NUM_LAYERS) + 0.5) / NUM_LAYERS
    targets = lo + (hi - lo) * u**p
    targets[0], targets[-1] = lo, hi
    targets = targets[np.argsort(rng.random(NUM_LAYERS))]
    epr = NUM_EXPERTS // 32
    z = np.empty((NUM_WINDOWS, NUM_LAYERS, NUM_EXPERTS))
    z[0] = _normal(rng, (NUM_LAYERS, NUM_EXPERTS))
    for w in range(1, NUM_WINDOWS):
        rho = SWITCH_DRIFT if w == DATASET_SWITCH else DRIFT
        z[w] = rho * z[w - 1] + math.sqrt(1 - rho * rho) * _normal(rng, (NUM_LAYERS, NUM_EXPERTS))
    # Calibrate on the mean over windows: the measured figures are averages over iterations, and a
    # spread fitted to one window's draw would drift away from the target in the others.
    sigma = np.array([_sigma_for(z[:, layer], targets[layer], epr) for layer in range(NUM_LAYERS)])
    weight = np.exp(sigma[None, :, None] * z)
    expected = TOKENS_PER_WINDOW * weight / weight.sum(axis=2, keepdims=True)
    noisy = expected + np.sqrt(expected) * _normal(rng, expected.shape)
    counts: npt.NDArray[np.int64] = np.maximum(np.rint(noisy), 0).astype(np.int64)
    return counts


_META: dict[str, Any] = {
    "name": "deepseek_v3",
    "description": "DeepSeek-V3 shape: 58 MoE layers x 256 experts (8 groups) on 32 H200s in 4 nodes, "
    "288 slots (9 per rank); 8 windows of 50 iterations with drifting, skewed load and a "
    "traffic change at window 5 (synthetic, calibrated to TensorRT-LLM's DeepSeek-R1 measurement)",
    "num_ranks": 32,
    "num_nodes": 4,
    "slots_per_rank": 9,
    "num_groups": NUM_GROUPS,
    "expert_bytes": 44_100_000,  # DeepSeek-V3 fp8 expert: 3 x 7168 x 2048 B + block scales
    "first_layer": FIRST_LAYER,
    "gpu": "H200",
    "source": f"eplb.examples_data.generate_trace(seed={SEED})",
}


def write_example(folder: Path) -> list[Path]:
    """Write the example's files into ``folder``; returns their paths."""
    trace = generate_trace()
    if trace.max() >= 2**32:
        raise InvalidValueError("trace", "counts must fit uint32; lower TOKENS_PER_WINDOW.")
    npz = folder / "deepseek_v3_trace.npz"
    np.savez_compressed(npz, trace=trace.astype(np.uint32))
    meta = folder / "deepseek_v3.json"
    meta.write_text(json.dumps(_META, indent=1) + "\n")
    return [npz, meta]


def _main() -> None:
    parser = argparse.ArgumentParser(description="Regenerate or describe the built-in example.")
    parser.add_argument("--write", action="store_true", help="regenerate eplb/data/ from its random seed")
    args = parser.parse_args()
    if args.write:
        for path in write_example(Path(__file__).parent / "data"):
            print(f"wrote {path} ({path.stat().st_size} bytes)")
    ex = load_example()
    imb = trivial_imbalance(ex.trace, ex.num_logical_experts // ex.num_ranks)
    hot = ex.trace.max(axis=2) / ex.trace.mean(axis=2)
    print(f"{ex.name}: trace {ex.trace.shape}")
    print(
        "trivial placement (8 experts/rank) imbalance per window, mean over layers:",
        imb.mean(axis=1).round(3),
    )
    print(
        f"per-layer imbalance, mean over windows: min {imb.mean(0).min():.2f} max {imb.mean(0).max():.2f} "
        f"mean {imb.mean():.2f}"
    )
    print(f"hottest expert / mean per window, max over layers: {hot.max(axis=1).round(1)}")
    print(f"hottest expert / mean per window, median over layers: {np.median(hot, axis=1).round(1)}")


if __name__ == "__main__":
    _main()
