"""The modularization search driver: importance -> encoding -> GA loop -> modules (docs/method.md §3-6).

`run_modularize(run_dir, cfg)` is the I/O edge. The core is the pure
`search_step(problem, carry, key, params, images, labels, classes)`: decode
the population (plus the hall-of-fame ensemble as individual P of every
class), evaluate the logit table, score it with the cooperative fitness, tell
the strategy, ask the next population. `make_step(problem)` jit-compiles it
once (or, for a host-side evaluator such as the "fast" backend, jit-compiles
the parts before and after the evaluator); the Python loop only feeds it
keys and does I/O.

Generations: generation g evaluates population g (population 0 is the
heuristic initial one) and produces population g+1. As in the reference's
`GA.run` (which evaluates the final population after its last update), a
search of `num_generations` evaluates generations 0..num_generations, i.e.
`num_generations + 1` populations, unless early stopping ends it first.

Reproducibility: generation g uses the key `fold_in(key(search.seed), g)`,
never Python state, so a run killed at any point and resumed from its last
checkpoint ends bit-identical to an uninterrupted one (history timings
aside). Checkpoints (`modularize/search_ckpt/gen_XXXXX`, written by
`jaxsplit.checkpoint.save_pytree`: atomic, never overwritten, digest-checked)
hold the whole loop carry (strategy state, population, hall of fame, fitness
state with acc_ratio and early-stop counter, best ensemble), the generation
index, the history and a fingerprint of (model, search config, data config,
params). The latest two are kept (the new one is written before the oldest
is deleted).

Outputs in `run_dir/modularize/`: `importance.npz`, `masks.npz` (the best
ensemble's mask per class: arrays named by conv layer, leading C axis),
`history.json`, `curves.png`, `summary.json` (+ `sensitivity.npz/png` when
`search.sensitivity`). Files that already exist are never overwritten.

Which ensemble is "best": the one with the highest valid fitness
`alpha·acc + (1 - alpha)·diff` over all generations (the quantity that
drives early stopping); the hall of fame is each generation's best ensemble
under the current acc_ratio (docs/method.md §6).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shutil
import time
from collections.abc import Callable, Mapping
from functools import partial
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxsplit import checkpoint as ckpt
from jaxsplit import importance as imp_lib
from jaxsplit import masks as masks_lib
from jaxsplit.models.convnet import ConvNet, conv_macs, count_params, head_macs
from jaxsplit.search import encoding as enc_lib
from jaxsplit.search import fitness as fit_lib
from jaxsplit.search.evaluate import make_evaluator_from_config
from jaxsplit.search.sharding import input_placement
from jaxsplit.search.strategies import BinaryStrategy, make_strategy

MODULARIZE_DIRNAME = "modularize"
CKPT_DIRNAME = "search_ckpt"
CKPT_PREFIX = "gen_"
KEEP_CHECKPOINTS = 2
FINGERPRINT_EXCLUDED = ("checkpoint_every", "eval_cache_mib")  # cannot change the result
TIME_KEYS = ("time_s",)
INIT_STREAM = 2**31 - 1  # fold_in index of the initial-population keys (generations use 0, 1, ...)  # history fields that differ between identical runs


# -- fingerprint, checkpoints -------------------------------------------------


def fingerprint(cfg, model_description: Mapping[str, Any], params: Any) -> dict[str, Any]:
    """What a checkpoint must share with the run that resumes it."""
    from jaxsplit import config as jconfig

    search = jconfig.to_dict(cfg.search)
    for key in FINGERPRINT_EXCLUDED:
        search.pop(key, None)
    return {"model": dict(model_description), "search": search, "data": jconfig.to_dict(cfg.data),
            "params": {"sha256": params_digest(params)}}


def _flat_items(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, Mapping):
        out = {}
        for k, v in d.items():
            out.update(_flat_items(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: d}


def compare_fingerprints(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """Human-readable differences, e.g. `search config: population_size 8 -> 10`."""
    labels = {"model": "model", "search": "search config", "data": "data config",
              "params": "model parameters"}
    diffs = []
    for part in ("model", "search", "data", "params"):
        a, b = _flat_items(saved.get(part, {})), _flat_items(current.get(part, {}))
        keys = sorted(k for k in set(a) | set(b) if a.get(k, "<unset>") != b.get(k, "<unset>"))
        if keys:
            if part == "params":
                diffs.append("model parameters: different trained weights (param hash differs)")
            else:
                shown = ", ".join(f"{k} {a.get(k, '<unset>')!r} -> {b.get(k, '<unset>')!r}"
                                  for k in keys[:6])
                diffs.append(f"{labels[part]}: {shown}" + (" ..." if len(keys) > 6 else ""))
    return diffs


def list_checkpoints(ckpt_root: Path) -> list[tuple[int, Path]]:
    """`[(num_generations_done, path), ...]` sorted ascending (hidden temp dirs ignored)."""
    if not ckpt_root.is_dir():
        return []
    out = []
    for p in ckpt_root.iterdir():
        if p.is_dir() and p.name.startswith(CKPT_PREFIX) and p.name[len(CKPT_PREFIX):].isdigit():
            out.append((int(p.name[len(CKPT_PREFIX):]), p))
    return sorted(out)


def remove_stale_temporaries(ckpt_root: Path) -> None:
    """Delete half-written checkpoints (`.gen_*` hidden dirs) left by a killed run."""
    if ckpt_root.is_dir():
        for p in ckpt_root.iterdir():
            if p.name.startswith("." + CKPT_PREFIX) and p.is_dir():
                shutil.rmtree(p, ignore_errors=True)


def save_search_checkpoint(ckpt_root: Path, done: int, carry: SearchCarry, base_key: jax.Array,
                           metadata: Mapping[str, Any]) -> Path:
    """Write `gen_{done}` (never overwriting), then delete all but the latest two."""
    path = ckpt_root / f"{CKPT_PREFIX}{done:05d}"
    tree = {"carry": carry, "base_key": jax.random.key_data(base_key)}
    ckpt.save_pytree(path, tree, dict(metadata))
    for _, old in list_checkpoints(ckpt_root)[:-KEEP_CHECKPOINTS]:
        shutil.rmtree(old, ignore_errors=True)
    return path


def _unreadable(path: Path, err: Exception) -> ResumeError:
    return ResumeError(f"cannot resume from {str(path)!r}: {err}. Delete this checkpoint to resume from an "
                       f"earlier one (or start a new run without resume)")


def _check_fingerprint(path: Path, meta: Mapping[str, Any], current_fp: Mapping[str, Any]) -> None:
    diffs = compare_fingerprints(meta.get("fingerprint", {}), current_fp)
    if diffs:
        raise ResumeError(
            f"refusing to resume from {str(path)!r}: it was made with a different "
            + "; ".join(diffs) + ". Resume with the same config and model, or start a new run")


def check_resumable(path: Path, current_fp: Mapping[str, Any]) -> dict:
    """The metadata of checkpoint `path` if it can be resumed by a run with `current_fp`.

    Raises:
      ResumeError: corrupt/truncated, or made with a different model, config, data or params.
    """
    try:
        meta = ckpt.read_metadata(path)
    except ckpt.CheckpointError as e:
        raise _unreadable(path, e) from e
    _check_fingerprint(path, meta, current_fp)
    return meta


def load_search_checkpoint(path: Path, template: Any, base_key: jax.Array,
                           current_fp: Mapping[str, Any]) -> tuple[SearchCarry, dict]:
    """Load and check a search checkpoint against the current run.

    Args:
      template: a `SearchCarry` (arrays or `jax.ShapeDtypeStruct`s) the checkpoint must fit.

    Raises:
      ResumeError: corrupt/truncated, or made with a different model, config, data or params.
    """
    target = {"carry": template, "base_key": jax.random.key_data(base_key)}
    try:
        tree, meta = ckpt.load_pytree(path, target)
    except ckpt.CheckpointError as e:
        raise _unreadable(path, e) from e
    _check_fingerprint(path, meta, current_fp)
    if not np.array_equal(np.asarray(tree["base_key"]), np.asarray(jax.random.key_data(base_key))):
        raise ResumeError(f"refusing to resume from {str(path)!r}: its base key differs (search.seed)")
    return _strong(tree["carry"]), meta


# -- host helpers -------------------------------------------------------------


def _write_new(path: Path, write: Callable[[Path], None]) -> bool:
    """Write `path` atomically unless it exists. Returns whether it was written."""
    if path.exists():
        return False
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    write(tmp)
    os.replace(tmp, path)
    return True


def _save_npz(path: Path, arrays: Mapping[str, np.ndarray]) -> bool:
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.savez(f, **{k: np.asarray(v) for k, v in arrays.items()})
    return _write_new(path, write)


def _save_json(path: Path, obj: Any) -> bool:
    return _write_new(path, lambda tmp: tmp.write_text(json.dumps(obj, indent=2)))


def module_stats_fallback(model: ConvNet, mask: Mapping[str, np.ndarray]) -> dict[str, float]:
    """Kept kernels / params / MACs of one module as fractions of the model.

    Counts the conv layers' kept kernels (inputs follow the previous layer's
    kept kernels, residual ties are equal) and the first Dense layer's input
    columns; the rest of the head is whole (docs/method.md §7). Used when
    `jaxsplit.extract` is not available.
    """
    spec = model.conv_spec()
    kept = {l.name: int(np.asarray(mask[l.name]).sum()) for l in spec.layers}
    widths = model.head_widths()
    full_params, mod_params = 0, 0
    prev_full, prev_kept = spec.image_shape[2], spec.image_shape[2]
    for layer in spec.layers:
        full_params += 9 * prev_full * layer.num_kernels + layer.num_kernels
        mod_params += 9 * prev_kept * kept[layer.name] + kept[layer.name]
        prev_full, prev_kept = layer.num_kernels, kept[layer.name]
    hw = spec.head_in_hw[0] * spec.head_in_hw[1]
    first_in = hw * prev_kept
    head_full = sum(a * b + b for a, b in zip(widths[:-1], widths[1:]))
    head_mod = head_full - (widths[0] - first_in) * widths[1]
    full_macs = conv_macs(model) + head_macs(model)
    mod_macs = conv_macs(model, kept) + head_macs(model, last_kept=prev_kept)
    return {"kept_kernels": sum(kept.values()), "kept_fraction": sum(kept.values()) / spec.total_kernels,
            "params_fraction": (mod_params + head_mod) / (full_params + head_full),
            "macs_fraction": mod_macs / full_macs}


def _module_stats(model: ConvNet, params: Any, mask: Mapping[str, np.ndarray]) -> tuple[dict, str]:
    """Per-module stats from `jaxsplit.extract` when present, else `module_stats_fallback`."""
    try:
        from jaxsplit import extract  # written by another part of the project
    except ImportError:
        extract = None
    if extract is not None and hasattr(extract, "stats_from_mask"):
        try:
            stats = extract.stats_from_mask(model, mask)
            return dict(stats), "jaxsplit.extract.stats_from_mask"
        except Exception:  # an incompatible/unfinished extract module: fall back, stated in summary
            pass
    return module_stats_fallback(model, mask), "jaxsplit.search.driver.module_stats_fallback"


def _plot_history(history: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    gens = [h["generation"] for h in history]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    ax = axes[0]
    ax.plot(gens, [h["best_fitness"] for h in history], label="best ensemble fitness")
    ax.plot(gens, [h["best_valid_fitness"] for h in history], label="valid fitness")
    ax.plot(gens, [h["best_acc"] for h in history], label="ensemble accuracy")
    ax.plot(gens, [h["best_diff"] for h in history], label="ensemble diff")
    ax.set_xlabel("generation")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    ax = axes[1]
    kept = np.asarray([h["mean_kept_fraction"] for h in history])
    ax.plot(gens, kept.mean(axis=1), label="population mean (all classes)")
    ax.plot(gens, np.asarray([h["best_kept_fraction"] for h in history]).mean(axis=1),
            label="best ensemble mean")
    ax.set_xlabel("generation")
    ax.set_ylabel("fraction of kernels kept")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


# -- the driver ---------------------------------------------------------------


def run_modularize(run_dir: str | os.PathLike, cfg, resume: bool = False, *, progress: bool = True,
                   data: tuple | None = None, evaluate_fn: Callable | None = None,
                   on_checkpoint: Callable[[int], None] | None = None) -> dict:
    """Search per-class modules of the model trained in `run_dir` (docs/method.md §3-6).

    Args:
      run_dir: a run folder with a trained model (`run_dir/checkpoint`).
      cfg: the run's `Config` (its `data` and `search` sections are used; the
        model comes from the checkpoint).
      resume: continue from the latest checkpoint in `modularize/search_ckpt`
        (starts fresh when there is none). Without it, an existing search
        checkpoint or result is an error.
      progress: show a tqdm bar per generation.
      data: `(train, valid, test)` datasets instead of `prepare_data(cfg.data)`.
      evaluate_fn: an `Evaluator` instead of `make_evaluator_from_config`.
      on_checkpoint: called with the number of generations done after each
        checkpoint is written (a test hook).

    Returns:
      the summary dict (also written to `modularize/summary.json`).

    Raises:
      SearchError / ResumeError / CheckpointError with one-line reasons.
    """
    from jaxsplit import pipeline

    run_dir = Path(run_dir)
    out_dir = run_dir / MODULARIZE_DIRNAME
    ckpt_root = out_dir / CKPT_DIRNAME
    scfg = cfg.search
    existing = list_checkpoints(ckpt_root)
    if not resume and (existing or (out_dir / "masks.npz").exists()):
        raise SearchError(
            f"{str(out_dir)!r} already holds a search (checkpoints or masks.npz); pass resume=True "
            f"(--resume) to continue it, or use another run folder")

    model, params, train_cfg, _ = ckpt.load_model(run_dir)
    model_desc = pipeline.model_description(train_cfg.model, model)
    model_name = train_cfg.model.name
    if data is None:
        _, valid, test = pipeline.prepare_data(cfg.data)
    else:
        _, valid, test = data
    if valid.num_classes != model.num_classes:
        raise SearchError(f"the data has {valid.num_classes} classes but the model "
                          f"{model.num_classes}; use the run's data config")
    num_valid = len(valid) if scfg.num_valid is None else min(scfg.num_valid, len(valid))
    images = np.asarray(valid.images[:num_valid], np.float32)
    labels = np.asarray(valid.labels[:num_valid], np.int32)
    classes = np.arange(model.num_classes, dtype=np.int32)
    class_names = list(valid.class_names) if valid.class_names else [str(c) for c in classes]
    out_dir.mkdir(parents=True, exist_ok=True)
    fp = fingerprint(cfg, model_desc, params)
    if resume and existing:  # refuse a foreign or corrupt checkpoint before any heavy work
        check_resumable(existing[-1][1], fp)
    if resume:
        remove_stale_temporaries(ckpt_root)

    # importance (deterministic; reuse the saved one on resume)
    imp_path = out_dir / "importance.npz"
    t0 = time.perf_counter()
    result = imp_lib.kernel_importance(model, params, images, labels,
                                       confidence=scfg.importance_confidence)
    importance = result.importance
    _save_npz(imp_path, {**importance, "__num_confident": result.num_confident,
                         "__num_images": result.num_images})
    for w in result.warnings:
        print(f"warning: {w}")
    importance_time = time.perf_counter() - t0

    evaluate_fn = evaluate_fn or make_evaluator_from_config(model, scfg)
    sensitive_override = None
    if scfg.sensitivity:
        ratios = imp_lib.DEFAULT_RATIOS
        curves = imp_lib.layer_sensitivity(model, params, images, labels, importance, ratios,
                                           evaluate_fn=evaluate_fn)
        _save_npz(out_dir / "sensitivity.npz", {"curves": curves, "ratios": np.asarray(ratios)})
        if not (out_dir / "sensitivity.png").exists():
            imp_lib.plot_sensitivity(curves, ratios, out_dir / "sensitivity.png",
                                     model.conv_spec().names)
        sensitive_override = imp_lib.sensitive_layers(curves, ratios)

    problem, settings = build_problem(model, model_name, importance, scfg,
                                      sensitive_override=sensitive_override, evaluate_fn=evaluate_fn)
    base_key = jax.random.key(scfg.seed)
    key_init, key_pop = jax.random.split(jax.random.fold_in(base_key, INIT_STREAM))

    def fresh_carry() -> SearchCarry:
        bits0 = initial_population(key_pop, problem, scfg.population_size, settings)
        return init_carry(key_init, problem, bits0)

    history: list[dict[str, Any]] = []
    start = 0
    compile_time = None
    if resume and existing:
        done, path = existing[-1]
        template = jax.eval_shape(fresh_carry)  # shapes only: no compile
        carry, meta = load_search_checkpoint(path, template, base_key, fp)
        history = list(meta["history"])
        start = int(meta["generations_done"])
        compile_time = meta.get("compile_time_s")
        if len(history) != start:
            raise ResumeError(f"checkpoint {str(path)!r} is inconsistent: {len(history)} history "
                              f"entries for {start} generations")
        print(f"resuming from {path.name}: {start} generations done")
    else:
        carry = fresh_carry()

    total = scfg.num_generations + 1
    place = input_placement(problem.evaluate_fn)  # a sharded evaluator's mesh, else device 0
    carry = _strong(carry, place)
    dev_params = _strong(params, place)
    dev = _strong((images, labels, classes), place)
    step = make_step(problem)
    finished = bool(carry.stopped) or start >= total
    if not finished:
        t_c = time.perf_counter()
        # a host-side evaluator ("fast") compiles its own pieces per new shape during the first
        # generations; those seconds are in the generation times, not here
        compiled = compile_step(step, carry, generation_key(base_key, start), dev_params, *dev)
        this_compile = time.perf_counter() - t_c
        compile_time = this_compile if compile_time is None else compile_time
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=total, initial=start, unit="gen", dynamic_ncols=True,
                       desc=f"modularize {model_name}")
        try:
            for g in range(start, total):
                t_g = time.perf_counter()
                carry, metrics = compiled(_strong(carry, place), generation_key(base_key, g), dev_params,
                                          *dev)
                entry = {"generation": g, **_to_host(metrics)}
                entry["time_s"] = time.perf_counter() - t_g
                history.append(entry)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(fit=f"{entry['best_fitness']:.4f}", acc=f"{entry['best_acc']:.4f}",
                                    diff=f"{entry['best_diff']:.4f}",
                                    kept=f"{np.mean(entry['best_kept_fraction']):.2f}")
                done = g + 1
                last = entry["stop"] or done == total
                if done % scfg.checkpoint_every == 0 or last:
                    meta = {"generations_done": done, "history": history, "fingerprint": fp,
                            "compile_time_s": compile_time, "finished": bool(last)}
                    save_search_checkpoint(ckpt_root, done, carry, base_key, meta)
                    if on_checkpoint is not None:
                        on_checkpoint(done)
                if entry["stop"]:
                    break
        finally:
            if bar is not None:
                bar.close()

    # -- outputs -----------------------------------------------------------------------------
    best_bits = np.asarray(carry.best_bits)
    best_masks = {k: np.asarray(v) for k, v in problem.decode(jnp.asarray(best_bits)[:, None]).items()}
    best_masks = {k: v[:, 0] for k, v in best_masks.items()}  # (C, K_l)
    _save_npz(out_dir / "masks.npz", best_masks)
    accs = final_accuracies(problem, dev_params, best_bits,
                            {"valid": (images, labels), "test": (test.images, test.labels)}, classes)
    valid_acc, model_valid = accs["valid"]["ensemble"], accs["valid"]["model"]
    test_acc, model_test = accs["test"]["ensemble"], accs["test"]["model"]
    per_class, stats_source = [], None
    for c in range(model.num_classes):
        stats, stats_source = _module_stats(model, params, {k: v[c] for k, v in best_masks.items()})
        per_class.append({"class": c, "name": class_names[c], **{k: _py(v) for k, v in stats.items()}})

    def mean_of(key: str) -> float | None:
        vals = [p[key] for p in per_class if isinstance(p.get(key), (int, float))]
        return float(np.mean(vals)) if vals else None

    times = [h["time_s"] for h in history]
    summary = {
        "model": model_desc, "strategy": scfg.strategy, "population_size": scfg.population_size,
        "num_genes": problem.enc.num_genes, "num_valid_images": int(num_valid),
        "generations_run": len(history), "num_generations": scfg.num_generations,
        "stopped_early": bool(carry.stopped), "best_generation": int(carry.best_generation),
        "best_valid_fitness": float(carry.best_valid_fitness),
        "ensemble_valid_accuracy": valid_acc, "ensemble_test_accuracy": test_acc,
        "ensemble_diff": float(carry.best_diff),
        "model_valid_accuracy": model_valid, "model_test_accuracy": model_test,
        "test_accuracy_loss": model_test - test_acc,
        "mean_kept_fraction": mean_of("kept_fraction"), "mean_params_fraction": mean_of("params_fraction"),
        "mean_macs_fraction": mean_of("macs_fraction"), "stats_source": stats_source,
        "per_class": per_class, "sensitive_layers": list(settings["sensitive"]),
        "init_ratios": {"sensitive": list(settings["ratios_sensitive"]),
                        "other": list(settings["ratios_other"]),
                        "temperature": settings["temperature"]},
        "importance_fallback_classes": list(result.fallback_classes),
        "compile_time_s": compile_time, "importance_time_s": importance_time,
        "mean_generation_time_s": float(np.mean(times[1:] if len(times) > 1 else times)) if times else None,
    }
    history_doc = {"compile_time_s": compile_time, "generations": history}
    _save_json(out_dir / "history.json", history_doc)
    if history and not (out_dir / "curves.png").exists():
        _plot_history(history, out_dir / "curves.png")
    _save_json(out_dir / "summary.json", summary)
    print(format_summary(summary))
    return summary


def _py(v: Any) -> Any:
    if isinstance(v, (np.floating, np.integer, np.bool_)):
        return v.item()
    if isinstance(v, np.ndarray):
        return v.tolist()
    return v


def format_summary(summary: Mapping[str, Any]) -> str:
    """A plain-text table of the per-class modules and the ensemble vs the model."""
    def pct(x):
        return "   n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:5.1f}%"

    lines = [f"{'class':<16} {'kernels':>8} {'params':>8} {'MACs':>8}"]
    for p in summary["per_class"]:
        lines.append(f"{str(p['name'])[:16]:<16} {pct(p.get('kept_fraction')):>8} "
                     f"{pct(p.get('params_fraction')):>8} {pct(p.get('macs_fraction')):>8}")
    lines.append(f"{'mean':<16} {pct(summary['mean_kept_fraction']):>8} "
                 f"{pct(summary['mean_params_fraction']):>8} {pct(summary['mean_macs_fraction']):>8}")
    lines.append(
        f"ensemble accuracy: valid {pct(summary['ensemble_valid_accuracy'])}, test "
        f"{pct(summary['ensemble_test_accuracy'])} | model: valid "
        f"{pct(summary['model_valid_accuracy'])}, test {pct(summary['model_test_accuracy'])} | "
        f"diff {pct(summary['ensemble_diff'])} | best generation {summary['best_generation']} of "
        f"{summary['generations_run']}")
    return "\n".join(lines)
