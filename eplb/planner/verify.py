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
from collections.abc import Iterator

from eplb.ir.errors import PlanError, Violation
from eplb.ir.ops import Copy, Loc, Recv, Send
from eplb.ir.schedule import Schedule

__all__ = ["verify"]

_Content = tuple[int, int]  # (layer, expert)


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

    # slots[(layer, rank, slot)] and buffers[(rank, index)]; missing key = empty.
    slots: dict[tuple[int, int, int], _Content] = {}
    for layer, placement in enumerate(plan.current.layers):
        for p, e in enumerate(placement.physical_to_logical):
            slots[(layer, p // s_per, p % s_per)] = (layer, e)
    buffers: dict[tuple[int, int], _Content] = {}

    def place(rank: int, loc: Loc, layer: int) -> tuple[int, Loc, int]:
        # Slots are per layer; staging buffers are one pool per rank shared by the layers.
        return (rank, loc, -1 if loc.kind == "buffer" else layer)

    def get(rank: int, loc: Loc, layer: int) -> _Content | None:
        if loc.kind == "buffer":
            return buffers.get((rank, loc.index))
        return slots.get((layer, rank, loc.index))

    def put(rank: int, loc: Loc, layer: int, content: _Content | None) -> None:
        if loc.kind == "buffer":
            if content is None:
                buffers.pop((rank, loc.index), None)
            else:
                buffers[(rank, loc.index)] = content
        elif content is None:
            slots.pop((layer, rank, loc.index), None)
        else:
            slots[(layer, rank, loc.index)] = content

    def misread(op: Send | Copy, rank: int, loc: Loc, k: int, held: _Content | None) -> None:
        if held is None:
            state = "is empty (never written, or the rank joins the cluster)"
        else:
            state = f"holds e{held[1]}" + (f" of layer {held[0]}" if held[0] != op.layer else "")
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

    def check_read(op: Send | Copy, rank: int, loc: Loc, k: int) -> _Content:
        """What ``op`` reads; a violation if that is not the expert it claims."""
        claimed = (op.layer, op.expert)
        held = get(rank, loc, op.layer)
        if held != claimed:
            misread(op, rank, loc, k, held)
        return claimed

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
                held = buffers.get((rank, src.index))
            else:
                held = slots.get((layer, rank, src.index))
            if held != claimed:
                misread(op, rank, src, k, held)
            if dst.kind == "buffer":
                check_buffer(op, dst, rank, k)
                buffers[(rank, dst.index)] = claimed
            else:
                slots[(layer, rank, dst.index)] = claimed

    # Where each transfer's Send and Recv sit, to say "its Recv is in round 4".
    send_round: dict[tuple[int, int], list[int]] = defaultdict(list)
    recv_round: dict[tuple[int, int], list[int]] = defaultdict(list)
    for k, rnd in enumerate(schedule.rounds):
        for op in rnd.transfers:
            (send_round if isinstance(op, Send) else recv_round)[(op.layer, op.transfer_id)].append(k)

    max_peers, max_ops = limits.max_peers_per_round, limits.max_ops_per_group
    for k, rnd in enumerate(schedule.rounds):
        run_copies(rnd.before, k)

        sends: dict[tuple[int, int], list[Send]] = defaultdict(list)
        recvs: dict[tuple[int, int], list[Recv]] = defaultdict(list)
        peers: dict[int, set[int]] = defaultdict(set)
        ops_of: dict[int, int] = defaultdict(int)
        order: dict[tuple[int, int, str], list[tuple[int, int]]] = defaultdict(list)
        read_locs: dict[tuple[int, Loc, int], Send] = {}
        for op in rnd.transfers:
            key = (op.layer, op.transfer_id)
            if isinstance(op, Send):
                rank = op.src_rank
                peers[rank].add(op.dst_rank)
                sends[key].append(op)
                if op.src.kind == "buffer":
                    check_buffer(op, op.src, rank, k)
                read_locs.setdefault(place(rank, op.src, op.layer), op)
            else:
                rank = op.dst_rank
                peers[rank].add(op.src_rank)
                recvs[key].append(op)
                if op.dst.kind == "buffer":
                    check_buffer(op, op.dst, rank, k)
            ops_of[rank] += 1
            order[(op.src_rank, op.dst_rank, op.kind)].append(key)

        # Sends read at the start of the group.
        payload: dict[tuple[int, int], _Content] = {}
        for key, group in sends.items():
            for op in group:
                payload[key] = check_read(op, op.src_rank, op.src, k)

        written: dict[tuple[int, Loc, int], Recv] = {}
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

        for key in sorted(set(sends) | set(recvs)):
            s_ops, r_ops = sends.get(key, []), recvs.get(key, [])
            if len(s_ops) == 1 and len(r_ops) == 1:
                s, r = s_ops[0], r_ops[0]
                if (s.src_rank, s.dst_rank, s.expert) != (r.src_rank, r.dst_rank, r.expert):
                    out.append(
                        Violation(
                            what=f"Send {s} and Recv {r} share transfer #{key[1]} but differ in ranks "
                            "or expert",
                            fix="give both ops the same src_rank, dst_rank and expert",
                            layer=key[0],
                            round=k,
                            rank=r.rank,
                            op=str(r),
                        )
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
                    fix = (
                        f"put the {other} in round {k}"
                        if elsewhere
                        else f"add the matching {other} or drop this op"
                    )
                else:
                    what = (
                        f"transfer #{key[1]} has {n_mine} {op.kind}(s) and {n_theirs} "
                        f"{other.lower()}(s) in this round"
                    )
                    fix = "give every transfer exactly one Send and one Recv"
                out.append(Violation(what=what, fix=fix, layer=key[0], round=k, rank=op.rank, op=str(op)))

        for (a, b, kind), keys in order.items():
            if kind != "send":
                continue
            recv_keys = order.get((a, b, "recv"), [])
            mine_set, their_set = set(keys), set(recv_keys)
            if [x for x in keys if x in their_set] != [x for x in recv_keys if x in mine_set]:
                out.append(
                    Violation(
                        what=f"rank {a} lists its sends to rank {b} in the order {keys} but rank {b} "
                        f"lists the receives in the order {recv_keys} (NCCL runs calls to one peer in order)",
                        fix="list the Recvs on the receiver in the order of the Sends",
                        round=k,
                        rank=a,
                    )
                )

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
        for key, group_r in recvs.items():
            for rop in group_r:
                put(rop.rank, rop.dst, rop.layer, payload.get(key, (rop.layer, rop.expert)))

        run_copies(rnd.after, k)

    out.extend(_transfers_not_in_plan(schedule))

    for layer, placement in enumerate(plan.target.layers):
        for p, e in enumerate(placement.physical_to_logical):
            rank, slot = divmod(p, s_per)
            held = slots.get((layer, rank, slot))
            if held != (layer, e):
                state = "is empty" if held is None else f"holds e{held[1]}"
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


def _transfers_not_in_plan(schedule: Schedule) -> Iterator[Violation]:
    """The rounds must run exactly the plan's transfers (``inspect`` reports the plan's figures,
    and a reviewer reads the plan): each Send once, same layer, id, ranks and expert."""

    def key(op: Send) -> tuple[int, int, int, int, int]:
        return (op.layer, op.transfer_id, op.src_rank, op.dst_rank, op.expert)

    planned = Counter(key(op) for op in schedule.plan.ops() if isinstance(op, Send))
    rounds_of: dict[tuple[int, int, int, int, int], list[int]] = defaultdict(list)
    for k, rnd in enumerate(schedule.rounds):
        for op in rnd.transfers:
            if isinstance(op, Send):
                rounds_of[key(op)].append(k)
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
