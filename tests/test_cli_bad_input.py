"""Tier 1 (pure Python): the CLI's promise on bad input, command by command.

docs/cli.md: bad input of any kind prints one line ``eplb COMMAND: error: ...`` naming the
problem and the fix, exits with status 2, and writes nothing. Each case below builds its input
files in ``tmp_path``, runs ``eplb.cli.main`` in this process (no demo is executed, no process is
spawned) and checks the exit status, the one line on stderr and that no file appeared.
"""

from __future__ import annotations

import datetime
import json
import pickle
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import eplb.cli
from eplb.io import placement_bytes
from eplb.ir import ModelPlacement, Topology
from eplb.ir.serde import dumps
from eplb.planner.compile import compile_plan
from eplb.planner.schedule import schedule

CUR = ModelPlacement.from_lists([[0, 1, 2, 3, 0, 1], [0, 1, 2, 3, 2, 3]], num_ranks=2)
TGT = ModelPlacement.from_lists([[3, 1, 2, 0, 0, 1], [0, 1, 2, 3, 2, 3]], num_ranks=2)
TOPO = Topology.uniform(2, 3)
SCHED = schedule(compile_plan(CUR, TGT, TOPO, 1000))
GARBAGE = bytes(range(256)) * 2

Build = Callable[[Path], list[str]]


def _put(d: Path, name: str, data: bytes | str) -> str:
    path = d / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data if isinstance(data, bytes) else data.encode())
    return str(path)


def _npy(d: Path, name: str, arr: np.ndarray) -> str:
    np.save(d / name, arr)
    return str(d / name)


def _sched_doc(edit: Callable[[dict[str, Any]], object]) -> str:
    doc = json.loads(dumps(SCHED))
    edit(doc)
    return json.dumps(doc)


def _first_send(doc: dict[str, Any]) -> dict[str, Any]:
    return next(op for lp in doc["plan"]["layers"] for op in lp["ops"] if op["op"] == "send")


def _two_problems(doc: dict[str, Any]) -> None:
    doc["plan"]["expert_bytes"] = -1
    doc["rounds_lower_bound"] = "x"


def cur(d: Path) -> str:
    return _put(d, "cur.json", placement_bytes(CUR, "ir"))


def tgt(d: Path) -> str:
    return _put(d, "tgt.json", placement_bytes(TGT, "ir"))


def sched(d: Path) -> str:
    return _put(d, "sched.json", dumps(SCHED))


def load(d: Path) -> str:
    return _put(d, "load.json", "[[5, 1, 1, 1], [1, 1, 1, 9]]")


def trace(d: Path) -> str:
    return _npy(d, "trace.npy", np.ones((4, 2, 4)))


def rebalance(d: Path, *extra: str, load_file: str | None = None) -> list[str]:
    load_path = load_file or load(d)
    return [
        "rebalance",
        "--load",
        load_path,
        "--ranks",
        "2",
        "--slots",
        "6",
        "--out",
        str(d / "p.json"),
        *extra,
    ]


def plan(
    d: Path,
    *extra: str,
    current: str | None = None,
    target: str | None = None,
    expert_bytes: str = "1000",
    out: str | None = None,
) -> list[str]:
    out = str(d / "s.json") if out is None else out
    argv = ["plan", "--current", current or cur(d), "--expert-bytes", expert_bytes, "--out", out]
    if "--load" not in extra:
        argv += ["--target", target or tgt(d)]
    return [*argv, *extra]


def simulate(d: Path, *extra: str, trace_file: str | None = None) -> list[str]:
    return ["simulate", "--load", trace_file or trace(d), "--ranks", "2", "--slots", "6", *extra]


def _pickled(d: Path) -> str:
    pytest.importorskip("torch")
    return _put(d, "obj.pt", pickle.dumps({"load": datetime.date(2024, 1, 1)}, protocol=2))


def _big_schedule(ranks: int, expert_bytes: int) -> str:
    p = ModelPlacement.trivial(
        num_layers=1, num_logical_experts=ranks, num_physical_experts=ranks, num_ranks=ranks
    )
    return dumps(schedule(compile_plan(p, p, Topology.uniform(ranks, 1), expert_bytes)))


CASES: dict[str, tuple[Build, str]] = {
    # --- inspect / verify: schedule files ---------------------------------------------------------
    "inspect_missing": (
        lambda d: ["inspect", str(d / "nope.json")],
        r"cannot read .*nope.json: no such file",
    ),
    "inspect_folder": (
        lambda d: ["inspect", str(d)],
        r"cannot read .*: Is a directory; pass a schedule `eplb plan` wrote",
    ),
    "inspect_empty": (
        lambda d: ["inspect", _put(d, "e.json", "")],
        r"e.json is not a schedule document: .*not valid JSON",
    ),
    "inspect_garbage": (
        lambda d: ["inspect", _put(d, "g.json", GARBAGE)],
        r"g.json is not a schedule document",
    ),
    "inspect_truncated": (
        lambda d: ["inspect", _put(d, "t.json", dumps(SCHED)[:200])],
        r"t.json is not a schedule document: \$: is not valid JSON",
    ),
    "inspect_placement": (
        lambda d: ["inspect", cur(d)],
        r"cur.json is not a schedule document: \$.type: must be 'schedule' here \(got 'model_placement'\)",
    ),
    "verify_strings": (
        lambda d: ["verify", _put(d, "s.json", '["a", "b"]')],
        r"must be a JSON object \(got list\); pass a schedule `eplb plan` wrote",
    ),
    "verify_schema_99": (
        lambda d: ["verify", _put(d, "v.json", _sched_doc(lambda x: x.update(schema_version=99)))],
        r"schema version 1 \(got 99\)",
    ),
    "verify_rank_out_of_range": (
        lambda d: ["verify", _put(d, "r.json", _sched_doc(lambda x: _first_send(x).update(dst_rank=9)))],
        r"r.json is not a schedule document: \$.plan.layers\[0\].ops\[0\].dst_rank: must be in \[0, 2\) \(got 9\)",
    ),
    "verify_many_problems": (
        lambda d: ["verify", _put(d, "m.json", _sched_doc(_two_problems))],
        r"m.json is not a schedule document: \$.plan.expert_bytes: must be > 0 \(got -1\) \(and 1 more\); pass",
    ),
    "verify_binary_npy": (
        lambda d: ["verify", _put(d, "p.npy", placement_bytes(TGT, "npy"))],
        r"p.npy is not a schedule document: \$: is not valid JSON",
    ),
    # --- rebalance: load files, options, --current, --out -----------------------------------------
    "rebalance_missing_load": (
        lambda d: rebalance(d, load_file=str(d / "nope.json")),
        r"cannot read .*nope.json: .*check the path",
    ),
    "rebalance_load_folder": (
        lambda d: rebalance(d, load_file=_folder(d, "l.json")),
        r"cannot read .*l.json: it is a folder; name a file, a TensorRT-LLM ExpertStatistic folder .* or a "
        r"folder of SGLang's recorder dumps",
    ),
    "rebalance_empty_npy": (
        lambda d: rebalance(d, load_file=_put(d, "e.npy", b"")),
        r"e.npy is empty; save it with numpy.save",
    ),
    "rebalance_garbage_npy": (
        lambda d: rebalance(d, load_file=_put(d, "g.npy", GARBAGE)),
        r"g.npy is not a numpy file \(no .npy or .npz header\)",
    ),
    "rebalance_3d_npy": (
        lambda d: rebalance(d, load_file=_npy(d, "l.npy", np.ones((2, 2, 4)))),
        r"'load' must have 2 dimensions .* \(got shape \(2, 2, 4\)\); sum over steps",
    ),
    "rebalance_complex_npy": (
        lambda d: rebalance(d, load_file=_npy(d, "c.npy", np.ones((2, 4), dtype=complex))),
        r"c.npy: the load holds complex128 values; save token counts as integers or floats",
    ),
    "rebalance_nan": (
        lambda d: rebalance(d, load_file=_put(d, "n.json", "[[NaN, 1], [1, 1]]")),
        r"'load\[0, 0\]' must be finite \(got nan",
    ),
    "rebalance_inf": (
        lambda d: rebalance(d, load_file=_put(d, "i.json", "[[1e400, 1], [1, 1]]")),
        r"'load\[0, 0\]' must be finite \(got inf",
    ),
    "rebalance_negative": (
        lambda d: rebalance(d, load_file=_put(d, "n.json", "[[-1, 1], [1, 1]]")),
        r"'load\[0, 0\]' must be >= 0",
    ),
    "rebalance_placement_as_load": (
        lambda d: rebalance(d, load_file=cur(d)),
        r"cur.json: a JSON object needs a 'load' key",
    ),
    "rebalance_pickled_pt": (
        lambda d: rebalance(d, load_file=_pickled(d)),
        r"obj.pt is not a torch file eplb can load safely .*Unsupported global",
    ),
    "rebalance_ranks_0": (lambda d: rebalance(d, "--ranks", "0"), r"--ranks must be > 0 \(got 0\)"),
    "rebalance_slots_not_multiple": (
        lambda d: rebalance(d, "--ranks", "4"),
        r"'num_physical_experts' \(6\) must be a multiple of num_ranks \(4\); use 4 or 8",
    ),
    "rebalance_expert_bytes_negative": (
        lambda d: rebalance(d, "--expert-bytes", "-1"),
        r"--expert-bytes must be > 0 \(got -1\)",
    ),
    "rebalance_groups_0": (lambda d: rebalance(d, "--groups", "0"), r"--groups must be > 0 \(got 0\)"),
    "rebalance_tolerance_without_current": (
        lambda d: rebalance(d, "--tolerance", "0.1"),
        r"--tolerance applies to migration_aware, not balanced",
    ),
    "rebalance_current_other_cluster": (
        lambda d: rebalance(d, "--ranks", "3", "--slots", "6", "--current", cur(d)),
        r"--current .*cur.json is a placement of 6 slots on 2 ranks, not --slots 6 on --ranks 3",
    ),
    "rebalance_current_ragged_sglang": (
        lambda d: rebalance(
            d,
            "--current",
            _put(d, "r.sglang.json", '{"physical_to_logical_map": [[0, 1, 2, 3, 0, 1], [0, 1]]}'),
        ),
        r"r.sglang.json: physical_to_logical_map layer 1 lists 2 slots but layer 0 lists 6",
    ),
    "rebalance_current_schedule": (
        lambda d: rebalance(d, "--current", sched(d)),
        r"sched.json: not a placement; expected eplb IR JSON",
    ),
    "rebalance_current_bad_yaml_indent": (
        lambda d: rebalance(
            d,
            "--current",
            _put(
                d,
                "p.yaml",
                "initial_global_assignments:\n  3: [0, 1, 2, 3, 0, 1]\n    4: [0, 1, 2, 3, 2, 3]\n",
            ),
        ),
        r"p.yaml line 3: layer 4 is indented 4 spaces, the layers above 2",
    ),
    "rebalance_current_binary_yaml": (
        lambda d: rebalance(d, "--current", _put(d, "p.yaml", GARBAGE)),
        r"p.yaml is not a text YAML file",
    ),
    "rebalance_out_missing_folder": (
        lambda d: [*rebalance(d)[:-2], "--out", str(d / "no" / "p.json")],
        r"folder .*no does not exist; create it first",
    ),
    "rebalance_out_is_folder": (
        lambda d: [*rebalance(d)[:-2], "--out", str(d)],
        r"--out .* is a folder; name a file in it",
    ),
    "rebalance_out_under_file": (
        lambda d: [*rebalance(d)[:-2], "--out", str(Path(load(d)) / "p.json")],
        r"load.json is a file, not a folder",
    ),
    "rebalance_out_empty": (lambda d: [*rebalance(d)[:-2], "--out", ""], r"--out is empty; name a file"),
    # --- plan ---------------------------------------------------------------------------------------
    "plan_missing_current": (
        lambda d: plan(d, current=str(d / "nope.json")),
        r"cannot read .*nope.json",
    ),
    "plan_schedule_as_target": (
        lambda d: plan(d, target=sched(d)),
        r"sched.json: not a placement; expected eplb IR JSON",
    ),
    "plan_garbage_target": (
        lambda d: plan(d, target=_put(d, "g.json", GARBAGE)),
        r"g.json is not valid JSON",
    ),
    "plan_sglang_without_ranks": (
        lambda d: plan(
            d,
            current=_put(d, "c.sglang.json", placement_bytes(CUR, "sglang")),
            target=_put(d, "t.yaml", placement_bytes(TGT, "trtllm")),
        ),
        r"c.sglang.json does not record the rank count; pass --ranks",
    ),
    "plan_other_model": (
        lambda d: plan(
            d,
            target=_put(
                d,
                "t.json",
                placement_bytes(
                    ModelPlacement.trivial(
                        num_layers=1, num_logical_experts=4, num_physical_experts=6, num_ranks=2
                    ),
                    "ir",
                ),
            ),
        ),
        r"cannot plan .*cur.json -> .*t.json: 'target' has 1 layers but current has 2",
    ),
    "plan_expert_bytes_0": (lambda d: plan(d, expert_bytes="0"), r"--expert-bytes must be > 0 \(got 0\)"),
    "plan_max_peers_0": (lambda d: plan(d, "--max-peers", "0"), r"--max-peers must be > 0 \(got 0\)"),
    "plan_max_ops_negative": (lambda d: plan(d, "--max-ops", "-5"), r"--max-ops must be > 0 \(got -5\)"),
    "plan_ranks_0": (lambda d: plan(d, "--ranks", "0"), r"--ranks must be > 0 \(got 0\)"),
    "plan_nodes_not_dividing": (
        lambda d: plan(d, "--nodes", "3"),
        r"'num_nodes' must divide num_ranks \(2\)",
    ),
    "plan_topology_and_ranks": (
        lambda d: plan(d, "--topology", _put(d, "topo.json", dumps(TOPO)), "--ranks", "2"),
        r"--topology gives the ranks and nodes; drop --ranks / --nodes",
    ),
    "plan_topology_garbage": (
        lambda d: plan(d, "--topology", _put(d, "topo.json", GARBAGE)),
        r"topo.json is not a topology document: \$: is not valid JSON",
    ),
    "plan_topology_folder": (lambda d: plan(d, "--topology", str(d)), r"cannot read .*: Is a directory"),
    "plan_policy_with_target": (
        lambda d: plan(d, "--policy", "balanced"),
        r"--policy picks the target for --load; drop it",
    ),
    "plan_staging_too_small": (
        lambda d: plan(
            d,
            "--load",
            load(d),
            "--topology",
            _put(d, "topo.json", dumps(TOPO)),
            "--staging-bytes",
            "10",
            current="trivial",
        ),
        r"cannot schedule the migration under these limits: .* --staging-bytes is 10 B; fix: raise --staging-bytes",
    ),
    "plan_out_is_folder": (lambda d: plan(d, out=str(d)), r"--out .* is a folder; name a file in it"),
    # --- run: every error below is raised before a process starts ----------------------------------
    "run_missing": (lambda d: ["run", str(d / "nope.json")], r"cannot read .*nope.json: No such file"),
    "run_garbage": (
        lambda d: ["run", _put(d, "g.json", GARBAGE)],
        r"g.json is not a plan or schedule document: \$: is not valid JSON",
    ),
    "run_placement": (
        lambda d: ["run", cur(d)],
        r"cur.json holds a ModelPlacement; pass a migration plan or a schedule",
    ),
    "run_corrupted": (
        lambda d: ["run", _put(d, "c.json", _sched_doc(lambda x: x.update(rounds=[])))],
        r"c.json does not verify: .*in no round.*\(and \d+ more\); `eplb verify .*c.json` lists every",
    ),
    "run_timeout_0": (lambda d: ["run", sched(d), "--timeout", "0"], r"--timeout must be > 0 \(got 0\)"),
    "run_timeout_nan": (
        lambda d: ["run", sched(d), "--timeout", "nan"],
        r"--timeout must be > 0 \(got nan\)",
    ),
    "run_nprocs": (
        lambda d: ["run", sched(d), "--nprocs", "3"],
        r"--nprocs 3 does not match the plan's topology \(2 ranks\)",
    ),
    "run_backend": (
        lambda d: ["run", sched(d), "--backend", "nccl9"],
        r"unknown backend 'nccl9'; choose one of",
    ),
    "run_expert_bytes_0": (
        lambda d: ["run", sched(d), "--expert-bytes", "0"],
        r"--expert-bytes must be positive",
    ),
    "run_too_many_ranks": (
        lambda d: ["run", _put(d, "many.json", _big_schedule(200, 1000))],
        r"many.json has 200 ranks; eplb run starts one process per rank here, at most 128",
    ),
    "run_weights_beyond_memory": (
        lambda d: ["run", _put(d, "big.json", _big_schedule(2, 10**15)), "--backend", "local"],
        r"big.json: its weights take .* GB .*; pass --expert-bytes 4096",
    ),
    # --- diff ---------------------------------------------------------------------------------------
    "diff_folder": (lambda d: ["diff", str(d), cur(d)], r"cannot read .*: it is a folder"),
    "diff_empty_npy": (lambda d: ["diff", cur(d), _put(d, "e.npy", b"")], r"e.npy is empty"),
    "diff_float_npy": (
        lambda d: ["diff", cur(d), _npy(d, "f.npy", np.zeros((2, 6)))],
        r"f.npy: a placement array must be integer \[layers, slots\] \(got float64 \(2, 6\)\)",
    ),
    "diff_negative_npy": (
        lambda d: ["diff", cur(d), _npy(d, "n.npy", -np.ones((2, 6), dtype=np.int64))],
        r"n.npy: 'physical_to_logical\[0\]' must be in \[0, 1\) \(got -1\)",
    ),
    "diff_ragged_sglang": (
        lambda d: [
            "diff",
            cur(d),
            _put(d, "r.sglang.json", '{"physical_to_logical_map": [[0, 1, 2, 3, 0, 1], [0]]}'),
        ],
        r"r.sglang.json: physical_to_logical_map layer 1 lists 1 slots but layer 0 lists 6",
    ),
    "diff_1d_pt": (
        lambda d: ["diff", cur(d), _pt_1d(d)],
        r"p.pt: physical_to_logical_map must be \[layers\]\[slots\] expert ids, a list of lists",
    ),
    "diff_yaml_ragged": (
        lambda d: [
            "diff",
            cur(d),
            _put(d, "p.yaml", "initial_global_assignments:\n  3: [0, 1, 2, 3, 0, 1]\n  4: [0, 1]\n"),
        ],
        r"p.yaml: layer 4 lists 2 slots but layer 3 lists 6",
    ),
    "diff_yaml_negative_layer": (
        lambda d: [
            "diff",
            cur(d),
            _put(d, "p.yaml", "initial_global_assignments:\n  -1: [0, 1, 2, 3, 0, 1]\n"),
        ],
        r"p.yaml line 2: layer -1 is negative",
    ),
    "diff_schema_99": (
        lambda d: ["diff", sched(d), _put(d, "v.json", _sched_doc(lambda x: x.update(schema_version=99)))],
        r"v.json is not a valid schedule document: .*\(got 99\); re-export .* wrote it; regenerate it",
    ),
    "diff_other_cluster": (
        lambda d: [
            "diff",
            sched(d),
            _put(d, "o.json", dumps(schedule(compile_plan(CUR, TGT, Topology.uniform(2, 3, 2), 1000)))),
        ],
        r"the plans are for different clusters",
    ),
    # --- simulate -------------------------------------------------------------------------------------
    "simulate_folder": (
        lambda d: simulate(d, trace_file=_folder(d, "t.npy")),
        r"cannot read .*t.npy: it is a folder",
    ),
    "simulate_empty_npy": (lambda d: simulate(d, trace_file=_put(d, "e.npy", b"")), r"e.npy is empty"),
    "simulate_npz_without_trace": (
        lambda d: simulate(d, trace_file=_npz(d)),
        r"t.npz: an .npz needs a 'trace' array \(found \['x'\]\)",
    ),
    "simulate_2d": (
        lambda d: simulate(d, trace_file=_npy(d, "t2.npy", np.ones((2, 4)))),
        r"a trace has 3 dimensions \[windows, layers, experts\] \(got shape \(2, 4\)\)",
    ),
    "simulate_nan": (
        lambda d: simulate(d, trace_file=_npy(d, "n.npy", np.full((3, 2, 4), np.nan))),
        r"'trace\[0\]\[0, 0\]' must be finite",
    ),
    "simulate_every_0": (lambda d: simulate(d, "--every", "0"), r"--every must be > 0 \(got 0\)"),
    "simulate_nodes_0": (lambda d: simulate(d, "--nodes", "0"), r"--nodes must be > 0 \(got 0\)"),
    "simulate_groups_not_dividing": (
        lambda d: simulate(d, "--groups", "3"),
        r"--groups 3 must divide the trace's 4 experts; use one of \[1, 2, 4\]",
    ),
    "simulate_expert_bytes_0": (
        lambda d: simulate(d, "--expert-bytes", "0"),
        r"--expert-bytes must be > 0 \(got 0\)",
    ),
    "simulate_example_ranks_0": (
        lambda d: ["simulate", "--example", "--ranks", "0"],
        r"--ranks must be > 0 \(got 0\)",
    ),
    "simulate_plot_under_file": (
        lambda d: simulate(d, "--plot", str(Path(load(d)) / "x.png")),
        r"cannot write .*x.png: .*load.json is a file, not a folder",
    ),
    # --- score ---------------------------------------------------------------------------------------
    "score_missing_placement": (
        lambda d: ["score", "--load", load(d), "--placement", str(d / "nope.json")],
        r"cannot read .*nope.json: no such file",
    ),
    "score_other_model": (
        lambda d: ["score", "--load", _npy(d, "l3.npy", np.ones((3, 4))), "--placement", cur(d)],
        r"--placement .*cur.json has 2 layers x 4 experts but --load has 3 x 4",
    ),
    "score_ranks_0": (
        lambda d: ["score", "--load", load(d), "--placement", cur(d), "--ranks", "0"],
        r"--ranks must be > 0 \(got 0\)",
    ),
    "score_sglang_without_ranks": (
        lambda d: ["score", "--load", load(d), "--placement", _put(d, "c.sglang.json", placement_bytes(CUR, "sglang"))],
        r"c.sglang.json does not record the rank count; pass --ranks",
    ),
    "score_unknown_model": (
        lambda d: ["score", "--load", load(d), "--placement", cur(d), "--model", "gpt-5"],
        r"unknown model 'gpt-5'; known: deepseek-v3",
    ),
    # --- topology ------------------------------------------------------------------------------------
    "topology_slots_not_multiple": (
        lambda d: ["topology", "--ranks", "4", "--slots", "10", "--out", str(d / "t.json")],
        r"--slots \(10\) must be a multiple of --ranks \(4\); use 8 or 12",
    ),
    "topology_nodes_not_dividing": (
        lambda d: ["topology", "--ranks", "4", "--slots", "8", "--nodes", "3", "--out", str(d / "t.json")],
        r"--ranks \(4\) must split evenly over --nodes \(3\)",
    ),
    "topology_gbps_0": (
        lambda d: ["topology", "--ranks", "4", "--slots", "8", "--intra-gbps", "0", "--out", str(d / "t.json")],
        r"--intra-gbps must be > 0 \(got 0\)",
    ),
    "topology_out_folder": (
        lambda d: ["topology", "--ranks", "4", "--slots", "8", "--out", str(d)],
        r"--out .* is a folder; name a file in it",
    ),
    # --- layouts and outputs ---------------------------------------------------------------------------
    "rebalance_moe_layers_bad": (
        lambda d: rebalance(d, "--moe-layers", "3..60"),
        r"--moe-layers '3..60' is not FIRST-LAST",
    ),
    "rebalance_rows_not_the_model": (
        lambda d: rebalance(d, "--moe-layers", "3-60"),
        r"load.json has 2 layer rows, but --moe-layers 3-60 \(61 model layers, MoE 3-60\) needs 61",
    ),
    "rebalance_out_is_load": (
        lambda d: [*rebalance(d)[:-2], "--out", load(d)],
        r"--out .*load.json is also --load; writing it would replace that input",
    ),
    "rebalance_format_vs_extension": (
        lambda d: [*rebalance(d)[:-2], "--out", str(d / "p.yaml"), "--format", "sglang"],
        r"--out .*p.yaml names a trtllm file but --format is sglang",
    ),
    "rebalance_updates_negative": (
        lambda d: [*rebalance(d)[:-2], "--out", str(d / "p.yaml"), "--layer-updates-per-iter", "-1"],
        r"--layer-updates-per-iter must be >= 0 \(got -1\)",
    ),
    "plan_out_is_target": (
        lambda d: plan(d, target=tgt(d), out=str(d / "tgt.json")),
        r"--out .*tgt.json is also --target",
    ),
    "plan_trivial_load_slots_not_multiple": (
        lambda d: ["plan", "--current", "trivial", "--load", load(d), "--ranks", "4", "--slots", "6",
                   "--expert-bytes", "8", "--out", str(d / "s.json")],
        r"--slots \(6\) must be a multiple of --ranks \(4\); use 4",
    ),
    "simulate_plot_is_load": (
        lambda d: simulate(d, "--plot", trace(d)),
        r"--plot .*trace.npy is also --load",
    ),
    # --- demo: option errors only, raised before any work ---------------------------------------------
    "demo_out_is_file": (lambda d: ["demo", "--out", load(d)], r"--out .*load.json is a file; name a folder"),
    "demo_out_under_file": (
        lambda d: ["demo", "--out", str(Path(load(d)) / "x")],
        r"--out .*: .*load.json is a file, not a folder",
    ),
    "demo_timeout_nan": (
        lambda d: ["demo", "--out", str(d / "o"), "--timeout", "nan"],
        r"--timeout must be > 0 \(got nan\)",
    ),
    "demo_executor_no_execute": (
        lambda d: ["demo", "--out", str(d / "o"), "--no-execute", "--executor", "cpu_staged"],
        r"--executor picks the backend of the execution that --no-execute skips; drop one",
    ),
    "demo_window": (
        lambda d: ["demo", "--out", str(d / "o"), "--no-execute", "--window", "99"],
        r"--window must be in \[1, 8\) \(got 99\); the example has 8 windows",
    ),
}


def _pt_1d(d: Path) -> str:
    torch = pytest.importorskip("torch")

    torch.save({"physical_to_logical_map": torch.arange(6)}, d / "p.pt")
    return str(d / "p.pt")


def _folder(d: Path, name: str) -> str:
    (d / name).mkdir()
    return str(d / name)


def _npz(d: Path) -> str:
    np.savez(d / "t.npz", x=np.ones(3))
    return str(d / "t.npz")


if Path("/proc").is_dir():
    CASES["rebalance_out_unwritable"] = (
        lambda d: [*rebalance(d)[:-2], "--out", "/proc/eplb-test.json"],
        r"cannot write /proc/eplb-test.json: folder /proc is not writable",
    )


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_one_line_exit_2_nothing_written(
    case: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    build, pattern = CASES[case]
    argv = build(tmp_path)
    before = sorted(tmp_path.rglob("*"))
    assert eplb.cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith(f"eplb {argv[0]}: error: "), err[0]
    assert re.search(pattern, err[0]), err[0]
    assert sorted(tmp_path.rglob("*")) == before
