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

import dataclasses
import datetime
import json
import logging
import math
import os
import shutil
import time
import warnings
from collections.abc import Callable, Mapping
from functools import partial
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxsplit import checkpoint as ckpt
from jaxsplit import io as jio
from jaxsplit import importance as imp_lib
from jaxsplit import masks as masks_lib
from jaxsplit import plots
from jaxsplit.models.convnet import ConvNet
from jaxsplit.search import encoding as enc_lib
from jaxsplit.search import fitness as fit_lib
from jaxsplit.search.evaluate import make_evaluator_from_config
from jaxsplit.search.sharding import input_placement
from jaxsplit.errors import JaxsplitError
from jaxsplit.search.strategies import BinaryStrategy, make_strategy

log = logging.getLogger(__name__)

MODULARIZE_DIRNAME = "modularize"
CKPT_DIRNAME = "search_ckpt"
CKPT_PREFIX = "gen_"
KEEP_CHECKPOINTS = 2
FINGERPRINT_EXCLUDED = ("checkpoint_every", "eval_cache_mib")  # cannot change the result
OUTPUT_FILES = ("masks.npz", "history.json", "summary.json")  # the results of a search
CONFIG_FILE = "config.yaml"  # the resolved config a search started with (`--resume` reads it)
TIME_KEYS = ("time_s",)
INIT_STREAM = 2**31 - 1  # fold_in index of the initial-population keys (generations use 0, 1, ...)  # history fields that differ between identical runs


class SearchError(JaxsplitError, ValueError):
    """A search that cannot start or continue (bad inputs, existing results)."""


class ResumeError(SearchError):
    """A checkpoint that cannot be resumed (different fingerprint, corrupt)."""


# -- the pure core ------------------------------------------------------------


@struct.dataclass
class SearchCarry:
    """Everything the generation loop carries (all arrays; checkpointed as is).

    Attributes:
      state: the strategy's state (leading C axis).
      population: `(C, P, G)` float32 genotypes to evaluate next.
      hof_bits: `(C, G)` bool, the previous generation's best ensemble (hall of fame).
      fitness_state: `fitness.FitnessState` (acc_ratio, early stopping).
      best_bits: `(C, G)` bool, the best-valid-fitness ensemble so far.
      best_acc, best_diff, best_valid_fitness: `()` float32 of that ensemble.
      best_generation: `()` int32, when it was found (-1: none yet).
      stopped: `()` bool, early stopping fired.
    """

    state: Any
    population: jax.Array
    hof_bits: jax.Array
    fitness_state: fit_lib.FitnessState
    best_bits: jax.Array
    best_acc: jax.Array
    best_diff: jax.Array
    best_valid_fitness: jax.Array
    best_generation: jax.Array
    stopped: jax.Array


@dataclasses.dataclass(frozen=True, eq=False)
class SearchProblem:
    """The static pieces of a search (hashable by identity, closed over by `make_step`).

    Attributes:
      enc: the gene encoding.
      strategy: the evosax strategy on `(C, P, G)`.
      evaluate_fn: an `Evaluator` (`search.evaluate`).
      fitness_params: `fitness.FitnessParams` (with the hall-of-fame slot).
      empty_layer: "repair" (force a layer's top group on) or "kernel0" (reference).
    """

    enc: enc_lib.Encoding
    strategy: BinaryStrategy
    evaluate_fn: Callable
    fitness_params: fit_lib.FitnessParams
    empty_layer: str = "repair"

    def phenotype(self, population: jax.Array) -> jax.Array:
        """Bits `(C, P, G)` evaluated for genotypes `population`."""
        bits = self.strategy.to_bits(population)
        return enc_lib.repair(self.enc, bits) if self.empty_layer == "repair" else bits

    def decode(self, bits: jax.Array) -> masks_lib.Mask:
        return enc_lib.decode(self.enc, bits,
                              empty="kernel0" if self.empty_layer == "kernel0" else "none")


def _strong(tree: Any, placement: Any = None) -> Any:
    """Canonical arrays: no weak types, committed to the default device.

    Fresh carries (outputs of jit) and carries restored from a checkpoint then
    have one signature, so the compiled step is reused and its inputs are
    the same bits. `placement` (a device or sharding; default the first
    device) is `sharding.input_placement(evaluate_fn)`: a sharded evaluator
    needs every input of the step replicated over its mesh.
    """
    device = jax.devices()[0] if placement is None else placement

    def fix(x):
        if isinstance(x, (np.ndarray, np.generic, int, float, bool)):
            x = jnp.asarray(x)
        if isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer):
            if getattr(x, "weak_type", False):
                x = jnp.asarray(x, dtype=x.dtype)
            return jax.device_put(x, device)
        return x

    return jax.tree_util.tree_map(fix, tree)


def init_carry(key: jax.Array, problem: SearchProblem, bits: jax.Array) -> SearchCarry:
    """The carry before generation 0 for the initial genomes `bits (C, P, G)`.

    The hall of fame starts as individual 0 of every class (there is no
    previous best ensemble yet; its score column is dropped anyway).
    """
    enc = problem.enc
    if bits.shape[0] != enc.num_classes or bits.shape[-1] != enc.num_genes or bits.ndim != 3:
        raise SearchError(f"initial population has shape {tuple(bits.shape)}; expected "
                          f"(C={enc.num_classes}, P, G={enc.num_genes})")
    return _strong(jax.jit(partial(_init_carry, problem))(key, bits),
                   input_placement(problem.evaluate_fn))


def _init_carry(problem: SearchProblem, key: jax.Array, bits: jax.Array) -> SearchCarry:
    bits = enc_lib.repair(problem.enc, bits) if problem.empty_layer == "repair" else bits
    state = problem.strategy.init(key, bits)
    return SearchCarry(
        state=state, population=problem.strategy.from_bits(bits), hof_bits=bits[:, 0],
        fitness_state=fit_lib.FitnessState.create(problem.fitness_params),
        best_bits=bits[:, 0], best_acc=jnp.asarray(0.0, jnp.float32),
        best_diff=jnp.asarray(0.0, jnp.float32),
        best_valid_fitness=jnp.asarray(-jnp.inf, jnp.float32),
        best_generation=jnp.asarray(-1, jnp.int32), stopped=jnp.asarray(False))


def search_step(problem: SearchProblem, carry: SearchCarry, key: jax.Array, params: Any,
                images: jax.Array, labels: jax.Array,
                classes: jax.Array) -> tuple[SearchCarry, dict[str, jax.Array]]:
    """One generation: evaluate `carry.population`, score, tell, ask (pure).

    `decode_population` -> `problem.evaluate_fn` -> `score_and_update`; the
    two outer parts are pure jnp, the evaluator may be a host-side one (see
    `make_step`).

    Args:
      problem: static pieces.
      carry: the loop state.
      key: this generation's key (`fold_in(base, g)`).
      params: model params; images `(N, H, W, Cin)`; labels `(N,)`; classes `(C,)`.

    Returns:
      `(carry, metrics)`; metrics are scalars or `(C,)` arrays.
    """
    all_bits, masks = decode_population(problem, carry)
    L = problem.evaluate_fn(params, masks, images, classes)
    return score_and_update(problem, carry, key, all_bits, masks, L, labels, classes)


def decode_population(problem: SearchProblem,
                      carry: SearchCarry) -> tuple[jax.Array, masks_lib.Mask]:
    """The evaluated bits `(C, P + 1, G)` (population, then the hall of fame) and their masks
    `{conv: bool[C, P + 1, K]}`."""
    bits = problem.phenotype(carry.population)  # (C, P, G)
    all_bits = jnp.concatenate([bits, carry.hof_bits[:, None]], axis=1)  # (C, P + 1, G)
    return all_bits, problem.decode(all_bits)


def score_and_update(problem: SearchProblem, carry: SearchCarry, key: jax.Array,
                     all_bits: jax.Array, masks: masks_lib.Mask, L: jax.Array, labels: jax.Array,
                     classes: jax.Array) -> tuple[SearchCarry, dict[str, jax.Array]]:
    """Score the logit table `L (C, P + 1, N)`, tell, ask: the rest of `search_step` (pure)."""
    enc = problem.enc
    num_classes = enc.num_classes
    k_fit, k_tell, k_ask = jax.random.split(key, 3)
    bits = all_bits[:, :-1]  # (C, P, G) = problem.phenotype(carry.population)
    told = problem.strategy.from_bits(bits) if problem.strategy.tell_repaired else carry.population
    flat = masks_lib.flatten(masks, enc.spec)
    acc_ratio = carry.fitness_state.acc_ratio
    score, info = fit_lib.cooperative_fitness(k_fit, L, flat, labels, classes, acc_ratio,
                                              problem.fitness_params)
    gen_best = all_bits[jnp.arange(num_classes), info.best_members]  # (C, G)
    fstate, stop = fit_lib.update_fitness_state(carry.fitness_state, info, problem.fitness_params)
    improved = fstate.improved
    state = problem.strategy.tell(k_tell, told, fit_lib.to_minimise(score[:, :-1]), carry.state)
    population, state = problem.strategy.ask(k_ask, state)
    kept = masks_lib.kept_fraction(masks).astype(jnp.float32)  # (C, P + 1)
    best_kept = kept[jnp.arange(num_classes), info.best_members]
    new = carry.replace(
        state=state, population=population.astype(jnp.float32), hof_bits=gen_best,
        fitness_state=fstate,
        best_bits=jnp.where(improved, gen_best, carry.best_bits),
        best_acc=jnp.where(improved, info.best_acc, carry.best_acc).astype(jnp.float32),
        best_diff=jnp.where(improved, info.best_diff, carry.best_diff).astype(jnp.float32),
        best_valid_fitness=jnp.where(improved, info.best_valid_fitness,
                                     carry.best_valid_fitness).astype(jnp.float32),
        best_generation=jnp.where(improved, fstate.generation - 1,
                                  carry.best_generation).astype(jnp.int32),
        stopped=stop)
    metrics = {
        "best_fitness": info.best_fitness, "best_acc": info.best_acc, "best_diff": info.best_diff,
        "best_valid_fitness": info.best_valid_fitness, "acc_ratio": acc_ratio,
        "improved": improved, "num_stalled": fstate.num_stalled, "stop": stop,
        "num_final_ensembles": jnp.sum(info.final_valid, dtype=jnp.int32),
        "mean_kept_fraction": kept[:, :-1].mean(axis=1), "best_kept_fraction": best_kept,
        "max_score": score[:, :-1].max(axis=1),
    }
    return new, metrics


class HostEvaluatedStep:
    """`search_step` for an evaluator that runs outside `jit` (`evaluate_fn.host_side`).

    The "fast" evaluator plans its modules on the host from the mask values
    (bucketed shapes), so it cannot be traced inside the step's `jit`:
    here `jit(decode_population)` -> `evaluate_fn` (its own jitted pieces)
    -> `jit(score_and_update)`. Same values and the same determinism as the
    single jitted step; call it as `step(carry, key, params, images, labels,
    classes)`.
    """

    def __init__(self, problem: SearchProblem, decode_fn: Callable | None = None,
                 score_fn: Callable | None = None):
        self.problem = problem
        self._decode = decode_fn or jax.jit(partial(decode_population, problem))
        self._score = score_fn or jax.jit(partial(score_and_update, problem))

    def __call__(self, carry, key, params, images, labels, classes):
        all_bits, masks = self._decode(carry)
        L = self.problem.evaluate_fn(params, masks, images, classes)
        return self._score(carry, key, all_bits, masks, L, labels, classes)

    def compile(self, carry, key, params, images, labels, classes) -> HostEvaluatedStep:
        """Ahead-of-time compiled decode and score parts for these argument shapes (the
        evaluator compiles its own pieces when it first meets a shape)."""
        del params  # the evaluator's business
        decode = self._decode.lower(carry).compile()
        all_bits, masks = jax.eval_shape(self._decode, carry)
        L = jax.ShapeDtypeStruct((*all_bits.shape[:2], images.shape[0]), jnp.float32)
        score = self._score.lower(carry, key, all_bits, masks, L, labels, classes).compile()
        return HostEvaluatedStep(self.problem, decode, score)


def make_step(problem: SearchProblem) -> Callable:
    """`step(carry, key, params, images, labels, classes)` for `problem`.

    `jit(search_step)`, or a `HostEvaluatedStep` when the evaluator must run
    outside `jit` (`problem.evaluate_fn.host_side`, e.g. the "fast" backend).
    """
    if getattr(problem.evaluate_fn, "host_side", False):
        return HostEvaluatedStep(problem)
    return jax.jit(lambda carry, key, params, images, labels, classes: search_step(
        problem, carry, key, params, images, labels, classes))


def compile_step(step: Callable, carry, key, params, images, labels, classes) -> Callable:
    """`make_step`'s result compiled ahead of time for these arguments."""
    if isinstance(step, HostEvaluatedStep):
        return step.compile(carry, key, params, images, labels, classes)
    return step.lower(carry, key, params, images, labels, classes).compile()


def generation_key(base_key: jax.Array, generation: int) -> jax.Array:
    """The key of generation g: `fold_in(base_key, g)` (never Python RNG state)."""
    return jax.random.fold_in(base_key, generation)


# -- problem construction -----------------------------------------------------


def build_problem(model: ConvNet, model_name: str, importance: Mapping[str, np.ndarray], search_cfg,
                  *, sensitive_override: tuple[int, ...] | None = None,
                  evaluate_fn: Callable | None = None) -> tuple[SearchProblem, dict]:
    """Encoding, strategy, evaluator and fitness params for a search config.

    Returns:
      `(problem, init_settings)`; `init_settings` are the sensitive layers and
      ratio lists of the heuristic initial population.
    """
    spec = model.conv_spec()
    enc = enc_lib.encoding_from_config(spec, importance, search_cfg)
    strategy = make_strategy(search_cfg.strategy, search_cfg.population_size, enc.num_genes,
                             search_cfg, num_classes=enc.num_classes, mutation=search_cfg.mutation)
    if evaluate_fn is None:
        evaluate_fn = make_evaluator_from_config(model, search_cfg)
    fparams = fit_lib.FitnessParams.from_config(search_cfg, has_hall_of_fame=True)
    settings = enc_lib.reference_init_settings(model_name, search_cfg)
    if sensitive_override is not None and search_cfg.sensitive_layers is None:
        settings["sensitive"] = tuple(sensitive_override)
    return SearchProblem(enc, strategy, evaluate_fn, fparams, search_cfg.empty_layer), settings


def initial_population(key: jax.Array, problem: SearchProblem, population_size: int,
                       settings: Mapping[str, Any]) -> jax.Array:
    """Heuristic initial genomes `(C, P, G)` bool (docs/method.md §4)."""
    return enc_lib.init_population(key, problem.enc, population_size, settings["sensitive"],
                                   settings["ratios_sensitive"], settings["ratios_other"],
                                   settings["temperature"])


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


def _to_host(metrics: Mapping[str, Any]) -> dict[str, Any]:
    out = {}
    for k, v in jax.device_get(dict(metrics)).items():
        a = np.asarray(v)
        if a.dtype == bool:
            out[k] = a.tolist()
        elif np.issubdtype(a.dtype, np.integer):
            out[k] = a.astype(int).tolist()
        else:
            out[k] = a.astype(float).tolist()
    return out


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
        print(f"warning: {path} is unreadable ({type(e).__name__}); writing it again")
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


def final_accuracies(problem: SearchProblem, params, bits: jax.Array,
                     splits: Mapping[str, tuple[np.ndarray, np.ndarray]],
                     classes: np.ndarray) -> dict[str, dict[str, float]]:
    """Accuracy of the module ensemble `bits (C, G)` and of the model on each split.

    One evaluator call on all splits' images with two "individuals" per
    class: the ensemble member and the full mask (the model itself: its
    argmax over the class rows is the model's prediction).

    Returns:
      `{split: {"ensemble": acc, "model": acc}}`.
    """
    spec = problem.enc.spec
    member = problem.decode(jnp.asarray(bits)[:, None])  # (C, 1, K)
    full = masks_lib.full(spec, (problem.enc.num_classes, 1))
    masks = {k: jnp.concatenate([member[k], full[k]], axis=1) for k in spec.names}
    names = list(splits)
    images = np.concatenate([np.asarray(splits[n][0], np.float32) for n in names])
    L = np.asarray(problem.evaluate_fn(params, masks, jnp.asarray(images),
                                       jnp.asarray(classes, jnp.int32)))
    out, start = {}, 0
    for n in names:
        x, y = splits[n]
        stop = start + len(y)
        acc = imp_lib.ensemble_accuracy(L[:, :, start:stop], np.asarray(y), classes)
        out[n] = {"ensemble": float(acc[0]), "model": float(acc[1])}
        start = stop
    return out


# -- the driver ---------------------------------------------------------------


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
                move_aside(out_dir)
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
    if scfg.num_valid is not None and scfg.num_valid > len(valid):
        raise SearchError(
            f"search.num_valid={scfg.num_valid:,} but the valid split has only {len(valid):,} "
            f"images; lower it, or leave it unset to use all of them")
    num_valid = len(valid) if scfg.num_valid is None else scfg.num_valid
    check_search_memory(model.num_classes, scfg.population_size, num_valid,
                        model.conv_spec().total_kernels)
    images = np.asarray(valid.images[:num_valid], np.float32)
    labels = np.asarray(valid.labels[:num_valid], np.int32)
    classes = np.arange(model.num_classes, dtype=np.int32)
    class_names = list(valid.class_names) if valid.class_names else [str(c) for c in classes]
    if restart and out_dir.exists():  # only now: a refused restart keeps the old search in place
        print(f"moved the previous search to {move_aside(out_dir)}")
    out_dir.mkdir(parents=True, exist_ok=True)
    fp = fingerprint(cfg, model_desc, params)
    if resume and existing:  # refuse a foreign or corrupt checkpoint before any heavy work
        check_resumable(existing[-1][1], fp)
    else:  # a new search: keep its settings for `--resume`
        jio.atomic_write_text(out_dir / CONFIG_FILE, _yaml_dump(jconfig.to_dict(cfg)))
    if resume:
        remove_stale_temporaries(ckpt_root)
    done_before = existing[-1][0] if (resume and existing) else 0
    estimate = pipeline.search_estimate(model, model.num_classes, scfg.population_size, num_valid,
                                        scfg.num_generations + 1 - done_before,
                                        backend=scfg.backend)
    if estimate is not None:
        print(estimate)

    # importance (deterministic; reuse the saved one on resume)
    imp_path = out_dir / "importance.npz"
    t0 = time.perf_counter()
    result = imp_lib.kernel_importance(model, params, images, labels,
                                       confidence=scfg.importance_confidence)
    importance = result.importance
    _save_npz(imp_path, {**importance, "__num_confident": result.num_confident,
                         "__num_images": result.num_images})
    for w in result.warnings:
        warnings.warn(str(w), RuntimeWarning, stacklevel=2)
    importance_time = time.perf_counter() - t0

    evaluate_fn = evaluate_fn or make_evaluator_from_config(model, scfg)
    sensitive_override = None
    if scfg.sensitivity:
        ratios = imp_lib.DEFAULT_RATIOS
        curves = imp_lib.layer_sensitivity(model, params, images, labels, importance, ratios,
                                           evaluate_fn=evaluate_fn)
        _save_npz(out_dir / "sensitivity.npz", {"curves": curves, "ratios": np.asarray(ratios)})
        if not (out_dir / "sensitivity.png").exists():
            plots.plot_sensitivity(curves, ratios, out_dir / "sensitivity.png",
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
        log.info("resuming from %s: %d generations done", path.name, start)
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
    from jaxsplit import extract

    per_class = []
    for c in range(model.num_classes):
        stats = extract.stats_from_mask(model, {k: v[c] for k, v in best_masks.items()})
        per_class.append({"class": c, "name": class_names[c], **{k: _py(v) for k, v in stats.items()}})

    def mean_of(key: str) -> float | None:
        vals = [p[key] for p in per_class if isinstance(p.get(key), (int, float))]
        return float(np.mean(vals)) if vals else None

    times = [h["time_s"] for h in history]
    summary = {
        "model": model_desc,
        "source_model": source_model_record(run_dir, fp["params"]["sha256"], train_cfg, classes,
                                            class_names),
        "strategy": scfg.strategy, "population_size": scfg.population_size,
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
