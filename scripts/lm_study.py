"""The `stdlib_lm` study of the `last` rule: runs, table and figures.

    python scripts/lm_study.py list                  # every run and its command
    python scripts/lm_study.py run RUNS_DIR GROUP..  # train missing runs, in order
    python scripts/lm_study.py table RUNS_DIR [OUT]  # results.csv from the summaries
    python scripts/lm_study.py figures RUNS_DIR      # the PNGs from metrics.jsonl

A run is skipped when RUNS_DIR/NAME/summary.json exists, so `run` resumes; a run that
was interrupted resumes from its latest checkpoint (experiments.train does that).
Outputs go to docs/results/lm_last_rule/ (`table`: to OUT if given, for a later round of
runs kept apart from the first).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
OUT = os.path.join(ROOT, "docs", "results", "lm_last_rule")
CONFIG = "experiments/configs/stdlib_lm.py"
# Every run: progress bar off, intermediate evals on 512 test windows every 100 steps,
# the final eval on the first 2048 test windows, a checkpoint every 50 steps (all kept)
# for the offline probes (scripts/lm_probe.py). The core runs train 400 steps, the
# sweeps 200 (the cosine schedule then ends at 200) against 200-step references. Train
# metrics every step: the figures plot per-step curves of these short runs.
COMMON = (
    "--config.progress_bar=False",
    "--config.log_every_steps=1",
    "--config.final_eval_examples=2048",
)
LR = "--config.optimizer.learning_rate="
SEED1 = "--config.seed=1"


def _run(
    arg: str, *overrides: str, steps: int = 200, ckpt: int = 50
) -> tuple[str, tuple[str, ...]]:
    keep = steps // ckpt + 1
    flags = (f"--config.checkpoint_every_steps={ckpt}", f"--config.max_to_keep={keep}")
    return arg, (f"--config.num_train_steps={steps}", *flags, *overrides)


# name -> (config arg, overrides). Groups run in the order given on the command line.
OPT = "--config.optimizer."
SGD = (OPT + "name=sgd", LR + "0.1")  # momentum 0.9, same warmup, cosine and clipping
L8 = "--config.model.num_layers=8"
BLOCK_HEAD = "--config.model.aux_head=block_norm_unembed"  # a pre-LN block, LN, unembedding
GROUPS: dict[str, dict[str, tuple[str, tuple[str, ...]]]] = {
    "core": {
        "global": _run("global,k=4", steps=400),
        "pairwise": _run("pairwise,k=4", steps=400),
        "pairwise_sum": _run("pairwise,k=4,combine=sum", steps=400),
        "local": _run("local,k=4", steps=400),
    },
    "ref200": {
        "global_200": _run("global,k=4"),
        "pairwise_200": _run("pairwise,k=4", ckpt=10),
        "pairwise_sum_200": _run("pairwise,k=4,combine=sum", ckpt=10),
        "local_200": _run("local,k=4"),
    },
    "mech": {
        "pairwise_head_unembed": _run("pairwise,k=4", "--config.model.aux_head=unembed"),
        "pairwise_sgd": _run("pairwise,k=4", *SGD),
        "global_sgd": _run("global,k=4", *SGD),
        "pairwise_wd0": _run("pairwise,k=4", OPT + "weight_decay=0"),
        "pairwise_aux0.1": _run("pairwise,k=4", "--config.aux_weight=0.1"),
    },
    "rules": {
        "3wise": _run("3wise,k=4"),
        "3wise_sum": _run("3wise,k=4,combine=sum"),
        "pairwise_mean": _run("pairwise,k=4,combine=mean"),
    },
    "depth": {
        "pairwise_k2": _run("pairwise,k=2"),
        "pairwise_k8": _run("pairwise,k=8", L8),
        "pairwise_sum_k8": _run("pairwise,k=8,combine=sum", L8),
        "local_k8": _run("local,k=8", L8),
        "global_k8": _run("global,k=8", L8),
    },
    "optim": {
        "pairwise_lr1e-3": _run("pairwise,k=4", LR + "1e-3"),
        "pairwise_warmup200": _run("pairwise,k=4", OPT + "warmup_steps=200"),
        "pairwise_noclip": _run("pairwise,k=4", OPT + "grad_clip_norm=0"),
        "pairwise_aux3": _run("pairwise,k=4", "--config.aux_weight=3"),
    },
    "heads": {
        "pairwise_head_block": _run("pairwise,k=4", BLOCK_HEAD),
        "pairwise_sum_head_unembed": _run(
            "pairwise,k=4,combine=sum", "--config.model.aux_head=unembed"
        ),
        "local_head_unembed": _run("local,k=4", "--config.model.aux_head=unembed"),
        "pairwise_head_block_seed1": _run("pairwise,k=4", BLOCK_HEAD, SEED1),
        "local_head_block": _run("local,k=4", BLOCK_HEAD),
        "3wise_head_block": _run("3wise,k=4", BLOCK_HEAD),
    },
    "dtype": {
        "pairwise_bf16": _run("pairwise,k=4", "--config.model.dtype=bfloat16"),
        "global_bf16": _run("global,k=4", "--config.model.dtype=bfloat16"),
    },
    "seed1": {
        "pairwise_200_seed1": _run("pairwise,k=4", SEED1),
        "pairwise_sum_200_seed1": _run("pairwise,k=4,combine=sum", SEED1),
        "local_200_seed1": _run("local,k=4", SEED1),
        "global_200_seed1": _run("global,k=4", SEED1),
    },
    "seed1_400": {
        "pairwise_seed1": _run("pairwise,k=4", SEED1, steps=400),
        "pairwise_sum_seed1": _run("pairwise,k=4,combine=sum", SEED1, steps=400),
        "local_seed1": _run("local,k=4", SEED1, steps=400),
        "global_seed1": _run("global,k=4", SEED1, steps=400),
    },
}


# The runs whose checkpoints scripts/lm_probe.py reads (outputs: OUT/probe_NAME.csv).
PROBED = (
    "global",
    "pairwise",
    "pairwise_200",
    "pairwise_sum",
    "pairwise_head_unembed",
    "pairwise_sgd",
    "global_sgd",
)


def command(name: str, runs_dir: str, arg: str, overrides: tuple[str, ...]) -> list[str]:
    return [
        sys.executable,
        "-m",
        "experiments.train",
        f"--config={CONFIG}:{arg}",
        f"--workdir={os.path.join(runs_dir, name)}",
        *COMMON,
        *overrides,
    ]


def all_runs() -> dict[str, tuple[str, tuple[str, ...]]]:
    return {name: spec for group in GROUPS.values() for name, spec in group.items()}


def cmd_list() -> None:
    for group, runs in GROUPS.items():
        print(f"# {group}")
        for name, (arg, overrides) in runs.items():
            print(" ".join(command(name, "RUNS", arg, overrides)[1:]))


def cmd_run(runs_dir: str, groups: list[str]) -> None:
    """Trains the named groups' (or single runs') missing runs, in the order given."""
    specs = all_runs()
    names = [n for g in groups for n in GROUPS.get(g, [g])]
    unknown = [n for n in names if n not in specs]
    if unknown:
        sys.exit(f"Unknown groups or runs {unknown}; see `python scripts/lm_study.py list`.")
    for name in dict.fromkeys(names):
        if os.path.exists(os.path.join(runs_dir, name, "summary.json")):
            continue
        cmd = command(name, runs_dir, *specs[name])
        print(" ".join(cmd), flush=True)
        subprocess.run(cmd, cwd=ROOT, check=False)


def read_jsonl(path: str) -> list[dict]:
    """Records of a metrics.jsonl, the last one of each (kind, step), in step order."""
    latest = {}
    with open(path) as f:
        for line in f:
            if line.strip():
                r = json.loads(line)
                latest[(r["kind"], r["step"])] = r
    return sorted(latest.values(), key=lambda r: r["step"])


FINAL_EXAMPLES = 2048


def finished_runs(runs_dir: str) -> dict[str, dict]:
    """name -> summary.json of every finished run of GROUPS, in GROUPS order.

    A run whose final eval used another number of test windows takes its "test" from
    RUN/final_2048.json (`python scripts/lm_probe.py --eval=2048 RUNS_DIR NAME`).
    """
    out = {}
    for name in all_runs():
        path = os.path.join(runs_dir, name, "summary.json")
        if not os.path.exists(path):
            continue
        with open(path) as f:
            out[name] = json.load(f)
        if out[name]["test_examples"] != FINAL_EXAMPLES:
            path = os.path.join(runs_dir, name, f"final_{FINAL_EXAMPLES}.json")
            if not os.path.exists(path):
                del out[name]
                print(f"skipping {name}: no eval on {FINAL_EXAMPLES} windows", file=sys.stderr)
                continue
            with open(path) as f:
                out[name].update(json.load(f))
    return out


def cmd_table(runs_dir: str, out: str = OUT) -> None:
    """OUT/results.csv and results.md (one row per finished run), curves.csv, norms.csv."""
    os.makedirs(out, exist_ok=True)
    runs, specs = finished_runs(runs_dir), all_runs()
    group_of = {name: g for g, runs_ in GROUPS.items() for name in runs_}
    max_k = max((s["num_stages"] for s in runs.values()), default=1)
    aux = [f"aux{k}_loss" for k in range(max_k - 1)]
    header = ["run", "group", "strategy", "K", "seed", "steps", "test_loss", "test_ppl"]
    header += ["test_bits_per_byte", *aux, "step_time_s", "config_arg", "overrides"]
    with open(os.path.join(out, "results.csv"), "w") as f:
        f.write(",".join(header) + "\n")
        for name, s in runs.items():
            test, K = s["test"], s["num_stages"]
            arg, overrides = specs[name]
            row = [name, group_of[name], s["strategy"], K, s["seed"], s["steps"]]
            row += [f"{test['loss']:.4f}", f"{test['perplexity']:.3f}"]
            row += [f"{test['loss'] / math.log(2):.4f}"]
            row += [f"{test[f'aux/{k}/loss']:.4f}" if k < K - 1 else "" for k in range(max_k - 1)]
            row += [f"{s['step_time_s']:.3f}", f'"{arg}"', '"' + " ".join(overrides) + '"']
            f.write(",".join(str(x) for x in row) + "\n")
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(
            "| run | strategy | K | seed | steps | test loss (final head) | perplexity "
            "| aux head losses | what differs from the config |\n"
            "|---|---|---|---|---|---|---|---|---|\n"
        )
        for name, s in runs.items():
            test, K = s["test"], s["num_stages"]
            aux = " / ".join(f"{test[f'aux/{k}/loss']:.3f}" for k in range(K - 1))
            arg, overrides = specs[name]
            diff = " ".join(o.removeprefix("--config.") for o in overrides[3:]) or "-"
            f.write(
                f"| {name} | {s['strategy']} | {K} | {s['seed']} | {s['steps']} "
                f"| {test['loss']:.3f} | {test['perplexity']:.2f} | {aux} | {diff} |\n"
            )
    write_curves(runs_dir, list(runs), out)
    print(f"{len(runs)} runs -> {out}: results.csv, results.md, curves.csv, norms.csv")


CURVE_METRICS = ("loss", "aux/{k}/loss", "grad_norm/{k}", "update_norm/{k}", "param_norm/{k}")


def write_curves(runs_dir: str, names: list[str], out: str, every: int = 10) -> None:
    """OUT/curves.csv: every run's train metrics every `every` steps (run,step,metric,value);
    norms.csv: per run and stage, the mean grad and update norms over steps 101..300
    (101..200 for runs shorter than 400 steps) and the final parameter norm."""
    with (
        open(os.path.join(out, "curves.csv"), "w") as curves,
        open(os.path.join(out, "norms.csv"), "w") as norms,
    ):
        curves.write("run,step,metric,value\n")
        norms.write("run,stage,steps,mean_grad_norm,mean_update_norm,final_param_norm\n")
        for name in names:
            records = read_jsonl(os.path.join(runs_dir, name, "metrics.jsonl"))
            train = [r for r in records if r["kind"] == "train"]
            K = sum(1 for key in train[0] if key.startswith("grad_norm/"))
            names_k = [m.format(k=k) for m in CURVE_METRICS for k in range(K)]
            for r in train:
                if r["step"] % every == 0 or r["step"] == 1:
                    for metric in dict.fromkeys(names_k):
                        if metric in r:
                            curves.write(f"{name},{r['step']},{metric},{r[metric]:.5g}\n")
            end = 300 if train[-1]["step"] >= 400 else 200
            window = [r for r in train if 100 < r["step"] <= end]
            for k in range(K):
                mean = lambda m, k=k, w=window: sum(r[f"{m}/{k}"] for r in w) / len(w)
                norms.write(
                    f"{name},{k},101-{end},{mean('grad_norm'):.4g},{mean('update_norm'):.4g},"
                    f"{train[-1][f'param_norm/{k}']:.4g}\n"
                )


HEAD_COLORS = ("tab:blue", "tab:orange", "tab:green", "tab:purple", "tab:brown", "tab:pink")


def _smooth(values: list[float], alpha: float = 0.1) -> list[float]:
    out, ema = [], values[0]
    for v in values:
        ema = (1 - alpha) * ema + alpha * v
        out.append(ema)
    return out


def _series(records: list[dict], name: str, kind: str = "train") -> tuple[list, list]:
    rs = [r for r in records if r["kind"] == kind and name in r]
    return [r["step"] for r in rs], [r[name] for r in rs]


def _loss_names(K: int) -> list[tuple[str, str]]:
    return [(f"aux/{k}/loss", f"head {k}") for k in range(K - 1)] + [("loss", f"final ({K - 1})")]


def unigram_loss(runs_dir: str, name: str = "global", windows: int = 4000) -> float:
    """Entropy (nats/byte) of the training split's byte frequencies: the unigram level."""
    import numpy as np

    sys.path.insert(0, ROOT)
    import ml_collections

    from experiments.lib import datasets

    with open(os.path.join(runs_dir, name, "config.json")) as f:
        config = ml_collections.ConfigDict(json.load(f))
    src = datasets.build_data(config, "train")
    idx = np.random.default_rng(0).choice(len(src), min(windows, len(src)), replace=False)
    counts = np.zeros(src.info.vocab_size)
    for i in idx:
        np.add.at(counts, src[int(i)]["targets"], 1)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def fig_heads(runs_dir: str, names: list[str], path: str, unigram: float) -> None:
    """Train loss of every head (EMA-smoothed) over steps, one panel per run."""
    import matplotlib.pyplot as plt

    names = [n for n in names if os.path.exists(os.path.join(runs_dir, n, "metrics.jsonl"))]
    if not names:
        return
    cols = min(4, len(names))
    rows = -(-len(names) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 2.9 * rows), squeeze=False)
    for ax, name in zip(axes.flat, names):
        records = read_jsonl(os.path.join(runs_dir, name, "metrics.jsonl"))
        K = sum(1 for key in records[0] if key.startswith("grad_norm/"))
        for i, (metric, label) in enumerate(_loss_names(K)):
            steps, values = _series(records, metric)
            color = "black" if metric == "loss" else plt.cm.viridis(i / max(K - 1, 1))
            ax.plot(steps, _smooth(values), color=color, lw=1.2, label=label)
        ax.axhline(unigram, color="gray", ls=":", lw=1, label="unigram")
        ax.set_title(name, fontsize=9)
        ax.set_ylim(1.5, 4.0)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(names) :]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.supxlabel("step")
    fig.supylabel("train loss (nats/byte, EMA 0.1)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def fig_norms(runs_dir: str, names: list[str], path: str) -> None:
    """grad_norm/k, update_norm/k and param_norm/k over steps: rows metrics, cols runs."""
    import matplotlib.pyplot as plt

    names = [n for n in names if os.path.exists(os.path.join(runs_dir, n, "metrics.jsonl"))]
    if not names:
        return
    metrics = ("grad_norm", "update_norm", "param_norm")
    fig, axes = plt.subplots(3, len(names), figsize=(3.4 * len(names), 7.5), squeeze=False)
    for c, name in enumerate(names):
        records = read_jsonl(os.path.join(runs_dir, name, "metrics.jsonl"))
        K = sum(1 for key in records[0] if key.startswith("grad_norm/"))
        for r, metric in enumerate(metrics):
            ax = axes[r, c]
            for k in range(K):
                steps, values = _series(records, f"{metric}/{k}")
                if values:
                    ax.plot(steps, _smooth(values, 0.2), lw=1, label=f"stage {k}")
            ax.set_yscale("log")
            ax.grid(alpha=0.3)
            if r == 0:
                ax.set_title(name, fontsize=9)
            if c == 0:
                ax.set_ylabel(metric)
    axes[0, 0].legend(fontsize=7)
    fig.supxlabel("step")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def fig_final(runs: dict[str, dict], path: str, unigram: float) -> None:
    """Final test loss of the last head and every aux head, per run."""
    import matplotlib.pyplot as plt

    names = list(runs)
    fig, ax = plt.subplots(figsize=(7, 0.28 * len(names) + 1.2))
    for i, name in enumerate(names):
        test, K = runs[name]["test"], runs[name]["num_stages"]
        aux = [test[f"aux/{k}/loss"] for k in range(K - 1)]
        ax.scatter(aux, [i] * len(aux), s=12, color="tab:blue", alpha=0.6)
        ax.scatter([test["loss"]], [i], s=30, color="black", marker="D")
    ax.axvline(unigram, color="gray", ls=":", lw=1)
    ax.set_yticks(range(len(names)), names, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("test loss, nats/byte (black: final head; blue: aux heads; dotted: unigram)")
    ax.grid(alpha=0.3, axis="x")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def read_probe(path: str) -> dict[tuple[str, int, int], list[tuple[int, float]]]:
    """(kind, k, j) -> [(step, value)] from a scripts/lm_probe.py CSV."""
    import csv

    out: dict[tuple[str, int, int], list[tuple[int, float]]] = {}
    with open(path) as f:
        for r in csv.DictReader(f):
            key = (r["kind"], int(r["k"]), int(r["j"]))
            out.setdefault(key, []).append((int(r["step"]), float(r["value"])))
    return out


def fig_probe(names: list[str], path: str) -> None:
    """Per probed run: activation scale, dilution slope, and whose loss each stage's
    update lowers (docs/results/lm_last_rule/probe_NAME.csv)."""
    import matplotlib.pyplot as plt
    import numpy as np

    names = [n for n in names if os.path.exists(os.path.join(OUT, f"probe_{n}.csv"))]
    if not names:
        return
    panels = [
        ("act_rms", "rms of stage k's output h_k", "log"),
        ("scale_slope", "dL_{k+1}/dc, h_k -> c h_k (c = 1)", "symlog"),
        ("cos_update", "cos(u_k, -dL_final/dθ_k)", "linear"),
        ("dloss", "L_final change from stage k's step", "symlog"),
    ]
    fig, axes = plt.subplots(len(panels), len(names), figsize=(3.4 * len(names), 9.5))
    shared = np.array(axes).reshape(len(panels), len(names))[0]
    for ax in shared[1:]:
        ax.sharey(shared[0])
    axes = axes.reshape(len(panels), len(names))
    for c, name in enumerate(names):
        probe = read_probe(os.path.join(OUT, f"probe_{name}.csv"))
        K = 1 + max(k for (_, k, _) in probe)
        for r, (kind, label, scale) in enumerate(panels):
            ax = axes[r, c]
            for k in range(K):
                j = {"act_rms": -1, "scale_slope": k + 1, "cos_update": K - 1, "dloss": K - 1}[kind]
                points = probe.get((kind, k, j))
                if points:
                    ax.plot(*zip(*points), marker=".", lw=1, label=f"stage {k}")
            if scale == "symlog":
                ax.set_yscale("symlog", linthresh=1e-3)
                ax.axhline(0, color="gray", lw=0.6)
            elif scale == "log":
                ax.set_yscale("log")
            else:
                ax.axhline(0, color="gray", lw=0.6)
            ax.grid(alpha=0.3)
            if r == 0:
                ax.set_title(name, fontsize=9)
            if c == 0:
                ax.set_ylabel(label, fontsize=8)
    axes[0, 0].legend(fontsize=7)
    fig.supxlabel("checkpoint step")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def cmd_figures(runs_dir: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    os.makedirs(OUT, exist_ok=True)
    unigram = unigram_loss(runs_dir)
    with open(os.path.join(OUT, "unigram.json"), "w") as f:
        json.dump({"unigram_loss_nats_per_byte": unigram, "windows": 4000, "seed": 0}, f)
    core = list(GROUPS["core"])
    fig_heads(runs_dir, core, os.path.join(OUT, "heads_core.png"), unigram)
    others = [n for n in all_runs() if n not in core]
    fig_heads(runs_dir, others, os.path.join(OUT, "heads_variants.png"), unigram)
    fig_norms(runs_dir, ["global", "local", "pairwise", "pairwise_sum", "3wise"],
              os.path.join(OUT, "norms_core.png"))  # fmt: skip
    fig_final(finished_runs(runs_dir), os.path.join(OUT, "final_losses.png"), unigram)
    fig_probe(PROBED, os.path.join(OUT, "probe.png"))
    print(f"figures -> {OUT}")


def main(argv: list[str]) -> None:
    if len(argv) < 2:
        sys.exit(__doc__)
    what = argv[1]
    if what == "list":
        cmd_list()
    elif what == "run":
        cmd_run(argv[2], argv[3:])
    elif what == "table":
        cmd_table(*argv[2:4])
    elif what == "figures":
        cmd_figures(argv[2])
    else:
        sys.exit(f"Unknown command {what!r}.\n{__doc__}")


if __name__ == "__main__":
    main(sys.argv)
