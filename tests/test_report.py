"""Tests of jaxsplit.report on tiny fake run folders."""

from __future__ import annotations

import json

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402

from jaxsplit import config, report  # noqa: E402


def _png(path):
    fig, ax = plt.subplots(figsize=(1, 1))
    ax.plot([0, 1], [0, 1])
    fig.savefig(path)
    plt.close(fig)


def _metrics(precision, recall, non_tc):
    return {"tc_precision": precision, "tc_recall": recall, "tc_f1": 2 * precision * recall / (precision + recall),
            "non_tc_accuracy": non_tc, "accuracy": 0.9, "tc_ece": 0.05, "num_examples": 60, "num_tc": 10,
            "confusion_matrix": [[45, 5], [2, 8]]}


def _fake_run(tmp_path):
    run = tmp_path / "runs" / "fake"
    run.mkdir(parents=True)
    config.save(config.load(overrides=["name=fake", "model.width=0.25"]), run / "config.yaml")
    (run / "metrics.json").write_text(json.dumps({
        "test_accuracy": 0.9123, "valid_accuracy": 0.9345, "best_epoch": 7, "num_params": 12345,
        "model": {"family": "simcnn", "width": 0.25}, "num_classes": 10, "num_train": 48000,
        "data": {"source": "idx", "path": "/data/fashion-mnist",
                 "checksums": {"train-images-idx3-ubyte.gz": "sha256:abc123"},
                 "splits": {"test": {"files": [{"path": "/data/fashion-mnist/t10k-images-idx3-ubyte.gz",
                                                "sha256": "cc1d09f00d", "bytes": 4422079}]}}},
        "history": [{"epoch": e, "train_loss": 1.0 / (e + 1), "valid_accuracy": 0.8 + e / 100} for e in range(40)],
    }))
    mod = run / "modularize"
    mod.mkdir()
    (mod / "summary.json").write_text(json.dumps({
        "ensemble_valid_accuracy": 0.8765, "ensemble_test_accuracy": 0.8512, "ensemble_diff": 0.5277,
        "model_test_accuracy": 0.9123, "stats_source": "jaxsplit.extract.stats_from_mask", "note": None,
        "strategy": "kernel_ga", "population_size": 16, "generations_run": 50, "num_valid_images": 1000,
        "per_class": [{"class": c, "name": n, "kept_fraction": 0.4 + c / 100, "macs_fraction": 0.45}
                      for c, n in enumerate(("T-shirt/top", "Trouser", "Pullover"))],
    }))
    (mod / "history.json").write_text(json.dumps({"best_fitness": [0.1 * g for g in range(50)]}))
    _png(mod / "search_curves.png")
    pdir = run / "patch"
    pdir.mkdir()
    before, after, whole = _metrics(0.6111, 0.5, 0.97), _metrics(0.8222, 0.7333, 0.975), _metrics(0.85, 0.75, 0.98)
    results = {
        "task": "self", "protocol": "strong model trained on all 10 classes", "primary_calibration": "min_max",
        "calibrations": ["min_max", "platt"], "target_classes": [0, 1],
        "weak_model": {"name": "weak_cnn", "width": 0.5, "epochs": 2},
        "dataset": "fashion_mnist",
        "modules": {"searcher": "gradient", "file": "modularize/modules.npz"},
        "per_tc": {str(tc): {"before": before, "module_patch": {"min_max": a, "platt": a},
                             "whole_model_patch": {"min_max": whole, "platt": whole},
                             "module": {"macs_fraction": 0.4567, "params_fraction": 0.5}}
                   for tc, a in ((0, after), (6, _metrics(0.9, 0.45, 0.97)))},
        "average": {"before": before, "module_patch": {"min_max": after, "platt": after},
                    "whole_model_patch": {"min_max": whole}},
        "acceptance": {"calibration": "min_max", "criterion": "precision and recall up, non-TC drop <= 1 pt",
                       "delta_tc_precision": 0.2111, "delta_tc_recall": 0.2333, "delta_non_tc_accuracy": 0.005,
                       "passed": True},
    }
    (pdir / "patch_results.json").write_text(json.dumps(results))
    _png(pdir / "patch_tc_bars.png")
    return run


def test_report_contains_every_stage(tmp_path):
    run = _fake_run(tmp_path)
    out = report.write_report(run)
    assert out == run / "report.md" and out.is_file()
    text = out.read_text()
    assert "# jaxsplit report: fake" in text
    # training
    assert "0.9123" in text and "best_epoch" in text and "40 rows" in text
    # modularization: scalars, per-class table, summarised series, plot link
    assert "0.8765" in text and "50 values" in text
    assert "| class | kernels % | MACs % |" in text and "| T-shirt/top | 40.00 | 45.00 |" in text
    assert "![search_curves](modularize/search_curves.png)" in text
    # patching: averages and per-TC percentages, acceptance, plot
    assert "61.11" in text and "82.22" in text and "73.33" in text
    assert "| Shirt | 61.11 | 90.00 |" in text  # per-TC rows by class name
    assert "PASSED" in text and "+21.11" in text
    assert "45.67" in text  # module MACs %
    assert "Modules: `modularize/modules.npz`, made by the gradient searcher" in text
    assert "![patch_tc_bars](patch/patch_tc_bars.png)" in text
    assert "Not run yet" not in text


def test_report_notes_missing_stages(tmp_path):
    run = tmp_path / "empty_run"
    run.mkdir()
    text = report.write_report(run).read_text()
    assert text.count("Not run yet") == 3
    assert "metrics.json" in text and "modularize/summary.json" in text and "patch/patch_results.json" in text


def test_report_survives_corrupt_json(tmp_path):
    run = tmp_path / "bad"
    run.mkdir()
    (run / "metrics.json").write_text("{not json")
    text = report.write_report(run).read_text()
    assert "could not read `metrics.json`" in text


def test_report_missing_folder(tmp_path):
    with pytest.raises(report.ReportError, match="does not exist"):
        report.write_report(tmp_path / "nope")


def test_report_opens_with_a_summary(tmp_path):
    text = report.write_report(_fake_run(tmp_path)).read_text()
    head = text[: text.index("## Configuration")]
    assert head.startswith("# jaxsplit report: fake\n\n## Summary")
    assert "SimCNN (width 0.25), 12,345 parameters, trained on Fashion-MNIST" in head
    assert "`kernel_ga` search (16 individuals per class, 50 generations, 1,000 validation images" in head
    assert "| module ensemble, test accuracy | 85.12% (−6.11 points against the model) |" in head
    assert "87.65% (2.53 points above the test accuracy)" in head  # the search-set gap
    assert "| TC precision, mean over 2 target classes | 61.11% → 82.22% (+21.11 points) |" in head
    # T-shirt/top gains on both; Shirt gains precision but loses recall
    assert "| target classes improved on both precision and recall | 1 of 2 (T-shirt/top) |" in head
    assert "**Verdict.**" in head and "meets its acceptance criterion" in head
    assert "1 of 2 target classes gain on both precision and recall; the others trade" in head
    assert text.count("target class (TC)") == 1 and "T-shirt/top, Shirt" in head
    # the data the model was trained on
    assert "## Data" in text and "/data/fashion-mnist" in text and "`sha256:abc123`" in text
    # every split's files with their SHA-256 (metrics.json data.splits)
    assert "| test | `/data/fashion-mnist/t10k-images-idx3-ubyte.gz` | 4,422,079 | `cc1d09f00d` |" in text
    # no internal keys, no empty rows
    assert "stats_source" not in text and "| note |" not in text


def test_summary_verdict_when_patching_fails(tmp_path):
    run = _fake_run(tmp_path)
    path = run / "patch" / "patch_results.json"
    res = json.loads(path.read_text())
    res["acceptance"]["passed"] = False
    path.write_text(json.dumps(res))
    text = report.render_report(run)
    assert "does not meet its acceptance criterion" in text
    for r in res["per_tc"].values():  # every class: precision up, recall down
        r["module_patch"]["min_max"] = _metrics(0.9, 0.45, 0.97)
    path.write_text(json.dumps(res))
    text = report.render_report(run)
    assert "| target classes improved on both precision and recall | 0 of 2 |" in text
    assert "No single target class gains on both precision and recall" in text


def test_report_names_the_gradient_searcher_and_its_settings(tmp_path):
    run = _fake_run(tmp_path)
    summary = json.loads((run / "modularize" / "summary.json").read_text())
    for k in ("strategy", "population_size", "generations_run"):
        summary.pop(k, None)
    summary.update({"method": "gradient", "epochs_run": 12, "num_epochs": 145, "best_epoch": 9,
                    "num_train_images": 10000,
                    "gradient": {"alpha": 0.1, "head": "mlp", "modular_epochs": 140, "batch_size": 64,
                                 "num_train": 10000}})
    (run / "modularize" / "summary.json").write_text(json.dumps(summary))
    (run / "modularize" / "config.yaml").write_text(
        "search:\n  method: gradient\n  seed: 3\n  gradient:\n    alpha: 0.1\n    lr_modular: 0.001\n")
    text = report.write_report(run).read_text()
    head = text[: text.index("## Configuration")]
    assert ("found by the gradient searcher (`search.method=gradient`: per-class kernel masks and "
            "module heads trained by gradient descent, model weights frozen; 12 of 145 epochs on "
            "10,000 training images, best epoch 9 chosen on 1,000 validation images; alpha=0.1, "
            "head=mlp, modular_epochs=140, batch_size=64)") in head
    assert "individuals per class" not in head
    assert ("| search (modularize/config.yaml) | method=gradient, seed=3, gradient.alpha=0.1, "
            "gradient.lr_modular=0.001 |") in text
