"""Host <-> device and on-device copy bandwidth for expert-sized tensors, on one GPU.

Why: ``cpu_staged`` moves every expert device -> pinned host -> (gloo) -> pinned host -> device,
and the cost model (`eplb.planner.cost`) predicts that leg with ``Bandwidth.host_device_gbps``
(25 GB/s in ``H200_NVLINK``); a ``Copy`` op is an on-device copy. This measures both on the
GPU at hand, and the gloo leg between two processes of this host (pinned buffers, TCP loopback:
what ``cpu_staged`` runs between ranks of one node), and reports each against the figure the cost
model assumes, as a ratio.

    python bench/bench_host_link.py --out bench/results/bench_host_link.json

An expert is DeepSeek-V3's (the layout of bench_executors.py): fp8 w13 [4096, 7168], w2
[7168, 2048] as uint8, fp32 block scales [32, 56] and [56, 16], 44.05 MB. Each row copies
``--experts`` experts one tensor at a time (as the executor does), median of ``--repeat`` runs
after one warm-up run.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from eplb.ir.topology import H200_NVLINK

EXPERT_SHAPES = (
    ((4096, 7168), torch.uint8),
    ((7168, 2048), torch.uint8),
    ((32, 56), torch.float32),
    ((56, 16), torch.float32),
)


def row(name: str, n: int, size: int, seconds: float, baseline: float | None) -> dict[str, Any]:
    gbps = size / seconds / 1e9
    return {
        "copy": name,
        "experts": n,
        "bytes": size,
        "seconds": seconds,
        "gbps": gbps,
        "ms_per_expert": 1e3 * seconds / n,
        "assumed_gbps": baseline,
        "ratio_to_assumed": gbps / baseline if baseline else None,
    }


def experts(n: int, device: str, *, pinned: bool = False) -> list[list[torch.Tensor]]:
    return [
        [torch.empty(shape, dtype=dt, device=device, pin_memory=pinned) for shape, dt in EXPERT_SHAPES]
        for _ in range(n)
    ]


def nbytes(ts: list[list[torch.Tensor]]) -> int:
    return sum(t.numel() * t.element_size() for e in ts for t in e)


def timed_copy(dst: list[list[torch.Tensor]], src: list[list[torch.Tensor]], repeat: int) -> float:
    """Median seconds to copy ``src`` into ``dst`` tensor by tensor (non_blocking), one stream."""
    times = []
    for i in range(repeat + 1):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for d, s in zip(dst, src, strict=True):
            for dt, st in zip(d, s, strict=True):
                dt.copy_(st, non_blocking=True)
        torch.cuda.synchronize()
        if i:  # the first run is the warm-up
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _gloo_worker(rank: int, port: int, size: int, repeat: int, out: Any) -> None:
    """Rank 0 sends ``size`` bytes of pinned memory to rank 1 and back, ``repeat + 1`` times."""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    buf = torch.empty(size, dtype=torch.uint8, pin_memory=torch.cuda.is_available())
    times = []
    for i in range(repeat + 1):
        dist.barrier()
        t0 = time.perf_counter()
        if rank == 0:
            dist.send(buf, 1)
            dist.recv(buf, 1)
        else:
            dist.recv(buf, 0)
            dist.send(buf, 0)
        if i:
            times.append((time.perf_counter() - t0) / 2)  # one direction
    if rank == 0:
        out.put(statistics.median(times))
    dist.destroy_process_group()


def gloo_seconds(size: int, repeat: int) -> float:
    """Median seconds to move ``size`` bytes one way between two gloo processes of this host."""
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    port = 29500 + os.getpid() % 1000
    procs = [ctx.Process(target=_gloo_worker, args=(r, port, size, repeat, out)) for r in range(2)]
    for proc in procs:
        proc.start()
    seconds = float(out.get(timeout=600))
    for proc in procs:
        proc.join()
    return seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--experts", type=int, default=32, help="experts per timed copy (default 32)")
    ap.add_argument("--repeat", type=int, default=10)
    ap.add_argument("--out", default="bench_host_link.json")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_host_link: needs a CUDA device; run it through the device tool.")

    n = args.experts
    dev, pinned, pageable = experts(n, "cuda"), experts(n, "cpu", pinned=True), experts(n, "cpu")
    dev2 = experts(n, "cuda")
    size = nbytes(dev)
    assumed = H200_NVLINK.host_device_gbps
    rows: list[dict[str, Any]] = []
    for name, dst, src, baseline in (
        ("device -> pinned host", pinned, dev, assumed),
        ("pinned host -> device", dev, pinned, assumed),
        ("device -> pageable host", pageable, dev, assumed),
        ("pageable host -> device", dev, pageable, assumed),
        ("device -> device (Copy op)", dev2, dev, None),
    ):
        s = timed_copy(dst, src, args.repeat)
        rows.append(row(name, n, size, s, baseline))
    s = gloo_seconds(size, min(args.repeat, 5))
    rows.append(row("pinned host -> host (gloo, 2 processes)", n, size, s, assumed))
    props = torch.cuda.get_device_properties(0)
    doc = {
        "benchmark": "bench_host_link",
        "machine": {
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "gpu": props.name,
            "gpu_memory_mib": props.total_memory // 2**20,
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "platform": platform.platform(),
            "python": platform.python_version(),
        },
        "baseline": "Bandwidth.host_device_gbps of eplb.ir.topology.H200_NVLINK (the cost model's figure)",
        "expert_bytes": size // n,
        "rows": rows,
    }
    print(f"{props.name}, torch {torch.__version__}; {n} experts of {size / n / 1e6:.2f} MB per copy")
    print(f"{'copy':<42}{'GB/s':>8}{'ms/expert':>11}{'vs assumed':>12}")
    for r in rows:
        ratio = f"{r['ratio_to_assumed']:.2f}x" if r["ratio_to_assumed"] else "-"
        print(f"{r['copy']:<42}{r['gbps']:>8.1f}{r['ms_per_expert']:>11.3f}{ratio:>12}")
    Path(args.out).write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
