"""Tests of jaxsplit.plots: every plot is written, readable, and leaves matplotlib's state alone."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest

from jaxsplit import plots


def _history(n=12, classes=3):
    rng = np.random.default_rng(0)
    return [{"generation": g, "best_acc": 0.8 + g / 200, "best_diff": 0.4 + g / 100,
             "best_fitness": 0.75 + g / 300, "best_valid_fitness": 0.76 + g / 300 - (g == 5) * 0.01,
             "acc_ratio": 0.9 + max(0.0, 0.9 - (0.8 + g / 200)),
             "mean_kept_fraction": list(rng.uniform(0.5, 0.7, classes)),
             "best_kept_fraction": list(rng.uniform(0.4, 0.6, classes))} for g in range(n)]


def _m(p, r, n):
    return {"tc_precision": p, "tc_recall": r, "tc_f1": 2 * p * r / (p + r), "non_tc_accuracy": n}


def _results():
    before, after, whole = _m(0.86, 0.85, 0.90), _m(0.88, 0.87, 0.905), _m(0.89, 0.86, 0.91)
    entry = {"before": before, "module_patch": {"min_max": after, "platt": after},
             "whole_model_patch": {"min_max": whole, "platt": whole},
             "module": {"macs_fraction": 0.6, "params_fraction": 0.5, "kept_fraction": 0.55}}
    return {"dataset": "fashion_mnist", "primary_calibration": "min_max", "calibrations": ["min_max", "platt"],
            "per_tc": {"0": entry, "6": entry},
            "average": {"before": before, "module_patch": {"min_max": after, "platt": after},
                        "whole_model_patch": {"min_max": whole, "platt": whole}}}


def _is_png(path):
    data = path.read_bytes()
    return data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


def test_search_history_plot(tmp_path):
    path = plots.plot_search_history(_history(), tmp_path / "m" / "curves.png", ensemble_test_accuracy=0.86,
                                     model_test_accuracy=0.9, model_valid_accuracy=0.91, best_generation=9)
    assert path == tmp_path / "m" / "curves.png" and _is_png(path)
    assert not list((tmp_path / "m").glob(".*tmp*"))  # written atomically, no temporary left
    # without the optional fields (older history files: no acc_ratio)
    old = [{k: v for k, v in h.items() if k != "acc_ratio"} for h in _history(3)]
    assert _is_png(plots.plot_search_history(old, tmp_path / "old.png"))
    with pytest.raises(ValueError, match="empty"):
        plots.plot_search_history([], tmp_path / "x.png")


def test_sensitivity_plot_and_errors(tmp_path):
    ratios = (0.1, 0.5, 1.0)
    curves = np.array([[0.2, 0.5, 0.9], [0.5, 0.88, 0.9], [0.1, 0.8, 0.9]])
    assert _is_png(plots.plot_sensitivity(curves, ratios, tmp_path / "s.png", ["a", "b", "c"]))
    with pytest.raises(ValueError, match=r"expected \(num_layers, 3\)"):
        plots.plot_sensitivity(curves[:, :2], ratios, tmp_path / "s.png")
    with pytest.raises(ValueError, match="2 layer names for 3 layers"):
        plots.plot_sensitivity(curves, ratios, tmp_path / "s.png", ["a", "b"])


def test_patch_plots_and_class_names(tmp_path):
    written = plots.plot_patch_results(_results(), tmp_path)
    assert [p.name for p in written] == ["patch_tc_bars.png", "patch_calibrations.png", "patch_module_size.png"]
    assert all(_is_png(p) for p in written)
    assert plots.target_class_labels(_results()) == ["T-shirt/top", "Shirt"]
    unknown = dict(_results(), dataset="synthetic")
    assert plots.target_class_labels(unknown) == ["class_0", "class_6"]


def test_patch_final_plot_is_written_when_there_is_a_gated_summary(tmp_path):
    before, final = _m(0.86, 0.85, 0.90), _m(0.88, 0.87, 0.905)
    delta = {k: final[k] - before[k] for k in before}
    zero = {k: 0.0 for k in before}
    rows = [{"target_class": 0, "class_name": "T-shirt/top", "accepted": True, "delta_test": delta},
            {"target_class": 6, "class_name": "Shirt", "accepted": False, "delta_test": zero}]
    summary = {"method": "min_max", "per_tc": rows, "num_accepted": 1, "num_tcs": 2,
               "average": {"delta_test": {k: v / 2 for k, v in delta.items()}}}
    written = plots.plot_patch_results(dict(_results(), summary=summary), tmp_path)
    assert [p.name for p in written][0] == "patch_final.png" and all(_is_png(p) for p in written)
    with pytest.raises(ValueError, match="no target class"):
        plots.plot_patch_final(dict(summary, per_tc=[]), tmp_path / "x.png")


def test_no_backend_switch_and_no_pyplot():
    """Plotting must not call matplotlib.use nor import pyplot (a GUI program's backend stays)."""
    code = textwrap.dedent("""
        import sys, tempfile, pathlib, matplotlib
        matplotlib.use = lambda *a, **k: (_ for _ in ()).throw(AssertionError("matplotlib.use called"))
        from jaxsplit import plots
        d = pathlib.Path(tempfile.mkdtemp())
        plots.plot_sensitivity([[0.5, 0.9]], [0.5, 1.0], d / "s.png")
        assert "matplotlib.pyplot" not in sys.modules, "pyplot was imported"
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_import_is_lazy():
    code = "import sys, jaxsplit.plots; print('matplotlib' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "False", out.stderr


def test_searcher_comparison_plot_and_errors(tmp_path):
    curves = {"ga": {"time_s": [5.0, 9.0, 13.0], "valid_accuracy": [0.8, 0.85, 0.86],
                     "kept_fraction": [0.7, 0.62, 0.6]},
              "gradient": {"time_s": [2.0, 4.0], "valid_accuracy": [0.88, 0.87], "kept_fraction": [1.0, 0.9]}}
    path = plots.plot_searcher_comparison(curves, tmp_path / "c.png", model_valid_accuracy=0.9)
    assert _is_png(path)
    with pytest.raises(ValueError, match=r"curves\['ga'\] needs .* lengths \{'time_s': 3, 'valid_accuracy': 2"):
        plots.plot_searcher_comparison({"ga": {**curves["ga"], "valid_accuracy": [0.8, 0.9]}}, tmp_path / "x.png")
    with pytest.raises(ValueError, match="empty"):
        plots.plot_searcher_comparison({}, tmp_path / "x.png")
