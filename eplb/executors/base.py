"""The executor ABC: every rank runs a verified `Schedule` on its expert weights, in place.

Weights follow vLLM's ``expert_weights`` layout: ``weights[layer][k]`` is the k-th weight tensor
of a MoE layer, shaped ``[slots_per_rank, ...]`` (several tensors per layer, of different shapes
and dtypes; fp8/fp4 as uint8 views). Every layer has the same tensors (shapes and dtypes), so one
staging pool serves all layers. Weights are moved with ``copy_`` into views: storage never
changes, so pointers captured by CUDA graphs stay valid.

`Executor.run` is the only run loop; backends implement hooks, in this call order on each rank:

1. ``verify(schedule)`` (`eplb.planner.verify`) unless the caller passes ``verified=True``;
2. the weights are checked against the plan (shapes, dtypes, bytes per expert, device), and the
   schedule's staging against ``Config.max_staging_bytes``, before anything is allocated;
3. ``setup(ctx) -> RunState``: the staging pool (``schedule.staging_buffers_per_rank``
   expert-sized buffers, one per index and tensor) and the backend's transport buffers, for the
   whole run; the returned state is ``ctx.state``;
4. the setup agreement: every rank reports whether 1-3 went well and the fingerprint of its
   schedule (`schedule_fingerprint`); a failure or two fingerprints end every rank with
   `ExecutionError` before any weight is touched;
5. for each round: ``copy(op, ctx)`` for the ``before`` copies; ``begin_transfers(ctx)``, then
   ``send(op, ctx)`` / ``recv(op, ctx)`` for the transfers in listed order (they only prepare);
   the round's agreement (``Config.agree_every_round``); ``post(ctx)`` (one group, waited on
   with ``Config.timeout_s``); ``copy(op, ctx)`` for the ``after`` copies;
6. a final agreement, then ``teardown(ctx)`` (always, also after a failure).

Agreement is an object of its own: `GroupAgreement` (one all-reduce of ``num_ranks x 5`` int64)
for the distributed backends, `LocalAgreement` (nothing to exchange: one process holds every
rank) for `local`. Failures: an exception in any hook is re-raised on *every* rank as
`ExecutionError` naming op, layer, round and rank; a peer that dies or never answers makes
``post`` or the next agreement fail (at once when the transport notices the closed connection,
else after ``Config.timeout_s``), and the error names this rank, the round, the round's peers
and how long the run waited. Layer atomicity: see `ExecutionError`.
"""

from __future__ import annotations

import abc
import array
import datetime
import enum
import hashlib
import time
from collections.abc import Iterator, Sequence
from typing import Any, ClassVar

import attrs
import torch
import torch.distributed as dist

from eplb.ir.errors import EplbError
from eplb.ir.ops import Copy, Loc, Op, Recv, Send, Transfer
from eplb.ir.schedule import Round, Schedule
from eplb.ir.topology import Topology, Transport

__all__ = [
    "Agreement",
    "Deadline",
    "ExecutionError",
    "Executor",
    "ExecutorError",
    "GroupAgreement",
    "LocalAgreement",
    "PackedExecutor",
    "PackedState",
    "RunContext",
    "RunReport",
    "RunState",
    "Section",
    "Weights",
    "WeightsError",
    "gpu_link_reason",
    "layer_last_rounds",
    "layer_states",
    "schedule_fingerprint",
]

Weights = Sequence[Sequence[torch.Tensor]]
"""``weights[layer][k]``: tensor k of a MoE layer, shaped ``[slots_per_rank, ...]``."""


class Section(enum.IntEnum):
    """Where in a round (or before round 0) an op or a failure is."""

    BEFORE = 0
    TRANSFERS = 1
    AFTER = 2
    SETUP = 3

    @property
    def label(self) -> str:
        return self.name.lower()


class ExecutorError(EplbError):
    """An executor cannot run: unsupported topology, bad weights, bad group, staging over limit."""


class WeightsError(ExecutorError, ValueError):
    """The weights do not match the plan (shape, dtype, bytes per expert, device, layout)."""


class ExecutionError(ExecutorError, RuntimeError):
    """A run failed on some rank; raised on every rank that can still raise.

    ``rank``: the rank that failed first (or, for a transport failure, the reporting rank);
    ``round`` / ``layer`` / ``op``: where (None: before round 0 / not one op); ``failed_ranks``:
    every rank that reported a failure; ``peer``: the rank that stopped answering or died, where
    it is knowable (the other rank of a 2-rank group; the single peer of a point-to-point group
    this rank waited on), else None; ``waited_seconds``: how long this
    rank waited on the group or agreement that failed (None: not a wait); ``group_usable``:
    False when the process group failed under the run (a timeout or a dead peer): replace it
    before the next run. ``completed_layers`` finished on every rank (their ops all ran in
    rounds before the failing round); ``untouched_layers`` have no op at or before the failing
    round, so they still hold the current placement; ``partial_layers`` had ops in flight and
    hold a mix of current and target experts: restore them before serving. A failure before
    round 0 (verification, weights, allocation, fingerprints) leaves all untouched.
    """

    def __init__(
        self,
        message: str,
        *,
        rank: int | None,
        round: int | None,
        layer: int | None,
        op: str | None,
        failed_ranks: tuple[int, ...],
        completed_layers: tuple[int, ...],
        untouched_layers: tuple[int, ...],
        partial_layers: tuple[int, ...],
        peer: int | None = None,
        waited_seconds: float | None = None,
        group_usable: bool = True,
    ) -> None:
        self.rank = rank
        self.round = round
        self.layer = layer
        self.op = op
        self.failed_ranks = failed_ranks
        self.completed_layers = completed_layers
        self.untouched_layers = untouched_layers
        self.partial_layers = partial_layers
        self.peer = peer
        self.waited_seconds = waited_seconds
        self.group_usable = group_usable
        super().__init__(
            f"{message}; layers completed: {_ids(completed_layers)}, untouched: "
            f"{_ids(untouched_layers)}, partial (restore before serving): {_ids(partial_layers)}"
        )


def _ids(values: Sequence[int]) -> str:
    if len(values) <= 16:
        return "[" + ", ".join(map(str, values)) + "]"
    return "[" + ", ".join(map(str, values[:16])) + f", ... ({len(values)} in all)]"


@attrs.frozen(kw_only=True)
class RunReport:
    """What one rank did (``rank=None``: every rank, the local executor).

    ``staging_bytes``: the staging pool allocated on the weights' device (held to
    ``schedule.staging_bytes_per_rank``); ``buffer_bytes``: transport buffers on that device
    (alltoall's packed buffers); ``host_buffer_bytes``: pinned host buffers (cpu_staged).
    ``layer_last_round[l]``: the round after which layer l is complete (-1: nothing to move).
    """

    backend: str
    rank: int | None
    num_rounds: int
    layers_completed: tuple[int, ...]
    layer_last_round: tuple[int, ...]
    bytes_sent: int
    bytes_received: int
    bytes_copied: int
    staging_bytes: int
    buffer_bytes: int
    host_buffer_bytes: int
    setup_seconds: float
    round_seconds: tuple[float, ...]
    wall_seconds: float

    @property
    def peak_extra_bytes(self) -> int:
        """Extra memory on the weights' device held during the run."""
        return self.staging_bytes + self.buffer_bytes

    def __str__(self) -> str:
        who = "all ranks" if self.rank is None else f"rank {self.rank}"
        return (
            f"RunReport({self.backend}, {who}: {self.num_rounds} rounds, {len(self.layers_completed)} "
            f"layers, sent {self.bytes_sent} B, received {self.bytes_received} B, staging "
            f"{self.staging_bytes} B + buffers {self.buffer_bytes} B, {self.wall_seconds * 1e3:.2f} ms)"
        )


def layer_last_rounds(schedule: Schedule) -> tuple[int, ...]:
    """``[num_layers]``: the last round holding an op of each layer (-1 for a layer with none)."""
    last = [-1] * schedule.plan.num_layers
    for k, rnd in enumerate(schedule.rounds):
        for op in rnd.ops():
            last[op.layer] = k
    return tuple(last)


def _layer_first_rounds(schedule: Schedule) -> tuple[int, ...]:
    first = [-1] * schedule.plan.num_layers
    for k, rnd in enumerate(schedule.rounds):
        for op in rnd.ops():
            if first[op.layer] < 0:
                first[op.layer] = k
    return tuple(first)


def layer_states(schedule: Schedule, failed_round: int) -> tuple[tuple[int, ...], ...]:
    """(completed, untouched, partial) layers when round ``failed_round`` failed (-1: before 0)."""
    first, last = _layer_first_rounds(schedule), layer_last_rounds(schedule)
    done, untouched, partial = [], [], []
    for layer, (a, b) in enumerate(zip(first, last, strict=True)):
        if b < 0 or b < failed_round:
            done.append(layer)
        elif a > failed_round or failed_round < 0:
            untouched.append(layer)
        else:
            partial.append(layer)
    return tuple(done), tuple(untouched), tuple(partial)


def schedule_fingerprint(schedule: Schedule) -> int:
    """A 63-bit hash of the canonical schedule: every op of every round (all fields, in order),
    the plan's current and target placements, its topology shape and expert size, and the
    staging pool. Ranks that hold the same schedule have the same fingerprint; two schedules of
    the same shape (or of different models) differ. About 10x cheaper than hashing the JSON form."""
    plan = schedule.plan
    topo = plan.topology
    ints = array.array("q", [topo.num_ranks, topo.slots_per_rank, topo.num_nodes, plan.expert_bytes])
    ints.extend([schedule.staging_buffers_per_rank, plan.num_layers, schedule.num_rounds])
    for side in (plan.current, plan.target):
        for layer in side.layers:
            ints.extend(layer.physical_to_logical)
    for rnd in schedule.rounds:
        ints.append(-1)  # round separator
        for op in rnd.ops():
            ints.extend(_op_ints(op))
    return int.from_bytes(hashlib.sha256(ints.tobytes()).digest()[:8], "big") >> 1


def _op_ints(op: Op) -> tuple[int, ...]:
    if isinstance(op, Send):
        return (0, op.layer, op.transfer_id, op.src_rank, op.dst_rank, _loc_int(op.src), op.expert)
    if isinstance(op, Recv):
        return (1, op.layer, op.transfer_id, op.src_rank, op.dst_rank, _loc_int(op.dst), op.expert)
    return (2, op.layer, op.rank, _loc_int(op.src), _loc_int(op.dst), op.expert)


def _loc_int(loc: Loc) -> int:
    return 2 * loc.index + (1 if loc.is_buffer else 0)


def gpu_link_reason(topology: Topology) -> str | None:
    """Why GPU memory cannot move straight between the topology's GPUs (None: it can).

    The rule p2p and alltoall share for CUDA weights: peer access (Transport.P2P) inside one
    node, GPUDirect between nodes."""
    if topology.num_nodes == 1 and Transport.P2P not in topology.transports:
        return "the topology has no GPU peer access (Transport.P2P) inside its node"
    if topology.num_nodes > 1 and Transport.GPUDIRECT not in topology.transports:
        return (
            f"its {topology.num_nodes} nodes have no GPUDirect transport between GPUs "
            "(Transport.GPUDIRECT); NCCL would fall back to host copies anyway"
        )
    return None


@attrs.define
class RunState:
    """A backend's per-run state, made by ``setup`` and held in ``ctx.state`` (the base: none)."""


@attrs.define
class PackedState(RunState):
    """The round's collected transfers, in schedule order (alltoall, cpu_staged)."""

    sends: list[Send] = attrs.field(factory=list)
    recvs: list[Recv] = attrs.field(factory=list)


class RunContext:
    """The state of one run: schedule, this rank, its tensors, its staging pool, counters.

    ``weights`` maps the ranks whose memory this process holds to their weights (one rank, or
    every rank for `local`, where ``rank`` is None). ``state`` is what the backend's ``setup``
    returned.
    """

    def __init__(
        self,
        *,
        schedule: Schedule,
        rank: int | None,
        group: Any,
        weights: dict[int, Weights],
        device: torch.device,
    ) -> None:
        self.schedule = schedule
        self.rank = rank
        self.group = group
        self.weights = weights
        self.device = device
        first = next(iter(weights.values()))[0] if weights else []
        self.num_tensors = len(first)
        # Shape, dtype and bytes of tensor k of one expert (one slot), identical across layers.
        self.expert_shapes = tuple(tuple(t.shape[1:]) for t in first)
        self.dtypes = tuple(t.dtype for t in first)
        self.tensor_bytes = tuple(t[0].numel() * t.element_size() for t in first)
        self.expert_bytes = sum(self.tensor_bytes)
        self.pool: dict[int, list[list[torch.Tensor]]] = {}
        self.round = -1
        self.section = Section.SETUP
        self.index = 0
        self.bytes_sent = 0
        self.bytes_received = 0
        self.bytes_copied = 0
        self.staging_bytes = 0
        self.buffer_bytes = 0
        self.host_buffer_bytes = 0
        self.state: RunState = RunState()

    def allocate_pool(self, num_buffers: int) -> None:
        """One expert-sized buffer per index and tensor, per held rank, for the whole run."""
        for r in self.weights:
            self.pool[r] = [
                [
                    torch.empty(shape, dtype=dt, device=self.device)
                    for shape, dt in zip(self.expert_shapes, self.dtypes, strict=True)
                ]
                for _ in range(num_buffers)
            ]
        self.staging_bytes = sum(t.nbytes for bufs in self.pool.values() for buf in bufs for t in buf) // max(
            1, len(self.pool)
        )

    def tensors(self, rank: int, layer: int, loc: Loc) -> list[torch.Tensor]:
        """Views of the expert at ``loc`` of ``rank`` for ``layer``: one per weight tensor."""
        if loc.is_buffer:
            return self.pool[rank][loc.index]
        return [w[loc.index] for w in self.weights[rank][layer]]

    def round_ops(self, rnd: Round) -> tuple[Sequence[Copy], Sequence[Transfer], Sequence[Copy]]:
        """(before, transfers, after) of the ranks this process holds."""
        if self.rank is None:
            return rnd.before, rnd.transfers, rnd.after
        return rnd.ops_of(self.rank)


@attrs.frozen
class _Failure:
    """What one rank reported: where it failed (round -1: setup) and, on that rank, why."""

    rank: int | None
    round: int
    section: Section
    index: int
    exc: BaseException | None
    op: Op | None = None


class _WaitFailedError(Exception):
    """A group or an agreement failed under this rank (timeout, dead peer, transport error)."""

    def __init__(self, what: str, waited: float, exc: BaseException) -> None:
        super().__init__(what)
        self.what = what
        self.waited = waited
        self.exc = exc


@attrs.frozen
class Verdict:
    """The outcome of one agreement: every failure reported, and (setup) each rank's fingerprint."""

    failures: tuple[_Failure, ...]
    fingerprints: tuple[int, ...] = ()


class Agreement(abc.ABC):
    """How the ranks of a run learn whether any of them failed (and, at setup, what they hold)."""

    distributed: ClassVar[bool]

    @abc.abstractmethod
    def agree(self, ctx: RunContext, failure: _Failure | None, *, fingerprint: int = 0) -> Verdict:
        """Every rank's failure (and fingerprint); raises `_WaitFailedError` if the exchange fails."""


class LocalAgreement(Agreement):
    """One process holds every rank: its own failure is every rank's, and one schedule is shared."""

    distributed = False

    def agree(self, ctx: RunContext, failure: _Failure | None, *, fingerprint: int = 0) -> Verdict:
        return Verdict(failures=() if failure is None else (failure,))


class GroupAgreement(Agreement):
    """One all-reduce of ``num_ranks x 5`` int64 (failed, round + 1, section, index, fingerprint),
    each rank writing its own row, waited on for at most ``timeout_s``."""

    distributed = True

    def __init__(self, *, device: torch.device, timeout_s: float) -> None:
        self.device = device
        self.timeout_s = timeout_s

    def agree(self, ctx: RunContext, failure: _Failure | None, *, fingerprint: int = 0) -> Verdict:
        assert ctx.rank is not None
        num_ranks = ctx.schedule.plan.topology.num_ranks
        row = torch.zeros(num_ranks, 5, dtype=torch.int64)
        row[ctx.rank, 4] = fingerprint
        if failure is not None:
            row[ctx.rank, :4] = torch.tensor([1, failure.round + 1, int(failure.section), failure.index])
        table = row.to(self.device)
        t0 = time.monotonic()
        try:
            work = dist.all_reduce(table, group=ctx.group, async_op=True)
            assert work is not None
            work.wait(datetime.timedelta(seconds=self.timeout_s))
        except Exception as exc:
            raise _WaitFailedError("agreement", time.monotonic() - t0, exc) from exc
        rows = table.cpu().tolist()
        failures = tuple(
            failure
            if failure is not None and r == ctx.rank
            else _Failure(r, v[1] - 1, Section(v[2]), v[3], None)
            for r, v in enumerate(rows)
            if v[0]
        )
        return Verdict(failures=failures, fingerprints=tuple(v[4] for v in rows))


class Deadline:
    """One group's wait budget: each work waits at most what is left of it, so a group of many
    works fails after the timeout, not after the timeout times the number of works."""

    def __init__(self, seconds: float) -> None:
        self.end = time.monotonic() + seconds

    def wait(self, work: Any) -> None:
        if work is not None:
            work.wait(datetime.timedelta(seconds=max(self.end - time.monotonic(), 0.001)))


class Executor(abc.ABC):
    """Runs a verified schedule on every rank; see the module docstring for the call order.

    A backend implements ``supports``, ``send``, ``recv`` and ``post``, and may override
    ``setup`` (returning its `RunState`), ``begin_transfers``, ``copy``, ``teardown``,
    ``warmup`` and ``agreement``; ``run`` (the loop) is not overridden. Op kinds dispatch to the
    method of the same name (``getattr(self, op.kind)``), as torch.fx's Interpreter does, so a
    subclass can override one kind (tests inject failures this way).
    """

    name: ClassVar[str] = "executor"
    collective: ClassVar[bool] = False
    """True when ``post`` is a collective of every rank (alltoall): a stuck group then cannot be
    blamed on the round's peers, so errors name no ``peer``."""

    @attrs.frozen(kw_only=True)
    class Config:
        """``timeout_s``: the longest wait for a group or an agreement before the run fails.
        ``agree_every_round``: one small all-reduce per round so a failing rank ends the run on
        every rank with its error; off, a failure shows on other ranks only as a timeout.
        ``max_staging_bytes``: the most staging memory per rank a schedule may need (None: no
        limit); a schedule over it is refused on every rank before anything is allocated.
        """

        timeout_s: float = attrs.field(default=300.0, validator=attrs.validators.gt(0))
        agree_every_round: bool = True
        max_staging_bytes: int | None = attrs.field(
            default=None, validator=attrs.validators.optional(attrs.validators.ge(0))
        )

    def __init__(self, config: Executor.Config | None = None) -> None:
        self.config = config if config is not None else type(self).Config()

    # --- choosing a backend -------------------------------------------------------------------
    @classmethod
    @abc.abstractmethod
    def supports(cls, topology: Topology, *, device_type: str = "cuda") -> str | None:
        """None if this backend can run on ``topology`` with weights on ``device_type``; else why not."""

    def max_transfers_per_group(self, tensors_per_expert: int) -> int | None:
        """The most transfers a rank may post in one round on this backend (None: no limit of
        its own); schedules for it should use at most this ``max_ops_per_group``."""
        return None

    def warmup(
        self,
        schedule_or_topology: Schedule | Topology,
        group: Any = None,
        *,
        device: torch.device | str | None = None,
    ) -> list[int]:
        """Open the transport's peer connections ahead of the first run (every rank calls it
        with the same argument); returns the peers touched. Nothing to open by default."""
        return []

    # --- the run loop ------------------------------------------------------------------------
    def run(
        self,
        schedule: Schedule,
        weights: Weights,
        group: Any = None,
        *,
        rank: int | None = None,
        verified: bool = False,
    ) -> RunReport:
        """Run ``schedule`` on this rank's ``weights`` (in place); every rank calls it.

        Raises `ExecutionError` on every rank when any rank fails (see the module docstring).
        Before the loop, on this rank only: `ExecutorError` when torch.distributed is not
        initialised or the group's size is not the topology's, and whatever torch raises for a
        group it does not know (``dist.get_world_size`` / ``get_rank``; cpu_staged's
        ``dist.new_group`` when it makes its gloo group). Inside the loop every ``Exception``
        becomes `ExecutionError`: a hook's with ``group_usable=True``, the transport's (gloo's
        and NCCL's ``RuntimeError`` / ``DistBackendError`` from a post or an agreement) with
        ``group_usable=False``. ``BaseException`` (KeyboardInterrupt, SystemExit) is not caught.
        """
        if not dist.is_available() or not dist.is_initialized():
            raise ExecutorError(
                f"the {self.name} executor needs torch.distributed initialised on every rank; call "
                "dist.init_process_group first, or use the 'local' executor in one process."
            )
        t_start = time.perf_counter()
        group = self.transport_group(group)
        world = dist.get_world_size(group)
        if world != schedule.plan.topology.num_ranks:
            raise ExecutorError(
                f"the process group has {world} ranks but the schedule's topology has "
                f"{schedule.plan.topology.num_ranks}; run one process per rank of the topology."
            )
        me = dist.get_rank(group) if rank is None else rank
        failure: _Failure | None = None
        try:
            # Every problem here joins the setup agreement, so every rank fails instead of
            # waiting on this one.
            if not verified:
                verify_schedule(schedule)
            check_weights(schedule, weights, f"rank {me}: weights")
            self.check_staging(schedule)
            ctx = RunContext(
                schedule=schedule, rank=me, group=group, weights={me: weights}, device=weights[0][0].device
            )
        except Exception as exc:
            failure = _Failure(me, -1, Section.SETUP, 0, exc)
            default = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else None
            ctx = RunContext(
                schedule=schedule, rank=me, group=group, weights={}, device=default or torch.device("cpu")
            )
        return self._loop(ctx, failure, t_start)

    def transport_group(self, group: Any) -> Any:
        """The group the run's transfers and agreements use (``group`` itself by default)."""
        return group

    def check_staging(self, schedule: Schedule) -> None:
        """Refuse (`ExecutorError`) a schedule whose staging pool is over ``Config.max_staging_bytes``."""
        cap = self.config.max_staging_bytes
        need = schedule.staging_bytes_per_rank
        if cap is not None and need > cap:
            raise ExecutorError(
                f"the schedule needs {need} bytes of staging per rank ({schedule.staging_buffers_per_rank} "
                f"experts of {schedule.plan.expert_bytes} bytes) but {self.name} Config.max_staging_bytes "
                f"is {cap}; schedule with ScheduleLimits(staging_bytes_per_rank={cap}), or raise the limit."
            )

    def _loop(self, ctx: RunContext, failure: _Failure | None, t_start: float) -> RunReport:
        schedule = ctx.schedule
        agreement = self.agreement(ctx)
        try:
            if failure is None:
                try:
                    ctx.state = self.setup(ctx)
                except Exception as exc:
                    failure = _Failure(ctx.rank, -1, Section.SETUP, 0, exc)
            fingerprint = schedule_fingerprint(schedule) if agreement.distributed else 0
            self._settle(ctx, agreement, failure, fingerprint=fingerprint)  # nothing touched yet
            setup_seconds = time.perf_counter() - t_start
            agree_rounds = self.config.agree_every_round or not agreement.distributed
            round_seconds = []
            for k, rnd in enumerate(schedule.rounds):
                t0 = time.perf_counter()
                ctx.round = k
                before, transfers, after = ctx.round_ops(rnd)
                if failure is None:
                    failure = self._dispatch(ctx, Section.BEFORE, before)
                if failure is None:
                    failure = self._begin(ctx)
                if failure is None:
                    failure = self._dispatch(ctx, Section.TRANSFERS, transfers)
                if agree_rounds:
                    self._settle(ctx, agreement, failure, transfers=transfers)
                elif failure is not None:
                    raise self.error(ctx, failures=(failure,)) from failure.exc
                self._post(ctx, agreement, transfers)
                failure = self._dispatch(ctx, Section.AFTER, after)
                if failure is not None and not (self.config.agree_every_round and agreement.distributed):
                    raise self.error(ctx, failures=(failure,)) from failure.exc
                round_seconds.append(time.perf_counter() - t0)
            ctx.round = schedule.num_rounds
            self._settle(ctx, agreement, failure)
        finally:
            self.teardown(ctx)
        return RunReport(
            backend=self.name,
            rank=ctx.rank,
            num_rounds=schedule.num_rounds,
            layers_completed=tuple(range(schedule.plan.num_layers)),
            layer_last_round=layer_last_rounds(schedule),
            bytes_sent=ctx.bytes_sent,
            bytes_received=ctx.bytes_received,
            bytes_copied=ctx.bytes_copied,
            staging_bytes=ctx.staging_bytes,
            buffer_bytes=ctx.buffer_bytes,
            host_buffer_bytes=ctx.host_buffer_bytes,
            setup_seconds=setup_seconds,
            round_seconds=tuple(round_seconds),
            wall_seconds=time.perf_counter() - t_start,
        )

    def _dispatch(self, ctx: RunContext, section: Section, ops: Sequence[Op]) -> _Failure | None:
        ctx.section = section
        for i, op in enumerate(ops):
            ctx.index = i
            try:
                getattr(self, op.kind)(op, ctx)
            except Exception as exc:
                return _Failure(op.rank, ctx.round, section, i, exc, op)
        return None

    def _begin(self, ctx: RunContext) -> _Failure | None:
        ctx.section, ctx.index = Section.TRANSFERS, 0
        try:
            self.begin_transfers(ctx)
        except Exception as exc:
            return _Failure(ctx.rank, ctx.round, Section.TRANSFERS, -1, exc)
        return None

    def _post(self, ctx: RunContext, agreement: Agreement, transfers: Sequence[Transfer]) -> None:
        ctx.section, ctx.index = Section.TRANSFERS, -1
        t0 = time.monotonic()
        try:
            self.post(ctx)
        except ExecutionError:
            raise
        except Exception as exc:
            if not agreement.distributed:
                own = _Failure(None, ctx.round, Section.TRANSFERS, -1, exc)
                raise self.error(ctx, failures=(own,)) from exc
            waited = _WaitFailedError(f"group of round {ctx.round}", time.monotonic() - t0, exc)
            raise self.error(ctx, wait=waited, transfers=transfers) from exc

    def _settle(
        self,
        ctx: RunContext,
        agreement: Agreement,
        failure: _Failure | None,
        *,
        fingerprint: int = 0,
        transfers: Sequence[Transfer] = (),
    ) -> None:
        """Run one agreement; if any rank failed (or the ranks hold different schedules), raise."""
        own = failure.exc if failure is not None else None
        try:
            verdict = agreement.agree(ctx, failure, fingerprint=fingerprint)
        except _WaitFailedError as wf:
            raise self.error(
                ctx, failures=() if failure is None else (failure,), wait=wf, transfers=transfers
            ) from (own if own is not None else wf.exc)
        if fingerprint and len(set(verdict.fingerprints)) > 1:
            raise self.error(ctx, fingerprints=verdict.fingerprints) from own
        if verdict.failures:
            raise self.error(ctx, failures=verdict.failures) from own

    # --- hooks ----------------------------------------------------------------------------------
    def agreement(self, ctx: RunContext) -> Agreement:
        """How this run's ranks agree: an all-reduce on the group (on the weights' device for
        NCCL, else on the CPU)."""
        backend = str(dist.get_backend(ctx.group)).lower()
        device = ctx.device if "nccl" in backend else torch.device("cpu")
        return GroupAgreement(device=device, timeout_s=self.config.timeout_s)

    def setup(self, ctx: RunContext) -> RunState:
        """Allocate the staging pool (and, in subclasses, transport buffers) for the whole run;
        return the backend's per-run state."""
        ctx.allocate_pool(ctx.schedule.staging_buffers_per_rank)
        return RunState()

    def copy(self, op: Copy, ctx: RunContext) -> None:
        """A rank-local copy of one expert, tensor by tensor."""
        for dst, src in zip(
            ctx.tensors(op.rank, op.layer, op.dst), ctx.tensors(op.rank, op.layer, op.src), strict=True
        ):
            dst.copy_(src, non_blocking=True)
        ctx.bytes_copied += ctx.expert_bytes

    def begin_transfers(self, ctx: RunContext) -> None:  # noqa: B027 - optional hook, empty by default
        """Start collecting this round's transfers (before the first ``send``/``recv``)."""

    @abc.abstractmethod
    def send(self, op: Send, ctx: RunContext) -> None:
        """Prepare sending the expert at ``op.src`` (it is read when the group starts)."""

    @abc.abstractmethod
    def recv(self, op: Recv, ctx: RunContext) -> None:
        """Prepare receiving into ``op.dst`` (it is written when the group ends)."""

    @abc.abstractmethod
    def post(self, ctx: RunContext) -> None:
        """Post the round's prepared transfers as one group and wait for it (`wait_all`). Every
        rank calls it in every round, also with nothing of its own to move."""

    def teardown(self, ctx: RunContext) -> None:
        """Release per-run buffers; runs after success and after failure."""
        ctx.pool.clear()
        ctx.state = RunState()

    # --- waiting and errors ---------------------------------------------------------------------
    def timeout(self) -> datetime.timedelta:
        return datetime.timedelta(seconds=self.config.timeout_s)

    def deadline(self) -> Deadline:
        """The wait budget of one ``post``: ``Config.timeout_s`` for all its works together."""
        return Deadline(self.config.timeout_s)

    def wait_all(self, works: Sequence[Any], deadline: Deadline | None = None) -> None:
        """Wait for every work of one group, ``Config.timeout_s`` for all of them together."""
        deadline = deadline or self.deadline()
        for work in works:
            deadline.wait(work)

    def error(
        self,
        ctx: RunContext,
        *,
        failures: Sequence[_Failure] = (),
        wait: _WaitFailedError | None = None,
        transfers: Sequence[Transfer] = (),
        fingerprints: Sequence[int] = (),
    ) -> ExecutionError:
        """The one place an `ExecutionError` is built from the run's state: which rank failed
        where, or which wait failed, or which ranks hold which schedule; and the layer states."""
        timeout = self.config.timeout_s
        waited = None if wait is None else wait.waited
        usable = wait is None
        peer: int | None = None
        if fingerprints:
            failed_round, rank, failed, op = -1, ctx.rank, _odd_ranks(fingerprints), None
            message = (
                f"{self.name} executor: rank {ctx.rank}: the ranks hold different schedules "
                f"({_fingerprint_groups(fingerprints)}: `schedule_fingerprint` of each rank's ops and "
                "placements); nothing was moved. Give every rank the same schedule: compile it once "
                "and broadcast it, or from the same inputs and options on every rank"
            )
        elif failures:
            f = min(failures, key=lambda x: (x.round, -1 if x.rank is None else x.rank))
            failed_round, rank = f.round, f.rank
            failed = tuple(sorted({x.rank for x in failures if x.rank is not None}))
            op = _op_at(ctx.schedule, f)
            if op is not None:
                where = f"while executing {op} (layer {op.layer}, round {f.round}, rank {f.rank})"
            elif f.section == Section.SETUP:
                where = f"in setup (rank {f.rank})"
            else:
                where = f"in round {f.round} {f.section.label} (rank {f.rank})"
            cause = f": {type(f.exc).__name__}: {f.exc}" if f.exc is not None else "; see that rank's error"
            others = [r for r in failed if r != f.rank]
            also = f" (also failed: ranks {others})" if others else ""
            after = "" if wait is None else f"; then the {wait.what} failed after {wait.waited:.2f} s"
            who = f"rank {f.rank} failed" if f.rank is not None else "failed"
            message = f"{self.name} executor: {who} {where}{cause}{also}{after}"
        else:
            assert wait is not None
            failed_round, rank, failed, op = max(ctx.round, -1), ctx.rank, (), None
            peers = sorted({t.peer for t in transfers})
            num_ranks = ctx.schedule.plan.topology.num_ranks
            if num_ranks == 2 and ctx.rank is not None:
                peer = 1 - ctx.rank  # the only other rank
            elif wait.what != "agreement" and len(peers) == 1 and not self.collective:
                peer = peers[0]  # this rank waited on that peer alone
            where = (
                "setup" if ctx.round < 0 else "the end of the run" if ctx.round >= ctx.schedule.num_rounds
                else f"round {ctx.round}"
            )
            what = wait.what if wait.what != "agreement" else f"agreement at {where}"
            layers = sorted({t.layer for t in transfers})
            scope = f" (layers {layers}, peers {peers})" if transfers else ""
            if wait.waited >= 0.9 * timeout:
                how = f"did not finish within Config.timeout_s={timeout:g} s (waited {wait.waited:.2f} s)"
                hint = "a peer hung or is slower than the timeout: see its error, or raise Config.timeout_s"
            else:
                how = f"failed after {wait.waited:.2f} s (timeout {timeout:g} s)"
                hint = "a peer died or closed the group: see its error"
            blame = f"; peer {peer} stopped answering" if peer is not None else ""
            message = (
                f"{self.name} executor: rank {ctx.rank}: the {what}{scope} {how} "
                f"({type(wait.exc).__name__}: {wait.exc}){blame}; {hint}; replace the process group "
                "before the next run"
            )
        done, untouched, partial = layer_states(ctx.schedule, failed_round)
        layer = op.layer if op is not None else None
        if layer is None and not fingerprints and wait is not None and not failures:
            layers_in_flight = sorted({t.layer for t in transfers})
            layer = layers_in_flight[0] if len(layers_in_flight) == 1 else None
        return ExecutionError(
            message,
            rank=rank,
            round=failed_round if 0 <= failed_round < ctx.schedule.num_rounds else None,
            layer=layer,
            op=str(op) if op is not None else None,
            failed_ranks=failed,
            completed_layers=done,
            untouched_layers=untouched,
            partial_layers=partial,
            peer=peer,
            waited_seconds=waited,
            group_usable=usable,
        )


class PackedExecutor(Executor):
    """A backend that packs a round: ``send``/``recv`` only collect the round's ops (in its
    `PackedState`, schedule order) and ``post`` moves them all in one go (alltoall, cpu_staged)."""

    def setup(self, ctx: RunContext) -> RunState:
        super().setup(ctx)
        return PackedState()

    def begin_transfers(self, ctx: RunContext) -> None:
        state = self.packed(ctx)
        state.sends.clear()
        state.recvs.clear()

    def send(self, op: Send, ctx: RunContext) -> None:
        self.packed(ctx).sends.append(op)
        ctx.bytes_sent += ctx.expert_bytes

    def recv(self, op: Recv, ctx: RunContext) -> None:
        self.packed(ctx).recvs.append(op)
        ctx.bytes_received += ctx.expert_bytes

    @staticmethod
    def packed(ctx: RunContext) -> PackedState:
        assert isinstance(ctx.state, PackedState)
        return ctx.state


def pack_expert(out: torch.Tensor, tensors: Sequence[torch.Tensor]) -> int:
    """Copy one expert's tensors back to back, as bytes, into the uint8 ``out``; bytes written."""
    offset = 0
    for t in tensors:
        flat = t.reshape(-1).view(torch.uint8)
        out[offset : offset + flat.numel()].copy_(flat, non_blocking=True)
        offset += flat.numel()
    return offset


def unpack_expert(src: torch.Tensor, tensors: Sequence[torch.Tensor]) -> int:
    """The inverse of `pack_expert`: fill ``tensors`` from the bytes of ``src``; bytes read."""
    offset = 0
    for t in tensors:
        flat = t.reshape(-1).view(torch.uint8)
        flat.copy_(src[offset : offset + flat.numel()], non_blocking=True)
        offset += flat.numel()
    return offset


def _odd_ranks(fingerprints: Sequence[int]) -> tuple[int, ...]:
    """Ranks outside the largest group of equal fingerprints (ties: the group holding rank 0)."""
    groups: dict[int, list[int]] = {}
    for r, fp in enumerate(fingerprints):
        groups.setdefault(fp, []).append(r)
    main = max(groups.values(), key=lambda ranks: (len(ranks), -ranks[0]))
    return tuple(r for r in range(len(fingerprints)) if r not in main)


def _fingerprint_groups(fingerprints: Sequence[int]) -> str:
    groups: dict[int, list[int]] = {}
    for r, fp in enumerate(fingerprints):
        groups.setdefault(fp, []).append(r)
    ordered = sorted(groups.items(), key=lambda g: g[1])
    return ", ".join(f"ranks {ranks} hold {fp:016x}" for fp, ranks in ordered)


def _op_at(schedule: Schedule, f: _Failure) -> Op | None:
    if f.op is not None:
        return f.op
    if f.rank is None or f.section == Section.SETUP or not 0 <= f.round < schedule.num_rounds:
        return None
    rnd = schedule.rounds[f.round]
    ops = rnd.ops_of(f.rank)[int(f.section)]
    return ops[f.index] if 0 <= f.index < len(ops) else None


def verify_schedule(schedule: Schedule) -> None:
    """`eplb.planner.verify.verify`, imported lazily (raises `PlanError`)."""
    from eplb.planner.verify import verify

    verify(schedule)


def check_weights(schedule: Schedule, weights: Weights, what: str = "weights") -> None:
    """Raise `WeightsError` unless ``weights`` fit the plan: layers, slots, layout, bytes."""
    plan = schedule.plan
    slots = plan.topology.slots_per_rank
    if len(weights) != plan.num_layers:
        raise WeightsError(
            f"{what} has {len(weights)} layers but the plan has {plan.num_layers}; pass one list of "
            "tensors per MoE layer (weights[layer][k])."
        )
    first = weights[0]
    if not first:
        raise WeightsError(f"{what}[0] has no tensors; pass at least one tensor per layer.")
    device = first[0].device
    for layer, tensors in enumerate(weights):
        if len(tensors) != len(first):
            raise WeightsError(
                f"{what}[{layer}] has {len(tensors)} tensors but layer 0 has {len(first)}; every layer "
                "must have the same tensors."
            )
        for k, (t, t0) in enumerate(zip(tensors, first, strict=True)):
            name = f"{what}[{layer}][{k}]"
            if t.dim() < 1 or t.shape[0] != slots:
                raise WeightsError(
                    f"{name} has shape {tuple(t.shape)}; its first dimension must be slots_per_rank "
                    f"({slots}) as in the plan's topology."
                )
            if t.shape[1:] != t0.shape[1:] or t.dtype != t0.dtype:
                raise WeightsError(
                    f"{name} is {t.dtype} {tuple(t.shape)} but {what}[0][{k}] is {t0.dtype} "
                    f"{tuple(t0.shape)}; tensor k must have one shape and dtype across layers."
                )
            if t.device != device:
                raise WeightsError(f"{name} is on {t.device} but {what}[0][0] is on {device}; use one.")
            if not t.is_contiguous():
                raise WeightsError(
                    f"{name} is not contiguous; pass contiguous tensors (views of one slot must be "
                    "contiguous for transfers), e.g. the engine's parameter itself."
                )
    per_expert = sum(t[0].numel() * t.element_size() for t in first)
    if per_expert != plan.expert_bytes:
        raise WeightsError(
            f"{what} hold {per_expert} bytes per expert (sum over tensors of one slot) but the plan says "
            f"expert_bytes={plan.expert_bytes}; compile the plan with expert_bytes={per_expert}."
        )


def iter_peer_order(transfers: Sequence[Transfer]) -> Iterator[tuple[int, list[Transfer]]]:
    """A rank's transfers grouped by peer, peers ascending, each peer's ops in listed order."""
    by_peer: dict[int, list[Transfer]] = {}
    for op in transfers:
        by_peer.setdefault(op.peer, []).append(op)
    yield from sorted(by_peer.items())
