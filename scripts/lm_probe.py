"""Offline probes of saved `stdlib_lm` checkpoints: who helps whom, and activation scales.

    python scripts/lm_probe.py RUNS_DIR NAME[@STEP,STEP..]... > probe.csv
    python scripts/lm_probe.py --eval=N RUNS_DIR NAME...   # RUN/final_N.json
    python scripts/lm_probe.py --leaves RUNS_DIR NAME[@STEPS]... > leaves.csv

`--eval=N` evaluates a run's last checkpoint on the first N test windows (what
`--config.final_eval_examples=N` does at the end of training), for runs that were
finished with another final evaluation.

For every checkpoint of every named run, on one fixed batch of 64 training windows:

* g[k][j] = ∂L_j/∂θ_k for every loss j ≥ k (the routed engine under the window-n
  `last` strategy gives θ_k ∂L_{k+n-1}/∂θ_k, so n = 1..K covers every j);
* u[k] = the update the run's own optimizer state would apply to θ_k on this batch (its
  strategy's gradient through AdamW/SGD, clipping and the schedule at that step);
* cos(u_k, -g[k][j]): > 0 means stage k's update descends L_j to first order;
* dL[k][j] = L_j(θ with only θ_k updated) - L_j(θ): the actual effect of stage k's step;
* rms(h_k) of every stage's output, and rms(h_k - h_{k-1}) (what stage k adds), and
  the share of h_k's energy in its mean over tokens and positions;
* d L_j/d c at c = 1 with h_k scaled by c (j > k): < 0 means loss j gains when h_k
  grows, i.e. when the writes of stages k+1..j are diluted (every block and head reads
  its input through a LayerNorm, so only the ratio of h_k to later writes matters).

Rows: run, step, kind, k, j, value (CSV, long format).
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import ilbp
from experiments.lib import builders, datasets, optim
from experiments.lib.checkpoints import Checkpoints
from ilbp import data

PROBE_SEED = 12345
PROBE_BATCH = 64


def load_config(workdir: str) -> ml_collections.ConfigDict:
    with open(os.path.join(workdir, "config.json")) as f:
        return ml_collections.ConfigDict(json.load(f))


def checkpoints(workdir: str, template, steps: set[int] | None = None):
    """Yields (step, TrainState) of the run's checkpoints (those in `steps` if given)."""
    ckpts = Checkpoints(workdir, {}, max_to_keep=1000)
    try:
        for step in sorted(ckpts.manager.all_steps()):
            if steps and step not in steps:
                continue
            ckpts.fingerprint = ckpts.read_meta(step)["fingerprint"]
            yield step, ckpts.restore(step, template)[0]
    finally:
        ckpts.close()


def _cos(a, b) -> float:
    a, b = jax.tree.leaves(a), jax.tree.leaves(b)
    dot = sum(float(jnp.vdot(x, y)) for x, y in zip(a, b))
    na = np.sqrt(sum(float(jnp.vdot(x, x)) for x in a))
    nb = np.sqrt(sum(float(jnp.vdot(y, y)) for y in b))
    return dot / max(na * nb, 1e-30)


def _norm(a) -> float:
    return float(np.sqrt(sum(float(jnp.vdot(x, x)) for x in jax.tree.leaves(a))))


class _Restored(NamedTuple):
    """A run directory opened for probing: its config, model and a state template."""

    workdir: str
    config: ml_collections.ConfigDict
    built: builders.Built
    batch: dict  # a fixed training batch (batch_size windows)
    template: Any  # TrainState to restore checkpoints into


def open_run(runs_dir: str, name: str, batch_size: int = 8, seed: int = 0) -> _Restored:
    """Builds RUNS_DIR/NAME's model from its config.json, with a training batch."""
    workdir = os.path.join(runs_dir, name)
    config = load_config(workdir)
    train_src = datasets.build_data(config, "train")
    built = builders.build(config, train_src.info)
    batch = data.batches(train_src, batch_size, seed=seed).batch_at(0)
    batch = jax.tree.map(jnp.asarray, batch)
    template = built.executor.to_train_state(built.executor.init(jax.random.PRNGKey(0), batch))
    return _Restored(workdir, config, built, batch, template)


class _Probes:
    """The jitted probes of one model on one fixed batch (module docstring)."""

    def __init__(self, run: _Restored):
        model, batch = run.built.model, run.batch
        self.model, self.batch, self.K = model, batch, model.num_stages
        self.per_window = {
            n: jax.jit(lambda p, s, b, n=n: ilbp.grads(model, ilbp.Strategy(n), p, s, b)[0])
            for n in range(1, self.K + 1)
        }
        self.rule = jax.jit(lambda p, s, b: ilbp.grads(model, run.built.strategy, p, s, b)[0])
        self.activations = jax.jit(self._activations)
        self.scale_slopes = jax.jit(self._scale_slopes)

    def _activations(self, params, state, batch) -> list[jax.Array]:
        hs, h = [], batch[self.model.input_key]
        for k, stage in enumerate(self.model.stages[:-1]):
            h, _ = stage.apply(params[k]["stage"], state[k]["stage"], h, None, False)
            hs.append(h)
        return hs

    def _losses_after(self, params, state, batch, k: int, h: jax.Array) -> dict[int, jax.Array]:
        """L_j for j > k computed from stage k's output h."""
        model, out = self.model, {}
        for j in range(k + 1, self.K):
            h, _ = model.stages[j].apply(params[j]["stage"], state[j]["stage"], h, None, False)
            logits = h
            if j < self.K - 1:
                logits, _ = model.heads[j].apply(
                    params[j]["head"], state[j]["head"], h, None, False
                )
            out[j] = model.head_loss(j)(logits, batch)[0]
        return out

    def _scale_slopes(self, params, state, batch) -> dict[int, dict[int, jax.Array]]:
        """d L_j / d c at c = 1 with h_k replaced by c·h_k, for k < K - 1 and j > k."""
        hs = self._activations(params, state, batch)
        return {
            k: jax.jacfwd(lambda c, k=k: self._losses_after(params, state, batch, k, c * hs[k]))(
                jnp.float32(1.0)
            )
            for k in range(self.K - 1)
        }


def _loss_name(j: int, K: int) -> str:
    return "loss" if j == K - 1 else f"aux/{j}/loss"


def _emit_updates(probes: _Probes, run: _Restored, ts, emit) -> dict:
    """Gradient and update norms, their cosines, and each stage's step's effect;
    returns the batch's metrics before any step."""
    K, tx = probes.K, optim.build_optimizer(run.config)
    g = {n: fn(ts.params, ts.state, run.batch) for n, fn in probes.per_window.items()}
    grad_of = lambda k, j: g[min(j - k + 1, K)][k]["stage"]  # ∂L_j/∂θ_k
    g_rule = probes.rule(ts.params, ts.state, run.batch)
    base = run.built.eval_step(ts, run.batch)
    loss_name = lambda j: _loss_name(j, K)
    for k in range(K):
        update = tx.update(g_rule[k], ts.opt_state[k], ts.params[k])[0]
        u = update["stage"]
        emit("update_norm", k, -1, _norm(u))
        one = list(ts.params)
        one[k] = optax.apply_updates(ts.params[k], update)
        moved = run.built.eval_step(ts.replace(params=tuple(one)), run.batch)
        for j in range(k, K):
            emit("grad_norm", k, j, _norm(grad_of(k, j)))
            emit("cos_update", k, j, _cos(u, jax.tree.map(jnp.negative, grad_of(k, j))))
            emit("cos_grad_global", k, j, _cos(grad_of(k, j), grad_of(k, K - 1)))
        for j in range(K):
            emit("dloss", k, j, float(moved[loss_name(j)] - base[loss_name(j)]))
    return base


def _emit_activations(probes: _Probes, ts, emit) -> None:
    """Every stage output's rms, its common share, what each stage adds, and the slopes."""
    hs = probes.activations(ts.params, ts.state, probes.batch)
    for k, h in enumerate(hs):
        emit("act_rms", k, -1, float(jnp.sqrt(jnp.mean(h**2))))
        # Share of h_k's energy in the one vector common to every token and position.
        common = jnp.sum(jnp.mean(h, axis=(0, 1)) ** 2) / jnp.mean(jnp.sum(h**2, -1))
        emit("common_share", k, -1, float(common))
        if k:
            emit("delta_rms", k, -1, float(jnp.sqrt(jnp.mean((h - hs[k - 1]) ** 2))))
    for k, slopes in probes.scale_slopes(ts.params, ts.state, probes.batch).items():
        for j, slope in slopes.items():
            emit("scale_slope", k, j, float(slope))


def probe_run(runs_dir: str, spec: str, out) -> None:
    """Writes the CSV rows of every probe for the checkpoints of SPEC = NAME[@STEPS]."""
    name, _, only = spec.partition("@")
    steps = {int(s) for s in only.split(",") if s}
    run = open_run(runs_dir, name, PROBE_BATCH, PROBE_SEED)
    probes = _Probes(run)
    for step, ts in checkpoints(run.workdir, run.template, steps):

        def emit(kind, k, j, value, step=step):
            out.write(f"{name},{step},{kind},{k},{j},{value:.6g}\n")
            out.flush()

        base = _emit_updates(probes, run, ts, emit)
        _emit_activations(probes, ts, emit)
        for j in range(probes.K):
            emit("loss", -1, j, float(base[_loss_name(j, probes.K)]))
        print(f"{name} step {step} done", file=sys.stderr, flush=True)


def final_eval(runs_dir: str, name: str, examples: int) -> None:
    """Writes RUNS_DIR/NAME/final_{examples}.json: the last checkpoint's test metrics."""
    from experiments.lib.metrics import Prefix, evaluate

    run = open_run(runs_dir, name)
    test_src = datasets.build_data(run.config, "test")
    *_, (step, ts) = checkpoints(run.workdir, run.template)
    metrics = evaluate(
        run.built.eval_step, ts, Prefix(test_src, examples), int(run.config.eval_batch_size),
        progress=False, text=True,
    )  # fmt: skip
    with open(os.path.join(run.workdir, f"final_{examples}.json"), "w") as f:
        json.dump({"step": step, "test_examples": examples, "test": metrics}, f, indent=2)


def leaf_norms(runs_dir: str, spec: str, out) -> None:
    """Rows run,step,stage,parameter,norm: every stage parameter's norm per checkpoint."""
    name, _, only = spec.partition("@")
    run = open_run(runs_dir, name)
    steps = {int(s) for s in only.split(",") if s}
    for step, ts in checkpoints(run.workdir, run.template, steps):
        for k, p in enumerate(ts.params):
            for path, leaf in jax.tree_util.tree_leaves_with_path(p["stage"]):
                key = "/".join(str(getattr(e, "key", e)) for e in path)
                out.write(f"{name},{step},{k},{key},{float(jnp.linalg.norm(leaf)):.6g}\n")


def main(argv: list[str]) -> None:
    if len(argv) >= 2 and argv[1] == "--leaves":
        sys.stdout.write("run,step,stage,parameter,norm\n")
        for spec in argv[3:]:
            leaf_norms(argv[2], spec, sys.stdout)
        return
    if len(argv) >= 2 and argv[1].startswith("--eval="):
        examples = int(argv[1].removeprefix("--eval="))
        for name in argv[3:]:
            final_eval(argv[2], name, examples)
        return
    if len(argv) < 3:
        sys.exit(__doc__)
    runs_dir, names = argv[1], argv[2:]
    sys.stdout.write("run,step,kind,k,j,value\n")
    for name in names:
        probe_run(runs_dir, name, sys.stdout)


if __name__ == "__main__":
    main(sys.argv)
