"""Per-step time through `experiments.train`'s loop against the bare executor loop.

    python -m benchmarks.trainer_overhead                  # 110 steps, 5 repeats
    python -m benchmarks.trainer_overhead --steps=60 --executors=simulated
    python -m benchmarks.trainer_overhead --platform=default   # on a GPU or TPU

For each executor (simulated and mpmd: a ResNet on synthetic IDX images, K = 2, mpmd
with 2 microbatches; spmd: a Transformer LM on a synthetic text file, K = 2) one
config, one executor (one compilation), timed both ways in the same process, round
robin `--repeats` times:
  bare     host batches made beforehand, `state, _ = ex.step(state, batch)` in a loop
           (`ex.steps` on T stacked batches when the config runs T > 1 steps per
           call: spmd by default), blocked after the calls that cover `--log-every`
           steps; the median of those blocks per step;
  trainer  `experiments.lib.trainer.train_and_evaluate` on the same config (data read
           by grain, batches placed ahead, non-finite checks on device, metrics read
           every `--log-every` steps, one checkpoint at the end); its summary's
           step time (the median over the intervals between the host's looks).
  data     the trainer's batch iterator alone (grain read threads included), nothing
           else running: host seconds per batch that the trainer's data thread spends
           while the devices compute, which the bare loop spends before its clock.
The first call of each (compilation) is not timed. The ratio trainer / bare is the
trainer's overhead per step (the target is ≤ 1.05). On a CPU the trainer's data thread
and the devices share the cores, which a GPU or TPU host does not, so there the data
column is (at most) what the trainer's data work adds to a step. On a CPU that other
work also loads, single runs vary by tens of percent, so the table gives medians and
minimums over the repeats and each repeat's ratio.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Sequence

import jax
import ml_collections
import numpy as np

from benchmarks.common import use_cpu_devices

EXECUTORS = ("simulated", "mpmd", "spmd")


def _write_data(directory: str) -> dict[str, str]:
    """Synthetic IDX images (28 x 28, 10 classes) and a text file: dataset specs."""
    from ilbp import data

    rng = np.random.default_rng(0)
    for stem, n in (("train", 2048), ("t10k", 256)):
        labels = rng.integers(0, 10, n).astype(np.uint8)
        images = rng.integers(0, 256, (n, 28, 28)).astype(np.uint8)
        data.write_idx(os.path.join(directory, f"{stem}-images-idx3-ubyte.gz"), images)
        data.write_idx(os.path.join(directory, f"{stem}-labels-idx1-ubyte.gz"), labels)
    text = os.path.join(directory, "corpus.txt")
    with open(text, "w") as f:
        f.write("".join(chr(c) for c in rng.integers(32, 127, 400_000)))
    return {"image": f"idx:{directory}", "text": f"text:{text}"}


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def make_config(
    executor: str, datasets: dict[str, str], args: argparse.Namespace
) -> ml_collections.ConfigDict:
    """The benchmark's config of `executor` (see the module docstring)."""
    from experiments.configs import fashion_mnist_resnet, stdlib_lm

    if executor == "spmd":
        c = stdlib_lm.get_config(f"pairwise,k=2,executor={executor}")
        c.dataset, c.seq_len, c.batch_size = datasets["text"], 64, 16
        c.model.update(num_layers=2, d_model=64, num_heads=4)
    else:
        m = 2 if executor == "mpmd" else 1
        c = fashion_mnist_resnet.get_config(f"pairwise,k=2,executor={executor},m={m}")
        c.dataset, c.batch_size, c.model.layout = datasets["image"], 32, "8,1/16,1"
    c.num_train_steps, c.log_every_steps = args.steps, args.log_every
    # One checkpoint, at the end; the interval is a multiple of 10 so that spmd's default
    # steps_per_call (the largest T ≤ 10 dividing it) is 10.
    c.checkpoint_every_steps, c.eval_every_steps = _round_up(args.steps, 10), 0
    c.final_eval_examples, c.eval_batch_size = 64, 64
    c.optimizer.warmup_steps, c.progress_bar = 0, False
    return c


def bare_step_time(config: ml_collections.ConfigDict, log_every: int) -> float:
    """Median seconds per step of the bare executor loop, in blocks of `log_every`."""
    from experiments.configs import validation
    from experiments.lib import builders, datasets
    from ilbp import data

    src = datasets.build_data(config, "train")
    built = builders.build(config, src.info)
    it = data.batches(src, int(config.batch_size), seed=int(config.seed))
    T, ex = validation.steps_per_call(config), built.executor
    batches = [it.batch_at(s) for s in range(int(config.num_train_steps))]
    state = builders.initial_state(built, config, batches[0])
    calls = [batches[s : s + T] for s in range(0, len(batches) - T + 1, T)]  # whole calls
    if T > 1:
        calls = [jax.tree.map(lambda *xs: np.stack(xs), *call) for call in calls]
        run = ex.steps
    else:
        calls, run = [call[0] for call in calls], ex.step
    state, _ = run(state, calls[0])  # compiles (once per process)
    jax.block_until_ready(state)
    per_block = -(-log_every // T)  # calls per timed block
    times = []
    for start in range(1, len(calls) - per_block + 1, per_block):
        t0 = time.perf_counter()
        for batch in calls[start : start + per_block]:
            state, _ = run(state, batch)
        jax.block_until_ready(state)
        times.append((time.perf_counter() - t0) / (per_block * T))
    return statistics.median(times)


def data_time(config: ml_collections.ConfigDict) -> float:
    """Seconds per batch of the trainer's batch iterator (same source, augmentation,
    microbatch split and read threads) over the run's steps, after its first batch."""
    from experiments.lib import builders, datasets, trainer

    src = datasets.build_data(config, "train")
    it = trainer.batch_iterator(config, builders.build(config, src.info).executor, src)
    next(it)  # starts the read threads
    steps = int(config.num_train_steps) - 1
    t0 = time.perf_counter()
    for _ in range(steps):
        next(it)
    elapsed = time.perf_counter() - t0
    it.close()
    return elapsed / steps


def trainer_step_time(config: ml_collections.ConfigDict) -> float:
    """The summary's step time of a fresh `train_and_evaluate` run of `config`."""
    from experiments.lib import trainer

    with tempfile.TemporaryDirectory() as workdir:
        return trainer.train_and_evaluate(config, workdir)["step_time_s"]


def measure(args: argparse.Namespace) -> list[tuple[str, list[float], list[float], float]]:
    """(executor, bare s/step of each repeat, trainer s/step of each repeat, data s/batch);
    a repeat times the bare loop and then the trainer, one after the other."""
    from experiments.configs import validation

    rows = []
    with tempfile.TemporaryDirectory() as directory:
        datasets = _write_data(directory)
        for executor in args.executors:
            config = make_config(executor, datasets, args)
            bare, loop = [], []
            for _ in range(args.repeats):
                bare.append(bare_step_time(config, args.log_every))
                loop.append(trainer_step_time(config))
            per_call = validation.steps_per_call(config)
            name = f"{executor} ({per_call} steps/call)" if per_call > 1 else executor
            rows.append((name, bare, loop, data_time(config)))
    return rows


def format_rows(rows: Sequence[tuple[str, list[float], list[float], float]]) -> str:
    """Medians and minimums over the repeats (the minimum: the run the machine's other
    load disturbed least), each repeat's ratio, and the data thread's time per batch."""
    lines = [
        "| executor | bare ms/step (median, min) | trainer ms/step (median, min) | "
        "trainer / bare (medians) | (minimums) | each repeat | data ms/batch |",
        "|---|---|---|---|---|---|---|",
    ]
    for executor, bare, loop, data_s in rows:
        b, t = statistics.median(bare), statistics.median(loop)
        each = ", ".join(f"{y / x:.2f}" for x, y in zip(bare, loop))
        lines.append(
            f"| {executor} | {b * 1e3:.1f}, {min(bare) * 1e3:.1f} | {t * 1e3:.1f}, "
            f"{min(loop) * 1e3:.1f} | {t / b:.3f} | {min(loop) / min(bare):.3f} | {each} | "
            f"{data_s * 1e3:.2f} |"
        )
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--executors", default=",".join(EXECUTORS))
    p.add_argument("--steps", type=int, default=110, help="a multiple of 10: spmd runs 10 per call")
    p.add_argument("--log-every", type=int, default=25)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument(
        "--platform",
        choices=("cpu", "default"),
        default="cpu",
        help="cpu: 2 CPU devices; default: JAX's default backend (a GPU or TPU), where "
        "executors that need more devices than it has are skipped",
    )
    return p.parse_args(argv)


def runnable_executors(names: str, devices: int) -> tuple[list[str], list[str]]:
    """(the executors of `names` that fit on `devices`, those skipped): mpmd and spmd
    put the K = 2 stages on 2 devices, simulated needs one."""
    wanted = [n for n in names.split(",") if n]
    fits = [n for n in wanted if n == "simulated" or devices >= 2]
    return fits, [n for n in wanted if n not in fits]


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if args.steps < 2 * args.log_every + 1:
        raise SystemExit("--steps must be at least 2 × --log-every + 1 (two timed intervals).")
    jax.config.update("jax_threefry_partitionable", False)  # faster init on XLA:CPU
    if args.platform == "cpu":
        use_cpu_devices(2)
    args.executors, skipped = runnable_executors(args.executors, jax.device_count())
    if skipped:
        print(f"# skipped (need 2 devices, found {jax.device_count()}): {', '.join(skipped)}")
    print(
        f"# trainer overhead: {args.steps} steps, metrics every {args.log_every}, "
        f"{args.repeats} repeats, {jax.device_count()} {jax.devices()[0].platform} devices, "
        f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at the start\n"
    )
    print(format_rows(measure(args)))


if __name__ == "__main__":
    main()
