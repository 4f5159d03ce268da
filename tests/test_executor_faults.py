"""Tier 2: faults across gloo processes (2, 4 and 8 ranks), every backend that runs on gloo.

A rank given another schedule of the same shape, or another model's schedule, must end every rank
with an error that names it and both fingerprints before any byte moves. A rank that raises, exits
(``os._exit``) or sleeps past the timeout at the first, a middle or the last round must end every
surviving rank with `ExecutionError` within the timeout plus a margin, and each layer must be
wholly old (untouched), wholly new (completed) or reported partial. Timeouts are 1-2 s and the
exit / sleep cases rotate backends and rounds over the rank counts, to keep the spawns few.
"""

from __future__ import annotations

import os
import time
from typing import Any

import pytest
import torch

from tests.multiproc import error_fields, run_on_ranks, values_or_raise

pytestmark = pytest.mark.multiprocess

TIMEOUT_S = 1.5
MARGIN_S = 8.0  # process teardown and gloo's own detection on 2 loaded cores
BACKENDS = ("cpu_staged", "p2p", "alltoall")


def _case(world: int, *, num_layers: int = 4, offset: int = 0, expert_bytes: int = 24) -> tuple[Any, ...]:
    """(schedule, current, target, layout): every layer rotates its experts by one rank (and
    ``offset`` slots), one peer per round, so a run has several rounds and layers finish at
    different rounds."""
    from eplb.executors.synthetic import expert_bytes_of, tensor_layout
    from eplb.ir import ModelPlacement, ScheduleLimits, Topology
    from eplb.planner.compile import compile_plan
    from eplb.planner.schedule import schedule as make_schedule

    slots = 2
    topo = Topology.uniform(world, slots, 1)
    layout = tensor_layout(expert_bytes, torch.float16)
    e = world * slots
    cur = ModelPlacement.from_lists([list(range(e))] * num_layers, num_ranks=world)
    tgt = ModelPlacement.from_lists(
        [[(p + slots + offset) % e for p in range(e)]] * num_layers, num_ranks=world
    )
    plan = compile_plan(cur, tgt, topo, expert_bytes=expert_bytes_of(layout))
    sched = make_schedule(plan, ScheduleLimits(max_peers_per_round=1, max_ops_per_group=2))
    return sched, cur, tgt, layout


def _executor(name: str, fault: Any = None) -> Any:
    """The backend ``name``, with ``fault(ctx)`` called at the start of every round's transfers."""
    from eplb.executors import executor_class

    base = executor_class(name)

    class Faulty(base):  # type: ignore[misc, valid-type]
        def begin_transfers(self, ctx: Any) -> None:
            if fault is not None:
                fault(ctx)
            super().begin_transfers(ctx)

    return Faulty(base.Config(timeout_s=TIMEOUT_S))


def _outcome(run: Any, weights: Any, cur: Any, tgt: Any, rank: int) -> dict[str, Any]:
    """Run; then what the error says and whether each layer is as it says."""
    from eplb.executors import ExecutionError
    from eplb.executors.synthetic import mismatches

    t0 = time.monotonic()
    try:
        run()
    except ExecutionError as exc:
        out = error_fields(exc)
        out["seconds"] = time.monotonic() - t0
        states = (*exc.completed_layers, *exc.untouched_layers, *exc.partial_layers)
        out["states_cover"] = sorted(states) == list(range(len(weights)))
        out["completed_ok"] = not mismatches(weights, tgt, rank, layers=exc.completed_layers)
        out["untouched_ok"] = not mismatches(weights, cur, rank, layers=exc.untouched_layers)
        return out
    return {"type": None, "seconds": time.monotonic() - t0}


def _check_layers(out: dict[str, Any]) -> None:
    assert out["type"] == "ExecutionError", out
    assert out["states_cover"] and out["completed_ok"] and out["untouched_ok"], out["message"]


# --- ranks that hold different schedules --------------------------------------------------------
def _mismatch_worker(rank: int, world: int) -> dict[tuple[str, str], dict[str, Any]]:
    from eplb.executors.base import schedule_fingerprint
    from eplb.executors.synthetic import make_rank_weights

    odd = world - 1
    results = {}
    for fault in ("same_shape", "other_model"):
        sched, cur, _, layout = _case(world)
        if rank == odd and fault == "same_shape":
            sched, cur, _, layout = _case(world, offset=1)  # same layers, ranks and expert size
        elif rank == odd:
            sched, cur, _, layout = _case(world, num_layers=7, expert_bytes=40)
        for name in BACKENDS:
            weights = make_rank_weights(cur, rank, 2, layout)
            out = _outcome(lambda w=weights, s=sched, n=name: _executor(n).run(s, w), weights, cur, cur, rank)
            out["fingerprint"] = f"{schedule_fingerprint(sched):016x}"
            results[fault, name] = out
    return results


@pytest.mark.parametrize("world", [2, 4, 8], ids=lambda w: f"{w}ranks")
def test_ranks_with_different_schedules_fail_before_a_byte_moves(world: int) -> None:
    results = values_or_raise(run_on_ranks(_mismatch_worker, world, timeout_s=240.0))
    odd = world - 1
    for fault, name in results[0]:
        fps = {results[r][fault, name]["fingerprint"] for r in range(world)}
        assert len(fps) == 2, (fault, fps)
        for rank in range(world):
            got = results[rank][fault, name]
            _check_layers(got)
            assert got["completed_layers"] == () and got["partial_layers"] == ()
            assert "hold different schedules" in got["message"], got["message"]
            assert all(fp in got["message"] for fp in fps), got["message"]
            assert got["failed_ranks"] == (odd,), (fault, name, got["message"])
            assert got["group_usable"] and got["seconds"] < TIMEOUT_S + MARGIN_S


# --- a rank that raises ---------------------------------------------------------------------------
def _rounds(sched: Any) -> dict[str, int]:
    return {"first": 0, "middle": sched.num_rounds // 2, "last": sched.num_rounds - 1}


def _raise_worker(rank: int, world: int, bad: int) -> dict[tuple[str, str], dict[str, Any]]:
    from eplb.executors.synthetic import make_rank_weights

    sched, cur, tgt, layout = _case(world)
    results = {}
    for where, k in _rounds(sched).items():

        def fault(ctx: Any, k: int = k) -> None:
            if ctx.rank == bad and ctx.round == k:
                raise RuntimeError("injected fault")

        for name in BACKENDS:
            weights = make_rank_weights(cur, rank, 2, layout)
            ex = _executor(name, fault)
            out = _outcome(lambda ex=ex, w=weights: ex.run(sched, w), weights, cur, tgt, rank)
            out["round_expected"] = k
            results[where, name] = out
    for name in BACKENDS:  # one rank's executor allows less staging than the schedule needs
        from eplb.executors import executor_class

        cls = executor_class(name)
        cap = sched.staging_bytes_per_rank - 1 if rank == bad else None
        ex = cls(cls.Config(timeout_s=TIMEOUT_S, max_staging_bytes=cap))
        weights = make_rank_weights(cur, rank, 2, layout)
        results["staging", name] = _outcome(lambda ex=ex, w=weights: ex.run(sched, w), weights, cur, tgt, rank)
    return results


@pytest.mark.parametrize("world", [2, 4, 8], ids=lambda w: f"{w}ranks")
def test_rank_raising_at_first_middle_last_round_ends_every_rank(world: int) -> None:
    bad = world // 2
    results = values_or_raise(run_on_ranks(_raise_worker, world, bad, timeout_s=240.0))
    for rank, per_case in enumerate(results):
        for (where, name), out in per_case.items():
            _check_layers(out)
            if where == "staging":  # refused on the bad rank before allocating: nothing moved
                assert out["rank"] == bad and out["round"] is None and out["failed_ranks"] == (bad,)
                assert out["completed_layers"] == () and out["partial_layers"] == (), out["message"]
                assert ("max_staging_bytes" in out["message"]) == (rank == bad), out["message"]
                continue
            assert out["rank"] == bad and out["round"] == out["round_expected"], (where, name, out["message"])
            assert out["failed_ranks"] == (bad,)
            assert f"rank {bad} failed in round {out['round']} transfers" in out["message"], out["message"]
            assert ("injected fault" in out["message"]) == (rank == bad), out["message"]
            assert out["group_usable"] and out["waited_seconds"] is None
            assert out["seconds"] < TIMEOUT_S + MARGIN_S


# --- a rank that exits or sleeps past the timeout ---------------------------------------------------
def _dying_worker(rank: int, world: int, name: str, kind: str, where: str, bad: int) -> dict[str, Any]:
    from eplb.executors.synthetic import make_rank_weights

    sched, cur, tgt, layout = _case(world)
    k = _rounds(sched)[where]

    def fault(ctx: Any) -> None:
        if ctx.rank == bad and ctx.round == k:
            if kind == "exit":
                os._exit(3)
            time.sleep(2 * TIMEOUT_S)

    weights = make_rank_weights(cur, rank, 2, layout)
    out = _outcome(lambda: _executor(name, fault).run(sched, weights), weights, cur, tgt, rank)
    out["round_expected"] = k
    return out


DYING = [  # (ranks, backend, fault, round): each backend, fault and round at least once
    (2, "p2p", "exit", "first"),
    (4, "alltoall", "exit", "middle"),
    (8, "cpu_staged", "exit", "last"),
    (2, "cpu_staged", "sleep", "last"),
    (4, "p2p", "sleep", "first"),
    (8, "alltoall", "sleep", "middle"),
]


@pytest.mark.parametrize(("world", "name", "kind", "where"), DYING, ids=lambda v: str(v))
def test_rank_that_exits_or_hangs_ends_every_survivor_within_the_timeout(
    world: int, name: str, kind: str, where: str
) -> None:
    bad = world - 1
    results = run_on_ranks(_dying_worker, world, name, kind, where, bad, timeout_s=120.0, pg_timeout_s=10.0)
    if kind == "exit":
        assert not results[bad].ok and "exited with code 3" in results[bad].error, results[bad]
    survivors = [r for r in range(world) if r != bad or kind == "sleep"]
    outs = values_or_raise([results[r] for r in survivors])
    for rank, out in zip(survivors, outs, strict=True):
        _check_layers(out)
        assert not out["group_usable"], out["message"]
        assert out["waited_seconds"] is not None and out["waited_seconds"] <= TIMEOUT_S + 1.0, out["message"]
        assert f"rank {rank}:" in out["message"] or f"rank {bad} failed" in out["message"], out["message"]
        if world == 2 and rank != bad:
            assert out["peer"] == bad, out["message"]  # the only other rank: knowable
            assert f"peer {bad} stopped answering" in out["message"], out["message"]
        # A round at or after the fault's; the sleeper itself fails after it wakes.
        assert out["round"] is None or out["round"] >= out["round_expected"], out["message"]
        slept = 2 * TIMEOUT_S if rank == bad else 0.0
        assert out["seconds"] < slept + TIMEOUT_S + MARGIN_S, out
