"""Bad input fails early with a clear message and leaves existing files untouched."""

from __future__ import annotations

import math
import os

import pytest

from experiments.lib import checkpoints, trainer
from ilbp.data import DataMissingError
from tests import experiments_fixtures as fx


@pytest.fixture(scope="module")
def idx_dir(tmp_path_factory):
    return fx.write_idx_dir(str(tmp_path_factory.mktemp("idx")))


@pytest.fixture(scope="module")
def trained(idx_dir, tmp_path_factory):
    """A finished 2-step K=3 run (the same program as the trainer tests)."""
    workdir = str(tmp_path_factory.mktemp("trained"))
    trainer.train_and_evaluate(fx.tiny_image_config(f"idx:{idx_dir}", "pairwise,k=3"), workdir)
    return workdir


def test_unknown_strategy_fails_before_creating_the_workdir(idx_dir, tmp_path):
    c = fx.tiny_image_config(f"idx:{idx_dir}")
    c.strategy = "fivewise"
    with pytest.raises(ValueError, match="Unknown strategy 'fivewise:last'"):
        trainer.train_and_evaluate(c, str(tmp_path / "new"))
    assert not (tmp_path / "new").exists()


def test_missing_dataset_directory(tmp_path):
    c = fx.tiny_image_config(f"idx:{tmp_path / 'nowhere'}")
    with pytest.raises(DataMissingError, match="No IDX train split in"):
        trainer.train_and_evaluate(c, str(tmp_path / "run"))
    assert os.listdir(tmp_path / "run") == []


def test_unwritable_workdir(idx_dir, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("keep me")
    c = fx.tiny_image_config(f"idx:{idx_dir}")
    with pytest.raises(checkpoints.WorkdirError, match="Cannot write to --workdir="):
        trainer.train_and_evaluate(c, str(blocker / "run"))
    assert blocker.read_text() == "keep me"
    if os.geteuid() != 0:  # root ignores permission bits
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o555)
        with pytest.raises(checkpoints.WorkdirError, match="Cannot write"):
            trainer.train_and_evaluate(c, str(locked))


@pytest.mark.parametrize(
    "arg, change, expected",
    [
        ("pairwise,k=2", {}, "checkpoint has K=3 stages, config asks for K=2"),
        ("pairwise,k=3", {"layout": "4,1/8,2"}, "model.layout: checkpoint has '4,1/8,1'"),
        ("global,k=3", {}, "strategy: checkpoint has 'pairwise', config asks for 'global'"),
    ],
    ids=["K", "architecture", "strategy"],
)
def test_incompatible_checkpoint_is_refused_untouched(trained, idx_dir, arg, change, expected):
    before = fx.tree_digest(trained)
    c = fx.tiny_image_config(f"idx:{idx_dir}", arg, **change)
    with pytest.raises(checkpoints.IncompatibleCheckpointError, match=expected) as e:
        trainer.train_and_evaluate(c, trained)
    assert "use a new --workdir" in str(e.value).lower()
    assert fx.tree_digest(trained) == before


@pytest.mark.parametrize("part", ["state", "meta"])
def test_corrupt_checkpoint_is_reported_untouched(trained, idx_dir, tmp_path, part):
    import shutil

    workdir = str(tmp_path / "copy")
    shutil.copytree(trained, workdir)
    step_dir = os.path.join(workdir, "checkpoints", "2", part)
    for root, _, files in os.walk(step_dir):
        for name in files:
            with open(os.path.join(root, name), "wb") as f:
                f.write(b"\x00garbage")
    before = fx.tree_digest(workdir)
    c = fx.tiny_image_config(f"idx:{idx_dir}", "pairwise,k=3")
    with pytest.raises(checkpoints.CorruptCheckpointError, match=r"checkpoints/2 cannot be read"):
        trainer.train_and_evaluate(c, workdir)
    assert fx.tree_digest(workdir) == before


def test_a_finished_run_is_not_overwritten(trained, idx_dir):
    """Rerunning into a finished workdir resumes at its last step: no step is redone."""
    ckpt = os.path.join(trained, "checkpoints")
    before = {s: fx.tree_digest(os.path.join(ckpt, s)) for s in os.listdir(ckpt)}
    summary = trainer.train_and_evaluate(
        fx.tiny_image_config(f"idx:{idx_dir}", "pairwise,k=3"), trained
    )
    assert summary["resumed_from"] == 2 and math.isfinite(summary["step_time_s"])
    assert {s: fx.tree_digest(os.path.join(ckpt, s)) for s in os.listdir(ckpt)} == before
