"""Bad input fails early with a clear message and leaves existing files untouched."""

from __future__ import annotations

import math
import os

import pytest

from experiments.lib import checkpoints, records, trainer
from ilbp.data import DataMissingError
from tests import experiments_fixtures as fx


@pytest.fixture(scope="module")
def idx_dir(tmp_path_factory):
    return fx.write_idx_dir(str(tmp_path_factory.mktemp("idx")))


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    return fx.write_text_file(str(tmp_path_factory.mktemp("text") / "corpus.txt"))


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


@pytest.mark.parametrize(
    "kind, arg, overrides, expected",
    [
        ("image", "pairwise,k=5", {}, r"config\.model \(K=5\): num_stages=5 must be"),
        ("image", "pairwise,k=2", {"image_size": 16}, r"config\.image_size=16 resizes TFDS"),
        ("image", "pairwise,k=2", {"augment": "crop_flipp"}, "Unknown augmentation"),
        ("image", "pairwise,k=2", {"batch_size": 64}, r"batch_size=64 is larger than the 48"),
        ("image", "pairwise,k=2", {"eval_batch_size": 0}, r"eval_batch_size must be ≥ 1"),
        ("text", "pairwise,k=2", {"augment": "flip"}, r"config\.augment='flip' augments images"),
        ("text", "pairwise,k=2", {"seq_len": 20_000}, r"seq_len=20000 \(train\): .* too few"),
    ],
)
def test_bad_model_data_or_size_leaves_no_workdir(
    idx_dir, text_file, tmp_path, kind, arg, overrides, expected
):
    if kind == "image":
        c = fx.tiny_image_config(f"idx:{idx_dir}", arg)
    else:
        c = fx.tiny_text_config(f"text:{text_file}", arg)
    with pytest.raises(ValueError, match=expected):
        trainer.train_and_evaluate(fx.override(c, overrides), str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_missing_dataset_directory(tmp_path):
    c = fx.tiny_image_config(f"idx:{tmp_path / 'nowhere'}")
    with pytest.raises(DataMissingError, match="No IDX train split in"):
        trainer.train_and_evaluate(c, str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_unwritable_workdir(idx_dir, tmp_path, monkeypatch):
    """A workdir under a file, one that is a file, and a directory refusing writes (as
    root, which ignores permission bits, simulated by refusing the write probe)."""
    blocker = tmp_path / "a_file"
    blocker.write_text("keep me")
    c = fx.tiny_image_config(f"idx:{idx_dir}")
    for workdir in (blocker / "run", blocker):
        with pytest.raises(checkpoints.WorkdirError, match=f"Cannot write to --workdir={workdir}"):
            trainer.train_and_evaluate(c, str(workdir))
    assert blocker.read_text() == "keep me"

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(checkpoints.tempfile, "NamedTemporaryFile", refuse)
    with pytest.raises(checkpoints.WorkdirError, match=r"Permission denied\. Choose a writable"):
        trainer.train_and_evaluate(c, str(tmp_path / "locked"))


@pytest.fixture(scope="module")
def interrupted(idx_dir, tmp_path_factory):
    """A 2-step K=3 run stopped after step 1 (the same program as `trained`)."""
    workdir = str(tmp_path_factory.mktemp("interrupted"))
    c = fx.tiny_image_config(f"idx:{idx_dir}", "pairwise,k=3")
    assert trainer.train_and_evaluate(c, workdir, stop_after=1)["stopped_at"] == 1
    return workdir


# (config arg, overrides, the field, its value in the checkpoint, in the config): the
# fields that change the trajectory.
P = "pairwise,k=3"
CHANGED = [
    ("pairwise,k=2", {}, "num_stages", 3, 2),
    (P, {"model.layout": "4,1/8,2"}, "model.layout", "4,1/8,1", "4,1/8,2"),
    ("global,k=3", {}, "strategy", "pairwise", "global"),
    ("pairwise:sum,k=3", {}, "strategy", "pairwise", "pairwise:sum"),
    (P, {"aux_weight": 0.5}, "aux_weight", 1.0, 0.5),
    (P, {"optimizer.name": "adam"}, "optimizer", "sgd", "adam"),
    (P, {"optimizer.learning_rate": 0.05}, "optimizer.learning_rate", 0.1, 0.05),
    (P, {"optimizer.grad_clip_norm": 1.0}, "optimizer.grad_clip_norm", 0.0, 1.0),
    (P, {"optimizer.momentum": 0.0}, "optimizer.momentum", 0.9, 0.0),
    (P, {"optimizer.weight_decay": 0.0}, "optimizer.weight_decay", 5e-4, 0.0),
    (P, {"optimizer.schedule": "constant"}, "optimizer.schedule", "cosine", "constant"),
    (P, {"num_train_steps": 4}, "num_train_steps", 2, 4),
    (P, {"batch_size": 4}, "batch_size", 8, 4),
    ("pairwise,k=3,m=2", {}, "microbatches", 1, 2),
    (P, {"seed": 1}, "seed", 0, 1),
    (P, {"augment": "flip"}, "augment", None, "flip"),
]


@pytest.mark.parametrize(
    "arg, overrides, field, old, new", CHANGED, ids=[f"{c[2]}={c[4]}" for c in CHANGED]
)
def test_resuming_with_another_trajectory_is_refused_untouched(
    interrupted, idx_dir, arg, overrides, field, old, new
):
    before = fx.tree_digest(interrupted)
    c = fx.override(fx.tiny_image_config(f"idx:{idx_dir}", arg), overrides)
    with pytest.raises(checkpoints.IncompatibleCheckpointError) as e:
        trainer.train_and_evaluate(c, interrupted)
    message = str(e.value)
    if field == "num_stages":
        assert f"checkpoint has K={old} stages, config asks for K={new}" in message
    else:
        assert f"{field}: checkpoint has {old!r}, config asks for {new!r}" in message
    assert "use a new --workdir to start fresh" in message and "corrupt" not in message
    assert fx.tree_digest(interrupted) == before


def test_resuming_with_other_cadences_and_sizes_is_allowed(interrupted, idx_dir, tmp_path):
    import shutil

    workdir = str(tmp_path / "copy")
    shutil.copytree(interrupted, workdir)
    c = fx.override(
        fx.tiny_image_config(f"idx:{idx_dir}", "pairwise,k=3"),
        {
            "eval_every_steps": 2, "eval_examples": 8, "eval_batch_size": 8,
            "log_every_steps": 2, "checkpoint_every_steps": 2, "max_to_keep": 1,
            "name": "renamed",
        },
    )  # fmt: skip
    summary = trainer.train_and_evaluate(c, workdir)
    assert summary["resumed_from"] == 1 and summary["steps"] == 2


def test_a_constant_schedule_can_be_extended(idx_dir, tmp_path):
    c = fx.tiny_image_config(f"idx:{idx_dir}", "pairwise,k=3")
    c.optimizer.schedule = "constant"
    trainer.train_and_evaluate(c, str(tmp_path))
    c.num_train_steps = 3
    assert trainer.train_and_evaluate(c, str(tmp_path))["resumed_from"] == 2
    before = fx.tree_digest(str(tmp_path))
    c.num_train_steps = 2
    with pytest.raises(checkpoints.IncompatibleCheckpointError, match="step 3, past config"):
        trainer.train_and_evaluate(c, str(tmp_path))
    assert fx.tree_digest(str(tmp_path)) == before


def test_a_checkpoint_from_before_the_full_fingerprint_resumes(
    interrupted, idx_dir, tmp_path, capsys
):
    """Checkpoints that recorded only K, model, strategy, dataset and optimizer name are
    checked on those and resumed with a note naming what they do not record."""
    import json
    import shutil

    workdir = str(tmp_path / "copy")
    shutil.copytree(interrupted, workdir)
    path = os.path.join(workdir, "checkpoints", "1", "meta", "metadata")
    with open(path) as f:
        meta = json.load(f)
    legacy = ("num_stages", "model", "strategy", "dataset", "optimizer")
    meta["fingerprint"] = {k: meta["fingerprint"][k] for k in legacy}
    with open(path, "w") as f:
        json.dump(meta, f)
    c = fx.tiny_image_config(f"idx:{idx_dir}", "global,k=3")
    with pytest.raises(checkpoints.IncompatibleCheckpointError, match="strategy: checkpoint"):
        trainer.train_and_evaluate(c, workdir)
    c = fx.tiny_image_config(f"idx:{idx_dir}", "pairwise,k=3")
    assert trainer.train_and_evaluate(c, workdir)["resumed_from"] == 1
    assert "does not record aux_weight, image_size, augment" in capsys.readouterr().err


@pytest.mark.parametrize("part", ["state", "meta"])
def test_corrupt_checkpoint_is_reported_untouched(trained, idx_dir, tmp_path, part):
    import shutil

    workdir = str(tmp_path / "copy")
    shutil.copytree(trained, workdir)
    os.remove(os.path.join(workdir, records.SUMMARY_FILE))  # else it is read back, not step 2
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
    """Rerunning into a finished workdir returns its summary: nothing is trained,
    evaluated or written again; a final eval on other examples evaluates again."""
    import json

    before = fx.tree_digest(trained)
    c = fx.tiny_image_config(f"idx:{idx_dir}", "pairwise,k=3")
    summary = trainer.train_and_evaluate(c, trained)
    with open(os.path.join(trained, records.SUMMARY_FILE)) as f:
        assert {**json.load(f), "workdir": summary["workdir"]} == summary  # file names no path
    assert summary["resumed_from"] == 0 and math.isfinite(summary["step_time_s"])
    assert fx.tree_digest(trained) == before
    ckpt = os.path.join(trained, "checkpoints")
    ckpts_before = {s: fx.tree_digest(os.path.join(ckpt, s)) for s in os.listdir(ckpt)}
    c.final_eval_examples = summary["test_examples"] // 2
    again = trainer.train_and_evaluate(c, trained)
    assert again["resumed_from"] == 2 and again["test_examples"] == c.final_eval_examples
    assert {s: fx.tree_digest(os.path.join(ckpt, s)) for s in os.listdir(ckpt)} == ckpts_before


def _committed_copy(trained: str, workdir: str, idx_dir: str):
    """(`trained` as committed with results: summary, metrics and config, no
    checkpoints; its config, evaluating the examples its summary records)."""
    import json
    import shutil

    shutil.copytree(trained, workdir, ignore=shutil.ignore_patterns("checkpoints", "tensorboard"))
    c = fx.tiny_image_config(f"idx:{idx_dir}", "pairwise,k=3")
    with open(os.path.join(workdir, records.SUMMARY_FILE)) as f:
        c.final_eval_examples = json.load(f)["test_examples"]  # another test may change it
    return workdir, c


def test_a_finished_run_without_checkpoints_is_read_back(trained, idx_dir, tmp_path):
    workdir, c = _committed_copy(trained, str(tmp_path / "committed"), idx_dir)
    before = fx.tree_digest(workdir)
    summary = trainer.train_and_evaluate(c, workdir)
    assert summary["workdir"] == workdir and summary["steps"] == 2
    assert fx.tree_digest(workdir) == before and not os.path.exists(workdir + "/checkpoints")


def test_a_finished_run_of_another_config_is_refused_untouched(trained, idx_dir, tmp_path):
    workdir, c = _committed_copy(trained, str(tmp_path / "committed"), idx_dir)
    before = fx.tree_digest(workdir)
    c.seed = 7
    with pytest.raises(checkpoints.IncompatibleCheckpointError, match="seed: finished run has 0"):
        trainer.train_and_evaluate(c, workdir)
    assert fx.tree_digest(workdir) == before


def test_an_older_summary_gets_its_checkpoints_fingerprint(trained, idx_dir, tmp_path):
    """A summary written before summaries recorded fingerprints (and held the workdir's
    path) counts as finished only with its final checkpoint, and is then completed."""
    import json
    import shutil

    workdir = str(tmp_path / "older")
    shutil.copytree(trained, workdir)
    path = os.path.join(workdir, records.SUMMARY_FILE)
    with open(path) as f:
        summary = json.load(f)
    fingerprint = summary.pop("fingerprint")
    with open(path, "w") as f:
        json.dump({**summary, "workdir": "/elsewhere"}, f)
    c = fx.tiny_image_config(f"idx:{idx_dir}", "pairwise,k=3")
    c.final_eval_examples = summary["test_examples"]
    ckpt = os.path.join(workdir, "checkpoints")
    before = fx.tree_digest(ckpt)
    assert trainer.train_and_evaluate(c, workdir)["test"] == summary["test"]
    with open(path) as f:
        assert json.load(f) == {**summary, "fingerprint": fingerprint}
    assert fx.tree_digest(ckpt) == before
