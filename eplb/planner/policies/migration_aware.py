"""``migration_aware``: keep experts where they are unless moving them buys balance.

Each layer whose current placement is already within ``tolerance`` (balancedness points) of a
fresh `balanced` plan stays exactly as it is. For the others, with ``T = mean / (fresh - tolerance)``
the busiest load a rank may carry, a greedy local search edits the current placement, one move
at a time, taking the move with the most excess load removed (sum over ranks of ``max(0, load - T)``)
per slot that must receive new weights:

* swap two slots on different ranks (the expert counts stay; at most 2 slots receive);
* turn a replica of an expert with several into a replica of another expert (1 slot receives),
  either on the busiest rank, or elsewhere to give an expert of the busiest rank one more replica.

A slot "receives" when its rank held none of its new expert before the plan (a local copy is
free), so undoing a move is free too. If the search cannot reach ``T``, the layer takes the fresh
plan itself with its ranks renumbered to overlap the current placement most (nodes first, then
ranks within a node, then slots within a rank); that renumbered plan also wins when the search
moved more than a quarter of the slots and the renumbered plan moves fewer. In hierarchical mode
a third candidate keeps the current layout of every node whose experts the fresh plan leaves on
it, takes the fresh layout only for nodes that trade groups, and searches again from there.
Either way every layer ends at least ``fresh - tolerance`` balanced.

Moves respect the spread rule of `balanced` (at most ``ceil(replicas / ranks)`` copies of an expert
per rank) and, in hierarchical mode, never put an expert on a node that holds none of it now.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from eplb.ir.errors import InvalidValueError
from eplb.ir.placement import ModelPlacement
from eplb.ir.topology import Topology
from eplb.planner.policies import register_policy
from eplb.planner.policies.balanced import max_rank_load, plan_balanced, use_hierarchy
from eplb.planner.policies.deepseek import to_model_placement

__all__ = ["align_to_current", "check_current", "migration_aware", "plan_migration_aware"]

F64 = npt.NDArray[np.float64]
I64 = npt.NDArray[np.int64]
B = npt.NDArray[np.bool_]

_EPS = 1e-12


def check_current(current: ModelPlacement, load: F64, topology: Topology) -> None:
    """``current`` must describe this model on this cluster; the error names the mismatch."""
    num_l, num_e = load.shape
    for name, have, want, fix in (
        ("num_ranks", current.num_ranks, topology.num_ranks, "plan from scratch with current=None"),
        (
            "num_physical_experts",
            current.num_physical_experts,
            topology.num_physical_experts,
            "plan from scratch with current=None",
        ),
        ("num_logical_experts", current.num_logical_experts, num_e, "pass the load of the same model"),
        ("num_layers", current.num_layers, num_l, "pass one load row per MoE layer of the placement"),
    ):
        if have != want:
            source = "load" if name in ("num_logical_experts", "num_layers") else "topology"
            raise InvalidValueError(f"current.{name}", f"is {have} but the {source} has {want}; {fix}.")


def _gain(loads: F64, new: F64, limit: float) -> F64:
    """Excess above ``limit`` removed by going from ``loads`` to ``new`` (last axis: ranks)."""
    return np.asarray(np.maximum(loads - limit, 0).sum() - np.maximum(new - limit, 0).sum(axis=-1))


class _Layer:
    """Search state of one layer. ``cnt: [E, R]`` copies per rank; ``need: [P]`` slot receives."""

    def __init__(
        self, load: F64, p2l: I64, num_ranks: int, scope: int, allowed: B, original: I64 | None = None
    ) -> None:
        self.load = load
        self.p2l = p2l.copy()
        self.num_r = num_ranks
        self.s = p2l.size // num_ranks
        self.rank_of = np.arange(p2l.size) // self.s
        self.scope = scope  # ranks an expert may spread over (ranks per node in hierarchical mode)
        self.allowed = allowed  # [R, E] rank may receive expert
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
        cap = self.cap()
        ei, ej = p2l[mine], p2l
        q = self.rank_of
        d = self.slot_w[mine][:, None] - self.slot_w[None, :]
        lr, lq = loads[r], loads[q][None, :]
        gain = (
            np.maximum(lr - limit, 0)
            + np.maximum(lq - limit, 0)
            - np.maximum(lr - d - limit, 0)
            - np.maximum(lq + d - limit, 0)
        )
        ok = (ei[:, None] != ej[None, :]) & (q != r)[None, :]
        ok &= self.allowed[q[None, :], ei[:, None]] & self.allowed[r, ej][None, :]
        ok &= (self.cnt[ei[:, None], q[None, :]] < cap[ei][:, None]) & (self.cnt[ej, r] < cap[ej])[None, :]
        cost = (~self.orig[ej, r])[None, :].astype(np.int64) + ~self.orig[ei[:, None], q[None, :]]
        cost = cost - self.need[mine][:, None] - self.need[None, :]
        consider(
            gain, cost, ok, lambda ij: [(int(mine[ij[0]]), int(ej[ij[1]])), (int(ij[1]), int(ei[ij[0]]))]
        )

        # Re-purpose a slot: slot p (expert a, several replicas) becomes expert b.
        load, counts, cnt = self.load, self.counts, self.cnt
        cap1 = self.cap(1)
        inc_b = load / (counts + 1) - self.share  # per held copy of b, <= 0
        with np.errstate(divide="ignore", invalid="ignore"):
            inc_a = np.where(counts > 1, load / np.maximum(counts - 1, 1) - self.share, 0.0)
        # (1) slots of r, any b; (2) any slot, b held on r.
        on_r = np.flatnonzero(cnt[:, r] > 0)
        spare = counts[p2l] > 1  # only a replica of an expert with several can change expert
        for slots, targets in ((mine[spare[mine]], np.arange(load.size)), (np.flatnonzero(spare), on_r)):
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
            ok &= self.allowed[ranks[:, None], targets[None, :]]
            ok &= cnt[targets[None, :], ranks[:, None]] < cap1[targets][None, :]
            cost = (~self.orig[targets[None, :], ranks[:, None]]).astype(np.int64) - self.need[slots][:, None]
            consider(gain, cost, ok, lambda ij, sl=slots, tg=targets: [(int(sl[ij[0]]), int(tg[ij[1]]))])
        return best

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
        state.apply(move[1])
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
    made (``kept``, ``searched``, ``hybrid``, ``fresh``)."""
    if not 0 <= tolerance < 1:
        raise InvalidValueError(
            "tolerance", f"must be in [0, 1) balancedness points (got {tolerance}); 0.005 is the default."
        )
    check_current(current, load, topology)
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
    stats = {"kept": 0, "searched": 0, "hybrid": 0, "fresh": 0}
    scope = num_r // topology.num_nodes if hier else num_r
    node = np.asarray(topology.rank_to_node)
    for layer in range(load.shape[0]):
        if cur_max[layer] <= limit[layer] * (1 + _EPS):
            stats["kept"] += 1
            continue
        if hier:
            held = np.zeros((topology.num_nodes, load.shape[1]), dtype=bool)
            held[node[np.arange(cur.shape[1]) // topology.slots_per_rank], cur[layer]] = True
            allowed = held[node]
        else:
            allowed = np.ones((num_r, load.shape[1]), dtype=bool)
        state = _Layer(load[layer], cur[layer], num_r, scope, allowed)
        reached = _search(state, float(limit[layer]), max_moves if max_moves is not None else cur.shape[1])
        moved = _moved(cur[layer], state.p2l, topology.slots_per_rank)
        # A renumbered fresh plan rarely keeps more than half the slots, so it is only worth
        # building when the search failed or moved a quarter of them.
        if reached and 4 * moved <= cur.shape[1]:
            out[layer] = state.p2l
            stats["searched"] += 1
            continue
        aligned = align_to_current(fresh[layer], cur[layer], topology, keep_nodes=hier)
        best, best_moved, how = aligned, _moved(cur[layer], aligned, topology.slots_per_rank), "fresh"
        if reached and moved <= best_moved:
            best, best_moved, how = state.p2l, moved, "searched"
        if hier:
            # Nodes whose experts the fresh plan leaves unchanged start from their current layout
            # and are searched again; only the nodes that trade groups take the fresh layout.
            hybrid = _keep_unchanged_nodes(aligned, cur[layer], topology)
            if hybrid is not None:
                held = np.zeros((topology.num_nodes, load.shape[1]), dtype=bool)
                held[node[np.arange(cur.shape[1]) // topology.slots_per_rank], hybrid] = True
                again = _Layer(load[layer], hybrid, num_r, scope, held[node], original=cur[layer])
                if _search(again, float(limit[layer]), cur.shape[1]):
                    m = _moved(cur[layer], again.p2l, topology.slots_per_rank)
                    if m < best_moved:
                        best, best_moved, how = again.p2l, m, "hybrid"
        out[layer] = best
        stats[how] += 1
    return out, stats


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


def _moved(cur: I64, tgt: I64, s: int) -> int:
    rank_of = np.arange(cur.size) // s
    held = set(zip(rank_of.tolist(), cur.tolist(), strict=True))
    return sum((r, e) not in held for r, e in zip(rank_of.tolist(), tgt.tolist(), strict=True))


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
