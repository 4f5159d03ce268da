"""Draw per-rank load before and after rebalancing the built-in example (docs/img/rank_load.png).

    python bench/plot_rank_load.py [--out PATH] [--window 7] [--layer L]

Writes to ``$TMPDIR/eplb-rank_load.png`` unless ``--out`` is given, so that a run does not replace
the tracked picture; ``--out docs/img/rank_load.png`` redraws it.

Window ``--window`` of the DeepSeek-V3-shaped example (eplb/data/), on its 32 ranks, the layer with
the median trivial-placement imbalance unless ``--layer`` is given: rank load under the trivial
placement, and under the ``balanced`` policy planned on the previous window (what an engine that
rebalances every window serves). Needs matplotlib (only this script does).
"""

from __future__ import annotations

import argparse
import os
import tempfile

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from eplb.examples_data import load_example
from eplb.planner.entry import rebalance
from eplb.planner.metrics import balancedness, rank_loads


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out",
        default=os.path.join(tempfile.gettempdir(), "eplb-rank_load.png"),
        help="PNG to write (default: eplb-rank_load.png in the temporary folder; "
        "docs/img/rank_load.png redraws the tracked picture)",
    )
    parser.add_argument("--window", type=int, default=7)
    parser.add_argument("--layer", type=int, default=None)
    args = parser.parse_args()
    ex = load_example()
    load = ex.trace[args.window]
    trivial = ex.trivial()
    planned = rebalance(ex.trace[args.window - 1], ex.topology(), num_groups=ex.num_groups, policy="balanced")
    before, after = rank_loads(load, trivial), rank_loads(load, planned)
    b_before, b_after = balancedness(load, trivial), balancedness(load, planned)
    layer = args.layer if args.layer is not None else int(np.argsort(b_before)[len(b_before) // 2])
    mean = before[layer].mean()
    fig, ax = plt.subplots(figsize=(9, 3.6))
    x = np.arange(ex.num_ranks)
    ax.bar(
        x - 0.2,
        before[layer] / mean,
        width=0.4,
        label=f"trivial placement (balancedness {b_before[layer]:.2f})",
    )
    ax.bar(
        x + 0.2,
        after[layer] / mean,
        width=0.4,
        label=f"balanced, planned on window {args.window - 1} (balancedness {b_after[layer]:.2f})",
    )
    ax.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
    ax.set_xlabel("rank (GPU)")
    ax.set_ylabel("load / mean rank load")
    ax.set_title(
        f"DeepSeek-V3-shaped example, MoE layer {layer} (model layer {layer + ex.first_layer}), "
        f"window {args.window}: 32 ranks, 288 slots"
    )
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(
        f"wrote {args.out}: layer {layer}, balancedness {b_before[layer]:.3f} -> {b_after[layer]:.3f}; "
        f"model {float(before.mean(1).sum() / before.max(1).sum()):.3f} -> "
        f"{float(after.mean(1).sum() / after.max(1).sum()):.3f}"
    )


if __name__ == "__main__":
    main()
