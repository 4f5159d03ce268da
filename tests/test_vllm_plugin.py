"""eplb's vLLM EPLB policy plugin (`eplb.integrations.vllm`). Tier 1: no vLLM needed.

Registration runs against `tests.vllm_standin`, which stands in for vLLM's
``vllm.distributed.eplb.policy`` names (``AbstractEplbPolicy``, ``EPLB_POLICIES``); vLLM is not
installed in CI. Two tests at the end run vLLM's real code: one where vLLM is importable, one
on vLLM's source files when ``EPLB_VLLM_SRC`` names a tree holding them (skipped otherwise).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from eplb.integrations import vllm as plugin
from eplb.integrations.vllm_plan import plan_for_vllm, seed_from_old
from eplb.ir.serde import loads
from tests.vllm_standin import forget_vllm, load_vllm_source, standin_policy_module

ROOT = Path(__file__).resolve().parents[1]
# (layers, experts, groups, slots, ranks, nodes): small enough for tier 1, grouped and multi-node.
SHAPE = (4, 16, 4, 24, 4, 2)


def _load(seed: int = 0, shape: tuple[int, ...] = SHAPE) -> torch.Tensor:
    num_l, num_e = shape[0], shape[1]
    rng = np.random.default_rng(seed)
    return torch.from_numpy(np.round(rng.lognormal(0, 1.2, (num_l, num_e)) * 100)).to(torch.int32)


def _policy(env: dict[str, str] | None = None) -> tuple[Any, type]:
    mod = standin_policy_module()
    cls = plugin.register_into(mod.EPLB_POLICIES, mod.AbstractEplbPolicy, env=env or {})
    assert cls is not None
    return mod, cls


def _call(cls: type, weight: torch.Tensor, old: torch.Tensor | None = None, **kw: int) -> torch.Tensor:
    _, _, groups, slots, ranks, nodes = SHAPE
    args = {"num_replicas": slots, "num_groups": groups, "num_nodes": nodes, "num_ranks": ranks} | kw
    out: torch.Tensor = cls.rebalance_experts(  # type: ignore[attr-defined]
        weight, args["num_replicas"], args["num_groups"], args["num_nodes"], args["num_ranks"], old
    )
    return out


def _assert_valid(out: torch.Tensor, num_l: int, num_e: int, width: int) -> None:
    assert out.dtype == torch.int64 and out.device.type == "cpu" and tuple(out.shape) == (num_l, width)
    for row in out.numpy():
        assert np.array_equal(np.unique(row), np.arange(num_e)), row


# --- registration ---------------------------------------------------------------------------


def test_register_into_replaces_default_once() -> None:
    mod = standin_policy_module()
    original = mod.EPLB_POLICIES["default"]
    first = plugin.register_into(mod.EPLB_POLICIES, mod.AbstractEplbPolicy, env={})
    second = plugin.register_into(mod.EPLB_POLICIES, mod.AbstractEplbPolicy, env={})
    assert first is second is mod.EPLB_POLICIES["default"]
    assert issubclass(first, mod.AbstractEplbPolicy) and first is not original
    assert first.vllm_default is original and first.eplb_config.policy == "migration_aware"


def test_keep_vllm_default() -> None:
    mod = standin_policy_module()
    original = mod.EPLB_POLICIES["default"]
    assert plugin.register_into(mod.EPLB_POLICIES, mod.AbstractEplbPolicy, env={"EPLB_POLICY": "vllm"}) is None
    assert mod.EPLB_POLICIES["default"] is original


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"EPLB_POLICY": "fastest"}, r"EPLB_POLICY.*must be one of .*migration_aware.*vllm \(got 'fastest'\)"),
        ({"EPLB_POLICY_OPTIONS": "tolerance=1"}, r"EPLB_POLICY_OPTIONS.*must be a JSON object"),
        ({"EPLB_POLICY_OPTIONS": "[1]"}, r"EPLB_POLICY_OPTIONS.*must be a JSON object"),
    ],
)
def test_bad_switch_warns_and_keeps_vllm(
    env: dict[str, str], message: str, caplog: pytest.LogCaptureFixture
) -> None:
    mod = standin_policy_module()
    original = mod.EPLB_POLICIES["default"]
    with caplog.at_level(logging.WARNING, logger="vllm.eplb_plugin"):
        assert plugin.register_into(mod.EPLB_POLICIES, mod.AbstractEplbPolicy, env=env) is None
    assert mod.EPLB_POLICIES["default"] is original
    assert len(caplog.records) == 1
    assert caplog.records[0].levelno == logging.WARNING
    assert re.search(message, caplog.records[0].getMessage())


def test_config_from_env_reads_policy_options_and_dump_dir(tmp_path: Path) -> None:
    env = {"EPLB_POLICY": "deepseek", "EPLB_POLICY_OPTIONS": '{"b": 1, "a": 2}', "EPLB_DUMP_DIR": str(tmp_path)}
    config = plugin.config_from_env(env)
    assert config.policy == "deepseek" and list(config.options) == ["a", "b"] and config.dump_dir == tmp_path


def test_importing_eplb_imports_no_vllm() -> None:
    code = (
        "import sys, eplb, eplb.integrations, eplb.integrations.vllm, eplb.planner;"
        "bad = [m for m in sys.modules if m == 'vllm' or m.startswith('vllm.')];"
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, env=os.environ | {"PYTHONPATH": str(ROOT)})


def test_register_without_vllm_does_nothing() -> None:
    saved = forget_vllm()
    sys.modules["vllm"] = None  # type: ignore[assignment]  # makes `import vllm...` raise ImportError
    try:
        plugin.register()
    finally:
        del sys.modules["vllm"]
        sys.modules.update(saved)


# --- the contract of one call ---------------------------------------------------------------


@pytest.mark.parametrize("policy", ["migration_aware", "balanced", "deepseek"])
def test_output_contract_from_scratch_and_from_old(policy: str) -> None:
    _, cls = _policy({"EPLB_POLICY": policy})
    num_l, num_e, _, slots, _, _ = SHAPE
    first = _call(cls, _load(0))
    _assert_valid(first, num_l, num_e, slots)
    second = _call(cls, _load(1), first)
    _assert_valid(second, num_l, num_e, slots)


def test_migration_aware_moves_fewer_slots_than_vllm_default() -> None:
    mod, cls = _policy()
    old = mod.EPLB_POLICIES["default"].vllm_default.rebalance_experts(_load(0), 24, 4, 2, 4)
    drifted = torch.from_numpy(np.round(_load(0).numpy() * np.random.default_rng(9).lognormal(0, 0.05, (4, 16))))
    ours = _call(cls, drifted, old)
    theirs = cls.vllm_default.rebalance_experts(drifted, 24, 4, 2, 4, old)
    assert (ours != old).sum() < (theirs != old).sum()


def test_all_zero_load_keeps_the_placement_in_force() -> None:
    _, cls = _policy()
    old = _call(cls, _load(0))
    assert torch.equal(_call(cls, torch.zeros(4, 16, dtype=torch.int32), old), old)
    _assert_valid(_call(cls, torch.zeros(4, 16, dtype=torch.int32)), 4, 16, 24)


def test_elastic_scale_down_keeps_remaining_ranks_experts() -> None:
    _, cls = _policy()
    old = _call(cls, _load(0))  # 4 ranks x 6 slots
    out = _call(cls, _load(0), old, num_replicas=18, num_ranks=3, num_nodes=1)
    _assert_valid(out, 4, 16, 18)
    kept = (out == old[:, :18]).float().mean().item()
    fresh = (_call(cls, _load(0), None, num_replicas=18, num_ranks=3, num_nodes=1) == old[:, :18]).float().mean()
    assert kept > fresh.item() and kept >= 0.5


def test_elastic_scale_up_with_minus_one_entries() -> None:
    _, cls = _policy()
    old = _call(cls, _load(0))
    padded = torch.cat([old, torch.full((4, 6), -1, dtype=torch.int64)], dim=1)  # a 5th rank, empty
    out = _call(cls, _load(0), padded, num_replicas=30, num_ranks=5, num_nodes=1)
    _assert_valid(out, 4, 16, 30)
    assert (out[:, :24] == old).float().mean().item() >= 0.5
    _assert_valid(_call(cls, _load(0), old, num_replicas=30, num_ranks=5, num_nodes=1), 4, 16, 30)


@pytest.mark.parametrize(
    ("groups", "nodes", "ranks", "slots"),
    [(4, 3, 6, 24), (3, 2, 4, 24), (4, 3, 4, 24), (0, 1, 4, 24)],
    ids=["groups-not-dividing-nodes", "groups-not-dividing-experts", "ranks-not-dividing-nodes", "no-groups"],
)
def test_degenerate_configs_still_plan(groups: int, nodes: int, ranks: int, slots: int) -> None:
    _, cls = _policy()
    out = _call(cls, _load(0), None, num_groups=groups, num_nodes=nodes, num_ranks=ranks, num_replicas=slots)
    _assert_valid(out, 4, 16, slots)


def test_load_of_another_shape_plans_without_the_old_map() -> None:
    _, cls = _policy()
    old = _call(cls, _load(0))
    _assert_valid(_call(cls, _load(0)[:2], old), 2, 16, 24)  # fewer layers than the old map
    small = _load(0)[:, :12]  # fewer experts than the old map names
    _assert_valid(_call(cls, small, old, num_groups=4), 4, 12, 24)
    _assert_valid(_call(cls, _load(0)[0], None), 1, 16, 24)  # 1-D: one layer


@given(
    st.integers(0, 2**32 - 1),
    st.integers(1, 6),  # old ranks
    st.integers(1, 6),  # new ranks
    st.floats(0, 0.5),  # share of -1 entries
)
def test_seed_from_old_keeps_survivors_and_holds_every_expert(seed: int, old_r: int, new_r: int, holes: float) -> None:
    spr, num_e = 6, 8
    if new_r * spr < num_e:
        new_r = 2
    rng = np.random.default_rng(seed)
    old = rng.integers(0, num_e, (3, old_r * spr))
    old[rng.random(old.shape) < holes] = -1
    load = rng.random((3, num_e)) * 10
    seed_map = seed_from_old(old, load, new_r * spr)
    assert seed_map.shape == (3, new_r * spr)
    for row in seed_map:
        assert np.array_equal(np.unique(row), np.arange(num_e))
    width = min(old.shape[1], new_r * spr)
    survivors = old[:, :width] >= 0
    # A survivor is replaced only to give a slot to an expert that had none.
    lost = (seed_map[:, :width] != old[:, :width]) & survivors
    missing = [num_e - np.unique(r[r >= 0]).size for r in old[:, :width]]
    free = [(r < 0).sum() + new_r * spr - width for r in old[:, :width]]
    assert all(lost[i].sum() <= max(0, missing[i] - free[i]) for i in range(3))


@st.composite
def vllm_calls(draw: st.DrawFn) -> tuple[Any, ...]:
    """One ``rebalance_experts`` call: shape, counts and an old map in force, elastic or not."""
    num_l, num_e = draw(st.integers(1, 3)), draw(st.sampled_from([4, 6, 8]))
    ranks, nodes = draw(st.integers(1, 4)), draw(st.integers(1, 3))
    spr = draw(st.integers(-(-num_e // ranks), -(-num_e // ranks) + 2))
    groups = draw(st.sampled_from([0, 1, 2, 3, 4]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    weight = torch.from_numpy(rng.integers(0, draw(st.sampled_from([1, 5, 1000])), (num_l, num_e))).int()
    kind = draw(st.sampled_from(["none", "same", "narrower", "wider", "holes"]))
    width = {"narrower": max(1, ranks - 1) * spr, "wider": (ranks + 1) * spr}.get(kind, ranks * spr)
    old = None if kind == "none" else torch.from_numpy(rng.integers(0, num_e, (num_l, width)))
    if kind == "holes":
        old[torch.from_numpy(rng.random((num_l, width)) < 0.3)] = -1
    return weight, ranks * spr, groups, nodes, ranks, old


@given(vllm_calls())
def test_any_call_gives_a_valid_deterministic_map(call: tuple[Any, ...]) -> None:
    # plan_for_vllm raises where the policy class would fall back, so eplb itself must cope.
    out = plan_for_vllm(*call).physical_to_logical
    _assert_valid(torch.from_numpy(out), call[0].shape[0], call[0].shape[1], call[1])
    assert plan_for_vllm(*call).physical_to_logical.tobytes() == out.tobytes()


def test_same_input_gives_byte_identical_output_in_another_process() -> None:
    _, cls = _policy()
    old = _call(cls, _load(0))
    out = _call(cls, _load(1), old)
    assert _call(cls, _load(1), old).numpy().tobytes() == out.numpy().tobytes()
    code = (
        "import hashlib, numpy as np, torch;"
        "from eplb.integrations.vllm_plan import plan_for_vllm;"
        "from tests.test_vllm_plugin import _load;"
        "old = torch.from_numpy(plan_for_vllm(_load(0), 24, 4, 2, 4).physical_to_logical);"
        "print(hashlib.sha256(plan_for_vllm(_load(1), 24, 4, 2, 4, old).physical_to_logical.tobytes()).hexdigest())"
    )
    env = os.environ | {"PYTHONPATH": str(ROOT), "PYTHONHASHSEED": "123"}
    res = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, env=env, cwd=ROOT)
    assert res.stdout.strip() == hashlib.sha256(out.numpy().tobytes()).hexdigest()


# --- fallback, log line, dumps ----------------------------------------------------------------


def test_eplb_error_logs_one_warning_and_returns_vllm_default(caplog: pytest.LogCaptureFixture) -> None:
    _, cls = _policy({"EPLB_POLICY_OPTIONS": json.dumps({"no_such_option": 1})})
    with caplog.at_level(logging.INFO, logger="vllm.eplb_plugin"):
        out = _call(cls, _load(0))
    expected = cls.vllm_default.rebalance_experts(_load(0), 24, 4, 2, 4, None)
    assert torch.equal(out, expected)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "no_such_option" in warnings[0].getMessage() and "vLLM's default policy" in warnings[0].getMessage()


def test_impossible_input_falls_back(caplog: pytest.LogCaptureFixture) -> None:
    _, cls = _policy()
    with caplog.at_level(logging.WARNING, logger="vllm.eplb_plugin"), pytest.raises(Exception):  # noqa: B017, PT011
        _call(cls, _load(0), None, num_replicas=12, num_ranks=4)  # 12 slots for 16 experts: vLLM fails too
    assert len(caplog.records) == 1 and "every expert needs a slot" in caplog.records[0].getMessage()


def test_one_info_line_per_rebalance(caplog: pytest.LogCaptureFixture) -> None:
    _, cls = _policy()
    old = _call(cls, _load(0))
    with caplog.at_level(logging.INFO, logger="vllm.eplb_plugin"):
        _call(cls, _load(1), old)
    (record,) = caplog.records
    assert record.levelno == logging.INFO
    assert re.fullmatch(
        r"eplb rebalance: policy=migration_aware balancedness 0\.\d{4} -> [01]\.\d{4} on the window, "
        r"\d+/96 slots need new weights, planning \d+\.\d ms",
        record.getMessage(),
    )


def test_dump_dir_gets_ir_json_matching_the_output(tmp_path: Path) -> None:
    _, cls = _policy({"EPLB_DUMP_DIR": str(tmp_path)})
    old = _call(cls, _load(0))
    out = _call(cls, _load(1), old)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == [
        "rebalance-0001.target.json",
        "rebalance-0002.current.json",
        "rebalance-0002.plan.json",
        "rebalance-0002.target.json",
    ]
    assert loads((tmp_path / "rebalance-0002.target.json").read_text()).to_numpy().tolist() == out.tolist()
    assert loads((tmp_path / "rebalance-0002.current.json").read_text()).to_numpy().tolist() == old.tolist()
    plan = loads((tmp_path / "rebalance-0002.plan.json").read_text())
    assert type(plan).__name__ == "MigrationPlan"


def test_plan_for_vllm_reports_what_it_did() -> None:
    old = plan_for_vllm(_load(0), 24, 4, 2, 4).physical_to_logical
    plan = plan_for_vllm(_load(1), 24, 4, 2, 4, torch.from_numpy(old))
    assert plan.current is not None and plan.balancedness_before is not None
    assert plan.slots_changed == int((plan.physical_to_logical != old).sum()) and plan.num_slots == 96


# --- vLLM's real code -------------------------------------------------------------------------


@pytest.fixture
def no_vllm_leftovers() -> Any:
    saved = forget_vllm()
    yield
    forget_vllm()
    sys.modules.update(saved)


def _entry_point_dir(tmp_path: Path) -> Path:
    """A dist-info folder declaring eplb's entry point, as `pip install eplb` does."""
    info = tmp_path / "eplb_plugin_probe-0.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: eplb-plugin-probe\nVersion: 0.0\n")
    (info / "entry_points.txt").write_text("[vllm.general_plugins]\neplb = eplb.integrations.vllm:register\n")
    return tmp_path


def _check_plugin_loading(vllm_plugins: Any, policies: dict[str, type]) -> None:
    vllm_plugins.load_general_plugins()
    first = policies["default"]
    assert getattr(first, "is_eplb_plugin", False), first
    vllm_plugins.plugins_loaded = False  # vLLM may load plugins more than once
    vllm_plugins.load_general_plugins()
    assert policies["default"] is first


def test_with_installed_vllm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    vllm_policy = pytest.importorskip("vllm.distributed.eplb.policy")
    import vllm.plugins as vllm_plugins

    if "eplb" not in {e.name for e in importlib.metadata.entry_points(group="vllm.general_plugins")}:
        monkeypatch.syspath_prepend(str(_entry_point_dir(tmp_path)))
    monkeypatch.setitem(vllm_policy.EPLB_POLICIES, "default", vllm_policy.DefaultEplbPolicy)
    _check_plugin_loading(vllm_plugins, vllm_policy.EPLB_POLICIES)


def test_with_vllm_source_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_vllm_leftovers: Any) -> None:
    src = os.environ.get("EPLB_VLLM_SRC")
    vllm = load_vllm_source(src) if src else None
    if vllm is None:
        pytest.skip("set EPLB_VLLM_SRC to a folder holding vLLM's source (vllm/distributed/eplb/policy/...)")
    monkeypatch.syspath_prepend(str(_entry_point_dir(tmp_path)))
    default = vllm.policy.EPLB_POLICIES["default"]
    _check_plugin_loading(vllm.plugins, vllm.policy.EPLB_POLICIES)
    cls = vllm.policy.EPLB_POLICIES["default"]
    assert issubclass(cls, vllm.policy.AbstractEplbPolicy) and cls.vllm_default is default
    # rearrange's call: (window on CPU, num_replicas, num_groups, num_nodes, num_gpus, old map on CPU)
    old = default.rebalance_experts(_load(0), 24, 4, 2, 4)
    out = cls.rebalance_experts(_load(1), 24, 4, 2, 4, old)
    _assert_valid(out, 4, 16, 24)
    # Elastic, as vLLM hands them over: scale-down passes the old, wider map (the first ranks
    # stay); scale-up passes the new width with the new ranks' slots at -1.
    _assert_valid(cls.rebalance_experts(_load(1), 18, 4, 1, 3, old), 4, 16, 18)
    padded = torch.cat([old, torch.full((4, 6), -1, dtype=torch.int64)], dim=1)
    _assert_valid(cls.rebalance_experts(_load(1), 30, 4, 1, 5, padded), 4, 16, 30)
    # An error inside eplb gives vLLM's real default plan.
    monkeypatch.setattr(plugin, "plan_for_vllm", _raise)
    assert torch.equal(cls.rebalance_experts(_load(1), 24, 4, 2, 4, old), default.rebalance_experts(_load(1), 24, 4, 2, 4, old))


def _raise(*args: Any, **kwargs: Any) -> Any:
    raise RuntimeError("forced failure")
