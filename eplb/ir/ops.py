"""Migration ops: what moves one expert's weights, on which rank, from where to where.

Every op moves one whole expert (all of its weight tensors, ``MigrationPlan.expert_bytes``).
Ops address rank-local locations (`Loc`): a slot of the rank's expert buffer (``s3``, index in
``[0, slots_per_rank)``) or a staging buffer (``b0``), an extra expert-sized slot from the rank's
staging pool used when a slot must be read after it is overwritten (swaps, cycles).

Semantics (DESIGN.md): every read sees the location's content from before the plan, unless the
plan itself wrote it earlier; after the plan every slot holds its target expert. A `Send` and
its `Recv` share ``(layer, transfer_id)``.
"""

from __future__ import annotations

import re
from typing import Any, ClassVar, Literal

import attrs

from eplb.ir._validate import non_negative
from eplb.ir.errors import InvalidValueError

__all__ = ["Copy", "Loc", "Op", "Recv", "Send", "Transfer"]

_LOC_RE = re.compile(r"^([sb])(0|[1-9][0-9]*)$")


@attrs.frozen(order=True, cache_hash=True)
class Loc:
    """A rank-local location: ``Loc('slot', 3)`` is ``s3``, ``Loc('buffer', 0)`` is ``b0``."""

    kind: Literal["slot", "buffer"] = attrs.field(validator=attrs.validators.in_(("slot", "buffer")))
    index: int = attrs.field(validator=non_negative)

    @classmethod
    def slot(cls, index: int) -> Loc:
        loc = _SLOTS.get(index)
        if loc is None:
            loc = _SLOTS[index] = cls("slot", index)
        return loc

    @classmethod
    def buffer(cls, index: int) -> Loc:
        loc = _BUFFERS.get(index)
        if loc is None:
            loc = _BUFFERS[index] = cls("buffer", index)
        return loc

    @classmethod
    def parse(cls, text: str) -> Loc:
        """Inverse of ``str``: ``"s3"`` -> slot 3, ``"b0"`` -> buffer 0."""
        m = _LOC_RE.match(text) if isinstance(text, str) else None
        if m is None:
            raise InvalidValueError(
                "", f"must be a location like 's3' (slot 3) or 'b0' (staging buffer 0) (got {text!r})."
            )
        index = int(m.group(2))
        return cls.slot(index) if m.group(1) == "s" else cls.buffer(index)

    @property
    def is_buffer(self) -> bool:
        return self.kind == "buffer"

    def __str__(self) -> str:
        return f"{self.kind[0]}{self.index}"


# Interned locations: a plan holds ~1e5 of them, values are few and immutable.
_SLOTS: dict[int, Loc] = {}
_BUFFERS: dict[int, Loc] = {}


def _other_rank(inst: Send | Recv, attr: attrs.Attribute[int], value: int) -> None:
    non_negative(inst, attr, value)
    if attr.name == "dst_rank" and value == inst.src_rank:
        raise InvalidValueError(
            "dst_rank", f"must differ from src_rank ({value}); a same-rank move is a Copy."
        )


@attrs.frozen(kw_only=True)
class Send:
    """``src_rank`` sends the expert at its location ``src`` to ``dst_rank``."""

    kind: ClassVar[str] = "send"
    layer: int = attrs.field(validator=non_negative)
    transfer_id: int = attrs.field(validator=non_negative)
    src_rank: int = attrs.field(validator=non_negative)
    dst_rank: int = attrs.field(validator=_other_rank)
    src: Loc
    expert: int = attrs.field(validator=non_negative)

    @classmethod
    def _trusted(
        cls, layer: int, transfer_id: int, src_rank: int, dst_rank: int, src: Loc, expert: int
    ) -> Send:
        """Private: a Send the planner derived from validated values, built without validators
        (see "private fast construction" at the end of this module)."""
        op = _new(cls)
        set_layer, set_tid, set_src_rank, set_dst_rank, set_src, set_expert = _SEND_SETTERS
        set_layer(op, layer)
        set_tid(op, transfer_id)
        set_src_rank(op, src_rank)
        set_dst_rank(op, dst_rank)
        set_src(op, src)
        set_expert(op, expert)
        return op

    @property
    def rank(self) -> int:
        """The rank that executes this op."""
        return self.src_rank

    @property
    def peer(self) -> int:
        return self.dst_rank

    def __str__(self) -> str:
        return (
            f"L{self.layer:02d} r{self.src_rank} -send[e{self.expert} {self.src}]-> "
            f"r{self.dst_rank} #{self.transfer_id}"
        )


@attrs.frozen(kw_only=True)
class Recv:
    """``dst_rank`` receives the expert from ``src_rank`` into its location ``dst``."""

    kind: ClassVar[str] = "recv"
    layer: int = attrs.field(validator=non_negative)
    transfer_id: int = attrs.field(validator=non_negative)
    src_rank: int = attrs.field(validator=non_negative)
    dst_rank: int = attrs.field(validator=_other_rank)
    dst: Loc
    expert: int = attrs.field(validator=non_negative)

    @classmethod
    def _trusted(
        cls, layer: int, transfer_id: int, src_rank: int, dst_rank: int, dst: Loc, expert: int
    ) -> Recv:
        """Private: a Recv the planner derived from validated values, built without validators
        (see "private fast construction" at the end of this module)."""
        op = _new(cls)
        set_layer, set_tid, set_src_rank, set_dst_rank, set_dst, set_expert = _RECV_SETTERS
        set_layer(op, layer)
        set_tid(op, transfer_id)
        set_src_rank(op, src_rank)
        set_dst_rank(op, dst_rank)
        set_dst(op, dst)
        set_expert(op, expert)
        return op

    @property
    def rank(self) -> int:
        return self.dst_rank

    @property
    def peer(self) -> int:
        return self.src_rank

    def __str__(self) -> str:
        return (
            f"L{self.layer:02d} r{self.dst_rank} <-recv[e{self.expert} {self.dst}]- "
            f"r{self.src_rank} #{self.transfer_id}"
        )


def _other_loc(inst: Copy, attr: attrs.Attribute[Loc], value: Loc) -> None:
    if value == inst.src:
        raise InvalidValueError("dst", f"must differ from src ({value}); drop the no-op copy.")


@attrs.frozen(kw_only=True)
class Copy:
    """A rank-local copy of the expert at ``src`` to ``dst`` (slot or staging buffer)."""

    kind: ClassVar[str] = "copy"
    layer: int = attrs.field(validator=non_negative)
    rank: int = attrs.field(validator=non_negative)
    src: Loc
    dst: Loc = attrs.field(validator=_other_loc)
    expert: int = attrs.field(validator=non_negative)

    @classmethod
    def _trusted(cls, layer: int, rank: int, src: Loc, dst: Loc, expert: int) -> Copy:
        """Private: a Copy the planner derived from validated values, built without validators
        (see "private fast construction" at the end of this module)."""
        op = _new(cls)
        set_layer, set_rank, set_src, set_dst, set_expert = _COPY_SETTERS
        set_layer(op, layer)
        set_rank(op, rank)
        set_src(op, src)
        set_dst(op, dst)
        set_expert(op, expert)
        return op

    def __str__(self) -> str:
        return f"L{self.layer:02d} r{self.rank} copy[e{self.expert} {self.src}->{self.dst}]"


Transfer = Send | Recv
Op = Send | Recv | Copy


# --- private fast construction ------------------------------------------------------------------
# The planner builds ~1e5 ops per model (DeepSeek-V3 from scratch) out of ints it read from
# validated placements and topologies: ranks, slots and experts that are in range by
# construction. The attrs validators cost ~2 us an op, a third of compile time, so the planner
# calls `_trusted`, which writes the slots directly: the same frozen value, no checks. It is
# private and explicit at every call site. Constructors and JSON (`eplb.ir.serde`) always
# validate; a `MigrationPlan` or `Schedule` built any way but the planner's `_trusted` checks
# every op's ranges; `eplb.planner.verify` proves every schedule.
_new = object.__new__


def _slot_setters(cls: type, *names: str) -> tuple[Any, ...]:
    """The ``__set__`` of each slot of an attrs slotted class, ``names`` being all its fields in
    order (checked, so a new field cannot be left unset)."""
    assert names == tuple(a.name for a in attrs.fields(cls)), names
    return tuple(cls.__dict__[name].__set__ for name in names)


_SEND_SETTERS = _slot_setters(Send, "layer", "transfer_id", "src_rank", "dst_rank", "src", "expert")
_RECV_SETTERS = _slot_setters(Recv, "layer", "transfer_id", "src_rank", "dst_rank", "dst", "expert")
_COPY_SETTERS = _slot_setters(Copy, "layer", "rank", "src", "dst", "expert")
