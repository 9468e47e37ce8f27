"""Measure a CPU preset: train `configs/fashion_mnist_cpu.yaml` and record time and accuracy.

    python benchmarks/train_cpu_preset.py [--config configs/fashion_mnist_cpu.yaml]
        [--set key=value ...] [--out runs/bench_train_cpu] [--results benchmarks/results/train.json]

Other presets with `--config`, e.g. the ResNet-20 one:

    python benchmarks/train_cpu_preset.py --config configs/fashion_mnist_resnet20_cpu.yaml \
        --out runs/fm_resnet20 --results benchmarks/results/train_resnet20.json

The project's target for this preset: training in about 5 minutes or less on a 2-core CPU and
at least 90% Fashion-MNIST test accuracy. The JSON records the wall time of the training loop
(`train_time_s`, compilation included), of the whole call (`total_time_s`, data loading and
the final test evaluation included), the accuracies, the machine, and the load average before
and after the run (other processes on the machine slow the run down).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import jax
import numpy as np

from jaxsplit import cli
from jaxsplit import config as jconfig
from jaxsplit import train
from jaxsplit.models import inference_apply
from jaxsplit.models.convnet import ConvNet, conv_macs, head_macs

from _record import save_record  # benchmarks/ (the script's folder) is on sys.path

REPO = Path(__file__).resolve().parents[1]
TARGET_ACCURACY = 0.90
TARGET_SECONDS = 300.0


def _jaxpr_macs(jaxpr) -> dict[str, int]:
    """Multiply-accumulates of the convolutions and matrix products of a (closed) jaxpr."""
    macs = {"conv": 0, "dense": 0}
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "conv_general_dilated":
            out = eqn.outvars[0].aval.shape
            rhs = eqn.invars[1].aval.shape
            dn = eqn.params["dimension_numbers"]
            kernel_in = rhs[dn.rhs_spec[1]]
            spatial = int(np.prod([rhs[d] for d in dn.rhs_spec[2:]]))
            macs["conv"] += int(np.prod(out)) * spatial * kernel_in
        elif name == "dot_general":
            (lhs_contract, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            macs["dense"] += int(np.prod(eqn.outvars[0].aval.shape)) * int(
                np.prod([lhs[d] for d in lhs_contract]))
        for p in eqn.params.values():  # pjit / custom_jvp / closed_call bodies
            inner = getattr(p, "jaxpr", p)
            if hasattr(inner, "eqns"):
                for k, v in _jaxpr_macs(inner).items():
                    macs[k] += v
    return macs


def macs_per_image(model, variables) -> dict[str, int]:
    """`{"conv", "head", "total"}` multiply-accumulates of one image's inference pass."""
    if isinstance(model, ConvNet):
        conv, head = conv_macs(model), head_macs(model)
    else:
        jaxpr = jax.make_jaxpr(inference_apply(model))(variables, model.dummy_input())
        counted = _jaxpr_macs(jaxpr.jaxpr)
        conv, head = counted["conv"], counted["dense"]
    return {"conv": conv, "head": head, "total": conv + head}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(REPO / "configs" / "fashion_mnist_cpu.yaml"))
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--out", default=None, help="also write the run folder here")
    parser.add_argument("--results", default=str(REPO / "benchmarks" / "results" / "train.json"))
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)

    cfg = cli.resolve_config(config_path=args.config, sets=args.set, data_dir=args.data_dir)
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    result = train.train_and_evaluate(cfg, args.out, progress=not args.no_progress,
                                      overwrite=args.out is not None)
    wall = time.perf_counter() - t0
    m = result.metrics
    record = {
        "benchmark": "train_cpu_preset",
        "config": str(Path(args.config).resolve().relative_to(REPO)) if Path(args.config).resolve().is_relative_to(REPO) else args.config,
        "overrides": args.set,
        "model": m["model"],
        "train": jconfig.to_dict(cfg.train),
        "test_accuracy": m["test_accuracy"],
        "valid_accuracy": m["valid_accuracy"],
        "best_epoch": m["best_epoch"],
        "train_time_s": round(m["train_time_s"], 1),
        "total_time_s": round(wall, 1),
        "seconds_per_epoch": [round(h["seconds"], 1) for h in m["history"]],
        "history": m["history"],
        "num_params": m["num_params"],
        "macs_per_image": macs_per_image(result.model, result.variables),
        "num_train": m["num_train"],
        "meets_accuracy_target": m["test_accuracy"] >= TARGET_ACCURACY,
        "meets_time_target": m["train_time_s"] <= TARGET_SECONDS,
    }
    out = save_record(args.results, record, load_before)
    print(f"test accuracy {m['test_accuracy']:.4f} (target {TARGET_ACCURACY}), training "
          f"{m['train_time_s']:.1f} s (target {TARGET_SECONDS:.0f} s), total {wall:.1f} s -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
