"""``eplb topology``: write a topology file (ranks, nodes, slots, link bandwidths) for ``eplb plan
--topology``, without calling the Python API."""

from __future__ import annotations

import argparse
from typing import Any

from eplb.cli._common import CliError, check_writable, require_positive, write_atomic

__all__ = ["register", "run"]


def register(subparsers: Any) -> None:
    from eplb.ir.topology import H200_NVLINK

    p = subparsers.add_parser(
        "topology",
        help="write a topology file for eplb plan --topology",
        description="Write eplb IR JSON of a cluster: --ranks split evenly over --nodes, --slots per "
        "layer, and the bandwidths the scheduler's cost model uses.",
    )
    p.add_argument("--ranks", type=int, required=True, help="EP ranks (GPUs)")
    p.add_argument(
        "--slots",
        type=int,
        required=True,
        help="physical expert slots per layer, all ranks (a multiple of --ranks)",
    )
    p.add_argument("--nodes", type=int, default=1, help="nodes the ranks span, evenly (default 1)")
    bw = H200_NVLINK
    p.add_argument(
        "--intra-gbps",
        type=float,
        default=bw.intra_node_gbps,
        help=f"GB/s per rank inside a node (default {bw.intra_node_gbps:g})",
    )
    p.add_argument(
        "--inter-gbps",
        type=float,
        default=bw.inter_node_gbps,
        help=f"GB/s per rank between nodes (default {bw.inter_node_gbps:g})",
    )
    p.add_argument(
        "--host-gbps",
        type=float,
        default=bw.host_device_gbps,
        help=f"GB/s per rank between device and host (default {bw.host_device_gbps:g})",
    )
    p.add_argument(
        "--round-latency-us", type=float, default=50.0, help="fixed cost of one round (default 50)"
    )
    p.add_argument("--out", required=True, help="topology JSON file to write")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from eplb.ir.serde import dumps
    from eplb.ir.topology import Bandwidth, Topology

    for option in ("ranks", "slots", "nodes", "intra_gbps", "inter_gbps", "host_gbps", "round_latency_us"):
        require_positive("--" + option.replace("_", "-"), getattr(args, option))
    check_writable(args.out)
    if args.slots % args.ranks:
        lo = args.slots // args.ranks * args.ranks
        hint = " or ".join(str(x) for x in (lo, lo + args.ranks) if x > 0)
        raise CliError(f"--slots ({args.slots}) must be a multiple of --ranks ({args.ranks}); use {hint}.")
    if args.ranks % args.nodes:
        raise CliError(
            f"--ranks ({args.ranks}) must split evenly over --nodes ({args.nodes}); "
            f"pass a divisor of {args.ranks}."
        )
    bandwidth = Bandwidth(
        intra_node_gbps=args.intra_gbps, inter_node_gbps=args.inter_gbps, host_device_gbps=args.host_gbps
    )
    topology = Topology.uniform(
        args.ranks,
        args.slots // args.ranks,
        args.nodes,
        bandwidth=bandwidth,
        round_latency_us=args.round_latency_us,
    )
    write_atomic(args.out, dumps(topology))
    print(
        f"wrote {args.out}: {args.ranks} ranks on {args.nodes} node(s), {args.slots // args.ranks} slots per "
        f"rank; {args.intra_gbps:g} GB/s intra-node, {args.inter_gbps:g} GB/s inter-node"
    )
    return 0
