"""Multi-process start-up, meshes over every process and process-local batches.

In-process tests run on the 8 fake CPU devices of tests/conftest.py; the multi-process
ones start 2 processes × 4 CPU devices on localhost through `experiments.launch`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

import ilbp
from experiments.launch import child_env, free_port
from experiments.lib import checkpoints, distributed
from ilbp import data
from ilbp.mesh import DATA_AXIS, batch_sharding, global_batch, process_batch_shard

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = "--config=experiments/configs/fashion_mnist_resnet.py"


def _run(*args: str, timeout: float = 240) -> tuple[subprocess.CompletedProcess, float]:
    env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)
    start = time.monotonic()
    out = subprocess.run(
        [sys.executable, "-m", *args], cwd=ROOT, env=env, capture_output=True, text=True,
        timeout=timeout,
    )  # fmt: skip
    return out, time.monotonic() - start


def _launch(
    case: str, *extra: str, worker: tuple[str, ...] = (), timeout: float = 240, processes: int = 2
) -> tuple[subprocess.CompletedProcess, float]:
    return _run(
        "experiments.launch", f"--num_processes={processes}",
        f"--devices_per_process={8 // processes}", *extra,
        "--module=tests.multihost_worker", "--", f"--case={case}", *worker, timeout=timeout,
    )  # fmt: skip


# ----------------------------------------------------------------------------- meshes


def test_multi_process_mesh_must_use_every_device(monkeypatch):
    ilbp.make_mesh(data=2, stage=2)  # one process may use a subset
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    with pytest.raises(ValueError, match=r"stage=2 × data=2 .* make stage × data = 8"):
        ilbp.make_mesh(data=2, stage=2)
    assert ilbp.make_mesh(data=4, stage=2).devices.size == 8
    with pytest.raises(ValueError, match="does not fit the 8 available devices"):
        ilbp.make_mesh(data=8, stage=2)


def test_global_batch_from_one_process():
    mesh = ilbp.make_mesh(data=4, stage=2)
    assert process_batch_shard(mesh) == (0, 1)
    src = data.ArraySource(
        {"inputs": np.arange(40, dtype=np.float32).reshape(20, 2), "label": np.arange(20)},
        data.DatasetInfo(kind="image", example_shape=(2,), num_classes=20),
    )
    local = next(data.batches(src, 8, seed=0, process_index=0, process_count=1))
    batch = global_batch(local, mesh)
    assert batch["inputs"].sharding == batch_sharding(mesh)
    assert batch["inputs"].sharding.spec == jax.P(DATA_AXIS)
    np.testing.assert_array_equal(np.asarray(batch["inputs"]), local["inputs"])
    for shard in batch["label"].addressable_shards:  # 2 rows on each device
        np.testing.assert_array_equal(shard.data, local["label"][shard.index])
        assert shard.data.shape == (2,)


def test_two_processes_assemble_the_global_batch():
    """Data-parallel across processes (each loads half) and stage across processes (each
    loads all): the gathered global batch is the single-process one; eval sees every
    example once; a mesh of half the devices is refused."""
    out, _ = _launch("batches")
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    assert "[0] OK 0 [(0, 2), (0, 1), (0, 1)]" in out.stdout
    assert "[1] OK 1 [(1, 2), (0, 1), (0, 1)]" in out.stdout


# ---------------------------------------------------------------------------- launch


def test_launch_stops_the_others_when_a_process_dies():
    out, seconds = _launch("fail", "--grace_s=2")
    assert out.returncode == 3, out.stdout[-4000:] + out.stderr[-2000:]
    assert "[launch] process 1 exited with status 3; stopping the others." in out.stderr
    assert seconds < 90  # start-up, then at most 2 × grace_s to stop process 0


def test_the_others_exit_when_a_process_dies_without_the_launcher():
    """Started as srun or a TPU pod would (no experiments.launch to stop them): process 1
    dies, and JAX's coordination service stops process 0 once process 1 has missed
    its heartbeats for --heartbeat_timeout_s, with a message saying why."""
    address, start = f"localhost:{free_port()}", time.monotonic()
    flags = [f"--coordinator_address={address}", "--num_processes=2", "--heartbeat_timeout_s=3"]
    env = {**child_env(4), "PYTHONPATH": ROOT}
    command = [sys.executable, "-m", "tests.multihost_worker", "--case=fail", *flags]
    pipes = dict(stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    procs = [
        subprocess.Popen([*command, f"--process_id={i}"], cwd=ROOT, env=env, **pipes)
        for i in range(2)
    ]
    try:
        _, err = procs[0].communicate(timeout=120)
        assert procs[1].wait(timeout=30) == 3
    finally:
        for p in procs:
            p.kill()
    assert procs[0].returncode not in (0, None), err[-3000:]
    assert "This most likely indicates that another task died" in err, err[-3000:]
    assert time.monotonic() - start < 90  # start-up, then about 3 s of missed heartbeats


# ----------------------------------------------------------------------- start-up


@pytest.mark.parametrize(
    "args, message",
    [
        (("localhost:1234", 2, 2), r"--process_id=2 is out of range: .* ids are 0\.\.1"),
        (("localhost:1234", 2, -1), "--process_id=-1 is out of range"),
        (("localhost:1234", None, 0), "--num_processes missing"),
        ((None, 2, 0), "--coordinator_address missing"),
        (("localhost", 2, 0), "is not HOST:PORT"),
        (("localhost:1234", 0, 0), "--num_processes=0 must be ≥ 1"),
        (("localhost:1234", 2, 0, 0), "--heartbeat_timeout_s=0 must be ≥ 1"),
    ],
)
def test_bad_process_flags(monkeypatch, args, message):
    monkeypatch.setattr(jax.distributed, "initialize", pytest.fail)
    *args, heartbeat = (*args, 100) if len(args) == 3 else args
    with pytest.raises(ValueError, match=message):
        distributed.initialize(*args, heartbeat_timeout_s=heartbeat)


def test_one_process_initializes_nothing(monkeypatch):
    for name in ("SLURM_JOB_ID", "OMPI_MCA_orte_hnp_uri", "KUBERNETES_SERVICE_HOST"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(jax.distributed, "initialize", pytest.fail)
    assert distributed.detected_cluster() is None
    assert not distributed.initialize()
    assert not distributed.initialize("localhost:1234", 1, 0)


@pytest.mark.parametrize("tasks", [1, 2])
def test_slurm_job_is_detected(monkeypatch, tasks):
    """JAX's own SLURM detector: a 2-task step initializes with no explicit arguments."""
    env = dict(
        SLURM_JOB_ID="42", SLURM_STEP_NODELIST="localhost", SLURM_NTASKS=str(tasks),
        SLURM_PROCID="0", SLURM_LOCALID="0",
    )  # fmt: skip
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
    assert distributed.detected_cluster().__name__ == "SlurmCluster"
    assert distributed.initialize(timeout_s=7, heartbeat_timeout_s=9) == (tasks == 2)
    want = {"initialization_timeout": 7, "heartbeat_timeout_seconds": 9}
    assert calls == ([want] if tasks == 2 else [])


def test_unreachable_coordinator_fails_fast_with_the_reason(tmp_path):
    """Through experiments.train: a bounded wait, a clear message, no workdir created."""
    address = f"localhost:{free_port()}"
    out, seconds = _run(
        "experiments.train", CONFIG, f"--workdir={tmp_path / 'run'}",
        f"--coordinator_address={address}", "--num_processes=2", "--process_id=1",
        "--coordinator_timeout_s=2",
    )  # fmt: skip
    assert out.returncode == 1, out.stderr[-3000:]
    assert f"error: No coordinator answered at {address} within 2 s" in out.stderr
    assert "Start process 0 (--process_id=0)" in out.stderr
    assert seconds < 90 and not (tmp_path / "run").exists()


def test_compare_refuses_a_process_id_out_of_range(tmp_path):
    out, _ = _run(
        "experiments.compare", CONFIG, f"--workdir={tmp_path / 'cmp'}",
        "--coordinator_address=localhost:1234", "--num_processes=2", "--process_id=2",
    )  # fmt: skip
    assert out.returncode == 1, out.stderr[-3000:]
    assert "error: --process_id=2 is out of range" in out.stderr
    assert not (tmp_path / "cmp").exists()


# --------------------------------------------------------------------------- training


def _final_state(workdir, like=None):
    """The step-10 checkpoint's state; one written by several processes needs the
    placement of `like` (a state restored here)."""
    path = os.path.join(workdir, "checkpoints", "10", "state")
    target = None if like is None else checkpoints.restore_target(like)
    with ocp.StandardCheckpointer() as ckptr:
        return ckptr.restore(path, target)


def _assert_same_run(a, b, summary_a: dict, summary_b: dict) -> None:
    """Equal test metrics and final parameters, up to float reassociation (b: a
    1-process run)."""
    assert summary_a["test"].keys() == summary_b["test"].keys()
    for name, value in summary_a["test"].items():
        assert value == pytest.approx(summary_b["test"][name], rel=1e-4, abs=1e-6), name
    state_b = _final_state(b)
    params_a, params_b = (
        ocp.tree.to_flat_dict(s["params"]) for s in (_final_state(a, state_b), state_b)
    )
    assert params_a.keys() == params_b.keys() and params_a
    for key in params_a:
        np.testing.assert_allclose(params_a[key], params_b[key], rtol=1e-4, atol=1e-6)


def _summary(workdir) -> dict:
    with open(os.path.join(workdir, "summary.json")) as f:
        return json.load(f)


def _written_once(workdir) -> None:
    """Process 0 alone wrote the metrics and TensorBoard events."""
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        keys = [(r["kind"], r["step"]) for r in map(json.loads, f)]
    assert len(keys) == len(set(keys)), keys
    assert len(os.listdir(os.path.join(workdir, "tensorboard"))) == 1


def test_data_parallel_training_across_processes(tmp_path):
    """A data-parallel ResNet on 2 processes × 4 devices (tests/multihost_worker.py,
    --case=train) trains, evaluates and checkpoints as on 1 process × 8 devices;
    interrupted and resumed on 2 processes, or resumed on 1, it is the same run; so is a
    comparison's run, and the comparison's report is written once; a NaN in process 1's
    rows stops every process with the same error; bad meshes and mpmd are refused before
    anything is written."""
    from experiments.lib import trainer
    from tests import experiments_fixtures as fx
    from tests.multihost_worker import train_config

    idx, root = fx.write_idx_dir(str(tmp_path / "idx")), tmp_path / "runs"
    out, _ = _launch(
        "train", "--grace_s=30", worker=(f"--root={root}", f"--idx={idx}"), timeout=900
    )
    log = out.stdout[-6000:] + out.stderr[-2000:]
    assert "[0] BAD OK" in out.stdout and "[1] BAD OK" in out.stdout, log
    assert "[0] COMPARE OK" in out.stdout and "[1] COMPARE OK" in out.stdout, log
    error = "error: aux/0/loss = nan at step 3, stage 0 (of K=2); training stopped. No checkpoint"
    assert f"[0] {error}" in out.stdout and f"[1] {error}" in out.stdout, log
    assert out.returncode == 1 and not (root / "nan" / "checkpoints" / "5").exists(), log
    c = train_config(idx)
    single = trainer.train_and_evaluate(c, str(tmp_path / "single"))
    resumed = trainer.train_and_evaluate(c, str(root / "cut5"))  # 2 processes' checkpoint
    assert resumed["resumed_from"] == 5 and _summary(root / "cut")["resumed_from"] == 5
    assert single["test_examples"] == 24
    for workdir, summary in ((root / "full", _summary(root / "full")),
                             (root / "cut", _summary(root / "cut")),
                             (root / "cut5", resumed)):  # fmt: skip
        _assert_same_run(workdir, tmp_path / "single", summary, single)
    _written_once(root / "full")
    cmp = root / "cmp"
    with open(cmp / "runs.csv") as f:
        assert len(f.readlines()) == 3  # a header and seeds 0, 1
    assert (cmp / "results.md").exists()
    printed = [line for line in out.stdout.splitlines() if "| pairwise | K=2 | seed" in line]
    assert len(printed) == 3 and all(line.startswith("[0] ") for line in printed), printed
    (seed0,) = (d / "seed0" for d in cmp.iterdir() if (d / "seed0").is_dir())
    assert _summary(seed0)["test"] == _summary(root / "full")["test"]  # the same run
    _written_once(seed0)


SPMD_ARG = "pairwise,k=2,executor=spmd"
SPMD_RUN = {  # a 2-stage Transformer LM on (stage 2 × data 4), 2 overlapped steps per call
    "seq_len": 16, "model.num_layers": 2, "model.d_model": 16, "model.num_heads": 2,
    "batch_size": 8, "data_parallel": 4, "steps_per_call": 2, "num_train_steps": 10,
    "checkpoint_every_steps": 4, "log_every_steps": 2, "eval_every_steps": 0,
    "eval_batch_size": 32, "final_eval_examples": 64, "optimizer.warmup_steps": 0,
    "progress_bar": False,
}  # fmt: skip


def test_spmd_training_across_processes_through_experiments_train(tmp_path):
    """`experiments.launch` of `experiments.train`: the spmd stages on different
    processes give the 1-process run; process 0 alone prints and writes. Interrupted
    after step 8 (checkpoints spread over the processes), it resumes on 2 processes or
    on 1 to the same run."""
    import shutil

    from experiments.configs import stdlib_lm
    from experiments.lib import trainer
    from tests import experiments_fixtures as fx

    run = {"dataset": f"text:{fx.write_text_file(str(tmp_path / 'corpus.txt'))}", **SPMD_RUN}
    flags = [f"--config.{name}={value}" for name, value in run.items()]

    def train_on_two(workdir):
        out, _ = _run(
            "experiments.launch", "--num_processes=2", "--devices_per_process=4", "--",
            f"--config=experiments/configs/stdlib_lm.py:{SPMD_ARG}", f"--workdir={workdir}",
            *flags, timeout=600,
        )  # fmt: skip
        assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
        assert out.stdout.count("| pairwise | K=2 |") == 1 and "[0] stdlib_lm" in out.stdout
        return out

    train_on_two(tmp_path / "two")
    config = fx.override(stdlib_lm.get_config(SPMD_ARG), run)
    single = trainer.train_and_evaluate(config, str(tmp_path / "one"))
    _assert_same_run(tmp_path / "two", tmp_path / "one", _summary(tmp_path / "two"), single)
    _written_once(tmp_path / "two")
    for cut in ("two_cut", "one_cut"):  # as if stopped after the checkpoint at step 8
        shutil.copytree(tmp_path / "two", tmp_path / cut)
        shutil.rmtree(tmp_path / cut / "checkpoints" / "10")
        os.remove(tmp_path / cut / "summary.json")
    assert "[0] Resuming" in train_on_two(tmp_path / "two_cut").stdout
    resumed = trainer.train_and_evaluate(config, str(tmp_path / "one_cut"))
    for cut, summary in (("two_cut", _summary(tmp_path / "two_cut")), ("one_cut", resumed)):
        assert summary["resumed_from"] == 8
        _assert_same_run(tmp_path / cut, tmp_path / "one", summary, single)


def test_spmd_processes_read_only_their_rows(tmp_path):
    """4 processes × 2 devices on (stage 2 × data 4), M = 2 (tests/multihost_worker.py,
    --case=spmd_rows): the processes of one stage read disjoint halves of every
    microbatch, those of one data block the same rows, each exactly the rows its devices
    hold; the run is the 1-process run on 8 devices."""
    from experiments.lib import trainer
    from tests import experiments_fixtures as fx
    from tests.multihost_worker import spmd_rows_config

    text, root = fx.write_text_file(str(tmp_path / "corpus.txt")), tmp_path / "runs"
    out, _ = _launch(
        "spmd_rows", "--grace_s=30", worker=(f"--root={root}", f"--text={text}"),
        timeout=900, processes=4,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout[-6000:] + out.stderr[-2000:]
    rows = sorted(line.split("] ", 1)[1] for line in out.stdout.splitlines() if "ROWS" in line)
    assert rows == ["ROWS 0/2 80 of 160"] * 2 + ["ROWS 1/2 80 of 160"] * 2, out.stdout[-3000:]
    single = trainer.train_and_evaluate(spmd_rows_config(text), str(tmp_path / "one"))
    _assert_same_run(root / "spmd", tmp_path / "one", _summary(root / "spmd"), single)
