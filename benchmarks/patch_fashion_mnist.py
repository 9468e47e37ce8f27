"""Fashion-MNIST "self" patching, end to end on an existing run folder (docs/method.md §8).

Usage:
    python benchmarks/patch_fashion_mnist.py RUN_DIR [--set patch.weak_epochs=5 ...] [--out PATH]

RUN_DIR must hold a trained Fashion-MNIST model (`checkpoint/`) and its modules
(`modularize/modules.npz`, either searcher), e.g. from `configs/fashion_mnist_self_patch.yaml` (the faithful
protocol: strong model on classes 0-4) or the demo run (one 10-class strong model). For each
target class in the run's `patch` section, this trains (or reuses) the weak model, patches it
with the TC module under every calibration, and measures it on the test split; then it writes
`benchmarks/results/patch.json` (machine, date, settings, averaged and per-TC results) and
prints whether the project's acceptance target is met:

    averaged over the target classes, the patched models improve TC precision AND TC recall over
    the weak models without lowering non-TC accuracy by more than 1 point

for the primary (first-listed, chosen beforehand) calibration. Nothing is tuned on the test split.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from jaxsplit import config as jconfig
from jaxsplit import patch

from _record import save_record  # benchmarks/ (the script's folder) is on sys.path

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "patch.json"
_SUMMARY_KEYS = ("tc_precision", "tc_recall", "tc_f1", "non_tc_accuracy", "accuracy", "tc_ece")


def _summary(m: dict) -> dict:
    return {k: m[k] for k in _SUMMARY_KEYS if k in m}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path, help="run folder with checkpoint/ and modularize/masks.npz")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="config override, e.g. patch.weak_epochs=5 (repeatable)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"result JSON (default {DEFAULT_OUT})")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--strict", action="store_true", help="exit with status 1 when the target is missed")
    args = parser.parse_args(argv)

    run_dir = args.run_dir
    cfg_path = run_dir / "config.yaml"
    if not cfg_path.is_file():
        parser.error(f"{cfg_path} not found: RUN_DIR must be a trained run folder (jaxsplit train)")
    cfg = jconfig.load(cfg_path, args.overrides)
    if cfg.patch.task != "self" or cfg.data.name != "fashion_mnist":
        parser.error(f"this benchmark is the Fashion-MNIST 'self' task; the run has data.name="
                     f"{cfg.data.name!r}, patch.task={cfg.patch.task!r}")
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    results = patch.run_patch(run_dir, cfg, progress=not args.no_progress)
    doc = {
        "benchmark": "patch_fashion_mnist",
        "run_dir": str(run_dir),
        "overrides": list(args.overrides),
        "protocol": results["protocol"],
        "strong_model": results["strong_model"],
        "weak_model": results["weak_model"],
        "target_classes": results["target_classes"],
        "calibrations": results["calibrations"],
        "primary_calibration": results["primary_calibration"],
        "acceptance": results["acceptance"],
        "average": {
            "before": _summary(results["average"]["before"]),
            "module_patch": {c: _summary(m) for c, m in results["average"]["module_patch"].items()},
            "whole_model_patch": {c: _summary(m) for c, m in results["average"]["whole_model_patch"].items()},
        },
        "per_tc": {
            tc: {"before": _summary(r["before"]),
                 "module_patch": {c: _summary(m) for c, m in r["module_patch"].items()},
                 "whole_model_patch": {c: _summary(m) for c, m in r["whole_model_patch"].items()},
                 "module": r["module"], "weak": r["weak"]}
            for tc, r in results["per_tc"].items()
        },
        "elapsed_s": time.perf_counter() - t0,
        "patch_config": results["patch_config"],
    }
    summary_path = run_dir / "modularize" / "summary.json"
    if summary_path.is_file():  # the strong model's modules (what the patches are made of)
        s = json.loads(summary_path.read_text())
        doc["modularization"] = {k: s.get(k) for k in (
            "population_size", "num_generations", "generations_run", "num_valid_images",
            "model_test_accuracy", "ensemble_test_accuracy", "test_accuracy_loss", "ensemble_diff",
            "mean_kept_fraction", "mean_params_fraction", "mean_macs_fraction", "mean_generation_time_s")}
    if "average_poor_fit" in results:  # under-/over-fitted weak models (patch.poor_fit)
        doc["average_poor_fit"] = results["average_poor_fit"]
        doc["acceptance_poor_fit"] = {
            kind: patch.acceptance(avg, results["primary_calibration"])
            for kind, avg in results["average_poor_fit"].items()}
    out = save_record(args.out, doc, load_before)
    print(f"wrote {out}")
    for label, acc in [("weak models", results["acceptance"])] + sorted(doc.get("acceptance_poor_fit", {}).items()):
        print(f"{label}: {'PASSED' if acc['passed'] else 'NOT passed'} ({acc['calibration']}: precision "
              f"{100 * acc['delta_tc_precision']:+.2f}, recall {100 * acc['delta_tc_recall']:+.2f}, "
              f"non-TC {100 * acc['delta_non_tc_accuracy']:+.2f} pts)")
    passed = results["acceptance"]["passed"]
    return 0 if passed or not args.strict else 1


if __name__ == "__main__":
    sys.exit(main())
