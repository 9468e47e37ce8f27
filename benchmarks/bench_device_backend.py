"""The "device" backend on this machine: counted FLOPs per individual and a timing (quick).

    python benchmarks/bench_device_backend.py                 # quick (~1-2 min on 2 cores)
    python benchmarks/bench_device_backend.py --width 1.0 --population 8 --images 64

For SimCNN (width `--width`, 32x32x3 images) with exactly `--kept` of every layer's kernels
kept (random, residual ties respected), one class row of `--population` individuals:

* FLOPs per individual per image (2 x MACs), from the kept counts
  (`device_evaluate.flops_per_individual`): the unpadded extracted module ("kept"), the
  device backend at its bucket level with the first conv shared by a group ("device"), and
  the reference backend (the full model on every module), and their ratios;
* wall time of one evaluator call (median of 3 mask sets, after a warm-up whose extra time is
  reported as compile) for "device" and "reference" (and "fast" when installed), and the max
  |ΔL| of each against the reference.

Writes `benchmarks/results/device_backend_<machine>.json` with the machine, load and date
(`_record.save_record`).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import _record  # noqa: E402
import bench_evaluator as BE  # noqa: E402
from jaxsplit.models.convnet import random_params, simcnn  # noqa: E402
from jaxsplit.search import device_evaluate as DE  # noqa: E402
from jaxsplit.search import evaluate as E  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=float, default=0.25)
    parser.add_argument("--kept", type=float, default=0.5)
    parser.add_argument("--population", type=int, default=16)
    parser.add_argument("--images", type=int, default=128)
    parser.add_argument("--num-levels", type=int, default=8)
    parser.add_argument("--chunk-individuals", type=int, default=16)
    parser.add_argument("--backends", nargs="+", default=["device", "reference", "fast"])
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    if not 0.0 < args.kept <= 1.0:
        parser.error(f"--kept must be in (0, 1], got {args.kept}")
    load_before = os.getloadavg()
    model = simcnn(num_classes=10, in_channels=3, width=args.width)
    params = random_params(model, 0)
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.standard_normal((args.images, 32, 32, 3)), jnp.float32)
    classes = jnp.asarray([3], jnp.int32)
    masks_list = [{k: jnp.asarray(v) for k, v in
                   BE.exact_masks(model, args.kept, (1, args.population), seed=10 + r).items()}
                  for r in range(4)]
    flops = DE.flops_per_individual(model, {k: np.asarray(v) for k, v in masks_list[0].items()},
                                    num_levels=args.num_levels,
                                    chunk_individuals=args.chunk_individuals)
    record = {
        "script": "benchmarks/bench_device_backend.py", "model": f"simcnn width {args.width}",
        "kept": args.kept, "population": args.population, "images": args.images,
        "num_levels": args.num_levels, "chunk_individuals": args.chunk_individuals,
        "jax": jax.__version__, "platform": jax.devices()[0].platform,
        "flops_per_individual_image": {k: float(v.mean()) for k, v in flops.items()},
        "flops_ratio_device_vs_reference": float(flops["device"].mean() / flops["reference"][0]),
        "flops_ratio_kept_vs_reference": float(flops["kept"].mean() / flops["reference"][0]),
        "timings": {},
    }
    print(f"SimCNN width {args.width}, {100 * args.kept:.0f}% kept: GFLOP per module-image "
          + ", ".join(f"{k} {v.mean() / 1e9:.4f}" for k, v in flops.items()))
    reference_L = None
    for backend in args.backends:
        options = {"num_levels": args.num_levels} if backend == "device" else {"cache_bytes": 0}
        fn = E.make_evaluator(model, backend, chunk_individuals=args.chunk_individuals,
                              chunk_images=args.images, **(options if backend != "reference" else {}))
        t0 = time.perf_counter()
        L0 = np.asarray(fn({"params": params}, masks_list[0], images, classes))
        first = time.perf_counter() - t0
        times = []
        for m in masks_list[1:]:
            t0 = time.perf_counter()
            BE.block(fn({"params": params}, m, images, classes))
            times.append(time.perf_counter() - t0)
        median = statistics.median(times)
        rec = {"median_s": median, "times_s": times, "compile_s": max(0.0, first - median),
               "solution_images_per_s": args.population * args.images / median}
        if backend == "reference":
            reference_L = L0
        record["timings"][backend] = rec
        record["timings"][backend]["_L"] = L0
        print(f"  {backend:<9} {rec['solution_images_per_s']:9.1f} sol·img/s  "
              f"(call {median:.3f}s, compile ~{rec['compile_s']:.1f}s)")
    for backend, rec in record["timings"].items():
        L = rec.pop("_L")
        if reference_L is not None:
            rec["max_abs_diff_vs_reference"] = float(np.abs(L - reference_L).max())
    if "device" in record["timings"] and "reference" in record["timings"]:
        record["speedup_device_vs_reference"] = (record["timings"]["device"]["solution_images_per_s"]
                                                 / record["timings"]["reference"]["solution_images_per_s"])
        print(f"  device / reference: {record['speedup_device_vs_reference']:.2f}x "
              f"(FLOPs ratio {record['flops_ratio_device_vs_reference']:.3f})")
    out = Path(args.out) if args.out else HERE / "results" / f"device_backend_{BE.machine_name()}.json"
    print(f"wrote {_record.save_record(out, record, load_before)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
