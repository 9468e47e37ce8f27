"""Throughput of the fast evaluator on traced zoo models (ResNet-20, VGG-11-BN, SimCNN's graph).

For each model and mask profile it times, in one process, the "fast"
backend (`jaxsplit.search.fast_graph.GraphFastEvaluator`) and the
"reference" backend (activation masking over the full model), and reports
solution·images per second: the first call (compiles every shape its
masks need) and the steady state (the same masks again, row cache off:
what a GA pays from its second generation on, once its buckets are
compiled). Mask profiles:

* `uniform`: every kernel kept with probability `--kept` (the evaluator
  benchmark's masks);
* `ga`: as the GA's initial populations (docs/method.md §5): the first two
  sites keep every kernel (sensitive layers), the others a rate drawn per
  row and site from {0.5, 0.6, 0.7, 0.8}.

    .venv/bin/python benchmarks/bench_graph_evaluator.py --out benchmarks/results/graph_evaluator.json

`--backends fast convnet_fast --models simcnn_w0.25 simcnn_w1.0` compares
the generic evaluator with the ConvNet-only tuned one
(`jaxsplit.search.fast_evaluate`) on the same masks.

`--label` names the run in the JSON (e.g. to compare two checkouts: run
the script with `PYTHONPATH` set to each, then `--plot A.json B.json`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _record import save_record  # noqa: E402

import jaxsplit  # noqa: E402
from jaxsplit.models import build_model, inference_apply  # noqa: E402
from jaxsplit.search import evaluate as E  # noqa: E402

MODELS = {  # name -> (zoo name, width); 32x32x1 inputs (Fashion-MNIST padded)
    "resnet20_w0.5": ("resnet20", 0.5),
    "vgg11_bn_w0.25": ("vgg11_bn", 0.25),
    "simcnn_w0.25": ("simcnn", 0.25),
    "simcnn_w1.0": ("simcnn", 1.0),  # not in the default run (its reference backend is slow)
}
DEFAULT_MODELS = ["resnet20_w0.5", "vgg11_bn_w0.25", "simcnn_w0.25"]


def model_case(name: str, num_images: int):
    family, width = MODELS[name]
    model = build_model(family, num_classes=10, in_channels=1, width=width)
    x = jax.random.normal(jax.random.key(1), (num_images, 32, 32, 1))
    if family == "simcnn":
        from jaxsplit.models.convnet import init_params

        variables = {"params": init_params(model, jax.random.key(0))}
        apply_fn = model.apply
    else:
        variables = model.init(jax.random.key(0), x[:2], train=False)
        apply_fn = inference_apply(model)
    return apply_fn, variables, x, model


def profile_masks(graph, profile: str, rows: int, kept: float, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    out = {}
    for j, name in enumerate(graph.free_layers):
        k = graph.num_kernels[name]
        if profile == "ga":
            rate = 1.0 if j < 2 else rng.choice([0.5, 0.6, 0.7, 0.8], size=(rows, 1))
        else:
            rate = kept
        m = rng.random((rows, k)) < rate
        m[np.arange(rows), rng.integers(0, k, rows)] = True
        out[name] = m
    for group in graph.ties:
        for other in group[1:]:
            out[other] = out[group[0]]
    return {n: jnp.asarray(out[n][None]) for n in graph.names}


def time_backend(graph, model, variables, images, masks, backend: str) -> dict:
    chunk = min(500, images.shape[0])
    if backend == "convnet_fast":  # the ConvNet-only tuned evaluator, on the same masks
        evaluate_fn = E.make_evaluator(model, "fast", chunk_images=chunk, cache_bytes=0)
    else:
        kwargs = {"cache_bytes": 0} if backend == "fast" else {}
        evaluate_fn = E.make_evaluator(graph, backend, masked_fn=jaxsplit.masked_apply(graph),
                                       chunk_images=chunk, **kwargs)
    classes = jnp.asarray([3], jnp.int32)
    t = time.perf_counter()
    first = np.asarray(evaluate_fn(variables, masks, images, classes))
    first_s = time.perf_counter() - t
    steady = []
    for _ in range(2):
        t = time.perf_counter()
        np.asarray(evaluate_fn(variables, masks, images, classes))
        steady.append(time.perf_counter() - t)
    work = masks[graph.names[0]].shape[1] * images.shape[0]
    return {"first_s": round(first_s, 3), "steady_s": round(min(steady), 3),
            "first_rate": round(work / first_s, 1), "steady_rate": round(work / min(steady), 1),
            "L": first}


def run(args) -> dict:
    results = []
    for name in args.models:
        apply_fn, variables, images, model = model_case(name, args.images)
        graph = jaxsplit.trace(apply_fn, variables, images[:min(500, args.images)])
        for profile in args.profiles:
            masks = profile_masks(graph, profile, args.population, args.kept, seed=0)
            row = {"model": name, "profile": profile}
            ref = None
            for backend in args.backends:
                if backend == "convnet_fast" and not name.startswith("simcnn"):
                    continue
                r = time_backend(graph, model, variables, images, masks, backend)
                L = r.pop("L")
                ref = L if ref is None else ref
                r["max_abs_diff_vs_first_backend"] = float(np.abs(L - ref).max())
                row[backend] = r
                print(f"{name:16s} {profile:8s} {backend:9s} first {r['first_s']:7.2f} s "
                      f"steady {r['steady_s']:7.2f} s  {r['steady_rate']:9.1f} sol·img/s",
                      flush=True)
            for other in ("reference", "convnet_fast"):
                if "fast" in row and other in row:
                    row[f"steady_speedup_fast_vs_{other}"] = round(
                        row[other]["steady_s"] / row["fast"]["steady_s"], 3)
            results.append(row)
    return {"benchmark": "graph_evaluator", "label": args.label, "population": args.population,
            "images": args.images, "kept": args.kept, "results": results}


def plot(paths: list[str], out: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(Path(p).read_text()) for p in paths]
    keys = [(r["model"], r["profile"]) for r in records[0]["results"]]
    names = {"reference": "reference backend", "fast": "fast backend",
             "convnet_fast": "fast backend"}
    series = []  # (legend, {key: rate}); the reference backend from the first record only
    for j, rec in enumerate(records):
        by = {(r["model"], r["profile"]): r for r in rec["results"]}
        for backend in ("reference", "fast", "convnet_fast"):
            if backend == "reference" and j > 0:
                continue
            vals = {k: by[k][backend]["steady_rate"] for k in keys if k in by and backend in by[k]}
            if vals:
                label = names[backend] + ("" if backend == "reference" or len(records) == 1
                                          else f" ({rec['label']})")
                series.append((label, vals))
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.8 / len(series)
    xs = np.arange(len(keys))
    colors = {"reference backend": "0.6"}
    for j, (label, vals) in enumerate(series):
        ax.bar(xs + j * width, [vals.get(k, np.nan) for k in keys], width, label=label,
               color=colors.get(label))
    ax.set_xticks(xs + width * (len(series) - 1) / 2, [f"{m}\n{p} masks" for m, p in keys],
                  fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("solution·images / s (steady state, log scale)")
    ax.set_title(f"Population evaluation on traced models, {records[0]['population']} masks x "
                 f"{records[0]['images']} images (higher is better)", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=DEFAULT_MODELS)
    parser.add_argument("--profiles", nargs="+", choices=["uniform", "ga"],
                        default=["uniform", "ga"])
    parser.add_argument("--backends", nargs="+", choices=["fast", "reference", "convnet_fast"],
                        default=["fast", "reference"],
                        help="convnet_fast: the tuned ConvNet-only evaluator (SimCNN models)")
    parser.add_argument("--population", type=int, default=16)
    parser.add_argument("--images", type=int, default=500)
    parser.add_argument("--kept", type=float, default=0.5)
    parser.add_argument("--label", default="this checkout")
    parser.add_argument("--out", default=None, help="JSON path (a .png of the same name too)")
    parser.add_argument("--plot", nargs="+", default=None,
                        help="only plot these JSON records together (to --out's .png)")
    args = parser.parse_args(argv)
    if args.plot:
        plot(args.plot, str(Path(args.out).with_suffix(".png")))
        return 0
    load = os.getloadavg()
    record = run(args)
    if args.out:
        path = save_record(args.out, record, load)
        print(f"wrote {path}")
        plot([str(path)], str(path.with_suffix(".png")))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
