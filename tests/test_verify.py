"""Tier 1 (pure Python): the verifier proves good schedules and names every way a bad one fails."""

from __future__ import annotations

from typing import Any

import attrs
import pytest

from eplb.ir import (
    Copy,
    Loc,
    ModelPlacement,
    PlanError,
    Recv,
    Round,
    Schedule,
    ScheduleLimits,
    Send,
    Topology,
)
from eplb.planner.compile import compile_plan
from eplb.planner.schedule import schedule
from eplb.planner.verify import verify


def swap_schedule(limits: ScheduleLimits | None = None) -> Schedule:
    """Four ranks x 2 slots; rank 0 trades with three peers, both its slots send and receive."""
    topo = Topology.uniform(4, 2)
    cur = ModelPlacement.from_lists([[0, 1, 2, 3, 4, 5, 6, 7]], num_ranks=4)
    tgt = ModelPlacement.from_lists([[2, 4, 0, 3, 6, 7, 1, 5]], num_ranks=4)
    s = schedule(compile_plan(cur, tgt, topo, 10), limits or ScheduleLimits(max_peers_per_round=1))
    verify(s)
    return s


def replace_round(s: Schedule, k: int, **changes: object) -> Schedule:
    rounds = list(s.rounds)
    rounds[k] = attrs.evolve(rounds[k], **changes)
    return attrs.evolve(s, rounds=rounds)


def test_valid_schedule_verifies() -> None:
    s = swap_schedule()
    assert s.num_rounds >= 2 and s.staging_buffers_per_rank >= 1


def test_dropped_send_is_caught() -> None:
    s = swap_schedule()
    send = next(op for op in s.rounds[0].transfers if isinstance(op, Send))
    bad = replace_round(s, 0, transfers=[op for op in s.rounds[0].transfers if op != send])
    with pytest.raises(
        PlanError, match=r"Recv of transfer #\d+ is unmatched in this round: it has no Send"
    ) as info:
        verify(bad)
    assert info.value.violations[0].round == 0


def test_dropped_copy_leaves_the_wrong_expert() -> None:
    s = swap_schedule()
    k = next(i for i, r in enumerate(s.rounds) if r.after)
    bad = replace_round(s, k, after=s.rounds[k].after[1:])
    with pytest.raises(PlanError, match=r"slot s\d ends the schedule with the wrong expert"):
        verify(bad)


def test_recv_moved_to_another_round_is_caught() -> None:
    s = swap_schedule()
    recv = next(op for op in s.rounds[0].transfers if isinstance(op, Recv))
    bad = replace_round(s, 0, transfers=[op for op in s.rounds[0].transfers if op != recv])
    bad = replace_round(bad, 1, transfers=[*bad.rounds[1].transfers, recv])
    with pytest.raises(
        PlanError, match=r"Send of transfer #\d+ is unmatched in this round: its Recv is in round\(s\) \[1\]"
    ):
        verify(bad)


def test_swapped_rounds_read_after_overwrite() -> None:
    """r0 sends e0 from s0 (round 0), then receives e2 into s0 (round 1): no staging needed.
    With the rounds swapped, s0 is overwritten before it is sent."""
    topo = Topology.uniform(2, 2)
    cur = ModelPlacement.from_lists([[0, 1, 2, 2]], num_ranks=2)
    tgt = ModelPlacement.from_lists([[2, 1, 2, 0]], num_ranks=2)
    plan = compile_plan(cur, tgt, topo, 10)
    first = Round(
        transfers=[
            Send(layer=0, transfer_id=1, src_rank=0, dst_rank=1, src=Loc.slot(0), expert=0),
            Recv(layer=0, transfer_id=1, src_rank=0, dst_rank=1, dst=Loc.slot(1), expert=0),
        ]
    )
    second = Round(  # the plan's transfer #0, received straight into s0 instead of via b0
        transfers=[
            Send(layer=0, transfer_id=0, src_rank=1, dst_rank=0, src=Loc.slot(0), expert=2),
            Recv(layer=0, transfer_id=0, src_rank=1, dst_rank=0, dst=Loc.slot(0), expert=2),
        ]
    )
    good = Schedule(plan=plan, rounds=[first, second], rounds_lower_bound=1)
    verify(good)
    with pytest.raises(
        PlanError, match=r"reads e0 from s0 but s0 holds e2 at that point \(read after overwrite"
    ):
        verify(attrs.evolve(good, rounds=[second, first]))


def test_swapped_rounds_of_a_compiled_schedule() -> None:
    """Unstaging copies run after the rank's last round; run that round first and they read an
    empty buffer."""
    s = swap_schedule()
    last = s.num_rounds - 1
    assert last > 0 and s.rounds[last].after
    rounds = list(s.rounds)
    rounds[0], rounds[last] = rounds[last], rounds[0]
    with pytest.raises(PlanError, match=r"reads e\d+ from b\d but b\d is empty"):
        verify(attrs.evolve(s, rounds=rounds))


def test_overwriting_a_source_early_is_caught() -> None:
    """Move the unstaging copy (buffer -> slot) before the group whose Send reads that slot."""
    s = swap_schedule(ScheduleLimits())
    (rnd,) = s.rounds
    unstage = next(c for c in rnd.after if c.src.is_buffer)
    reader = next(
        op
        for op in rnd.transfers
        if isinstance(op, Send) and op.rank == unstage.rank and op.src == unstage.dst
    )
    # The slot is filled straight from its old... a copy from another slot of the same rank:
    other = Loc.slot(1 - unstage.dst.index)
    early = Copy(
        layer=0,
        rank=unstage.rank,
        src=other,
        dst=unstage.dst,
        expert=s.plan.current.layers[0].physical_to_logical[unstage.rank * 2 + other.index],
    )
    bad = replace_round(s, 0, before=[early])
    with pytest.raises(
        PlanError,
        match=rf"reads e{reader.expert} from {reader.src} but {reader.src} holds e\d+ at that point",
    ):
        verify(bad)


def test_recv_into_a_slot_its_group_sends_is_caught() -> None:
    s = swap_schedule(ScheduleLimits())
    (rnd,) = s.rounds
    recv = next(op for op in rnd.transfers if isinstance(op, Recv) and op.dst.is_buffer)
    unstage = next(c for c in rnd.after if c.rank == recv.rank and c.src == recv.dst)
    direct = attrs.evolve(recv, dst=unstage.dst)
    bad = replace_round(
        s,
        0,
        transfers=[direct if op == recv else op for op in rnd.transfers],
        after=[c for c in rnd.after if c != unstage],
    )
    with pytest.raises(PlanError, match=r"writes s\d in the group where .* reads it"):
        verify(bad)


def test_exceeding_staging_is_caught() -> None:
    s = swap_schedule(ScheduleLimits())
    n = s.staging_buffers_per_rank
    assert n >= 1
    tight = attrs.evolve(s, limits=ScheduleLimits(staging_bytes_per_rank=5))
    with pytest.raises(
        PlanError,
        match=rf"staging pool of {n} buffer\(s\) x 10 B = {n * 10} B per rank exceeds staging_bytes_per_rank \(5 B\)",
    ):
        verify(tight)


def test_peer_and_op_limits_are_checked() -> None:
    s = swap_schedule(ScheduleLimits())
    with pytest.raises(PlanError, match=r"talks to 3 peers .* more than max_peers_per_round \(1\)"):
        verify(attrs.evolve(s, limits=ScheduleLimits(max_peers_per_round=1)))
    with pytest.raises(
        PlanError, match=r"posts \d+ transfers in one group, more than max_ops_per_group \(1\)"
    ):
        verify(attrs.evolve(s, limits=ScheduleLimits(max_ops_per_group=1)))


def test_per_peer_order_must_agree() -> None:
    topo = Topology.uniform(2, 2)
    cur = ModelPlacement.from_lists([[0, 1, 2, 3]], num_ranks=2)
    plan = compile_plan(cur, ModelPlacement.from_lists([[2, 3, 0, 1]], num_ranks=2), topo, 10)
    s = schedule(plan, ScheduleLimits())
    verify(s)
    (rnd,) = s.rounds
    recvs = [op for op in rnd.transfers if isinstance(op, Recv) and op.rank == 1]
    assert len(recvs) == 2
    reordered = [op for op in rnd.transfers if op not in recvs] + recvs[::-1]
    with pytest.raises(
        PlanError,
        match=r"rank 0 lists its sends to rank 1 in the order .* but rank 1 lists the receives in the order",
    ):
        verify(replace_round(s, 0, transfers=reordered))


def test_mismatched_expert_and_every_violation_listed() -> None:
    s = swap_schedule(ScheduleLimits())
    (rnd,) = s.rounds
    recv = next(op for op in rnd.transfers if isinstance(op, Recv))
    wrong = attrs.evolve(recv, expert=(recv.expert + 1) % 8)
    bad = replace_round(s, 0, transfers=[wrong if op == recv else op for op in rnd.transfers])
    bad = attrs.evolve(bad, limits=ScheduleLimits(staging_bytes_per_rank=1))
    with pytest.raises(PlanError) as info:
        verify(bad)
    text = str(info.value)
    assert "differ in ranks or expert" in text and "staging pool" in text
    assert len(info.value.violations) >= 2


def test_joining_rank_starts_empty() -> None:
    """Rank 2 joins: it has nothing to send; a Send from it reads an empty slot."""
    topo = Topology.uniform(3, 1)
    cur = ModelPlacement.from_lists([[0, 1]], num_ranks=2)
    tgt = ModelPlacement.from_lists([[0, 1, 1]], num_ranks=3)
    s = schedule(compile_plan(cur, tgt, topo, 10), ScheduleLimits())
    verify(s)
    send = Send(layer=0, transfer_id=99, src_rank=2, dst_rank=0, src=Loc.slot(0), expert=1)
    recv = Recv(layer=0, transfer_id=99, src_rank=2, dst_rank=0, dst=Loc.buffer(0), expert=1)
    bad = attrs.evolve(s, rounds=[Round(transfers=[send, recv]), *s.rounds], staging_buffers_per_rank=1)
    with pytest.raises(
        PlanError, match=r"reads e1 from s0 but s0 is empty \(never written, or the rank joins"
    ):
        verify(bad)


def test_rounds_must_run_exactly_the_plans_transfers() -> None:
    # The rounds still reach the target, but the plan a reviewer reads (and `inspect` counts) lost
    # a transfer: the schedule is refused.
    s = swap_schedule()
    send = next(op for op in s.plan.ops() if isinstance(op, Send))
    lp = s.plan.layers[0]
    kept = [op for op in lp.ops if getattr(op, "transfer_id", None) != send.transfer_id]
    plan = attrs.evolve(s.plan, layers=[attrs.evolve(lp, ops=kept)])
    with pytest.raises(
        PlanError,
        match=rf"transfer #{send.transfer_id} \(r{send.src_rank} -> r{send.dst_rank}, "
        rf"e{send.expert}\) is in the plan 0 time\(s\) and in round\(s\) \[\d+\]",
    ):
        verify(attrs.evolve(s, plan=plan))


def test_staging_pool_is_bounded_by_the_buffers_its_ops_use() -> None:
    # No staging limit: only the buffers the ops name bound what executors allocate up front.
    s = swap_schedule(ScheduleLimits(staging_bytes_per_rank=None))
    used = s.staging_buffers_per_rank
    assert used >= 1
    huge = attrs.evolve(s, staging_buffers_per_rank=3_000_000)
    with pytest.raises(
        PlanError,
        match=rf"allocates a staging pool of 3000000 buffer\(s\) x 10 B = 30000000 B per rank but its "
        rf"ops use {used} buffer\(s\) \({used * 10} B\)",
    ) as info:
        verify(huge)
    assert f"set staging_buffers_per_rank to {used}" in info.value.violations[0].fix


def test_plan_copies_must_be_what_the_rounds_run() -> None:
    # The rounds reach the target, but the embedded plan (what `inspect` counts) lists a local
    # copy twice: the schedule is refused.
    s = swap_schedule(ScheduleLimits())
    lp = s.plan.layers[0]
    copy = next(op for op in lp.ops if isinstance(op, Copy) and not op.dst.is_buffer)
    plan = attrs.evolve(s.plan, layers=[attrs.evolve(lp, ops=[*lp.ops, copy])])
    with pytest.raises(
        PlanError,
        match=rf"slot s{copy.dst.index} is written with e{copy.expert} 2 time\(s\) by the plan's "
        r"Copies and Recvs and 1 time\(s\) by the rounds",
    ):
        verify(attrs.evolve(s, plan=plan))


def test_plan_recvs_must_be_what_the_rounds_run() -> None:
    s = swap_schedule(ScheduleLimits())
    lp = s.plan.layers[0]
    recv = next(op for op in lp.ops if isinstance(op, Recv))
    other = attrs.evolve(recv, expert=(recv.expert + 1) % 8)
    plan = attrs.evolve(s.plan, layers=[attrs.evolve(lp, ops=[other if op is recv else op for op in lp.ops])])
    with pytest.raises(PlanError, match=rf"Recv of transfer #{recv.transfer_id} .* is in the plan 0 time\(s\)"):
        verify(attrs.evolve(s, plan=plan))


def test_staging_pool_is_bounded_by_the_values_it_stages() -> None:
    # The staged values renamed to end at b2999999: the pool matches the names, but n buffers do.
    s = swap_schedule(ScheduleLimits(staging_bytes_per_rank=None))
    shift = 3_000_000 - s.staging_buffers_per_rank

    def rename(op: Any) -> Any:
        if isinstance(op, Recv) and op.dst.is_buffer:
            return attrs.evolve(op, dst=Loc.buffer(op.dst.index + shift))
        if isinstance(op, Copy) and op.src.is_buffer:
            return attrs.evolve(op, src=Loc.buffer(op.src.index + shift))
        return op

    rounds = [
        attrs.evolve(
            r,
            before=[rename(c) for c in r.before],
            transfers=[rename(t) for t in r.transfers],
            after=[rename(c) for c in r.after],
        )
        for r in s.rounds
    ]
    bad = attrs.evolve(s, rounds=rounds, staging_buffers_per_rank=3_000_000)
    with pytest.raises(
        PlanError, match=r"names staging buffers up to b2999999 but no rank stages more than \d+ value"
    ):
        verify(bad)
