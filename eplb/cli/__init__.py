"""The ``eplb`` command line: one entry point, one module per subcommand.

Each subcommand module has ``register(subparsers)``, which adds its parser and sets
``func=run`` where ``run(args) -> int`` is the exit status. Bad input raises `CliError` (or any
`EplbError`): one line naming the problem and the fix, exit status 2, nothing written.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence

from eplb import __version__
from eplb.cli._common import CliError
from eplb.ir.errors import EplbError

# Subcommands in the order `eplb --help` lists them; each is eplb.cli.<name>.
SUBCOMMANDS: tuple[str, ...] = (
    "demo",
    "rebalance",
    "score",
    "topology",
    "plan",
    "inspect",
    "verify",
    "run",
    "diff",
    "simulate",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="eplb",
        description="Expert-parallelism load balancer for MoE inference: plan, verify and run "
        "expert migrations.",
    )
    parser.add_argument("--version", action="version", version=f"eplb {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMANDS:
        importlib.import_module(f"eplb.cli.{name}").register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return int(args.func(args))
    except BrokenPipeError:
        # The reader went away (`eplb inspect plan.json | head`): stop quietly, as Unix tools do.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except (CliError, EplbError) as exc:
        lines = str(exc).splitlines() or [type(exc).__name__]
        print(f"eplb {args.command}: error: {lines[0]}", file=sys.stderr)
        for line in lines[1:]:
            print(f"  {line}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
