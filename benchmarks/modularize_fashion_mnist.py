"""Modularize the Fashion-MNIST CPU preset with a reduced budget and record the result.

    python benchmarks/modularize_fashion_mnist.py [--run runs/fm_cpu]
        [--config configs/fashion_mnist_cpu_modularize.yaml] [--set search.key=value ...]
        [--fresh] [--compare-backends] [--results benchmarks/results/modularize.json]
        [--existing [--load-before 1.0,1.2,1.5]]

Any trained preset works, the BatchNorm zoo too (a ResNet searches with the "reference"
evaluator; `--compare-backends` is for ConvNets, which have a "fast" one):

    python benchmarks/modularize_fashion_mnist.py --run runs/fm_resnet20 \
        --config configs/fashion_mnist_resnet20_cpu_modularize.yaml \
        --results benchmarks/results/modularize_resnet20.json

`--existing` records a search that already finished in RUN/modularize/ (e.g. one run with
`jaxsplit modularize ... --no-progress` in the background) instead of searching: the settings
are the search's own `modularize/config.yaml`, the wall time is from that file (written when the
search started) to `summary.json` (written when it ended), and `--load-before` gives the load
averages read before it started (default: none recorded).

RUN must hold the trained CPU preset (`jaxsplit train --config configs/fashion_mnist_cpu.yaml
--out runs/fm_cpu`). The search settings are the run's `config.yaml` < `--config` < `--set`
(the same precedence as `jaxsplit modularize`). `--fresh` deletes `RUN/modularize/` first (a
search never overwrites an existing one). `--compare-backends` also times one evaluation of
the initial population (the search's own valid images) with the "reference" and the "fast"
evaluator backends.

The project's target: the search finishes in <= 15 min on 2 CPU cores and its module
ensemble loses <= 3 points of TEST accuracy against the model while the modules keep <= 60% of
the model's MACs on average. The JSON records the config, wall times (total, compile,
importance, per generation), per-class kept kernel / parameter / MAC fractions, ensemble
valid/test accuracy against the model, the machine (with the load average before and after:
other processes on the machine slow the run down) and the date.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import jax
import numpy as np

from jaxsplit import cli
from jaxsplit import config as jconfig
from jaxsplit.search import evaluate as jevaluate

from _record import save_record  # benchmarks/ (the script's folder) is on sys.path

REPO = Path(__file__).resolve().parents[1]
TARGET_SECONDS = 15 * 60.0
TARGET_MAX_LOSS = 0.03
TARGET_MAX_MACS = 0.60


def _rel(path: str | Path) -> str:
    p = Path(path).resolve()
    return str(p.relative_to(REPO)) if p.is_relative_to(REPO) else str(path)


def compare_backends(run_dir: Path, cfg: jconfig.Config) -> dict:
    """Seconds of one evaluation of the initial population `(C, P + 1)` on the search's valid
    images, per backend (a warm-up call first; the second call is timed)."""
    from jaxsplit import checkpoint, importance, pipeline
    from jaxsplit.search import driver

    scfg = cfg.search
    model, params, train_cfg, _ = checkpoint.load_model(run_dir)
    _, valid, _ = pipeline.prepare_data(cfg.data)
    n = len(valid) if scfg.num_valid is None else min(scfg.num_valid, len(valid))
    images, labels = np.asarray(valid.images[:n]), np.asarray(valid.labels[:n])
    imp = importance.kernel_importance(model, params, images, labels,
                                       confidence=scfg.importance_confidence).importance
    classes = jax.numpy.arange(model.num_classes, dtype=jax.numpy.int32)
    out = {"num_images": n, "population_size": scfg.population_size + 1,
           "num_classes": model.num_classes}
    for backend in ("reference", "fast"):
        # no row cache (ignored by "reference"): the timed call repeats the warm-up's masks
        evaluate_fn = jevaluate.make_evaluator(model, backend, chunk_individuals=scfg.chunk_individuals,
                                               chunk_images=scfg.chunk_images, cache_bytes=0)
        problem, settings = driver.build_problem(model, train_cfg.model.name, imp, scfg,
                                                 evaluate_fn=evaluate_fn)
        bits = driver.initial_population(jax.random.key(scfg.seed), problem, scfg.population_size + 1,
                                         settings)
        masks = problem.decode(problem.phenotype(problem.strategy.from_bits(bits)))
        x = jax.numpy.asarray(images)
        t = time.perf_counter()
        jax.block_until_ready(evaluate_fn({"params": params}, masks, x, classes))
        first = time.perf_counter() - t
        t = time.perf_counter()
        jax.block_until_ready(evaluate_fn({"params": params}, masks, x, classes))
        steady = time.perf_counter() - t
        count = model.num_classes * (scfg.population_size + 1) * n
        out[backend] = {"first_call_s": round(first, 2), "steady_s": round(steady, 2),
                        "module_images_per_s": round(count / steady)}
        print(f"  {backend}: {steady:.1f} s per population ({count / steady:,.0f} module-images/s)")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, default=Path("runs/fm_cpu"))
    parser.add_argument("--config", default=str(REPO / "configs" / "fashion_mnist_cpu_modularize.yaml"),
                        help="YAML over the run's config.yaml ('' for none)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--fresh", action="store_true", help="delete RUN/modularize/ first")
    parser.add_argument("--compare-backends", action="store_true")
    parser.add_argument("--results", default=str(REPO / "benchmarks" / "results" / "modularize.json"))
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--existing", action="store_true",
                        help="record the finished search in RUN/modularize/ instead of searching")
    parser.add_argument("--load-before", default=None, metavar="L1,L5,L15",
                        help="with --existing: the load averages before that search started")
    args = parser.parse_args(argv)

    run_dir = args.run
    if not (run_dir / "checkpoint").exists():
        parser.error(f"{run_dir} has no checkpoint/; train it first: jaxsplit train --config "
                     f"configs/fashion_mnist_cpu.yaml --out {run_dir}")
    out_dir = run_dir / "modularize"
    if args.existing:
        if args.fresh:
            parser.error("--existing records the search in RUN/modularize/; --fresh would delete it")
        if not (out_dir / "summary.json").is_file():
            parser.error(f"{out_dir} holds no finished search (no summary.json); run it first: "
                         f"jaxsplit modularize --run {run_dir} --config {args.config}")
        cfg = jconfig.load(out_dir / "config.yaml")
    else:
        cfg = cli.resolve_config(run_dir=run_dir, config_path=args.config or None, sets=args.set,
                                 data_dir=args.data_dir)
        cli._check_matches_run(cfg, run_dir)
    if args.fresh and out_dir.exists():
        shutil.rmtree(out_dir)

    from jaxsplit.search.driver import run_modularize

    convnet = cfg.model.name in ("simcnn", "rescnn", "weak_cnn")
    if args.compare_backends and not convnet:
        parser.error(f"--compare-backends times the ConvNet 'fast' evaluator; {cfg.model.name} "
                     f"has only the 'reference' one")
    backend = cfg.search.backend
    if backend == "auto":  # as search.evaluate.make_evaluator resolves it
        resolved = jevaluate.default_backend(jax.default_backend()) if convnet else "reference"
    else:
        resolved = backend
    if args.existing:
        load_before = ([float(x) for x in args.load_before.split(",")] if args.load_before
                       else [float("nan")] * 3)
        summary = json.loads((out_dir / "summary.json").read_text())
        wall = (out_dir / "summary.json").stat().st_mtime - (out_dir / "config.yaml").stat().st_mtime
        load_after = os.getloadavg()
    else:
        load_before = os.getloadavg()
        t0 = time.perf_counter()
        summary = run_modularize(run_dir, cfg, resume=False, progress=not args.no_progress)
        wall = time.perf_counter() - t0
        load_after = os.getloadavg()
    history = json.loads((out_dir / "history.json").read_text())["generations"]
    gen_times = [h["time_s"] for h in history]

    comparison = None
    if args.compare_backends:
        print("timing one population evaluation per backend ...")
        comparison = compare_backends(run_dir, cfg)

    loss = summary["model_test_accuracy"] - summary["ensemble_test_accuracy"]
    macs = summary["mean_macs_fraction"]
    record = {
        "benchmark": "modularize_fashion_mnist",
        "run_dir": str(run_dir),
        "config_file": _rel(args.config) if args.config else None,
        "recorded_from_existing_search": bool(args.existing),
        "overrides": args.set,
        "search": jconfig.to_dict(cfg.search),
        "evaluator_backend": resolved,
        "model": summary["model"],
        "num_genes": summary["num_genes"],
        "num_valid_images": summary["num_valid_images"],
        "generations_run": summary["generations_run"],
        "stopped_early": summary["stopped_early"],
        "best_generation": summary["best_generation"],
        "wall_time_s": round(wall, 1),
        "compile_time_s": summary["compile_time_s"],
        "importance_time_s": summary["importance_time_s"],
        "mean_generation_time_s": summary["mean_generation_time_s"],
        "generation_times_s": [round(t, 2) for t in gen_times],
        "model_valid_accuracy": summary["model_valid_accuracy"],
        "model_test_accuracy": summary["model_test_accuracy"],
        "ensemble_valid_accuracy": summary["ensemble_valid_accuracy"],
        "ensemble_test_accuracy": summary["ensemble_test_accuracy"],
        "test_accuracy_loss": loss,
        "ensemble_diff": summary["ensemble_diff"],
        "mean_kept_fraction": summary["mean_kept_fraction"],
        "mean_params_fraction": summary["mean_params_fraction"],
        "mean_macs_fraction": macs,
        "per_class": [{k: p.get(k) for k in ("class", "name", "kept_fraction", "params_fraction",
                                             "macs_fraction", "kept_per_layer")}
                      for p in summary["per_class"]],
        "init": {"sensitive_layers": summary["sensitive_layers"], **summary["init_ratios"]},
        "targets": {"max_wall_time_s": TARGET_SECONDS, "max_test_accuracy_loss": TARGET_MAX_LOSS,
                    "max_mean_macs_fraction": TARGET_MAX_MACS},
        "meets_time_target": wall <= TARGET_SECONDS,
        "meets_accuracy_target": loss <= TARGET_MAX_LOSS,
        "meets_macs_target": macs is not None and macs <= TARGET_MAX_MACS,
        "backend_comparison": comparison,
    }
    out = save_record(args.results, record, load_before, load_after)
    print(f"search {wall:.0f} s (target {TARGET_SECONDS:.0f}), test accuracy {summary['ensemble_test_accuracy']:.4f} "
          f"vs model {summary['model_test_accuracy']:.4f} (loss {100 * loss:.2f} pts, target <= 3), "
          f"mean MACs {100 * macs:.1f}% (target <= 60%) -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
