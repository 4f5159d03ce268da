"""``balanced``: as close to the lower bound on the busiest rank as the constraints allow.

Per layer (or per (layer, node) in hierarchical mode), vectorised over layers:

1. **Groups to nodes** (hierarchical only): DeepSeek's greedy, then swaps of two groups between
   the busiest node and another while that lowers the busiest node.
2. **Replica counts**: each redundant slot goes to the expert with the highest load per replica
   (optimal for the max load per replica), but no expert gets more replicas than there are ranks
   in its scope while another can take one: past that, replicas must share a rank, which never
   lowers the busiest rank.
3. **Replicas to ranks**: heaviest first, to the lightest rank with a free slot that holds fewer
   than ``ceil(replicas / ranks)`` copies of that expert (so two copies share a rank only when the
   expert has more replicas than ranks). If every rank with room is barred, one swap with a full
   rank repairs it; such a swap always exists.
4. **Local search**: swap a slot of the busiest rank with a lighter slot elsewhere while that
   lowers the busiest rank, keeping the spread rule of step 3. In the same round the next few
   busiest ranks each swap with a distinct light rank (rounds, not swaps, cost the time).
5. **Floor**: with ``deepseek_floor`` (default), a layer DeepSeek's plan beats as planned is
   replaced by it, with any copies it stacks against the spread rule swapped apart, if it still
   beats the layer then. So balancedness is never below ``deepseek``'s on a layer where
   DeepSeek keeps the spread rule, and no layer stacks copies the rule forbids (where stacking
   is what made DeepSeek lighter, ``balanced`` is below it).

Hierarchical mode (replicas stay on their group's node, as DeepSeek's) is on when ``num_groups %
num_nodes == 0``; ``hierarchical=False`` plans globally, which balances better but lets a token's
experts spread over more nodes than group-limited routing expects.
"""

from __future__ import annotations

import attrs
import numpy as np
import numpy.typing as npt

from eplb.ir.errors import InvalidValueError
from eplb.ir.placement import ModelPlacement
from eplb.ir.topology import Topology
from eplb.planner.policies import register_policy
from eplb.planner.policies._common import (
    is_uniform_nodes,
    max_rank_load,
    to_model_placement,
    unstack,
    use_hierarchy,
)
from eplb.planner.policies.deepseek import balanced_packing, busiest_rank_floor, deepseek_array

__all__ = ["BalancedInfo", "balanced", "max_rank_load", "plan_balanced", "use_hierarchy"]

F64 = npt.NDArray[np.float64]
I64 = npt.NDArray[np.int64]

# Relative slack for "strictly better" so float rounding can never make a search cycle.
_EPS = 1e-12


@attrs.frozen(kw_only=True)
class BalancedInfo:
    """How a `balanced` plan was made: for benchmarks and the CLI."""

    hierarchical: bool
    deepseek_layers: tuple[int, ...]  # layers taken from DeepSeek's greedy by the floor
    swaps: int  # local-search swaps applied, all layers
    repacked_rows: int  # rows the fast packing gave to the one-by-one packing


# --- step 1: groups to nodes --------------------------------------------------------------------
def pack_groups(group_load: F64, num_nodes: int) -> I64:
    """``group_load: [L, G]`` -> ``node_of_group: [L, G]``, G / num_nodes groups per node."""
    packed, _ = balanced_packing(group_load, num_nodes)
    node: I64 = packed.copy()
    for layer in range(group_load.shape[0]):
        w = group_load[layer]
        while True:
            node_load = np.bincount(node[layer], weights=w, minlength=num_nodes)
            a = int(np.argmax(node_load))
            in_a = np.flatnonzero(node[layer] == a)
            out = np.flatnonzero(node[layer] != a)
            d = w[in_a][:, None] - w[out][None, :]
            new_max = np.maximum(node_load[a] - d, node_load[node[layer, out]][None, :] + d)
            ok = (d > 0) & (new_max < node_load[a] * (1 - _EPS))
            if not ok.any():
                break
            i, j = np.unravel_index(np.argmin(np.where(ok, new_max, np.inf)), d.shape)
            node[layer, in_a[i]], node[layer, out[j]] = node[layer, out[j]], a
    return node


# --- step 2: replica counts ---------------------------------------------------------------------
def replica_counts(w: F64, num_phy: int, num_ranks: int) -> I64:
    """``w: [B, n]`` -> counts ``[B, n]`` summing to ``num_phy``: greedy on load per replica,
    capped at ``num_ranks`` replicas while any expert is below the cap.

    The greedy gives the ``k + 1``-th copy of expert ``e`` when ``w[e] / k`` is the highest score
    left (ties to the lower index), so it takes the highest scores of ``{w[e] / k}``: found by
    bisecting the threshold on its float bits (64 steps, O(B n) each), not slot by slot."""
    rows_n, n = w.shape
    extra = num_phy - n
    if extra <= 0:
        return np.ones((rows_n, n), dtype=np.int64)
    if extra <= _SLOT_BY_SLOT:
        return _greedy_counts(w, num_phy, num_ranks)
    if extra <= n * (num_ranks - 1):  # every copy fits under the cap
        return 1 + _top_scores(w, extra, 1, num_ranks - 1)
    return num_ranks + _top_scores(w, extra - n * (num_ranks - 1), num_ranks, None)


# Up to this many redundant slots a row, the slot-by-slot greedy is faster than the bisection's 64
# steps (measured at Kimi-K2 shape: 64 slots 5.6 ms against 16 ms); both give the same counts.
_SLOT_BY_SLOT = 160


def _greedy_counts(w: F64, num_phy: int, num_ranks: int) -> I64:
    rows_n, n = w.shape
    counts = np.ones((rows_n, n), dtype=np.int64)
    rows = np.arange(rows_n)
    for _ in range(num_phy - n):
        score = w / counts
        full: npt.NDArray[np.bool_] = np.asarray((counts >= num_ranks).all(axis=1))
        idx = np.argmax(np.where(full[:, None] | (counts < num_ranks), score, -1.0), axis=1)
        counts[rows, idx] += 1
    return counts


def _copies_at_least(w: F64, t: F64, k0: int, span: int | None) -> I64:
    """``[B, n]``: how many of ``w / k`` for ``k`` in ``[k0, k0 + span)`` are ``>= t: [B, 1]``
    (``t > 0``), with the same float division as the greedy."""
    with np.errstate(over="ignore"):
        top = np.floor(np.minimum(w / t, 2.0**52))
    top += w / (top + 1) >= t  # floor's rounding is off by at most one either way
    top -= (top >= 1) & (w / np.maximum(top, 1) < t)
    got = np.maximum(top - k0 + 1, 0).astype(np.int64)
    return got if span is None else np.asarray(np.minimum(got, span), dtype=np.int64)


def _top_scores(w: F64, m: int, k0: int, span: int | None) -> I64:
    """``[B, n]``: per row, how many of the ``m`` highest ``w[e] / k`` (``k`` in ``[k0, k0 +
    span)``, ties to the lower ``e``) each expert has."""
    rows_n, n = w.shape
    out = np.zeros((rows_n, n), dtype=np.int64)
    pos = w > 0
    # Rows whose positive scores outnumber m (all of them with no span, if any is positive).
    many = pos.any(axis=1) if span is None else span * pos.sum(axis=1) > m
    rows = np.flatnonzero(many)
    if rows.size:
        wr = w[rows]
        # Positive float64 values order as their bits do: bisect the threshold on the bits.
        lo = np.zeros(rows.size, dtype=np.int64)  # count(lo) >= m (lo = 0 counts everything)
        hi = (wr.max(axis=1) * 2).view(np.int64)  # count(hi) < m
        for _ in range(64):
            mid = lo + (hi - lo) // 2
            done = mid == lo
            if done.all():
                break
            ge = _copies_at_least(wr, np.maximum(mid.view(np.float64), 5e-324)[:, None], k0, span)
            enough = ge.sum(axis=1) >= m
            lo = np.where(~done & enough, mid, lo)
            hi = np.where(~done & ~enough, mid, hi)
        above = _copies_at_least(wr, hi.view(np.float64)[:, None], k0, span)  # all taken
        at = _copies_at_least(wr, np.maximum(lo.view(np.float64), 5e-324)[:, None], k0, span) - above
        need = m - above.sum(axis=1)
        # Scores equal to the threshold (one per expert at most) go to the lowest indices.
        take = np.minimum(at, np.maximum(need[:, None] - (np.cumsum(at, axis=1) - at), 0))
        out[rows] = above + take
    for b in np.flatnonzero(~many).tolist():  # every positive score, then zeros by index
        out[b, pos[b]] = span if span is not None else 0
        left = m - int(out[b].sum())
        zeros = np.flatnonzero(~pos[b])
        if span is None:
            out[b, zeros[0]] += left
            continue
        fill = np.minimum(span, np.maximum(left - np.arange(zeros.size) * span, 0))
        out[b, zeros] = fill
    return out


# --- step 3: replicas to ranks ------------------------------------------------------------------
@attrs.define
class _State:
    """Mutable search state for B independent rows (layers or (layer, node) pairs)."""

    slot_expert: I64  # [B, P] expert in each slot (-1 while empty)
    slot_w: F64  # [B, P] load share of each slot
    loads: F64  # [B, R]
    cnt: I64  # [B, n, R] copies of each expert on each rank
    cap: I64  # [B, n] most copies of an expert one rank may hold
    slots_per_rank: int


def _replicas_heaviest_first(w: F64, counts: I64) -> tuple[I64, F64]:
    """Per row, every replica's expert and load share (``w / counts``), heaviest first (stable)."""
    rows_n, n = w.shape
    # Every row has the same number of replicas, so one flat repeat splits into rows.
    items = np.repeat(np.tile(np.arange(n), rows_n), counts.reshape(-1)).reshape(rows_n, -1)
    item_w = np.take_along_axis(w / counts, items, axis=1)
    order = np.argsort(-item_w, axis=1, kind="stable")
    return np.take_along_axis(items, order, axis=1), np.take_along_axis(item_w, order, axis=1)


def pack_replicas(w: F64, counts: I64, num_ranks: int, slots_per_rank: int) -> tuple[_State, int]:
    """Heaviest replica first onto the lightest allowed rank. Returns the state and repair count."""
    rows_n, n = w.shape
    num_phy = num_ranks * slots_per_rank
    items, item_w = _replicas_heaviest_first(w, counts)

    st = _State(
        slot_expert=np.full((rows_n, num_phy), -1, dtype=np.int64),
        slot_w=np.zeros((rows_n, num_phy)),
        loads=np.zeros((rows_n, num_ranks)),
        cnt=np.zeros((rows_n, n, num_ranks), dtype=np.int64),
        cap=-(-counts // num_ranks),
        slots_per_rank=slots_per_rank,
    )
    fill = np.zeros((rows_n, num_ranks), dtype=np.int64)
    rows = np.arange(rows_n)
    repairs = 0
    for k in range(num_phy):
        e, wk = items[:, k], item_w[:, k]
        ok = (fill < slots_per_rank) & (st.cnt[rows, e] < st.cap[rows, e][:, None])
        r = np.argmin(np.where(ok, st.loads, np.inf), axis=1)
        stuck = ~ok.any(axis=1)
        for b in np.flatnonzero(stuck):
            _place_with_repair(st, fill, int(b), int(e[b]), float(wk[b]))
            repairs += 1
        go = rows[~stuck]
        r, e, wk = r[go], e[go], wk[go]
        slot = r * slots_per_rank + fill[go, r]
        st.slot_expert[go, slot] = e
        st.slot_w[go, slot] = wk
        st.loads[go, r] += wk
        st.cnt[go, e, r] += 1
        fill[go, r] += 1
    return st, repairs


def _place_with_repair(st: _State, fill: I64, b: int, e: int, wk: float) -> None:
    """Every rank with room already holds its cap of ``e``: put ``e`` on a full rank q below the
    cap and move one of q's replicas (of an expert below its cap on r) to the free slot on r.

    Such a swap exists: r has fewer items than q, so some expert is more often on q than on r;
    and fewer than ``cap * ranks`` copies of ``e`` are placed, so some rank is below the cap.
    """
    s = st.slots_per_rank
    open_ranks = np.flatnonzero(fill[b] < s)
    r = int(open_ranks[np.argmin(st.loads[b, open_ranks])])
    best: tuple[float, int] | None = None
    for q in np.flatnonzero((fill[b] == s) & (st.cnt[b, e] < st.cap[b, e])).tolist():
        for p in range(q * s, (q + 1) * s):
            f = int(st.slot_expert[b, p])
            if f == e or st.cnt[b, f, r] >= st.cap[b, f]:
                continue
            wj = float(st.slot_w[b, p])
            cost = float(max(st.loads[b, r] + wj, st.loads[b, q] - wj + wk))
            if best is None or cost < best[0]:
                best = (cost, p)
    if best is None:  # pragma: no cover - excluded by the argument in the docstring
        raise AssertionError("spread repair found no swap")
    p = best[1]
    q, f, wj = p // s, int(st.slot_expert[b, p]), float(st.slot_w[b, p])
    dst = r * s + fill[b, r]
    st.slot_expert[b, dst], st.slot_w[b, dst] = f, wj
    st.slot_expert[b, p], st.slot_w[b, p] = e, wk
    st.loads[b, r] += wj
    st.loads[b, q] += wk - wj
    st.cnt[b, f, r] += 1
    st.cnt[b, f, q] -= 1
    st.cnt[b, e, q] += 1
    fill[b, r] += 1


def pack_blocks(w: F64, counts: I64, num_ranks: int, slots_per_rank: int) -> tuple[_State, int]:
    """Fast packing: replicas sorted heaviest first, dealt in blocks of ``num_ranks``, the heaviest
    of a block to the lightest rank so far (one slot per rank per block). A block item barred by
    the spread rule trades ranks with the nearest block item that can; a row where no trade works
    is packed again by `pack_replicas`. Returns the state and the number of such rows."""
    rows_n, n = w.shape
    num_r, s = num_ranks, slots_per_rank
    items, item_w = _replicas_heaviest_first(w, counts)
    st = _State(
        slot_expert=np.full((rows_n, num_r * s), -1, dtype=np.int64),
        slot_w=np.zeros((rows_n, num_r * s)),
        loads=np.zeros((rows_n, num_r)),
        cnt=np.zeros((rows_n, n, num_r), dtype=np.int64),
        cap=-(-counts // num_r),
        slots_per_rank=s,
    )
    rows = np.arange(rows_n)[:, None]
    failed = np.zeros(rows_n, dtype=bool)
    for c in range(s):
        it, iw = items[:, c * num_r : (c + 1) * num_r], item_w[:, c * num_r : (c + 1) * num_r]
        t = np.argsort(st.loads, axis=1, kind="stable")
        barred = st.cnt[rows, it, t] >= st.cap[rows, it]
        for b in np.flatnonzero(barred.any(axis=1)):
            failed[b] |= not _trade_block(st, int(b), it[b], t[b])
        st.slot_expert[rows, t * s + c] = it
        st.slot_w[rows, t * s + c] = iw
        st.loads[rows, t] += iw
        st.cnt[rows, it, t] += 1
    redo = np.flatnonzero(failed)
    if redo.size:
        sub, _ = pack_replicas(w[redo], counts[redo], num_r, s)
        for name in ("slot_expert", "slot_w", "loads", "cnt"):
            getattr(st, name)[redo] = getattr(sub, name)
    return st, int(redo.size)


def _trade_block(st: _State, b: int, it: I64, t: I64) -> bool:
    """Give each barred item of a block the rank of the nearest block item that can trade."""
    num_r = it.size
    cnt, cap = st.cnt[b], st.cap[b]
    for i in range(num_r):
        e = it[i]
        if cnt[e, t[i]] < cap[e]:
            continue
        for i2 in sorted(range(num_r), key=lambda x: abs(x - i)):
            f = it[i2]
            if f != e and cnt[e, t[i2]] < cap[e] and cnt[f, t[i]] < cap[f]:
                t[i], t[i2] = t[i2], t[i]
                break
        else:
            return False
    return True


def _apply_swaps(st: _State, b: I64, pi: I64, pj: I64) -> None:
    """Exchange slots ``pi`` and ``pj`` of rows ``b`` (each (row, rank) at most once)."""
    s = st.slots_per_rank
    r, q = pi // s, pj // s
    e_i, e_j = st.slot_expert[b, pi], st.slot_expert[b, pj]
    w_i, w_j = st.slot_w[b, pi], st.slot_w[b, pj]
    st.slot_expert[b, pi], st.slot_expert[b, pj] = e_j, e_i
    st.slot_w[b, pi], st.slot_w[b, pj] = w_j, w_i
    st.loads[b, r] -= w_i - w_j
    st.loads[b, q] += w_i - w_j
    st.cnt[b, e_i, r] -= 1
    st.cnt[b, e_j, r] += 1
    st.cnt[b, e_j, q] -= 1
    st.cnt[b, e_i, q] += 1


# --- step 4: local search -----------------------------------------------------------------------
def _best_swaps(st: _State, ab: I64, r: I64, cand: I64, *, top: int = 4) -> tuple[I64, I64]:
    """For rows ``ab`` with busiest rank ``r``, the best improving swap between a slot of r and one
    of the slots ``cand: [A, C]``. Returns slot pairs ``(pi, pj)``, -1 where none improves.

    The spread caps cost a gather from the [B, n, R] copy counts per pair, so they are checked
    only on each row's ``top`` best pairs by load; rows where all of those break a cap are
    checked in full.
    """
    s = st.slots_per_rank
    a = np.arange(ab.size)
    loads = st.loads[ab]
    lr = loads[a, r]
    si = r[:, None] * s + np.arange(s)
    wi, ei = st.slot_w[ab[:, None], si], st.slot_expert[ab[:, None], si]
    wj, ej = st.slot_w[ab[:, None], cand], st.slot_expert[ab[:, None], cand]
    q = cand // s
    d = wi[:, :, None] - wj[:, None, :]
    new_max = np.maximum(lr[:, None, None] - d, loads[a[:, None], q][:, None, :] + d)
    ok = (d > 0) & (new_max < (lr * (1 - _EPS))[:, None, None]) & (q != r[:, None])[:, None, :]
    score = np.where(ok, new_max, np.inf).reshape(ab.size, -1)
    c = cand.shape[1]
    m = min(top, score.shape[1])
    best = (
        np.argpartition(score, m - 1, axis=1)[:, :m]
        if m < score.shape[1]
        else np.tile(np.arange(score.shape[1]), (ab.size, 1))
    )
    best = np.take_along_axis(best, np.argsort(np.take_along_axis(score, best, axis=1), axis=1), axis=1)
    flat = _first_within_caps(st, ab, r, cand, ei, ej, score, best)
    retry = np.flatnonzero(flat == -2)
    if retry.size:
        # Rare: every top pair breaks a cap. Check every pair of those rows.
        sub = score[retry].copy()
        bi = ei[retry][:, :, None]
        bj = ej[retry][:, None, :]
        br = ab[retry]
        capped = st.cnt[br[:, None, None], bi, q[retry][:, None, :]] >= st.cap[br[:, None, None], bi]
        capped |= st.cnt[br[:, None, None], bj, r[retry][:, None, None]] >= st.cap[br[:, None, None], bj]
        sub[capped.reshape(retry.size, -1)] = np.inf
        f = np.argmin(sub, axis=1)
        flat[retry] = np.where(np.isfinite(sub[np.arange(retry.size), f]), f, -1)
    found = flat >= 0
    flat = np.maximum(flat, 0)
    pi = np.where(found, r * s + flat // c, -1)
    pj = np.where(found, cand[a, flat % c], -1)
    return pi, pj


def _first_within_caps(
    st: _State, ab: I64, r: I64, cand: I64, ei: I64, ej: I64, score: F64, best: I64
) -> I64:
    """Per row, the first of ``best`` (flat pair indices, best first) that is finite and keeps
    the spread caps; -2 when every finite one breaks a cap, -1 when none is finite."""
    c = cand.shape[1]
    a = np.arange(ab.size)[:, None]
    fin = np.isfinite(np.take_along_axis(score, best, axis=1))
    e_i, e_j = ei[a, best // c], ej[a, best % c]
    q = cand[a, best % c] // st.slots_per_rank
    b = ab[:, None]
    good = fin & (st.cnt[b, e_i, q] < st.cap[b, e_i]) & (st.cnt[b, e_j, r[:, None]] < st.cap[b, e_j])
    first = np.argmax(good, axis=1)
    out = np.where(good.any(axis=1), best[a[:, 0], first], -1)
    # Finite pairs beyond the top ones may still keep the caps: ask for a full check.
    more = ~good.any(axis=1) & fin.all(axis=1) & (best.shape[1] < score.shape[1])
    return np.where(more, -2, out)


def _pair_table(st: _State, ab: I64, heavy: I64, light: I64) -> tuple[F64, I64, I64]:
    """For rows ``ab``, each heavy rank ``heavy: [A, h]`` and light rank ``light: [A, k]``: the
    heavy rank's new load after the best swap between the two that lowers it (inf if none, or if
    that swap breaks a spread cap: the pair then waits, though a worse swap of it might keep the
    caps; when the light ranks are not all ranks, the busiest is then asked of every rank), and
    the swap's slots ``(pi, pj)``, each ``[A, h, k]``."""
    s = st.slots_per_rank
    a = ab[:, None, None, None, None]
    loc = np.arange(s)
    si = (heavy[:, :, None] * s + loc)[:, :, None, :, None]  # [A, h, 1, s, 1]
    sj = (light[:, :, None] * s + loc)[:, None, :, None, :]  # [A, 1, k, 1, s]
    lh = st.loads[ab[:, None], heavy][:, :, None, None, None]
    ll = st.loads[ab[:, None], light][:, None, :, None, None]
    d = st.slot_w[a, si] - st.slot_w[a, sj]  # [A, h, k, s, s]
    new_max = np.maximum(lh - d, ll + d)
    score = np.where((d > 0) & (new_max < lh * (1 - _EPS)), new_max, np.inf)
    shape = score.shape
    flat = np.argmin(score.reshape(*shape[:3], s * s), axis=3)  # [A, h, k]
    best = np.take_along_axis(score.reshape(*shape[:3], s * s), flat[..., None], axis=3)[..., 0]
    pi = heavy[:, :, None] * s + flat // s
    pj = light[:, None, :] * s + flat % s
    b = ab[:, None, None]
    ei, ej = st.slot_expert[b, pi], st.slot_expert[b, pj]
    ok = (st.cnt[b, ei, pj // s] < st.cap[b, ei]) & (st.cnt[b, ej, pi // s] < st.cap[b, ej])
    return np.where(ok, best, np.inf), pi, pj


def improve_swaps(
    st: _State, bound: F64, *, light_ranks: int = 8, heavy_ranks: int = 4, max_rounds: int | None = None
) -> int:
    """Swap a slot of each row's busiest rank with a lighter slot elsewhere while that lowers the
    busiest rank (best swap first), keeping the spread caps. Mutates ``st``; returns swaps made.

    A row stops when its busiest rank is at most ``bound: [B]``. Partners come from the
    ``light_ranks`` lightest ranks first (cheap), then from every rank before a row is declared
    a local optimum. To take fewer rounds, the next ``heavy_ranks - 1`` busiest ranks above the
    bound also take their best swap with a light rank in the same round, each light rank serving
    one of them; every such swap lowers its heavy rank and keeps its partner below it, so the
    busiest rank never rises and the sum of squared rank loads falls (the search ends).
    """
    num_phy = st.slot_expert.shape[1]
    s = st.slots_per_rank
    num_r = num_phy // s
    active = st.loads.max(axis=1) > bound
    k = min(light_ranks, num_r)
    h = max(1, min(heavy_ranks, num_r - k))
    swaps = 0
    for _ in range(max_rounds if max_rounds is not None else 4 * num_phy):
        ab = np.flatnonzero(active)
        if ab.size == 0:
            break
        loads = st.loads[ab]
        order = np.argsort(loads, axis=1, kind="stable")
        light, heavy = order[:, :k], order[:, ::-1][:, :h]  # [A, k], [A, h] busiest first
        rows = np.arange(ab.size)
        # Best swap of each (heavy, light) pair; only heavy ranks above the bound move.
        table, ti, tj = _pair_table(st, ab, heavy, light)  # [A, h, k]
        table[~(loads[rows[:, None], heavy] > bound[ab][:, None])] = np.inf
        # Each rank takes part in one swap per round, busiest first, each heavy rank with the
        # light rank that lowers it most among those still free.
        used = np.zeros((ab.size, k), dtype=bool)
        pi = np.full((ab.size, h), -1, dtype=np.int64)
        pj = np.full((ab.size, h), -1, dtype=np.int64)
        for j in range(h):
            t = np.where(used, np.inf, table[:, j])
            c = np.argmin(t, axis=1)
            ok = np.isfinite(t[rows, c])
            pi[ok, j], pj[ok, j] = ti[rows[ok], j, c[ok]], tj[rows[ok], j, c[ok]]
            used[rows[ok], c[ok]] = True
        miss = np.flatnonzero(pi[:, 0] < 0)
        if miss.size and k < num_r:
            # The busiest found no light partner: ask every rank. Its partner may be another
            # heavy rank or a light one taken this round; those then sit the round out.
            full = np.broadcast_to(np.arange(num_phy), (miss.size, num_phy))
            pi0, pj0 = _best_swaps(st, ab[miss], heavy[miss, 0], full)
            pi[miss, 0], pj[miss, 0] = pi0, pj0
            q = np.where(pi0 >= 0, pj0 // s, -1)[:, None]
            others = pi[miss, 1:]
            others[(q == heavy[miss, 1:]) | (q == np.where(others >= 0, pj[miss, 1:] // s, -2))] = -1
            pi[miss, 1:] = others
        take = pi >= 0
        active[ab[~take[:, 0]]] = False
        if not take.any():
            break
        ra, ja = np.nonzero(take)
        _apply_swaps(st, ab[ra], pi[ra, ja], pj[ra, ja])
        swaps += int(ra.size)
        active[ab] &= st.loads[ab].max(axis=1) > bound[ab]
    return swaps


def solve_rows(
    w: F64, num_ranks: int, slots_per_rank: int, *, rows_per_layer: int = 1, tolerance: float = 1e-4
) -> tuple[I64, int, int]:
    """``w: [B, n]`` independent rows -> ``slot_expert: [B, num_ranks * slots_per_rank]`` (row-local
    expert ids), swaps made, rows repacked.

    Consecutive ``rows_per_layer`` rows make one layer (its nodes): a row stops improving once its
    busiest rank is within ``tolerance`` of the layer's bound, max over the layer's rows of
    max(mean rank load, heaviest replica), since only the layer's busiest rank counts.
    """
    counts = replica_counts(w, num_ranks * slots_per_rank, num_ranks)
    st, redone = pack_blocks(w, counts, num_ranks, slots_per_rank)
    row_bound = np.maximum(st.loads.mean(axis=1), st.slot_w.max(axis=1))
    bound = np.repeat(row_bound.reshape(-1, rows_per_layer).max(axis=1), rows_per_layer) * (1 + tolerance)
    swaps = improve_swaps(st, bound)
    return st.slot_expert, swaps, redone


def plan_balanced(
    load: F64,
    topology: Topology,
    *,
    num_groups: int,
    hierarchical: bool | None = None,
    deepseek_floor: bool = True,
    tolerance: float = 1e-4,
) -> tuple[I64, BalancedInfo]:
    """``physical_to_logical: [num_layers, num_physical_experts]`` and how it was made."""
    if not 0 <= tolerance < 1:
        raise InvalidValueError(
            "search_tolerance", f"must be in [0, 1) (got {tolerance}); 1e-4 is the default."
        )
    num_l, num_e = load.shape
    num_r, s = topology.num_ranks, topology.slots_per_rank
    hier = use_hierarchy(topology, num_groups, hierarchical)
    if hier:
        num_n = topology.num_nodes
        gs = num_e // num_groups
        node_of_group = pack_groups(load.reshape(num_l, num_groups, gs).sum(axis=2), num_n)
        group_order = np.argsort(node_of_group, axis=1, kind="stable")
        mlog2log = (group_order[:, :, None] * gs + np.arange(gs)).reshape(num_l, num_e)
        rows_w = np.take_along_axis(load, mlog2log, axis=1).reshape(num_l * num_n, num_e // num_n)
        local, swaps, redone = solve_rows(
            rows_w, num_r // num_n, s, rows_per_layer=num_n, tolerance=tolerance
        )
        offsets = (np.arange(num_n) * (num_e // num_n))[None, :, None]
        mlog = (local.reshape(num_l, num_n, -1) + offsets).reshape(num_l, -1)
        p2l = np.take_along_axis(mlog2log, mlog, axis=1)
    else:
        p2l, swaps, redone = solve_rows(load, num_r, s, tolerance=tolerance)
    taken: tuple[int, ...] = ()
    if deepseek_floor:
        scope = num_r // topology.num_nodes if hier else num_r
        p2l, taken = _deepseek_floor(load, p2l, topology, num_groups, scope)
    info = BalancedInfo(hierarchical=hier, deepseek_layers=taken, swaps=swaps, repacked_rows=redone)
    return p2l, info


def _deepseek_floor(
    load: F64, p2l: I64, topology: Topology, num_groups: int, scope: int
) -> tuple[I64, tuple[int, ...]]:
    """``p2l`` with every layer DeepSeek's greedy plans lighter (its stacked copies swapped
    apart) replaced by DeepSeek's, and the layers replaced."""
    num_r = topology.num_ranks
    mine = max_rank_load(load, p2l, num_r)
    ds_nodes = topology.num_nodes if is_uniform_nodes(topology) else 1
    floor = busiest_rank_floor(load, topology.num_physical_experts, num_groups, ds_nodes, num_r)
    # Run the full greedy only on layers where it could beat this plan.
    check = np.flatnonzero(mine > floor)
    if check.size == 0:
        return p2l, ()
    ds = deepseek_array(load[check], topology, num_groups)
    # Only layers DeepSeek beats as planned are unstacked (the swaps cost more than its greedy);
    # on a layer it plans within the spread rule, unstacking changes nothing.
    wins = max_rank_load(load[check], ds, num_r) < mine[check] * (1 - 1e-9)
    near = check[wins]
    if near.size == 0:
        return p2l, ()
    ds = _unstacked(load[near], ds[wins], num_r, scope)
    better = max_rank_load(load[near], ds, num_r) < mine[near] * (1 - 1e-9)
    out: I64 = p2l.copy()
    out[near[better]] = ds[better]
    return out, tuple(int(i) for i in near[better])


def _unstacked(load: F64, ds: I64, num_r: int, scope: int) -> I64:
    """DeepSeek's layers ``ds`` with the copies it stacks against the spread rule swapped apart
    (`unstack`); a layer where that fails keeps its stack and is dropped by the caller's
    comparison only if it does not beat ``balanced``'s own layer."""
    out: I64 = ds.copy()
    num_l, num_p = ds.shape
    num_e = load.shape[1]
    # One pass finds the layers that stack at all (most do not); only those are repaired.
    cnt = np.zeros((num_l, num_e, num_r), dtype=np.int64)
    np.add.at(cnt, (np.arange(num_l)[:, None], ds, np.arange(num_p) // (num_p // num_r)), 1)
    stacked = (cnt > -(-cnt.sum(axis=2, keepdims=True) // scope)).any(axis=(1, 2))
    for layer in np.flatnonzero(stacked).tolist():
        fixed = unstack(load[layer], ds[layer], num_r, scope)
        if fixed is not None:
            out[layer] = fixed
    return out


@register_policy("balanced")
def balanced(
    load: F64,
    topology: Topology,
    *,
    num_groups: int,
    current: ModelPlacement | None = None,
    hierarchical: bool | None = None,
    deepseek_floor: bool = True,
    search_tolerance: float = 1e-4,
) -> ModelPlacement:
    """Plan from scratch (``current`` is ignored); see the module docstring for the steps.
    ``search_tolerance``: stop improving a layer once its busiest rank is within this fraction
    of the layer's bound (smaller is slower and closer)."""
    p2l, _ = plan_balanced(
        load,
        topology,
        num_groups=num_groups,
        hierarchical=hierarchical,
        deepseek_floor=deepseek_floor,
        tolerance=search_tolerance,
    )
    return to_model_placement(p2l, topology.num_ranks, load.shape[1])
