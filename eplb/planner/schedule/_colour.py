"""Round colouring: a round index per pair under the peer and op limits (best fit, then
Misra–Gries when best fit needs more than the bound)."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import networkx as nx

from eplb.ir.schedule import ScheduleLimits
from eplb.planner.schedule._parse import _Pair


def _colour(pairs: Sequence[_Pair], limits: ScheduleLimits, num_ranks: int, bound: int) -> list[int]:
    """A round index per pair: every rank <= k peers and <= max_ops_per_group ops per round.
    ``bound``: the pairs' round lower bound."""
    if not pairs:
        return []
    greedy = _best_fit(pairs, limits, num_ranks, bound)
    rounds = max(greedy) + 1
    if limits.max_peers_per_round is None or rounds <= bound:
        return greedy
    mg = _misra_gries_rounds(pairs, limits)
    if mg is not None and max(mg) + 1 < rounds:
        return mg
    return greedy


def _best_fit(pairs: Sequence[_Pair], limits: ScheduleLimits, num_ranks: int, start: int) -> list[int]:
    """Pairs of ranks, busiest first, into the open round with the most room; new rounds as needed."""
    k, m = limits.max_peers_per_round, limits.max_ops_per_group
    groups: dict[tuple[int, int], list[int]] = defaultdict(list)
    degree = [0] * num_ranks
    for i, p in enumerate(pairs):
        a, b = p.send.src_rank, p.recv.dst_rank
        key = (a, b) if a < b else (b, a)
        if key not in groups:
            degree[a] += 1
            degree[b] += 1
        groups[key].append(i)
    # Per rank, per open round: its transfer ops and its peers (rank-major: the inner loop below
    # walks the rounds of two ranks).
    load: list[list[int]] = [[0] * start for _ in range(num_ranks)]
    peers: list[list[set[int]]] = [[set() for _ in range(start)] for _ in range(num_ranks)]
    num_rounds = start
    out = [0] * len(pairs)
    order = sorted(groups, key=lambda ab: (-max(degree[ab[0]], degree[ab[1]]), -len(groups[ab]), ab))
    for a, b in order:
        todo = groups[(a, b)]
        load_a, load_b, peers_a, peers_b = load[a], load[b], peers[a], peers[b]
        while todo:
            best, room = -1, 0
            for r in range(num_rounds):
                if k is not None and b not in peers_a[r] and (len(peers_a[r]) >= k or len(peers_b[r]) >= k):
                    continue
                free = m - max(load_a[r], load_b[r])
                if free > room:
                    best, room = r, free
            if best < 0:
                for rank in range(num_ranks):
                    load[rank].append(0)
                    peers[rank].append(set())
                best, room = num_rounds, m
                num_rounds += 1
            take, todo = todo[:room], todo[room:]
            for i in take:
                out[i] = best
            load_a[best] += len(take)
            load_b[best] += len(take)
            peers_a[best].add(b)
            peers_b[best].add(a)
    used = sorted(set(out))
    renumber = {r: j for j, r in enumerate(used)}
    return [renumber[r] for r in out]


def _misra_gries_rounds(pairs: Sequence[_Pair], limits: ScheduleLimits) -> list[int] | None:
    """Proper edge colouring of the pair graph (<= max degree + 1 colours), k colours a round.

    None if some round would exceed ``max_ops_per_group`` (pairs with many transfers).
    """
    k = limits.max_peers_per_round
    assert k is not None
    graph = nx.Graph()
    for p in pairs:
        a, b = p.send.src_rank, p.recv.dst_rank
        if graph.has_edge(a, b):
            graph[a][b]["n"] += 1
        else:
            graph.add_edge(a, b, n=1)
    colours = _misra_gries(graph)
    used = sorted(set(colours.values()))
    rank_of = {c: j // k for j, c in enumerate(used)}
    out = []
    load: dict[tuple[int, int], int] = defaultdict(int)
    for p in pairs:
        a, b = p.send.src_rank, p.recv.dst_rank
        r = rank_of[colours[(a, b) if a < b else (b, a)]]
        load[(r, a)] += 1
        load[(r, b)] += 1
        out.append(r)
    if max(load.values()) > limits.max_ops_per_group:
        return None
    return out


def _misra_gries(graph: nx.Graph) -> dict[tuple[int, int], int]:
    """Misra & Gries (1992): a proper edge colouring with at most max degree + 1 colours."""
    num_colours = max((d for _, d in graph.degree()), default=0) + 1
    at: dict[int, dict[int, int]] = {v: {} for v in graph}  # vertex -> colour -> neighbour

    def free(v: int) -> int:
        used = at[v]
        return next(c for c in range(num_colours) if c not in used)

    def colour_of(u: int, v: int) -> int | None:
        return next((c for c, w in at[u].items() if w == v), None)

    def set_colour(u: int, v: int, c: int | None) -> None:
        old = colour_of(u, v)
        if old is not None:
            del at[u][old]
            del at[v][old]
        if c is not None:
            at[u][c] = v
            at[v][c] = u

    for x, f in sorted((min(e), max(e)) for e in graph.edges()):
        # Maximal fan of x starting at f: colour(x, fan[i]) is free on fan[i - 1].
        fan = [f]
        in_fan = {f}
        grown = True
        while grown:
            grown = False
            for c, w in at[x].items():
                if w not in in_fan and c not in at[fan[-1]]:
                    fan.append(w)
                    in_fan.add(w)
                    grown = True
                    break
        c, d = free(x), free(fan[-1])
        # Invert the path from x alternating colours d, c (c is free on x).
        path = []
        v, col = x, d
        while col in at[v]:
            w = at[v][col]
            path.append((v, w, col))
            v, col = w, (c if col == d else d)
        for v, w, col in path:
            del at[v][col]
            del at[w][col]
        for v, w, col in path:
            new = c if col == d else d
            at[v][new] = w
            at[w][new] = v
        # The first fan vertex on which d is free, keeping the prefix a fan.
        end = 0
        for i, w in enumerate(fan):
            if i > 0 and colour_of(x, w) in at[fan[i - 1]]:
                break
            end = i
            if d not in at[w]:
                break
        # Rotate the fan prefix: each edge takes its successor's colour; the last takes d.
        for i in range(end):
            nxt = colour_of(x, fan[i + 1])
            set_colour(x, fan[i + 1], None)
            set_colour(x, fan[i], nxt)
        set_colour(x, fan[end], d)
    return {(min(u, v), max(u, v)): c for u, nbrs in at.items() for c, v in nbrs.items()}

