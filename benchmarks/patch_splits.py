"""Fashion-MNIST "self" patching on several strong/weak class splits, end to end (docs/method.md §8).

Usage:
    python benchmarks/patch_splits.py [--workdir runs/patch_splits] [--out PATH] [--splits 4]

For each split (the default one: strong model on classes 0-4, weak models on 5-9 + one TC; then
3 random 5/5 splits drawn with a fixed seed) this trains the strong model on its 5 classes,
modularizes it with the GA, trains one weak model per TC (its 5 classes + the TC, 500 training
images per class) and patches it (`jaxsplit.patch.run_patch`): the reference's min-max and the
valid-fitted methods, each behind the validation gate, fitted and gated on the weak task's valid
split only; the test split is only measured. CPU-sized budget (~40 min on 2 shared cores):
SimCNN x0.125 for 4 epochs, a small search (16 individuals, 8 generations, 1,000 valid
images), weak CNNs for 4 epochs.

Resumable: each split's run folder keeps its checkpoint, modules and `patch/patch_results.json`;
a finished split (its `split_result.json`, same settings) is not recomputed, and
`--only 0 2` runs some splits (e.g. two processes side by side; a lock file keeps them apart),
after which a plain run collects every split into the JSON. Writes
`benchmarks/results/patch_splits.json`: per split and averaged over splits, for every method,
the valid and test figures before/after (averaged over the TCs), and whether the targets hold:

    on every split, with the default method and gate, averaged over the TCs, TC F1 and non-TC
    accuracy do not fall (test), and on the TCs whose weak model has TC recall below 90%, TC F1
    rises.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from jaxsplit import config as jconfig
from jaxsplit import patch

from _record import save_record  # benchmarks/ (the script's folder) is on sys.path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "patch_splits.json"
BASE_CONFIG = ROOT / "configs" / "fashion_mnist_self_patch.yaml"
SPLIT_SEED = 2026
BUDGET = [  # the CPU-sized budget (see the module docstring)
    "train.epochs=4",
    "search.population_size=16",
    "search.num_generations=8",
    "search.num_valid=1000",
    "patch.weak_epochs=4",
    "patch.poor_fit=false",
    "patch.calibrations=[min_max]",
]
KEYS = ("tc_precision", "tc_recall", "tc_f1", "non_tc_accuracy")


def class_splits(num_splits: int, seed: int = SPLIT_SEED) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """The default split (0-4 / 5-9), then random 5/5 splits of the 10 classes (distinct, seeded)."""
    splits = [((0, 1, 2, 3, 4), (5, 6, 7, 8, 9))]
    rng = np.random.default_rng(seed)
    while len(splits) < num_splits:
        perm = rng.permutation(10)
        strong, weak = tuple(sorted(int(c) for c in perm[:5])), tuple(sorted(int(c) for c in perm[5:]))
        if all(strong != s and strong != w for s, w in splits):
            splits.append((strong, weak))
    return splits


def split_config(strong: tuple[int, ...], weak: tuple[int, ...], index: int) -> jconfig.Config:
    overrides = [f"name=fm_split{index}", f"data.classes={list(strong)}", f"patch.strong_classes={list(strong)}",
                 f"patch.weak_classes={list(weak)}", *BUDGET]
    return jconfig.load(BASE_CONFIG, overrides)


def _valid_final(row: dict) -> dict:
    return row["valid"]["after"] if row["accepted"] else row["valid"]["before"]


def split_record(results: dict) -> dict:
    """What the benchmark keeps of one split's `run_patch` results."""
    methods = {}
    for m, s in results["summary_by_method"].items():
        rows = s["per_tc"]
        valid_final = {k: float(np.mean([_valid_final(r)[k] for r in rows])) for k in KEYS}
        methods[m] = {
            "valid": {"before": s["average"]["valid"]["before"], "after": s["average"]["valid"]["after"],
                      "final": valid_final},
            "test": s["average"]["test"], "delta_test": s["average"]["delta_test"],
            "num_accepted": s["num_accepted"], "num_improved_both": s["num_improved_both"],
            "num_worse": s["num_worse"], "num_worse_non_tc": s["num_worse_non_tc"],
            "low_recall": s["low_recall"],
            "per_tc": [{k: r[k] for k in ("target_class", "class_name", "accepted", "reason", "delta_test",
                                          "improved_both", "worse", "worse_non_tc")}
                       | {"valid": r["valid"], "test": r["test"]} for r in rows]}
    return {"strong_model": results["strong_model"], "target_classes": results["target_classes"],
            "reference_min_max_ungated": {"before": results["average"]["before"],
                                          "after": results["average"]["module_patch"]["min_max"]},
            "methods": methods, "elapsed_patch_s": results["elapsed_s"]}


def _without_method(settings: dict | None) -> dict | None:
    if settings is None:
        return None
    return {**settings, "patch": {k: v for k, v in settings["patch"].items() if k != "method"}}


def run_split(index: int, strong: tuple[int, ...], weak: tuple[int, ...], workdir: Path, progress: bool) -> dict:
    from jaxsplit import train
    from jaxsplit.search import driver

    cfg = split_config(strong, weak, index)
    run_dir = workdir / f"split{index}"
    cached = run_dir / "split_result.json"
    settings = jconfig.to_dict(cfg)
    if cached.is_file():
        rec = json.loads(cached.read_text())
        # patch.method only picks which of the measured decision_methods is the default
        if _without_method(rec.get("settings")) == _without_method(settings):
            print(f"[split {index}] cached: {cached}", flush=True)
            return {**rec, "from_cache": True}
    times = {}
    t0 = time.perf_counter()
    if not (run_dir / "checkpoint").exists() or not (run_dir / "metrics.json").exists():
        run_dir.mkdir(parents=True, exist_ok=True)
        train.train_and_evaluate(cfg, run_dir, progress=progress, overwrite=(run_dir / "checkpoint").exists())
        jconfig.save(cfg, run_dir / "config.yaml")
    times["train_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    if not (run_dir / "modularize" / "modules.npz").is_file():
        driver.run_modularize(run_dir, cfg, resume=(run_dir / "modularize" / "search_ckpt").exists(),
                              progress=progress)
    times["modularize_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    results = patch.run_patch(run_dir, cfg, progress=progress, plots=False, verbose=True)
    times["patch_s"] = time.perf_counter() - t0
    rec = {"split": index, "strong_classes": list(strong), "weak_classes": list(weak), "settings": settings,
           "times_s": times, **split_record(results)}
    cached.write_text(json.dumps(rec, indent=2))
    return rec


def targets(rec: dict, method: str) -> dict:
    m = rec["methods"][method]
    d = m["delta_test"]
    low = m["low_recall"]
    out = {"tc_f1_not_lower": d["tc_f1"] >= 0, "non_tc_accuracy_not_lower": d["non_tc_accuracy"] >= 0,
           "low_recall_tc_f1_rises": None if low["delta_tc_f1"] is None else low["delta_tc_f1"] > 0,
           "delta_tc_f1": d["tc_f1"], "delta_non_tc_accuracy": d["non_tc_accuracy"],
           "low_recall_target_classes": low["target_classes"], "low_recall_delta_tc_f1": low["delta_tc_f1"]}
    out["met"] = bool(out["tc_f1_not_lower"] and out["non_tc_accuracy_not_lower"]
                      and out["low_recall_tc_f1_rises"] is not False)
    return out


def _mean(dicts: list[dict]) -> dict:
    return {k: float(np.mean([d[k] for d in dicts])) for k in KEYS}


def aggregate(records: list[dict], default: str) -> dict:
    methods = list(records[0]["methods"])
    over = {}
    for m in methods:
        ms = [r["methods"][m] for r in records]
        over[m] = {"valid": {s: _mean([x["valid"][s] for x in ms]) for s in ("before", "after", "final")},
                   "test": {s: _mean([x["test"][s] for x in ms]) for s in ("before", "patched", "final")},
                   "num_accepted": sum(x["num_accepted"] for x in ms),
                   "num_improved_both": sum(x["num_improved_both"] for x in ms),
                   "num_worse": sum(x["num_worse"] for x in ms),
                   "num_worse_non_tc": sum(x["num_worse_non_tc"] for x in ms),
                   "num_tcs": sum(len(x["per_tc"]) for x in ms)}
    per_split_targets = {str(r["split"]): targets(r, default) for r in records}
    return {"methods": over, "default_method": default,
            "targets": {"per_split": per_split_targets, "all_met": all(t["met"] for t in per_split_targets.values())}}


def print_table(records: list[dict], default: str) -> None:
    def f(d: dict) -> str:
        return " ".join(f"{100 * d[k]:6.2f}" for k in KEYS)

    print(f"\nmethod {default} + gate; P R F1 nonTC (mean over TCs); valid: weak | out-of-fold patch | final; "
          f"test: weak | final")
    for r in records:
        m = r["methods"][default]
        print(f"split {r['split']} strong {r['strong_classes']}: valid {f(m['valid']['before'])} | "
              f"{f(m['valid']['after'])} | {f(m['valid']['final'])};  test {f(m['test']['before'])} | "
              f"{f(m['test']['final'])}  accepted {m['num_accepted']}/5", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, default=ROOT / "runs" / "patch_splits")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--splits", type=int, default=4, help="number of splits (the default one first)")
    parser.add_argument("--progress", action="store_true", help="progress bars")
    parser.add_argument("--only", type=int, nargs="*", default=None,
                        help="run only these split indices and write no JSON")
    args = parser.parse_args(argv)
    if "JAXSPLIT_DATA_DIR" not in os.environ and Path("/work/shared/datasets/fashion-mnist").is_dir():
        os.environ["JAXSPLIT_DATA_DIR"] = "/work/shared/datasets/fashion-mnist"
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    default = jconfig.PatchConfig().method
    records = []
    for i, (strong, weak) in enumerate(class_splits(args.splits)):
        if args.only is not None and i not in args.only:
            continue
        print(f"[split {i}] strong {strong} / weak {weak}", flush=True)
        lock = args.workdir / f"split{i}.lock"
        lock.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            parser.error(f"{lock} exists: another process runs split {i} (remove the file if it died)")
        try:
            os.write(fd, str(os.getpid()).encode())
            records.append(run_split(i, strong, weak, args.workdir, args.progress))
        finally:
            os.close(fd)
            lock.unlink()
        print_table(records, default)
    if args.only is not None:
        return 0
    doc = {"benchmark": "patch_splits", "protocol": "self, faithful: strong model trained on its 5 classes only",
           "budget_overrides": BUDGET, "base_config": str(BASE_CONFIG.relative_to(ROOT)),
           "split_seed": SPLIT_SEED, "default_method": default,
           "gate": {k: getattr(jconfig.PatchConfig(), k) for k in
                    ("gate", "gate_objective", "gate_non_tc_tolerance", "gate_min_gain", "valid_folds")},
           "summary": aggregate(records, default), "splits": records,
           "elapsed_s": time.perf_counter() - t0,
           "cached_splits": [r["split"] for r in records if r.get("from_cache")],
           "elapsed_note": ("elapsed_s is this invocation; splits read from their cache were computed "
                            "earlier: see each split's times_s (wall seconds per stage)")}
    out = save_record(args.out, doc, load_before)
    print_table(records, default)
    print(f"targets met on every split: {doc['summary']['targets']['all_met']}; wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
