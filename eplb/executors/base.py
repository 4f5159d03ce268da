"""The executor ABC: every rank runs a verified `Schedule` on its expert weights, in place.

Weights follow vLLM's ``expert_weights`` layout: ``weights[layer][k]`` is the k-th weight tensor
of a MoE layer, shaped ``[slots_per_rank, ...]`` (several tensors per layer, of different shapes
and dtypes; fp8/fp4 as uint8 views). Every layer has the same tensors (shapes and dtypes), so one
staging pool serves all layers. Weights are moved with ``copy_`` into views: storage never
changes, so pointers captured by CUDA graphs stay valid.

Call order of `Executor.run` on each rank (the backends override the hooks, not the loop):

1. ``verify(schedule)`` (`eplb.planner.verify`) unless the caller passes ``verified=True``;
2. the weights are checked against the plan (shapes, dtypes, bytes per expert, device);
3. ``setup(ctx)``: the staging pool (``schedule.staging_buffers_per_rank`` expert-sized buffers,
   one per index and tensor) and any transport buffers, allocated once for the whole run;
4. agreement: every rank reports whether 1-3 went well; if one did not, every rank raises
   `ExecutionError` and no weight has been touched;
5. for each round: ``copy(op, ctx)`` for the rank's ``before`` copies; ``begin_transfers(ctx)``,
   then ``send(op, ctx)`` / ``recv(op, ctx)`` for its transfers in listed order (they only
   prepare); agreement (step 4 again, ``Config.agree_every_round``); ``post_transfers(ctx)``
   (one group, waited on with ``Config.timeout_s``); ``copy(op, ctx)`` for its ``after`` copies;
6. a final agreement, then ``teardown(ctx)`` (always, also after a failure).

Failures: an exception in any hook is re-raised on *every* rank as `ExecutionError` naming op,
layer, round and rank (the agreement is one all-reduce of ``num_ranks x 4`` int64 per round).
A peer that never answers makes ``post_transfers`` or the next agreement time out after
``Config.timeout_s``; the error names the round and this rank. Layer atomicity: see
`ExecutionError` (completed layers are reported; a failure before round 0 leaves every layer
untouched; layers with ops in the failing round are reported as partial and must be restored).
"""

from __future__ import annotations

import abc
import datetime
import time
from collections.abc import Iterator, Sequence
from typing import Any, ClassVar

import attrs
import torch
import torch.distributed as dist

from eplb.ir.errors import EplbError
from eplb.ir.ops import Copy, Loc, Op, Recv, Send, Transfer
from eplb.ir.schedule import Schedule
from eplb.ir.topology import Topology

__all__ = [
    "ExecutionError",
    "Executor",
    "ExecutorError",
    "PackedExecutor",
    "RunContext",
    "RunReport",
    "Weights",
    "WeightsError",
    "layer_last_rounds",
]

Weights = Sequence[Sequence[torch.Tensor]]
"""``weights[layer][k]``: tensor k of a MoE layer, shaped ``[slots_per_rank, ...]``."""

SECTIONS = ("before", "transfers", "after", "setup")
_SETUP = 3


class ExecutorError(EplbError):
    """An executor cannot run: unsupported topology, bad weights, bad group."""


class WeightsError(ExecutorError, ValueError):
    """The weights do not match the plan (shape, dtype, bytes per expert, device, layout)."""


class ExecutionError(ExecutorError, RuntimeError):
    """A run failed on some rank; raised on every rank.

    ``completed_layers`` finished on every rank (their ops all ran in rounds before the failing
    round); ``untouched_layers`` have no op at or before the failing round, so they still hold
    the current placement; ``partial_layers`` had ops in flight and hold a mix of current and
    target experts: restore them (reload, or compile a migration from what they hold) before
    serving. A failure before round 0 (verification, weights, allocation) leaves all untouched.
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
    ) -> None:
        self.rank = rank
        self.round = round
        self.layer = layer
        self.op = op
        self.failed_ranks = failed_ranks
        self.completed_layers = completed_layers
        self.untouched_layers = untouched_layers
        self.partial_layers = partial_layers
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


class RunContext:
    """The state of one run: schedule, this rank, its tensors, its staging pool, counters.

    ``ranks`` lists the ranks whose memory this process holds (one, or all for `local`).
    Backends keep their per-run state in ``state``.
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
        self.section = _SETUP
        self.index = 0
        self.bytes_sent = 0
        self.bytes_received = 0
        self.bytes_copied = 0
        self.staging_bytes = 0
        self.buffer_bytes = 0
        self.host_buffer_bytes = 0
        self.state: dict[str, Any] = {}

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

    def describe(self, op: Op, rank: int | None = None) -> str:
        r = op.rank if rank is None else rank
        return f"while executing {op} (layer {op.layer}, round {self.round}, rank {r})"


class Executor(abc.ABC):
    """Runs a verified schedule on every rank; see the module docstring for the call order.

    Subclasses implement ``send``, ``recv`` and ``post_transfers``; ``copy`` is shared. Op kinds
    dispatch to the method of the same name (``getattr(self, op.kind)``), as torch.fx's
    Interpreter does, so a subclass can override one kind (tests inject failures this way).
    """

    name: ClassVar[str] = "executor"

    @attrs.frozen(kw_only=True)
    class Config:
        """``timeout_s``: the longest wait for a group or an agreement before the run fails.
        ``agree_every_round``: one small all-reduce per round so a failing rank ends the run on
        every rank with its error; off, a failure shows on other ranks only as a timeout.
        """

        timeout_s: float = attrs.field(default=300.0, validator=attrs.validators.gt(0))
        agree_every_round: bool = True

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
        """Run ``schedule`` on this rank's ``weights`` (in place); every rank calls it."""
        if not dist.is_available() or not dist.is_initialized():
            raise ExecutorError(
                f"the {self.name} executor needs torch.distributed initialised on every rank; call "
                "dist.init_process_group first, or use the 'local' executor in one process."
            )
        t_start = time.perf_counter()
        if not verified:
            verify_schedule(schedule)
        world = dist.get_world_size(group)
        if world != schedule.plan.topology.num_ranks:
            raise ExecutorError(
                f"the process group has {world} ranks but the schedule's topology has "
                f"{schedule.plan.topology.num_ranks}; run one process per rank of the topology."
            )
        me = dist.get_rank(group) if rank is None else rank
        failure: _Failure | None = None
        try:
            check_weights(schedule, weights, f"rank {me}: weights")
            ctx = RunContext(
                schedule=schedule, rank=me, group=group, weights={me: weights}, device=weights[0][0].device
            )
        except Exception as exc:
            # Still join the agreement below, so every rank fails instead of waiting on this one.
            failure = _Failure(-1, _SETUP, 0, exc)
            default = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else None
            ctx = RunContext(
                schedule=schedule, rank=me, group=group, weights={}, device=default or torch.device("cpu")
            )
        try:
            if failure is None:
                try:
                    self.setup(ctx)
                except Exception as exc:
                    failure = _Failure(-1, _SETUP, 0, exc)
            self._agree(ctx, failure)  # always: a failure here leaves every layer untouched
            setup_seconds = time.perf_counter() - t_start
            round_seconds = []
            for k, rnd in enumerate(schedule.rounds):
                t0 = time.perf_counter()
                ctx.round = k
                before, transfers, after = rnd.ops_of(me)
                if failure is None:
                    failure = self._dispatch(ctx, 0, before)
                if failure is None:
                    try:
                        self.begin_transfers(ctx)
                    except Exception as exc:
                        failure = _Failure(k, 1, 0, exc)
                if failure is None:
                    failure = self._dispatch(ctx, 1, transfers)
                self._check(ctx, failure)
                ctx.section = 1
                try:
                    self.post_transfers(ctx)
                except ExecutionError:
                    raise
                except Exception as exc:
                    raise self._transport_error(ctx, transfers, exc) from exc
                failure = self._dispatch(ctx, 2, after)
                if failure is not None and not self.config.agree_every_round:
                    self._check(ctx, failure)
                round_seconds.append(time.perf_counter() - t0)
            self._agree(ctx, failure, final=True)
        finally:
            self.teardown(ctx)
        last = layer_last_rounds(schedule)
        return RunReport(
            backend=self.name,
            rank=me,
            num_rounds=schedule.num_rounds,
            layers_completed=tuple(range(schedule.plan.num_layers)),
            layer_last_round=last,
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

    def _dispatch(self, ctx: RunContext, section: int, ops: Sequence[Op]) -> _Failure | None:
        ctx.section = section
        for i, op in enumerate(ops):
            ctx.index = i
            try:
                getattr(self, op.kind)(op, ctx)
            except Exception as exc:
                return _Failure(ctx.round, section, i, exc)
        return None

    # --- hooks ----------------------------------------------------------------------------------
    def setup(self, ctx: RunContext) -> None:
        """Allocate the staging pool (and, in subclasses, transport buffers) for the whole run."""
        ctx.allocate_pool(ctx.schedule.staging_buffers_per_rank)

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
    def post_transfers(self, ctx: RunContext) -> None:
        """Post the round's prepared transfers as one group and wait for it."""

    def teardown(self, ctx: RunContext) -> None:
        """Release per-run buffers; runs after success and after failure."""
        ctx.pool.clear()
        ctx.state.clear()

    # --- failure handling ---------------------------------------------------------------------
    def timeout(self) -> datetime.timedelta:
        return datetime.timedelta(seconds=self.config.timeout_s)

    def agreement_device(self, ctx: RunContext) -> torch.device:
        """Where the agreement tensor lives: the weights' device for NCCL, else the CPU."""
        backend = str(dist.get_backend(ctx.group)).lower()
        return ctx.device if "nccl" in backend else torch.device("cpu")

    def _check(self, ctx: RunContext, failure: _Failure | None) -> None:
        """The per-round agreement, or (agreement off) this rank's own failure raised at once."""
        if self.config.agree_every_round:
            self._agree(ctx, failure)
        elif failure is not None:
            assert ctx.rank is not None
            done, untouched, partial = layer_states(ctx.schedule, max(failure.round, -1))
            raise self._error(ctx, [(ctx.rank, failure)], done, untouched, partial) from failure.exc

    def _agree(self, ctx: RunContext, failure: _Failure | None, *, final: bool = False) -> None:
        """All ranks learn whether any rank failed; if one did, every rank raises its error."""
        assert ctx.rank is not None
        num_ranks = ctx.schedule.plan.topology.num_ranks
        row = torch.zeros(num_ranks, 4, dtype=torch.int64)
        if failure is not None:
            row[ctx.rank] = torch.tensor([1, failure.round + 1, failure.section, failure.index])
        table = row.to(self.agreement_device(ctx))
        where = "the end of the run" if final else f"round {ctx.round}" if ctx.round >= 0 else "setup"
        try:
            work = dist.all_reduce(table, group=ctx.group, async_op=True)
            assert work is not None
            work.wait(self.timeout())
        except Exception as exc:
            failed_round = max(ctx.round, 0)
            done, untouched, partial = layer_states(ctx.schedule, failed_round if ctx.round >= 0 else -1)
            if failure is not None:
                raise self._error(ctx, [(ctx.rank, failure)], done, untouched, partial) from failure.exc
            raise ExecutionError(
                f"rank {ctx.rank}: the agreement at {where} did not complete within "
                f"{self.config.timeout_s:g} s ({type(exc).__name__}: {exc}); a peer failed or hung: "
                "see its error, or raise Config.timeout_s if the peers are only slow",
                rank=ctx.rank,
                round=ctx.round if ctx.round >= 0 else None,
                layer=None,
                op=None,
                failed_ranks=(),
                completed_layers=done,
                untouched_layers=untouched,
                partial_layers=partial,
            ) from exc
        rows = table.cpu().tolist()
        failures = [
            (r, _Failure(row_[1] - 1, row_[2], row_[3], None)) for r, row_ in enumerate(rows) if row_[0]
        ]
        if not failures:
            return
        if failure is not None:  # keep this rank's own exception (and its traceback) as the cause
            failures = [(r, failure if r == ctx.rank else f) for r, f in failures]
        first_round = min(f.round for _, f in failures)
        done, untouched, partial = layer_states(ctx.schedule, first_round)
        err = self._error(ctx, failures, done, untouched, partial)
        own = failure.exc if failure is not None else None
        raise err from own

    def _error(
        self,
        ctx: RunContext,
        failures: Sequence[tuple[int, _Failure]],
        done: tuple[int, ...],
        untouched: tuple[int, ...],
        partial: tuple[int, ...],
    ) -> ExecutionError:
        rank, f = min(failures, key=lambda rf: (rf[1].round, rf[0]))
        op = _op_at(ctx.schedule, rank, f) if f.section != _SETUP else None
        if op is None:
            where = (
                f"in {SECTIONS[f.section]} (rank {rank})"
                if f.section == _SETUP
                else (f"in round {f.round} {SECTIONS[f.section]} (rank {rank})")
            )
        else:
            where = f"while executing {op} (layer {op.layer}, round {f.round}, rank {rank})"
        cause = f": {type(f.exc).__name__}: {f.exc}" if f.exc is not None else "; see that rank's error"
        others = [r for r, _ in failures if r != rank]
        also = f" (also failed: ranks {others})" if others else ""
        return ExecutionError(
            f"{self.name} executor: rank {rank} failed {where}{cause}{also}",
            rank=rank,
            round=f.round if f.round >= 0 else None,
            layer=op.layer if op is not None else None,
            op=str(op) if op is not None else None,
            failed_ranks=tuple(sorted(r for r, _ in failures)),
            completed_layers=done,
            untouched_layers=untouched,
            partial_layers=partial,
        )

    def _transport_error(
        self, ctx: RunContext, transfers: Sequence[Transfer], exc: Exception
    ) -> ExecutionError:
        done, untouched, partial = layer_states(ctx.schedule, ctx.round)
        layers = sorted({op.layer for op in transfers})
        peers = sorted({op.peer for op in transfers})
        return ExecutionError(
            f"{self.name} executor: rank {ctx.rank}: the group of round {ctx.round} (layers {layers}, "
            f"peers {peers}) failed or did not finish within {self.config.timeout_s:g} s "
            f"({type(exc).__name__}: {exc}); a peer failed or hung: see its error",
            rank=ctx.rank,
            round=ctx.round,
            layer=layers[0] if len(layers) == 1 else None,
            op=None,
            failed_ranks=(),
            completed_layers=done,
            untouched_layers=untouched,
            partial_layers=partial,
        )


class PackedExecutor(Executor):
    """A backend that packs a round: ``send``/``recv`` only collect the round's ops (in
    ``ctx.state["sends"]`` / ``["recvs"]``, schedule order) and ``post_transfers`` moves them
    all in one go (alltoall, cpu_staged)."""

    def begin_transfers(self, ctx: RunContext) -> None:
        ctx.state["sends"] = []
        ctx.state["recvs"] = []

    def send(self, op: Send, ctx: RunContext) -> None:
        ctx.state["sends"].append(op)
        ctx.bytes_sent += ctx.expert_bytes

    def recv(self, op: Recv, ctx: RunContext) -> None:
        ctx.state["recvs"].append(op)
        ctx.bytes_received += ctx.expert_bytes


@attrs.frozen
class _Failure:
    round: int
    section: int
    index: int
    exc: BaseException | None


def _op_at(schedule: Schedule, rank: int, f: _Failure) -> Op | None:
    if not 0 <= f.round < schedule.num_rounds:
        return None
    ops = schedule.rounds[f.round].ops_of(rank)[f.section]
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
