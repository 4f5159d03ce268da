"""A migration plan: the ops that turn the current placement into the target, per layer.

A layer's ops are listed in an order that is a valid sequential program (each op run to
completion before the next, a Send and its Recv as one step); the scheduler groups them into
rounds. Whole-plan rules (ranks, slots and experts in range) are checked on construction, with
the path of the bad value, so a plan read from JSON is never half-valid.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import attrs

from eplb.ir._validate import non_negative, ops_trusted, positive_int, trusting_ops
from eplb.ir.errors import InvalidValueError
from eplb.ir.ops import Copy, Loc, Op, Recv, Send
from eplb.ir.placement import ModelPlacement
from eplb.ir.topology import Topology

__all__ = ["LayerPlan", "MigrationPlan"]


@attrs.frozen(kw_only=True)
class LayerPlan:
    """The ops of one MoE layer, in a valid sequential order."""

    layer: int = attrs.field(validator=non_negative)
    ops: tuple[Op, ...] = attrs.field(converter=tuple, default=())

    @property
    def transfers(self) -> int:
        return sum(isinstance(op, Send) for op in self.ops)

    @property
    def local_copies(self) -> int:
        return sum(isinstance(op, Copy) and not op.dst.is_buffer for op in self.ops)

    def __str__(self) -> str:
        return f"L{self.layer:02d}: {self.transfers} transfers, {self.local_copies} local copies"


@attrs.frozen(kw_only=True)
class MigrationPlan:
    """Model shape, bytes per expert, both placements, and the ops of every layer."""

    topology: Topology
    expert_bytes: int = attrs.field(validator=positive_int)
    current: ModelPlacement
    target: ModelPlacement
    layers: tuple[LayerPlan, ...] = attrs.field(converter=tuple)

    def __attrs_post_init__(self) -> None:
        problem = next(self._problems(scan_ops=not ops_trusted()), None)
        if problem is not None:
            raise InvalidValueError(*problem)

    @classmethod
    def _trusted(
        cls,
        *,
        topology: Topology,
        expert_bytes: int,
        current: ModelPlacement,
        target: ModelPlacement,
        layers: tuple[LayerPlan, ...],
    ) -> MigrationPlan:
        """Private to `eplb.planner`: a plan whose ops it derived from validated placements and
        topology. Fields and shapes are checked as usual; the per-op range scan is skipped."""
        with trusting_ops():
            return cls(
                topology=topology,
                expert_bytes=expert_bytes,
                current=current,
                target=target,
                layers=layers,  # type: ignore[arg-type]  # attrs converter=tuple
            )

    def problems(self) -> Iterator[tuple[str, str]]:
        """Every broken shape rule as ``(path, rule)``; empty for a well-formed plan."""
        return self._problems(scan_ops=True)

    def _problems(self, *, scan_ops: bool) -> Iterator[tuple[str, str]]:
        topo, cur, tgt = self.topology, self.current, self.target
        if cur.num_layers != tgt.num_layers:
            yield "target", f"has {tgt.num_layers} layers but current has {cur.num_layers}; they must match."
        if cur.num_logical_experts != tgt.num_logical_experts:
            yield (
                "target",
                f"has {tgt.num_logical_experts} logical experts but current has "
                f"{cur.num_logical_experts}; they must match.",
            )
        for name, placement in (("current", cur), ("target", tgt)):
            if placement.slots_per_rank != topo.slots_per_rank:
                yield (
                    name,
                    f"has {placement.slots_per_rank} slots per rank but the topology has "
                    f"{topo.slots_per_rank}; they must match.",
                )
            if placement.num_ranks > topo.num_ranks:
                yield (
                    name,
                    f"spans {placement.num_ranks} ranks but the topology has only {topo.num_ranks}.",
                )
        if len(self.layers) != tgt.num_layers:
            yield "layers", f"must have one entry per layer, {tgt.num_layers} (got {len(self.layers)})."
        for i, lp in enumerate(self.layers):
            if lp.layer != i:
                yield f"layers[{i}].layer", f"must be {i}, its position (got {lp.layer})."
            if not scan_ops or ops_fit(lp.ops, topo, tgt.num_logical_experts, None, range(i, i + 1)):
                continue  # the usual case, checked fast; the loop below says what is wrong
            for j, op in enumerate(lp.ops):
                for field, rule in op_problems(op, topo, tgt.num_logical_experts, None):
                    yield f"layers[{i}].ops[{j}].{field}", rule
                if op.layer != i:
                    yield f"layers[{i}].ops[{j}].layer", f"must be {i}, its layer (got {op.layer})."

    # --- summary figures ----------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def transfers(self) -> int:
        return sum(lp.transfers for lp in self.layers)

    @property
    def local_copies(self) -> int:
        return sum(lp.local_copies for lp in self.layers)

    @property
    def bytes_moved(self) -> int:
        """Bytes sent between ranks (each transfer counted once)."""
        return self.transfers * self.expert_bytes

    def ops(self) -> Iterator[Op]:
        for lp in self.layers:
            yield from lp.ops

    def __str__(self) -> str:
        return (
            f"MigrationPlan({self.num_layers} layers on {self.topology.num_ranks} ranks: "
            f"{self.transfers} transfers, {self.local_copies} local copies, "
            f"{self.bytes_moved / 1e9:.3f} GB)"
        )


def ops_fit(
    ops: Iterable[Op], topology: Topology, num_logical_experts: int, num_buffers: int | None, layers: range
) -> bool:
    """True when `op_problems` finds nothing in any of ``ops`` and every op's layer is in
    ``layers``. The same rules as one fast loop: a DeepSeek-V3 plan holds ~5e4 ops, and a
    generator per op was most of the cost of checking them."""
    num_ranks, num_slots = topology.num_ranks, topology.slots_per_rank
    locs: tuple[Loc, ...]
    for op in ops:
        if isinstance(op, Copy):
            ranks_fit = op.rank < num_ranks
            locs = (op.src, op.dst)
        elif isinstance(op, Send):
            ranks_fit = op.src_rank < num_ranks and op.dst_rank < num_ranks
            locs = (op.src,)
        elif isinstance(op, Recv):
            ranks_fit = op.src_rank < num_ranks and op.dst_rank < num_ranks
            locs = (op.dst,)
        else:
            return False  # not an op: left to the detailed check
        if not ranks_fit or op.layer not in layers or op.expert >= num_logical_experts:
            return False
        for loc in locs:
            if loc.kind == "buffer":
                if num_buffers is not None and loc.index >= num_buffers:
                    return False
            elif loc.index >= num_slots:
                return False
    return True


def op_problems(
    op: Op, topology: Topology, num_logical_experts: int, num_buffers: int | None
) -> Iterator[tuple[str, str]]:
    """Fields of ``op`` that point outside the topology: ``(field, rule)``.

    ``num_buffers`` bounds staging-buffer indices (the schedule's pool); None leaves them open.
    """
    num_ranks = topology.num_ranks
    rank_fields = ("src_rank", "dst_rank") if isinstance(op, (Send, Recv)) else ("rank",)
    for name in rank_fields:
        value = getattr(op, name)
        if value >= num_ranks:
            yield name, f"must be in [0, {num_ranks}) (got {value})."
    if op.expert >= num_logical_experts:
        yield "expert", f"must be in [0, {num_logical_experts}) (got {op.expert})."
    locs: tuple[tuple[str, Loc], ...]
    if isinstance(op, Send):
        locs = (("src", op.src),)
    elif isinstance(op, Recv):
        locs = (("dst", op.dst),)
    else:
        locs = (("src", op.src), ("dst", op.dst))
    for name, loc in locs:
        if loc.is_buffer:
            if num_buffers is not None and loc.index >= num_buffers:
                yield (
                    name,
                    f"must be a staging buffer in [b0, b{num_buffers}) (got {loc}); "
                    "raise staging_buffers_per_rank or re-schedule.",
                )
        elif loc.index >= topology.slots_per_rank:
            yield name, f"must be a slot in [s0, s{topology.slots_per_rank}) (got {loc})."
