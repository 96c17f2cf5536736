"""experiments.compare: strategies x seeds -> results.md/.csv/.png, and its refusals."""

from __future__ import annotations

import csv
import dataclasses
import math
import os

import ml_collections
import pytest

from experiments.lib import checkpoints, models, report, report_files
from ilbp import costs
from ilbp.schedule_graph import OpKind
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
    # Cost-fed predictions: global does all that e2e does and more; pipelined pairwise
    # beats global.
    assert rows[0]["pred_vs_e2e_split_M1"] <= 1.0
    assert rows[1]["pred_step_time_s"] < rows[0]["pred_step_time_s"]
    for r in rows:  # the best e2e pipeline fits in the strategy's activation memory
        assert r["pred_pipeline_activation_MiB"] <= r["pred_activation_MiB"] * (1 + 1e-9)
        assert r["target_reached"].endswith("/2")
    assert "| global |" in table and "Ranking by mean test accuracy" in table
    files = set(os.listdir(tmp_path))
    assert {"results.md", "results.csv", "runs.csv", "test_accuracy.png"} <= files
    with open(tmp_path / "curves.csv") as f:
        curves = list(csv.DictReader(f))
    finals = [r for r in curves if r["kind"] == "final"]
    assert len(finals) == 4 and all(r["step"] == finals[0]["step"] for r in finals)
    assert {"strategy", "seed", "step", "accuracy", "aux/0/accuracy"} <= set(curves[0])
    assert "quality_vs_time.png" in files
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
    with pytest.raises(checkpoints.IncompatibleCheckpointError, match="learning_rate: finished"):
        report.compare(c, str(tmp_path))
    assert fx.tree_digest(str(tmp_path)) == before

    # As committed (run records, no checkpoints): reported again without training, and
    # the same refusal, read from the finished runs' summaries.
    import shutil

    for strategy in ("global", "pairwise"):
        for seed in ("seed0", "seed1"):
            shutil.rmtree(tmp_path / strategy / seed / "checkpoints")
    runs_before = fx.tree_digest(str(tmp_path / "pairwise"))
    assert report.compare(_config(idx_dir), str(tmp_path))[0] == table
    assert fx.tree_digest(str(tmp_path / "pairwise")) == runs_before
    refused = checkpoints.IncompatibleCheckpointError
    with pytest.raises(refused, match="learning_rate: finished run has"):
        report.compare(c, str(tmp_path))


def test_quality_target():
    def run(strategy, metric, **test):
        return {"strategy": strategy, "metric": metric, "test": test}

    # e2e is the reference when compared, then global; LMs are judged by loss.
    images = [run("local", "accuracy", accuracy=0.5), run("e2e", "accuracy", accuracy=0.9)]
    images.append(run("e2e", "accuracy", accuracy=0.8))
    target = report.quality_target(images)
    assert (target.reference, target.metric, target.higher_is_better) == ("e2e", "accuracy", True)
    assert target.value == pytest.approx(0.98 * 0.85)
    text = [run("pairwise", "perplexity", loss=3.0), run("global", "perplexity", loss=2.0)]
    target = report.quality_target(text)
    assert (target.reference, target.metric, target.higher_is_better) == ("global", "loss", False)
    assert target.value == pytest.approx(2.0 / 0.98)


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
    predicted = {
        name: costs.Throughput(name, 1, 1e-3, 1.0, speedup, None, None)
        for name, speedup in (("e2e", 1.0), ("pairwise", 1.5))
    }
    rows = report.aggregate(summaries, predicted, {"e2e": [None], "pairwise": [1.0]})
    assert [r["aux1_accuracy_mean"] for r in rows][1] == 0.3
    assert all(math.isnan(rows[0][f"aux{k}_accuracy_mean"]) for k in range(2))
    target = report_files.QualityTarget("e2e", "accuracy", 0.49, True)
    table, _ = report_files.render_markdown(rows, summaries, config, target)
    assert "| e2e | 0.5000 (n=1) | — / — |" in table and "| 0.200 / 0.300 |" in table
    # One seed each: the gap is given without a verdict it has no spread for.
    assert "= +0.0000 (one seed: no spread to judge it by)" in table


def test_stage_costs_section_prices_each_op_on_the_hardware():
    """results.md's op-cost table: each op's FLOPs over the peak, each boundary's bytes
    over the link; strategies cut alike share one table, others get their own."""
    hardware = costs.Hardware("toy", flops_per_s=1e9, link_bytes_per_s=1e6)
    ops = {kind: (2e6, 0.0) for kind in OpKind}  # 2 ms per op on stage 0, none on 1
    shared = costs.StageCosts(ops, "flop", {}, (3 * 2**20, 512.0), (250.0,), batch_size=8)
    text = report_files.render_stage_costs({"e2e": shared, "pairwise": shared}, hardware)
    assert "| 0 | 2 ms | 2 ms | 2 ms | 2 ms | 2 ms | 2 ms | 2 ms | 3 MiB |" in text
    assert "| 1 | — | — | — | — | — | — | — | 512 B |" in text
    assert text.count("| stage |") == 1 and "e2e, pairwise:" not in text
    moved = dataclasses.replace(shared, batch_size=16)
    text = report_files.render_stage_costs({"e2e": shared, "pairwise": moved}, hardware)
    assert text.count("| stage |") == 2 and "\n\npairwise:\n\n" in text
    assert "| 0 | 2 ms | 2 ms | 2 ms | 2 ms | 2 ms | 2 ms | 4 ms | 3 MiB |" in text


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
    names = [models.build_strategy(r).name for r in runs]
    assert names == ["pairwise:sum", "3wise:mean", "global"]
    dirs = [os.path.relpath(report.run_dir("w", r), "w") for r in runs]
    assert dirs == ["pairwise_sum/seed0", "3wise_mean/seed0", "global/seed0"]


def test_compare_runs_e2e_beside_a_rule_and_aux_weight_it_has_no_use_for(idx_dir):
    c = _config(idx_dir, "k=3,combine=sum")
    c.aux_weight = 0.5
    c.compare.strategies, c.compare.seeds = "e2e,pairwise", "0"
    runs = report.run_configs(c)
    assert [models.build_strategy(r).name for r in runs] == ["e2e", "pairwise:sum"]
    dirs = [os.path.relpath(report.run_dir("w", r), "w") for r in runs]
    assert dirs == ["e2e/seed0", "pairwise_sum_aux0.5/seed0"]


def test_compare_run_directories_name_the_aux_weight(idx_dir):
    c = _config(idx_dir)
    c.compare.seeds = "3"
    runs = report.run_configs(c)
    assert report.run_dir("w", runs[1]) == os.path.join("w", "pairwise", "seed3")
    c.aux_weight = 0.5
    runs = report.run_configs(c)
    assert report.run_dir("w", runs[1]) == os.path.join("w", "pairwise_aux0.5", "seed3")


def test_sharded_compare_trains_each_run_once_then_reports(idx_dir, tmp_path):
    c = _config(idx_dir)
    assert report.compare(c, str(tmp_path), shard=(0, 2)) is None
    assert report.compare(c, str(tmp_path), shard=(1, 2)) is None
    assert not os.path.exists(tmp_path / "results.md")
    trained = sorted(
        os.path.join(s, d) for s in ("global", "pairwise") for d in os.listdir(tmp_path / s)
    )
    assert trained == ["global/seed0", "global/seed1", "pairwise/seed0", "pairwise/seed1"]
    before = fx.tree_digest(str(tmp_path / "pairwise"))
    _, rows = report.compare(c, str(tmp_path))
    assert [r["seeds"] for r in rows] == [2, 2]
    assert fx.tree_digest(str(tmp_path / "pairwise")) == before  # read back, not retrained
    with pytest.raises(ValueError, match="shard 2/2"):
        report.compare(c, str(tmp_path), shard=(2, 2))


def test_finished_only_reports_what_has_finished_and_trains_nothing(idx_dir, tmp_path):
    c = _config(idx_dir)
    report.compare(c, str(tmp_path), shard=(0, 2))  # runs 0 and 2: global seeds 0 and 1
    before = fx.tree_digest(str(tmp_path / "global"))
    table, rows = report.compare(c, str(tmp_path), finished_only=True)
    assert [(r["strategy"], r["seeds"]) for r in rows] == [("global", 2)]
    assert "Not yet finished, so not in this report: pairwise seed 0, pairwise seed 1." in table
    assert not os.path.exists(tmp_path / "pairwise")
    assert fx.tree_digest(str(tmp_path / "global")) == before


def test_time_to_target_cell():
    cell = report_files.time_to_target_cell
    assert cell(0.0328, 0.0, "3/3") == "32.8 ms ± 0 s (3/3)"  # every seed at one eval
    assert cell(2.5, float("nan"), "1/2") == "2.5 s (1/2)"  # one seed: no spread
    assert cell(float("nan"), float("nan"), "0/2") == "not reached (0/2)"
