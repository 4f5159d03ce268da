"""The runtime state an inference engine holds: load recording, rearrangement, routing maps.

`EplbState` (build, step, rearrange, profile) descends from vLLM's ``EplbState``; `MoEModel` is
what it needs from the model; `route` / `record_load` turn logical top-k ids into physical slots.
No engine imports: vLLM, SGLang or a test model plug in through `MoEModel`.
"""

from eplb.runtime.model import EplbAwareModel, MoEModel, check_model, expert_bytes
from eplb.runtime.routing import record_load, route, route_and_record
from eplb.runtime.state import (
    EplbState,
    LayerStatus,
    RearrangementError,
    RearrangeReport,
    RuntimeConfig,
)

__all__ = [
    "EplbAwareModel",
    "EplbState",
    "LayerStatus",
    "MoEModel",
    "RearrangeReport",
    "RearrangementError",
    "RuntimeConfig",
    "check_model",
    "expert_bytes",
    "record_load",
    "route",
    "route_and_record",
]
