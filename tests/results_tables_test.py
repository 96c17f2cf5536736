"""README result tables: generated from docs/results/<name>/ files, and in sync."""

from __future__ import annotations

import os

import pytest

from experiments.lib import report, report_files
from ilbp.costs import Baseline, Throughput
from scripts import results_tables


def _write_results(root, name: str, accuracy: dict[str, list[float]], text: bool = False):
    """A tiny `experiments.compare` output: runs.csv, results.csv and command.txt."""
    directory = os.path.join(root, "docs", "results", name)
    os.makedirs(directory)
    runs = []
    for strategy, values in accuracy.items():
        for seed, value in enumerate(values):
            metrics = {"loss": value, "perplexity": 2.0**value} if text else {"accuracy": value}
            aux = float("nan") if strategy == "e2e" else value / 2
            metrics |= {"aux/0/accuracy": aux, "aux/1/accuracy": aux + 0.1}
            runs.append({"strategy": strategy, "seed": seed, **metrics, "step_time_s": 0.1})
    report_files.write_csv(os.path.join(directory, "runs.csv"), runs)
    pipeline = Baseline("zb", 4, 1e-3, 2**20)
    rows = []
    for i, strategy in enumerate(accuracy):
        best = None if strategy == "local" else pipeline
        throughput = Throughput(strategy, 1, 2e-3, 2 * 2**20, 1.5, best, 0.5 if best else None)
        times = [None, None] if strategy == "local" else [10.0 + i, 12.0 + i]
        row = {"strategy": strategy, "seeds": len(accuracy[strategy])}
        rows.append(row | report.prediction_columns(throughput, times))
    report_files.write_csv(os.path.join(directory, "results.csv"), rows)
    with open(os.path.join(directory, report_files.COMMAND_FILE), "w") as f:
        f.write(f"python -m experiments.compare --config=x.py --workdir=docs/results/{name}\n")
    return directory


IMAGES = {"e2e": [0.9, 0.8], "local": [0.5, 0.6], "pairwise": [0.7, 0.7], "3wise": [0.8, 0.7]}


def test_table_has_every_number_with_its_spread_and_the_recovery(tmp_path):
    _write_results(str(tmp_path), "tiny_k4", IMAGES)
    table = results_tables.render("tiny_k4", str(tmp_path))
    assert "`python -m experiments.compare --config=x.py --workdir=docs/results/tiny_k4`" in table
    e2e = "| e2e | 0.8500 ± 0.0707 (n=2) | – | 1.50 | 0.50 (zb, M=4) | 2 MiB / 1 MiB "
    assert e2e + "| 11 s ± 1.41 s (2/2) |" in table
    local = "| local | 0.5500 ± 0.0707 (n=2) | 0.275 / 0.375 | 1.50 | none fits | 2 MiB / – |"
    assert local + " not reached (0/2) |" in table
    # Per seed: (0.7 − 0.5)/(0.9 − 0.5) = 0.5 and (0.7 − 0.6)/(0.8 − 0.6) = 0.5;
    # 3wise: (0.8 − 0.5)/0.4 = 0.75 and (0.7 − 0.6)/0.2 = 0.5.
    assert "of test accuracy, per seed: pairwise 0.500 ± 0.000 (n=2); 3wise 0.625" in table
    assert "Not yet finished" not in table
    with open(os.path.join(str(tmp_path), "docs", "results", "tiny_k4", "results.md"), "w") as f:
        f.write("| table |\n\nNot yet finished, so not in this report: e2e seed 2.\n")
    table = results_tables.render("tiny_k4", str(tmp_path))
    assert table.rstrip().endswith(
        "results.md). Not yet finished, so not in this report: e2e seed 2."
    )


def test_language_model_tables_use_loss():
    runs = [
        {"strategy": s, "seed": str(i), "loss": str(v), "perplexity": "1"}
        for s, values in {"e2e": [2.0], "local": [3.0], "pairwise": [2.25]}.items()
        for i, v in enumerate(values)
    ]
    assert results_tables.quality_metric(runs) == "loss"
    assert results_tables.recovery(runs, "loss") == [pytest.approx(0.75)]
    assert results_tables.recovery(runs[:2], "loss") == []  # no pairwise run


def test_recovery_names_its_denominator_and_flags_it_when_it_is_noise():
    def runs(e2e: list[float], local: list[float]) -> list[dict[str, str]]:
        values = {"e2e": e2e, "local": local, "pairwise": [0.7, 0.7]}
        return [
            {"strategy": s, "seed": str(i), "accuracy": str(v)}
            for s, seeds in values.items()
            for i, v in enumerate(seeds)
        ]

    clear = results_tables.recovery_line(runs([0.9, 0.8], [0.5, 0.6]), "accuracy")
    assert clear.endswith("It divides by e2e − local = 0.3000 ± 0.1414 (n=2).")
    noise = results_tables.recovery_line(runs([0.62, 0.58], [0.6, 0.6]), "accuracy")
    assert (
        "e2e − local = 0.0000 ± 0.0283 (n=2): within 2 std of 0, so the ratios are noise" in noise
    )
    one = results_tables.recovery_line(runs([0.9], [0.5]), "accuracy")
    assert one.endswith("e2e − local = 0.4000 (n=1): one seed, no spread to tell it from 0.")
    assert "n/a" in results_tables.recovery_line(runs([0.9], [0.5])[:2], "accuracy")


def test_fill_and_check(tmp_path):
    _write_results(str(tmp_path), "tiny_k4", IMAGES)
    readme = tmp_path / "README.md"
    stale = (
        "# Title\n\n<!-- results:tiny_k4 -->\nold table\n<!-- /results -->\n\ntext\n"
        "<!-- results:later_k8 -->\n<!-- /results -->\n"
    )
    readme.write_text(stale)
    assert results_tables.main(["--check", f"--readme={readme}"]) == 1
    assert readme.read_text() == stale  # --check writes nothing
    assert results_tables.main([f"--readme={readme}"]) == 0
    filled = readme.read_text()
    assert filled.startswith("# Title\n\n<!-- results:tiny_k4 -->\n`python")
    assert "old table" not in filled and "\n\ntext\n" in filled
    assert "_No committed results yet: `docs/results/later_k8/` will hold them._" in filled
    assert results_tables.main(["--check", f"--readme={readme}"]) == 0
    assert results_tables.fill(filled, str(tmp_path)) == filled


def test_readme_is_in_sync_with_the_committed_results():
    assert results_tables.main(["--check"]) == 0
