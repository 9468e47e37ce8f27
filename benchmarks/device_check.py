"""The one prepared accelerator check: correctness and speed of the evaluators on this device.

    bash benchmarks/device_check.sh            # on the GPU/TPU machine (<= 8 minutes)
    bash benchmarks/device_check.sh --smoke    # the same steps at tiny sizes on CPU (make test)

Steps, each with its own share of one deadline (`--budget-s`, default 450 s; a step or a
point that would start past its share is skipped and recorded as such):

1. tests: `pytest -m device` (every backend on this device vs the CPU reference).
2. peak: the device's matmul rate, `jnp.dot` and `torch.mm` on the same square matrices
   (float32 without TF32, TF32, bfloat16; `block_until_ready` / `cuda.synchronize`; on CPU
   torch gets as many threads as XLA's pool, `os.cpu_count()`).
3. throughput: full-width SimCNN on 32x32x3 images, exactly 30/50/70% of every layer's
   kernels kept, populations 10-200 (one class row): the "device" backend (float32), the
   "reference" backend (small P: it costs the full model per module), the device backend's
   other member loop at one point ("device-map" / "device-vmap"), and the PyTorch loop
   (`torch_baseline.py`, per module extract + forward; its cost is linear in P, so it is
   timed on 10 modules), in solution·images/s; `vs_torch` = jaxsplit / PyTorch.
4. dtypes: the device backend in tensorfloat32 and bfloat16 against float32 on one point:
   speed, max |ΔL| and the agreement of the per-image argmax over 10 class rows.
5. generation: one paper-scale generation through the driver's compiled step (10 classes x
   100 individuals + the hall of fame x 10,000 images, full-width SimCNN, "device" backend),
   compile timed apart. If the throughput measured in step 3 predicts it cannot finish in
   the time left, the images are cut to what fits and the record says so.

Writes `<out>/<machine>.json` (after every step, so a killed run keeps what it measured) and
`<out>/<machine>.png`. Random weights and images (speed does not depend on their values).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import bench_evaluator as BE  # noqa: E402  (helpers: masks, timing, torch points, machine name)
from jaxsplit.models.convnet import random_params, simcnn  # noqa: E402
from jaxsplit.search import device_evaluate as DE  # noqa: E402
from jaxsplit.search import evaluate as E  # noqa: E402

FULL = {"width": 1.0, "image_size": 32, "fractions": (0.5, 0.3, 0.7),
        "populations": (10, 50, 100, 200), "reference_populations": (10,), "torch_population": 10,
        "images": 1000, "peak_size": 8192, "dtype_point": (0.5, 100),
        "generation": {"classes": 10, "population": 100, "images": 10000},
        "chunk_individuals": 16, "chunk_images": 1000, "num_levels": 8,
        "shares": {"tests": 0.22, "peak": 0.05, "throughput": 0.33, "dtypes": 0.1,
                   "generation": 0.3}}
SMOKE = {"width": 0.0625, "image_size": 32, "fractions": (0.5,), "populations": (3,),
         "reference_populations": (3,), "torch_population": 2, "images": 8, "peak_size": 128,
         "dtype_point": (0.5, 3), "generation": {"classes": 10, "population": 3, "images": 16},
         "chunk_individuals": 4, "chunk_images": 8, "num_levels": 1,
         "shares": {"tests": 0.15, "peak": 0.05, "throughput": 0.3, "dtypes": 0.15,
                    "generation": 0.35}}


class Clock:
    """One deadline shared by the steps: step i may use its share of what is left."""

    def __init__(self, budget_s: float):
        self.start = time.monotonic()
        self.end = self.start + budget_s

    def left(self) -> float:
        return self.end - time.monotonic()

    def step_deadline(self, share: float, later_shares: float) -> float:
        """Monotonic time by which a step with `share` (of it and the later steps) must end."""
        return time.monotonic() + max(0.0, self.left()) * share / max(share + later_shares, 1e-9)


def log(msg: str) -> None:
    print(msg, flush=True)


# -- steps -------------------------------------------------------------------------------------


def step_tests(smoke: bool, deadline: float) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "device"]
    if smoke:  # make test already runs them; here: that the marker selects them
        cmd += ["--collect-only", str(REPO / "tests" / "test_device_backends.py")]
    else:
        cmd.append(str(REPO / "tests"))
    timeout = max(30.0, deadline - time.monotonic())
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)
        rc, out = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as err:
        rc, out = "timeout", (err.stdout or b"").decode() if isinstance(err.stdout, bytes) else (err.stdout or "")
    tail = [ln for ln in out.strip().splitlines() if ln.strip()][-12:]
    log("  " + (tail[-1] if tail else f"rc={rc}"))
    return {"command": " ".join(cmd[2:]), "returncode": rc, "passed": rc == 0,
            "seconds": time.perf_counter() - t0, "tail": tail}


def _time(fn, repeats: int) -> float:
    fn()  # warm-up (compile)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def step_peak(size: int) -> dict[str, Any]:
    rng = np.random.default_rng(0)
    a_np = rng.standard_normal((size, size), np.float32)
    b_np = rng.standard_normal((size, size), np.float32)
    flops = 2.0 * size ** 3
    out: dict[str, Any] = {"size": size, "xla_threads": os.cpu_count()}
    a, b = jnp.asarray(a_np), jnp.asarray(b_np)
    for name, dtype, precision in (("float32", jnp.float32, jax.lax.Precision.HIGHEST),
                                   ("tensorfloat32", jnp.float32, jax.lax.Precision.HIGH),
                                   ("bfloat16", jnp.bfloat16, jax.lax.Precision.DEFAULT)):
        x, y = a.astype(dtype), b.astype(dtype)
        dot = jax.jit(lambda p, q, pr=precision: jnp.dot(p, q, precision=pr,
                                                         preferred_element_type=jnp.float32))
        out[f"jax_{name}_tflops"] = flops / _time(lambda: dot(x, y).block_until_ready(), 5) / 1e12
    if BE.have_torch():
        import torch

        import torch_baseline

        dev = torch_baseline.default_device()
        if dev.type == "cpu":
            torch.set_num_threads(os.cpu_count() or 1)  # XLA's CPU pool uses every core
        out["torch_threads"] = torch.get_num_threads()
        sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
        ta, tb = torch.from_numpy(a_np).to(dev), torch.from_numpy(b_np).to(dev)
        for name, dtype, tf32 in (("float32", torch.float32, False),
                                  ("tensorfloat32", torch.float32, True),
                                  ("bfloat16", torch.bfloat16, False)):
            if dev.type == "cuda":
                torch.backends.cuda.matmul.allow_tf32 = tf32
            x, y = ta.to(dtype), tb.to(dtype)
            out[f"torch_{name}_tflops"] = flops / _time(lambda: (torch.mm(x, y), sync()), 5) / 1e12
        if dev.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = False
    out["peak_float32_tflops"] = max(v for k, v in out.items() if k.endswith("float32_tflops")
                                     and "tensor" not in k)
    log("  " + ", ".join(f"{k} {v:.2f}" for k, v in out.items() if k.endswith("tflops")))
    return out


def _model(plan):
    model = simcnn(num_classes=10, in_channels=3, width=plan["width"], image_size=plan["image_size"])
    return model, random_params(model, 0)


def _device_fn(model, plan, dtype="float32", member_loop="auto"):
    return DE.DeviceEvaluator(model, chunk_individuals=plan["chunk_individuals"],
                              chunk_images=plan["chunk_images"], num_levels=plan["num_levels"],
                              compute_dtype=dtype, member_loop=member_loop)


def _other_loop() -> str:
    """The member loop "auto" does not pick here (both are timed at the headline point)."""
    return "vmap" if jax.default_backend() == "cpu" else "map"


def _jax_point(evaluate_fn, params, masks_list, images, classes) -> dict[str, Any]:
    params = {"params": params}  # evaluators take the full variables dict
    x, cls = jnp.asarray(images), jnp.asarray(classes)
    t0 = time.perf_counter()
    out = np.asarray(evaluate_fn(params, masks_list[0], x, cls))
    first = time.perf_counter() - t0
    times = []
    for m in masks_list[1:]:
        t0 = time.perf_counter()
        BE.block(evaluate_fn(params, m, x, cls))
        times.append(time.perf_counter() - t0)
    median = statistics.median(times)
    return {"median_s": median, "times_s": times, "first_call_s": first,
            "compile_s": max(0.0, first - median), "output": out}


def step_throughput(plan, deadline: float, peak: dict | None, result: dict) -> list[dict]:
    model, params = _model(plan)
    rng = np.random.default_rng(1)
    n_img = plan["images"]
    images = rng.standard_normal((n_img, plan["image_size"], plan["image_size"], 3)).astype(np.float32)
    classes = np.array([3], np.int32)
    peak_tflops = (peak or {}).get("peak_float32_tflops")
    records: list[dict] = []
    state_dict = None
    if BE.have_torch():
        import torch_baseline
        from jaxsplit.interop.torch import params_to_state_dict

        dev = torch_baseline.default_device()
        state_dict = {k: v.to(dev) for k, v in params_to_state_dict(params, model).items()}
    # points in priority order: the 50% headline first (torch, device at a middle P, reference,
    # the P range), then the other fractions at that P, then the rest; later ones may be skipped
    pops = list(plan["populations"])
    mid = pops[len(pops) // 2]
    first, others = plan["fractions"][0], plan["fractions"][1:]
    points = [("torch", first, plan["torch_population"]), ("device", first, mid)]
    points += [("reference", first, p) for p in plan["reference_populations"]]
    points.append((f"device-{_other_loop()}", first, mid))
    points += [("device", first, p) for p in (pops[0], pops[-1]) if p != mid]
    for kept in others:
        points += [("torch", kept, plan["torch_population"]), ("device", kept, mid)]
    points += [("device", first, p) for p in pops if ("device", first, p) not in points]
    for kept in others:
        points += [("device", kept, p) for p in pops if p != mid]
        points += [("reference", kept, p) for p in plan["reference_populations"]]
    torch_rate: dict[float, float] = {}
    for backend, kept, pop in points:
        if time.monotonic() > deadline:
            records.append({"backend": backend, "kept": kept, "population": pop,
                            "skipped": "step deadline"})
            continue
        masks_list = [BE.exact_masks(model, kept, (1, pop), seed=1000 * pop + r) for r in range(3)]
        try:
            if backend == "torch":
                if state_dict is None:
                    continue
                r = BE._torch_point(model, state_dict, masks_list, images, classes)
            else:
                if backend.startswith("device"):
                    loop = backend.split("-")[1] if "-" in backend else "auto"
                    fn = _device_fn(model, plan, member_loop=loop)
                else:
                    fn = E.make_evaluator(model, "reference",
                                          chunk_individuals=plan["chunk_individuals"],
                                          chunk_images=plan["chunk_images"])
                r = _jax_point(fn, params, masks_list, images, classes)
        except Exception as err:  # a failing point must not lose the others
            records.append({"backend": backend, "kept": kept, "population": pop,
                            "error": f"{type(err).__name__}: {err}"[:500]})
            log(f"  {backend} kept {kept} P={pop}: FAILED {err!r:.200}")
            continue
        rate = pop * n_img / r["median_s"]
        macs = BE.useful_macs(model, masks_list[0])
        flops = DE.flops_per_individual(model, masks_list[0], num_levels=plan["num_levels"],
                                        chunk_individuals=plan["chunk_individuals"])
        rec = {"backend": backend, "width": plan["width"], "kept": kept, "population": pop,
               "images": n_img, "rate": rate, "median_s": r["median_s"], "times_s": r["times_s"],
               "compile_s": r.get("compile_s") if backend != "torch" else None,
               "useful_macs": macs,
               "device_flops_per_image": float(flops["device"].mean()),
               "kept_flops_per_image": float(flops["kept"].mean()),
               "reference_flops_per_image": float(flops["reference"][0])}
        if backend.startswith("device"):
            rec["member_loop"] = fn.member_loop
        if backend == "torch":
            torch_rate[kept] = rate
            rec["extract_fraction"] = r.get("extract_fraction")
        elif kept in torch_rate:
            rec["vs_torch"] = rate / torch_rate[kept]
        if peak_tflops:
            rec["useful_peak_fraction"] = 2 * macs * rate / 1e12 / peak_tflops
        records.append(rec)
        log(f"  {backend:<9} kept {kept:.1f} P={pop:<4} N={n_img}: {rate:10.1f} sol·img/s"
            + (f"  {rec['vs_torch']:.2f}x torch" if "vs_torch" in rec else "")
            + (f"  compile {rec['compile_s']:.1f}s" if backend != "torch" else ""))
        result["throughput"] = records
    return records


def step_dtypes(plan, deadline: float) -> dict[str, Any]:
    model, params = _model(plan)
    kept, pop = plan["dtype_point"]
    rng = np.random.default_rng(2)
    n_img = plan["images"]
    images = rng.standard_normal((n_img, plan["image_size"], plan["image_size"], 3)).astype(np.float32)
    classes = np.arange(10, dtype=np.int32)
    masks_list = [BE.exact_masks(model, kept, (10, max(1, pop // 10)), seed=7 + r) for r in range(3)]
    out: dict[str, Any] = {"kept": kept, "rows": 10 * max(1, pop // 10), "images": n_img}
    base = None
    for dtype in ("float32", "tensorfloat32", "bfloat16"):
        if time.monotonic() > deadline:
            out[dtype] = {"skipped": "step deadline"}
            continue
        r = _jax_point(_device_fn(model, plan, dtype), params, masks_list, images, classes)
        L = r.pop("output")
        rec = {"median_s": r["median_s"], "compile_s": r["compile_s"],
               "rate": L.shape[0] * L.shape[1] * n_img / r["median_s"]}
        if base is None:
            base = L
        else:
            rec["max_abs_diff"] = float(np.abs(L - base).max())
            rec["max_abs_L"] = float(np.abs(base).max())
            rec["argmax_agreement"] = float(np.mean(L.argmax(0) == base.argmax(0)))
        out[dtype] = rec
        log(f"  {dtype:<14} {rec['rate']:10.1f} sol·img/s" + (
            f"  max|dL| {rec['max_abs_diff']:.2e}  argmax agree {rec['argmax_agreement']:.4f}"
            if "max_abs_diff" in rec else ""))
    return out


def step_generation(plan, deadline: float, result: dict) -> dict[str, Any]:
    from jaxsplit.search import driver as D
    from jaxsplit.search.config import SearchConfig
    from jaxsplit.search.sharding import input_placement

    gplan = plan["generation"]
    model, params = _model(plan)
    spec = model.conv_spec()
    rng = np.random.default_rng(0)
    num_classes, pop = gplan["classes"], gplan["population"]
    n_img = gplan["images"]
    rates = [r["rate"] for r in result.get("throughput", [])
             if r.get("backend") == "device" and r.get("kept") == 0.5 and "rate" in r]
    out: dict[str, Any] = {"classes": num_classes, "population": pop, "requested_images": n_img}
    if rates:  # predicted seconds of one generation; leave room for compile + 2 runs
        rows = num_classes * (pop + 1)
        predicted = rows * n_img / max(rates)
        room = (deadline - time.monotonic()) / 4
        out["predicted_generation_s"] = predicted
        if predicted > room > 0:
            n_img = max(plan["chunk_images"], int(n_img * room / predicted) // plan["chunk_images"]
                        * plan["chunk_images"])
            out["scaled_down"] = f"to {n_img} images to fit the time left"
    images = rng.standard_normal((n_img, plan["image_size"], plan["image_size"], 3)).astype(np.float32)
    labels = (np.arange(n_img) % num_classes).astype(np.int32)
    classes = np.arange(num_classes, dtype=np.int32)
    importance = {n: rng.random((num_classes, spec.layer(n).num_kernels)).astype(np.float32)
                  for n in spec.names}
    cfg = dataclasses.replace(SearchConfig(), population_size=pop, backend="device", shard=False,
                              chunk_individuals=plan["chunk_individuals"],
                              chunk_images=plan["chunk_images"])
    evaluate_fn = _device_fn(model, plan)
    problem, settings = D.build_problem(model, "simcnn", importance, cfg, evaluate_fn=evaluate_fn)
    bits = D.initial_population(jax.random.key(1), problem, pop, settings)
    carry = D.init_carry(jax.random.key(2), problem, bits)
    place = input_placement(evaluate_fn)
    dev_params = D._strong({"params": params}, place)
    dev = D._strong((images, labels, classes), place)
    step = D.make_step(problem)
    t0 = time.perf_counter()
    compiled = D.compile_step(step, carry, jax.random.key(100), dev_params, *dev)
    out["compile_s"] = time.perf_counter() - t0
    times = []
    for g in range(2):
        if g and time.monotonic() + times[0] > deadline:
            break
        t0 = time.perf_counter()
        carry, metrics = compiled(D._strong(carry, place), jax.random.key(100 + g), dev_params, *dev)
        BE.block((carry, metrics))
        times.append(time.perf_counter() - t0)
    kept = np.asarray(metrics["mean_kept_fraction"])
    out.update(images=n_img, generation_s=min(times), times_s=times,
               mean_kept_fraction=float(kept.mean()),
               solution_images_per_s=num_classes * (pop + 1) * n_img / min(times))
    if n_img != gplan["images"]:
        out["extrapolated_generation_s"] = min(times) * gplan["images"] / n_img
    log(f"  {num_classes} classes x {pop}+1 x {n_img} images: generation {min(times):.2f}s "
        f"(compile {out['compile_s']:.1f}s, mean kept {out['mean_kept_fraction']:.2f})")
    return out


# -- report ------------------------------------------------------------------------------------


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    ax = axes[0]
    recs = [r for r in result.get("throughput", []) if "rate" in r]
    for backend in ("device", "device-map", "device-vmap", "reference", "torch"):
        for kept in sorted({r["kept"] for r in recs}):
            pts = sorted((r["population"], r["rate"]) for r in recs
                         if r["backend"] == backend and r["kept"] == kept)
            if pts:
                ax.plot(*zip(*pts), marker="o", label=f"{backend} {int(100 * kept)}%")
    ax.set_xlabel("population P")
    ax.set_ylabel("solution·images / s")
    ax.set_yscale("log")
    ax.set_title("evaluator throughput (SimCNN)")
    ax.legend(fontsize=7)
    ax = axes[1]
    bars = {}
    peak = result.get("peak") or {}
    for k, v in peak.items():
        if k.endswith("_tflops") and not k.startswith("peak"):
            bars[k.replace("_tflops", "")] = v
    if bars:
        ax.barh(list(bars), list(bars.values()))
        ax.set_xlabel("matmul TFLOP/s")
    gen = result.get("generation") or {}
    title = "matmul peak"
    if "generation_s" in gen:
        title += f"; generation {gen['generation_s']:.1f}s ({gen['images']} images)"
    ax.set_title(title, fontsize=9)
    fig.suptitle(result.get("device", {}).get("kind", ""))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes (CPU, make test)")
    parser.add_argument("--out", default=str(HERE / "results"), help="folder for the JSON/PNG")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="seconds for all steps (default 450; smoke 100)")
    parser.add_argument("--skip", nargs="*", default=(),
                        choices=("tests", "peak", "throughput", "dtypes", "generation"))
    args = parser.parse_args(argv)
    plan = SMOKE if args.smoke else FULL
    clock = Clock(args.budget_s or (100.0 if args.smoke else 450.0))
    dev = jax.devices()[0]
    name = BE.machine_name() + ("-smoke" if args.smoke else "")
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, png_path = out_dir / f"{name}.json", out_dir / f"{name}.png"
    load_before = os.getloadavg()
    result: dict[str, Any] = {
        "script": "benchmarks/device_check.py", "smoke": args.smoke, "plan": plan,
        "budget_s": clock.end - clock.start,
        "device": {"platform": dev.platform, "kind": dev.device_kind,
                   "count": jax.device_count(), "jax": jax.__version__},
    }
    if BE.have_torch():
        import torch

        result["device"]["torch"] = torch.__version__
        result["device"]["torch_cuda"] = torch.cuda.is_available()

    def save():
        import _record

        _record.save_record(json_path, result, load_before)

    order = ["tests", "peak", "throughput", "dtypes", "generation"]
    shares = plan["shares"]
    for i, step in enumerate(order):
        if step in args.skip:
            result[step] = {"skipped": "--skip"}
            continue
        later = sum(shares[s] for s in order[i + 1:] if s not in args.skip)
        deadline = clock.step_deadline(shares[step], later)
        log(f"[{step}] {max(0.0, deadline - time.monotonic()):.0f}s of {clock.left():.0f}s left")
        if clock.left() <= 1.0:
            result[step] = {"skipped": "deadline"}
            continue
        t0 = time.perf_counter()
        try:
            if step == "tests":
                result[step] = step_tests(args.smoke, deadline)
            elif step == "peak":
                result[step] = step_peak(plan["peak_size"])
            elif step == "throughput":
                step_throughput(plan, deadline, result.get("peak"), result)
            elif step == "dtypes":
                result[step] = step_dtypes(plan, deadline)
            else:
                result[step] = step_generation(plan, deadline, result)
        except Exception as err:
            result[step] = {"error": f"{type(err).__name__}: {err}"[:1000],
                            "traceback": traceback.format_exc()[-3000:]}
            log(f"  {step} FAILED: {err!r:.300}")
        result.setdefault("step_seconds", {})[step] = time.perf_counter() - t0
        save()
    result["total_s"] = time.monotonic() - clock.start
    save()
    try:
        plot(result, png_path)
    except Exception as err:  # the JSON is what matters
        log(f"plot failed: {err!r}")
    log(f"wrote {json_path} and {png_path} ({result['total_s']:.0f}s)")
    failed = [s for s in order if isinstance(result.get(s), dict) and "error" in result[s]]
    tests = result.get("tests", {})
    if tests.get("passed") is False:
        failed.append("tests")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
