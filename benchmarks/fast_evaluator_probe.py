"""Quick throughput probe of the population evaluators (not a test, not the benchmark suite).

Measures solution·images per second (P individuals x N images per second)
of jaxsplit's "fast" and "reference" evaluator backends and, when torch is
installed, of a PyTorch loop in the reference's way (per individual: slice
the kept kernels out of the weights, i.e. physically extract the module, and
forward the images through it), all in the same process on the same masks.

    .venv/bin/python benchmarks/fast_evaluator_probe.py --width 1.0 --kept 0.5 \
        --population 24 --images 256 --repeats 3

Masks: every kernel kept with probability `--kept` (at least one per layer,
residual ties respected); `--repeats` mask sets. Each backend first runs a
warm-up pass over all mask sets (which compiles every shape they need; its
time is printed separately), then a timed pass over the same sets; the
throughput is the best call of the timed pass (other processes share this
machine). The full suite with plots is
`benchmarks/bench_evaluator.py`.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxsplit import masks as masks_lib
from jaxsplit.models.convnet import build_model, conv_macs, head_macs, init_params
from jaxsplit.search.evaluate import make_evaluator
from jaxsplit.search.fast_evaluate import make_fast_evaluator


def torch_loop(model, params, masks: dict, images: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """L (C, P, N) by the reference's loop: extract each module with torch slicing, forward it."""
    import torch
    import torch.nn.functional as F

    spec = model.conv_spec()
    convs = [(torch.from_numpy(np.asarray(params[l.name]["kernel"]).transpose(3, 2, 0, 1).copy()),
              torch.from_numpy(np.array(params[l.name]["bias"]))) for l in spec.layers]
    widths = model.head_widths()
    first = len(spec.layers)
    hh, ww = spec.head_in_hw
    fcs = [(torch.from_numpy(np.asarray(params[f"fc_{first + j}"]["kernel"]).T.copy()),
            torch.from_numpy(np.array(params[f"fc_{first + j}"]["bias"])))
           for j in range(len(widths) - 1)]
    x_all = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))
    host = {k: np.asarray(v) for k, v in masks.items()}
    num_rows, num_ind = host[spec.names[0]].shape[:2]
    out = np.zeros((num_rows, num_ind, images.shape[0]), np.float32)
    index = {n: i for i, n in enumerate(spec.names)}
    with torch.inference_mode():
        for c in range(num_rows):
            for i in range(num_ind):
                kept = [torch.from_numpy(np.flatnonzero(host[n][c, i])) for n in spec.names]
                # physical extraction (as the reference does per individual)
                prev = torch.arange(spec.image_shape[2])
                weights = []
                for (w, b), k in zip(convs, kept):
                    weights.append((w[k][:, prev].contiguous(), b[k].contiguous()))
                    prev = k
                w0 = fcs[0][0].reshape(-1, hh, ww, spec.layers[-1].num_kernels)
                w0 = w0[:, :, :, prev].permute(0, 3, 1, 2).reshape(w0.shape[0], -1)  # NCHW flatten
                head = [(w0.contiguous(), fcs[0][1])] + list(fcs[1:])
                cls = int(classes[c])
                last_w, last_b = head[-1]
                head[-1] = (last_w[cls:cls + 1].contiguous(), last_b[cls:cls + 1])
                h = x_all
                outputs = []
                for layer, (w, b) in zip(spec.layers, weights):
                    h = F.relu(F.conv2d(h, w, b, padding=1))
                    if layer.pool:
                        h = F.max_pool2d(h, 2)
                    if layer.residual_from is not None:
                        h = h + outputs[index[layer.residual_from]]
                    outputs.append(h)
                h = h.flatten(1)
                for j, (w, b) in enumerate(head):
                    h = F.linear(h, w, b)
                    if j < len(head) - 1:
                        h = F.relu(h)
                out[c, i] = h[:, 0].numpy()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="simcnn")
    ap.add_argument("--width", type=float, default=1.0)
    ap.add_argument("--kept", type=float, default=0.5)
    ap.add_argument("--classes", type=int, default=1, help="mask rows C")
    ap.add_argument("--population", type=int, default=24, help="individuals P per row")
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--backends", default="fast,torch",
                    help="comma list of fast, fast:N (N worker threads), torch, reference")
    ap.add_argument("--chunk-images", type=int, default=1000)
    ap.add_argument("--chunk-individuals", type=int, default=16)
    ap.add_argument("--num-buckets", type=int, default=None, help="fast backend option")
    ap.add_argument("--num-workers", type=int, default=None, help="fast backend option")
    args = ap.parse_args()

    model = build_model(args.model, num_classes=10, in_channels=3, width=args.width)
    spec = model.conv_spec()
    params = jax.jit(lambda k: init_params(model, k))(jax.random.key(0))
    images = np.asarray(jax.random.normal(jax.random.key(1), (args.images, *spec.image_shape)))
    classes = np.arange(args.classes, dtype=np.int32) % model.num_classes
    shape = (args.classes, args.population)
    sample = jax.jit(lambda k: masks_lib.random(k, spec, args.kept, shape))
    mask_sets = [sample(jax.random.key(10 + r)) for r in range(args.repeats + 1)]
    kept = np.mean([float(masks_lib.kept_fraction(m).mean())
                    for m in mask_sets])
    counts = {n: float(np.mean([np.asarray(m[n]).sum(-1).mean() for m in mask_sets]))
              for n in spec.names}
    useful = conv_macs(model, {n: round(c) for n, c in counts.items()}) + head_macs(
        model, round(counts[spec.names[-1]]), 1)
    full = conv_macs(model) + head_macs(model)
    print(f"{args.model} width {args.width} kept {kept:.3f} (MACs {useful / 1e6:.1f} M = "
          f"{useful / full:.3f} of the model) C·P={args.classes * args.population} "
          f"N={args.images} "
          f"jax {jax.__version__} {jax.devices()[0].device_kind}")

    kwargs = dict(chunk_individuals=args.chunk_individuals, chunk_images=args.chunk_images)
    results = {}
    for backend in args.backends.split(","):
        workers = args.num_workers
        if backend.startswith("fast:"):  # "fast:N": with N worker threads
            workers = int(backend.split(":")[1])
        if backend == "torch":
            import torch

            def run(m):
                return torch_loop(model, params, m, images, classes)
            label = f"torch loop ({torch.get_num_threads()} threads)"
        else:
            if backend.startswith("fast"):
                extra = {k: v for k, v in (("num_buckets", args.num_buckets),
                                           ("num_workers", workers)) if v is not None}
                # no row cache: the timed pass repeats the warm-up's masks
                evaluate_fn = make_fast_evaluator(model, **kwargs, **extra, cache_bytes=0)
            else:
                evaluate_fn = make_evaluator(model, backend, **kwargs)
            dev_images, dev_classes = jnp.asarray(images), jnp.asarray(classes)

            def run(m, evaluate_fn=evaluate_fn):
                return np.asarray(evaluate_fn({"params": params}, m, dev_images, dev_classes))
            label = f"jaxsplit {backend}" + (f" ({evaluate_fn.num_workers} workers)"
                                              if backend.startswith("fast") else "")
        t0 = time.perf_counter()
        first = run(mask_sets[0])
        for m in mask_sets[1:]:  # warm-up pass: compiles every bucket shape these masks need
            run(m)
        warm = time.perf_counter() - t0
        times = []
        for m in mask_sets:
            t0 = time.perf_counter()
            run(m)
            times.append(time.perf_counter() - t0)
        rate = args.classes * args.population * args.images / min(times)
        results[backend] = (rate, first)
        reps = ", ".join(f"{t:.2f}" for t in times)
        print(f"  {label:<28} {rate:9.1f} solution·images/s  ({2 * useful * rate / 1e9:6.1f} "
              f"useful GFLOP/s; warm-up pass {warm:.1f}s, repeats {reps}s)", flush=True)
    names = list(results)
    for a in names:
        for b in names:
            if a < b:
                diff = np.abs(results[a][1] - results[b][1]).max()
                print(f"  max |L_{a} - L_{b}| on the warm-up masks = {diff:.2e}")
    for fast in [n for n in names if n.startswith("fast")]:
        for other in names:
            if not other.startswith("fast"):
                print(f"  {fast} / {other} = {results[fast][0] / results[other][0]:.2f}x")


if __name__ == "__main__":
    main()
