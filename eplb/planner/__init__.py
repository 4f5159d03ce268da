"""Pure planning functions: policies (load -> target placement), compile (two placements ->
migration plan), schedule (plan -> rounds), verify (proof or PlanError), cost (predicted time).

Nothing here imports torch or mutates its inputs, so N ranks can be simulated in one process.
"""
