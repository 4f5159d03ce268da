"""``migration_aware``: keep experts where they are unless moving them buys balance.

Each layer whose current placement is already within ``tolerance`` (balancedness points) of a
fresh `balanced` plan stays exactly as it is. For the others, with ``T = mean / (fresh - tolerance)``
the busiest load a rank may carry, a greedy local search edits the current placement, taking the
move with the most excess load removed (sum over ranks of ``max(0, load - T)``) per slot that
must receive new weights:

* swap two slots on different ranks (the expert counts stay; at most 2 slots receive);
* turn a replica of an expert with several into a replica of another expert (1 slot receives),
  either on the busiest rank, or elsewhere to give an expert of the busiest rank one more replica.

When the best move is a swap, every other rank above ``T`` takes its best swap with a rank below
``T`` in the same step (no two swaps touch one rank, so their gains add up): far fewer steps.

A slot "receives" when its rank held none of its new expert before the plan (a local copy is
free), so undoing a move is free too. A second start, the current placement *recounted* to the
fresh plan's replica counts (an expert with too many copies gives up those on the ranks holding
most of it, then its busiest ranks;
the freed slots take the missing replicas, heaviest on the lightest rank), is searched with swaps
only. It goes first when some replica alone is above ``T`` under the current counts: then single
moves rarely get there, since a heavy replica's rank must shed its partner too (two slots per
rank, as DeepSeek-V3 at EP144). If neither start reaches ``T`` moving under a quarter of the
slots, the fresh plan renumbered to overlap the current placement most (nodes first, then ranks
within a node, then slots within a rank) is a candidate too, and in hierarchical mode so is that
plan with every node whose experts it leaves unchanged given back its current layout, searched.
The candidate that reaches ``T`` moving fewest slots wins, so every layer ends at least
``fresh - tolerance`` balanced.

Moves respect the spread rule of `balanced` (at most ``ceil(replicas / ranks)`` copies of an expert
per rank, also after a re-purposed copy lowers its expert's count; a stack the current placement
already had is excused while nothing moves there; a searched candidate that breaks it is dropped)
and, in hierarchical mode, never put an expert on a node that holds none of it now.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from eplb.ir.errors import InvalidValueError
from eplb.ir.placement import ModelPlacement
from eplb.ir.topology import Topology
from eplb.planner.metrics import slots_moved
from eplb.planner.policies import register_policy
from eplb.planner.policies._common import (
    max_rank_load,
    spread_breaks,
    to_model_placement,
    use_hierarchy,
)
from eplb.planner.policies.balanced import plan_balanced

__all__ = ["align_to_current", "migration_aware", "plan_migration_aware"]

F64 = npt.NDArray[np.float64]
I64 = npt.NDArray[np.int64]
B = npt.NDArray[np.bool_]

_EPS = 1e-12
# An extra swap in a step must score at least this share of the step's best move: weaker ones
# (two receiving slots for a sliver of excess) wait, as a later step may find a cheaper move.
# At Kimi-K2 shape 0 was 15-25% faster but moved ~1 point more of the slots; 1, 2-4x slower.
_EXTRA_SWAP_SHARE = 0.1


def _gain(loads: F64, new: F64, limit: float) -> F64:
    """Excess above ``limit`` removed by going from ``loads`` to ``new`` (last axis: ranks)."""
    return np.asarray(np.maximum(loads - limit, 0).sum() - np.maximum(new - limit, 0).sum(axis=-1))


class _Layer:
    """Search state of one layer. ``cnt: [E, R]`` copies per rank; ``need: [P]`` slot receives."""

    def __init__(
        self,
        load: F64,
        p2l: I64,
        num_ranks: int,
        scope: int,
        allowed: B,
        original: I64 | None = None,
        *,
        repurpose: bool = True,
    ) -> None:
        self.load = load
        self.p2l = p2l.copy()
        self.num_r = num_ranks
        self.s = p2l.size // num_ranks
        self.rank_of = np.arange(p2l.size) // self.s
        self.scope = scope  # ranks an expert may spread over (ranks per node in hierarchical mode)
        self.allowed = allowed  # [R, E] rank may receive expert
        self.repurpose = repurpose  # whether moves may change replica counts
        # [E, R]: what each rank holds before the plan (the search may start elsewhere).
        self.orig = np.zeros((load.size, num_ranks), dtype=bool)
        self.orig[p2l if original is None else original, self.rank_of] = True
        self.refresh()

    def refresh(self) -> None:
        num_e = self.load.size
        self.counts = np.bincount(self.p2l, minlength=num_e)
        self.cnt = np.zeros((num_e, self.num_r), dtype=np.int64)
        np.add.at(self.cnt, (self.p2l, self.rank_of), 1)
        self.share = self.load / np.maximum(self.counts, 1)
        self.slot_w = self.share[self.p2l]
        self.loads: F64 = np.bincount(self.rank_of, weights=self.slot_w, minlength=self.num_r).astype(
            np.float64
        )
        self.need = ~self.orig[self.p2l, self.rank_of]

    def cap(self, extra: int = 0) -> I64:
        return np.asarray(-(-(self.counts + extra) // self.scope))

    def best_move(self, limit: float) -> tuple[float, list[tuple[int, int]]] | None:
        """The move with the best excess removed per receiving slot: ``(score, [(slot, expert)])``."""
        r = int(np.argmax(self.loads))
        s, loads, p2l = self.s, self.loads, self.p2l
        mine = np.arange(r * s, (r + 1) * s)
        best: tuple[float, list[tuple[int, int]]] | None = None

        def consider(gain: F64, cost: npt.NDArray[np.int64], ok: B, build: object) -> None:
            nonlocal best
            score = np.where(ok & (gain > limit * 1e-9), gain / np.maximum(cost, 0.25), -np.inf)
            k = int(np.argmax(score))
            if np.isfinite(score.flat[k]) and (best is None or score.flat[k] > best[0]):
                best = (float(score.flat[k]), build(np.unravel_index(k, score.shape)))  # type: ignore[operator]

        # Swaps between a slot of r and any slot elsewhere.
        score = self.swap_scores(np.array([r]), limit)[0]
        k = int(np.argmax(score))
        if np.isfinite(score.flat[k]):
            i, j = divmod(k, p2l.size)
            best = (float(score.flat[k]), [(int(mine[i]), int(p2l[j])), (j, int(p2l[mine[i]]))])

        if not self.repurpose:
            return best
        # Re-purpose a slot: slot p (expert a, several replicas) becomes expert b.
        load, counts, cnt = self.load, self.counts, self.cnt
        cap1 = self.cap(1)
        inc_b = load / (counts + 1) - self.share  # per held copy of b, <= 0
        with np.errstate(divide="ignore", invalid="ignore"):
            inc_a = np.where(counts > 1, load / np.maximum(counts - 1, 1) - self.share, 0.0)
        # (1) slots of r, any b; (2) any slot, b held on r.
        on_r = np.flatnonzero(cnt[:, r] > 0)
        spare = counts[p2l] > 1  # only a replica of an expert with several can change expert
        own = mine[spare[mine]]
        for slots, targets in ((own, self._targets(r, p2l[own], limit)), (np.flatnonzero(spare), on_r)):
            if slots.size == 0 or targets.size == 0:
                continue
            a = p2l[slots]
            ranks = self.rank_of[slots]
            delta_a = cnt[a] * inc_a[a][:, None]  # [n, R]
            delta_a[np.arange(slots.size), ranks] -= load[a] / np.maximum(counts[a] - 1, 1)
            delta_b = cnt[targets] * inc_b[targets][:, None]  # [m, R]
            new = loads + delta_a[:, None, :] + delta_b[None, :, :]
            new[np.arange(slots.size), :, ranks] += (load[targets] / (counts[targets] + 1))[None, :]
            gain = _gain(loads, new, limit)
            ok = (counts[a] > 1)[:, None] & (a[:, None] != targets[None, :])
            # a loses a replica, so its cap may drop: no rank may keep more copies than the new cap.
            left = cnt[a]
            left[np.arange(slots.size), ranks] -= 1
            ok &= (left.max(axis=1) <= -(-(counts[a] - 1) // self.scope))[:, None]
            ok &= self.allowed[ranks[:, None], targets[None, :]]
            ok &= cnt[targets[None, :], ranks[:, None]] < cap1[targets][None, :]
            cost = (~self.orig[targets[None, :], ranks[:, None]]).astype(np.int64) - self.need[slots][:, None]
            consider(gain, cost, ok, lambda ij, sl=slots, tg=targets: [(int(sl[ij[0]]), int(tg[ij[1]]))])
        return best

    def swap_scores(self, ranks: I64, limit: float) -> F64:
        """``[H, s, P]``: excess removed per receiving slot by swapping slot ``i`` of ``ranks[h]``
        with slot ``j`` elsewhere; -inf where not allowed or no better."""
        s, loads, p2l = self.s, self.loads, self.p2l
        mine = ranks[:, None] * s + np.arange(s)  # [H, s]
        out = np.full((ranks.size, s, p2l.size), -np.inf)
        # Two ranks above the limit cannot gain from a swap (the excess only moves, or the one
        # that drops below sheds more than its excess): partners are ranks below the limit.
        cols = np.flatnonzero(loads[self.rank_of] <= limit)
        d = self.slot_w[mine][:, :, None] - self.slot_w[cols][None, None, :]
        lr, lq = loads[ranks][:, None, None], loads[self.rank_of[cols]][None, None, :]
        gain = (
            np.maximum(lr - limit, 0)
            + np.maximum(lq - limit, 0)
            - np.maximum(lr - d - limit, 0)
            - np.maximum(lq + d - limit, 0)
        )
        # The rules cost a gather each: check them only where the swap removes excess.
        h, i, c = np.nonzero(gain > limit * 1e-9)
        if h.size == 0:
            return out
        j = cols[c]
        r, q = ranks[h], self.rank_of[j]
        ei, ej = p2l[mine[h, i]], p2l[j]
        cap = self.cap()
        ok = (ei != ej) & (q != r) & self.allowed[q, ei] & self.allowed[r, ej]
        ok &= (self.cnt[ei, q] < cap[ei]) & (self.cnt[ej, r] < cap[ej])
        cost = (~self.orig[ej, r]).astype(np.int64) + ~self.orig[ei, q] - self.need[mine[h, i]] - self.need[j]
        out[h[ok], i[ok], j[ok]] = gain[h[ok], i[ok], c[ok]] / np.maximum(cost[ok], 0.25)
        return out

    def extra_swaps(self, limit: float, busy: set[int], floor: float = 0.0) -> list[tuple[int, int]]:
        """Best swaps of the other ranks above ``limit`` with ranks outside ``busy`` and outside
        each other's, busiest first, one per rank, each scoring at least ``floor``: their gains
        add up, as no two touch one rank."""
        over = np.flatnonzero(self.loads > limit)
        over = over[np.argsort(-self.loads[over], kind="stable")]
        over = np.array([r for r in over.tolist() if r not in busy], dtype=np.int64)
        if over.size == 0:
            return []
        score = self.swap_scores(over, limit)  # [H, s, P]
        edits: list[tuple[int, int]] = []
        p2l, s = self.p2l, self.s
        blocked = np.zeros(self.num_r, dtype=bool)
        blocked[list(busy)] = True
        for h, r in enumerate(over.tolist()):
            if blocked[r]:
                continue
            row = np.where(blocked[self.rank_of][None, :], -np.inf, score[h])
            k = int(np.argmax(row))
            blocked[r] = True
            if not np.isfinite(row.flat[k]) or row.flat[k] < floor:
                continue
            i, j = divmod(k, p2l.size)
            pi = r * s + i
            edits += [(pi, int(p2l[j])), (j, int(p2l[pi]))]
            blocked[j // s] = True
        return edits

    def _targets(self, r: int, donors: I64, limit: float) -> I64:
        """Experts worth turning a slot of rank ``r`` into, out of all: a ``b`` that is on no rank
        above ``limit``, on no rank holding a donor and not held by ``r`` before the plan changes
        the excess only on ``r``, by its new share ``load[b] / (counts[b] + 1)``, at the same
        cost, so the lightest such ``b`` beats the others; the rest are kept as they are."""
        if donors.size == 0:
            return donors
        s, p2l = self.s, self.p2l
        ranks = np.flatnonzero((self.loads > limit) | (self.cnt[donors] > 0).any(axis=0))
        near = p2l[(ranks[:, None] * s + np.arange(s)).reshape(-1)]
        special = np.zeros(self.load.size, dtype=bool)
        special[near] = True
        special |= self.orig[:, r]
        rest = np.flatnonzero(~special & self.allowed[r])
        if rest.size > 2:
            x = (self.load / (self.counts + 1))[rest]
            rest = rest[np.argpartition(x, 1)[:2]]
        special[rest] = True
        return np.flatnonzero(special)

    def apply(self, edits: list[tuple[int, int]]) -> None:
        for slot, expert in edits:
            self.p2l[slot] = expert
        self.refresh()


def _search(state: _Layer, limit: float, max_moves: int) -> bool:
    for _ in range(max_moves):
        if state.loads.max() <= limit * (1 + _EPS):
            return True
        move = state.best_move(limit)
        if move is None:
            return False
        edits = move[1]
        if len(edits) == 2:  # a swap: the other ranks above the limit swap in the same step
            busy = {int(state.rank_of[p]) for p, _ in edits}
            edits = edits + state.extra_swaps(limit, busy, move[0] * _EXTRA_SWAP_SHARE)
        state.apply(edits)
    return bool(state.loads.max() <= limit * (1 + _EPS))


def _greedy_match(overlap: npt.NDArray[np.int64]) -> I64:
    """``overlap: [n, n]`` -> ``match[i]``: a one-to-one map taking the largest overlaps first."""
    n = overlap.shape[0]
    work = overlap.astype(np.float64)
    match = np.full(n, -1, dtype=np.int64)
    for _ in range(n):
        i, j = np.unravel_index(int(np.argmax(work)), work.shape)
        match[i] = j
        work[i, :] = -np.inf
        work[:, j] = -np.inf
    return match


def align_to_current(target: I64, current: I64, topology: Topology, *, keep_nodes: bool) -> I64:
    """Renumber ``target``'s ranks (whole nodes first when ``keep_nodes``) and order each rank's
    slots so it overlaps ``current`` most; balancedness is unchanged by renumbering.

    ``target, current: [num_physical_experts]`` of one layer.
    """
    num_r, s = topology.num_ranks, topology.slots_per_rank
    num_e = int(max(target.max(), current.max())) + 1
    rank_of = np.arange(target.size) // s
    has_t = np.zeros((num_r, num_e), dtype=np.int64)
    has_c = np.zeros((num_r, num_e), dtype=np.int64)
    has_t[rank_of, target] = 1
    has_c[rank_of, current] = 1
    overlap = has_t @ has_c.T  # [target rank, current rank]
    new_rank = np.empty(num_r, dtype=np.int64)  # target rank -> current rank it becomes
    if keep_nodes and topology.num_nodes > 1:
        num_n = topology.num_nodes
        per = num_r // num_n
        node_overlap = overlap.reshape(num_n, per, num_n, per).sum(axis=(1, 3))
        node_match = _greedy_match(node_overlap)
        for tn, cn in enumerate(node_match):
            sub = overlap[tn * per : (tn + 1) * per, cn * per : (cn + 1) * per]
            new_rank[tn * per : (tn + 1) * per] = cn * per + _greedy_match(sub)
    else:
        new_rank[:] = _greedy_match(overlap)
    out = np.empty_like(current)
    for tr in range(num_r):
        cr = int(new_rank[tr])
        out[cr * s : (cr + 1) * s] = _order_like(
            target[tr * s : (tr + 1) * s], current[cr * s : (cr + 1) * s]
        )
    return out


def _order_like(experts: I64, current: I64) -> I64:
    """Put ``experts`` (one rank's) into slots so that as many as possible sit where ``current`` has them."""
    left = list(experts.tolist())
    out: list[int | None] = [None] * len(current)
    for i, e in enumerate(current.tolist()):
        if e in left:
            out[i] = e
            left.remove(e)
    rest = iter(left)
    return np.array([next(rest) if e is None else e for e in out], dtype=np.int64)


def plan_migration_aware(
    load: F64,
    topology: Topology,
    *,
    num_groups: int,
    current: ModelPlacement,
    tolerance: float = 0.005,
    hierarchical: bool | None = None,
    max_moves: int | None = None,
) -> tuple[I64, dict[str, int]]:
    """``physical_to_logical: [num_layers, num_physical_experts]`` and counts of how layers were
    made (``kept``, ``searched``, ``recounted``, ``hybrid``, ``fresh``). ``current`` must fit
    ``load`` and ``topology``: `eplb.planner.rebalance` checks that once, at the public edge."""
    if not 0 <= tolerance < 1:
        raise InvalidValueError(
            "tolerance", f"must be in [0, 1) balancedness points (got {tolerance}); 0.005 is the default."
        )
    hier = use_hierarchy(topology, num_groups, hierarchical)
    num_r = topology.num_ranks
    fresh, _ = plan_balanced(load, topology, num_groups=num_groups, hierarchical=hier)
    cur = current.to_numpy()
    mean = load.sum(axis=1) / num_r
    fresh_bal = np.divide(mean, max_rank_load(load, fresh, num_r), out=np.ones_like(mean), where=mean > 0)
    goal = fresh_bal - tolerance
    limit = np.divide(mean, goal, out=np.full_like(mean, np.inf), where=goal > 0)
    cur_max = max_rank_load(load, cur, num_r)
    out = cur.copy()
    stats = {"kept": 0, "searched": 0, "recounted": 0, "hybrid": 0, "fresh": 0}
    moves = max_moves if max_moves is not None else cur.shape[1]
    for layer in range(load.shape[0]):
        if cur_max[layer] <= limit[layer] * (1 + _EPS):
            stats["kept"] += 1
            continue
        out[layer], how = _plan_layer(
            load[layer], cur[layer], fresh[layer], topology, float(limit[layer]), hier=hier, moves=moves
        )
        stats[how] += 1
    return out, stats


def _allowed(p2l: I64, num_e: int, topology: Topology, hier: bool) -> B:
    """``[R, E]``: rank may receive expert (in hierarchical mode, only experts its node holds)."""
    if not hier:
        return np.ones((topology.num_ranks, num_e), dtype=bool)
    node = np.asarray(topology.rank_to_node)
    held = np.zeros((topology.num_nodes, num_e), dtype=bool)
    held[node[np.arange(p2l.size) // topology.slots_per_rank], p2l] = True
    allowed: B = held[node]
    return allowed


def _plan_layer(
    load: F64, cur: I64, fresh: I64, topology: Topology, limit: float, *, hier: bool, moves: int
) -> tuple[I64, str]:
    """One layer above ``limit``: the candidate that reaches it moving fewest slots, and its name.

    Candidates: a search from ``cur``; a search (swaps only) from ``cur`` recounted to the fresh
    plan's replica counts, which single moves rarely reach when drift changed which experts need
    replicas (a heavy replica's rank must also shed its partner), tried first when some replica
    alone is above the limit under the current counts; then, only when neither reached the limit
    moving under a quarter of the slots, the fresh plan renumbered onto ``cur`` and, in
    hierarchical mode, that plan with unchanged nodes given back their current layout, searched.
    """
    num_r, s = topology.num_ranks, topology.slots_per_rank
    scope = num_r // topology.num_nodes if hier else num_r
    allowed = _allowed(cur, load.size, topology, hier)
    small = cur.size // 4
    tried: list[tuple[int, I64, str]] = []  # (moved, placement, how) of those that reach the limit

    def attempt(start: _Layer, how: str) -> bool:
        """Search from ``start``; True when it reached the limit moving at most ``small`` slots."""
        if not _search(start, limit, moves) or _breaks_spread(start.p2l, cur, num_r, scope):
            return False
        tried.append((_moved(cur, start.p2l, s), start.p2l, how))
        return tried[-1][0] <= small

    state = _Layer(load, cur, num_r, scope, allowed)
    first = float(state.share.max()) > limit * (1 + _EPS)
    for how in ("recounted", "searched") if first else ("searched", "recounted"):
        start: _Layer | None = state
        if how == "recounted":
            recounted = _recount(load, cur, np.bincount(fresh, minlength=load.size), state)
            start = None
            if recounted is not None:
                start = _Layer(load, recounted, num_r, scope, allowed, original=cur, repurpose=False)
        if start is not None and attempt(start, how):
            return start.p2l, how
    # A renumbered fresh plan rarely keeps more than half the slots, so it is only worth
    # building when the searches failed or moved a quarter of them.
    aligned = align_to_current(fresh, cur, topology, keep_nodes=hier)
    tried.append((_moved(cur, aligned, s), aligned, "fresh"))
    if hier:
        # Nodes whose experts the fresh plan leaves unchanged start from their current layout
        # and are searched again; only the nodes that trade groups take the fresh layout.
        hybrid = _keep_unchanged_nodes(aligned, cur, topology)
        if hybrid is not None:
            held = _allowed(hybrid, load.size, topology, hier)
            attempt(_Layer(load, hybrid, num_r, scope, held, original=cur), "hybrid")
    # Fewest moved wins; on a tie the earlier candidate (a search before the fresh plan).
    _, best, how = min(tried, key=lambda t: t[0])
    return best, how


def _recount(load: F64, current: I64, target: I64, like: _Layer) -> I64 | None:
    """``current`` with replica counts ``target: [E]``: each expert with too many copies gives up
    those on its busiest ranks, and the freed slots take the missing replicas, heaviest first, on
    the lightest rank that may hold them (``like``'s node and spread rules). None when the counts
    already match or a replica finds no slot."""
    have = np.bincount(current, minlength=load.size)
    if np.array_equal(have, target):
        return None
    num_r, rank_of = like.num_r, like.rank_of
    share = load / np.maximum(target, 1)
    out: I64 = current.copy()
    freed: list[int] = []
    keep_w = share[current]
    rank_load: F64 = np.bincount(rank_of, weights=keep_w, minlength=num_r).astype(np.float64)
    for a in np.flatnonzero(have > target).tolist():
        slots = np.flatnonzero(current == a)
        # Ranks with the most copies give up theirs first (the cap falls with the count), then
        # the busiest.
        drop = slots[_drop_order(rank_of[slots], rank_load, num_r)[: have[a] - target[a]]]
        freed += drop.tolist()
        rank_load[rank_of[drop]] -= keep_w[drop]
        out[drop] = -1
    cnt = np.zeros((load.size, num_r), dtype=np.int64)
    kept = out >= 0
    np.add.at(cnt, (out[kept], rank_of[kept]), 1)
    cap = -(-target // like.scope)
    missing = np.repeat(np.arange(load.size), np.maximum(target - have, 0))
    for b in missing[np.argsort(-share[missing], kind="stable")].tolist():
        ranks = rank_of[freed]
        ok = like.allowed[ranks, b] & (cnt[b, ranks] < cap[b])
        if not ok.any():
            return None
        k = int(np.flatnonzero(ok)[np.argmin(rank_load[ranks[ok]])])
        slot = freed.pop(k)
        out[slot] = b
        rank_load[rank_of[slot]] += share[b]
        cnt[b, rank_of[slot]] += 1
    return out


def _drop_order(ranks: I64, rank_load: F64, num_r: int) -> I64:
    """Order of slots (on ``ranks``, one expert's) to give up: each time one on the rank with the
    most copies left, the busiest on ties, so the copies left stay spread."""
    left = np.bincount(ranks, minlength=num_r)
    order = np.argsort(-rank_load[ranks], kind="stable")
    out: list[int] = []
    taken = np.zeros(ranks.size, dtype=bool)
    for _ in range(ranks.size):
        free = order[~taken[order]]
        k = int(free[np.argmax(left[ranks[free]])])
        out.append(k)
        taken[k] = True
        left[ranks[k]] -= 1
    return np.array(out, dtype=np.int64)


def _keep_unchanged_nodes(aligned: I64, current: I64, topology: Topology) -> I64 | None:
    """``aligned`` with every node that holds the same experts as in ``current`` given back its
    current slots; None when no node qualifies or every node does."""
    per = aligned.size // topology.num_nodes
    out = aligned.copy()
    kept = 0
    for n in range(topology.num_nodes):
        part = slice(n * per, (n + 1) * per)
        if set(aligned[part].tolist()) == set(current[part].tolist()):
            out[part] = current[part]
            kept += 1
    return out if 0 < kept < topology.num_nodes else None


def _breaks_spread(p2l: I64, cur: I64, num_r: int, scope: int) -> bool:
    """Whether ``p2l`` stacks copies the spread rule forbids (cells ``cur`` already broke and
    nothing moved to are excused)."""
    return bool(spread_breaks(p2l, int(max(p2l.max(), cur.max())) + 1, num_r, scope, cur).any())


def _moved(cur: I64, tgt: I64, s: int) -> int:
    """Slots of ``tgt`` whose rank held none of their expert in ``cur`` (one layer)."""
    return slots_moved(cur[None, :], tgt[None, :], num_ranks=cur.size // s)


@register_policy("migration_aware")
def migration_aware(
    load: F64,
    topology: Topology,
    *,
    num_groups: int,
    current: ModelPlacement | None = None,
    tolerance: float = 0.005,
    hierarchical: bool | None = None,
    max_moves: int | None = None,
) -> ModelPlacement:
    """Edit ``current`` as little as keeps each layer within ``tolerance`` of a fresh `balanced`
    plan; with no ``current``, the `balanced` plan itself. ``max_moves`` bounds search moves per
    layer (default: the slot count)."""
    if current is None:
        p2l, _ = plan_balanced(load, topology, num_groups=num_groups, hierarchical=hierarchical)
    else:
        p2l, _ = plan_migration_aware(
            load,
            topology,
            num_groups=num_groups,
            current=current,
            tolerance=tolerance,
            hierarchical=hierarchical,
            max_moves=max_moves,
        )
    return to_model_placement(p2l, topology.num_ranks, load.shape[1])
