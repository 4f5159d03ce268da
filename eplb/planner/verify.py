"""Prove a schedule correct by running it on abstract slots: `verify(schedule)`.

Every slot of every layer and every staging buffer holds ``(layer, expert)`` or nothing. Ranks
below the current placement's rank count start with its experts; ranks beyond it (a growing
cluster) start empty. Each round runs as `eplb.ir.schedule` defines: every rank's ``before``
copies in order, then its group (Sends read at the start, Recvs write at the end), then its
``after`` copies. The expert an op claims must be what its source holds at that moment; this is
how a read after an overwrite, a dropped op or a reordered round shows. At the end every slot of
every rank in the target placement must hold its target expert (ranks that leave end with
whatever). Round rules (matching, per-peer order, peer and op limits, staging) are checked too,
and so are what the schedule allocates (its staging pool against its limits and the buffers its
ops use) and that the rounds run what the embedded plan says (the same transfers, the same slots
written with the same experts).

`_Machine` holds the abstract state; each check is one method yielding `Violation`s, run in
execution order by `_Machine.run`, as ``torch.fx.Graph.lint`` reads. All violations are
collected and raised as one `PlanError`.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator

import attrs

from eplb.ir.errors import PlanError, Violation
from eplb.ir.ops import Copy, Loc, Op, Recv, Send
from eplb.ir.schedule import Schedule

__all__ = ["verify"]

_Content = tuple[int, int]  # (layer, expert)
_Place = tuple[int, str, int, int]  # (rank, "slot" or "buffer", index, layer or -1 for a buffer)
_Key = tuple[int, int]  # (layer, transfer id)


def verify(schedule: Schedule) -> None:
    """Raise `PlanError` listing every violation of ``schedule``; return None if it is correct."""
    out = list(_Machine(schedule).run())
    if out:
        raise PlanError("schedule does not verify", out)


@attrs.define
class _Group:
    """One round's group, indexed for the checks: transfers by key, peers and ops per rank,
    per-pair order on both sides, and the locations its Sends read."""

    sends: dict[_Key, list[Send]] = attrs.field(factory=lambda: defaultdict(list))
    recvs: dict[_Key, list[Recv]] = attrs.field(factory=lambda: defaultdict(list))
    peers: dict[int, set[int]] = attrs.field(factory=lambda: defaultdict(set))
    ops_of: dict[int, int] = attrs.field(factory=lambda: defaultdict(int))
    # (src rank, dst rank) -> transfer keys in listed order, on the sending and receiving side.
    send_order: dict[tuple[int, int], list[_Key]] = attrs.field(factory=lambda: defaultdict(list))
    recv_order: dict[tuple[int, int], list[_Key]] = attrs.field(factory=lambda: defaultdict(list))
    read_locs: dict[_Place, Send] = attrs.field(factory=dict)
    payload: dict[_Key, _Content] = attrs.field(factory=dict)
    written: dict[_Place, Recv] = attrs.field(factory=dict)


class _Machine:
    """Abstract slots and staging buffers running ``schedule``; `run` yields every violation.

    Call order: `check_allocation`; per round `run_copies` (before), `index_group`,
    `check_buffers`, `read_sends`, `check_recv_writes`, `check_matching`, `check_peer_order`,
    `check_limits`, `write_recvs`, `run_copies` (after); then `check_pool_used`,
    `check_plan_is_run` and `check_target`.
    """

    def __init__(self, schedule: Schedule) -> None:
        self.schedule = schedule
        self.plan = schedule.plan
        self.limits = schedule.limits
        self.s_per = self.plan.topology.slots_per_rank
        self.pool = schedule.staging_buffers_per_rank
        self.used = 0  # buffers the ops name: the highest index + 1 on any rank
        self.staged: dict[int, int] = defaultdict(int)  # rank -> values written into buffers
        # What every location holds; a missing key is empty. A location is (rank, kind, index,
        # layer): slots are per layer, staging buffers one pool per rank shared by the layers
        # (layer -1). Kind and index rather than the `Loc`, whose hash is a Python call: this
        # runs per op.
        self.held: dict[_Place, _Content] = {}
        for layer, placement in enumerate(self.plan.current.layers):
            for p, e in enumerate(placement.physical_to_logical):
                self.held[(p // self.s_per, "slot", p % self.s_per, layer)] = (layer, e)

    def run(self) -> Iterator[Violation]:
        yield from self.check_allocation()
        for k, rnd in enumerate(self.schedule.rounds):
            yield from self.run_copies(rnd.before, k)
            g = self.index_group(rnd.transfers)
            yield from self.check_buffers(rnd.transfers, k)
            yield from self.read_sends(g, k)
            yield from self.check_recv_writes(g, k)
            yield from self.check_matching(g, k)
            yield from self.check_peer_order(g, k)
            yield from self.check_limits(g, k)
            self.write_recvs(g)
            yield from self.run_copies(rnd.after, k)
        yield from self.check_pool_used()
        yield from self.check_plan_is_run()
        yield from self.check_target()

    # --- helpers ----------------------------------------------------------------------------
    @staticmethod
    def place(rank: int, loc: Loc, layer: int) -> _Place:
        return (rank, loc.kind, loc.index, -1 if loc.kind == "buffer" else layer)

    @staticmethod
    def misread(op: Send | Copy, rank: int, loc: Loc, k: int, got: _Content | None) -> Violation:
        if got is None:
            state = "is empty (never written, or the rank joins the cluster)"
        else:
            state = f"holds e{got[1]}" + (f" of layer {got[0]}" if got[0] != op.layer else "")
        return Violation(
            what=f"reads e{op.expert} from {loc} but {loc} {state} at that point "
            "(read after overwrite, or a missing or misordered op)",
            fix="read the location before it is overwritten (earlier round or staging), "
            "or restore the op that writes it",
            layer=op.layer,
            round=k,
            rank=rank,
            op=str(op),
        )

    def buffer_violation(self, op: Op, loc: Loc, rank: int, k: int) -> Violation | None:
        """Called for every buffer an op names: records the highest, checks it is in the pool."""
        if loc.index >= self.used:
            self.used = loc.index + 1
        if loc.kind == "buffer" and loc.index >= self.pool:
            return Violation(
                what=f"uses staging buffer {loc} but the pool has {self.pool} buffer(s) per rank",
                fix=f"raise staging_buffers_per_rank to at least {loc.index + 1}",
                layer=op.layer,
                round=k,
                rank=rank,
                op=str(op),
            )
        return None

    # --- what the schedule allocates -----------------------------------------------------------
    def check_allocation(self) -> Iterator[Violation]:
        """The staging pool fits ``staging_bytes_per_rank``: executors allocate the whole pool up
        front, on every rank."""
        schedule, limits, pool = self.schedule, self.limits, self.pool
        eb = self.plan.expert_bytes
        need, budget = schedule.staging_bytes_per_rank, limits.staging_bytes_per_rank
        if budget is not None and need > budget:
            yield Violation(
                what=f"staging pool of {pool} buffer(s) x {eb} B = {need} B per rank exceeds "
                f"staging_bytes_per_rank ({limits.staging_bytes_per_rank} B)",
                fix=f"raise staging_bytes_per_rank to at least {need} or re-schedule under the limit",
            )

    def check_pool_used(self) -> Iterator[Violation]:
        """The pool is no larger than the buffers the ops name (the highest index + 1 on any
        rank) nor than the values any one rank ever stages (its Recvs and Copies into buffers):
        both are tracked while running, so what a schedule allocates is bounded by what it moves."""
        pool, used, eb = self.pool, self.used, self.plan.expert_bytes
        staged = max(self.staged.values(), default=0)
        if pool > used:
            yield Violation(
                what=f"allocates a staging pool of {pool} buffer(s) x {eb} B = {pool * eb} B per rank "
                f"but its ops use {used} buffer(s) ({used * eb} B)",
                fix=f"set staging_buffers_per_rank to {used} (eplb plan computes it)",
            )
        if used > staged:
            yield Violation(
                what=f"names staging buffers up to b{used - 1} but no rank stages more than {staged} "
                f"value(s): a pool of {used} x {eb} B = {used * eb} B per rank for {staged * eb} B staged",
                fix=f"number the buffers from b0 (at most {staged} needed); schedule the plan again "
                "(eplb plan)",
            )

    # --- one round ------------------------------------------------------------------------------
    def run_copies(self, copies: tuple[Copy, ...], k: int) -> Iterator[Violation]:
        held, place = self.held, self.place
        for op in copies:
            rank, src, dst, layer = op.rank, op.src, op.dst, op.layer
            claimed = (layer, op.expert)
            if src.kind == "buffer" and (v := self.buffer_violation(op, src, rank, k)):
                yield v
            got = held.get(place(rank, src, layer))
            if got != claimed:
                yield self.misread(op, rank, src, k, got)
            if dst.kind == "buffer":
                self.staged[rank] += 1
                if v := self.buffer_violation(op, dst, rank, k):
                    yield v
            held[place(rank, dst, layer)] = claimed

    def index_group(self, transfers: tuple[Send | Recv, ...]) -> _Group:
        g, place = _Group(), self.place
        for op in transfers:
            key = (op.layer, op.transfer_id)
            if isinstance(op, Send):
                rank = op.src_rank
                g.peers[rank].add(op.dst_rank)
                g.sends[key].append(op)
                g.read_locs.setdefault(place(rank, op.src, op.layer), op)
                g.send_order[(rank, op.dst_rank)].append(key)
            else:
                rank = op.dst_rank
                g.peers[rank].add(op.src_rank)
                g.recvs[key].append(op)
                g.recv_order[(op.src_rank, rank)].append(key)
            g.ops_of[rank] += 1
        return g

    def check_buffers(self, transfers: tuple[Send | Recv, ...], k: int) -> Iterator[Violation]:
        """Every buffer a transfer names is in the pool."""
        for op in transfers:
            loc = op.src if isinstance(op, Send) else op.dst
            if loc.kind == "buffer":
                if not isinstance(op, Send):
                    self.staged[op.rank] += 1
                if v := self.buffer_violation(op, loc, op.rank, k):
                    yield v

    def read_sends(self, g: _Group, k: int) -> Iterator[Violation]:
        """Sends read at the start of the group: what each claims must be held."""
        for key, group in g.sends.items():
            for op in group:
                claimed = g.payload[key] = (op.layer, op.expert)
                got = self.held.get(self.place(op.src_rank, op.src, op.layer))
                if got != claimed:
                    yield self.misread(op, op.src_rank, op.src, k, got)

    def check_recv_writes(self, g: _Group, k: int) -> Iterator[Violation]:
        """No Recv writes a location a Send of the group reads, or another Recv writes."""
        for group_r in g.recvs.values():
            for rop in group_r:
                at = self.place(rop.rank, rop.dst, rop.layer)
                if at in g.read_locs:
                    yield Violation(
                        what=f"writes {rop.dst} in the group where {g.read_locs[at]} reads it",
                        fix="receive into a staging buffer and copy it in after the group, or move "
                        "the Send to an earlier round",
                        layer=rop.layer,
                        round=k,
                        rank=rop.rank,
                        op=str(rop),
                    )
                if at in g.written:
                    yield Violation(
                        what=f"writes {rop.dst}, which {g.written[at]} also writes in this group",
                        fix="receive into distinct locations",
                        layer=rop.layer,
                        round=k,
                        rank=rop.rank,
                        op=str(rop),
                    )
                g.written[at] = rop

    def check_matching(self, g: _Group, k: int) -> Iterator[Violation]:
        return _unmatched_transfers(g.sends, g.recvs, k, self.schedule)

    def check_peer_order(self, g: _Group, k: int) -> Iterator[Violation]:
        return _peer_order(g.send_order, g.recv_order, k)

    def check_limits(self, g: _Group, k: int) -> Iterator[Violation]:
        """Peers and transfer ops per rank within ``max_peers_per_round``, ``max_ops_per_group``."""
        max_peers, max_ops = self.limits.max_peers_per_round, self.limits.max_ops_per_group
        for rank in sorted(g.peers):
            if max_peers is not None and len(g.peers[rank]) > max_peers:
                yield Violation(
                    what=f"talks to {len(g.peers[rank])} peers {sorted(g.peers[rank])}, more than "
                    f"max_peers_per_round ({max_peers})",
                    fix="split the round (re-schedule under the limit)",
                    round=k,
                    rank=rank,
                )
            if g.ops_of[rank] > max_ops:
                yield Violation(
                    what=f"posts {g.ops_of[rank]} transfers in one group, more than "
                    f"max_ops_per_group ({max_ops})",
                    fix="split the round (re-schedule under the limit)",
                    round=k,
                    rank=rank,
                )

    def write_recvs(self, g: _Group) -> None:
        """Recvs write at the end of the group: the Send's payload if matched, else their claim."""
        for at, rop in g.written.items():
            self.held[at] = g.payload.get((rop.layer, rop.transfer_id), (rop.layer, rop.expert))

    # --- the whole schedule ---------------------------------------------------------------------
    def check_plan_is_run(self) -> Iterator[Violation]:
        yield from _transfers_not_in_plan(self.schedule)
        yield from _slot_writes_not_in_plan(self.schedule)

    def check_target(self) -> Iterator[Violation]:
        """Every slot of the target placement ends with its target expert."""
        for layer, placement in enumerate(self.plan.target.layers):
            for p, e in enumerate(placement.physical_to_logical):
                rank, slot = divmod(p, self.s_per)
                got = self.held.get((rank, "slot", slot, layer))
                if got != (layer, e):
                    state = "is empty" if got is None else f"holds e{got[1]}"
                    yield Violation(
                        what=f"slot s{slot} ends the schedule with the wrong expert: it {state}, "
                        f"the target is e{e}",
                        fix="add or restore the ops that bring the target expert to this slot",
                        layer=layer,
                        rank=rank,
                    )


def _locs(op: Op) -> tuple[Loc, ...]:
    if isinstance(op, Copy):
        return (op.src, op.dst)
    return (op.src,) if isinstance(op, Send) else (op.dst,)


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


def _slot_writes_not_in_plan(schedule: Schedule) -> Iterator[Violation]:
    """The rounds write the slots the plan's Copies and Recvs write, with the same experts, as
    often: the scheduler may land a staged Recv in the slot its copy wrote (one copy fewer) and
    rename buffers, but no slot write may appear or vanish. Recvs must be the plan's too."""
    # The usual case, said fast: most of the rounds' Copies and Recvs are the plan's own objects
    # (the scheduler moves them); only the others are compared by what they say, and the counts
    # are taken over every op only where they differ.
    planned_all: list[Op] = [op for lp in schedule.plan.layers for op in lp.ops if not isinstance(op, Send)]
    round_all: list[Op] = [
        op
        for rnd in schedule.rounds
        for ops in (rnd.before, rnd.transfers, rnd.after)
        for op in ops
        if not isinstance(op, Send)
    ]
    p_ids, r_ids = Counter(map(id, planned_all)), Counter(map(id, round_all))
    if p_ids == r_ids:
        return
    if len(p_ids) == len(planned_all) and len(r_ids) == len(round_all):  # no object twice
        common_ids = p_ids.keys() & r_ids.keys()
        p_left = [op for op in planned_all if id(op) not in common_ids]
        r_left = [op for op in round_all if id(op) not in common_ids]
    else:
        common = p_ids & r_ids
        p_left, r_left = _without(planned_all, common), _without(round_all, common)
    fix = "schedule the plan again (eplb plan) rather than editing rounds or plan by hand"
    p_recv, p_slot = _recv_keys(p_left), _slot_writes(p_left)
    r_recv, r_slot = _recv_keys(r_left), _slot_writes(r_left)
    bad_recv = sorted(t for t in p_recv.keys() | r_recv.keys() if p_recv[t] != r_recv[t])
    bad_slot = sorted(w for w in p_slot.keys() | r_slot.keys() if p_slot[w] != r_slot[w])
    if not bad_recv and not bad_slot:
        return
    p_recv, r_recv = _recv_keys(planned_all), _recv_keys(round_all)
    for t in bad_recv:
        layer, tid, a, b, e = t
        yield Violation(
            what=f"Recv of transfer #{tid} (r{a} -> r{b}, e{e}) is in the plan {p_recv[t]} "
            f"time(s) and in the rounds {r_recv[t]} time(s)",
            fix=fix,
            layer=layer,
            rank=b,
        )
    p_slot, r_slot = _slot_writes(planned_all), _slot_writes(round_all)
    for w in bad_slot:
        layer, rank, slot, e = w
        yield Violation(
            what=f"slot s{slot} is written with e{e} {p_slot[w]} time(s) by the plan's "
            f"Copies and Recvs and {r_slot[w]} time(s) by the rounds",
            fix=fix,
            layer=layer,
            rank=rank,
        )


def _slot_writes(ops: Iterable[Op]) -> Counter[tuple[int, int, int, int]]:
    """(layer, rank, slot, expert) of every Copy and Recv into a slot."""
    out: Counter[tuple[int, int, int, int]] = Counter()
    for op in ops:
        if isinstance(op, (Copy, Recv)) and op.dst.kind == "slot":
            out[(op.layer, op.rank, op.dst.index, op.expert)] += 1
    return out


def _recv_keys(ops: Iterable[Op]) -> Counter[tuple[int, int, int, int, int]]:
    """(layer, transfer id, src rank, dst rank, expert) of every Recv."""
    recvs = [op for op in ops if isinstance(op, Recv)]
    return Counter([(op.layer, op.transfer_id, op.src_rank, op.dst_rank, op.expert) for op in recvs])


def _without(ops: list[Op], common: Counter[int]) -> list[Op]:
    """``ops`` less as many of each object as ``common`` counts (by id)."""
    left = Counter(common)
    out = []
    for op in ops:
        if left[id(op)] > 0:
            left[id(op)] -= 1
        else:
            out.append(op)
    return out
