"""The executor interface, `make_executor`, and the single-program ("simulated") executor.

An executor runs training steps of one (model, strategy, optimizer) on some devices:

    ex = make_executor("mpmd", model, strategy, optimizer, microbatches=4)
    state = ex.init(rng, batch)
    state, metrics = ex.step(state, batch)
    state, metrics = ex.steps(state, batches)   # T steps, batches stacked T × B × ...
    ts = ex.to_train_state(state)        # single-program TrainState (checkpoints, eval;
                                         # mpmd, spmd: on the host, each stage fetched)
    state = ex.from_train_state(ts)      # and back

Kinds (docs/design.md §3):
  "simulated": every stage in one `jax.jit` (`ilbp.make_train_step`), data parallel over
               the mesh axis `data`; its state is the TrainState itself.
  "mpmd":      stage k's state and ops on device (group) k, jitted per stage and issued
               in schedule order (`ilbp.pipeline.mpmd`): heterogeneous stages (ResNets).
  "spmd":      homogeneous stages stacked and sharded over mesh axis `stage`, one
               `shard_map` program (`ilbp.pipeline.spmd`): the Transformer's blocks.

All three compute what the single-program step computes: the same parameters after any
number of steps, up to float reassociation. `steps` runs T steps in one call: "spmd" in
one program that overlaps them (a `step` drains its pipeline), the others as T `step`
calls issued back to back (their steps overlap anyway). Steps donate the state they are
given where the executor can (mpmd, spmd): use the returned state.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import jax

from ilbp.checks import check_microbatches
from ilbp.engine import Metrics
from ilbp.pipeline.mpmd import MPMDExecutor
from ilbp.pipeline.spmd import SPMDExecutor
from ilbp.schedule import MaxInFlight
from ilbp.stage import Batch, StagedModel
from ilbp.strategy import Strategy
from ilbp.train import Optimizer, TrainState, init_train_state, make_train_step, run_steps

EXECUTORS: tuple[str, ...] = ("simulated", "mpmd", "spmd")


class Executor(Protocol):
    """What every executor offers; its state is executor-specific and already placed."""

    def init(self, rng: jax.Array, batch: Batch) -> Any: ...

    def step(self, state: Any, batch: Batch) -> tuple[Any, Metrics]: ...

    def steps(self, state: Any, batches: Batch) -> tuple[Any, Metrics]: ...

    def to_train_state(self, state: Any) -> TrainState: ...

    def from_train_state(self, ts: TrainState) -> Any: ...


class SimulatedExecutor:
    """The single-program step (all stages in one jit) behind the Executor interface."""

    def __init__(
        self,
        model: StagedModel,
        strategy: Strategy,
        optimizer: Optimizer,
        *,
        microbatches: int = 1,
        mesh: jax.sharding.Mesh | None = None,
    ):
        check_microbatches(microbatches)
        self.model, self.optimizer, self.mesh = model, optimizer, mesh
        self._step = make_train_step(
            model, strategy, optimizer, mesh=mesh, microbatches=microbatches, donate=False
        )

    def init(self, rng: jax.Array, batch: Batch) -> TrainState:
        return init_train_state(self.model, self.optimizer, rng, batch, mesh=self.mesh)

    def step(self, state: TrainState, batch: Batch) -> tuple[TrainState, Metrics]:
        return self._step(state, batch)

    def steps(self, state: TrainState, batches: Batch) -> tuple[TrainState, Metrics]:
        return run_steps(self._step, state, batches)

    def to_train_state(self, state: TrainState) -> TrainState:
        return state

    def from_train_state(self, ts: TrainState) -> TrainState:
        return ts


def make_executor(
    kind: str,
    model: StagedModel,
    strategy: Strategy | str,
    optimizer: Optimizer,
    *,
    microbatches: int = 1,
    mesh: jax.sharding.Mesh | None = None,
    devices: Sequence[Any] | None = None,
    max_in_flight: MaxInFlight = "window",
) -> Executor:
    """An executor of `kind` ("simulated", "mpmd" or "spmd"); see the module docstring.

    Args:
      model: the staged model (for "spmd", one that carries a `HomogeneousStages`, as
        `transformer_lm`'s do; `ilbp.pipeline.check_homogeneous` says what it refuses).
      strategy: a Strategy or a name `Strategy.parse` accepts.
      optimizer: one optax transformation for every stage, or one per stage ("spmd":
        whose states have one structure, as it stacks them).
      microbatches: M ≥ 1: a step accumulates M microbatches' gradients, updates once.
      mesh: "simulated": optional data mesh; "mpmd": optional (stage, data) mesh whose
        row k is stage k's device group; "spmd": a mesh with axes `stage` (= K) and
        `data` (default: `ilbp.make_mesh(stage=K)`).
      devices: "mpmd" only: K devices (or K device groups), default the first K.
      max_in_flight: "mpmd" only: the most microbatches whose residuals a stage holds
        (issue order as `ilbp.schedule.simulate(max_in_flight=...)` schedules it):
        "window" (min(n, K - k) for stage k), an int, one int per stage, or None (no
        cap). More lets the stages overlap more at the cost of memory.
    """
    if isinstance(strategy, str):
        strategy = Strategy.parse(strategy)
    if max_in_flight != "window" and kind != "mpmd":
        raise ValueError(f"max_in_flight is an option of the mpmd executor, not of {kind!r}.")
    if kind == "simulated":
        return SimulatedExecutor(model, strategy, optimizer, microbatches=microbatches, mesh=mesh)
    if kind == "mpmd":
        return MPMDExecutor(
            model,
            strategy,
            optimizer,
            microbatches=microbatches,
            mesh=mesh,
            devices=devices,
            max_in_flight=max_in_flight,
        )
    if kind == "spmd":
        if devices is not None:
            raise ValueError("The spmd executor takes a `mesh`, not `devices`.")
        return SPMDExecutor(model, strategy, optimizer, microbatches=microbatches, mesh=mesh)
    raise ValueError(f"Unknown executor {kind!r}; choose one of {EXECUTORS}.")
