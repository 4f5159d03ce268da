"""A schedule: a plan's ops grouped into rounds that every rank runs in the same order.

Round semantics, on each rank, for rounds ``0, 1, ...``:

1. run the rank's ``before`` copies in listed order (typically: stage a slot that a receive
   of this round or a later one overwrites while it is still to be read);
2. post the rank's ``transfers`` as one group (one ``batch_isend_irecv``, one all-to-all):
   a Send reads its location when the group starts, a Recv writes its location when the group
   ends, so no location may be both read by a Send and written by a Recv of one group;
3. run the rank's ``after`` copies in listed order (typically: fan a received expert out to
   further slots, unstage).

Every Send of round k has its Recv in round k, and the Sends from rank a to rank b are listed in
the same order as the Recvs on b from a (NCCL runs calls to one peer in order). Staging buffers
``b0..b{staging_buffers_per_rank-1}`` are one pool per rank shared by all layers.
"""

from __future__ import annotations

from collections.abc import Iterator

import attrs

from eplb.ir._validate import non_negative, ops_trusted, optional_positive_int, positive_int, trusting_ops
from eplb.ir.errors import InvalidValueError
from eplb.ir.ops import Copy, Op, Recv, Send, Transfer
from eplb.ir.plan import MigrationPlan, op_problems, ops_fit

__all__ = ["Round", "Schedule", "ScheduleLimits"]


@attrs.frozen(kw_only=True)
class ScheduleLimits:
    """Per-round limits. ``None`` means unlimited.

    ``max_peers_per_round``: distinct ranks one rank sends to or receives from in one round
    (1 is the textbook matching; on NVLink all peers at once is faster, DESIGN.md).
    ``max_ops_per_group``: Send + Recv calls of one rank in one group (NCCL splits larger groups
    into launches that can disagree across ranks; pytorch#174288).
    ``staging_bytes_per_rank``: staging memory a rank may hold at once.
    """

    max_peers_per_round: int | None = attrs.field(default=None, validator=optional_positive_int)
    max_ops_per_group: int = attrs.field(default=256, validator=positive_int)
    staging_bytes_per_rank: int | None = attrs.field(default=None, validator=optional_positive_int)

    def __str__(self) -> str:
        peers = "all" if self.max_peers_per_round is None else str(self.max_peers_per_round)
        staging = "unlimited" if self.staging_bytes_per_rank is None else f"{self.staging_bytes_per_rank} B"
        return f"limits(peers/round={peers}, ops/group={self.max_ops_per_group}, staging={staging})"


@attrs.frozen(kw_only=True)
class Round:
    """One round: local copies before, one group of transfers, local copies after."""

    before: tuple[Copy, ...] = attrs.field(converter=tuple, default=())
    transfers: tuple[Transfer, ...] = attrs.field(converter=tuple, default=())
    after: tuple[Copy, ...] = attrs.field(converter=tuple, default=())

    def __attrs_post_init__(self) -> None:
        if ops_trusted():
            return  # `_trusted`: the planner put each op in its section
        for section, ops, allowed in (
            ("before", self.before, (Copy,)),
            ("transfers", self.transfers, (Send, Recv)),
            ("after", self.after, (Copy,)),
        ):
            for i, op in enumerate(ops):
                if not isinstance(op, allowed):
                    names = " or ".join(c.__name__ for c in allowed)
                    raise InvalidValueError(f"{section}[{i}]", f"must be a {names} (got {op!r}).")

    @classmethod
    def _trusted(cls, before: list[Copy], transfers: list[Transfer], after: list[Copy]) -> Round:
        """Private to `eplb.planner`: a round whose sections it filled with the right kinds of op;
        built without the per-op type check."""
        with trusting_ops():
            return cls(before=before, transfers=transfers, after=after)  # type: ignore[arg-type]  # converter

    def ops(self) -> Iterator[Op]:
        yield from self.before
        yield from self.transfers
        yield from self.after

    def ops_of(self, rank: int) -> tuple[tuple[Copy, ...], tuple[Transfer, ...], tuple[Copy, ...]]:
        """``rank``'s share of the round: (before, transfers, after), order kept."""
        return (
            tuple(op for op in self.before if op.rank == rank),
            tuple(op for op in self.transfers if op.rank == rank),
            tuple(op for op in self.after if op.rank == rank),
        )

    def __str__(self) -> str:
        sends = sum(isinstance(op, Send) for op in self.transfers)
        return f"round({len(self.before)} before, {sends} transfers, {len(self.after)} after)"


@attrs.frozen(kw_only=True)
class Schedule:
    """A plan, the limits it was scheduled under, and its rounds.

    ``rounds_lower_bound`` is the scheduler's own bound on rounds under ``limits``;
    ``staging_buffers_per_rank`` sizes each rank's staging pool (in experts).
    Structural rules are checked on construction; ``eplb.planner.verify`` proves the semantics.
    """

    plan: MigrationPlan
    limits: ScheduleLimits = ScheduleLimits()
    rounds: tuple[Round, ...] = attrs.field(converter=tuple)
    rounds_lower_bound: int = attrs.field(validator=non_negative)
    staging_buffers_per_rank: int = attrs.field(default=0, validator=non_negative)

    def __attrs_post_init__(self) -> None:
        if ops_trusted():
            return  # `_trusted`: the per-op range scan is all there is to check
        problem = next(self.problems(), None)
        if problem is not None:
            raise InvalidValueError(*problem)

    @classmethod
    def _trusted(
        cls,
        *,
        plan: MigrationPlan,
        limits: ScheduleLimits,
        rounds: tuple[Round, ...],
        rounds_lower_bound: int,
        staging_buffers_per_rank: int,
    ) -> Schedule:
        """Private to `eplb.planner`: rounds of ``plan``'s ops (buffers renamed into a pool of
        ``staging_buffers_per_rank``). Fields are checked as usual; the per-op range scan is
        skipped (`eplb.planner.verify` checks the buffers against the pool)."""
        with trusting_ops():
            return cls(
                plan=plan,
                limits=limits,
                rounds=rounds,  # type: ignore[arg-type]  # attrs converter=tuple
                rounds_lower_bound=rounds_lower_bound,
                staging_buffers_per_rank=staging_buffers_per_rank,
            )

    def problems(self) -> Iterator[tuple[str, str]]:
        """Ops that point outside the plan's topology, layers or staging pool."""
        plan = self.plan
        num_e = plan.target.num_logical_experts
        layers = range(plan.num_layers)
        for k, rnd in enumerate(self.rounds):
            for section in ("before", "transfers", "after"):
                ops = getattr(rnd, section)
                if ops_fit(ops, plan.topology, num_e, self.staging_buffers_per_rank, layers):
                    continue  # the usual case, checked fast; the loop below says what is wrong
                for i, op in enumerate(ops):
                    for field, rule in op_problems(op, plan.topology, num_e, self.staging_buffers_per_rank):
                        yield f"rounds[{k}].{section}[{i}].{field}", rule
                    if op.layer >= plan.num_layers:
                        yield (
                            f"rounds[{k}].{section}[{i}].layer",
                            f"must be in [0, {plan.num_layers}) (got {op.layer}).",
                        )

    @property
    def num_rounds(self) -> int:
        return len(self.rounds)

    @property
    def staging_bytes_per_rank(self) -> int:
        return self.staging_buffers_per_rank * self.plan.expert_bytes

    def ops(self) -> Iterator[Op]:
        for rnd in self.rounds:
            yield from rnd.ops()

    def __str__(self) -> str:
        return (
            f"Schedule({self.num_rounds} rounds, lower bound {self.rounds_lower_bound}, "
            f"staging {self.staging_buffers_per_rank} expert(s)/rank, {self.limits}; {self.plan})"
        )
