"""benchmarks/compare_searchers.py: the records, curves and table it builds from search folders."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import compare_searchers as CS  # noqa: E402


def _search(folder: Path, method: str) -> Path:
    mod = folder / "modularize"
    mod.mkdir(parents=True)
    per_class = [{"class": c, "kept_fraction": 0.5 + c / 10} for c in range(2)]
    summary = {"method": method, "ensemble_test_accuracy": 0.9, "test_accuracy_loss": 0.0,
               "mean_kept_fraction": 0.55, "mean_params_fraction": 0.4, "mean_macs_fraction": 0.3,
               "ensemble_diff": 0.5, "generations_run": 3, "epochs_run": 2, "per_class": per_class,
               "importance_time_s": 2.0, "compile_time_s": 3.0}
    if method == "ga":
        history = {"generations": [{"generation": g, "best_acc": 0.8 + g / 100, "time_s": 1.0,
                                    "best_kept_fraction": [0.6, 0.4 - g / 10]} for g in range(3)]}
    else:
        history = {"epochs": [{"epoch": e, "valid_accuracy": 0.85, "kept_fraction": 1.0 - e / 10,
                               "time_s": 4.0} for e in range(2)]}
    (mod / "summary.json").write_text(json.dumps(summary))
    (mod / "history.json").write_text(json.dumps(history))
    return mod


def test_curves_records_and_table(tmp_path):
    ga = _search(tmp_path / "ga", "ga")
    grad = _search(tmp_path / "grad", "gradient")
    curves = CS.curves_of("ga", ga)
    assert curves["time_s"] == [6.0, 7.0, 8.0]  # importance + compile before generation 0
    assert curves["valid_accuracy"] == pytest.approx([0.8, 0.81, 0.82])
    assert curves["kept_fraction"] == pytest.approx([0.5, 0.45, 0.4])
    assert CS.curves_of("gradient", grad)["time_s"] == [4.0, 8.0]
    rec = CS.record_of("ga", ga, {"population_size": 10, "num_valid": 1000}, 8.0, "history", [])
    assert rec["wall_time_source"] == "history" and rec["per_class_kept_fraction"] == [0.5, 0.6]
    with pytest.raises(CS.CompareError, match="holds a 'ga' search, not 'gradient'"):
        CS.record_of("gradient", ga, {}, 1.0, "measured", [])
    g = CS.record_of("gradient", grad, {"gradient": {"head_epochs": 1, "modular_epochs": 1,
                                                     "num_train": None}}, 8.04, "measured", [])
    table = CS.markdown_table({"ga": rec, "gradient": g}).splitlines()
    assert table[0].startswith("| searcher | wall time | budget |")
    assert table[2] == ("| ga | 8 s (recorded) | 10 x 3 generations, 1000 valid images | 90.00% | +0.00 "
                        "| 55.00% | 40.00% | 30.00% | 50.00% |")
    assert table[3].startswith("| gradient | 8 s | 2 epochs (1 heads-only + 1), all train images | 90.00% |")
    with pytest.raises(CS.CompareError, match="no modularize/summary.json"):
        CS.existing_ga(tmp_path / "nothing", tmp_path)
