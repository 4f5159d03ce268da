"""Tier 2: a rank that raises, exits or hangs during a rearrangement, seen through `EplbState`.

Every surviving rank must end with `RearrangementError` (none reports success) within twice the
executor's timeout plus a margin (the executor's wait, then the vote's), every layer settled
(no PENDING, ``rearranging`` False, ``needs_new_group`` True), wholly old or wholly new, its
weights those its maps name, the maps the same on every survivor; and after ``set_group`` with
new groups the next rearrangement succeeds (where every rank is still alive).
"""

from __future__ import annotations

import time
from typing import Any

import pytest
import torch
import torch.distributed as dist

from tests.multiproc import run_on_ranks

pytestmark = pytest.mark.multiprocess

TIMEOUT_S = 1.0  # the executor's Config.timeout_s
MARGIN_S = 1.5  # for a loaded 2-core box
TOKENS = 24

#: (mode, layers_per_chunk, on_run): blocking one chunk, blocking several chunks with the fault
#: in the second, incremental one layer per step with the fault in the second.
MODES = {
    "blocking-one": (False, None, 1),
    "blocking-several": (False, 1, 2),
    "incremental": (True, None, 2),
}


def _case(rank: int, nprocs: int, mode: str, kind: str, fault_rank: int) -> dict[str, Any]:
    from eplb.executors.base import Executor
    from eplb.executors.select import select_executor
    from eplb.ir.topology import Topology
    from eplb.runtime import EplbState, RearrangementError, RuntimeConfig
    from examples.moe_ep import ExpertParallelMoE, MoEConfig, logical_weights
    from tests.runtime_faults import Fault, arm_fault

    incremental, per_chunk, on_run = MODES[mode]
    # Fewer logical experts than slots: the policy replicates the hot ones, so layers change.
    slots = 4 if nprocs == 2 else 2
    cfg = MoEConfig(num_layers=4, num_experts=6, slots_per_rank=slots, skew=3.0, seed=2)
    topology = Topology.uniform(nprocs, cfg.slots_per_rank)
    executor = select_executor(topology, None, device_type="cpu", config=Executor.Config(timeout_s=TIMEOUT_S))
    fault = arm_fault(executor, Fault(kind=kind, rank=fault_rank, on_run=on_run, sleep_s=1.5 * TIMEOUT_S), rank)
    config = RuntimeConfig(
        window_size=4, step_interval=10**6, executor=executor, layers_per_chunk=per_chunk, incremental=incremental
    )
    model = ExpertParallelMoE(cfg, rank=rank, num_ranks=nprocs, group=dist.group.WORLD)
    state = EplbState.build(model, group=dist.new_group(backend="gloo"), config=config)
    g = torch.Generator().manual_seed(7 + rank)
    for _ in range(4):
        model(torch.randn(TOKENS, cfg.hidden, generator=g, dtype=cfg.dtype))
        state.step()
    old = [list(p) for p in state.placement.physical_to_logical]
    fault.armed = True
    t0 = time.monotonic()
    raised = None
    try:
        state.rearrange()
        while state.rearranging:
            state.step()
    except RearrangementError as exc:
        raised = str(exc)
    except Exception as exc:
        raised = f"NOT RearrangementError: {type(exc).__name__}: {exc}"
    seconds = time.monotonic() - t0
    fault.armed = False
    w = logical_weights(cfg)
    start = rank * cfg.slots_per_rank
    p2l = state.physical_to_logical_map.tolist()
    weights_match = all(
        torch.equal(state.model.expert_weights[layer][0], w["w1"][layer][p2l[layer][start : start + cfg.slots_per_rank]])
        and torch.equal(
            state.model.expert_weights[layer][1], w["w2"][layer][p2l[layer][start : start + cfg.slots_per_rank]]
        )
        for layer in range(cfg.num_layers)
    )
    out: dict[str, Any] = {
        "raised": raised,
        "seconds": seconds,
        "fired": fault.fired,
        "statuses": [s.value for s in state.layer_status()],
        "rearranging": state.rearranging,
        "needs_new_group": state.needs_new_group,
        "old": old,
        "maps": p2l,
        "maps_match_placement": p2l == [list(p) for p in state.placement.physical_to_logical],
        "weights_match": weights_match,
        "retry": None,
    }
    if kind != "exit":  # every rank is alive: new groups, and the next rearrangement succeeds
        state.set_group(dist.new_group(backend="gloo"))
        rep = state.rearrange()
        while state.rearranging:
            state.step()
        out["retry"] = {"done": rep.done, "error": rep.error, "statuses": [s.value for s in state.layer_status()]}
    return out


def _check(results: list[Any], kind: str, fault_rank: int) -> None:
    survivors = [r for r in results if not (kind == "exit" and r.rank == fault_rank)]
    for r in survivors:
        assert r.ok, f"rank {r.rank}: {r.error}\n{r.trace}"
    values = [r.value for r in survivors]
    for rank, v in zip((r.rank for r in survivors), values, strict=True):
        assert v["raised"] is not None and not v["raised"].startswith("NOT"), (rank, v["raised"])
        assert v["seconds"] < 2 * TIMEOUT_S + MARGIN_S + (1.5 * TIMEOUT_S if rank == fault_rank else 0), (rank, v)
        assert "pending" not in v["statuses"] and "corrupt" not in v["statuses"], (rank, v["statuses"])
        assert not v["rearranging"] and v["needs_new_group"], (rank, v)
        assert v["maps_match_placement"] and v["weights_match"], (rank, v)
        for layer, status in enumerate(v["statuses"]):
            if status != "migrated":  # not moved: wholly old
                assert v["maps"][layer] == v["old"][layer], (rank, layer, status)
            else:
                assert v["maps"][layer] != v["old"][layer], (rank, layer, status)
    assert all(v["maps"] == values[0]["maps"] and v["statuses"] == values[0]["statuses"] for v in values)
    assert any(v["fired"] for v in values) or kind == "exit"
    for v in values:
        if v["retry"] is not None:
            assert v["retry"]["done"] and v["retry"]["error"] is None, v["retry"]
            assert set(v["retry"]["statuses"]) <= {"stable", "migrated"}, v["retry"]


def _run(nprocs: int, mode: str, kind: str, fault_rank: int) -> list[Any]:
    return run_on_ranks(_case, nprocs, mode, kind, fault_rank, timeout_s=90.0, pg_timeout_s=20)


@pytest.mark.parametrize("mode", sorted(MODES))
@pytest.mark.parametrize("kind", ["raise", "raise_after", "exit", "sleep"])
def test_two_ranks_one_fails_every_survivor_raises_and_rolls_back(mode: str, kind: str) -> None:
    _check(_run(2, mode, kind, fault_rank=1), kind, fault_rank=1)


@pytest.mark.parametrize("kind", ["raise", "exit"])
def test_four_ranks_one_fails_every_survivor_raises_and_rolls_back(kind: str) -> None:
    _check(_run(4, "blocking-several", kind, fault_rank=2), kind, fault_rank=2)
