"""The modularization search driver: importance -> encoding -> GA loop -> modules (docs/method.md §3-6).

`run_modularize(run_dir, cfg)` is the I/O edge over the library
(`jaxsplit.modularize`): it loads the run's model and variables, calls
`modularize_init` (importance, encoding, evaluator, initial population) and
`modularize_step` once per generation, and adds the run folder, checkpoints,
resume, progress bar, plots and summary. The pure search core lives in
`search.core` (re-exported here): `search_step`, `make_step`, `init_carry`,
`build_problem`, ... (generation g evaluates population g; a search of
`num_generations` evaluates `num_generations + 1` populations unless early
stopping ends it first).

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
`modules.npz` (the same masks as a `jaxsplit.Modules` file: versioned, with
the graph fingerprint, `Modules.load(path, graph)`),
`history.json`, `curves.png`, `summary.json` (+ `sensitivity.npz/png` when
`search.sensitivity`), `config.yaml` (the resolved config the search started with, which
`jaxsplit modularize --resume` reads, so overrides need no retyping). `summary.json`'s
`source_model` records the model the modules come from (params digest, config, class ids);
`jaxsplit patch` refuses modules of a model that was retrained since. Every file is written
atomically (`jaxsplit.io`); files that already exist (and parse) are never overwritten. The run
folder is locked (`jaxsplit.io.run_lock`) while a search writes it; `restart=True` first moves
an old `modularize/` aside to `modularize.old-<UTC time>/` (never deleted).

Which ensemble is "best": the one with the highest valid fitness
`alpha·acc + (1 - alpha)·diff` over all generations (the quantity that
drives early stopping); the hall of fame is each generation's best ensemble
under the current acc_ratio (docs/method.md §6).
"""

from __future__ import annotations

import datetime
import json
import logging
import math
import os
import shutil
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np

from jaxsplit import checkpoint as ckpt
from jaxsplit import io as jio
from jaxsplit import modularize as modz
from jaxsplit import plots
from jaxsplit.models.convnet import convnet_of
from jaxsplit.modularize import (
    compile_state,
    modularize_init,
    modularize_step,
    trace_graph,
)
from jaxsplit.search.core import (  # noqa: F401  (the pure core; re-exported for callers)
    INIT_STREAM,
    HostEvaluatedStep,
    ResumeError,
    SearchCarry,
    SearchError,
    SearchProblem,
    _strong,
    _to_host,
    build_problem,
    compile_step,
    decode_population,
    final_accuracies,
    generation_key,
    init_carry,
    initial_keys,
    initial_population,
    make_step,
    score_and_update,
    search_step,
)
from jaxsplit.search.evaluate import resolve_backend
from jaxsplit.search.sharding import input_placement

MODULARIZE_DIRNAME = "modularize"
CKPT_DIRNAME = "search_ckpt"
CKPT_PREFIX = "gen_"
KEEP_CHECKPOINTS = 2
FINGERPRINT_EXCLUDED = ("checkpoint_every", "eval_cache_mib")  # cannot change the result
OUTPUT_FILES = ("masks.npz", "history.json", "summary.json")  # the results of a search
CONFIG_FILE = "config.yaml"  # the resolved config a search started with (`--resume` reads it)
TIME_KEYS = ("time_s",)  # history fields that differ between identical runs
MODULES_FILE = "modules.npz"  # the `jaxsplit.Modules` file of the best ensemble
# model families with reference initial-population settings (docs/method.md §5); the search of
# any other model (the BatchNorm zoo) starts from the generic settings (family None)
REFERENCE_FAMILIES = ("simcnn", "rescnn", "weak_cnn")

log = logging.getLogger(__name__)


# -- fingerprint, checkpoints -------------------------------------------------


params_digest = ckpt.params_digest  # SHA-256 of every param leaf's bytes, in path order


def fingerprint(cfg, model_description: Mapping[str, Any], params: Any) -> dict[str, Any]:
    """What a checkpoint must share with the run that resumes it."""
    from jaxsplit import config as jconfig

    search = jconfig.to_dict(cfg.search)
    for key in FINGERPRINT_EXCLUDED:
        search.pop(key, None)
    if search.get("method") == "ga":  # GA fingerprints are as before the gradient searcher existed
        search.pop("method")
        search.pop("gradient", None)
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
                       f"earlier one, or start over with `jaxsplit modularize --restart`")


def _check_fingerprint(path: Path, meta: Mapping[str, Any], current_fp: Mapping[str, Any]) -> None:
    diffs = compare_fingerprints(meta.get("fingerprint", {}), current_fp)
    if diffs:
        raise ResumeError(
            f"refusing to resume from {str(path)!r}: it was made with a different "
            + "; ".join(diffs) + ". Resume with the same config and model (the settings it "
            f"started with are in {MODULARIZE_DIRNAME}/{CONFIG_FILE}), or start over with "
            "`jaxsplit modularize --restart`")


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


def _readable(path: Path) -> bool:
    """Whether an existing result file parses (a file left empty by a full disk does not)."""
    try:
        if path.suffix == ".json":
            json.loads(path.read_text())
        elif path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as f:
                for k in f.files:
                    f[k]
        return True
    except (OSError, ValueError, EOFError) as e:
        log.warning("%s is unreadable (%s); writing it again", path, type(e).__name__)
        return False


def _write_new(path: Path, write: Callable[[Any], None]) -> bool:
    """Write `path` atomically (`jaxsplit.io`) unless a readable one exists. Returns whether it
    was written."""
    if path.exists() and _readable(path):
        return False
    jio.atomic_write_with(path, write)
    return True


def _save_npz(path: Path, arrays: Mapping[str, np.ndarray]) -> bool:
    return _write_new(path, lambda f: np.savez(f, **{k: np.asarray(v) for k, v in arrays.items()}))


def _save_json(path: Path, obj: Any) -> bool:
    text = json.dumps(obj, indent=2) + "\n"
    return _write_new(path, lambda f: f.write(text.encode()))


def _yaml_dump(obj: Any) -> str:
    import yaml

    return yaml.safe_dump(obj, sort_keys=False)


def source_model_record(run_dir: Path, params_sha256: str, train_cfg, classes: np.ndarray,
                        class_names: list[str]) -> dict[str, Any]:
    """Which model a search's modules come from: `summary.json["source_model"]`."""
    from jaxsplit import config as jconfig

    return {"checkpoint": str(ckpt.checkpoint_path(run_dir)), "params_sha256": params_sha256,
            "config": jconfig.to_dict(train_cfg), "class_ids": [int(c) for c in classes],
            "class_names": list(class_names)}


def check_search_memory(num_classes: int, population_size: int, num_images: int,
                        total_kernels: int, available: int | None = None) -> None:
    """Refuse a search whose per-generation arrays cannot fit in memory.

    Each generation holds the logit table `(C, P + 1, N)` float32 and the masks
    `(C, P + 1, K)`, and the fitness works on copies of the table: this counts 3x the table
    plus the masks against half of the machine's physical memory.

    Raises:
      SearchError: naming population_size / num_valid and the sizes.
    """
    rows = num_classes * (population_size + 1)
    need = 3 * rows * num_images * 4 + rows * total_kernels * 4
    if available is None:
        try:
            available = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError, AttributeError):
            return
    if need > available // 2:
        raise SearchError(
            f"search.population_size={population_size:,} with {num_images:,} images "
            f"(search.num_valid) and {num_classes} classes needs about {need / 2**30:,.1f} GiB per "
            f"generation, more than half of this machine's {available / 2**30:,.1f} GiB; lower "
            f"search.population_size or search.num_valid")


def run_modularize(run_dir: str | os.PathLike, cfg, resume: bool = False, *, restart: bool = False,
                   progress: bool = True,
                   data: tuple | None = None, evaluate_fn: Callable | None = None,
                   on_checkpoint: Callable[[int], None] | None = None) -> dict:
    """Search per-class modules of the model trained in `run_dir` (docs/method.md §3-6).

    Args:
      run_dir: a run folder with a trained model (`run_dir/checkpoint`).
      cfg: the run's `Config` (its `data` and `search` sections are used; the
        model comes from the checkpoint).
      resume: continue from the latest checkpoint in `modularize/search_ckpt`
        (starts fresh when there is neither a checkpoint nor a result; results
        without a checkpoint are an error). Without it, an existing search
        checkpoint or result is an error.
      restart: move an existing `modularize/` aside (`modularize.old-<time>/`)
        and search from scratch.
      progress: show a tqdm bar per generation.
      data: `(train, valid, test)` datasets instead of `prepare_data(cfg.data)`.
      evaluate_fn: an `Evaluator` instead of `make_evaluator_from_config`.
      on_checkpoint: called with the number of generations done after each
        checkpoint is written (a test hook).

    Returns:
      the summary dict (also written to `modularize/summary.json`).

    Raises:
      SearchError / ResumeError / CheckpointError with one-line reasons;
      RunLockedError when another process is writing the run folder.
    """
    run_dir = Path(run_dir)
    if resume and restart:
        raise SearchError("--resume continues a search and --restart starts over; pass one of them")
    if not ckpt.checkpoint_path(run_dir).exists():  # before the lock creates the folder
        ckpt.load_model(run_dir)  # raises CheckpointNotFoundError naming how to train one
    with jio.run_lock(run_dir, "jaxsplit modularize"):
        if cfg.search.method == "gradient":  # gradient-trained masks (docs/method.md §10)
            from jaxsplit.search.gradient_driver import run_gradient_modularize

            out_dir = run_dir / MODULARIZE_DIRNAME
            if restart and out_dir.exists():
                log.info("moved the previous search to %s", move_aside(out_dir))
            return run_gradient_modularize(run_dir, cfg, resume, progress=progress, data=data,
                                           on_checkpoint=on_checkpoint)
        return _run_modularize(run_dir, cfg, resume, restart=restart, progress=progress, data=data,
                               evaluate_fn=evaluate_fn, on_checkpoint=on_checkpoint)


def move_aside(out_dir: Path) -> Path:
    """Rename `out_dir` to `<name>.old-<UTC time>` (a numbered suffix if that exists)."""
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    dest = out_dir.with_name(f"{out_dir.name}.old-{stamp}")
    n = 1
    while dest.exists():
        n += 1
        dest = out_dir.with_name(f"{out_dir.name}.old-{stamp}-{n}")
    os.rename(out_dir, dest)
    return dest


def _run_modularize(run_dir: Path, cfg, resume: bool, *, restart: bool, progress: bool,
                    data: tuple | None, evaluate_fn: Callable | None,
                    on_checkpoint: Callable[[int], None] | None) -> dict:
    from jaxsplit import config as jconfig
    from jaxsplit import pipeline

    out_dir = run_dir / MODULARIZE_DIRNAME
    ckpt_root = out_dir / CKPT_DIRNAME
    scfg = cfg.search
    cmd = f"jaxsplit modularize --run {run_dir}"
    existing = [] if restart else list_checkpoints(ckpt_root)
    outputs = [] if restart else [n for n in OUTPUT_FILES if (out_dir / n).exists()]
    if not resume and (existing or outputs):
        held = "search checkpoints" if existing else ", ".join(outputs)
        raise SearchError(
            f"{str(out_dir)!r} already holds a search ({held}); continue it with `{cmd} --resume`, "
            f"or start over with `{cmd} --restart` (moves it to {MODULARIZE_DIRNAME}.old-<time>/)")
    if resume and not existing and outputs:
        raise SearchError(
            f"{str(out_dir)!r} holds results ({', '.join(outputs)}) but no search checkpoint to "
            f"resume from, so --resume would mix a new search with these files; start over with "
            f"`{cmd} --restart` (moves them to {MODULARIZE_DIRNAME}.old-<time>/)")

    loaded = ckpt.load_model(run_dir)
    model, params, train_cfg = loaded.model, loaded.params, loaded.cfg
    apply_fn, variables = loaded.apply_fn, loaded.variables
    model_desc = pipeline.model_description(train_cfg.model, model)
    model_name = train_cfg.model.name
    family = model_name if model_name in REFERENCE_FAMILIES else None
    if data is None:
        _, valid, test = pipeline.prepare_data(cfg.data)
    else:
        _, valid, test = data
    if scfg.num_valid is not None and scfg.num_valid > len(valid):
        raise SearchError(
            f"search.num_valid={scfg.num_valid:,} but the valid split has only {len(valid):,} "
            f"images; lower it, or leave it unset to use all of them")
    num_valid = len(valid) if scfg.num_valid is None else scfg.num_valid
    graph = trace_graph(apply_fn, variables, np.asarray(valid.images[:1], np.float32))
    num_classes = int(graph.num_outputs)
    if valid.num_classes != num_classes:
        raise SearchError(f"the data has {valid.num_classes} classes but the model "
                          f"{num_classes}; use the run's data config")
    check_search_memory(num_classes, scfg.population_size, num_valid, graph.total_kernels)
    images = np.asarray(valid.images[:num_valid], np.float32)
    labels = np.asarray(valid.labels[:num_valid], np.int32)
    classes = np.arange(num_classes, dtype=np.int32)
    class_names = list(valid.class_names) if valid.class_names else [str(c) for c in classes]
    if restart and out_dir.exists():  # only now: a refused restart keeps the old search in place
        log.info("moved the previous search to %s", move_aside(out_dir))
    out_dir.mkdir(parents=True, exist_ok=True)
    fp = fingerprint(cfg, model_desc, params)
    if resume and existing:  # refuse a foreign or corrupt checkpoint before any heavy work
        check_resumable(existing[-1][1], fp)
    else:  # a new search: keep its settings for `--resume`
        jio.atomic_write_text(out_dir / CONFIG_FILE, _yaml_dump(jconfig.to_dict(cfg)))
    if resume:
        remove_stale_temporaries(ckpt_root)
    done_before = existing[-1][0] if (resume and existing) else 0
    convnet = convnet_of(apply_fn)
    backend = scfg.backend
    if backend == "auto":  # what make_evaluator will pick for this model
        backend = resolve_backend(convnet if convnet is not None else graph,
                                  jax.default_backend())
    estimate = pipeline.search_estimate(graph, num_classes, scfg.population_size, num_valid,
                                        scfg.num_generations + 1 - done_before, backend=backend)
    if estimate is not None:
        log.info("%s", estimate)

    # importance, sensitivity, encoding, evaluator, initial population: the library's init
    # (deterministic, so a resumed run recomputes the same values)
    base_key = jax.random.key(scfg.seed)
    state = modularize_init(base_key, apply_fn, variables, (images, labels), search=scfg,
                            graph=graph, family=family,
                            evaluate_fn=evaluate_fn, class_names=class_names, compile=False)
    result, problem, settings = state.importance, state.problem, state.settings
    importance_time = state.timings.get("importance_s")
    _save_npz(out_dir / "importance.npz", {**result.importance,
                                           "__num_confident": result.num_confident,
                                           "__num_images": result.num_images})
    for w in result.warnings:
        warnings.warn(str(w), RuntimeWarning, stacklevel=2)
    if state.sensitivity is not None:
        curves, ratios = state.sensitivity
        _save_npz(out_dir / "sensitivity.npz", {"curves": curves, "ratios": np.asarray(ratios)})
        if not (out_dir / "sensitivity.png").exists():
            plots.plot_sensitivity(curves, ratios, out_dir / "sensitivity.png",
                                     list(state.graph.names))

    compile_time = None
    if resume and existing:
        done, path = existing[-1]
        carry, meta = load_search_checkpoint(path, state.carry, base_key, fp)
        history = list(meta["history"])
        start = int(meta["generations_done"])
        compile_time = meta.get("compile_time_s")
        if len(history) != start:
            raise ResumeError(f"checkpoint {str(path)!r} is inconsistent: {len(history)} history "
                              f"entries for {start} generations")
        log.info("resuming from %s: %d generations done", path.name, start)
        state = state.replace(carry=_strong(carry, input_placement(problem.evaluate_fn)),
                              generation=start, history=tuple(history))

    total = state.num_steps
    if not state.done:
        # a host-side evaluator ("fast") compiles its own pieces per new shape during the first
        # generations; those seconds are in the generation times, not here
        state = compile_state(state)
        compile_time = state.compile_time_s if compile_time is None else compile_time
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=total, initial=state.generation, unit="gen", dynamic_ncols=True,
                       desc=f"modularize {model_name}")
        try:
            while not state.done:
                state, entry = modularize_step(state)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(fit=f"{entry['best_fitness']:.4f}", acc=f"{entry['best_acc']:.4f}",
                                    diff=f"{entry['best_diff']:.4f}",
                                    kept=f"{np.mean(entry['best_kept_fraction']):.2f}")
                done = state.generation
                last = entry["stop"] or done == total
                if done % scfg.checkpoint_every == 0 or last:
                    meta = {"generations_done": done, "history": list(state.history),
                            "fingerprint": fp, "compile_time_s": compile_time,
                            "finished": bool(last)}
                    save_search_checkpoint(ckpt_root, done, state.carry, base_key, meta)
                    if on_checkpoint is not None:
                        on_checkpoint(done)
        finally:
            if bar is not None:
                bar.close()
    carry, history = state.carry, list(state.history)

    # -- outputs -----------------------------------------------------------------------------
    best_bits = np.asarray(carry.best_bits)
    best_masks = modz.best_masks(state)  # {site: (C, K)}
    _save_npz(out_dir / "masks.npz", best_masks)
    modules_path = out_dir / MODULES_FILE
    if not (modules_path.exists() and _readable(modules_path)):
        modz.Modules.from_state(state).save(modules_path)
    accs = final_accuracies(problem, state.variables, best_bits,
                            {"valid": (images, labels), "test": (test.images, test.labels)}, classes)
    valid_acc, model_valid = accs["valid"]["ensemble"], accs["valid"]["model"]
    test_acc, model_test = accs["test"]["ensemble"], accs["test"]["model"]
    from jaxsplit import extract

    per_class = []
    for c in range(num_classes):
        stats = extract.module_stats(graph, {k: v[c] for k, v in best_masks.items()})
        per_class.append({"class": c, "name": class_names[c], **{k: _py(v) for k, v in stats.items()}})

    def mean_of(key: str) -> float | None:
        vals = [p[key] for p in per_class if isinstance(p.get(key), (int, float))]
        return float(np.mean(vals)) if vals else None

    times = [h["time_s"] for h in history]
    summary = {
        "model": model_desc,
        "source_model": source_model_record(run_dir, fp["params"]["sha256"], train_cfg, classes,
                                            class_names),
        "method": "ga", "strategy": scfg.strategy, "population_size": scfg.population_size,
        "num_genes": problem.enc.num_genes, "num_valid_images": int(num_valid),
        "generations_run": len(history), "num_generations": scfg.num_generations,
        "stopped_early": bool(carry.stopped), "best_generation": int(carry.best_generation),
        "best_valid_fitness": float(carry.best_valid_fitness),
        "ensemble_valid_accuracy": valid_acc, "ensemble_test_accuracy": test_acc,
        "ensemble_diff": float(carry.best_diff),
        "model_valid_accuracy": model_valid, "model_test_accuracy": model_test,
        "test_accuracy_loss": model_test - test_acc,
        "mean_kept_fraction": mean_of("kept_fraction"), "mean_params_fraction": mean_of("params_fraction"),
        "mean_macs_fraction": mean_of("macs_fraction"),
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
        plots.plot_search_history(history, out_dir / "curves.png", ensemble_test_accuracy=test_acc,
                                  model_test_accuracy=model_test, model_valid_accuracy=model_valid,
                                  best_generation=int(carry.best_generation))
    _save_json(out_dir / "summary.json", summary)
    log.info("%s", format_summary(summary))
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
