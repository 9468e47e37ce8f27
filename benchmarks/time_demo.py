"""Time the whole demo (`make demo`) from an empty run folder, stage by stage.

    python benchmarks/time_demo.py [--run-dir runs/demo] [--command "make demo"]
        [--results benchmarks/results/demo.json]

Deletes RUN_DIR (the demo skips stages whose output exists, so a timing needs an empty
folder), runs the command, timestamps the demo's stage markers in its output (`[train]
running`, `[modularize] running`, ...) and writes the per-stage wall times, the total, the
headline figures of each stage (read from the run folder) and the machine. The project's
target: the whole demo in <= 15 min on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

from _record import save_record  # benchmarks/ (the script's folder) is on sys.path

REPO = Path(__file__).resolve().parents[1]
TARGET_SECONDS = 15 * 60.0
STAGES = ("train", "modularize", "patch", "report")
_MARK = re.compile(r"^\[(train|modularize|patch|report)\] running")


def _figures(run_dir: Path) -> dict:
    """Headline results of each stage, from the files it wrote."""
    out: dict = {}
    metrics = run_dir / "metrics.json"
    if metrics.is_file():
        m = json.loads(metrics.read_text())
        out["train"] = {k: m.get(k) for k in ("test_accuracy", "valid_accuracy", "epochs", "train_time_s",
                                                "num_params")}
    summary = run_dir / "modularize" / "summary.json"
    if summary.is_file():
        s = json.loads(summary.read_text())
        out["modularize"] = {k: s.get(k) for k in (
            "population_size", "num_generations", "generations_run", "num_valid_images",
            "model_test_accuracy", "ensemble_test_accuracy", "test_accuracy_loss", "ensemble_diff",
            "mean_kept_fraction", "mean_params_fraction", "mean_macs_fraction", "mean_generation_time_s",
            "compile_time_s")}
    patch = run_dir / "patch" / "patch_results.json"
    if patch.is_file():
        p = json.loads(patch.read_text())
        primary = p["primary_calibration"]
        keys = ("tc_precision", "tc_recall", "tc_f1", "non_tc_accuracy")
        out["patch"] = {
            "protocol": p.get("protocol"),
            "primary_calibration": primary,
            "weak_before": {k: p["average"]["before"][k] for k in keys},
            "module_patch": {k: p["average"]["module_patch"][primary][k] for k in keys},
            "whole_model_patch": {k: p["average"]["whole_model_patch"][primary][k] for k in keys},
            "acceptance": p.get("acceptance"),
            "module_macs_fraction": {tc: r["module"].get("macs_fraction") for tc, r in p["per_tc"].items()},
        }
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", type=Path, default=Path("runs/demo"))
    parser.add_argument("--command", default="make demo", help="what to time (default: make demo)")
    parser.add_argument("--results", default=str(REPO / "benchmarks" / "results" / "demo.json"))
    args = parser.parse_args(argv)

    run_dir = args.run_dir if args.run_dir.is_absolute() else REPO / args.run_dir
    if run_dir.exists():
        shutil.rmtree(run_dir)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    starts: dict[str, float] = {}
    last_lines: list[str] = []
    proc = subprocess.Popen(shlex.split(args.command), cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, bufsize=1)
    assert proc.stdout is not None
    for line in proc.stdout:
        now = time.perf_counter() - t0
        sys.stdout.write(line)
        m = _MARK.match(line.strip())
        if m:
            starts[m.group(1)] = now
        last_lines = (last_lines + [line.rstrip()])[-5:]
    rc = proc.wait()
    total = time.perf_counter() - t0
    load_after = os.getloadavg()

    order = [s for s in STAGES if s in starts]
    stage_s = {}
    for i, s in enumerate(order):
        end = starts[order[i + 1]] if i + 1 < len(order) else total
        stage_s[s] = round(end - starts[s], 1)
    setup_s = round(starts[order[0]], 1) if order else None

    record = {
        "benchmark": "time_demo",
        "command": args.command,
        "run_dir": str(args.run_dir),
        "exit_status": rc,
        "total_s": round(total, 1),
        "setup_s": setup_s,  # make's install check + imports + data loading before [train]
        "stage_s": stage_s,
        "meets_time_target": rc == 0 and total <= TARGET_SECONDS,
        "target_s": TARGET_SECONDS,
        "last_output": last_lines,
        "figures": _figures(run_dir),
    }
    out = save_record(args.results, record, load_before, load_after)
    print(f"demo: exit {rc}, {total:.0f} s (target {TARGET_SECONDS:.0f} s), stages {stage_s} -> {out}")
    return rc


if __name__ == "__main__":
    sys.exit(main())
