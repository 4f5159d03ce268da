"""Prove a schedule correct by running it on abstract slots: `verify(schedule)`.

Every slot of every layer and every staging buffer holds ``(layer, expert)`` or nothing. Ranks
below the current placement's rank count start with its experts; ranks beyond it (a growing
cluster) start empty. Each round runs as `eplb.ir.schedule` defines: every rank's ``before``
copies in order, then its group (Sends read at the start, Recvs write at the end), then its
``after`` copies. The expert an op claims must be what its source holds at that moment; this is
how a read after an overwrite, a dropped op or a reordered round shows. At the end every slot of
every rank in the target placement must hold its target expert (ranks that leave end with
whatever). Round rules (matching, per-peer order, peer and op limits, staging) are checked too.
All violations are collected and raised as one `PlanError`.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator

from eplb.ir.errors import PlanError, Violation
from eplb.ir.ops import Copy, Loc, Op, Recv, Send
from eplb.ir.schedule import Schedule

__all__ = ["verify"]

_Content = tuple[int, int]  # (layer, expert)
_Place = tuple[int, str, int, int]  # (rank, "slot" or "buffer", index, layer or -1 for a buffer)


def verify(schedule: Schedule) -> None:
    """Raise `PlanError` listing every violation of ``schedule``; return None if it is correct."""
    plan, limits = schedule.plan, schedule.limits
    s_per = plan.topology.slots_per_rank
    out: list[Violation] = []

    pool = schedule.staging_buffers_per_rank
    if (
        limits.staging_bytes_per_rank is not None
        and schedule.staging_bytes_per_rank > limits.staging_bytes_per_rank
    ):
        need = schedule.staging_bytes_per_rank
        out.append(
            Violation(
                what=f"staging pool of {pool} buffer(s) x {plan.expert_bytes} B = {need} B per rank exceeds "
                f"staging_bytes_per_rank ({limits.staging_bytes_per_rank} B)",
                fix=f"raise staging_bytes_per_rank to at least {need} or re-schedule under the limit",
            )
        )

    # What every location holds; a missing key is empty. A location is (rank, kind, index, layer):
    # slots are per layer, staging buffers one pool per rank shared by the layers (layer -1).
    # Kind and index rather than the `Loc`, whose hash is a Python call: this runs per op.
    held: dict[_Place, _Content] = {}
    for layer, placement in enumerate(plan.current.layers):
        for p, e in enumerate(placement.physical_to_logical):
            held[(p // s_per, "slot", p % s_per, layer)] = (layer, e)

    def place(rank: int, loc: Loc, layer: int) -> _Place:
        return (rank, loc.kind, loc.index, -1 if loc.kind == "buffer" else layer)

    def misread(op: Send | Copy, rank: int, loc: Loc, k: int, got: _Content | None) -> None:
        if got is None:
            state = "is empty (never written, or the rank joins the cluster)"
        else:
            state = f"holds e{got[1]}" + (f" of layer {got[0]}" if got[0] != op.layer else "")
        out.append(
            Violation(
                what=f"reads e{op.expert} from {loc} but {loc} {state} at that point "
                "(read after overwrite, or a missing or misordered op)",
                fix="read the location before it is overwritten (earlier round or staging), "
                "or restore the op that writes it",
                layer=op.layer,
                round=k,
                rank=rank,
                op=str(op),
            )
        )

    def check_buffer(op: Send | Recv | Copy, loc: Loc, rank: int, k: int) -> None:
        if loc.kind == "buffer" and loc.index >= pool:
            out.append(
                Violation(
                    what=f"uses staging buffer {loc} but the pool has {pool} buffer(s) per rank",
                    fix=f"raise staging_buffers_per_rank to at least {loc.index + 1}",
                    layer=op.layer,
                    round=k,
                    rank=rank,
                    op=str(op),
                )
            )

    def run_copies(copies: tuple[Copy, ...], k: int) -> None:
        for op in copies:
            rank, src, dst, layer = op.rank, op.src, op.dst, op.layer
            claimed = (layer, op.expert)
            if src.kind == "buffer":
                check_buffer(op, src, rank, k)
            got = held.get(place(rank, src, layer))
            if got != claimed:
                misread(op, rank, src, k, got)
            if dst.kind == "buffer":
                check_buffer(op, dst, rank, k)
            held[place(rank, dst, layer)] = claimed

    max_peers, max_ops = limits.max_peers_per_round, limits.max_ops_per_group
    for k, rnd in enumerate(schedule.rounds):
        run_copies(rnd.before, k)

        sends: dict[tuple[int, int], list[Send]] = defaultdict(list)
        recvs: dict[tuple[int, int], list[Recv]] = defaultdict(list)
        peers: dict[int, set[int]] = defaultdict(set)
        ops_of: dict[int, int] = defaultdict(int)
        # (src rank, dst rank) -> transfer keys in listed order, on the sending and receiving side.
        send_order: dict[tuple[int, int], list[tuple[int, int]]] = defaultdict(list)
        recv_order: dict[tuple[int, int], list[tuple[int, int]]] = defaultdict(list)
        read_locs: dict[_Place, Send] = {}
        for op in rnd.transfers:
            key = (op.layer, op.transfer_id)
            if isinstance(op, Send):
                rank = op.src_rank
                peers[rank].add(op.dst_rank)
                sends[key].append(op)
                if op.src.kind == "buffer":
                    check_buffer(op, op.src, rank, k)
                read_locs.setdefault(place(rank, op.src, op.layer), op)
                send_order[(rank, op.dst_rank)].append(key)
            else:
                rank = op.dst_rank
                peers[rank].add(op.src_rank)
                recvs[key].append(op)
                if op.dst.kind == "buffer":
                    check_buffer(op, op.dst, rank, k)
                recv_order[(op.src_rank, rank)].append(key)
            ops_of[rank] += 1

        # Sends read at the start of the group: what each claims, a violation if that is not held.
        payload: dict[tuple[int, int], _Content] = {}
        for key, group in sends.items():
            for op in group:
                claimed = payload[key] = (op.layer, op.expert)
                got = held.get(place(op.src_rank, op.src, op.layer))
                if got != claimed:
                    misread(op, op.src_rank, op.src, k, got)

        written: dict[_Place, Recv] = {}
        for group_r in recvs.values():
            for rop in group_r:
                at = place(rop.rank, rop.dst, rop.layer)
                if at in read_locs:
                    out.append(
                        Violation(
                            what=f"writes {rop.dst} in the group where {read_locs[at]} reads it",
                            fix="receive into a staging buffer and copy it in after the group, or move "
                            "the Send to an earlier round",
                            layer=rop.layer,
                            round=k,
                            rank=rop.rank,
                            op=str(rop),
                        )
                    )
                if at in written:
                    out.append(
                        Violation(
                            what=f"writes {rop.dst}, which {written[at]} also writes in this group",
                            fix="receive into distinct locations",
                            layer=rop.layer,
                            round=k,
                            rank=rop.rank,
                            op=str(rop),
                        )
                    )
                written[at] = rop

        out.extend(_unmatched_transfers(sends, recvs, k, schedule))
        out.extend(_peer_order(send_order, recv_order, k))

        for rank in sorted(peers):
            if max_peers is not None and len(peers[rank]) > max_peers:
                out.append(
                    Violation(
                        what=f"talks to {len(peers[rank])} peers {sorted(peers[rank])}, more than "
                        f"max_peers_per_round ({max_peers})",
                        fix="split the round (re-schedule under the limit)",
                        round=k,
                        rank=rank,
                    )
                )
            if ops_of[rank] > max_ops:
                out.append(
                    Violation(
                        what=f"posts {ops_of[rank]} transfers in one group, more than "
                        f"max_ops_per_group ({max_ops})",
                        fix="split the round (re-schedule under the limit)",
                        round=k,
                        rank=rank,
                    )
                )

        # Recvs write at the end of the group: the Send's payload if matched, else what it claims.
        for at, rop in written.items():
            held[at] = payload.get((rop.layer, rop.transfer_id), (rop.layer, rop.expert))

        run_copies(rnd.after, k)

    out.extend(_transfers_not_in_plan(schedule))

    for layer, placement in enumerate(plan.target.layers):
        for p, e in enumerate(placement.physical_to_logical):
            rank, slot = divmod(p, s_per)
            got = held.get((rank, "slot", slot, layer))
            if got != (layer, e):
                state = "is empty" if got is None else f"holds e{got[1]}"
                out.append(
                    Violation(
                        what=f"slot s{slot} ends the schedule with the wrong expert: it {state}, "
                        f"the target is e{e}",
                        fix="add or restore the ops that bring the target expert to this slot",
                        layer=layer,
                        rank=rank,
                    )
                )
    if out:
        raise PlanError("schedule does not verify", out)


def _unmatched_transfers(
    sends: dict[tuple[int, int], list[Send]],
    recvs: dict[tuple[int, int], list[Recv]],
    k: int,
    schedule: Schedule,
) -> Iterator[Violation]:
    """Transfers of round ``k`` without exactly one Send and one Recv that agree, by (layer, id)."""

    def agree(s_ops: list[Send], r_ops: list[Recv] | None) -> bool:
        if r_ops is None or len(s_ops) != 1 or len(r_ops) != 1:
            return False
        s, r = s_ops[0], r_ops[0]
        return (s.src_rank, s.dst_rank, s.expert) == (r.src_rank, r.dst_rank, r.expert)

    # Almost every transfer is matched: only the others are sorted and described.
    bad = [key for key, s_ops in sends.items() if not agree(s_ops, recvs.get(key))]
    bad += [key for key in recvs if key not in sends]
    bad.sort()
    if not bad:
        return
    # Where each transfer's Send and Recv sit, to say "its Recv is in round 4".
    send_round: dict[tuple[int, int], list[int]] = defaultdict(list)
    recv_round: dict[tuple[int, int], list[int]] = defaultdict(list)
    for j, rnd in enumerate(schedule.rounds):
        for op in rnd.transfers:
            (send_round if isinstance(op, Send) else recv_round)[(op.layer, op.transfer_id)].append(j)
    for key in bad:
        s_ops, r_ops = sends.get(key, []), recvs.get(key, [])
        if len(s_ops) == 1 and len(r_ops) == 1:
            s, r = s_ops[0], r_ops[0]
            yield Violation(
                what=f"Send {s} and Recv {r} share transfer #{key[1]} but differ in ranks or expert",
                fix="give both ops the same src_rank, dst_rank and expert",
                layer=key[0],
                round=k,
                rank=r.rank,
                op=str(r),
            )
            continue
        both: list[Send | Recv] = [*s_ops, *r_ops]
        for op in both:
            n_mine = len(s_ops) if isinstance(op, Send) else len(r_ops)
            n_theirs = len(r_ops) if isinstance(op, Send) else len(s_ops)
            other = "Recv" if isinstance(op, Send) else "Send"
            elsewhere = sorted(set((recv_round if isinstance(op, Send) else send_round)[key]) - {k})
            if n_theirs == 0:
                hint = f"its {other} is in round(s) {elsewhere}" if elsewhere else f"it has no {other}"
                what = f"{op.kind.capitalize()} of transfer #{key[1]} is unmatched in this round: {hint}"
                fix = f"put the {other} in round {k}"
                if not elsewhere:
                    fix = f"add the matching {other} or drop this op"
            else:
                what = (
                    f"transfer #{key[1]} has {n_mine} {op.kind}(s) and {n_theirs} "
                    f"{other.lower()}(s) in this round"
                )
                fix = "give every transfer exactly one Send and one Recv"
            yield Violation(what=what, fix=fix, layer=key[0], round=k, rank=op.rank, op=str(op))


def _peer_order(
    send_order: dict[tuple[int, int], list[tuple[int, int]]],
    recv_order: dict[tuple[int, int], list[tuple[int, int]]],
    k: int,
) -> Iterator[Violation]:
    """Rank pairs of round ``k`` whose sends and receives (transfer keys in listed order, per
    (src rank, dst rank)) disagree on the order of the transfers both list."""
    for (a, b), keys in send_order.items():
        recv_keys = recv_order.get((a, b), [])
        if keys == recv_keys:
            continue  # the usual case; the filtered comparison below covers partial overlaps
        mine_set, their_set = set(keys), set(recv_keys)
        if [x for x in keys if x in their_set] != [x for x in recv_keys if x in mine_set]:
            yield Violation(
                what=f"rank {a} lists its sends to rank {b} in the order {keys} but rank {b} "
                f"lists the receives in the order {recv_keys} (NCCL runs calls to one peer in order)",
                fix="list the Recvs on the receiver in the order of the Sends",
                round=k,
                rank=a,
            )


def _transfers_not_in_plan(schedule: Schedule) -> Iterator[Violation]:
    """The rounds must run exactly the plan's transfers (``inspect`` reports the plan's figures,
    and a reviewer reads the plan): each Send once, same layer, id, ranks and expert."""

    def keys(ops: Iterable[Op]) -> Iterator[tuple[int, int, int, int, int]]:
        sends = (op for op in ops if isinstance(op, Send))
        return ((op.layer, op.transfer_id, op.src_rank, op.dst_rank, op.expert) for op in sends)

    planned_ops = [op for lp in schedule.plan.layers for op in lp.ops if isinstance(op, Send)]
    round_ops = [op for rnd in schedule.rounds for op in rnd.transfers if isinstance(op, Send)]
    # The usual case, said fast: the rounds hold the plan's own Send objects (the scheduler moves
    # them, it does not rebuild them), each once. Otherwise compare what the ops say.
    if sorted(map(id, planned_ops)) == sorted(map(id, round_ops)):
        return
    planned = Counter(keys(planned_ops))
    if planned == Counter(keys(round_ops)):
        return
    rounds_of: dict[tuple[int, int, int, int, int], list[int]] = defaultdict(list)
    for k, rnd in enumerate(schedule.rounds):
        for t in keys(rnd.transfers):
            rounds_of[t].append(k)
    for t in sorted(planned.keys() | rounds_of.keys()):
        n_plan, ks = planned.get(t, 0), rounds_of.get(t, [])
        if n_plan == len(ks):
            continue
        layer, tid, a, b, e = t
        where = f"round(s) {ks}" if ks else "no round"
        yield Violation(
            what=f"transfer #{tid} (r{a} -> r{b}, e{e}) is in the plan {n_plan} time(s) and in {where}",
            fix="schedule the plan again (eplb plan) rather than editing rounds or plan by hand",
            layer=layer,
            round=ks[0] if ks else None,
            rank=a,
        )
