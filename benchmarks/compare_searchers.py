"""Compare the two searchers (GA, gradient-trained masks) on one trained model and record it.

    python benchmarks/compare_searchers.py [--run runs/fm_cpu]
        [--config configs/fashion_mnist_cpu_modularize.yaml] [--set key=value ...]
        [--ga-set key=value ...] [--grad-set key=value ...] [--full]
        [--existing-ga runs/fm_cpu] [--work runs/compare]
        [--results benchmarks/results/compare_searchers.json] [--plot PNG]

RUN must hold a trained model (`jaxsplit train --config configs/fashion_mnist_cpu.yaml --out
runs/fm_cpu`). Each searcher runs in its own copy of the run folder (`WORK/ga`, `WORK/gradient`,
made fresh), through `run_modularize` with `search.method=ga` / `gradient`. The settings are the
run's `config.yaml` < `--config` < `--set` (both searchers) < `--ga-set` / `--grad-set`.

The default budget is small (a smoke comparison, minutes on 2 CPU cores): the GA with 10
individuals x 5 generations on 1,000 valid images; the gradient searcher with 1 heads-only epoch
and two 7-epoch cycles on 10,000 train images (at the reference learning rate a kernel needs
~1,000 mask steps to drop at all, so fewer steps keep every kernel). `--full` drops these defaults (the reference
budgets: 100 x 200 GA, 145 gradient epochs: hours on a CPU; schedule those on a GPU).

`--existing-ga DIR` reuses a finished GA search instead of running one: DIR is a run folder
whose `modularize/` holds it (`summary.json`, `history.json`, `config.yaml`), made from the same
checkpoint as RUN (the params digests must match; DIR may be RUN itself). Its figures come from
its `summary.json`; its wall time is the one its files record (importance + compile + the
generations' times), not a measured one (`wall_time_source: "history"`), and the `--ga-set`
values and GA defaults do not apply.

The JSON records, per searcher: wall time, ensemble valid/test accuracy and the model's, the test
accuracy loss, the ensemble diff, mean kept-kernel / parameter / MAC fractions, the per-class
kept fractions, and the settings; plus the machine (with load averages) and the date. The plot
(`--plot`, default next to the JSON) shows the ensemble's valid accuracy and the mean kept-kernel
fraction of both searchers against wall time (GA: the best ensemble of each generation;
gradient: each epoch's masks, kept fraction averaged over the epoch's steps). A markdown table of
the figures is printed last.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from jaxsplit import cli
from jaxsplit import config as jconfig

from _record import save_record  # benchmarks/ (the script's folder) is on sys.path

REPO = Path(__file__).resolve().parents[1]
SMALL_GA = ["search.population_size=10", "search.num_generations=5", "search.num_valid=1000"]
# masks start at 1.0 and one Adam step moves them by about lr_modular = 0.001, so no kernel can
# drop before ~1,000 mask-phase steps: 2 cycles (10 mask epochs) of 10,000 images / 64 = 1,560
SMALL_GRADIENT = ["search.gradient.head_epochs=1", "search.gradient.modular_epochs=14",
                  "search.gradient.num_train=10000", "search.num_valid=1000"]
KEYS = ("ensemble_valid_accuracy", "ensemble_test_accuracy", "model_valid_accuracy",
        "model_test_accuracy", "test_accuracy_loss", "ensemble_diff", "mean_kept_fraction",
        "mean_params_fraction", "mean_macs_fraction", "best_generation", "generations_run")
GRADIENT_KEYS = ("best_epoch", "epochs_run")


class CompareError(ValueError):
    """A run folder or search folder the comparison cannot use."""


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CompareError(f"cannot read {str(path)!r}: {e}") from e


def curves_of(method: str, modularize_dir: Path) -> dict[str, list[float]]:
    """`{"time_s", "valid_accuracy", "kept_fraction"}` per generation / epoch of a finished search.

    time_s counts from the search's start: for the GA importance + compile time before
    generation 0, then each generation's time; for the gradient searcher each epoch's time
    (compiling is in the first epoch's).
    """
    history = _read_json(modularize_dir / "history.json")
    summary = _read_json(modularize_dir / "summary.json")
    if method == "ga":
        rows = history.get("generations") if isinstance(history, Mapping) else None
        start = sum(float(summary.get(k) or 0.0) for k in ("importance_time_s", "compile_time_s"))
        acc = [r["best_acc"] for r in rows or []]
        kept = [float(np.mean(r["best_kept_fraction"])) for r in rows or []]
    else:
        rows = history.get("epochs") if isinstance(history, Mapping) else None
        start = 0.0
        acc = [r["valid_accuracy"] for r in rows or []]
        kept = [r["kept_fraction"] for r in rows or []]
    if not rows:
        raise CompareError(f"{str(modularize_dir / 'history.json')!r} has no {method} history "
                           f"(expected {'generations' if method == 'ga' else 'epochs'})")
    return {"time_s": (start + np.cumsum([float(r["time_s"]) for r in rows])).tolist(),
            "valid_accuracy": [float(a) for a in acc], "kept_fraction": [float(k) for k in kept]}


def record_of(method: str, modularize_dir: Path, settings: Mapping, wall: float, source: str,
              overrides: list[str]) -> dict:
    """The comparison's record of one finished search (figures from its summary.json)."""
    summary = _read_json(modularize_dir / "summary.json")
    if summary.get("method", "ga") != method:
        raise CompareError(f"{str(modularize_dir)!r} holds a {summary.get('method')!r} search, "
                           f"not {method!r}")
    keys = KEYS + (GRADIENT_KEYS if method == "gradient" else ())
    return {"run_dir": str(modularize_dir.parent), "overrides": overrides, "search": dict(settings),
            "wall_time_s": round(wall, 1), "wall_time_source": source,
            **{k: summary.get(k) for k in keys},
            "per_class_kept_fraction": [p.get("kept_fraction") for p in summary["per_class"]],
            "curves": curves_of(method, modularize_dir)}


def existing_ga(dir_: Path, run_dir: Path) -> dict:
    """The record of the finished GA search in `dir_/modularize` (made from `run_dir`'s model)."""
    from jaxsplit import checkpoint as ckpt

    mod = dir_ / "modularize"
    for name in ("summary.json", "history.json"):
        if not (mod / name).is_file():
            raise CompareError(f"{str(dir_)!r} holds no finished GA search: no modularize/{name} "
                               f"(run `jaxsplit modularize --run {dir_}` first)")
    summary = _read_json(mod / "summary.json")
    made_from = (summary.get("source_model") or {}).get("params_sha256")
    digest = ckpt.params_digest(ckpt.load_model(run_dir).params)
    if made_from is not None and made_from != digest:
        raise CompareError(f"the GA search in {str(mod)!r} was made from other weights (params "
                           f"SHA-256 {made_from}) than {str(run_dir)!r}'s model ({digest})")
    settings: dict = {}
    if (mod / "config.yaml").is_file():
        settings = dict((yaml.safe_load((mod / "config.yaml").read_text()) or {}).get("search") or {})
        settings.pop("gradient", None)
    curves = curves_of("ga", mod)
    print(f"== ga: reusing the finished search in {mod}")
    return record_of("ga", mod, settings, curves["time_s"][-1], "history", [])


def markdown_table(results: Mapping[str, Mapping]) -> str:
    """The figures as a README-ready markdown table, one row per searcher."""
    pct = lambda v: "n/a" if v is None else f"{100 * v:.2f}%"  # noqa: E731
    pts = lambda v: "n/a" if v is None else f"{100 * v + 0.0:+.2f}"  # noqa: E731  (no "-0.00")
    lines = ["| searcher | wall time | budget | ensemble test acc. | loss vs model (points) | "
             "kernels kept | params kept | MACs kept | diff |",
             "|---|---:|---|---:|---:|---:|---:|---:|---:|"]
    for method, r in results.items():
        s = r.get("search", {})
        if method == "gradient":
            g = s.get("gradient", {})
            budget = (f"{r.get('epochs_run')} epochs ({g.get('head_epochs')} heads-only + "
                      f"{g.get('modular_epochs')}), {g.get('num_train') or 'all'} train images")
        else:
            budget = (f"{s.get('population_size')} x {r.get('generations_run')} generations, "
                      f"{s.get('num_valid') or 'all'} valid images")
        wall = r.get("wall_time_s")
        wall_s = "n/a" if wall is None else f"{wall:,.0f} s" + (" (recorded)" if r.get("wall_time_source") == "history" else "")
        lines.append(f"| {method} | {wall_s} | {budget} | {pct(r.get('ensemble_test_accuracy'))} | "
                     f"{pts(-r['test_accuracy_loss'] if r.get('test_accuracy_loss') is not None else None)} | "
                     f"{pct(r.get('mean_kept_fraction'))} | {pct(r.get('mean_params_fraction'))} | "
                     f"{pct(r.get('mean_macs_fraction'))} | {pct(r.get('ensemble_diff'))} |")
    return "\n".join(lines)


def run_one(method: str, run_dir: Path, work: Path, config: str | None, sets: list[str],
            data_dir: str | None, progress: bool) -> dict:
    """Modularize a fresh copy of `run_dir` in `work/method`; the record of that search."""
    from jaxsplit.search.driver import run_modularize

    dest = work / method
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    shutil.copytree(run_dir / "checkpoint", dest / "checkpoint")
    if (run_dir / "config.yaml").exists():
        shutil.copy(run_dir / "config.yaml", dest / "config.yaml")
    cfg = cli.resolve_config(run_dir=dest, config_path=config, sets=[*sets, f"search.method={method}"],
                             data_dir=data_dir)
    cli._check_matches_run(cfg, dest)
    print(f"== {method}: {' '.join(sets) or '(config as is)'}")
    t0 = time.perf_counter()
    run_modularize(dest, cfg, resume=False, progress=progress)
    wall = time.perf_counter() - t0
    settings = jconfig.to_dict(cfg.search)
    if method == "ga":
        settings.pop("gradient")
    return record_of(method, dest / "modularize", settings, wall, "measured", sets)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, default=Path("runs/fm_cpu"))
    parser.add_argument("--config", default=str(REPO / "configs" / "fashion_mnist_cpu_modularize.yaml"),
                        help="YAML over the run's config.yaml ('' for none)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="both searchers")
    parser.add_argument("--ga-set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--grad-set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--full", action="store_true", help="no small-budget defaults")
    parser.add_argument("--existing-ga", type=Path, default=None, metavar="DIR",
                        help="reuse the finished GA search in DIR/modularize (a run folder made "
                             "from RUN's checkpoint) instead of running one")
    parser.add_argument("--plot", type=Path, default=None,
                        help="the PNG of both searchers against wall time (default: the results "
                             "path with .png)")
    parser.add_argument("--work", type=Path, default=Path("runs/compare_searchers"))
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--results", default=str(REPO / "benchmarks" / "results" / "compare_searchers.json"))
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    if not (args.run / "checkpoint").exists():
        parser.error(f"{args.run} has no checkpoint/; train it first: jaxsplit train --config "
                     f"configs/fashion_mnist_cpu.yaml --out {args.run}")
    small_ga, small_grad = ([], []) if args.full else (SMALL_GA, SMALL_GRADIENT)
    load_before = os.getloadavg()
    results = {}
    try:
        if args.existing_ga is not None:
            results["ga"] = existing_ga(args.existing_ga, args.run)
        for method, extra in (("ga", [*small_ga, *args.set, *args.ga_set]),
                              ("gradient", [*small_grad, *args.set, *args.grad_set])):
            if method not in results:
                results[method] = run_one(method, args.run, args.work, args.config or None, extra,
                                          args.data_dir, not args.no_progress)
    except CompareError as e:
        parser.error(str(e))
    load_after = os.getloadavg()
    record = {"benchmark": "compare_searchers", "source_run": str(args.run),
              "config_file": args.config or None, "full_budget": args.full,
              "existing_ga": None if args.existing_ga is None else str(args.existing_ga), **results}
    out = save_record(args.results, record, load_before, load_after)
    from jaxsplit import plots

    model_valid = results["gradient"].get("model_valid_accuracy")
    plot = plots.plot_searcher_comparison({m: r["curves"] for m, r in results.items()},
                                          args.plot or Path(args.results).with_suffix(".png"),
                                          model_valid_accuracy=model_valid,
                                          title=f"GA vs gradient searcher on {args.run}")
    print(f"{'':<10} {'wall s':>8} {'test acc':>9} {'loss':>7} {'kept':>7} {'MACs':>7} {'diff':>7}")
    for method, r in results.items():
        pct = lambda v: "   n/a" if v is None else f"{100 * v:6.2f}%"
        print(f"{method:<10} {r['wall_time_s']:>8.1f} {pct(r['ensemble_test_accuracy']):>9} "
              f"{pct(r['test_accuracy_loss']):>7} {pct(r['mean_kept_fraction']):>7} "
              f"{pct(r['mean_macs_fraction']):>7} {pct(r['ensemble_diff']):>7}")
    print(f"-> {out}, {plot}")
    print()
    print(markdown_table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
