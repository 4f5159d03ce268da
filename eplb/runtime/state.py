"""`EplbState`: the object an inference engine holds to record load and rebalance experts.

It descends from vLLM's ``EplbState`` (``vllm/distributed/eplb/eplb_state.py``) and keeps its
behaviour, framework-agnostic, with per-local-slot shapes rather than vLLM 0.33's (docs/runtime.md
lists what differs: load ``[L, P]``, window ``[W, L, P]``, ``logical_to_physical_map`` ``[L, E, 1024]``
there):

- maps, updated in place with ``copy_`` (storage never replaced, so CUDA graphs stay valid):
  ``physical_to_logical_map: [L, P]``, ``logical_to_physical_map: [L, E, P - E + 1]`` (-1 padded),
  ``logical_replica_count: [L, E]``, int64;
- ``expert_load_pass: [L, S]`` int32, the tokens each local slot took in this forward pass
  (the engine's kernels, or `eplb.runtime.routing.record_load`, add to it);
- a sliding window of ``window_size`` passes, kept per *logical* expert (``[W, L, E]`` int32) so
  the load of a pass stays right when a layer's placement changes under it;
- a step interval whose counter starts at 3/4 (the first rearrangement after a quarter); dummy
  steps advance the interval (every rank must reach the collectives together) but record no load.

Call order on every rank of the expert-parallel group::

    state = EplbState.build(model, topology, group=ep_group)
    state.profile()                 # once, in the engine's profile run
    for each forward pass:
        model(...)                  # adds to state.expert_load_pass
        state.step(is_dummy, is_profile, log_stats)   # may rearrange (keywords work too)

`rearrange` runs: window -> logical load -> all-reduce -> policy -> compile -> schedule ->
verify -> executor (`eplb.executors.select`) -> commit, in chunks of layers. A chunk's maps
switch only after every rank reports its weights in place (one vote per chunk). With
``incremental=True`` one chunk moves per `step`, so serving never stalls for the whole model.
Fault semantics: each chunk is a transaction (backup -> run -> vote -> commit or restore;
`eplb.runtime.transaction`): before it runs, each rank copies the slots the chunk overwrites; if
any rank fails, dies or hangs (the vote failing included), every layer of the chunk not completed
on every rank gets its old weights back, and every surviving rank raises `RearrangementError`
(`layer_status` says which layers moved and which rolled back). Those copies are bounded: by
default blocking mode cuts the changed layers into chunks whose copies fit
``RuntimeConfig.max_backup_bytes`` (default: `DEFAULT_BACKUP_LAYERS` layers' worth of a rank's
slots) on the busiest rank.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import time
import types
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import attrs
import numpy as np
import torch
import torch.distributed as dist

from eplb.executors.base import Executor
from eplb.executors.select import select_executor
from eplb.ir.errors import EplbError, InvalidValueError
from eplb.ir.placement import ModelPlacement, Placement
from eplb.ir.plan import MigrationPlan
from eplb.ir.schedule import Schedule, ScheduleLimits
from eplb.ir.topology import Topology
from eplb.planner import metrics
from eplb.planner.entry import rebalance
from eplb.planner.pipeline import plan_migration
from eplb.planner.schedule import default_limits
from eplb.runtime import chunking
from eplb.runtime.chunking import written_slots
from eplb.runtime.model import EplbAwareModel, MoEModel, check_model, expert_bytes
from eplb.runtime.transaction import Backup, Outcome, run_step, vote

__all__ = [
    "DEFAULT_BACKUP_LAYERS",
    "EplbState",
    "LayerStatus",
    "RearrangeReport",
    "RearrangementError",
    "RuntimeConfig",
]

logger = logging.getLogger("eplb.runtime")

#: ``RuntimeConfig.max_backup_bytes=None`` resolves to this many layers' worth of a rank's slots
#: (every local slot of the layer, all its tensors): 3.17 GB per GPU at DeepSeek-V3 shape (9 slots
#: per rank x 44.05 MB) against 23 GB for an unbounded from-scratch re-plan of its 58 layers.
DEFAULT_BACKUP_LAYERS = 8


class RearrangementError(EplbError):
    """A rearrangement could not start or finish; the message says what state the layers are in."""


class LayerStatus(enum.Enum):
    """Where a layer stands; in every status its maps describe the weights it holds."""

    STABLE = "stable"  # on its placement, no move planned
    PENDING = "pending"  # old placement + old weights, to move in a later step (incremental)
    MIGRATED = "migrated"  # new placement + new weights, moved by the latest rearrangement
    ROLLED_BACK = "rolled_back"  # a fault hit its move: old placement + old weights restored
    CORRUPT = "corrupt"  # rollback off and the move failed mid-way: reload this layer's weights

    def __repr__(self) -> str:
        return f"LayerStatus.{self.name}"


def _frozen_mapping(value: Mapping[str, Any] | None) -> Mapping[str, Any]:
    return types.MappingProxyType(dict(value or {}))


def _positive(_inst: object, attr: attrs.Attribute[Any], value: int | None) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
        raise InvalidValueError(attr.name, f"must be an int > 0 (got {value!r}).")


def _backup_budget(_inst: object, attr: attrs.Attribute[Any], value: int | None) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
        raise InvalidValueError(
            attr.name,
            f"must be an int > 0 (bytes) or None (got {value!r}); pass None for the default "
            f"({DEFAULT_BACKUP_LAYERS} layers' worth of a rank's slots), set layers_per_chunk to "
            "choose the chunks yourself, or rollback=False to keep no backup.",
        )


@attrs.frozen(kw_only=True)
class RuntimeConfig:
    """How the state records load and when and how it rebalances.

    ``window_size``: passes in the sliding window (vLLM's ``eplb_window_size``).
    ``step_interval``: steps between rearrangements; the counter starts at 3/4 of it (as vLLM's),
    so the first comes after a quarter of the interval.
    ``policy``: a registered policy name; None is ``migration_aware`` (the current placement is
    always known here). ``policy_options`` go to it.
    ``layers_per_chunk``: layers per executor run (one vote and one backup each); None means 1
    when ``incremental``; when blocking, all changed layers at once, cut into consecutive chunks
    whose backup fits ``max_backup_bytes`` when ``rollback`` is on. An explicit value wins over
    the budget.
    ``incremental``: move one chunk per `EplbState.step` instead of all in one call.
    ``executor``: a backend name for `select_executor`, or an `Executor` instance (an explicit
    choice wins); None: chosen from the topology and the weights' device (``local`` in a single
    process). ``executor_config``: that backend's ``Config`` (timeouts). ``limits``: round
    limits (None: the scheduler's default for the topology).
    ``rollback``: copy the slots a chunk overwrites before running it, so a fault restores them;
    off saves that memory but a layer left partial by a fault is `LayerStatus.CORRUPT`.
    ``backup_device``: where those copies live (None: the weights' device; ``"cpu"`` saves GPU
    memory at the cost of device-to-host copies).
    ``max_backup_bytes``: the most bytes one chunk's backup may take on any rank, when blocking
    with ``layers_per_chunk=None`` and ``rollback`` on. None: `DEFAULT_BACKUP_LAYERS` layers'
    worth of a rank's slots (resolved at `EplbState.build`; `EplbState.max_backup_bytes`). Every
    rank cuts the same chunks, from the agreed placements; a single layer whose backup exceeds
    the budget forms a chunk of its own.
    """

    window_size: int = attrs.field(default=1000, validator=_positive)
    step_interval: int = attrs.field(default=3000, validator=_positive)
    policy: str | None = None
    policy_options: Mapping[str, Any] = attrs.field(factory=dict, converter=_frozen_mapping)
    layers_per_chunk: int | None = attrs.field(default=None, validator=_positive)
    incremental: bool = False
    executor: str | Executor | None = None
    executor_config: Executor.Config | None = None
    limits: ScheduleLimits | None = None
    rollback: bool = True
    backup_device: str | None = None
    max_backup_bytes: int | None = attrs.field(default=None, validator=_backup_budget)


@attrs.define(kw_only=True)
class RearrangeReport:
    """One rearrangement, filled in as it goes (incremental mode: over several steps).

    ``timings`` holds seconds per phase, summed over chunks: ``gather`` (window -> logical load
    -> all-reduce), ``policy``, ``agree`` (rank 0's target to all), ``compile``, ``schedule``,
    ``verify``, ``select``, ``backup``, ``execute``, ``vote``, ``commit``/``restore``.
    ``balancedness_before`` / ``balancedness_after``: the window's load on the old and new
    placement (mean / max rank load summed over layers, as vLLM logs it).
    ``chunks`` counts executor runs (the profile run makes two); ``chunk_layers`` holds each run's
    layers and ``backup_bytes`` the bytes this rank backed up for it (0 with rollback off).
    ``statuses``: the status each layer this rearrangement settled ended in; ``layers_migrated``,
    ``layers_rolled_back`` and ``layers_corrupt`` are read from it.
    ``backup_budget``: the bytes the chunks were cut to fit (None when ``layers_per_chunk``,
    incremental mode or ``rollback=False`` fixed them).
    """

    index: int
    profile: bool = False
    layers_planned: tuple[int, ...] = ()
    statuses: dict[int, LayerStatus] = attrs.field(factory=dict)
    timings: dict[str, float] = attrs.field(factory=dict)
    balancedness_before: float = float("nan")
    balancedness_after: float = float("nan")
    slots_moved: int = 0
    bytes_moved: int = 0
    chunks: int = 0
    chunk_layers: list[tuple[int, ...]] = attrs.field(factory=list)
    backup_bytes: list[int] = attrs.field(factory=list)
    backup_budget: int | None = None
    error: str | None = None
    done: bool = False

    def _layers(self, status: LayerStatus) -> list[int]:
        return sorted(layer for layer, s in self.statuses.items() if s is status)

    @property
    def layers_migrated(self) -> list[int]:
        """Layers this rearrangement moved (from ``statuses``)."""
        return self._layers(LayerStatus.MIGRATED)

    @property
    def layers_rolled_back(self) -> list[int]:
        """Layers a fault sent back to their old placement and weights."""
        return self._layers(LayerStatus.ROLLED_BACK)

    @property
    def layers_corrupt(self) -> list[int]:
        """Layers left partial by a fault with rollback off: reload their weights."""
        return self._layers(LayerStatus.CORRUPT)

    def add_time(self, phase: str, seconds: float) -> None:
        self.timings[phase] = self.timings.get(phase, 0.0) + seconds

    @property
    def total_seconds(self) -> float:
        return sum(self.timings.values())

    def __str__(self) -> str:
        phases = ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in self.timings.items())
        state = "done" if self.done else "in progress"
        fault = f"; FAULT: {self.error}" if self.error else ""
        backup = (
            f", backup peak {max(self.backup_bytes, default=0) / 1e9:.3f} GB" if self.backup_bytes else ""
        )
        budget = f" (budget {self.backup_budget / 1e9:.3f} GB)" if self.backup_budget is not None else ""
        return (
            f"rearrangement #{self.index}{' (profile)' if self.profile else ''} {state}: "
            f"{len(self.layers_migrated)}/{len(self.layers_planned)} layers moved, "
            f"{len(self.layers_rolled_back)} rolled back, {self.slots_moved} slots, "
            f"{self.bytes_moved / 1e9:.3f} GB in {self.chunks} chunk(s){backup}{budget}, "
            f"balancedness {self.balancedness_before:.4f} -> {self.balancedness_after:.4f}; "
            f"{phases}{fault}"
        )


@attrs.define
class _Pending:
    """A rearrangement between steps: the target and the chunks still to move."""

    target: ModelPlacement
    chunks: list[tuple[int, ...]]
    report: RearrangeReport


class EplbState:
    """Load recording and expert rearrangement for one rank; see the module docstring.

    Build with `EplbState.build`. Tensors are public, as in vLLM, so an engine can hand them
    to its kernels; their storage never changes after `build`.
    """

    def __init__(
        self,
        *,
        model: MoEModel,
        topology: Topology,
        placement: ModelPlacement,
        group: Any,
        control_group: Any,
        rank: int,
        device: torch.device,
        config: RuntimeConfig,
    ) -> None:
        self.model = model
        self.topology = topology
        self.config = config
        self.group = group
        self.control_group = control_group
        self.rank = rank
        self.device = device
        self._placement = placement
        num_l, num_e = placement.num_layers, placement.num_logical_experts
        num_s = topology.slots_per_rank
        self.physical_to_logical_map = torch.tensor(placement.to_numpy(), device=device)
        self.logical_to_physical_map = torch.tensor(placement.logical_to_physical_array(), device=device)
        self.logical_replica_count = torch.tensor(placement.replica_count_array(), device=device)
        self.expert_load_pass = torch.zeros((num_l, num_s), dtype=torch.int32, device=device)
        self.expert_load_window = torch.zeros(
            (config.window_size, num_l, num_e), dtype=torch.int32, device=device
        )
        self.expert_load_window_step = 0
        # vLLM starts the counter at 3/4 of the interval so the first rearrangement comes early.
        self.expert_rearrangement_step = max(0, config.step_interval - config.step_interval // 4)
        self._status = [LayerStatus.STABLE] * num_l
        self._pending: _Pending | None = None
        self._reports: list[RearrangeReport] = []
        self.last_stats: dict[str, float] | None = None
        self.needs_new_group = False
        self._executor: Executor | None = None
        # Bytes of one slot of each layer (all its tensors): what backing up that slot costs.
        self._slot_bytes = [
            sum(t[0].numel() * t.element_size() for t in tensors) for tensors in model.expert_weights
        ]
        # The backup budget in force: `RuntimeConfig.max_backup_bytes`, None resolved here.
        self.max_backup_bytes: int = (
            config.max_backup_bytes
            if config.max_backup_bytes is not None
            else DEFAULT_BACKUP_LAYERS * num_s * max(self._slot_bytes)
        )

    # --- construction ---------------------------------------------------------------------------
    @classmethod
    def build(
        cls,
        model: MoEModel,
        topology: Topology | None = None,
        *,
        group: Any = None,
        control_group: Any = None,
        device: torch.device | str | None = None,
        config: RuntimeConfig | None = None,
        initial: ModelPlacement | None = None,
    ) -> EplbState:
        """The state for ``model`` on this rank of ``group`` (None: a single process).

        ``topology`` defaults to ``group``'s ranks on one node. ``control_group`` carries the
        small collectives (load, votes, stats); by default a gloo group over the same ranks is
        made here (a collective call: every rank must call `build`), so a transfer that times out
        on ``group`` cannot take the votes down with it. ``initial`` is the placement the weights
        hold now (default: the trivial one, slot p holds expert p % experts). Hands the tensors to
        ``model.set_eplb_state`` when the model has it.
        """
        world = 1 if group is None else dist.get_world_size(group)
        rank = 0 if group is None else dist.get_rank(group)
        check_model(model, world)
        num_s = model.num_local_physical_experts
        if topology is None:
            topology = Topology.uniform(world, num_s)
        if topology.num_ranks != world or topology.slots_per_rank != num_s:
            raise InvalidValueError(
                "topology",
                f"has {topology.num_ranks} ranks x {topology.slots_per_rank} slots but the group has "
                f"{world} ranks and the model {num_s} local slots; describe the group the model is "
                "sharded over.",
            )
        if initial is None:
            initial = ModelPlacement.trivial(
                num_layers=model.num_moe_layers,
                num_logical_experts=model.num_logical_experts,
                num_physical_experts=model.num_physical_experts,
                num_ranks=world,
            )
        if (initial.num_layers, initial.num_logical_experts, initial.num_physical_experts) != (
            model.num_moe_layers,
            model.num_logical_experts,
            model.num_physical_experts,
        ):
            raise InvalidValueError(
                "initial",
                f"is {initial} but the model has {model.num_moe_layers} layers, "
                f"{model.num_logical_experts} logical and {model.num_physical_experts} physical "
                "experts; pass the placement the model's weights hold.",
            )
        if device is None:
            device = model.expert_weights[0][0].device
        if group is not None and control_group is None:
            control_group = dist.new_group(dist.get_process_group_ranks(group), backend="gloo")
        state = cls(
            model=model,
            topology=topology,
            placement=initial,
            group=group,
            control_group=control_group,
            rank=rank,
            device=torch.device(device),
            config=config if config is not None else RuntimeConfig(),
        )
        if isinstance(model, EplbAwareModel):
            model.set_eplb_state(
                state.expert_load_pass, state.logical_to_physical_map, state.logical_replica_count
            )
        return state

    # --- views -----------------------------------------------------------------------------------
    @property
    def placement(self) -> ModelPlacement:
        """The placement the maps and weights hold now (per layer; see `layer_status`)."""
        return self._placement

    @property
    def num_ranks(self) -> int:
        return self.topology.num_ranks

    def layer_status(self) -> tuple[LayerStatus, ...]:
        """``[num_moe_layers]``: each layer's status after the latest rearrangement."""
        return tuple(self._status)

    @property
    def reports(self) -> tuple[RearrangeReport, ...]:
        """Every rearrangement so far, oldest first (the last may be in progress)."""
        return tuple(self._reports)

    @property
    def rearranging(self) -> bool:
        """True between the steps of an incremental rearrangement."""
        return self._pending is not None

    def set_group(self, group: Any, *, control_group: Any = None) -> None:
        """Use new groups after a fault left the old ones unusable (`needs_new_group`).

        ``control_group`` None: a new gloo group over ``group``'s ranks is made here (a
        collective: every rank calls this), since a vote that timed out may have left an
        unmatched collective on the old one."""
        if dist.get_world_size(group) != self.num_ranks:
            raise InvalidValueError(
                "group", f"has {dist.get_world_size(group)} ranks but the state spans {self.num_ranks}."
            )
        if control_group is None:
            control_group = dist.new_group(dist.get_process_group_ranks(group), backend="gloo")
        self.group = group
        self.control_group = control_group
        self.needs_new_group = False

    # --- per pass ---------------------------------------------------------------------------------
    def step(
        self, is_dummy: bool = False, is_profile: bool = False, log_stats: bool = False
    ) -> dict[str, float] | None:
        """End a forward pass: window its load, advance the interval, rearrange when due.

        Takes vLLM 0.33's call as its model runner makes it, ``step(is_dummy, is_profile,
        log_stats=...)``, as well as keywords.

        Returns the balancedness dict when ``log_stats`` (a collective: all ranks pass the same
        flag), else None. ``is_dummy``: the pass ran only to keep ranks in step; its load is
        dropped but the interval advances on every rank alike. ``is_profile``: run `profile`.
        """
        if is_profile:
            self.profile()
            return None
        if is_dummy:
            self.expert_load_pass.zero_()
        stats = self.balancedness() if log_stats else None
        if not is_dummy:
            self._window_pass()
        self.expert_load_pass.zero_()
        # Dummy steps count here too: every rank must enter a rearrangement at the same step.
        self.expert_rearrangement_step += 1
        if self._pending is not None:
            self._advance()
        elif self.expert_rearrangement_step >= self.config.step_interval:
            self.expert_rearrangement_step = 0
            self.rearrange()
        return stats

    def _window_pass(self) -> None:
        # Scatter local slots onto logical experts with the maps this pass was routed with.
        start = self.rank * self.topology.slots_per_rank
        local_p2l = self.physical_to_logical_map[:, start : start + self.topology.slots_per_rank]
        row = self.expert_load_window[self.expert_load_window_step]
        row.zero_()
        row.scatter_add_(1, local_p2l, self.expert_load_pass)
        self.expert_load_window_step = (self.expert_load_window_step + 1) % self.config.window_size

    def balancedness(self) -> dict[str, float]:
        """This pass's ``avg_tokens`` and ``max_tokens`` across ranks and their ratio (a collective).

        Per rank, tokens are summed over layers and local slots, as vLLM logs them.
        """
        per_layer = self.expert_load_pass.sum(dim=-1).to("cpu", torch.float64)  # [L]
        if self.control_group is not None:
            rows = [torch.empty_like(per_layer) for _ in range(self.num_ranks)]
            dist.all_gather(rows, per_layer, group=self.control_group)
            table = torch.stack(rows)  # [R, L]
        else:
            table = per_layer.unsqueeze(0)
        avg = float(table.mean(dim=0).sum())
        top = float(table.max(dim=0).values.sum())
        stats = {"avg_tokens": avg, "max_tokens": top, "balancedness": avg / top if top > 0 else 0.0}
        if self.rank == 0:
            logger.info(
                "EPLB step: avg_tokens=%.2f, max_tokens=%d, balancedness=%.4f",
                avg,
                int(top),
                stats["balancedness"],
            )
        self.last_stats = stats
        return stats

    # --- rearrangement ------------------------------------------------------------------------------
    def global_load(self) -> torch.Tensor:
        """``[num_moe_layers, num_logical_experts]`` int64: the window summed over passes and ranks.

        A collective on the control group.
        """
        load = self.expert_load_window.sum(dim=0, dtype=torch.int64).cpu()
        if self.control_group is not None:
            dist.all_reduce(load, group=self.control_group)
        return load

    def rearrange(self) -> RearrangeReport:
        """Plan a new placement from the window and move to it (a collective: all ranks call it).

        Blocking (default): every changed layer moves before this returns. Incremental: the
        first chunk moves now, the rest one per `step`. Raises `RearrangementError` if the move
        failed; the layers' status (`layer_status`) is settled before it raises.
        """
        if self._pending is not None:
            raise RearrangementError(
                f"rearrangement #{self._pending.report.index} is still moving layers "
                f"{[layer for c in self._pending.chunks for layer in c]}; call step() or finish() first."
            )
        if self.needs_new_group:
            raise RearrangementError(
                "a fault left the transfer group unusable; make a new group on every rank "
                "(dist.new_group) and pass it to state.set_group() before the next rearrangement."
            )
        report = RearrangeReport(index=len(self._reports))
        self._reports.append(report)
        if self.rank == 0:
            logger.info("Rearranging experts (#%d)...", report.index)
        try:
            with _phase(report, "gather"):
                load = self.global_load().numpy()
            with _phase(report, "policy"):
                target = self._plan_target(load)
            with _phase(report, "agree"):
                target = self._agree_target(target)
        except Exception as exc:  # nothing moved: every layer keeps its placement and status
            report.error, report.done = f"{type(exc).__name__}: {exc}", True
            raise
        current = self._placement
        report.balancedness_before = metrics.model_balancedness(load, current)
        report.balancedness_after = metrics.model_balancedness(load, target)
        changed = tuple(i for i in range(current.num_layers) if current.layers[i] != target.layers[i])
        report.layers_planned = changed
        report.slots_moved = metrics.slots_moved(current, target)
        report.bytes_moved = report.slots_moved * expert_bytes(self.model)
        self._status = [
            LayerStatus.PENDING if i in set(changed) else LayerStatus.STABLE
            for i in range(current.num_layers)
        ]
        chunks, report.backup_budget = self._chunks(changed, current, target)
        self._pending = _Pending(target=target, chunks=chunks, report=report)
        if self.config.incremental:
            self._advance()
        else:
            self.finish()
        return report

    def finish(self) -> RearrangeReport | None:
        """Move every chunk still pending now (blocking); None if nothing was pending."""
        report = None if self._pending is None else self._pending.report
        while self._pending is not None:
            self._advance()
        return report

    def _chunks(
        self, changed: Sequence[int], current: ModelPlacement, target: ModelPlacement
    ) -> tuple[list[tuple[int, ...]], int | None]:
        """The chunks ``changed`` moves in, and the backup budget they were cut to (or None).

        Derived from the agreed placements only, so every rank cuts the same chunks."""
        return chunking.chunks(
            changed,
            current,
            target,
            size=chunking.chunk_size(self.config.layers_per_chunk, self.config.incremental),
            rollback=self.config.rollback,
            slot_bytes=self._slot_bytes,
            budget=self.max_backup_bytes,
        )

    def _plan_target(self, load: np.ndarray[Any, Any]) -> ModelPlacement:
        return rebalance(
            load,
            self.topology,
            num_groups=self.model.num_expert_groups,
            current=self._placement,
            policy=self.config.policy if self.config.policy is not None else "migration_aware",
            **self.config.policy_options,
        )

    def _agree_target(self, target: ModelPlacement) -> ModelPlacement:
        """Every rank takes rank 0's target, so a policy that differs by a float on one rank
        cannot split the ranks' maps."""
        if self.control_group is None:
            return target
        p2l = torch.from_numpy(target.to_numpy())
        dist.broadcast(p2l, group_src(self.control_group), group=self.control_group)
        if torch.equal(p2l, torch.from_numpy(target.to_numpy())):
            return target
        logger.warning("rank %d: the policy's target differs from rank 0's; using rank 0's", self.rank)
        return ModelPlacement.from_lists(
            p2l.tolist(), num_ranks=self.num_ranks, num_logical_experts=target.num_logical_experts
        )

    def _advance(self) -> None:
        """Move the next pending chunk; ends the rearrangement after the last one or a fault."""
        pending = self._pending
        assert pending is not None
        report = pending.report
        if not pending.chunks:
            self._end(report)
            return
        chunk = pending.chunks.pop(0)
        try:
            self._move_chunk(chunk, pending.target, report)
        except BaseException as exc:
            # The rest of the rearrangement is dropped: its layers keep their old placement
            # (as does any layer of this chunk left PENDING by an error outside the transaction).
            self._status = [LayerStatus.STABLE if s is LayerStatus.PENDING else s for s in self._status]
            self._end(report)
            if isinstance(exc, RearrangementError) or not isinstance(exc, Exception):
                raise
            report.error = f"{type(exc).__name__}: {exc}"
            raise RearrangementError(
                f"rank {self.rank}: rearrangement #{report.index} stopped at layers {list(chunk)} "
                f"({report.error}); no layer of it is PENDING any more, every layer's maps match "
                "its weights."
            ) from exc
        if not pending.chunks:
            self._end(report)

    def _end(self, report: RearrangeReport) -> None:
        self._pending = None
        report.done = True
        if self.rank == 0:
            logger.info("Rearranged experts: %s", report)

    def _move_chunk(self, chunk: tuple[int, ...], target: ModelPlacement, report: RearrangeReport) -> None:
        """One chunk as a transaction: prepare -> backup -> run -> vote -> commit or restore.

        Whatever fails on this rank becomes a failed outcome that still goes to the vote, so no
        rank leaves the others waiting; every path settles the chunk's statuses; a failure
        anywhere raises `RearrangementError` here, on every rank that is alive."""
        report.chunks += 1
        report.chunk_layers.append(chunk)
        report.backup_bytes.append(0)
        n = len(chunk)
        weights = [list(self.model.expert_weights[i]) for i in chunk]
        prepared: list[tuple[Schedule, Executor]] = []
        backup: list[Backup] = []
        t0 = time.monotonic()

        def prepare() -> None:
            prepared.append(self._prepare(chunk, target, report))

        def take_backup() -> None:
            if self.config.rollback:
                with _phase(report, "backup"):
                    slots = written_slots(prepared[0][0], self.rank)
                    backup.extend(
                        Backup.take(weights[i], s, self.config.backup_device) for i, s in enumerate(slots)
                    )
                    report.backup_bytes[-1] = sum(b.nbytes for b in backup)

        def execute() -> None:
            sched, executor = prepared[0]
            rank = None if self.group is None else self.rank
            with _phase(report, "execute"):
                # verified=True: verify() ran in _prepare, and its time is its own phase.
                executor.run(sched, weights, self.group, rank=rank, verified=True)

        outcome = run_step(n, None, prepare, ran=False)
        outcome = run_step(n, outcome, take_backup, ran=False)
        outcome = run_step(n, outcome, execute, ran=True) or Outcome.ok(n)
        with _phase(report, "vote"):
            # Until twice the executor's timeout from the chunk's start: a rank that failed before
            # its run waits here while its peers wait out the executor's timeout.
            outcome = vote(outcome, self.control_group, t0 + 2 * self._timeout_s())
        with _phase(report, "restore" if outcome.failed else "commit"):
            self._settle(chunk, target, outcome, backup, weights, report)
        if outcome.failed:
            raise self._failure(chunk, outcome, report)

    def _prepare(
        self, chunk: tuple[int, ...], target: ModelPlacement, report: RearrangeReport
    ) -> tuple[Schedule, Executor]:
        """Compile, schedule and verify one chunk (the same on every rank)."""
        cur = ModelPlacement(layers=[self._placement.layers[i] for i in chunk])
        tgt = ModelPlacement(layers=[target.layers[i] for i in chunk])
        with _phase(report, "select"):
            executor = self.executor()
        tensors = len(self.model.expert_weights[chunk[0]])
        sched = plan_migration(
            cur,
            tgt,
            self.topology,
            expert_bytes(self.model),
            lambda plan: self._limits(plan, executor, tensors),
            phase=lambda name: _phase(report, name),
        )
        return sched, executor

    def _timeout_s(self) -> float:
        """The executor's ``Config.timeout_s`` (its default when it has none)."""
        config = getattr(self._executor, "config", None)
        return float(getattr(config, "timeout_s", Executor.Config().timeout_s))

    def _settle(
        self,
        chunk: tuple[int, ...],
        target: ModelPlacement,
        outcome: Outcome,
        backup: list[Backup],
        weights: list[list[torch.Tensor]],
        report: RearrangeReport,
    ) -> None:
        """Commit the layers complete on every rank; restore (or mark) the others."""
        for i, layer in enumerate(chunk):
            if outcome.completed[i]:
                self._commit_layer(layer, target.layers[layer])
                status = LayerStatus.MIGRATED
            elif backup:
                backup[i].restore(weights[i])
                status = LayerStatus.ROLLED_BACK
            elif outcome.untouched[i]:
                status = LayerStatus.ROLLED_BACK
            else:
                status = LayerStatus.CORRUPT
            self._status[layer] = status
            report.statuses[layer] = status
        if self.group is not None and not outcome.group_ok:
            self.needs_new_group = True

    def _failure(
        self, chunk: tuple[int, ...], outcome: Outcome, report: RearrangeReport
    ) -> RearrangementError:
        """The error every surviving rank raises; its cause is this rank's own exception."""
        error = outcome.error
        what = f"{type(error).__name__}: {error}" if error is not None else "a fault on another rank"
        if not outcome.vote_ok:
            what += " (the vote on the control group failed too: a peer died or did not answer in time)"
        report.error = what
        bad = report.layers_corrupt
        corrupt = f"; layers {bad} are CORRUPT: reload their weights" if bad else ""
        group = (
            "; the group is unusable: make a new one on every rank and pass it to set_group()"
            if self.needs_new_group
            else ""
        )
        exc = RearrangementError(
            f"rank {self.rank}: rearrangement #{report.index} failed moving layers {list(chunk)} "
            f"(the executor numbers them 0..{len(chunk) - 1}: {what}); layers moved: "
            f"{report.layers_migrated}, rolled back to their old placement and weights: "
            f"{report.layers_rolled_back}{corrupt}. Every layer's maps match its weights, so "
            f"serving goes on; the next rearrangement re-plans from here{group}."
        )
        exc.__cause__ = error
        return exc

    def _commit_layer(self, layer: int, placement: Placement) -> None:
        # copy_ into the existing rows: the tensors' storage (seen by CUDA graphs) never changes.
        self.physical_to_logical_map[layer].copy_(torch.tensor(placement.physical_to_logical))
        self.logical_to_physical_map[layer].copy_(torch.tensor(placement.logical_to_physical))
        self.logical_replica_count[layer].copy_(torch.tensor(placement.replica_count))
        layers = list(self._placement.layers)
        layers[layer] = placement
        self._placement = ModelPlacement(layers=layers)

    def _limits(self, plan: MigrationPlan, executor: Executor, tensors_per_expert: int) -> ScheduleLimits:
        """The configured (or default) round limits, within what ``executor`` can post in a group."""
        limits = self.config.limits or default_limits(plan)
        cap = executor.max_transfers_per_group(tensors_per_expert)
        if cap is not None and limits.max_ops_per_group > cap:
            limits = attrs.evolve(limits, max_ops_per_group=cap)
        return limits

    def executor(self) -> Executor:
        """The executor this state runs (chosen once: `RuntimeConfig.executor`, else the topology's)."""
        if self._executor is None:
            choice = self.config.executor
            if isinstance(choice, Executor):
                self._executor = choice
            else:
                if choice is None and self.group is None:
                    choice = "local"  # one process holds every rank: nothing to transport
                self._executor = select_executor(
                    self.topology,
                    choice,
                    device_type=self.device.type,
                    config=self.config.executor_config,
                )
        return self._executor

    # --- profile run ---------------------------------------------------------------------------
    def profile(self) -> RearrangeReport:
        """Reserve the peak memory of a rearrangement and open every peer connection, ahead.

        Runs a real migration to a placement where every rank sends to every other rank and back
        (weights end where they started), through the configured executor, with the largest
        backup a chunk can need. Afterwards the allocator holds the memory and the transport its
        connections, so the first real rearrangement costs what later ones do.
        """
        report = RearrangeReport(index=len(self._reports), profile=True)
        self._reports.append(report)
        t0 = time.perf_counter()
        reserved = 0
        original = self._placement
        shuffle = chunking.all_peer_placement(original)
        # The first chunk a real rearrangement to the shuffle would move (the budget's cut).
        chunks, report.backup_budget = self._chunks(range(original.num_layers), original, shuffle)
        chunk = chunks[0]
        if self.config.rollback:
            with _phase(report, "backup"):
                # The most any chunk can back up, held at once so the allocator reaches that peak.
                held = [
                    Backup.take(list(self.model.expert_weights[i]), range(n), self.config.backup_device)
                    for i, n in enumerate(self._largest_backup())
                ]
                reserved = sum(b.nbytes for b in held)
                del held
        if self.control_group is not None:
            with _phase(report, "gather"):
                # The collectives a rearrangement makes on the control group, once, so their
                # connections and buffers exist before the first real one.
                probe = torch.zeros(
                    self._placement.num_layers, self._placement.num_logical_experts, dtype=torch.int64
                )
                dist.all_reduce(probe, group=self.control_group)
                dist.broadcast(probe, group_src(self.control_group), group=self.control_group)
        if self.num_ranks > 1:
            executor = self.executor()
            warmup = getattr(executor, "warmup", None)
            if warmup is not None:
                with _phase(report, "warmup"):
                    warmup(self.topology, self.group, device=self.device)
            saved_status = list(self._status)
            try:
                # Two real moves through the configured executor: to the shuffle and back.
                for tgt in (shuffle, original):
                    self._move_chunk(chunk, tgt, report)
            finally:
                self._status = saved_status
            report.statuses.clear()
        report.done = True
        if self.rank == 0:
            logger.info(
                "EPLB profile run done in %.3f s (%.3f GB backup reserved): %s",
                time.perf_counter() - t0,
                reserved / 1e9,
                report,
            )
        return report

    def _largest_backup(self) -> list[int]:
        """Slots per layer (from layer 0) of the largest backup one chunk can take on a rank."""
        return chunking.largest_backup(
            num_layers=self._placement.num_layers,
            slots_per_rank=self.topology.slots_per_rank,
            size=chunking.chunk_size(self.config.layers_per_chunk, self.config.incremental),
            slot_bytes=self._slot_bytes,
            budget=self.max_backup_bytes,
        )


def group_src(group: Any) -> int:
    """The global rank of ``group``'s rank 0 (broadcast takes global ranks)."""
    return int(dist.get_global_rank(group, 0))


@contextlib.contextmanager
def _phase(report: RearrangeReport, name: str) -> Iterator[None]:
    t0 = time.perf_counter()
    try:
        yield
    finally:
        report.add_time(name, time.perf_counter() - t0)
