"""Every plot jaxsplit writes: search curves, layer sensitivity, patching results (an I/O edge).

Each function takes plain values (what the stages also save as JSON/npz) and writes PNG files;
nothing here computes results. matplotlib is imported only when a plot is drawn, and no global
backend is switched: figures are `matplotlib.figure.Figure` objects drawn by the Agg canvas
directly, so calling these functions from a notebook or a GUI program changes nothing there.

* `plot_search_history(history, path, ...)`: ``modularize/curves.png``, the GA per generation;
* `plot_sensitivity(curves, ratios, path, layer_names)`: ``modularize/sensitivity.png``;
* `plot_searcher_comparison(curves, path)`: the searchers' curves against wall time
  (``benchmarks/compare_searchers.py``);
* `plot_patch_results(results, out_dir)`: ``patch/patch_tc_bars.png``,
  ``patch/patch_calibrations.png`` and ``patch/patch_module_size.png``.

Patching moves the target-class figures by a few points, which a 0-100 % axis hides, so the
patching plots show *changes* (after minus before, in percentage points) next to the values.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["plot_search_history", "plot_sensitivity", "plot_searcher_comparison", "plot_patch_results",
           "target_class_labels"]

# colours, fixed so that a quantity looks the same in every figure
_WEAK, _MODULE, _WHOLE = "#9e9e9e", "#1f77b4", "#ff7f0e"
_METRICS = (("tc_precision", "TC precision"), ("tc_recall", "TC recall"), ("tc_f1", "TC F1"),
            ("non_tc_accuracy", "non-TC accuracy"))


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: Path, dpi: int = 110) -> Path:
    """Writes ``fig`` to ``path`` atomically (a temporary file, then a rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}.png")
    fig.savefig(tmp, dpi=dpi)
    os.replace(tmp, path)
    return path


def _num(x: Any) -> float:
    return float(x) if isinstance(x, (int, float, np.floating, np.integer)) and not isinstance(x, bool) else math.nan


# -- modularization ---------------------------------------------------------------------------


def plot_search_history(history: Sequence[Mapping[str, Any]], path: str | Path, *,
                        ensemble_test_accuracy: float | None = None,
                        model_test_accuracy: float | None = None,
                        model_valid_accuracy: float | None = None,
                        best_generation: int | None = None) -> Path:
    """The GA's curves, one quantity per panel, as ``path`` (a PNG).

    Args:
      history: one record per generation, as the search driver saves in ``history.json``:
        ``generation``, ``best_acc``, ``best_diff``, ``best_fitness``, ``best_valid_fitness``,
        ``acc_ratio`` (optional), ``mean_kept_fraction`` and ``best_kept_fraction`` (``(C,)``
        lists, one value per class).
      path: the PNG to write.
      ensemble_test_accuracy: the final module ensemble's test accuracy, marked on the accuracy
        panel at ``best_generation`` (or the last generation).
      model_test_accuracy, model_valid_accuracy: the trained model's accuracies, drawn as
        horizontal reference lines.
      best_generation: the generation whose ensemble was kept.

    Returns:
      ``path``.
    """
    if not history:
        raise ValueError("history is empty: nothing to plot")
    gens = np.asarray([h["generation"] for h in history])
    pct = lambda key: 100 * np.asarray([_num(h.get(key)) for h in history])  # noqa: E731
    last = int(gens[-1]) if best_generation is None else int(best_generation)

    fig = _figure(13, 7)
    axes = fig.subplots(2, 3)
    fig.suptitle("Modularization search: best ensemble per generation", fontsize=12)

    ax = axes[0, 0]
    acc = pct("best_acc")
    ax.plot(gens, acc, color=_MODULE, marker=".", label="ensemble, search images")
    if model_valid_accuracy is not None:
        ax.axhline(100 * model_valid_accuracy, color="black", ls="--", lw=1, label="model, valid")
    if model_test_accuracy is not None:
        ax.axhline(100 * model_test_accuracy, color="black", ls=":", lw=1, label="model, test")
    if ensemble_test_accuracy is not None:
        ax.scatter([last], [100 * ensemble_test_accuracy], marker="*", s=140, color="#d62728", zorder=4,
                   label="final ensemble, test")
        ax.annotate(f"test {100 * ensemble_test_accuracy:.2f}%", (last, 100 * ensemble_test_accuracy),
                    xytext=(-8, 0), textcoords="offset points", ha="right", va="center", fontsize=8,
                    color="#d62728")
    shown = [v for v in (*acc, *(100 * x for x in (model_valid_accuracy, model_test_accuracy,
                                                   ensemble_test_accuracy) if x is not None))
             if np.isfinite(v)]
    if shown:  # every line and the final-test star inside the axes, with room for the legend
        lo, hi = min(shown), max(shown)
        pad = max(0.5, 0.1 * (hi - lo))
        ax.set_ylim(lo - pad - 0.6 * (hi - lo + pad), hi + pad)
    ax.set_title("Ensemble accuracy")
    ax.set_ylabel("accuracy (%)")
    ax.legend(fontsize=6.5, loc="lower left")

    ax = axes[0, 1]
    ax.plot(gens, pct("best_diff"), color="#2ca02c", marker=".")
    ax.set_title("Ensemble difference (1 − Jaccard)")
    ax.set_ylabel("difference (%)")

    ax = axes[0, 2]
    pop = 100 * np.asarray([np.mean(h["mean_kept_fraction"]) for h in history])
    best = 100 * np.asarray([np.mean(h["best_kept_fraction"]) for h in history])
    ax.plot(gens, pop, color=_WEAK, marker=".", label="population mean")
    ax.plot(gens, best, color=_MODULE, marker=".", label="best ensemble's modules")
    ax.set_title("Kernels kept (mean over classes)")
    ax.set_ylabel("kernels kept (% of the model)")
    ax.legend(fontsize=7)

    ax = axes[1, 0]
    vf = np.asarray([_num(h.get("best_valid_fitness")) for h in history])
    ax.plot(gens, vf, color="#9467bd", marker=".", label="this generation")
    ax.step(gens, np.fmax.accumulate(np.nan_to_num(vf, nan=-np.inf)), where="post", color="black", lw=1,
            label="best so far (early-stop criterion)")
    ax.axvline(last, color="#d62728", lw=0.8, ls="--", label=f"kept: generation {last}")
    ax.set_title("Validation fitness  α·acc + (1−α)·diff")
    ax.set_ylabel("fitness")
    ax.legend(fontsize=7, loc="lower right")

    ax = axes[1, 1]
    ax.plot(gens, [_num(h.get("best_fitness")) for h in history], color="#8c564b", marker=".")
    ax.set_title("GA fitness  acc_ratio·acc + (1−α)·diff")
    ax.set_ylabel("fitness")

    ax = axes[1, 2]
    if any("acc_ratio" in h for h in history):
        ax.plot(gens, [_num(h.get("acc_ratio")) for h in history], color="#17becf", marker=".")
        ax.set_title("acc_ratio = α + max(0, γ − acc)")
        ax.set_ylabel("acc_ratio")
    else:
        ax.text(0.5, 0.5, "acc_ratio not recorded", ha="center", va="center", transform=ax.transAxes)
        ax.set_title("acc_ratio")

    for ax in axes.flat:
        ax.set_xlabel("generation")
        ax.grid(alpha=0.3)
        if len(gens) <= 30:
            ax.set_xticks(gens if len(gens) <= 12 else gens[::max(1, len(gens) // 10)])
    fig.tight_layout(rect=(0, 0, 1, 0.96))
    return _save(fig, Path(path))


def plot_searcher_comparison(curves: Mapping[str, Mapping[str, Sequence[float]]], path: str | Path, *,
                             model_valid_accuracy: float | None = None,
                             title: str = "Searchers against wall time") -> Path:
    """Ensemble valid accuracy and mean kept-kernel fraction against wall time, one line per
    searcher, as ``path`` (a PNG with two panels).

    Args:
      curves: ``{searcher: {"time_s": [...], "valid_accuracy": [...], "kept_fraction": [...]}}``,
        one point per generation / epoch: seconds since the search started, the ensemble's
        accuracy on the validation images (0-1) and the mean kept-kernel fraction (0-1).
      path: the PNG to write.
      model_valid_accuracy: the trained model's valid accuracy, a horizontal reference line.
      title: the figure title.

    Returns:
      ``path``.
    """
    if not curves:
        raise ValueError("curves is empty: nothing to plot")
    for name, c in curves.items():
        lengths = {k: len(c.get(k, ())) for k in ("time_s", "valid_accuracy", "kept_fraction")}
        if len(set(lengths.values())) != 1 or not lengths["time_s"]:
            raise ValueError(f"curves[{name!r}] needs time_s, valid_accuracy and kept_fraction of one "
                             f"equal, non-zero length; got lengths {lengths}")
    fig = _figure(11, 4.2)
    axes = fig.subplots(1, 2)
    fig.suptitle(title, fontsize=12)
    colours = (_MODULE, _WHOLE, "#2ca02c", "#d62728")
    for i, (name, c) in enumerate(curves.items()):
        t = np.asarray([_num(v) for v in c["time_s"]])
        style = dict(color=colours[i % len(colours)], marker=".", label=name)
        axes[0].plot(t, 100 * np.asarray([_num(v) for v in c["valid_accuracy"]]), **style)
        axes[1].plot(t, 100 * np.asarray([_num(v) for v in c["kept_fraction"]]), **style)
    if model_valid_accuracy is not None:
        axes[0].axhline(100 * model_valid_accuracy, color="black", ls="--", lw=1, label="model")
    for ax, ylabel in zip(axes, ("ensemble valid accuracy (%)", "kernels kept, mean over modules (%)")):
        ax.set_xlabel("wall time (s)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, Path(path))


def plot_sensitivity(curves: np.ndarray, ratios: Sequence[float], path: str | Path,
                     layer_names: Sequence[str] | None = None) -> Path:
    """Layer sensitivity as ``path``: ensemble accuracy when one layer keeps its top-r kernels.

    Args:
      curves: ``(L, R)`` accuracies in [0, 1], one row per conv layer, one column per ratio.
      ratios: the ``R`` keep ratios.
      path: the PNG to write.
      layer_names: ``L`` names (default ``conv_0 ...``).

    Returns:
      ``path``.
    """
    curves = np.asarray(curves, dtype=float)
    ratios = np.asarray(list(ratios), dtype=float)
    if curves.ndim != 2 or curves.shape[1] != len(ratios):
        raise ValueError(f"curves have shape {curves.shape}; expected (num_layers, {len(ratios)})")
    names = list(layer_names) if layer_names is not None else [f"conv_{i}" for i in range(curves.shape[0])]
    if len(names) != curves.shape[0]:
        raise ValueError(f"{len(names)} layer names for {curves.shape[0]} layers")
    from matplotlib import colormaps

    fig = _figure(12, 4.6)
    ax, hm = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1.1, 1]})
    cmap = colormaps["viridis"]
    for i, row in enumerate(curves):
        ax.plot(ratios, 100 * row, marker="o", ms=3, color=cmap(i / max(1, len(names) - 1)), label=names[i])
    ax.set_xlabel("fraction of the layer's kernels kept (most important first)")
    ax.set_ylabel("module ensemble accuracy (%)")
    ax.set_title("Accuracy when one layer is cut")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2, loc="lower right")
    drop = 100 * (curves[:, [int(np.argmax(ratios))]] - curves)
    im = hm.imshow(drop, aspect="auto", cmap="magma_r", vmin=0)
    hm.set_xticks(range(len(ratios)), [f"{r:.1f}" for r in ratios])
    hm.set_yticks(range(len(names)), names)
    hm.set_xlabel("fraction of the layer's kernels kept")
    hm.set_ylabel("layer")
    hm.set_title("Accuracy drop vs. the whole layer (points)")
    fig.colorbar(im, ax=hm, label="accuracy drop (points)")
    fig.suptitle("Layer sensitivity", fontsize=12)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    return _save(fig, Path(path), dpi=120)


# -- patching ---------------------------------------------------------------------------------


def target_class_labels(results: Mapping[str, Any]) -> list[str]:
    """Display names of a patching run's target classes, in ``results["per_tc"]`` order."""
    from jaxsplit.data.names import class_names

    labels = []
    for tc in results.get("per_tc", {}):
        try:
            labels.append(class_names(results.get("dataset"), (int(tc),))[0])
        except ValueError:
            labels.append(str(tc))
    return labels


def _bars(ax, x, series, width=0.8):
    """Grouped bars: ``series`` is a list of (values, label, colour)."""
    w = width / len(series)
    for j, (vals, label, color) in enumerate(series):
        pos = x + (j - (len(series) - 1) / 2) * w
        bars = ax.bar(pos, vals, w, label=label, color=color)
        for b, v in zip(bars, vals):
            if np.isfinite(v):
                ax.annotate(f"{v:+.1f}", (b.get_x() + b.get_width() / 2, v), ha="center",
                            va="bottom" if v >= 0 else "top", fontsize=7.5,
                            xytext=(0, 1.5 if v >= 0 else -1.5), textcoords="offset points")


def _pad_ylim(ax, values) -> None:
    vals = np.asarray([v for v in np.ravel(values) if np.isfinite(v)] or [0.0])
    lo, hi = min(0.0, vals.min()), max(0.0, vals.max())
    pad = max(0.5, 0.15 * (hi - lo))
    ax.set_ylim(lo - pad, hi + pad)


def plot_patch_results(results: Mapping[str, Any], out_dir: str | Path) -> list[Path]:
    """Writes the patching plots of a `jaxsplit.patch.run_patch` results dict into ``out_dir``.

    * ``patch_final.png`` (when the results have a ``summary``): what a user gets, the default
      method behind the validation gate: per target class the change (final minus weak, in
      points, test split) of TC precision, recall, F1 and non-TC accuracy, with accepted patches
      and rejected ones (the weak model kept: zero change) told apart;
    * ``patch_tc_bars.png``: per target class, the change (patched minus weak, in points) of TC
      precision, TC recall and non-TC accuracy, patched with the module and with the whole strong
      model (primary calibration, *ungated*: the reference protocol), and the weak model's values
      for scale;
    * ``patch_calibrations.png``: the mean change over target classes per calibration method;
    * ``patch_module_size.png``: each target class's module MACs / parameters / kernels as % of
      the strong model.

    Returns:
      The written paths.
    """
    out_dir = Path(out_dir)
    per_tc = results["per_tc"]
    tcs = list(per_tc)
    names = target_class_labels(results)
    primary = results["primary_calibration"]
    x = np.arange(len(tcs))
    written = []
    if "summary" in results:
        written.append(plot_patch_final(results["summary"], out_dir / "patch_final.png"))

    def delta(r, kind, cal, key):
        after = r.get(kind, {}).get(cal, {}).get(key)
        return 100 * (_num(after) - _num(r["before"].get(key)))

    keys = (("tc_precision", "TC precision"), ("tc_recall", "TC recall"), ("non_tc_accuracy", "non-TC accuracy"))
    fig = _figure(max(11, 0.75 * len(tcs) * 3 + 3), 7)
    axes = fig.subplots(2, 3, sharex=True)
    for col, (key, label) in enumerate(keys):
        ax = axes[0, col]
        mod = [delta(per_tc[t], "module_patch", primary, key) for t in tcs]
        whole = [delta(per_tc[t], "whole_model_patch", primary, key) for t in tcs]
        series = [(mod, "patched with the module", _MODULE)]
        if any(np.isfinite(whole)):
            series.append((whole, "patched with the whole strong model", _WHOLE))
        _bars(ax, x, series)
        ax.axhline(0, color="black", lw=0.8)
        _pad_ylim(ax, [mod, whole])
        ax.set_title(f"{label}: change")
        ax.set_ylabel("patched − weak (points)")
        ax.grid(axis="y", alpha=0.3)
        ax = axes[1, col]
        before = [100 * _num(per_tc[t]["before"].get(key)) for t in tcs]
        after = [100 * _num(per_tc[t]["module_patch"].get(primary, {}).get(key)) for t in tcs]
        ax.plot(x, before, "o", color=_WEAK, label="weak model")
        ax.plot(x, after, "D", color=_MODULE, label="patched with the module")
        for xi, b, a in zip(x, before, after):
            ax.annotate("", (xi, a), (xi, b), arrowprops={"arrowstyle": "->", "color": _MODULE, "lw": 1})
        vals = np.asarray([v for v in before + after if np.isfinite(v)] or [0.0])
        pad = max(1.0, 0.15 * (vals.max() - vals.min()))
        ax.set_ylim(vals.min() - pad, min(100.5, vals.max() + pad))
        ax.set_title(f"{label}: weak → patched")
        ax.set_ylabel(f"{label} (%)")
        ax.set_xlabel("target class")
        ax.set_xticks(x, names, rotation=20 if len(tcs) > 4 else 0, fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    h2, l2 = axes[1, 0].get_legend_handles_labels()
    fig.legend(handles + h2[:1], labels + l2[:1], loc="lower center", ncol=3, fontsize=8)
    fig.suptitle(f"Patching per target class, ungated (test split, calibration {primary})", fontsize=12)
    fig.tight_layout(rect=(0, 0.05, 1, 0.95))
    written.append(_save(fig, out_dir / "patch_tc_bars.png", dpi=100))

    avg = results["average"]
    cals = list(results.get("calibrations", avg.get("module_patch", {}).keys()))
    fig = _figure(max(10, 1.1 * len(cals) * 2 + 2), 7.5)
    axes = fig.subplots(2, 2).ravel()
    cx = np.arange(len(cals))
    for ax, (key, label) in zip(axes, _METRICS):
        b = _num(avg["before"].get(key))
        mod = [100 * (_num(avg["module_patch"].get(c, {}).get(key)) - b) for c in cals]
        whole = [100 * (_num(avg.get("whole_model_patch", {}).get(c, {}).get(key)) - b) for c in cals]
        series = [(mod, "module", _MODULE)]
        if any(np.isfinite(whole)):
            series.append((whole, "whole strong model", _WHOLE))
        _bars(ax, cx, series)
        ax.axhline(0, color="black", lw=0.8)
        _pad_ylim(ax, [mod, whole])
        ax.set_xticks(cx, [c + (" *" if c == primary else "") for c in cals], fontsize=8)
        ax.set_xlabel("calibration (* primary)")
        ax.set_title(f"{label} (weak model: {100 * b:.2f}%)", fontsize=10)
        ax.set_ylabel("patched − weak (points)")
        ax.grid(axis="y", alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=2, fontsize=8)
    fig.suptitle(f"Patching, mean over {len(tcs)} target classes: change by calibration method (ungated)",
                 fontsize=12)
    fig.tight_layout(rect=(0, 0.04, 1, 0.95))
    written.append(_save(fig, out_dir / "patch_calibrations.png", dpi=100))

    fig = _figure(max(7, 1.1 * len(tcs) + 3), 3.8)
    ax = fig.subplots()
    for j, (key, label, color) in enumerate((("macs_fraction", "MACs", "#1f77b4"),
                                             ("params_fraction", "parameters", "#2ca02c"),
                                             ("kept_fraction", "kernels", "#9467bd"))):
        vals = [100 * _num(per_tc[t].get("module", {}).get(key)) for t in tcs]
        ax.bar(x + (j - 1) * 0.27, vals, 0.27, label=label, color=color)
    ax.set_xticks(x, names, rotation=20 if len(tcs) > 4 else 0, fontsize=8)
    ax.set_xlabel("target class")
    ax.set_ylabel("% of the strong model")
    ax.set_ylim(0, 105)
    ax.set_title("Size of each target class's module")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    written.append(_save(fig, out_dir / "patch_module_size.png", dpi=100))
    return written


def plot_patch_final(summary: Mapping[str, Any], path: str | Path) -> Path:
    """Per target class, final (gated) minus weak on the test split, in points.

    Args:
      summary: `jaxsplit.patch.decision_summary` (``results["summary"]``): rows with
        ``class_name``, ``accepted``, ``delta_test``.
      path: the PNG to write.

    Returns:
      The written path.
    """
    rows = list(summary["per_tc"])
    if not rows:
        raise ValueError("the patch summary has no target class to plot")
    x = np.arange(len(rows))
    fig = _figure(max(8, 1.6 * len(rows) + 3), 4.2)
    ax = fig.subplots()
    width = 0.8 / len(_METRICS)
    colors = ("#1f77b4", "#2ca02c", "#9467bd", "#ff7f0e")
    for j, ((key, label), color) in enumerate(zip(_METRICS, colors)):
        vals = np.asarray([100 * _num(r["delta_test"].get(key)) for r in rows])
        ax.bar(x + (j - (len(_METRICS) - 1) / 2) * width, vals, width, label=label, color=color)
    ax.axhline(0, color="black", lw=0.8)
    labels = [f"{r.get('class_name', r.get('target_class'))}\n"
              f"{'accepted' if r['accepted'] else 'rejected: weak kept'}" for r in rows]
    ax.set_xticks(x, labels, fontsize=8)
    for tick, r in zip(ax.get_xticklabels(), rows):
        tick.set_color("black" if r["accepted"] else "#9e9e9e")
    ax.set_ylabel("final − weak (points, test)")
    delta = summary["average"]["delta_test"]
    ax.set_title(f"Patching as shipped: method {summary.get('method')} behind the validation gate; "
                 f"{summary['num_accepted']}/{summary['num_tcs']} accepted; mean ΔF1 "
                 f"{100 * _num(delta.get('tc_f1')):+.2f}, Δnon-TC {100 * _num(delta.get('non_tc_accuracy')):+.2f}",
                 fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    return _save(fig, Path(path), dpi=100)
