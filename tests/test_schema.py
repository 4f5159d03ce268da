"""Tier 1 (pure Python): the committed JSON Schema is current and accepts every dumped plan."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
from hypothesis import given

from eplb.ir import MigrationPlan, Round, Schedule
from eplb.ir.schema import json_schema
from eplb.ir.serde import to_dict
from tests.strategies import migration_plans

SCHEMA_FILE = Path(__file__).parent.parent / "docs" / "plan.schema.json"


def test_committed_schema_is_current() -> None:
    committed = json.loads(SCHEMA_FILE.read_text())
    assert committed == json_schema(), "regenerate: python -m eplb.ir.schema > docs/plan.schema.json"


@given(migration_plans())
def test_dumped_documents_match_the_schema(plan: MigrationPlan) -> None:
    validator = jsonschema.Draft202012Validator(json_schema())
    validator.validate(to_dict(plan))
    sends = tuple(op for op in plan.ops() if op.kind != "copy")
    sched = Schedule(
        plan=plan, rounds=(Round(transfers=sends),), rounds_lower_bound=0, staging_buffers_per_rank=4
    )
    validator.validate(to_dict(sched))


def test_schema_rejects_unknown_keys() -> None:
    validator = jsonschema.Draft202012Validator(json_schema())
    doc = {"schema_version": 1, "type": "migration_plan", "surprise": True}
    assert not validator.is_valid(doc)
