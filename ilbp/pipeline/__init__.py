"""Pipelined executors of interlocking backprop (DESIGN.md §3).

`make_executor(kind, model, strategy, optimizer, microbatches=M, mesh=..., devices=...)`
with kind "simulated" (single program), "mpmd" (per-stage jits on per-stage devices)
or "spmd" (stacked homogeneous stages in one shard_map over mesh axis `stage`).
"""

from ilbp.pipeline.executor import EXECUTORS, Executor, SimulatedExecutor, make_executor
from ilbp.pipeline.mpmd import MPMDExecutor, MPMDState

__all__ = [
    "EXECUTORS",
    "Executor",
    "MPMDExecutor",
    "MPMDState",
    "SimulatedExecutor",
    "make_executor",
]
