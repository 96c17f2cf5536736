"""Config -> the compiled program of a run: model, executor, eval step and mesh.

`build(config, info)` returns a `Built`: the staged model, its executor (a train-state
holder with `init`, `step`, `steps`, `to_train_state` and `from_train_state`, from
`ilbp.pipeline.make_executor`), the eval step and the mesh; `initial_state` the
executor's first state. Both look in a `ProgramCache` first, by default the process's
`PROGRAMS`: several runs in one process (seeds in `experiments.compare`, tests) share one
compilation per `ProgramKey`, and, in a single-process job, one initial state per
`InitKey`. `PROGRAMS.clear()` forgets them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Hashable, Mapping
from typing import Any

import jax
import ml_collections

import ilbp
from experiments.configs.validation import mesh_rows
from experiments.lib.models import build_model, build_strategy, model_fields
from experiments.lib.optim import build_optimizer, schedule_steps
from ilbp import data
from ilbp.pipeline import make_executor
from ilbp.stage import StagedModel


def frozen(value: Any) -> Hashable:
    """`value` (JSON-like: dicts, lists, scalars) as nested tuples, dicts as sorted
    (key, value) pairs: hashable, and equal exactly when the values are."""
    if isinstance(value, Mapping):
        return tuple(sorted((key, frozen(v)) for key, v in value.items()))
    if isinstance(value, list | tuple):
        return tuple(frozen(v) for v in value)
    return value


@dataclasses.dataclass(frozen=True)
class ProgramKey:
    """The config fields that change the compiled train and eval programs (not, e.g.,
    the seed or the run's cadences)."""

    strategy: str
    combine: str
    num_stages: int
    aux_weight: float
    executor: str
    microbatches: int
    max_in_flight: int
    data_parallel: int
    model: Hashable  # `model_fields`, frozen: the architecture and what the data fixes
    optimizer: Hashable  # config.optimizer, frozen
    schedule_steps: int | None  # the num_train_steps the schedule depends on


@dataclasses.dataclass(frozen=True)
class InitKey:
    """What an executor's initial state depends on; not the strategy (the init
    program ignores it), so strategies of one model and seed share it."""

    model: Hashable  # `Built.model_key`
    optimizer: Hashable
    schedule_steps: int | None
    seed: int
    batch: tuple[tuple[str, tuple[int, ...], str], ...]  # (input, shape, dtype), sorted
    data_parallel: int


@dataclasses.dataclass
class Built:
    """Everything compiled for one program: model, executor and eval step."""

    model: StagedModel
    model_key: Hashable  # the architecture and its cuts, frozen
    strategy: ilbp.Strategy
    executor: Any
    eval_step: Callable
    mesh: jax.sharding.Mesh | None  # of eval_step (and of the executor, if it takes one)


class ProgramCache:
    """Built programs by `ProgramKey`, and host copies of initial states by `InitKey`."""

    def __init__(self) -> None:
        self.programs: dict[ProgramKey, Built] = {}
        # Host TrainStates: the init program is jitted afresh on every call.
        self.initial_states: dict[InitKey, Any] = {}

    def clear(self) -> None:
        """Forgets every program and state: the next `build` compiles afresh."""
        self.programs.clear()
        self.initial_states.clear()


# The process's cache: what `build` and `initial_state` use unless given another.
PROGRAMS = ProgramCache()


def program_key(config: ml_collections.ConfigDict, info: data.DatasetInfo) -> ProgramKey:
    """The config fields that change the compiled train/eval programs."""
    return ProgramKey(
        strategy=config.strategy,
        combine=config.combine,
        num_stages=config.num_stages,
        aux_weight=config.aux_weight,
        executor=config.executor,
        microbatches=config.microbatches,
        max_in_flight=config.max_in_flight,
        data_parallel=config.data_parallel,
        model=frozen(model_fields(config, info)),
        optimizer=frozen(config.optimizer.to_dict()),
        schedule_steps=schedule_steps(config),
    )


def build_mesh(config: ml_collections.ConfigDict) -> jax.sharding.Mesh | None:
    """The (stage, data) mesh for `config.data_parallel` > 1 or a multi-process job,
    else None (one device; the pipelined executors then pick theirs).

    The pipelined executors put stage k on row k, so their mesh has K rows; the
    single-program executor replicates every stage over a one-row mesh.
    """
    data_parallel = int(config.data_parallel)
    if data_parallel <= 1 and jax.process_count() == 1:
        return None
    return ilbp.make_mesh(data=data_parallel, stage=mesh_rows(config))


def build(
    config: ml_collections.ConfigDict,
    info: data.DatasetInfo,
    cache: ProgramCache | None = None,
) -> Built:
    """Model, executor and eval step for `config`, from `cache` (default `PROGRAMS`)
    when its `program_key` is there."""
    programs = (PROGRAMS if cache is None else cache).programs
    key = program_key(config, info)
    if key not in programs:
        programs[key] = _compile(config, info)
    return programs[key]


def _compile(config: ml_collections.ConfigDict, info: data.DatasetInfo) -> Built:
    model = build_model(config, info)
    strategy = build_strategy(config)
    mesh = build_mesh(config)
    executor = make_executor(
        config.executor,
        model,
        strategy,
        build_optimizer(config),
        microbatches=int(config.microbatches),
        mesh=mesh,
        max_in_flight=int(config.max_in_flight) or "window",
    )
    # The stages' names say where the cuts are (balance="work" moves them per strategy).
    cuts = [stage.name for stage in model.stages]
    model_key = frozen([model_fields(config, info), cuts])
    eval_step = ilbp.make_eval_step(model, mesh=mesh)
    return Built(model, model_key, strategy, executor, eval_step, mesh)


def initial_state(
    built: Built,
    config: ml_collections.ConfigDict,
    batch: dict,
    cache: ProgramCache | None = None,
) -> Any:
    """`executor.init(PRNGKey(seed), batch)`, reusing a host copy from an earlier run of
    the same model, optimizer and seed in `cache` (default `PROGRAMS`; bitwise the same
    state); not across processes, where a host copy would not be placed on the global
    mesh."""
    states = (PROGRAMS if cache is None else cache).initial_states
    key = InitKey(
        model=built.model_key,
        optimizer=frozen(config.optimizer.to_dict()),
        schedule_steps=schedule_steps(config),
        seed=int(config.seed),
        batch=tuple(sorted((k, tuple(v.shape), str(v.dtype)) for k, v in batch.items())),
        data_parallel=int(config.data_parallel),
    )
    ex = built.executor
    if key not in states:
        state = ex.init(jax.random.PRNGKey(int(config.seed)), batch)
        if jax.process_count() == 1:
            states[key] = jax.device_get(ex.to_train_state(state))
        return state
    return ex.from_train_state(jax.device_put(states[key]))
