"""JSON for every IR value: ``dumps`` / ``loads``, through one private cattrs converter.

A document is a JSON object ``{"schema_version": 1, "type": "<tag>", ...fields}``; values that are
not objects (a `Loc`) sit under ``"value"``. Ops carry ``"op": "send" | "recv" | "copy"``;
locations are strings (``"s3"`` a slot, ``"b0"`` a staging buffer). Unknown keys are refused.
Any bad document raises `SerdeError` listing every problem with its JSON path, e.g.
``$.layers[3].ops[7].dst_rank: must be in [0, 8) (got 9).``
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Mapping
from typing import Any, TypeVar, cast

import attrs
import cattrs
from cattrs.errors import ClassValidationError, ForbiddenExtraKeysError, IterableValidationError
from cattrs.gen import make_dict_structure_fn, make_dict_unstructure_fn
from cattrs.preconf.json import make_converter

from eplb.ir.errors import InvalidValueError, SerdeError
from eplb.ir.ops import Copy, Loc, Op, Recv, Send, Transfer
from eplb.ir.placement import ModelPlacement, Placement
from eplb.ir.plan import LayerPlan, MigrationPlan
from eplb.ir.schedule import Round, Schedule, ScheduleLimits
from eplb.ir.topology import Bandwidth, Topology

if sys.version_info < (3, 11):  # pragma: no cover
    from exceptiongroup import BaseExceptionGroup  # type: ignore[import-not-found,unused-ignore]

__all__ = ["SCHEMA_VERSION", "TYPE_TAGS", "dumps", "loads", "to_dict"]

SCHEMA_VERSION = 1

T = TypeVar("T")

TYPE_TAGS: Mapping[str, type] = {
    "placement": Placement,
    "model_placement": ModelPlacement,
    "bandwidth": Bandwidth,
    "topology": Topology,
    "loc": Loc,
    "send": Send,
    "recv": Recv,
    "copy": Copy,
    "layer_plan": LayerPlan,
    "migration_plan": MigrationPlan,
    "schedule_limits": ScheduleLimits,
    "round": Round,
    "schedule": Schedule,
}
_TAG_OF = {cls: tag for tag, cls in TYPE_TAGS.items()}
_OPS: dict[str, type[Send] | type[Recv] | type[Copy]] = {"send": Send, "recv": Recv, "copy": Copy}


def _make_converter() -> cattrs.Converter:
    conv = make_converter(forbid_extra_keys=True)

    # JSON numbers only: no "5" -> 5, 1.5 -> 1 or true -> 1 coercions.
    def structure_int(value: Any, _: type) -> int:
        if type(value) is not int:
            raise InvalidValueError("", f"must be an integer (got {value!r}).")
        return value

    def structure_float(value: Any, _: type) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise InvalidValueError("", f"must be a number (got {value!r}).")
        return float(value)

    def structure_str(value: Any, _: type) -> str:
        if not isinstance(value, str):
            raise InvalidValueError("", f"must be a string (got {value!r}).")
        return value

    conv.register_structure_hook(int, structure_int)
    conv.register_structure_hook(float, structure_float)
    conv.register_structure_hook(str, structure_str)
    conv.register_unstructure_hook(Loc, str)
    conv.register_structure_hook(Loc, lambda v, _: Loc.parse(v))

    # ModelPlacement: one [layers, slots] matrix rather than a list of repeated Placement objects.
    def unstructure_model(mp: ModelPlacement) -> dict[str, Any]:
        return {
            "num_logical_experts": mp.num_logical_experts,
            "num_ranks": mp.num_ranks,
            "physical_to_logical": [list(row) for row in mp.physical_to_logical],
        }

    model_fields = {"num_logical_experts", "num_ranks", "physical_to_logical"}

    def structure_model(value: Any, _: type) -> ModelPlacement:
        obj = _object(value)
        extra = sorted(set(obj) - model_fields)
        if extra:
            raise InvalidValueError("", f"has unknown key(s) {extra}; remove them.")
        for key in sorted(model_fields - set(obj)):
            raise InvalidValueError(key, "is required but missing.")
        num_e = structure_int(obj["num_logical_experts"], int)
        num_r = structure_int(obj["num_ranks"], int)
        rows = obj["physical_to_logical"]
        if not isinstance(rows, list):
            raise InvalidValueError("physical_to_logical", f"must be a list of lists (got {rows!r}).")
        layers = []
        for i, row in enumerate(rows):
            if not isinstance(row, list):
                raise InvalidValueError(f"physical_to_logical[{i}]", f"must be a list (got {row!r}).")
            for j, v in enumerate(row):
                if type(v) is not int:
                    raise InvalidValueError(
                        f"physical_to_logical[{i}][{j}]", f"must be an integer (got {v!r})."
                    )
            try:
                layers.append(Placement(num_logical_experts=num_e, num_ranks=num_r, physical_to_logical=row))
            except InvalidValueError as exc:
                sub = exc.path.removeprefix("physical_to_logical")
                raise InvalidValueError(
                    f"physical_to_logical[{i}]{sub}" if sub.startswith("[") else exc.path or "",
                    exc.rule,
                ) from None
        return ModelPlacement(layers=tuple(layers))

    conv.register_unstructure_hook(ModelPlacement, unstructure_model)
    conv.register_structure_hook(ModelPlacement, structure_model)

    # Ops: every op object carries its kind under "op", also where the field type says which.
    for cls in (Send, Recv, Copy):
        base_un = make_dict_unstructure_fn(cls, conv)
        base_st = make_dict_structure_fn(cls, conv, _cattrs_forbid_extra_keys=True)
        conv.register_unstructure_hook(cls, _tagged_unstructure(cls.kind, base_un))
        conv.register_structure_hook(cls, _tagged_structure(cls, base_st))
    conv.register_unstructure_hook(Op, lambda op: conv.unstructure(op, type(op)))
    conv.register_unstructure_hook(Transfer, lambda op: conv.unstructure(op, type(op)))
    conv.register_structure_hook(Op, _union_structure(conv, ("send", "recv", "copy")))
    conv.register_structure_hook(Transfer, _union_structure(conv, ("send", "recv")))
    return conv


def _object(value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise InvalidValueError("", f"must be a JSON object (got {type(value).__name__}).")
    return value


def _tagged_unstructure(kind: str, base: Callable[[Any], dict[str, Any]]) -> Callable[[Any], dict[str, Any]]:
    def hook(op: Any) -> dict[str, Any]:
        return {"op": kind, **base(op)}

    return hook


def _tagged_structure(cls: type[T], base: Callable[[Any, type], T]) -> Callable[[Any, type], T]:
    kind: str = cls.kind  # type: ignore[attr-defined]

    def hook(value: Any, _: type) -> T:
        obj = dict(_object(value))
        tag = obj.pop("op", kind)
        if tag != kind:
            raise InvalidValueError("op", f"must be {kind!r} here (got {tag!r}).")
        return base(obj, cls)

    return hook


def _union_structure(conv: cattrs.Converter, kinds: tuple[str, ...]) -> Callable[[Any, type], Any]:
    def hook(value: Any, _: type) -> Any:
        tag = _object(value).get("op")
        if tag not in kinds:
            allowed = ", ".join(repr(k) for k in kinds)
            raise InvalidValueError("op", f"must be one of {allowed} (got {tag!r}).")
        return conv.structure(value, _OPS[tag])

    return hook


_CONVERTER = _make_converter()


# --- public API -------------------------------------------------------------------------------
def to_dict(value: Any) -> dict[str, Any]:
    """The JSON document of an IR value as Python objects (with ``schema_version`` and ``type``)."""
    tag = _TAG_OF.get(type(value))
    if tag is None:
        raise TypeError(f"dumps() takes an IR value ({', '.join(TYPE_TAGS)}), got {type(value).__name__}")
    body = _CONVERTER.unstructure(value, type(value))
    if isinstance(body, dict):
        body.pop("op", None)  # the document's "type" already says which op
        return {"schema_version": SCHEMA_VERSION, "type": tag, **body}
    return {"schema_version": SCHEMA_VERSION, "type": tag, "value": body}


def dumps(value: Any, *, indent: int | None = 1) -> str:
    """Serialise an IR value. With ``indent``, small objects and lists of numbers stay on one line,
    so a plan reads one op per line."""
    doc = to_dict(value)
    if indent is None:
        return json.dumps(doc, separators=(",", ":"))
    return _pretty(doc, indent, 0) + "\n"


def loads(text: str | bytes, cls: type[T] | None = None) -> T:
    """Parse a document written by `dumps`. ``cls`` (e.g. ``Schedule``) pins the expected type.

    Raises `SerdeError` listing every problem with its JSON path; never anything else.
    """
    try:
        doc = json.loads(text)
    except (ValueError, UnicodeDecodeError) as exc:
        raise SerdeError([("$", f"is not valid JSON ({exc}).")]) from None
    except RecursionError:
        # Python's parser recurses per nesting level; an eplb document nests a handful deep.
        raise SerdeError(
            [("$", "nests arrays or objects too deeply to parse; an eplb document nests a few levels.")]
        ) from None
    return from_dict(doc, cls)


def from_dict(doc: Any, cls: type[T] | None = None) -> T:
    """Like `loads`, from already-parsed JSON objects."""
    if not isinstance(doc, dict):
        raise SerdeError([("$", f"must be a JSON object (got {type(doc).__name__}).")])
    body = dict(doc)
    version = body.pop("schema_version", None)
    if version != SCHEMA_VERSION:
        raise SerdeError(
            [
                (
                    "$.schema_version",
                    f"this build reads schema version {SCHEMA_VERSION} (got {version!r}); "
                    "re-export the file with this eplb version or install the one that wrote it.",
                )
            ]
        )
    tag = body.pop("type", None)
    target = TYPE_TAGS.get(tag) if isinstance(tag, str) else None
    if target is None:
        raise SerdeError([("$.type", f"must be one of {sorted(TYPE_TAGS)} (got {tag!r}).")])
    if cls is not None and target is not cls:
        raise SerdeError(
            [("$.type", f"must be {_TAG_OF.get(cls, cls.__name__)!r} here (got {tag!r}); wrong file?")]
        )
    if not attrs.has(target) or target is Loc:
        extra = sorted(set(body) - {"value"})
        if extra or "value" not in body:
            raise SerdeError(
                [("$", f"must hold exactly the key 'value' besides the header (got {sorted(body)}).")]
            )
        payload: Any = body["value"]
    else:
        payload = body
        if target in _OPS.values():
            payload = {"op": tag, **body}
    try:
        return cast(T, _CONVERTER.structure(payload, target))
    except Exception as exc:  # every failure becomes a SerdeError with paths
        raise SerdeError(_problems(exc, "$") or [("$", f"invalid document ({exc!r}).")]) from None


def _join(path: str, sub: str) -> str:
    if not sub:
        return path
    return path + (sub if sub.startswith("[") else "." + sub)


def _problems(exc: BaseException, path: str) -> list[tuple[str, str]]:
    if isinstance(exc, ForbiddenExtraKeysError):
        return [(path, f"has unknown key(s) {sorted(exc.extra_fields)}; remove them.")]
    if isinstance(exc, ClassValidationError):
        with_notes, without = exc.group_exceptions()
        out = []
        for sub, note in with_notes:
            out += _problems(sub, _join(path, note.name))
        for sub in without:
            out += _problems(sub, path)
        return out
    if isinstance(exc, IterableValidationError):
        with_idx, without_idx = exc.group_exceptions()
        out = []
        for sub, inote in with_idx:
            out += _problems(sub, f"{path}[{inote.index}]")
        for sub in without_idx:
            out += _problems(sub, path)
        return out
    if isinstance(exc, BaseExceptionGroup):
        return [p for sub in exc.exceptions for p in _problems(sub, path)]
    if isinstance(exc, InvalidValueError):
        return [(_join(path, exc.path), exc.rule)]
    if isinstance(exc, KeyError):
        return [(path, "is required but missing.")]
    if isinstance(exc, (TypeError, ValueError, AttributeError)):
        return [(path, f"invalid value ({exc}).")]
    return [(path, f"invalid value ({exc!r}).")]


# --- pretty printing --------------------------------------------------------------------------
_SCALARS = (int, float, str, bool, type(None))


def _pretty(value: Any, indent: int, depth: int, width: int = 110) -> str:
    compact = json.dumps(value, separators=(", ", ": "))
    scalar_list = isinstance(value, list) and all(isinstance(v, _SCALARS) for v in value)
    if not isinstance(value, (dict, list)) or scalar_list or len(compact) + depth * indent <= width:
        return compact
    pad, inner = " " * (indent * depth), " " * (indent * (depth + 1))
    if isinstance(value, list):
        items = [inner + _pretty(v, indent, depth + 1, width) for v in value]
        return "[\n" + ",\n".join(items) + "\n" + pad + "]"
    items = [f"{inner}{json.dumps(k)}: {_pretty(v, indent, depth + 1, width)}" for k, v in value.items()]
    return "{\n" + ",\n".join(items) + "\n" + pad + "}"
