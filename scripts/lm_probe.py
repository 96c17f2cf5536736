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


def probe_run(runs_dir: str, name: str, out) -> None:
    name, _, only = name.partition("@")
    steps = {int(s) for s in only.split(",") if s}
    workdir = os.path.join(runs_dir, name)
    config = load_config(workdir)
    train_src = datasets.build_data(config, "train")
    built = builders.build(config, train_src.info)
    model, K = built.model, built.model.num_stages
    batch = data.batches(train_src, PROBE_BATCH, seed=PROBE_SEED).batch_at(0)
    batch = jax.tree.map(jnp.asarray, batch)
    template = built.executor.to_train_state(built.executor.init(jax.random.PRNGKey(0), batch))
    tx = optim.build_optimizer(config)
    per_window = {
        n: jax.jit(lambda p, s, b, n=n: ilbp.grads(model, ilbp.Strategy(n), p, s, b)[0])
        for n in range(1, K + 1)
    }
    rule = jax.jit(lambda p, s, b: ilbp.grads(model, built.strategy, p, s, b)[0])

    @jax.jit
    def activations(params, state, batch):
        hs, h = [], batch[model.input_key]
        for k, stage in enumerate(model.stages[:-1]):
            h, _ = stage.apply(params[k]["stage"], state[k]["stage"], h, None, False)
            hs.append(h)
        return hs

    @jax.jit
    def scale_slopes(params, state, batch):
        """d L_j / d c at c = 1 with h_k replaced by c·h_k, for k < K - 1 and j > k."""
        loss = lambda j, logits: model.head_loss(j)(logits, batch)[0]

        def losses_after(k, c, h):
            out, h = {}, c * h
            for j in range(k + 1, K):
                h, _ = model.stages[j].apply(params[j]["stage"], state[j]["stage"], h, None, False)
                logits = h
                if j < K - 1:
                    logits, _ = model.heads[j].apply(
                        params[j]["head"], state[j]["head"], h, None, False
                    )
                out[j] = loss(j, logits)
            return out

        hs = activations(params, state, batch)
        return {
            k: jax.jacfwd(lambda c, k=k: losses_after(k, c, hs[k]))(jnp.float32(1.0))
            for k in range(K - 1)
        }

    def emit(step, kind, k, j, value):
        out.write(f"{name},{step},{kind},{k},{j},{value:.6g}\n")
        out.flush()

    for step, ts in checkpoints(workdir, template, steps):
        g = {n: fn(ts.params, ts.state, batch) for n, fn in per_window.items()}
        grad_of = lambda k, j, g=g: g[min(j - k + 1, K)][k]["stage"]  # ∂L_j/∂θ_k
        g_rule = rule(ts.params, ts.state, batch)
        updates = [tx.update(g_rule[k], ts.opt_state[k], ts.params[k])[0] for k in range(K)]
        base = built.eval_step(ts, batch)
        loss_name = lambda j: "loss" if j == K - 1 else f"aux/{j}/loss"
        for k in range(K):
            u = updates[k]["stage"]
            emit(step, "update_norm", k, -1, _norm(u))
            one = list(ts.params)
            one[k] = optax.apply_updates(ts.params[k], updates[k])
            moved = built.eval_step(ts.replace(params=tuple(one)), batch)
            for j in range(k, K):
                emit(step, "grad_norm", k, j, _norm(grad_of(k, j)))
                emit(step, "cos_update", k, j, _cos(u, jax.tree.map(jnp.negative, grad_of(k, j))))
                emit(step, "cos_grad_global", k, j, _cos(grad_of(k, j), grad_of(k, K - 1)))
            for j in range(K):
                emit(step, "dloss", k, j, float(moved[loss_name(j)] - base[loss_name(j)]))
        hs = activations(ts.params, ts.state, batch)
        for k, h in enumerate(hs):
            emit(step, "act_rms", k, -1, float(jnp.sqrt(jnp.mean(h**2))))
            # Share of h_k's energy in the one vector common to every token and position.
            common = jnp.sum(jnp.mean(h, axis=(0, 1)) ** 2) / jnp.mean(jnp.sum(h**2, -1))
            emit(step, "common_share", k, -1, float(common))
            if k:
                emit(step, "delta_rms", k, -1, float(jnp.sqrt(jnp.mean((h - hs[k - 1]) ** 2))))
        for k, slopes in scale_slopes(ts.params, ts.state, batch).items():
            for j, slope in slopes.items():
                emit(step, "scale_slope", k, j, float(slope))
        for j in range(K):
            emit(step, "loss", -1, j, float(base[loss_name(j)]))
        print(f"{name} step {step} done", file=sys.stderr, flush=True)


def final_eval(runs_dir: str, name: str, examples: int) -> None:
    """Writes RUNS_DIR/NAME/final_{examples}.json: the last checkpoint's test metrics."""
    from experiments.lib.metrics import Prefix, evaluate

    workdir = os.path.join(runs_dir, name)
    config = load_config(workdir)
    train_src, test_src = (datasets.build_data(config, split) for split in ("train", "test"))
    built = builders.build(config, train_src.info)
    batch = jax.tree.map(jnp.asarray, data.batches(train_src, 8, seed=0).batch_at(0))
    template = built.executor.to_train_state(built.executor.init(jax.random.PRNGKey(0), batch))
    *_, (step, ts) = checkpoints(workdir, template)
    metrics = evaluate(
        built.eval_step, ts, Prefix(test_src, examples), int(config.eval_batch_size),
        progress=False, text=True,
    )  # fmt: skip
    with open(os.path.join(workdir, f"final_{examples}.json"), "w") as f:
        json.dump({"step": step, "test_examples": examples, "test": metrics}, f, indent=2)


def leaf_norms(runs_dir: str, spec: str, out) -> None:
    """Rows run,step,stage,parameter,norm: every stage parameter's norm per checkpoint."""
    name, _, only = spec.partition("@")
    workdir = os.path.join(runs_dir, name)
    config = load_config(workdir)
    train_src = datasets.build_data(config, "train")
    built = builders.build(config, train_src.info)
    batch = jax.tree.map(jnp.asarray, data.batches(train_src, 8, seed=0).batch_at(0))
    template = built.executor.to_train_state(built.executor.init(jax.random.PRNGKey(0), batch))
    steps = {int(s) for s in only.split(",") if s}
    for step, ts in checkpoints(workdir, template, steps):
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
