"""Tier 1 (pure Python): JSON round trips and errors that name the JSON path."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from eplb.ir import (
    Loc,
    MigrationPlan,
    Round,
    Schedule,
    ScheduleLimits,
    SerdeError,
    Topology,
)
from eplb.ir.serde import TYPE_TAGS, dumps, from_dict, loads, to_dict
from tests.strategies import migration_plans, model_placements, ops, placements, topologies


@given(st.one_of(placements(), model_placements(), topologies(), migration_plans()))
def test_round_trip(value: Any) -> None:
    assert loads(dumps(value)) == value
    assert loads(dumps(value, indent=None), type(value)) == value


@given(migration_plans(), st.data())
def test_round_trip_ops_and_schedules(plan: MigrationPlan, data: st.DataObject) -> None:
    for op in plan.ops():
        assert loads(dumps(op)) == op
    sends = tuple(op for op in plan.ops() if op.kind != "copy")
    copies = tuple(op for op in plan.ops() if op.kind == "copy")
    num_buffers = 1 + max((loc.index for op in plan.ops() for loc in _locs(op) if loc.is_buffer), default=0)
    limits = ScheduleLimits(
        max_peers_per_round=data.draw(st.none() | st.integers(1, 8)),
        staging_bytes_per_rank=data.draw(st.none() | st.integers(1, 2**40)),
    )
    sched = Schedule(
        plan=plan,
        limits=limits,
        rounds=(Round(before=copies, transfers=sends), Round()),
        rounds_lower_bound=1,
        staging_buffers_per_rank=num_buffers,
    )
    assert loads(dumps(sched), Schedule) == sched
    assert loads(dumps(Loc.buffer(3))) == Loc.buffer(3)


def _locs(op: Any) -> list[Loc]:
    return [getattr(op, name) for name in ("src", "dst") if hasattr(op, name)]


@given(topologies(max_ranks=4), st.data())
def test_single_ops_round_trip(topo: Topology, data: st.DataObject) -> None:
    op = data.draw(ops(topology=topo, num_logical_experts=5))
    assert loads(dumps(op)) == op


def _plan_doc() -> dict[str, Any]:
    doc = {
        "schema_version": 1,
        "type": "migration_plan",
        "topology": {"num_ranks": 8, "slots_per_rank": 1, "rank_to_node": [0] * 8},
        "expert_bytes": 64,
        "current": {
            "num_logical_experts": 8,
            "num_ranks": 8,
            "physical_to_logical": [list(range(8)) for _ in range(4)],
        },
        "target": {
            "num_logical_experts": 8,
            "num_ranks": 8,
            "physical_to_logical": [list(range(8)) for _ in range(4)],
        },
        "layers": [{"layer": i, "ops": []} for i in range(4)],
    }
    doc["layers"][3]["ops"] = [
        {"op": "copy", "layer": 3, "rank": 0, "src": "s0", "dst": "b0", "expert": 0} for _ in range(7)
    ] + [{"op": "recv", "layer": 3, "transfer_id": 0, "src_rank": 0, "dst_rank": 9, "dst": "s0", "expert": 1}]
    return doc


def test_issue_example_path() -> None:
    with pytest.raises(
        SerdeError, match=r"^\$\.layers\[3\]\.ops\[7\]\.dst_rank: must be in \[0, 8\) \(got 9\)\.$"
    ):
        from_dict(_plan_doc())


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda d: d.update(extra=1), r"^\$: has unknown key\(s\) \['extra'\]"),
        (
            lambda d: d["topology"].update(num_ranks="8"),
            r"^\$\.topology\.num_ranks: must be an integer \(got '8'\)",
        ),
        (
            lambda d: d.update(schema_version=99),
            r"^\$\.schema_version: this build reads schema version 1 \(got 99\)",
        ),
        (
            lambda d: d.pop("schema_version"),
            r"^\$\.schema_version: this build reads schema version 1 \(got None\)",
        ),
        (lambda d: d.update(type="nonsense"), r"^\$\.type: must be one of"),
        (lambda d: d.pop("expert_bytes"), r"^\$\.expert_bytes: is required but missing"),
        (
            lambda d: d["layers"][3]["ops"][2].update(src="z1"),
            r"^\$\.layers\[3\]\.ops\[2\]\.src: must be a location",
        ),
        (
            lambda d: d["layers"][3]["ops"][2].update(op="move"),
            r"^\$\.layers\[3\]\.ops\[2\]\.op: must be one of 'send', 'recv', 'copy'",
        ),
        (
            lambda d: d["target"]["physical_to_logical"][1].__setitem__(2, 8),
            r"^\$\.target\.physical_to_logical\[1\]\[2\]: must be in \[0, 8\) \(got 8\)",
        ),
        (lambda d: d["layers"].pop(), r"^\$\.layers: must have one entry per layer, 4 \(got 3\)"),
    ],
)
def test_errors_name_the_path(mutate: Any, match: str) -> None:
    doc = _plan_doc()
    doc["layers"][3]["ops"][7]["dst_rank"] = 1  # make the document otherwise valid
    mutate(doc)
    with pytest.raises(SerdeError, match=match):
        loads(json.dumps(doc))


def test_expected_type_is_enforced() -> None:
    doc = to_dict(Topology.uniform(2, 2))
    with pytest.raises(
        SerdeError, match=r"^\$\.type: must be 'schedule' here \(got 'topology'\); wrong file\?"
    ):
        from_dict(doc, Schedule)


def test_all_problems_are_listed() -> None:
    doc = _plan_doc()
    doc["layers"][3]["ops"][7]["dst_rank"] = 1
    doc["topology"]["slots_per_rank"] = "x"
    doc["expert_bytes"] = -1.5
    with pytest.raises(SerdeError) as info:
        from_dict(doc)
    paths = [p for p, _ in info.value.problems]
    assert "$.topology.slots_per_rank" in paths and "$.expert_bytes" in paths


# Any JSON value, anywhere in a valid document, gives SerdeError and nothing else.
_json = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 3) | st.floats(allow_nan=True) | st.text(max_size=3),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner, max_size=3),
    max_leaves=8,
)


def _paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix]
    if isinstance(value, dict):
        for k, v in value.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            out += _paths(v, (*prefix, i))
    return out


@given(migration_plans(), st.data())
def test_mutated_documents_raise_only_serde_error(plan: MigrationPlan, data: st.DataObject) -> None:
    doc = to_dict(plan)
    path = data.draw(st.sampled_from(_paths(doc)[1:]))
    parent = doc
    for key in path[:-1]:
        parent = parent[key]
    action = data.draw(st.sampled_from(["replace", "delete"]))
    if action == "delete" and isinstance(parent, (dict, list)):
        del parent[path[-1]]
    else:
        parent[path[-1]] = data.draw(_json)
    try:
        result = loads(json.dumps(doc))
    except SerdeError:
        return
    assert isinstance(result, MigrationPlan)  # the mutation happened to keep a valid plan


@given(st.text(max_size=50) | _json.map(json.dumps))
def test_random_text_raises_only_serde_error(text: str) -> None:
    try:
        value = loads(text)
    except SerdeError:
        return
    assert type(value) in TYPE_TAGS.values()


@pytest.mark.parametrize("depth", [1000, 100_000])
@pytest.mark.parametrize("where", ["top", "field"])
def test_deeply_nested_json_raises_serde_error(depth: int, where: str) -> None:
    # Python's JSON parser recurses per level: a RecursionError must not escape (the CLI turns
    # only SerdeError into its one-line message and exit 2).
    nest = "[" * depth + "]" * depth
    text = nest if where == "top" else '{"schema_version": 1, "type": "schedule", "plan": ' + nest + "}"
    with pytest.raises(SerdeError):
        loads(text)
