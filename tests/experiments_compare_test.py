"""experiments.compare: strategies x seeds -> results.md/.csv/.png, and its refusals."""

from __future__ import annotations

import csv
import math
import os

import ml_collections
import pytest

from experiments.lib import builders, checkpoints, report
from tests import experiments_fixtures as fx


@pytest.fixture(scope="module")
def idx_dir(tmp_path_factory):
    return fx.write_idx_dir(str(tmp_path_factory.mktemp("idx")))


def _config(idx_dir, arg="pairwise,k=3"):
    c = fx.tiny_image_config(f"idx:{idx_dir}", arg)
    c.compare.strategies, c.compare.seeds = "global,pairwise", "0,1"
    return c


def test_compare_writes_results(idx_dir, tmp_path):
    table, rows = report.compare(_config(idx_dir), str(tmp_path))
    assert [r["strategy"] for r in rows] == ["global", "pairwise"]
    assert all(r["seeds"] == 2 and r["test_accuracy_std"] >= 0 for r in rows)
    assert rows[0]["predicted_throughput_vs_global_K3"] == pytest.approx(1.0)
    assert rows[1]["predicted_throughput_vs_global_K3"] > 1.0  # pipelined pairwise
    assert "| global |" in table and "Ranking by mean test accuracy" in table
    files = set(os.listdir(tmp_path))
    assert {"results.md", "results.csv", "runs.csv", "test_accuracy.png"} <= files
    assert sorted(os.listdir(tmp_path / "pairwise")) == ["seed0", "seed1"]
    with open(tmp_path / "results.md") as f:
        text = f.read()
    assert table in text and "## Runs" in text
    with open(tmp_path / "runs.csv") as f:
        runs = list(csv.DictReader(f))
    assert len(runs) == 4 and {"aux/0/accuracy", "aux/1/accuracy"} <= set(runs[0])
    assert os.path.getsize(tmp_path / "test_accuracy.png") > 1000

    # Into the same workdir with another K or learning rate: refused before any run,
    # nothing changed (a finished run is never reused under another setting).
    before = fx.tree_digest(str(tmp_path))
    with pytest.raises(checkpoints.IncompatibleCheckpointError, match="K=3 stages"):
        report.compare(_config(idx_dir, "k=2"), str(tmp_path))
    c = _config(idx_dir)
    c.optimizer.learning_rate = 0.05
    with pytest.raises(checkpoints.IncompatibleCheckpointError, match="learning_rate: checkpo"):
        report.compare(c, str(tmp_path))
    assert fx.tree_digest(str(tmp_path)) == before


def test_e2e_rows_show_no_aux_accuracy():
    """e2e's heads are never trained, so its aux columns are empty, not their init's."""
    summaries = [
        dict(
            strategy=name,
            seed=0,
            metric="accuracy",
            num_stages=3,
            step_time_s=0.1,
            wall_time_s=1.0,
            steps=2,
            test_examples=8,
            test={"accuracy": 0.5, "aux/0/accuracy": 0.2, "aux/1/accuracy": 0.3},
        )
        for name in ("e2e", "pairwise")
    ]
    config = ml_collections.ConfigDict(
        dict(name="x", batch_size=8, microbatches=1, eval_examples=0, eval_every_steps=1)
    )
    rows = report.aggregate(summaries, {"e2e": 1.0, "pairwise": 1.5})
    assert [r["aux1_accuracy_mean"] for r in rows][1] == 0.3
    assert all(math.isnan(rows[0][f"aux{k}_accuracy_mean"]) for k in range(2))
    table, _ = report.render_markdown(rows, summaries, config)
    assert "| e2e | 0.5000 ± nan | — / — |" in table and "| 0.200 / 0.300 |" in table


def test_compare_bad_lists(idx_dir, tmp_path):
    c = _config(idx_dir)
    c.compare.strategies = "global,sideways"
    with pytest.raises(ValueError, match="Unknown strategy 'sideways'"):
        report.compare(c, str(tmp_path / "a"))
    c = _config(idx_dir)
    c.compare.seeds = "0,one"
    with pytest.raises(ValueError, match="seeds must be integers"):
        report.compare(c, str(tmp_path / "b"))
    assert not os.path.exists(tmp_path / "a") and not os.path.exists(tmp_path / "b")


def test_compare_keeps_the_config_rule_unless_the_name_has_one(idx_dir):
    c = _config(idx_dir, "k=3,combine=sum")
    c.compare.strategies, c.compare.seeds = "pairwise,nwise=3:mean,global:last", "0"
    runs = report.run_configs(c)
    names = [builders.build_strategy(r).name for r in runs]
    assert names == ["pairwise:sum", "3wise:mean", "global"]
    dirs = [os.path.relpath(report.run_dir("w", r), "w") for r in runs]
    assert dirs == ["pairwise_sum/seed0", "3wise_mean/seed0", "global/seed0"]


def test_compare_run_directories_name_the_aux_weight(idx_dir):
    c = _config(idx_dir)
    c.compare.seeds = "3"
    runs = report.run_configs(c)
    assert report.run_dir("w", runs[1]) == os.path.join("w", "pairwise", "seed3")
    c.aux_weight = 0.5
    runs = report.run_configs(c)
    assert report.run_dir("w", runs[1]) == os.path.join("w", "pairwise_aux0.5", "seed3")
