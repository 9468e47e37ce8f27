"""Compare the two searchers (GA, gradient-trained masks) on one trained model and record it.

    python benchmarks/compare_searchers.py [--run runs/fm_cpu]
        [--config configs/fashion_mnist_cpu_modularize.yaml] [--set key=value ...]
        [--ga-set key=value ...] [--grad-set key=value ...] [--full]
        [--work runs/compare] [--results benchmarks/results/compare_searchers.json]

RUN must hold a trained model (`jaxsplit train --config configs/fashion_mnist_cpu.yaml --out
runs/fm_cpu`). Each searcher runs in its own copy of the run folder (`WORK/ga`, `WORK/gradient`,
made fresh), through `run_modularize` with `search.method=ga` / `gradient`. The settings are the
run's `config.yaml` < `--config` < `--set` (both searchers) < `--ga-set` / `--grad-set`.

The default budget is small (a smoke comparison, minutes on 2 CPU cores): the GA with 10
individuals x 5 generations on 1,000 valid images; the gradient searcher with 1 heads-only epoch
and two 7-epoch cycles on 10,000 train images (at the reference learning rate a kernel needs
~1,000 mask steps to drop at all, so fewer steps keep every kernel). `--full` drops these defaults (the reference
budgets: 100 x 200 GA, 145 gradient epochs: hours on a CPU; schedule those on a GPU).

The JSON records, per searcher: wall time, ensemble valid/test accuracy and the model's, the test
accuracy loss, the ensemble diff, mean kept-kernel / parameter / MAC fractions, the per-class
kept fractions, and the settings; plus the machine (with load averages) and the date.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

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
    summary = run_modularize(dest, cfg, resume=False, progress=progress)
    wall = time.perf_counter() - t0
    settings = jconfig.to_dict(cfg.search)
    if method == "ga":
        settings.pop("gradient")
    return {"run_dir": str(dest), "overrides": sets, "search": settings, "wall_time_s": round(wall, 1),
            **{k: summary.get(k) for k in KEYS},
            "per_class_kept_fraction": [p.get("kept_fraction") for p in summary["per_class"]]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, default=Path("runs/fm_cpu"))
    parser.add_argument("--config", default=str(REPO / "configs" / "fashion_mnist_cpu_modularize.yaml"),
                        help="YAML over the run's config.yaml ('' for none)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="both searchers")
    parser.add_argument("--ga-set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--grad-set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--full", action="store_true", help="no small-budget defaults")
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
    for method, extra in (("ga", [*small_ga, *args.set, *args.ga_set]),
                          ("gradient", [*small_grad, *args.set, *args.grad_set])):
        results[method] = run_one(method, args.run, args.work, args.config or None, extra,
                                  args.data_dir, not args.no_progress)
    load_after = os.getloadavg()
    record = {"benchmark": "compare_searchers", "source_run": str(args.run),
              "config_file": args.config or None, "full_budget": args.full, **results}
    out = save_record(args.results, record, load_before, load_after)
    print(f"{'':<10} {'wall s':>8} {'test acc':>9} {'loss':>7} {'kept':>7} {'MACs':>7} {'diff':>7}")
    for method, r in results.items():
        pct = lambda v: "   n/a" if v is None else f"{100 * v:6.2f}%"
        print(f"{method:<10} {r['wall_time_s']:>8.1f} {pct(r['ensemble_test_accuracy']):>9} "
              f"{pct(r['test_accuracy_loss']):>7} {pct(r['mean_kept_fraction']):>7} "
              f"{pct(r['mean_macs_fraction']):>7} {pct(r['ensemble_diff']):>7}")
    print(f"-> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
