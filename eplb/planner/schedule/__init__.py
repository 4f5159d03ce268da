"""Group a plan's ops into rounds: `schedule(plan, limits) -> Schedule`.

1. Levels. Within a layer, a transfer that must follow another (it reads what a Recv wrote, or
   overwrites what a Send reads) gets a higher level; copies sit between levels. Plans from
   `compile_plan` have every transfer at level 0 and copies after them, so a layer's transfers may
   go in any rounds.
2. Windows. Consecutive (layer, level) units share rounds while the lower bound of the union is
   no worse than the sum of their own bounds and an estimate of their staging fits
   ``staging_bytes_per_rank``: small layers do not pay one round each.
3. Rounds of a window. Without a peer limit, transfers are packed under ``max_ops_per_group``
   per rank (best fit). With ``max_peers_per_round = k`` the rank-to-rank pair graph (networkx)
   is edge coloured: best-fit first; if that needs more than the lower bound, Misra–Gries gives a
   proper colouring with at most max degree + 1 colours, grouped k per round, so rounds <=
   ceil((degree + 1) / k) <= lower bound + 1 whenever the op limit does not bind. A window's
   rounds may run in any order; rounds whose Recvs land in clean slots go first.
4. Ordering instead of staging (`_direct_landing`). Once transfers have rounds, a Recv the plan
   stages lands straight in its slot when every Send reading the slot's old expert ran in an
   earlier round (and no local copy reads it); a Recv still staged is unstaged right after its
   slot's last read, not at the end of the layer.
5. Copies go after the rank's last transfer of their unit (before its first, for copies that
   precede every transfer). Staging buffers are renamed into one pool per rank by interval
   colouring of their live ranges, so the pool is the peak number held at once.
6. Staging check. A window whose pool exceeds the budget is cut in proportion to the excess and
   rebuilt; if still over, into windows bounded by the buffers each layer's plan names (which
   fit whenever every layer fits alone). Windows are built independently, each at most once.
7. Pipelining. Under a staging budget, for a plan moving at most `PIPELINE_MAX_SHARE` of its
   slots, when the windows took more than the bound + 1 rounds, all layers' transfers are also
   filled into shared rounds by a staging-aware list scheduler (`_pipelined.py`: transfers
   needing no buffer first, staged ones while their rank has a buffer free, earlier layers
   first) and built as one window; of that and the windows, the one `eplb.planner.cost`
   predicts faster wins (fewer rounds on a tie).

The lower bound (`rounds_lower_bound`) is, over all ranks, the most of ceil(distinct peers / k)
and ceil(transfer ops / max_ops_per_group), at least the deepest layer's level count, and at least
what the staging budget allows (`_bounds.staging_bound`, docs/scheduler.md).
"""

from __future__ import annotations

from eplb.ir.errors import PlanError, Violation
from eplb.ir.ops import Copy, Transfer
from eplb.ir.plan import MigrationPlan
from eplb.ir.schedule import Round, Schedule, ScheduleLimits
from eplb.planner.cost import transfer_seconds
from eplb.planner.schedule._bounds import staging_bound
from eplb.planner.schedule._parse import _Layer, _Load, _parse, _Unit
from eplb.planner.schedule._pipelined import _pipelined_rounds
from eplb.planner.schedule._staging import _Built
from eplb.planner.schedule._windows import SPREAD_STAGING, _build_window, _copy_homes, _split, _windows

__all__ = [
    "MULTI_NODE_PEERS",
    "PIPELINE_MAX_SHARE",
    "SPREAD_STAGING",
    "default_limits",
    "layer_lower_bound",
    "rounds_lower_bound",
    "schedule",
]

# Peers per round across nodes. One NIC flow can fill a 400 Gb/s link, so a few peers at a time
# suffice; inside an NVSwitch node all peers at once is faster (DESIGN.md, "Why rounds").
# Not yet measured on a multi-node cluster: calibrate when one is available.
MULTI_NODE_PEERS = 4

def default_limits(plan: MigrationPlan) -> ScheduleLimits:
    """Limits for ``plan``'s link class: all peers at once on one node, `MULTI_NODE_PEERS` across
    nodes; 256 ops per group (pytorch#174288); staging of one layer (``slots_per_rank`` experts),
    the buffer vLLM and SGLang allocate."""
    topo = plan.topology
    return ScheduleLimits(
        max_peers_per_round=None if topo.num_nodes == 1 else MULTI_NODE_PEERS,
        max_ops_per_group=256,
        staging_bytes_per_rank=topo.slots_per_rank * plan.expert_bytes,
    )



def rounds_lower_bound(plan: MigrationPlan, limits: ScheduleLimits | None = None) -> int:
    """Fewest rounds any schedule of ``plan`` needs under ``limits`` (default: `default_limits`)."""
    limits = limits or default_limits(plan)
    return _bound(plan, [_parse(plan, i) for i in range(plan.num_layers)], limits)


def layer_lower_bound(plan: MigrationPlan, layer: int, limits: ScheduleLimits | None = None) -> int:
    """Fewest rounds layer ``layer`` alone needs under ``limits``."""
    limits = limits or default_limits(plan)
    return _bound(plan, [_parse(plan, layer)], limits)


def _bound(plan: MigrationPlan, layers: list[_Layer], limits: ScheduleLimits) -> int:
    """The most of: ops and peers per rank (`_Load`), the deepest layer's levels, and the
    staging budget (`staging_bound`)."""
    depth = max((len(lay.units) for lay in layers), default=0)
    load = _Load.union([u.load for lay in layers for u in lay.units]).bound(limits)
    return max(load, depth, staging_bound(layers, limits, plan.expert_bytes))


def _pipelined(
    plan: MigrationPlan,
    layers: list[_Layer],
    units: list[_Unit],
    homes: dict[tuple[int, int], list[tuple[int, Copy]]],
    limits: ScheduleLimits,
    budget: int,
    beat: tuple[float, int],
) -> _Built | None:
    """The whole plan as one window with `_pipelined_rounds`' rounds, if it is predicted faster
    than ``beat`` (seconds, rounds; fewer rounds on a tie); None when those rounds stall, are
    not faster, or the pool built exceeds ``budget``. Building is the costly part, so the
    rounds are rated first: a round's Sends, all the cost model counts, are known before."""
    pairs = _pipelined_rounds(layers, limits, budget)
    if pairs is None:
        return None
    sends: list[list[Transfer]] = [[] for _ in range(max((p.round for p in pairs), default=-1) + 1)]
    for p in pairs:
        sends[p.round].append(p.send)
    if (_seconds(plan, sends), len(sends)) >= beat:
        return None
    built = _build_window(plan, layers, units, homes, True, limits, preset=True)
    return built if built.staging <= budget else None


def _windowed(
    plan: MigrationPlan,
    layers: list[_Layer],
    units: list[_Unit],
    homes: dict[tuple[int, int], list[tuple[int, Copy]]],
    limits: ScheduleLimits,
    budget: int | None,
) -> list[_Built]:
    """The plan in windows, each built once.

    Windows by the round bound and an estimate of their staging; what they really hold (after
    direct landing and early unstaging) is known only once rounds exist. A window over the
    budget is cut into parts in proportion to its excess; if one is still over, it is replaced
    by windows that bound the staging each layer's plan names, which always fit when every
    layer fits alone.
    """
    cache: dict[tuple[tuple[int, int], ...], _Built] = {}

    def build(window: list[_Unit], first: bool) -> _Built:
        key = (*((u.layer, u.level) for u in window), (-1, int(first)))
        got = cache.get(key)
        if got is None:
            got = cache[key] = _build_window(plan, layers, window, homes, first, limits)
        return got

    windows = _windows(units, layers, limits, budget, spread=True) or [[]]
    for last_try in (False, True):
        needs = [build(w, i == 0).staging for i, w in enumerate(windows)]
        if budget is None or max(needs) <= budget:
            break
        windows = [
            sub
            for w, need in zip(windows, needs, strict=True)
            for sub in ([w] if need <= budget else _split(w, layers, limits, budget, need, last_try))
        ]
    return [build(w, i == 0) for i, w in enumerate(windows)]


# Pipelining costs 20-30 us of CPU per transfer (2-core dev box). A plan that edits the
# placement (transfers to at most this share of all slots, as `migration_aware`'s) saves 10-25%
# of its predicted transfer time (DeepSeek-V3 after a popularity trade: 0.40 -> 0.30 s); a plan
# that re-places most slots (from scratch) saves 10-13% at two to three times the planning
# time, so it keeps its windows.
PIPELINE_MAX_SHARE = 0.5


def _edits(plan: MigrationPlan) -> bool:
    """Whether ``plan`` moves at most `PIPELINE_MAX_SHARE` of its layers' slots."""
    return plan.transfers <= PIPELINE_MAX_SHARE * plan.num_layers * plan.topology.num_physical_experts


def _seconds(plan: MigrationPlan, rounds: list[list[Transfer]]) -> float:
    """`eplb.planner.cost.predict_seconds` of rounds' transfers."""
    latency = plan.topology.round_latency_us * 1e-6
    return sum(latency + transfer_seconds(rnd, plan.topology, plan.expert_bytes) for rnd in rounds)


def schedule(plan: MigrationPlan, limits: ScheduleLimits | None = None) -> Schedule:
    """Rounds for ``plan`` under ``limits`` (None: `default_limits` for the plan's topology).

    Raises `PlanError` when the plan is not a valid sequential program of matched transfers, or
    when one layer alone needs more staging than ``limits.staging_bytes_per_rank``.
    """
    limits = limits or default_limits(plan)
    layers = [_parse(plan, i) for i in range(plan.num_layers)]
    budget = None
    if limits.staging_bytes_per_rank is not None:
        budget = limits.staging_bytes_per_rank // plan.expert_bytes
    units = [u for lay in layers for u in lay.units]
    homes = _copy_homes(layers)
    bound = _bound(plan, layers, limits)
    parts = _windowed(plan, layers, units, homes, limits, budget)
    if budget is not None and sum(len(p.transfers) for p in parts) > bound + 1 and _edits(plan):
        # Windows ran layers apart. All layers' transfers in shared, staging-aware rounds: kept
        # when the cost model predicts them faster (fewer rounds can be slower: unevener).
        rounds = [rnd for part in parts for rnd in part.transfers]
        beat = (_seconds(plan, rounds), len(rounds))
        piped = _pipelined(plan, layers, units, homes, limits, budget, beat)
        if piped is not None:
            parts = [piped]
    pool = max(part.staging for part in parts)
    before = [rnd for part in parts for rnd in part.before]
    transfers = [rnd for part in parts for rnd in part.transfers]
    after = [rnd for part in parts for rnd in part.after]
    if budget is not None and pool > budget:
        raise PlanError(
            "plan needs more staging than the limits allow",
            [
                Violation(
                    what=f"the schedule holds {pool} staging buffer(s) per rank at once "
                    f"({pool * plan.expert_bytes} B) but staging_bytes_per_rank is "
                    f"{limits.staging_bytes_per_rank} B",
                    fix=f"raise staging_bytes_per_rank to at least {pool * plan.expert_bytes}",
                )
            ],
        )
    out_rounds = tuple(Round._trusted(b, t, a) for b, t, a in zip(before, transfers, after, strict=True))
    # The rounds hold the plan's ops (checked when the plan was built) with buffers renamed into
    # the pool: no per-op scan; `verify` still checks every buffer against the pool.
    return Schedule._trusted(
        plan=plan,
        limits=limits,
        rounds=out_rounds,
        rounds_lower_bound=bound,
        staging_buffers_per_rank=pool,
    )


