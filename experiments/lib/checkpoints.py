"""Orbax checkpoints of a run: the TrainState, the data step and a fingerprint.

Layout: WORKDIR/checkpoints/<step>/{state, meta}; saved asynchronously (the training
continues while the files are written). `state` is the `ilbp.TrainState` in the
single-program layout, whichever executor trained it (`trainer.checkpointed_state`: in
a multi-process spmd job spread over the devices, each process writing its shards),
`meta` a small JSON: the data iterator's step and
the run's *fingerprint* (every config field that changes the training trajectory; see
`experiments.lib.trainer.fingerprint`). A run resumes from the latest checkpoint in its
workdir only if the fingerprints agree; otherwise it stops with a message naming each
differing field with both values, before touching any file.
"""

from __future__ import annotations

import os
import sys
import tempfile
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

CHECKPOINT_DIR = "checkpoints"


class ExperimentError(Exception):
    """A run cannot start or continue; the message says why and what to do."""


class WorkdirError(ExperimentError):
    """The workdir cannot be created or written."""


class IncompatibleCheckpointError(ExperimentError):
    """The workdir's checkpoint was trained with other settings (model, K, strategy,
    optimizer, data, ...): resuming it under this config would splice two runs."""


class CorruptCheckpointError(ExperimentError):
    """A checkpoint exists but cannot be read."""


class NonFiniteLossError(ExperimentError, FloatingPointError):
    """A loss became NaN or infinite; the message names the step and stage."""


def prepare_workdir(workdir: str) -> str:
    """Creates `workdir` if needed and checks that it is writable; returns its abspath."""
    workdir = os.path.abspath(os.path.expanduser(workdir))
    try:
        os.makedirs(workdir, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=workdir, prefix=".write_probe"):
            pass
    except OSError as e:
        raise WorkdirError(
            f"Cannot write to --workdir={workdir}: {e.strerror or e}. Choose a writable directory."
        ) from e
    return workdir


def restore_target(like: Any) -> Any:
    """What Orbax restores `like`'s leaves as: arrays shaped and placed like its device
    arrays, and numpy for its host ones, whatever devices the checkpoint was written
    from (a multi-process job's spread arrays name devices a restore may not have)."""
    keep_host = lambda x: x if isinstance(x, np.ndarray) else ocp.utils.to_shape_dtype_struct(x)
    return jax.tree.map(keep_host, like)


# Why a field is part of the fingerprint, where that is not obvious.
_WHY = {
    "num_train_steps": (
        " (the cosine schedule decays the learning rate to 0 at num_train_steps, so it "
        "sets every step's rate; a constant schedule can be extended)"
    ),
}


def fingerprint_diff(
    saved: dict[str, Any], wanted: dict[str, Any], holder: str = "checkpoint"
) -> tuple[list[str], list[str]]:
    """(each difference between a checkpoint's fingerprint (or another `holder`'s) and
    the config's, naming the field and both values; the fields it does not record).

    A checkpoint written before a field was recorded is not refused for it: the field
    is listed as unchecked instead.
    """
    diffs, unrecorded = [], []
    for key in wanted:
        if key not in saved:
            unrecorded.append(key)
            continue
        a, b = saved[key], wanted[key]
        if a == b:
            continue
        if key == "num_stages":
            diffs.append(f"{holder} has K={a} stages, config asks for K={b}")
        elif isinstance(a, dict) and isinstance(b, dict):
            for sub in sorted(set(a) | set(b)):
                if a.get(sub) != b.get(sub):
                    old, new = a.get(sub), b.get(sub)
                    diffs.append(f"{key}.{sub}: {holder} has {old!r}, config asks for {new!r}")
        else:
            diffs.append(f"{key}: {holder} has {a!r}, config asks for {b!r}{_WHY.get(key, '')}")
    return diffs, unrecorded


class Checkpoints:
    """The run's checkpoint directory (an `ocp.CheckpointManager` with a fingerprint)."""

    def __init__(self, workdir: str, fingerprint: dict[str, Any], max_to_keep: int = 2):
        self.directory = os.path.join(workdir, CHECKPOINT_DIR)
        self.fingerprint = fingerprint
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, create=True, enable_async_checkpointing=True
        )
        try:
            self.manager = ocp.CheckpointManager(self.directory, options=options)
        except OSError as e:
            raise WorkdirError(f"Cannot open checkpoint directory {self.directory}: {e}") from e

    def latest_step(self) -> int | None:
        """The latest finished checkpoint's step (waits for a save in progress)."""
        self.wait()
        return self.manager.latest_step()

    def wait(self) -> None:
        """Waits until the saves in progress are written."""
        self.manager.wait_until_finished()

    def read_meta(self, step: int) -> dict[str, Any]:
        """The metadata JSON of checkpoint `step` (CorruptCheckpointError if unreadable)."""
        try:
            restored = self.manager.restore(
                step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())
            )
            meta = dict(restored["meta"])
            if "fingerprint" not in meta:
                raise KeyError("metadata has no fingerprint")
        except Exception as e:
            raise self._corrupt(step, e) from e
        return meta

    def check_compatible(self, step: int) -> dict[str, Any]:
        """Reads checkpoint `step`'s metadata; raises IncompatibleCheckpointError if it
        belongs to a different run shape. Returns the metadata."""
        meta = self.read_meta(step)
        diffs, unrecorded = fingerprint_diff(meta["fingerprint"], self.fingerprint)
        if diffs:
            raise IncompatibleCheckpointError(
                f"Refusing to resume from {self.directory} (step {step}): the config "
                "changes how this run trains: "
                + "; ".join(diffs)
                + ". Resume with the checkpoint's values, or use a new --workdir to start "
                "fresh; nothing was changed."
            )
        if unrecorded:
            print(
                f"Note: checkpoint {step} in {self.directory} predates these checks and does "
                f"not record {', '.join(unrecorded)}; resuming without checking them.",
                file=sys.stderr,
            )
        return meta

    def restore(self, step: int, like: Any) -> tuple[Any, dict[str, Any]]:
        """(TrainState shaped and placed like `like`, metadata) of checkpoint `step`."""
        self.wait()
        meta = self.check_compatible(step)
        abstract = restore_target(like)
        try:
            restored = self.manager.restore(
                step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract))
            )
        except Exception as e:
            raise self._corrupt(step, e) from e
        return restored["state"], meta

    def save(self, step: int, train_state: Any, data_step: int) -> None:
        """Starts saving checkpoint `step` (a no-op if it already exists): returns once the
        arrays are copied to the host, and writes them in the background (`wait`)."""
        if step in self.manager.all_steps():
            return
        meta = {"fingerprint": self.fingerprint, "data_step": int(data_step), "step": int(step)}
        self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(train_state), meta=ocp.args.JsonSave(meta)
            ),
            force=True,
        )

    def close(self) -> None:
        self.wait()
        self.manager.close()

    def _corrupt(self, step: int, error: Exception) -> CorruptCheckpointError:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
        return CorruptCheckpointError(
            f"Checkpoint {os.path.join(self.directory, str(step))} cannot be read "
            f"({type(error).__name__}: {first_line[:300]}). It may be corrupt or incomplete; "
            "the files were left as they are. Move that step directory away to resume from "
            "an earlier checkpoint, or use a new --workdir."
        )
