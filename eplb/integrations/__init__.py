"""Engine integrations: eplb planning inside an engine's own load balancer, with no engine patch.

`eplb.integrations.vllm` is vLLM's EPLB policy plugin (entry point group
``vllm.general_plugins``). Importing this package imports no engine; each integration imports
its engine only when the engine calls it.
"""

__all__: list[str] = []
