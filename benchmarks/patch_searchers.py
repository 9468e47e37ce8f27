"""Patch the same weak models with each searcher's modules and record it (docs/method.md §8, §10).

    python benchmarks/patch_searchers.py --searcher ga=runs/fm_cpu \
        --searcher gradient=runs/compare_fm_cpu/gradient \
        [--set patch.key=value ...] [--work runs/patch_searchers_fm_cpu] \
        [--results benchmarks/results/patch_searchers_fm_cpu.json]

Each `NAME=RUN` is a run folder holding one trained model and a finished modularization
(`modularize/modules.npz`), all made from the same checkpoint (checked by params digest). Each
is patched (`jaxsplit.patch.run_patch`) in its own copy `WORK/NAME` (the checkpoint and the
modularization are copied; the original run folder is never written), with the first run's
config < `--set`. The weak models are trained once, by the first searcher's patch, and copied
into the others' `patch/` folders before they run, where the patch stage reuses them (their
config is unchanged), so every searcher patches the very same weak models; the patch method,
its calibration fit and the validation gate use the weak task's valid split only, and the test
split is only measured.

The JSON records, per searcher: the patch summary of the default method after the gate (per TC
before / after TC precision, recall, F1 and non-TC accuracy, accepted or rejected, and the
averages), the same for every measured method, the module sizes, and the wall time; plus the
machine (with load averages) and the date.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

from jaxsplit import checkpoint as ckpt
from jaxsplit import cli
from jaxsplit import patch

from _record import save_record  # benchmarks/ (the script's folder) is on sys.path

REPO = Path(__file__).resolve().parents[1]


def parse_searcher(text: str) -> tuple[str, Path]:
    """`"NAME=RUN"` -> `(NAME, Path(RUN))`."""
    name, sep, run = text.partition("=")
    if not sep or not name or not run:
        raise argparse.ArgumentTypeError(f"expected NAME=RUN (e.g. ga=runs/fm_cpu), got {text!r}")
    return name, Path(run)


def fresh_copy(run: Path, dest: Path) -> Path:
    """`dest` made fresh with `run`'s checkpoint, config and modularization (no patch results)."""
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    shutil.copytree(run / "checkpoint", dest / "checkpoint")
    shutil.copytree(run / "modularize", dest / "modularize",
                    ignore=shutil.ignore_patterns("search_ckpt", "*.lock"))
    for name in ("config.yaml", "metrics.json"):
        if (run / name).is_file():
            shutil.copy(run / name, dest / name)
    return dest


def copy_weak_models(src: Path, dest: Path) -> list[str]:
    """Copies `src/patch/weak_tc*` into `dest/patch/`; the names copied."""
    (dest / "patch").mkdir(parents=True, exist_ok=True)
    names = []
    for d in sorted((src / "patch").glob("weak_tc*")):
        if d.is_dir():
            shutil.copytree(d, dest / "patch" / d.name, dirs_exist_ok=True)
            names.append(d.name)
    return names


def record_of(results: dict, wall: float, run: Path) -> dict:
    per_tc = results["per_tc"]
    return {
        "source_run": str(run), "wall_time_s": round(wall, 1),
        "searcher": results.get("modules", {}).get("searcher"),
        "summary": results["summary"], "summary_by_method": results.get("summary_by_method"),
        "decision_settings": results.get("decision_settings"),
        "modules": {tc: {k: r["module"].get(k) for k in ("kept_fraction", "params_fraction", "macs_fraction")}
                    for tc, r in per_tc.items()},
        "weak_models": {tc: r["weak"] for tc, r in per_tc.items()},
    }


def table(records: dict) -> str:
    """README-ready markdown: averages over the TCs of the default method after the gate."""
    lines = ["| modules | TC precision | TC recall | TC F1 | non-TC accuracy | patches kept | TCs worse (F1) |",
             "|---|---|---|---|---|---|---|"]
    for name, r in records.items():
        s = r["summary"]
        b, f = s["average"]["test"]["before"], s["average"]["test"]["final"]
        cell = lambda k: f"{100 * b[k]:.2f} → {100 * f[k]:.2f}"  # noqa: E731
        lines.append(f"| {name} | {cell('tc_precision')} | {cell('tc_recall')} | {cell('tc_f1')} | "
                     f"{cell('non_tc_accuracy')} | {s['num_accepted']}/{s['num_tcs']} | {s['num_worse']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--searcher", action="append", type=parse_searcher, required=True, metavar="NAME=RUN",
                        help="a run folder with a finished modularization (repeat; the first trains the weak models)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--work", type=Path, default=Path("runs/patch_searchers"))
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--results", default=str(REPO / "benchmarks" / "results" / "patch_searchers.json"))
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    names = [n for n, _ in args.searcher]
    if len(set(names)) != len(names):
        parser.error(f"searcher names must differ, got {names}")
    digests = {}
    for name, run in args.searcher:
        if not (run / "modularize" / "modules.npz").is_file():
            parser.error(f"{run} has no modularize/modules.npz; run `jaxsplit modularize --run {run}` first")
        digests[name] = ckpt.params_digest(ckpt.load_model(run).params)
    if len(set(digests.values())) != 1:
        parser.error(f"the runs hold different models (params digests {digests}); the comparison "
                     f"needs the modules of one model")
    load_before = os.getloadavg()
    first = None
    records = {}
    for name, run in args.searcher:
        dest = fresh_copy(run, args.work / name)
        if first is not None:
            copy_weak_models(first, dest)
        cfg = cli.resolve_config(run_dir=dest, sets=args.set, data_dir=args.data_dir)
        print(f"== {name}: patching with the modules of {run}", flush=True)
        t0 = time.perf_counter()
        results = patch.run_patch(dest, cfg, progress=not args.no_progress)
        records[name] = record_of(results, time.perf_counter() - t0, run)
        first = first or dest
    out = save_record(args.results, {"benchmark": "patch_searchers", "overrides": args.set,
                                     "weak_models_trained_by": names[0], "searchers": records},
                      load_before)
    print(f"-> {out}\n")
    print(table(records))
    return 0


if __name__ == "__main__":
    sys.exit(main())
