"""Compile two placements into a migration plan: which slot gets which expert from where.

Per layer and per target rank:

- a slot that already holds its target expert gets no op;
- an expert the rank already holds is copied locally (`Copy`), from a slot that keeps it if any;
- otherwise the rank receives the expert once (`Send`/`Recv`), then copies it to its further
  slots; the sender is a rank on the same node if one holds it, else the holder that has sent
  the least so far (per layer, then per model), so no sender is a hot spot.

Order and staging. A layer's ops are listed as all transfers, then each rank's copies. A Recv
lands in a slot that no op reads from the pre-plan state ("clean"); only when every slot that
wants the expert is also read (it sends or copies its old expert) does it land in a staging
buffer, unstaged by a copy at the end. Copies form a parallel move per rank, ordered so a slot is
read before it is overwritten; a cycle of local copies takes one temporary buffer. So every Send
reads a slot that no op of the layer has written yet, and the scheduler may put a layer's
transfers in any rounds (`eplb.planner.schedule`).
"""

from __future__ import annotations

from collections import defaultdict

from eplb.ir.ops import Copy, Loc, Op, Recv, Send
from eplb.ir.placement import ModelPlacement
from eplb.ir.plan import LayerPlan, MigrationPlan
from eplb.ir.topology import Topology

__all__ = ["compile_plan"]


def compile_plan(
    current: ModelPlacement, target: ModelPlacement, topology: Topology, expert_bytes: int
) -> MigrationPlan:
    """The ops turning ``current`` into ``target`` on ``topology``, each layer in a valid order.

    ``current`` and ``target`` may span different rank counts (a cluster growing or shrinking);
    both must fit ``topology`` and share its ``slots_per_rank``. Raises `InvalidValueError` naming
    the mismatch otherwise.
    """
    # Validate shapes once, with the plan's own messages, before doing any work.
    MigrationPlan(
        topology=topology,
        expert_bytes=expert_bytes,
        current=current,
        target=target,
        layers=tuple(LayerPlan(layer=i) for i in range(target.num_layers)),  # type: ignore[misc]
    )
    sent_total = [0] * topology.num_ranks
    layers = tuple(
        LayerPlan(
            layer=i,
            ops=_compile_layer(  # type: ignore[arg-type]  # attrs converter=tuple
                i,
                current.layers[i].physical_to_logical,
                target.layers[i].physical_to_logical,
                topology,
                sent_total,
            ),
        )
        for i in range(target.num_layers)
    )
    # Every op's rank, slot and expert comes from the validated placements: no per-op scan.
    return MigrationPlan._trusted(
        topology=topology, expert_bytes=expert_bytes, current=current, target=target, layers=layers
    )


def _compile_layer(
    layer: int,
    cur: tuple[int, ...],
    tgt: tuple[int, ...],
    topology: Topology,
    sent_total: list[int],
) -> tuple[Op, ...]:
    """One layer's ops; ``sent_total`` (transfers sent per rank so far) is updated in place.

    Ranks, slots and experts come from validated placements and topology, so they are in range by
    construction: ops are built with the private unchecked constructors (`Send._trusted`, ...).
    """
    s_per = topology.slots_per_rank
    num_tgt = len(tgt) // s_per
    node = topology.rank_to_node
    slot_loc = [Loc.slot(s) for s in range(s_per)]  # looked up per op: a list beats the intern table

    # Slots never written in this layer can be read at any time: ranks leaving the cluster, and
    # slots that keep their expert. best[e][rank]: the slot to read e from on a rank holding it,
    # its first stable slot if any (reading it is free), else its first slot.
    kept = [p < len(tgt) and e == tgt[p] for p, e in enumerate(cur)]
    stable = [p // s_per >= num_tgt or kept[p] for p in range(len(cur))]
    best: dict[int, dict[int, int]] = defaultdict(dict)
    for p in [p for p in range(len(cur)) if stable[p]] + [p for p in range(len(cur)) if not stable[p]]:
        best[cur[p]].setdefault(p // s_per, p % s_per)

    # needs[(rank, expert)]: the rank's slots that must receive the expert, in slot order.
    needs: dict[tuple[int, int], list[int]] = {}
    for p, e in enumerate(tgt):
        if p < len(cur) and kept[p]:
            continue
        r, s = divmod(p, s_per)
        if (r, e) in needs:
            needs[(r, e)].append(s)
        else:
            needs[(r, e)] = [s]

    sent_layer = [0] * topology.num_ranks
    reads: dict[int, set[int]] = defaultdict(set)  # rank -> pre-plan slots read by some op
    moves: dict[int, list[_Move]] = defaultdict(list)  # rank -> its local copies, unordered
    remote: list[tuple[int, int, int, int, list[int]]] = []  # (dst rank, expert, src rank, src slot, slots)
    for (r, e), slots in needs.items():
        holders = best[e]
        own = holders.get(r)
        if own is not None:
            reads[r].add(own)
            src = slot_loc[own]
            moves[r].extend((src, d, e, True) for d in slots)
            continue
        if len(holders) == 1:  # most experts have one replica: no choice to make
            (h,) = holders
        else:  # same node, least sent in this layer, least sent overall, lowest rank
            here = node[r]
            h = min(holders, key=lambda x: (node[x] != here, sent_layer[x], sent_total[x], x))
        sent_layer[h] += 1
        sent_total[h] += 1
        reads[h].add(holders[h])
        remote.append((r, e, h, holders[h], slots))

    transfers: list[Op] = []
    num_buffers: dict[int, int] = defaultdict(int)
    for tid, (r, e, h, src_slot, slots) in enumerate(remote):
        clean = _first_not_in(slots, reads[r])
        if clean is not None:
            land = slot_loc[clean]
            rest = [s for s in slots if s != clean]
        else:  # every wanting slot is still to be read: stage, unstage at the end
            land = Loc.buffer(num_buffers[r])
            num_buffers[r] += 1
            rest = slots
        transfers.append(Send._trusted(layer, tid, h, r, slot_loc[src_slot], e))
        transfers.append(Recv._trusted(layer, tid, h, r, land, e))
        for d in rest:
            moves[r].append((land, d, e, False))

    copies: list[Op] = []
    for r in sorted(moves):
        copies.extend(_order_moves(layer, r, moves[r], Loc.buffer(num_buffers[r]), slot_loc))
    return (*transfers, *copies)


def _first_not_in(slots: list[int], taken: set[int]) -> int | None:
    """The first of ``slots`` not in ``taken`` (a loop: runs once per transfer)."""
    for s in slots:
        if s not in taken:
            return s
    return None


# (source, destination slot, expert, source is a pre-plan slot)
_Move = tuple[Loc, int, int, bool]


def _order_moves(layer: int, rank: int, moves: list[_Move], temp: Loc, slot_loc: list[Loc]) -> list[Copy]:
    """A parallel move as sequential copies: a slot is written only after its old expert was read.

    Sources are pre-plan slots or locations a Recv wrote (never a move's destination). Each
    destination is written once, so what is left when nothing is ready are cycles; one is broken
    by parking a slot's old expert in ``temp`` (reused: a broken cycle drains completely).
    ``slot_loc[s]`` is slot ``s``'s `Loc`.
    """
    pending: dict[int, int] = defaultdict(int)  # pre-plan slot -> unemitted moves reading it
    for src, _, _, pre in moves:
        if pre:
            pending[src.index] += 1
    parked: dict[int, Loc] = {}
    out: list[Copy] = []
    remaining = moves
    while remaining:
        ready = [m for m in remaining if pending[m[1]] == 0]
        if not ready:
            slot = remaining[0][1]
            old = next(e for src, _, e, pre in remaining if pre and src.index == slot)
            out.append(Copy._trusted(layer, rank, slot_loc[slot], temp, old))
            parked[slot] = temp
            pending[slot] = 0
            continue
        for src, dst, e, pre in ready:
            real = parked.get(src.index, src) if pre else src
            out.append(Copy._trusted(layer, rank, real, slot_loc[dst], e))
            if pre:
                pending[src.index] -= 1
        taken = {id(m) for m in ready}
        remaining = [m for m in remaining if id(m) not in taken]
    return out
