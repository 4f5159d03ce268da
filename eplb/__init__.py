"""eplb: an expert-parallelism load balancer for MoE inference.

``eplb.ir`` (plan types) <- ``eplb.planner`` (pure policies, compiler, scheduler, verifier)
<- ``eplb.executors`` (torch transports) <- ``eplb.runtime`` (engine state); ``eplb.cli`` on top.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
