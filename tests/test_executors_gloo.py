"""Tier 2: the executors across gloo processes on CPU (2, 4 and 8 ranks; 1, 2 and 4 nodes).

Each configuration spawns its process group once; inside, every rank draws the same seeded
random (current, target) pairs, compiles, schedules and runs each through ``cpu_staged``, ``p2p``
(gloo supports ``batch_isend_irecv``) and ``alltoall`` (gloo supports ``all_to_all_single``), on
weights whose bytes encode (layer, logical expert, tensor index). After each run every slot must
hold its target expert's bytes, storage must not have moved, and the memory the executor
allocated (counted by a dispatch mode, in the 2-rank configuration: entering one imports
torch._dynamo, seconds per process) must stay within the schedule's staging figure plus the
transport buffers it reports. Failure tests: a rank that raises mid-run, a rank whose weights
are wrong, and a peer that never posts its group end every rank with an error, without a hang.
"""

from __future__ import annotations

import os
import random
import time
from typing import Any

import pytest
import torch

from eplb.executors.base import layer_last_rounds
from tests.multiproc import error_fields, run_on_ranks, values_or_raise

pytestmark = pytest.mark.multiprocess

CI = os.environ.get("HYPOTHESIS_PROFILE") == "ci"
PAIRS = 500 if CI else 60  # random (current, target) layer pairs per configuration
FAIL_TIMEOUT_S = 2.0
# A failed run ends within its timeout plus this much (process start-up not included: the
# workers time the run itself); generous, for 8 ranks on 2 loaded cores.
MARGIN_S = 8.0


# --- shared with the GPU tests ----------------------------------------------------------------
def random_case(
    rng: random.Random, *, num_ranks: int, slots: int, num_experts: int, num_layers: int
) -> tuple[Any, Any, Any]:
    """(current, target, limits): random placements, or the target a small drift of the current."""
    from eplb.ir import ModelPlacement, ScheduleLimits

    def fresh() -> list[int]:
        p2l = list(range(num_experts)) + [
            rng.randrange(num_experts) for _ in range(num_ranks * slots - num_experts)
        ]
        rng.shuffle(p2l)
        return p2l

    def drift(p2l: list[int]) -> list[int]:
        out = list(p2l)
        for _ in range(rng.randint(1, 3)):
            a, b = rng.randrange(len(out)), rng.randrange(len(out))
            if rng.random() < 0.5:
                out[a], out[b] = out[b], out[a]
            elif out.count(out[a]) > 1:  # re-point a redundant replica
                out[a] = rng.randrange(num_experts)
        return out

    cur = [fresh() for _ in range(num_layers)]
    tgt = [fresh() if rng.random() < 0.5 else drift(row) for row in cur]
    limits = rng.choice(
        [
            None,
            ScheduleLimits(max_peers_per_round=1),
            ScheduleLimits(max_peers_per_round=2, max_ops_per_group=4),
            ScheduleLimits(),
        ]
    )
    mk = lambda rows: ModelPlacement.from_lists(rows, num_ranks=num_ranks, num_logical_experts=num_experts)  # noqa: E731
    return mk(cur), mk(tgt), limits


class AllocationCounter(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the bytes of every tensor created by a factory or copying op while active."""

    _NEW = frozenset(
        {"empty", "empty_strided", "zeros", "ones", "full", "clone", "_to_copy", "empty_like", "new_empty"}
    )

    def __init__(self) -> None:
        super().__init__()
        self.bytes = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket.__name__ in self._NEW and isinstance(out, torch.Tensor):
            self.bytes += out.numel() * out.element_size()
        return out


def check_run(
    executor: Any, schedule: Any, weights: Any, target: Any, rank: int, *, count: bool, **kw: Any
) -> Any:
    """Run, then return (report, problems): wrong bytes, moved storage, memory over budget."""
    from eplb.executors.synthetic import mismatches

    ptrs = [t.data_ptr() for layer in weights for t in layer]
    counter = AllocationCounter()
    if count:
        with counter:
            report = executor.run(schedule, weights, **kw)
    else:
        report = executor.run(schedule, weights, **kw)
    problems = mismatches(weights, target, rank, limit=3)
    if ptrs != [t.data_ptr() for layer in weights for t in layer]:
        problems.append("weights storage moved")
    if report.staging_bytes != schedule.staging_bytes_per_rank:
        problems.append(f"staging {report.staging_bytes} != schedule's {schedule.staging_bytes_per_rank}")
    # Agreement tensors (num_ranks x 5 int64 per round, and a row tensor) are the only other allocations allowed.
    slack = (schedule.num_rounds + 2) * schedule.plan.topology.num_ranks * 5 * 8 * 2 + 4096
    if count and counter.bytes > schedule.staging_bytes_per_rank + report.buffer_bytes + slack:
        problems.append(
            f"allocated {counter.bytes} B during the run; budget {schedule.staging_bytes_per_rank} B staging "
            f"+ {report.buffer_bytes} B buffers"
        )
    return report, problems


# --- workers ------------------------------------------------------------------------------------
def _pairs_worker(
    rank: int, world: int, node_counts: tuple[int, ...], pairs: int, seed: int, count: bool
) -> dict[int, dict[str, Any]]:
    """Per node count: runs until ``pairs`` random (current, target) layer pairs went through
    every backend. Each run packs 1-64 independent random layer pairs into one plan, so layers
    share rounds as they do in a real rearrangement and gloo's per-round latency is paid once."""
    from eplb.executors import AllToAllExecutor, CpuStagedExecutor, P2PExecutor
    from eplb.executors.synthetic import expert_bytes_of, make_rank_weights, tensor_layout
    from eplb.ir import Topology
    from eplb.planner.compile import compile_plan
    from eplb.planner.schedule import schedule as make_schedule

    slots = 3
    layout = tensor_layout(2 * 2 * 4 + 3, torch.float16)  # fp16 tensors of 10 and 6 bytes + 3 uint8
    eb = expert_bytes_of(layout)
    classes = (CpuStagedExecutor, P2PExecutor, AllToAllExecutor)
    # The per-round agreement costs one gloo all-reduce (~20 ms with 8 ranks on 2 busy cores):
    # every fourth run keeps it on; the failure tests below depend on it.
    agreeing = [cls(cls.Config(timeout_s=30.0)) for cls in classes]
    quiet = [cls(cls.Config(timeout_s=30.0, agree_every_round=False)) for cls in classes]
    out: dict[int, dict[str, Any]] = {}
    for num_nodes in node_counts:
        topo = Topology.uniform(world, slots, num_nodes)
        stats: dict[str, Any] = {
            "pairs": 0,
            "runs": 0,
            "moving": 0,
            "rounds": 0,
            "problems": [],
            "seconds": {},
        }
        i = 0
        while stats["pairs"] < pairs and len(stats["problems"]) < 5:
            rng = random.Random(seed * 1_000_003 + num_nodes * 10_007 + i)
            i += 1
            num_experts = rng.randint(max(1, world * slots // 2), world * slots)
            num_layers = rng.randint(1, 64)
            cur, tgt, limits = random_case(
                rng, num_ranks=world, slots=slots, num_experts=num_experts, num_layers=num_layers
            )
            sched = make_schedule(compile_plan(cur, tgt, topo, expert_bytes=eb), limits)
            stats["pairs"] += num_layers
            stats["runs"] += 1
            stats["rounds"] += sched.num_rounds
            stats["moving"] += sum(lp.transfers > 0 for lp in sched.plan.layers)
            for j, ex in enumerate(agreeing if i % 4 == 1 else quiet):
                weights = make_rank_weights(cur, rank, slots, layout)
                t0 = time.perf_counter()
                # The first backend verifies; the others reuse the proof.
                _, problems = check_run(
                    ex, sched, weights, tgt, rank, count=count and i % 5 == 1, verified=j > 0
                )
                stats["seconds"][ex.name] = stats["seconds"].get(ex.name, 0.0) + time.perf_counter() - t0
                if problems:
                    stats["problems"].append(f"run {i} ({ex.name}, {num_nodes} nodes): {problems}")
        out[num_nodes] = stats
    return out


NODES = {2: (1,), 4: (1, 2), 8: (1, 2, 4)}


@pytest.mark.parametrize("world", sorted(NODES), ids=[f"{w}ranks" for w in sorted(NODES)])
def test_random_pairs_reach_target(world: int) -> None:
    """One process group per rank count; 1, 2 and 4 nodes are topologies run over it."""
    results = values_or_raise(
        run_on_ranks(_pairs_worker, world, NODES[world], PAIRS, 17 * world, world == 2, timeout_s=280.0)
    )
    for rank, per_nodes in enumerate(results):
        for num_nodes, stats in per_nodes.items():
            assert stats["problems"] == [], f"rank {rank}, {num_nodes} nodes: {stats['problems']}"
            assert stats["pairs"] >= PAIRS
            assert stats["moving"] >= stats["pairs"] // 2  # most pairs move experts between ranks


# --- failures -----------------------------------------------------------------------------------
def _failure_case(world: int) -> tuple[Any, Any, Any, Any]:
    from eplb.executors.synthetic import expert_bytes_of, tensor_layout
    from eplb.ir import ModelPlacement, ScheduleLimits, Topology
    from eplb.planner.compile import compile_plan
    from eplb.planner.schedule import schedule as make_schedule

    slots, num_layers = 2, 6
    topo = Topology.uniform(world, slots, 1)
    layout = tensor_layout(24, torch.float16)
    e = world * slots
    # Every layer rotates all experts by one rank, and one peer per round spreads the layers over
    # several rounds, so a mid-run failure leaves completed, partial and untouched layers.
    cur = ModelPlacement.from_lists([list(range(e))] * num_layers, num_ranks=world)
    tgt = ModelPlacement.from_lists([[(p + slots) % e for p in range(e)]] * num_layers, num_ranks=world)
    plan = compile_plan(cur, tgt, topo, expert_bytes=expert_bytes_of(layout))
    sched = make_schedule(plan, ScheduleLimits(max_peers_per_round=1, max_ops_per_group=2))
    return sched, cur, tgt, layout


def _raising_worker(rank: int, world: int, bad_rank: int, bad_round: int) -> dict[str, Any]:
    from eplb.executors import CpuStagedExecutor, ExecutionError
    from eplb.executors.synthetic import make_rank_weights, mismatches

    class Faulty(CpuStagedExecutor):
        def copy(self, op: Any, ctx: Any) -> None:
            if ctx.rank == bad_rank and ctx.round == bad_round:
                raise RuntimeError("injected fault")
            super().copy(op, ctx)

    sched, cur, tgt, layout = _failure_case(world)
    weights = make_rank_weights(cur, rank, 2, layout)
    t0 = time.monotonic()
    try:
        Faulty(CpuStagedExecutor.Config(timeout_s=FAIL_TIMEOUT_S)).run(sched, weights)
    except ExecutionError as exc:
        out = error_fields(exc)
        out["seconds"] = time.monotonic() - t0
        # What the error promises about each layer holds for this rank's weights.
        out["completed_ok"] = not mismatches(weights, tgt, rank, layers=exc.completed_layers)
        out["untouched_ok"] = not mismatches(weights, cur, rank, layers=exc.untouched_layers)
        out["num_rounds"] = sched.num_rounds
        return out
    return {"type": None}


def test_rank_raising_mid_run_ends_every_rank_with_its_error() -> None:
    world, bad_rank = 4, 2
    sched, *_ = _failure_case(world)
    # The last round in which the bad rank copies: layers that ended before it are complete.
    bad_round = max(
        k for k, rnd in enumerate(sched.rounds) if any(op.rank == bad_rank for op in rnd.before + rnd.after)
    )
    last = layer_last_rounds(sched)
    results = values_or_raise(run_on_ranks(_raising_worker, world, bad_rank, bad_round, timeout_s=120.0))
    for rank, out in enumerate(results):
        assert out["type"] == "ExecutionError", (rank, out)
        assert out["rank"] == bad_rank and out["round"] == bad_round, out["message"]
        assert f"(layer {out['layer']}, round {bad_round}, rank {bad_rank})" in out["message"]
        assert "injected fault" in out["message"] or rank != bad_rank
        assert out["failed_ranks"] == (bad_rank,)
        assert out["layer"] in out["partial_layers"], out["message"]
        states = (*out["completed_layers"], *out["untouched_layers"], *out["partial_layers"])
        assert sorted(states) == list(range(sched.plan.num_layers))
        assert set(out["completed_layers"]) == {n for n, k in enumerate(last) if k < bad_round}
        assert out["completed_ok"] and out["untouched_ok"], (rank, out["message"])
        # The agreement, not a timeout, ended it: no wait failed, the group is still usable.
        assert out["waited_seconds"] is None and out["group_usable"], out["message"]
        assert out["seconds"] < FAIL_TIMEOUT_S + MARGIN_S


def _bad_weights_worker(rank: int, world: int) -> dict[str, Any]:
    from eplb.executors import ExecutionError, P2PExecutor
    from eplb.executors.synthetic import make_rank_weights, mismatches

    sched, cur, _, layout = _failure_case(world)
    weights = make_rank_weights(cur, rank, 2, layout)
    if rank == 1:
        weights[3][0] = weights[3][0][:1]  # one slot short
    try:
        P2PExecutor(P2PExecutor.Config(timeout_s=FAIL_TIMEOUT_S)).run(sched, weights)
    except ExecutionError as exc:
        out = error_fields(exc)
        out["untouched_ok"] = rank == 1 or not mismatches(weights, cur, rank)
        return out
    return {"type": None}


def test_bad_weights_on_one_rank_fail_every_rank_before_any_move() -> None:
    results = values_or_raise(run_on_ranks(_bad_weights_worker, 4, timeout_s=120.0))
    for out in results:
        assert out["type"] == "ExecutionError"
        assert out["rank"] == 1 and out["round"] is None
        assert (
            "first dimension must be slots_per_rank (2)" in out["message"]
            or "see that rank's error" in out["message"]
        )
        assert out["completed_layers"] == () and out["partial_layers"] == ()
        assert out["untouched_ok"]


def _silent_peer_worker(rank: int, world: int) -> dict[str, Any]:
    from eplb.executors import AllToAllExecutor, ExecutionError
    from eplb.executors.synthetic import make_rank_weights

    class Silent(AllToAllExecutor):
        def post(self, ctx: Any) -> None:
            if ctx.rank == world - 1:
                return  # never answers its peers
            super().post(ctx)

    sched, cur, _, layout = _failure_case(world)
    weights = make_rank_weights(cur, rank, 2, layout)
    t0 = time.monotonic()
    try:
        Silent(AllToAllExecutor.Config(timeout_s=FAIL_TIMEOUT_S)).run(sched, weights)
    except ExecutionError as exc:
        return {**error_fields(exc), "seconds": time.monotonic() - t0}
    return {"type": None, "seconds": time.monotonic() - t0}


def test_peer_that_never_answers_times_out_on_every_rank() -> None:
    world = 4
    results = values_or_raise(run_on_ranks(_silent_peer_worker, world, timeout_s=120.0, pg_timeout_s=10.0))
    for rank, out in enumerate(results):
        assert out["type"] == "ExecutionError", (rank, out)
        # The silent rank itself runs on to the next agreement and times out there.
        assert out["round"] == (0 if rank != world - 1 else 1), out["message"]
        assert "did not finish within Config.timeout_s=2 s" in out["message"], out["message"]
        assert not out["group_usable"] and out["waited_seconds"] >= FAIL_TIMEOUT_S * 0.9
        # The others wait one timeout; the silent rank waits at the next agreement, which ends
        # when its peers give up the group or after a second timeout.
        bound = (1 if rank != world - 1 else 2) * FAIL_TIMEOUT_S + MARGIN_S
        assert out["seconds"] < bound, out
