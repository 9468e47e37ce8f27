"""Benchmark jaxsplit's search against the PyTorch way, in one process run.

    python benchmarks/bench_evaluator.py [--quick] [--out benchmarks/results/NAME.json]
    make bench            # the same (full run)
    jaxsplit bench [--quick ...]

Sections (each point: a warm-up call first, whose compile time is recorded apart, then the
median of >= 3 timed calls; a timed call that still traced something new is run again):

1. peak: the machine's fp32 matmul peak (`jnp.dot` of large square matrices; also torch's).
2. throughput: evaluator throughput in solution·images/s for SimCNN at width 1.0 and 0.25,
   30/50/70% of kernels kept, population 10-200: jaxsplit's backends ("reference", and
   "fast" when installed) against the PyTorch loop (benchmarks/torch_baseline.py: physically
   extract each module, forward the images), as ratios, and the fraction of the matmul peak
   reached on useful MACs (the kept kernels' MACs only, `jaxsplit.extract.stats_from_mask`).
3. memory: peak RSS of one evaluator call per population size, one subprocess per point (JAX
   CPU allocations show in RSS): it must stay flat with chunking.
4. fitness: one cooperative-fitness step at the reference config (10 classes x 100
   individuals + the hall-of-fame slot; 2,000 images), jaxsplit on device vs the NumPy
   multiprocessing baseline (benchmarks/fitness_baseline.py).
5. generation: one whole search generation through the driver's compiled step (evaluate +
   fitness + GA tell/ask), steady-state time and compile time apart.

Writes `benchmarks/results/<machine>.json` (machine = CPU model and core count, or the GPU
kind) and a PNG plot next to it, and prints a summary. Random weights and images are used
(speed does not depend on their values). `--quick` is a smoke run (< ~2 minutes on 2 cores)
with fewer, smaller points. See benchmarks/README.md for how to read the JSON.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import resource
import socket
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))  # torch_baseline, fitness_baseline (benchmarks/ is not a package)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from jaxsplit import masks as masks_lib  # noqa: E402
from jaxsplit.models.convnet import ConvNet, conv_macs, head_macs, random_params, simcnn  # noqa: E402
from jaxsplit.search import evaluate as eval_lib  # noqa: E402

REPEATS = 3

FULL_PLAN: dict[str, Any] = {
    "peak_size": 2048,
    "throughput": [
        # per width: images N, populations, kept fractions; the reference backend (activation
        # masking: the whole model's cost whatever is kept) only at its own smaller points
        # (populations_by_kept: the longest sweep only at 50%, to keep the run ~15 min on 2 cores)
        {"width": 1.0, "images": 64, "populations": [10, 50, 200], "kept": [0.3, 0.5, 0.7],
         "populations_by_kept": {"0.3": [10, 50], "0.7": [10, 50]},
         "reference": {"images": 16, "populations": [10], "kept": [0.5]}, "torch_individuals": 10},
        {"width": 0.25, "images": 128, "populations": [10, 50, 100, 200], "kept": [0.3, 0.5, 0.7],
         "reference": {"images": 64, "populations": [10, 50], "kept": [0.3, 0.5, 0.7]},
         "torch_individuals": 10},
    ],
    "memory": {"width": 0.25, "images": 64, "populations": [10, 50, 200], "kept": 0.5,
               "backends": ["fast", "reference", "torch"], "reference_populations": [10, 50, 200]},
    "fitness": {"classes": 10, "individuals": 101, "images": 2000, "kernels": 4224},
    "generation": {"width": 0.125, "population": 30, "images": 1000, "generations": 3,
                   "reference_images": 200},
}

QUICK_PLAN: dict[str, Any] = {
    "peak_size": 1024,
    "throughput": [
        {"width": 0.25, "images": 64, "populations": [10, 40], "kept": [0.5],
         "reference": {"images": 32, "populations": [10], "kept": [0.5]}, "torch_individuals": 5},
        {"width": 1.0, "images": 16, "populations": [10], "kept": [0.5], "reference": None,
         "torch_individuals": 3},
    ],
    "memory": {"width": 0.125, "images": 32, "populations": [10, 40], "kept": 0.5,
               "backends": ["auto"], "reference_populations": []},
    "fitness": {"classes": 10, "individuals": 21, "images": 500, "kernels": 4224},
    "generation": {"width": 0.125, "population": 10, "images": 200, "generations": 3,
                   "reference_images": 100},
}


# -- helpers -----------------------------------------------------------------------------------


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_name() -> str:
    """A file-name slug: the accelerator kind, else the CPU model and core count."""
    device = jax.devices()[0]
    if device.platform != "cpu":
        return slug(f"{device.platform}-{device.device_kind}-x{jax.device_count()}")
    return slug(f"cpu-{cpu_model()}-{os.cpu_count()}c")


def machine_record() -> dict[str, Any]:
    from jaxsplit.train import machine_info

    info = dict(machine_info())
    info.update(hostname=socket.gethostname(), cpu_model=cpu_model(), cores=os.cpu_count(),
                date=datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                numpy=np.__version__, load_average_start=list(os.getloadavg()))
    try:
        import torch

        info.update(torch=torch.__version__, torch_threads=torch.get_num_threads())
    except ImportError:
        info.update(torch=None)
    try:
        import flax

        info.update(flax=flax.__version__)
    except ImportError:
        pass
    return info


def exact_masks(model: ConvNet, fraction: float, shape: tuple[int, ...], seed: int) -> dict:
    """Random tied masks keeping exactly `max(1, round(fraction * K_l))` kernels per layer."""
    spec = model.conv_spec()
    rng = np.random.default_rng(seed)
    out = {}
    for name in spec.free_layers:
        k = spec.layer(name).num_kernels
        keep = max(1, int(round(fraction * k)))
        ranks = np.argsort(rng.random((*shape, k)), axis=-1)
        out[name] = ranks < keep
    return masks_lib.tie(out, spec)


def useful_macs(model: ConvNet, masks: Mapping[str, np.ndarray]) -> float:
    """Mean MACs per image of the one-output modules of `masks {name: (C, P, K)}`."""
    spec = model.conv_spec()
    first = np.asarray(masks[spec.names[0]])
    rows, cols = first.shape[:2]
    try:
        from jaxsplit.extract import stats_from_mask
    except ImportError:
        stats_from_mask = None
    total = 0.0
    for c in range(rows):
        for i in range(cols):
            one = {n: np.asarray(masks[n])[c, i] for n in spec.names}
            if stats_from_mask is not None:
                total += stats_from_mask(model, one)["single_output_macs"]
            else:
                kept = {n: int(v.sum()) for n, v in one.items()}
                total += conv_macs(model, kept) + head_macs(model, kept[spec.names[-1]], 1)
    return total / (rows * cols)


def full_macs(model: ConvNet) -> int:
    return conv_macs(model) + head_macs(model)


def timed_calls(call: Callable[[Any], Any], inputs: list, *, trace_count: Callable[[], int] | None,
                warm_all: bool) -> dict[str, Any]:
    """Warm up, then time `call(x)` for each x in `inputs`; median of the timed calls.

    Warm-up: the first input (all of them when `warm_all`); its time minus the median is the
    compile (and first-use) estimate. A timed call during which `trace_count()` grew (a new
    shape compiled) is run again and the second time kept.
    """
    t0 = time.perf_counter()
    first_out = call(inputs[0])
    first = time.perf_counter() - t0
    if warm_all:
        for x in inputs[1:]:
            call(x)
    times, retraced = [], 0
    for x in inputs:
        before = trace_count() if trace_count else None
        t0 = time.perf_counter()
        call(x)
        dt = time.perf_counter() - t0
        if trace_count is not None and trace_count() != before:
            retraced += 1
            t0 = time.perf_counter()
            call(x)
            dt = time.perf_counter() - t0
        times.append(dt)
    median = statistics.median(times)
    return {"times_s": times, "median_s": median, "first_call_s": first,
            "compile_s": max(0.0, first - median), "retraced": retraced, "first_output": first_out}


def block(x: Any) -> Any:
    return jax.tree_util.tree_map(lambda a: a.block_until_ready() if hasattr(a, "block_until_ready")
                                  else a, x)


def have_torch() -> bool:
    try:
        import torch  # noqa: F401

        return True
    except ImportError:
        return False


def jax_backends() -> list[str]:
    return ["reference", "fast"]


# -- 1. peak -----------------------------------------------------------------------------------


def bench_peak(size: int) -> dict[str, Any]:
    """fp32 matmul GFLOP/s of `jnp.dot` (and `torch.mm`) on `size x size` matrices."""
    rng = np.random.default_rng(0)
    a = jnp.asarray(rng.standard_normal((size, size), np.float32))
    b = jnp.asarray(rng.standard_normal((size, size), np.float32))
    dot = jax.jit(lambda x, y: jnp.dot(x, y, precision=jax.lax.Precision.HIGHEST))  # no TF32
    r = timed_calls(lambda _: dot(a, b).block_until_ready(), [None] * 5, trace_count=None,
                    warm_all=False)
    flops = 2.0 * size ** 3
    out = {"size": size, "jax_gflops": flops / r["median_s"] / 1e9,
           "jax_times_s": r["times_s"]}
    if have_torch():
        import torch

        import torch_baseline

        dev = torch_baseline.default_device()
        ta, tb = (torch.from_numpy(np.array(m)).to(dev) for m in (a, b))
        sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
        rt = timed_calls(lambda _: (torch.mm(ta, tb), sync()), [None] * 5, trace_count=None,
                         warm_all=False)
        out.update(torch_gflops=flops / rt["median_s"] / 1e9, torch_times_s=rt["times_s"])
    out["peak_gflops"] = max(out["jax_gflops"], out.get("torch_gflops", 0.0))
    return out


# -- 2. throughput ----------------------------------------------------------------------------


def uncached_evaluator(model, backend: str):
    """`make_evaluator(model, backend)` without the fast backend's row cache: the throughput
    and memory sections call it again on masks it has seen (warm-up, repeats), which the cache
    would answer without running anything. The generation section keeps the cache (a GA's
    kept parents really do come back)."""
    return eval_lib.make_evaluator(model, backend, cache_bytes=0)  # ignored by "reference"


def _jax_point(model, params, backend: str, masks_list, images, classes) -> dict[str, Any]:
    evaluate_fn = uncached_evaluator(model, backend)
    x, cls = jnp.asarray(images), jnp.asarray(classes)
    trace = (lambda: evaluate_fn.num_traces) if hasattr(evaluate_fn, "num_traces") else None
    r = timed_calls(lambda m: block(evaluate_fn({"params": params}, m, x, cls)), masks_list,
                    trace_count=trace, warm_all=False)
    r["first_output"] = np.asarray(r["first_output"])
    return r


def _torch_point(model, state_dict, masks_list, images, classes) -> dict[str, Any]:
    import torch_baseline

    x = torch_baseline.to_nchw(images).to(torch_baseline.default_device())
    timings: dict[str, float] = {}
    r = timed_calls(lambda m: torch_baseline.torch_logit_table(model, state_dict, m, x, classes,
                                                               timings=timings),
                    masks_list, trace_count=None, warm_all=False)
    r["extract_fraction"] = timings["extract_s"] / max(timings["extract_s"] + timings["forward_s"],
                                                       1e-12)
    return r


def bench_throughput(plan: list[dict], peak_gflops: float | None, log) -> list[dict[str, Any]]:
    records = []
    torch_ok = have_torch()
    for wplan in plan:
        width = wplan["width"]
        model = simcnn(num_classes=10, in_channels=3, width=width)
        params = random_params(model, seed=0)
        rng = np.random.default_rng(1)
        state_dict = None
        if torch_ok:
            import torch_baseline
            from jaxsplit.interop.torch import params_to_state_dict

            dev = torch_baseline.default_device()
            state_dict = {k: v.to(dev) for k, v in params_to_state_dict(params, model).items()}
        for kept in wplan["kept"]:
            classes = np.array([3], np.int32)
            # torch: its cost does not depend on P (one module at a time)
            torch_rate = None
            if torch_ok:
                n_img = wplan["images"]
                images = rng.standard_normal((n_img, 32, 32, 3)).astype(np.float32)
                masks_list = [exact_masks(model, kept, (1, wplan["torch_individuals"]), seed=100 + r)
                              for r in range(REPEATS)]
                r = _torch_point(model, state_dict, masks_list, images, classes)
                work = wplan["torch_individuals"] * n_img
                torch_rate = work / r["median_s"]
                macs = useful_macs(model, masks_list[0])
                rec = {"section": "throughput", "width": width, "kept": kept, "backend": "torch",
                       "population": wplan["torch_individuals"], "images": n_img,
                       "rate": torch_rate, "median_s": r["median_s"], "times_s": r["times_s"],
                       "extract_fraction": r["extract_fraction"], "useful_macs": macs,
                       "macs_fraction_of_model": macs / full_macs(model)}
                if peak_gflops:
                    rec["peak_fraction"] = 2 * macs * torch_rate / 1e9 / peak_gflops
                records.append(rec)
                log(f"  width {width:<5} kept {kept:.1f} torch      P={rec['population']:<4} "
                    f"N={n_img:<4} {torch_rate:9.1f} sol·img/s  (extraction "
                    f"{100 * rec['extract_fraction']:.0f}% of its time)")
            for backend in jax_backends():
                sub = wplan if backend != "reference" else wplan.get("reference")
                if not sub or kept not in sub["kept"]:
                    continue
                n_img = sub["images"]
                images = rng.standard_normal((n_img, 32, 32, 3)).astype(np.float32)
                pops = sub.get("populations_by_kept", {}).get(str(kept), sub["populations"])
                for pop in pops:
                    masks_list = [exact_masks(model, kept, (1, pop), seed=1000 * pop + r)
                                  for r in range(REPEATS)]
                    r = _jax_point(model, params, backend, masks_list, images, classes)
                    rate = pop * n_img / r["median_s"]
                    macs = useful_macs(model, masks_list[0])
                    rec = {"section": "throughput", "width": width, "kept": kept,
                           "backend": backend, "population": pop, "images": n_img, "rate": rate,
                           "median_s": r["median_s"], "times_s": r["times_s"],
                           "compile_s": r["compile_s"], "retraced": r["retraced"],
                           "useful_macs": macs, "macs_fraction_of_model": macs / full_macs(model)}
                    if peak_gflops:
                        rec["peak_fraction"] = 2 * macs * rate / 1e9 / peak_gflops
                    if torch_rate:
                        rec["vs_torch"] = rate / torch_rate
                    records.append(rec)
                    log(f"  width {width:<5} kept {kept:.1f} {backend:<10} P={pop:<4} N={n_img:<4} "
                        f"{rate:9.1f} sol·img/s"
                        + (f"  {rec['vs_torch']:5.2f}x torch" if torch_rate else "")
                        + (f"  {100 * rec['peak_fraction']:4.1f}% of peak" if peak_gflops else "")
                        + f"  (compile {r['compile_s']:.1f}s)")
    return records


# -- 3. memory ---------------------------------------------------------------------------------


def _status_mib(field: str) -> float | None:
    """A `/proc/self/status` memory field (VmRSS, VmHWM) in MiB, None if unavailable."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) of this process (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def memory_child(spec: Mapping[str, Any]) -> dict[str, Any]:
    """Run in a subprocess: evaluator calls at one population size; report RSS in MiB.

    `baseline_rss_mib`: RSS after setup (imports, params, images, masks), before any call.
    `peak_with_compile_mib`: the maximum RSS over the first call (compilation included).
    `peak_rss_mib`: the maximum RSS over a second call on the same masks, after resetting
    the peak mark (`/proc/self/clear_refs`), i.e. the evaluation itself; when the reset is
    not possible it equals the first.
    """
    model = simcnn(num_classes=10, in_channels=3, width=spec["width"])
    params = random_params(model, 0)
    rng = np.random.default_rng(0)
    images = rng.standard_normal((spec["images"], 32, 32, 3)).astype(np.float32)
    masks = exact_masks(model, spec["kept"], (1, spec["population"]), seed=5)
    classes = np.array([3], np.int32)
    if spec["backend"] == "torch":
        import torch_baseline
        from jaxsplit.interop.torch import params_to_state_dict

        sd = params_to_state_dict(params, model)

        def call():
            torch_baseline.torch_logit_table(model, sd, masks, images, classes)
    else:
        evaluate_fn = uncached_evaluator(model, spec["backend"])
        x, cls = jnp.asarray(images), jnp.asarray(classes)

        def call():
            block(evaluate_fn({"params": params}, masks, x, cls))
    base = _status_mib("VmRSS")
    call()
    # VmHWM, not getrusage's ru_maxrss: Linux keeps ru_maxrss across execve, so a child
    # started by a large parent reports the parent's peak
    with_compile = _status_mib("VmHWM")
    if with_compile is None:
        with_compile = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    reset = _reset_peak_rss()
    call()
    peak = _status_mib("VmHWM") if reset else with_compile
    out = {"baseline_rss_mib": base, "peak_with_compile_mib": with_compile,
           "peak_rss_mib": peak, "peak_reset": reset, "final_rss_mib": _status_mib("VmRSS")}
    if jax.default_backend() != "cpu":  # accelerator memory (peak over both calls)
        if spec["backend"] == "torch":
            import torch

            if torch.cuda.is_available():
                out["device_peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
        else:
            stats = jax.local_devices()[0].memory_stats() or {}
            if "peak_bytes_in_use" in stats:
                out["device_peak_mib"] = stats["peak_bytes_in_use"] / 2**20
    return out


def bench_memory(plan: Mapping[str, Any], log) -> list[dict[str, Any]]:
    records = []
    backends = []
    for b in plan["backends"]:
        if b == "torch" and not have_torch():
            continue
        backends.append(b)
    for backend in backends:
        pops = plan["reference_populations"] if backend == "reference" else plan["populations"]
        for pop in pops:
            spec = {"width": plan["width"], "images": plan["images"], "kept": plan["kept"],
                    "population": pop, "backend": backend}
            proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--memory-child",
                                   json.dumps(spec)], capture_output=True, text=True, timeout=1200)
            line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("MEMORY ")), None)
            if proc.returncode != 0 or line is None:
                raise RuntimeError(f"memory child {spec} failed: {proc.stderr[-2000:]}")
            res = json.loads(line[len("MEMORY "):])
            rec = {"section": "memory", **spec, **res}
            records.append(rec)
            log(f"  {backend:<10} width {plan['width']} P={pop:<4} N={plan['images']:<4} peak RSS "
                f"{res['peak_rss_mib']:7.0f} MiB (after setup {res['baseline_rss_mib']:.0f} MiB, "
                f"first call with compilation {res['peak_with_compile_mib']:.0f} MiB)")
    return records


# -- 4. fitness --------------------------------------------------------------------------------


def synthetic_table(num_classes: int, num_individuals: int, num_images: int, num_kernels: int,
                    seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Logits of plausible modules: class-c logit high on class c's images, per-individual noise.

    Most two-class ensembles pass the 0.95 threshold, so the hierarchical scheme keeps up to
    its maximum (500) candidates per combination: the expensive case.
    """
    rng = np.random.default_rng(seed)
    labels = (np.arange(num_images) % num_classes).astype(np.int32)
    rng.shuffle(labels)
    noise = rng.uniform(0.3, 1.2, (num_classes, num_individuals, 1))
    onehot = (labels[None, None, :] == np.arange(num_classes)[:, None, None]).astype(np.float32)
    L = 3.0 * onehot + noise * rng.standard_normal((num_classes, num_individuals, num_images))
    masks = rng.random((num_classes, num_individuals, num_kernels)) < 0.5
    return L.astype(np.float32), masks, labels


def bench_fitness(plan: Mapping[str, Any], log) -> dict[str, Any]:
    from jaxsplit.search import fitness as fit_lib

    import fitness_baseline

    C, P, N = plan["classes"], plan["individuals"], plan["images"]
    L, masks, labels = synthetic_table(C, P, N, plan["kernels"], seed=0)
    classes = np.arange(C, dtype=np.int32)
    params = fit_lib.FitnessParams.create(min_kept=50, max_kept=500, has_hall_of_fame=True)
    dL, dm, dl, dc = (jnp.asarray(a) for a in (L, masks, labels, classes))
    acc_ratio = jnp.asarray(0.9, jnp.float32)
    keys = [jax.random.key(s) for s in range(REPEATS)]
    r = timed_calls(lambda k: block(fit_lib.cooperative_fitness(k, dL, dm, dl, dc, acc_ratio,
                                                                params)),
                    keys, trace_count=None, warm_all=False)
    _, info = r["first_output"]
    jax_cand = [np.asarray(c).tolist() for c in info.num_candidates]
    procs = os.cpu_count() or 1
    r_np = timed_calls(lambda s: fitness_baseline.hierarchical_fitness(
        L, masks, labels, classes, 0.9, seed=s, processes=procs), list(range(REPEATS)),
        trace_count=None, warm_all=False)
    _, info_np = r_np["first_output"]
    out = {"classes": C, "individuals": P, "images": N, "kernels": plan["kernels"],
           "jax_median_s": r["median_s"], "jax_times_s": r["times_s"], "jax_compile_s": r["compile_s"],
           "jax_num_candidates": jax_cand, "jax_best_acc": float(info.best_acc),
           "numpy_median_s": r_np["median_s"], "numpy_times_s": r_np["times_s"],
           "numpy_processes": procs, "numpy_num_candidates": info_np["num_candidates"],
           "numpy_best_acc": info_np["best_acc"]}
    out["speedup"] = out["numpy_median_s"] / out["jax_median_s"]
    log(f"  {C} classes x {P} individuals, N={N}: jaxsplit {r['median_s'] * 1e3:.1f} ms "
        f"(compile {r['compile_s']:.1f}s), NumPy pool ({procs} processes) "
        f"{r_np['median_s'] * 1e3:.0f} ms -> {out['speedup']:.1f}x")
    log(f"    candidates per level: jaxsplit {jax_cand}, NumPy {info_np['num_candidates']}")
    return out


# -- 5. generation -----------------------------------------------------------------------------


def bench_generation(plan: Mapping[str, Any], log) -> list[dict[str, Any]]:
    import dataclasses

    from jaxsplit.search import driver as D
    from jaxsplit.search.config import SearchConfig
    from jaxsplit.search.sharding import input_placement

    model = simcnn(num_classes=10, in_channels=3, width=plan["width"])
    spec = model.conv_spec()
    params = random_params(model, 0)
    rng = np.random.default_rng(0)
    importance = {n: rng.random((10, spec.layer(n).num_kernels)).astype(np.float32)
                  for n in spec.names}
    classes = np.arange(10, dtype=np.int32)
    records = []
    for backend in jax_backends():
        n_img = plan["images"] if backend != "reference" else plan["reference_images"]
        images = rng.standard_normal((n_img, 32, 32, 3)).astype(np.float32)
        labels = (np.arange(n_img) % 10).astype(np.int32)
        cfg = dataclasses.replace(SearchConfig(), population_size=plan["population"],
                                  backend=backend, shard=False)
        evaluate_fn = eval_lib.make_evaluator_from_config(model, cfg)
        problem, settings = D.build_problem(model, "simcnn", importance, cfg,
                                            evaluate_fn=evaluate_fn)
        bits = D.initial_population(jax.random.key(1), problem, cfg.population_size, settings)
        carry = D.init_carry(jax.random.key(2), problem, bits)
        place = input_placement(evaluate_fn)
        dev_params = D._strong({"params": params}, place)
        dev = D._strong((images, labels, classes), place)
        step = D.make_step(problem)
        times = []
        for g in range(plan["generations"] + 1):
            t0 = time.perf_counter()
            carry, metrics = step(D._strong(carry, place), jax.random.key(100 + g), dev_params, *dev)
            block((carry, metrics))
            times.append(time.perf_counter() - t0)
        steady = statistics.median(times[1:])
        rec = {"section": "generation", "backend": backend, "width": plan["width"],
               "classes": 10, "population": plan["population"], "images": n_img,
               "first_generation_s": times[0], "generation_s": steady, "times_s": times,
               "compile_s": max(0.0, times[0] - steady),
               "solution_images_per_s": 10 * (plan["population"] + 1) * n_img / steady}
        records.append(rec)
        log(f"  {backend:<10} SimCNN width {plan['width']}, 10 classes x {plan['population']}+1, "
            f"N={n_img}: generation {steady:.2f}s (first {times[0]:.1f}s, compile ~"
            f"{rec['compile_s']:.1f}s)")
    return records


# -- report ------------------------------------------------------------------------------------


def plot(result: Mapping[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    thr = [r for r in result.get("throughput", []) if "rate" in r]
    widths = sorted({r["width"] for r in thr}, reverse=True)
    fig, axes = plt.subplots(2, 2, figsize=(12, 9))
    colors = {0.3: "tab:blue", 0.5: "tab:orange", 0.7: "tab:green"}
    styles = {"fast": "-o", "reference": ":s"}
    for ax, width in zip(axes[0], widths[:2]):
        for r in thr:
            if r["width"] == width and r["backend"] == "torch":
                ax.axhline(r["rate"], color=colors.get(r["kept"], "gray"), ls="--", lw=1,
                           label=f"torch loop, kept {r['kept']}")
        for backend in ("fast", "reference"):
            for kept in sorted({r["kept"] for r in thr if r["width"] == width}):
                pts = sorted((r["population"], r["rate"]) for r in thr if r["width"] == width
                             and r["backend"] == backend and r["kept"] == kept)
                if pts:
                    ax.plot(*zip(*pts), styles[backend], color=colors.get(kept, "gray"),
                            label=f"jaxsplit {backend}, kept {kept}")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("population P")
        ax.set_ylabel("solution·images / s")
        ax.set_title(f"SimCNN width {width}: evaluator throughput")
        ax.legend(fontsize=7)
    ax = axes[1][0]
    mem = result.get("memory", [])
    for backend in sorted({r["backend"] for r in mem}):
        pts = sorted((r["population"], r["peak_rss_mib"]) for r in mem if r["backend"] == backend)
        ax.plot(*zip(*pts), "-o", label=f"{backend} (host RSS)")
        dev = sorted((r["population"], r["device_peak_mib"]) for r in mem
                     if r["backend"] == backend and "device_peak_mib" in r)
        if dev:
            ax.plot(*zip(*dev), "--^", label=f"{backend} (device)")
    ax.set_xlabel("population P")
    ax.set_ylabel("peak memory (MiB)")
    ax.set_ylim(bottom=0)
    ax.set_title("peak memory of one evaluator call")
    if mem:
        ax.legend(fontsize=8)
    ax = axes[1][1]
    labels, values = [], []
    fit = result.get("fitness")
    if fit:
        labels += ["fitness\njaxsplit", "fitness\nNumPy pool"]
        values += [fit["jax_median_s"], fit["numpy_median_s"]]
    for r in result.get("generation", []):
        labels += [f"generation\n{r['backend']}\nN={r['images']}", f"compile\n{r['backend']}"]
        values += [r["generation_s"], r["compile_s"]]
    if values:
        ax.bar(range(len(values)), values, color="tab:gray")
        ax.set_xticks(range(len(values)), labels, fontsize=7)
        ax.set_yscale("log")
        ax.set_ylabel("seconds")
        ax.set_title("fitness step and one generation")
    fig.suptitle(f"jaxsplit benchmark: {result['machine']['name']} ({result['machine']['date']})",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def summary_lines(result: Mapping[str, Any]) -> list[str]:
    lines = []
    peak = result.get("peak")
    if peak:
        lines.append(f"matmul peak: {peak['peak_gflops']:.0f} GFLOP/s (jax {peak['jax_gflops']:.0f}"
                     + (f", torch {peak['torch_gflops']:.0f}" if "torch_gflops" in peak else "")
                     + ")")
    thr = result.get("throughput", [])
    best: dict[tuple, dict] = {}
    for r in thr:
        if r["backend"] != "torch":
            key = (r["width"], r["kept"])
            if key not in best or r["rate"] > best[key]["rate"]:
                best[key] = r
    for (width, kept), r in sorted(best.items(), reverse=True):
        lines.append(f"width {width} kept {kept}: best jaxsplit {r['backend']} {r['rate']:.0f} "
                     f"sol·img/s at P={r['population']}"
                     + (f" = {r['vs_torch']:.2f}x the PyTorch loop" if "vs_torch" in r else "")
                     + (f", {100 * r['peak_fraction']:.0f}% of peak" if "peak_fraction" in r else ""))
    fit = result.get("fitness")
    if fit:
        lines.append(f"fitness step: {fit['speedup']:.1f}x the NumPy pool "
                     f"({fit['jax_median_s'] * 1e3:.0f} ms vs {fit['numpy_median_s'] * 1e3:.0f} ms)")
    for r in result.get("generation", []):
        lines.append(f"generation ({r['backend']}): {r['generation_s']:.2f}s, compile "
                     f"~{r['compile_s']:.1f}s")
    mem = result.get("memory", [])
    for backend in sorted({r["backend"] for r in mem}):
        peaks = [r["peak_rss_mib"] for r in sorted(mem, key=lambda r: r["population"])
                 if r["backend"] == backend]
        lines.append(f"peak RSS {backend}: " + " / ".join(f"{p:.0f}" for p in peaks) + " MiB")
    return lines


SECTIONS = ("peak", "throughput", "memory", "fitness", "generation")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run (fewer, smaller points)")
    parser.add_argument("--out", default=None,
                        help="JSON path (default benchmarks/results/<machine>.json; the PNG goes "
                             "next to it)")
    parser.add_argument("--only", nargs="+", choices=SECTIONS, default=None,
                        help="run only these sections")
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument("--torch-threads", type=int, default=None,
                        help="torch.set_num_threads (default: torch's own choice)")
    parser.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.memory_child is not None:
        print("MEMORY " + json.dumps(memory_child(json.loads(args.memory_child))), flush=True)
        return 0

    if args.torch_threads is not None:
        if args.torch_threads < 1:
            parser.error(f"--torch-threads must be >= 1, got {args.torch_threads}")
        if have_torch():
            import torch

            torch.set_num_threads(args.torch_threads)
    plan = dict(QUICK_PLAN if args.quick else FULL_PLAN)
    if jax.default_backend() != "cpu":
        plan["peak_size"] = 8192  # big enough to reach an accelerator's peak
    sections = args.only or list(SECTIONS)
    name = machine_name()
    out = Path(args.out) if args.out else REPO / "benchmarks" / "results" / f"{name}.json"
    machine = {"name": name, **machine_record()}
    result: dict[str, Any] = {"machine": machine, "quick": bool(args.quick), "plan": plan,
                              "backends": jax_backends() + (["torch"] if have_torch() else []),
                              "errors": {}}

    def log(msg: str) -> None:
        print(msg, flush=True)

    load = machine["load_average_start"][0]
    if load > 0.5 * (os.cpu_count() or 1):
        result["warnings"] = [
            f"the machine was busy at the start (1-min load average {load:.1f} on "
            f"{os.cpu_count()} cores): timings are unreliable, PyTorch's OpenMP threads "
            f"especially (they slow down many-fold when a core is taken by another process)"]
        print("warning: " + result["warnings"][0], flush=True)
    log(f"jaxsplit benchmark on {name} ({machine['cpu_model']}, {machine['cores']} cores, "
        f"jax {jax.__version__} {jax.default_backend()}, torch {machine.get('torch')}); "
        f"{'quick' if args.quick else 'full'} run; backends {result['backends']}")
    t_start = time.perf_counter()
    peak = None
    for section in sections:
        log(f"[{section}]")
        t0 = time.perf_counter()
        try:
            if section == "peak":
                result["peak"] = bench_peak(plan["peak_size"])
                peak = result["peak"]["peak_gflops"]
                log(f"  fp32 matmul {plan['peak_size']}^2: jax {result['peak']['jax_gflops']:.1f} "
                    f"GFLOP/s" + (f", torch {result['peak']['torch_gflops']:.1f} GFLOP/s"
                                  if "torch_gflops" in result["peak"] else ""))
            elif section == "throughput":
                result["throughput"] = bench_throughput(plan["throughput"], peak, log)
            elif section == "memory":
                result["memory"] = bench_memory(plan["memory"], log)
            elif section == "fitness":
                result["fitness"] = bench_fitness(plan["fitness"], log)
            elif section == "generation":
                result["generation"] = bench_generation(plan["generation"], log)
        except Exception as e:  # one failing section must not lose the others
            result["errors"][section] = f"{type(e).__name__}: {e}"
            log(f"  FAILED: {type(e).__name__}: {e}")
            traceback.print_exc()
        result.setdefault("section_time_s", {})[section] = time.perf_counter() - t0
    result["total_time_s"] = time.perf_counter() - t_start
    machine["load_average_end"] = list(os.getloadavg())
    result["summary"] = summary_lines(result)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1, default=float) + "\n")
    log("summary:")
    for line in result["summary"]:
        log("  " + line)
    if not args.no_plot:
        try:
            plot(result, out.with_suffix(".png"))
            log(f"wrote {out} and {out.with_suffix('.png')} ({result['total_time_s']:.0f}s)")
        except Exception as e:
            result["errors"]["plot"] = f"{type(e).__name__}: {e}"
            log(f"plot failed: {e}; wrote {out}")
    else:
        log(f"wrote {out} ({result['total_time_s']:.0f}s)")
    return 1 if result["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
