"""Trainer: 2-step runs of every config family, exact resume, NaN stop, absl entry point,
host synchronisations in the steady state."""

from __future__ import annotations

import contextlib
import json
import math
import os
import subprocess
import sys
import threading

import numpy as np
import orbax.checkpoint as ocp
import pytest

from experiments.configs import cifar10_resnet, cifar100_resnet, imagenet_resnet50, lm1b_transformer
from experiments.lib import builders, datasets, trainer
from experiments.lib.metrics import read_metrics
from experiments.lib.records import format_summary
from tests import experiments_fixtures as fx

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def idx_dir(tmp_path_factory):
    return fx.write_idx_dir(str(tmp_path_factory.mktemp("idx")))


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    return fx.write_text_file(str(tmp_path_factory.mktemp("text") / "corpus.txt"))


def _check_run(workdir, summary, K, metric="accuracy"):
    assert summary["steps"] == 2 and summary["num_stages"] == K
    assert summary["metric"] == metric and math.isfinite(summary["test"][metric])
    assert all(f"aux/{k}/accuracy" in summary["test"] for k in range(K - 1))
    records = read_metrics(os.path.join(workdir, "metrics.jsonl"))
    kinds = {(r["kind"], r["step"]) for r in records}
    assert kinds == {("train", 1), ("train", 2), ("eval", 2), ("final", 2)}
    train = [r for r in records if r["kind"] == "train"]
    assert {"loss", "accuracy", "grad_norm/0", "step_time", "learning_rate"} <= set(train[0])
    assert os.listdir(os.path.join(workdir, "tensorboard"))
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints")))[:2] == ["1", "2"]
    with open(os.path.join(workdir, "summary.json")) as f:
        assert json.load(f)["test"] == summary["test"]
    assert "aux head 0" in format_summary(summary)


def test_fashion_mnist_family_two_steps(idx_dir, tmp_path):
    c = fx.tiny_image_config(f"idx:{idx_dir}", "pairwise,k=3")
    summary = trainer.train_and_evaluate(c, str(tmp_path))
    _check_run(str(tmp_path), summary, K=3)
    assert summary["test_examples"] == 24


def test_stdlib_lm_family_two_steps(text_file, tmp_path):
    c = fx.tiny_text_config(f"text:{text_file}", "nwise=2,k=2")
    c.eval_every_steps = 1  # one intermediate eval on the first eval_examples windows
    c.final_eval_examples = 3  # and a final one on the first 3
    summary = trainer.train_and_evaluate(c, str(tmp_path))
    assert summary["metric"] == "perplexity" and summary["num_stages"] == 2
    assert summary["test_examples"] == 3
    assert 1 < summary["test"]["perplexity"] < 256 * 2
    assert "aux/0/perplexity" in summary["test"]
    test = summary["test"]  # bytes as tokens: bits per byte = loss / ln 2
    assert test["bits_per_byte"] == pytest.approx(test["loss"] / math.log(2))
    assert test["aux/0/bits_per_byte"] == pytest.approx(test["aux/0/loss"] / math.log(2))
    kinds = [(r["kind"], r["step"]) for r in read_metrics(str(tmp_path / "metrics.jsonl"))]
    assert ("eval", 1) in kinds and ("final", 2) in kinds


def test_e2e_trains_without_aux_heads(text_file, tmp_path):
    c = fx.tiny_text_config(f"text:{text_file}", "e2e,k=2,m=2")
    summary = trainer.train_and_evaluate(c, str(tmp_path))
    assert summary["strategy"] == "e2e" and 1 < summary["test"]["perplexity"] < 256 * 2
    train = [r for r in read_metrics(str(tmp_path / "metrics.jsonl")) if r["kind"] == "train"]
    assert train and not any(name.startswith("aux/") for r in train for name in r)
    # Evaluation does not depend on the strategy: the untrained head is still reported.
    assert "aux/0/loss" in summary["test"]


@pytest.mark.parametrize(
    "module, image_size, model",
    [
        (cifar10_resnet, None, {}),
        (cifar100_resnet, None, {}),
        (imagenet_resnet50, 32, {"layout": "4,1/8,1"}),
    ],
    ids=["cifar10", "cifar100", "imagenet2012"],
)
def test_tfds_image_families_two_steps(module, image_size, model, tmp_path):
    import tensorflow_datasets as tfds

    c = fx.tiny(module.get_config("global,k=2"))
    c.model.update({"layout": "4,1/8,1", "aux_head": "gbpl_fc", **model})
    c.image_size, c.batch_size, c.eval_batch_size = image_size, 4, 8
    with tfds.testing.mock_data(num_examples=8):
        summary = trainer.train_and_evaluate(c, str(tmp_path))
    _check_run(str(tmp_path), summary, K=2)


def test_lm1b_family_two_steps(tmp_path):
    import tensorflow_datasets as tfds

    c = fx.tiny_text_config("lm1b", "local,k=2")
    c.name = lm1b_transformer.get_config().name
    with tfds.testing.mock_data(num_examples=8):
        summary = trainer.train_and_evaluate(c, str(tmp_path))
    _check_run(str(tmp_path), summary, K=2, metric="perplexity")


def _restore_tree(workdir, step):
    path = os.path.join(workdir, "checkpoints", str(step), "state")
    with ocp.StandardCheckpointer() as ckptr:
        return ckptr.restore(path)


def test_resume_reproduces_the_uninterrupted_run_bitwise(idx_dir, tmp_path):
    c = fx.tiny_image_config(f"idx:{idx_dir}", "pairwise,k=2")
    c.num_train_steps, c.checkpoint_every_steps, c.eval_every_steps = 6, 3, 3
    straight, split = str(tmp_path / "straight"), str(tmp_path / "split")
    trainer.train_and_evaluate(c, straight)
    assert trainer.train_and_evaluate(c, split, stop_after=3)["stopped_at"] == 3
    assert sorted(os.listdir(os.path.join(split, "checkpoints"))) == ["3"]
    assert not os.path.exists(os.path.join(split, "summary.json"))
    summary = trainer.train_and_evaluate(c, split)
    assert summary["resumed_from"] == 3

    a, b = _restore_tree(straight, 6), _restore_tree(split, 6)
    leaves_a, leaves_b = (ocp.tree.to_flat_dict(t) for t in (a, b))
    assert leaves_a.keys() == leaves_b.keys() and len(leaves_a) > 10
    for key in leaves_a:
        np.testing.assert_array_equal(leaves_a[key], leaves_b[key], err_msg=str(key))
    losses = lambda w: [
        (r["kind"], r["step"], r["loss"]) for r in read_metrics(os.path.join(w, "metrics.jsonl"))
    ]
    assert losses(straight) == losses(split)


def test_nonfinite_loss_stops_naming_step_and_stage(idx_dir, tmp_path, monkeypatch):
    c = fx.tiny_image_config(f"idx:{idx_dir}", "pairwise,k=3")  # shares the programs above
    executor = builders.build(c, datasets.build_data(c, "train").info).executor
    step, calls = executor.step, []

    def poisoned(state, batch):
        new, metrics = step(state, batch)
        calls.append(None)
        if len(calls) == 2:  # the second update: its aux head 1 "diverges"
            metrics = {**metrics, "aux/1/loss": np.float32("nan")}
        return new, metrics

    monkeypatch.setattr(executor, "step", poisoned)
    with pytest.raises(trainer.NonFiniteLossError) as e:
        trainer.train_and_evaluate(c, str(tmp_path))
    message = str(e.value)
    assert "aux/1/loss = nan at step 2, stage 1" in message
    assert "last good checkpoint (step 1)" in message
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["1"]
    assert not (tmp_path / "summary.json").exists()


def test_absl_entry_point_smoke(idx_dir, tmp_path):
    workdir = str(tmp_path / "run")
    env = {**os.environ, "PYTHONPATH": REPO, "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)
    cmd = [
        sys.executable,
        "-m",
        "experiments.train",
        "--config=experiments/configs/fashion_mnist_resnet.py:local,k=2",
        f"--workdir={workdir}",
        f"--config.dataset=idx:{idx_dir}",
        "--config.model.layout=4,1/8,1",
        "--config.num_train_steps=2",
        "--config.batch_size=8",
        "--config.eval_batch_size=16",
        "--config.eval_every_steps=0",
        "--config.progress_bar=False",
    ]
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "fashion_mnist_resnet | local | K=2" in out.stdout
    assert "aux head 0: accuracy" in out.stdout
    assert os.path.exists(os.path.join(workdir, "summary.json"))


def test_mpmd_executor_trains_like_the_simulated_one(idx_dir, tmp_path):
    """Also on a (stage=3, data=2) mesh: stage k on row k, microbatches split over data."""
    import jax

    assert jax.device_count() >= 6, "tests/conftest.py sets 8 fake CPU devices"
    tests = {}
    for kind, data_parallel in (("simulated", 1), ("mpmd", 1), ("mpmd", 2)):
        c = fx.tiny_image_config(f"idx:{idx_dir}", f"pairwise,k=3,executor={kind},m=2")
        c.data_parallel = data_parallel
        c.max_in_flight = 1 if data_parallel == 2 else 0  # the cap changes the order only
        run = trainer.train_and_evaluate(c, str(tmp_path / f"{kind}{data_parallel}"))
        tests[kind, data_parallel] = run["test"]["loss"]
    simulated = tests["simulated", 1]
    info = datasets.build_data(c, "train").info
    assert builders.build(c, info).executor.max_in_flight == 1
    assert tests["mpmd", 1] == pytest.approx(simulated, rel=1e-5)
    assert tests["mpmd", 2] == pytest.approx(simulated, rel=1e-5)


def test_spmd_steps_per_call_trains_like_the_simulated_one(text_file, tmp_path):
    """Two steps per overlapped SPMD program: the same run as one step at a time, and
    resumable from a checkpoint."""
    runs = {}
    for kind, per_call in (("simulated", 1), ("spmd", 2)):
        c = fx.tiny_text_config(f"text:{text_file}", f"pairwise,k=2,executor={kind}")
        c.num_train_steps, c.checkpoint_every_steps, c.steps_per_call = 4, 2, per_call
        runs[kind] = trainer.train_and_evaluate(c, str(tmp_path / kind))
        records = read_metrics(str(tmp_path / kind / "metrics.jsonl"))
        assert [r["step"] for r in records if r["kind"] == "train"] == [1, 2, 3, 4]
    assert runs["spmd"]["test"]["loss"] == pytest.approx(
        runs["simulated"]["test"]["loss"], rel=1e-5
    )
    # Interrupted after step 3 (a shorter last call), resumed: the same run, bitwise.
    c = fx.tiny_text_config(f"text:{text_file}", "pairwise,k=2,executor=spmd")
    c.num_train_steps, c.checkpoint_every_steps, c.steps_per_call = 4, 2, 2
    assert trainer.train_and_evaluate(c, str(tmp_path / "cut"), stop_after=3)["stopped_at"] == 3
    resumed = trainer.train_and_evaluate(c, str(tmp_path / "cut"))
    assert resumed["test"] == runs["spmd"]["test"]


def test_stacked_calls_on_a_data_mesh_and_a_resumed_cut(idx_dir, tmp_path):
    """Two steps per call of the single-program step on a data=2 mesh (T × B batches,
    rows split over `data`) train as one step per call; cut after step 3 and resumed,
    the calls end on even steps again, so the checkpoint at step 4 is written."""
    c = fx.tiny_image_config(f"idx:{idx_dir}", "pairwise,k=2")
    c.num_train_steps, c.checkpoint_every_steps = 6, 2
    one = trainer.train_and_evaluate(c, str(tmp_path / "one"))
    c.data_parallel, c.steps_per_call = 2, 2
    cut = str(tmp_path / "cut")
    assert trainer.train_and_evaluate(c, cut, stop_after=3)["stopped_at"] == 3
    resumed = trainer.train_and_evaluate(c, cut)
    assert sorted(os.listdir(os.path.join(cut, "checkpoints")), key=int) == ["2", "3", "4", "6"]
    assert resumed["test"]["loss"] == pytest.approx(one["test"]["loss"], rel=1e-5)


def test_call_sizes_end_on_multiples():
    assert trainer.call_sizes(0, 25, 10) == [10, 10, 5]
    assert trainer.call_sizes(15, 40, 10) == [5, 10, 10]
    assert trainer.call_sizes(4, 4, 2) == []


@contextlib.contextmanager
def _count_host_syncs():
    """Counts the host's waits for device values: jax.device_get, block_until_ready and
    every conversion of a jax.Array to a host value (np.asarray, float, ...: all read
    `ArrayImpl._value`); a call made inside another counted one is not counted again."""
    import jax
    from jax._src.array import ArrayImpl

    count, inside = [0], threading.local()

    def counted(fn):
        def wrapper(*args, **kwargs):
            nested = getattr(inside, "active", False)
            count[0] += not nested
            inside.active = True
            try:
                return fn(*args, **kwargs)
            finally:
                inside.active = nested

        return wrapper

    patches = [
        (jax, "device_get", counted(jax.device_get)),
        (jax, "block_until_ready", counted(jax.block_until_ready)),
        (ArrayImpl, "block_until_ready", counted(ArrayImpl.block_until_ready)),
        (ArrayImpl, "_value", property(counted(ArrayImpl._value.fget))),
    ]
    with pytest.MonkeyPatch.context() as mp:
        for owner, name, value in patches:
            mp.setattr(owner, name, value)
        yield count


@pytest.mark.parametrize("kind", ["simulated", "mpmd"])
def test_steady_state_syncs_only_at_log_steps(idx_dir, tmp_path, kind, monkeypatch):
    """12 steps, train metrics every 4: from the 2nd call to the 12th the host waits for
    the devices only to read steps 4 and 8's metrics (each after the next step is
    dispatched), not once per step. The single-program step gets its batches placed."""
    import jax

    c = fx.tiny_image_config(f"idx:{idx_dir}", f"pairwise,k=2,executor={kind}")
    c.num_train_steps, c.log_every_steps, c.checkpoint_every_steps = 12, 4, 12
    executor = builders.build(c, datasets.build_data(c, "train").info).executor
    step, at_call, placed = executor.step, [], []
    with _count_host_syncs() as syncs:

        def counting(state, batch):
            at_call.append(syncs[0])  # host waits so far, before this call
            placed.append(isinstance(batch["inputs"], jax.Array))
            return step(state, batch)

        monkeypatch.setattr(executor, "step", counting)
        trainer.train_and_evaluate(c, str(tmp_path))
    assert len(at_call) == 12
    assert at_call[11] - at_call[1] == 2, at_call
    assert all(placed) == (kind == "simulated")  # mpmd places each microbatch itself
    records = read_metrics(str(tmp_path / "metrics.jsonl"))
    assert [r["step"] for r in records if r["kind"] == "train"] == [4, 8, 12]
