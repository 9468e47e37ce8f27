"""The pure core of the modularization search (docs/method.md §4-6).

`search_step(problem, carry, key, variables, images, labels, classes)`:
decode the population (plus the hall-of-fame ensemble as individual P of
every class), evaluate the logit table, score it with the cooperative
fitness, tell the strategy, ask the next population. `make_step(problem)`
jit-compiles it once (or, for a host-side evaluator such as the "fast"
backend, jit-compiles the parts before and after the evaluator).

Everything here is model-agnostic: the problem holds the kernel graph
(through its encoding) and an `Evaluator`; the library entry point
(`jaxsplit.modularize`) and the CLI driver (`search.driver`, the I/O edge)
both run their generations through these functions.

Generations: generation g evaluates population g (population 0 is the
heuristic initial one) and produces population g+1. As in the reference's
`GA.run` (which evaluates the final population after its last update), a
search of `num_generations` evaluates generations 0..num_generations, i.e.
`num_generations + 1` populations, unless early stopping ends it first.
Generation g uses the key `generation_key(base_key, g)` and the initial
population `initial_keys(base_key)`, never Python state.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxsplit import importance as imp_lib
from jaxsplit.errors import JaxsplitError
from jaxsplit import masks as masks_lib
from jaxsplit.models.convnet import ConvNet
from jaxsplit.search import encoding as enc_lib
from jaxsplit.search import fitness as fit_lib
from jaxsplit.search.evaluate import make_evaluator_from_config
from jaxsplit.search.sharding import input_placement
from jaxsplit.search.strategies import BinaryStrategy, make_strategy

INIT_STREAM = 2**31 - 1  # fold_in index of the initial-population keys (generations use 0, 1, ...)


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


def search_step(problem: SearchProblem, carry: SearchCarry, key: jax.Array, variables: Any,
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
      variables: the model's full variables dict; images `(N, ...)`; labels `(N,)`;
        classes `(C,)`.

    Returns:
      `(carry, metrics)`; metrics are scalars or `(C,)` arrays.
    """
    all_bits, masks = decode_population(problem, carry)
    L = problem.evaluate_fn(variables, masks, images, classes)
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
    single jitted step; call it as `step(carry, key, variables, images,
    labels, classes)`.
    """

    def __init__(self, problem: SearchProblem, decode_fn: Callable | None = None,
                 score_fn: Callable | None = None):
        self.problem = problem
        self._decode = decode_fn or jax.jit(partial(decode_population, problem))
        self._score = score_fn or jax.jit(partial(score_and_update, problem))

    def __call__(self, carry, key, variables, images, labels, classes):
        all_bits, masks = self._decode(carry)
        L = self.problem.evaluate_fn(variables, masks, images, classes)
        return self._score(carry, key, all_bits, masks, L, labels, classes)

    def compile(self, carry, key, variables, images, labels, classes) -> HostEvaluatedStep:
        """Ahead-of-time compiled decode and score parts for these argument shapes (the
        evaluator compiles its own pieces when it first meets a shape)."""
        del variables  # the evaluator's business
        decode = self._decode.lower(carry).compile()
        all_bits, masks = jax.eval_shape(self._decode, carry)
        L = jax.ShapeDtypeStruct((*all_bits.shape[:2], images.shape[0]), jnp.float32)
        score = self._score.lower(carry, key, all_bits, masks, L, labels, classes).compile()
        return HostEvaluatedStep(self.problem, decode, score)


def make_step(problem: SearchProblem) -> Callable:
    """`step(carry, key, variables, images, labels, classes)` for `problem`.

    `jit(search_step)`, or a `HostEvaluatedStep` when the evaluator must run
    outside `jit` (`problem.evaluate_fn.host_side`, e.g. the "fast" backend).
    """
    if getattr(problem.evaluate_fn, "host_side", False):
        return HostEvaluatedStep(problem)
    return jax.jit(lambda carry, key, variables, images, labels, classes: search_step(
        problem, carry, key, variables, images, labels, classes))


def compile_step(step: Callable, carry, key, variables, images, labels, classes) -> Callable:
    """`make_step`'s result compiled ahead of time for these arguments."""
    if isinstance(step, HostEvaluatedStep):
        return step.compile(carry, key, variables, images, labels, classes)
    return step.lower(carry, key, variables, images, labels, classes).compile()


def generation_key(base_key: jax.Array, generation: int) -> jax.Array:
    """The key of generation g: `fold_in(base_key, g)` (never Python RNG state)."""
    return jax.random.fold_in(base_key, generation)


# -- problem construction -----------------------------------------------------


def build_problem(model: Any, family: str | None, importance: Mapping[str, np.ndarray],
                  search_cfg, *, sensitive_override: tuple[int, ...] | None = None,
                  evaluate_fn: Callable | None = None) -> tuple[SearchProblem, dict]:
    """Encoding, strategy, evaluator and fitness params for a search config.

    Args:
      model: a `ConvNet`, or the kernel graph of any traced model (then
        `evaluate_fn` is required).
      family: "simcnn", "rescnn", "weak_cnn" or None (another model): picks the
        reference's sensitive layers and initial ratios
        (`encoding.reference_init_settings`; unknown families use SimCNN's
        ratios and no sensitive layer).
      importance: `{site: (C, K_s)}`.
      search_cfg: a `SearchConfig`.
      sensitive_override: sensitive layers from a sensitivity analysis (used
        when the config sets none).
      evaluate_fn: an `Evaluator` (default for a ConvNet:
        `make_evaluator_from_config(model, search_cfg)`).

    Returns:
      `(problem, init_settings)`; `init_settings` are the sensitive layers and
      ratio lists of the heuristic initial population.
    """
    spec = model.conv_spec() if isinstance(model, ConvNet) else model
    enc = enc_lib.encoding_from_config(spec, importance, search_cfg)
    strategy = make_strategy(search_cfg.strategy, search_cfg.population_size, enc.num_genes,
                             search_cfg, num_classes=enc.num_classes, mutation=search_cfg.mutation)
    if evaluate_fn is None:
        if not isinstance(model, ConvNet):
            raise SearchError("build_problem of a graph needs evaluate_fn (search.evaluate."
                              "make_evaluator(graph, masked_fn=...))")
        evaluate_fn = make_evaluator_from_config(model, search_cfg)
    fparams = fit_lib.FitnessParams.from_config(search_cfg, has_hall_of_fame=True)
    settings = enc_lib.reference_init_settings(family or "", search_cfg)
    if sensitive_override is not None and search_cfg.sensitive_layers is None:
        settings["sensitive"] = tuple(sensitive_override)
    return SearchProblem(enc, strategy, evaluate_fn, fparams, search_cfg.empty_layer), settings


def initial_population(key: jax.Array, problem: SearchProblem, population_size: int,
                       settings: Mapping[str, Any]) -> jax.Array:
    """Heuristic initial genomes `(C, P, G)` bool (docs/method.md §4)."""
    return enc_lib.init_population(key, problem.enc, population_size, settings["sensitive"],
                                   settings["ratios_sensitive"], settings["ratios_other"],
                                   settings["temperature"])




def initial_keys(base_key: jax.Array) -> tuple[jax.Array, jax.Array]:
    """`(key_init, key_population)`: the strategy-init and initial-population keys of a search
    with base key `base_key` (the stream `fold_in(base_key, INIT_STREAM)`)."""
    key_init, key_pop = jax.random.split(jax.random.fold_in(base_key, INIT_STREAM))
    return key_init, key_pop


def final_accuracies(problem: SearchProblem, variables, bits: jax.Array,
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
    L = np.asarray(problem.evaluate_fn(variables, masks, jnp.asarray(images),
                                       jnp.asarray(classes, jnp.int32)))
    out, start = {}, 0
    for n in names:
        x, y = splits[n]
        stop = start + len(y)
        acc = imp_lib.ensemble_accuracy(L[:, :, start:stop], np.asarray(y), classes)
        out[n] = {"ensemble": float(acc[0]), "model": float(acc[1])}
        start = stop
    return out


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
