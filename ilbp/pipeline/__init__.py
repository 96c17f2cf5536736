"""Pipelined executors of interlocking backprop (DESIGN.md §3).

`make_executor(kind, model, strategy, optimizer, microbatches=M, mesh=..., devices=...)`
with kind "simulated" (single program), "mpmd" (per-stage jits on per-stage devices)
or "spmd" (stacked homogeneous stages in one shard_map over mesh axis `stage`; the model
is described by `HomogeneousStages`, which `transformer_stages` derives from a
`transformer_lm` StagedModel).
"""

from ilbp.pipeline.executor import EXECUTORS, Executor, SimulatedExecutor, make_executor
from ilbp.pipeline.homogeneous import HomogeneousStages, transformer_stages
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
    "make_executor",
    "transformer_stages",
]
