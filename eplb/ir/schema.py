"""JSON Schema (draft 2020-12) of plan and schedule documents, generated from the attrs classes.

``python -m eplb.ir.schema > docs/plan.schema.json`` regenerates the committed copy; a test keeps
the two equal. The schema describes shape only; `serde.loads` also checks the cross-field rules
(ranks and slots inside the topology, placements valid).
"""

from __future__ import annotations

import enum
import json
import types
import typing
from typing import Any

import attrs

from eplb.ir import _validate
from eplb.ir.ops import Copy, Loc, Op, Recv, Send, Transfer
from eplb.ir.placement import ModelPlacement
from eplb.ir.plan import MigrationPlan
from eplb.ir.schedule import Schedule
from eplb.ir.serde import _TAG_OF, SCHEMA_VERSION

__all__ = ["json_schema"]

_OP_TYPES = (Send, Recv, Copy)


def json_schema() -> dict[str, Any]:
    """Schema accepting a ``migration_plan`` or a ``schedule`` document."""
    defs: dict[str, Any] = {}
    _ref(Schedule, defs)  # pulls in MigrationPlan and everything below it
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "eplb migration plan or schedule",
        "oneOf": [_document(cls, defs) for cls in (MigrationPlan, Schedule)],
        "$defs": defs,
    }


def _document(cls: type, defs: dict[str, Any]) -> dict[str, Any]:
    body = defs[cls.__name__]
    return {
        "type": "object",
        "properties": {
            "schema_version": {"const": SCHEMA_VERSION},
            "type": {"const": _TAG_OF[cls]},
            **body["properties"],
        },
        "required": ["schema_version", "type", *body["required"]],
        "additionalProperties": False,
    }


def _ref(cls: type, defs: dict[str, Any]) -> dict[str, Any]:
    name = cls.__name__
    if name not in defs:
        defs[name] = {}  # placeholder against recursion
        defs[name] = _object(cls, defs)
    return {"$ref": f"#/$defs/{name}"}


def _object(cls: type, defs: dict[str, Any]) -> dict[str, Any]:
    if cls is ModelPlacement:
        return {
            "type": "object",
            "description": "physical_to_logical: [num_layers, num_physical_experts]",
            "properties": {
                "num_logical_experts": {"type": "integer", "exclusiveMinimum": 0},
                "num_ranks": {"type": "integer", "exclusiveMinimum": 0},
                "physical_to_logical": {
                    "type": "array",
                    "minItems": 1,
                    "items": {"type": "array", "items": {"type": "integer", "minimum": 0}},
                },
            },
            "required": ["num_logical_experts", "num_ranks", "physical_to_logical"],
            "additionalProperties": False,
        }
    hints = typing.get_type_hints(cls)
    props: dict[str, Any] = {}
    required = []
    if cls in _OP_TYPES:
        props["op"] = {"const": cls.kind}
        required.append("op")
    for field in attrs.fields(cls):
        schema = _type(hints[field.name], defs)
        if field.validator in (_validate.non_negative,):
            schema = {**schema, "minimum": 0}
        elif field.validator in (_validate.positive_int, _validate.positive):
            schema = {**schema, "exclusiveMinimum": 0}
        props[field.name] = schema
        if field.default is attrs.NOTHING:
            required.append(field.name)
    return {"type": "object", "properties": props, "required": required, "additionalProperties": False}


def _type(tp: Any, defs: dict[str, Any]) -> dict[str, Any]:
    if tp is Op or tp is Transfer:
        return {"oneOf": [_ref(c, defs) for c in typing.get_args(tp)]}
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return {"anyOf": [_type(a, defs) for a in typing.get_args(tp)]}
    if origin is tuple:
        return {"type": "array", "items": _type(typing.get_args(tp)[0], defs)}
    if tp is type(None):
        return {"type": "null"}
    if tp is bool:
        return {"type": "boolean"}
    if tp is int:
        return {"type": "integer"}
    if tp is float:
        return {"type": "number"}
    if tp is str:
        return {"type": "string"}
    if tp is Loc:
        return {"type": "string", "pattern": r"^[sb](0|[1-9][0-9]*)$", "description": "s<slot> or b<buffer>"}
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return {"enum": [m.value for m in tp]}
    if attrs.has(tp):
        return _ref(tp, defs)
    raise TypeError(f"no JSON Schema for {tp!r}")


if __name__ == "__main__":
    print(json.dumps(json_schema(), indent=1))
