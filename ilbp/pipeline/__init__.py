"""Pipelined executors of interlocking backprop (docs/design.md §3).

`make_executor(kind, model, strategy, optimizer, microbatches=M, mesh=..., devices=...)`
with kind "simulated" (single program), "mpmd" (per-stage jits on per-stage devices)
or "spmd" (stacked homogeneous stages in one shard_map over mesh axis `stage`: a model
that carries a `HomogeneousStages` description, as `transformer_lm`'s do, checked by
`check_homogeneous`).
"""

from ilbp.pipeline.executor import EXECUTORS, Executor, SimulatedExecutor, make_executor
from ilbp.pipeline.homogeneous import HomogeneousStages, check_homogeneous
from ilbp.pipeline.mpmd import MPMDExecutor, MPMDState
from ilbp.pipeline.spmd import SPMDExecutor, SPMDState

__all__ = [
    "EXECUTORS",
    "Executor",
    "HomogeneousStages",
    "MPMDExecutor",
    "MPMDState",
    "SPMDExecutor",
    "SPMDState",
    "SimulatedExecutor",
    "check_homogeneous",
    "make_executor",
]
