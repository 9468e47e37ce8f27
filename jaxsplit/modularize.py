"""Modularize any traced model in memory: importance -> encoding -> GA -> cooperative fitness.

    modules = jaxsplit.modularize(apply_fn, variables, (images, labels),
                                  search=SearchConfig(population_size=30, num_generations=30),
                                  key=jax.random.key(0))
    logit_fn = modules.apply(3)                 # x -> (N,) class-3 logit of module 3
    module_apply, module_vars = modules.extract(3)   # physically smaller module
    modules.save("modules.npz"); Modules.load("modules.npz", graph)

`apply_fn(variables, x) -> logits (N, C)` is any flax inference apply
(`functools.partial(model.apply, train=False)`), `variables` the full
variables dict, `(images, labels)` the data the fitness and importance are
computed on (docs/method.md §2: the valid split). The kernel graph is
`jaxsplit.trace(apply_fn, variables, images[:1])` unless given.

For users who drive the loop themselves (evosax style):

    state = modularize_init(key, apply_fn, variables, (images, labels), search=cfg)
    while not state.done:
        state, metrics = modularize_step(state)      # or modularize_step(state, key)
    modules = Modules.from_state(state)

`modularize_step(state)` uses the key `generation_key(state.base_key, g)`
of generation g, so a loop without explicit keys equals `modularize()` bit
for bit, and so does the CLI (`search.driver.run_modularize`, which adds run
folders, checkpoints and plots on top of these two functions).

Modules found by the gradient searcher (docs/method.md §10, `search.method=gradient`) carry
per-module MLP heads: `Modules.from_gradient(splitter, result, ...)`; their score for class c
is the head's pre-sigmoid logit on the masked model's logits (see `Modules.apply`).

Everything here is in memory; only `Modules.save` / `Modules.load` touch
disk. The file is one `.npz` of named arrays (`mask/<site>` bool `(C, K)`,
`classes`, and for gradient modules `head/<layer>/<leaf>` float32 with a
leading C axis) plus a JSON header (`__header__`): format version, graph
fingerprint, class ids and names, the source variables' SHA-256, the
searcher (`info["method"]`: "ga" or "gradient") and its settings,
per-module stats and the history. Format version 1 has no heads; a file
with heads is written as version 2, so a jaxsplit that reads only version 1
refuses it rather than scoring its modules without their heads; files
without heads are still written as version 1. It is written atomically
(temporary file + rename); `load` reads versions 1 and 2 and refuses another
format version or a file made for another model (fingerprint mismatch),
naming both values.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
import time
import types
import zipfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxsplit import checkpoint as ckpt
from jaxsplit import importance as imp_lib
from jaxsplit.errors import JaxsplitError
from jaxsplit.models.convnet import ConvNet, ConvSpec, convnet_of
from jaxsplit.search import core
from jaxsplit.search.config import SearchConfig
from jaxsplit.search.evaluate import make_evaluator_from_config, masked_apply_of
from jaxsplit.search.sharding import input_placement

FORMAT = "jaxsplit.modules"
FORMAT_VERSION = 2  # the newest version written: 2 when the modules have heads, else 1
READABLE_VERSIONS = (1, 2)  # 1: masks only; 2: + per-module heads (`head/...` arrays)
HEADER_KEY = "__header__"
MASK_PREFIX = "mask/"
HEAD_PREFIX = "head/"
HEAD_KEY = "module_head"  # where `extract(c)` puts a head in `module_variables`
METHODS = ("ga", "gradient")


class ModularizeError(JaxsplitError, ValueError):
    """Inputs of `modularize` that do not fit together, or a step of a finished search."""


class ModulesFileError(JaxsplitError, ValueError):
    """A modules file that cannot be read for this model (another model, format version)."""


# -- model plumbing ---------------------------------------------------------------------------


def trace_graph(apply_fn: Callable, variables: Mapping, example_x: Any) -> Any:
    """The kernel graph of `apply_fn`: `jaxsplit.trace(apply_fn, variables, example_x)`.

    Without the tracer (an older jaxsplit), a `ConvNet`'s conv spec (same names,
    kernel counts and ties).
    """
    try:
        from jaxsplit.graph import trace
    except ImportError:
        trace = None
    if trace is not None:
        return trace(apply_fn, variables, example_x)
    convnet = convnet_of(apply_fn)
    if convnet is not None:
        return convnet.conv_spec()
    raise ModularizeError("modularizing a model other than a jaxsplit ConvNet needs jaxsplit.trace "
                          "(jaxsplit.graph)")


def graph_fingerprint(graph: Any) -> str:
    """`graph.fingerprint` (a stable digest of the structure), else a digest of the names,
    kernel counts, ties and input shape."""
    fp = getattr(graph, "fingerprint", None)
    if isinstance(fp, str):
        return fp
    doc = {"names": list(graph.names), "num_kernels": dict(graph.num_kernels),
           "ties": [list(t) for t in graph.ties],
           "input_shape": list(getattr(graph, "image_shape", None)
                               or getattr(graph, "input_shape", ()))}
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


def variables_digest(variables: Any) -> str:
    """SHA-256 of every leaf's path, dtype, shape and bytes, in path order."""
    return ckpt.params_digest(variables)


def _generic_extract() -> Any:
    """`jaxsplit.extract` when it has the generic (graph) extractor, else None."""
    from jaxsplit import extract as ext

    return ext if hasattr(ext, "gather") else None


def _module_stats(graph: Any, convnet: ConvNet | None, mask: Mapping[str, np.ndarray]) -> dict:
    """Kept kernels / params / MACs of one module (and fractions of the model)."""
    ext = _generic_extract()
    if ext is not None and not isinstance(graph, ConvSpec):
        return dict(ext.module_stats(graph, mask))
    if convnet is not None:
        from jaxsplit.extract import stats_from_mask

        return dict(stats_from_mask(convnet, mask))
    kept = {n: int(np.asarray(mask[n]).sum()) for n in graph.names}
    total = int(sum(graph.num_kernels.values()))
    return {"kept_kernels": sum(kept.values()), "kernels": total,
            "kept_fraction": sum(kept.values()) / max(total, 1)}


def _py(v: Any) -> Any:
    if isinstance(v, (np.floating, np.integer, np.bool_)):
        return v.item()
    if isinstance(v, np.ndarray):
        return v.tolist()
    if isinstance(v, Mapping):
        return {str(k): _py(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_py(x) for x in v]
    return v


def search_settings(search: SearchConfig) -> dict:
    """The search config as a JSON-able dict."""
    return _py(dataclasses.asdict(search))


# -- the step API -----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class ModularizeState:
    """A search in progress (host object; its `carry` is the jitted loop state).

    Attributes:
      carry: `core.SearchCarry` (strategy state, population, hall of fame,
        fitness state, best ensemble), placed on the evaluator's devices.
      generation: generations done (the next one evaluated is `generation`).
      history: one host dict of metrics per generation done (+ `time_s`).
      base_key: the search's base key (generation g uses `generation_key(base_key, g)`).
      problem: the static `core.SearchProblem` (encoding, strategy, evaluator, fitness).
      settings: the initial population's sensitive layers and ratio lists.
      search: the `SearchConfig`.
      graph: the kernel graph.
      apply_fn, variables: the model (variables placed with the data).
      data: `(images, labels, classes)` device arrays the fitness is computed on.
      class_names: one name per class.
      importance: the `importance.ImportanceResult`.
      measure: where importance was measured ("activation" / "block_output").
      family: the reference family of the initial settings (or None).
      sensitivity: `(curves, ratios)` when `search.sensitivity`, else None.
      step_fn: the compiled (or jitted) step.
      compile_time_s: seconds spent compiling the step (None: not compiled ahead).
      timings: seconds of the init's parts (`importance_s`, `sensitivity_s`).
    """

    carry: core.SearchCarry
    generation: int
    history: tuple[dict, ...]
    base_key: jax.Array
    problem: core.SearchProblem
    settings: dict
    search: SearchConfig
    graph: Any
    apply_fn: Callable
    variables: Any
    data: tuple[jax.Array, jax.Array, jax.Array]
    class_names: tuple[str, ...]
    importance: imp_lib.ImportanceResult
    measure: str
    family: str | None
    sensitivity: tuple[np.ndarray, tuple[float, ...]] | None
    step_fn: Callable
    compile_time_s: float | None = None
    timings: dict = dataclasses.field(default_factory=dict)

    @property
    def num_steps(self) -> int:
        """Generations a full search evaluates: `num_generations + 1` (docs/method.md §5)."""
        return self.search.num_generations + 1

    @property
    def stopped(self) -> bool:
        """Early stopping fired."""
        return bool(self.carry.stopped)

    @property
    def done(self) -> bool:
        """Early-stopped, or all `num_steps` generations evaluated."""
        return self.stopped or self.generation >= self.num_steps

    def replace(self, **changes) -> ModularizeState:
        return dataclasses.replace(self, **changes)


def _placed(state_like: Any, placement: Any) -> Any:
    return core._strong(state_like, placement)


def modularize_init(key: jax.Array | None, apply_fn: Callable, variables: Mapping,
                    data: tuple[Any, Any], *, search: SearchConfig = SearchConfig(),
                    graph: Any = None, family: str | None = None,
                    importance: Mapping[str, np.ndarray] | None = None,
                    measure: str | None = None, evaluate_fn: Callable | None = None,
                    class_names: Sequence[str] | None = None,
                    compile: bool = True) -> ModularizeState:
    """Importance, encoding, evaluator and the initial population of a search.

    Args:
      key: the base key (None: `jax.random.key(search.seed)`, what the CLI uses).
        The initial population uses `core.initial_keys(key)`, generation g
        `core.generation_key(key, g)`.
      apply_fn: `apply_fn(variables, x) -> logits (N, C)`.
      variables: the full variables dict.
      data: `(images (N, ...), labels (N,))`; the first `search.num_valid`
        images are used (all when None).
      search: the search settings.
      graph: the kernel graph (default `trace_graph(apply_fn, variables, images[:1])`).
      family: "simcnn" / "rescnn" / "weak_cnn" for the reference's initial
        settings of that family; None: no sensitive layer, SimCNN's ratios.
      importance: precomputed `{site: (C, K_s)}` (default: `importance.kernel_importance`).
      measure: importance measure ("activation" / "block_output"; default
        `importance.default_measure`).
      evaluate_fn: an `Evaluator` (default `make_evaluator_from_config`: with
        `search.backend="auto"` the "fast" backend on CPU, the tuned one for a
        ConvNet and `search.fast_graph` for any other model; see `search.evaluate`).
      class_names: names of the classes (default "0", "1", ...).
      compile: compile the step ahead of time now (`compile_time_s`); else on first use.

    Returns:
      a `ModularizeState` with `generation == 0`.
    """
    if not isinstance(search, SearchConfig):
        raise ModularizeError(f"search must be a SearchConfig, got {type(search).__name__}")
    if search.method != "ga":
        raise ModularizeError(
            f"modularize_init/modularize_step drive the GA, but search.method={search.method!r}; "
            f"run the gradient searcher with jaxsplit.modularize(..., train_data=...) or drive "
            f"jaxsplit.search.gradient.GradSplitter (init, step, train) yourself")
    if not (isinstance(data, (tuple, list)) and len(data) == 2):
        raise ModularizeError(f"data must be (images, labels), got {type(data).__name__}")
    images, labels = data
    images = np.asarray(images, np.float32)
    labels = np.asarray(labels)
    if images.ndim < 2 or labels.shape != (images.shape[0],):
        raise ModularizeError(f"images {images.shape} and labels {labels.shape} must have the "
                              f"same leading axis N")
    if not np.issubdtype(labels.dtype, np.integer):
        raise ModularizeError(f"labels have dtype {labels.dtype}; expected integers")
    labels = labels.astype(np.int32)
    if search.num_valid is not None:
        images, labels = images[:search.num_valid], labels[:search.num_valid]
    if not isinstance(variables, Mapping) or "params" not in variables:
        raise ModularizeError("variables must be the model's full variables dict {'params': ...}")
    convnet = convnet_of(apply_fn)
    if graph is None:
        graph = trace_graph(apply_fn, variables, images[:1])
    num_classes = int(jax.eval_shape(apply_fn, variables, jnp.asarray(images[:1])).shape[-1])
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ModularizeError(f"labels must lie in [0, {num_classes}) (the model's outputs); got "
                              f"{labels.min()}..{labels.max()}")
    classes = np.arange(num_classes, dtype=np.int32)
    names = tuple(str(n) for n in (class_names if class_names is not None else classes))
    if len(names) != num_classes:
        raise ModularizeError(f"{len(names)} class names for {num_classes} classes")

    measure = imp_lib.default_measure(convnet) if measure is None else measure
    timings = {}
    t0 = time.perf_counter()
    if importance is None:
        result = imp_lib.kernel_importance(apply_fn, variables, images, labels, graph=graph,
                                           measure=measure,
                                           confidence=search.importance_confidence)
    else:
        zeros = np.zeros(num_classes, np.int64)
        result = imp_lib.ImportanceResult({k: np.asarray(v, np.float32) for k, v in importance.items()},
                                          zeros, zeros, (), ())
    timings["importance_s"] = time.perf_counter() - t0
    if evaluate_fn is None:
        evaluate_fn = make_evaluator_from_config(convnet if convnet is not None else graph, search,
                                                 masked_fn=masked_apply_of(graph, apply_fn))
    sensitivity, override = None, None
    if search.sensitivity:
        t0 = time.perf_counter()
        ratios = imp_lib.DEFAULT_RATIOS
        curves = imp_lib.layer_sensitivity(apply_fn, variables, images, labels, result.importance,
                                           ratios, evaluate_fn=evaluate_fn, graph=graph)
        sensitivity = (curves, tuple(ratios))
        override = imp_lib.sensitive_layers(curves, ratios)
        timings["sensitivity_s"] = time.perf_counter() - t0
    problem, settings = core.build_problem(graph, family, result.importance, search,
                                           sensitive_override=override, evaluate_fn=evaluate_fn)
    base_key = jax.random.key(search.seed) if key is None else key
    key_init, key_pop = core.initial_keys(base_key)
    bits0 = core.initial_population(key_pop, problem, search.population_size, settings)
    carry = core.init_carry(key_init, problem, bits0)
    place = input_placement(problem.evaluate_fn)  # a sharded evaluator's mesh, else device 0
    state = ModularizeState(
        carry=_placed(carry, place), generation=0, history=(), base_key=base_key,
        problem=problem, settings=settings, search=search, graph=graph, apply_fn=apply_fn,
        variables=_placed(variables, place),
        data=_placed((images, labels, classes), place), class_names=names, importance=result,
        measure=measure, family=family, sensitivity=sensitivity,
        step_fn=core.make_step(problem), timings=timings)
    return compile_state(state) if compile else state


def compile_state(state: ModularizeState) -> ModularizeState:
    """The state with its step compiled ahead of time (`compile_time_s` set).

    A host-side evaluator ("fast") compiles its own pieces per new shape during
    the first generations; those seconds are in the generation times.
    """
    t0 = time.perf_counter()
    compiled = core.compile_step(state.step_fn, state.carry,
                                 core.generation_key(state.base_key, state.generation),
                                 state.variables, *state.data)
    return state.replace(step_fn=compiled, compile_time_s=time.perf_counter() - t0)


def modularize_step(state: ModularizeState,
                    key: jax.Array | None = None) -> tuple[ModularizeState, dict[str, Any]]:
    """Evaluate generation `state.generation`, score it, tell, ask.

    Args:
      state: from `modularize_init` (or a previous step).
      key: this generation's key (default `core.generation_key(state.base_key, g)`,
        what `modularize()` and the CLI use).

    Returns:
      `(state, metrics)`: metrics is this generation's host dict (also appended
      to `state.history`): `generation`, `best_fitness`, `best_acc`, `best_diff`,
      `best_valid_fitness`, `acc_ratio`, `improved`, `num_stalled`, `stop`,
      `num_final_ensembles`, `mean_kept_fraction` (C,), `best_kept_fraction`
      (C,), `max_score` (C,), `time_s`.

    Raises:
      ModularizeError: the search is done (`state.done`).
    """
    if state.done:
        raise ModularizeError(
            f"the search is done ({state.generation} of {state.num_steps} generations"
            f"{', stopped early' if state.stopped else ''}); build the result with "
            f"Modules.from_state(state)")
    g = state.generation
    key = core.generation_key(state.base_key, g) if key is None else key
    t0 = time.perf_counter()
    place = input_placement(state.problem.evaluate_fn)
    carry, metrics = state.step_fn(_placed(state.carry, place), key, state.variables, *state.data)
    entry = {"generation": g, **core._to_host(metrics)}
    entry["time_s"] = time.perf_counter() - t0
    return state.replace(carry=carry, generation=g + 1, history=state.history + (entry,)), entry


def best_masks(state: ModularizeState) -> dict[str, np.ndarray]:
    """The best ensemble's mask per class `{site: bool (C, K)}` (tied sites equal)."""
    bits = jnp.asarray(np.asarray(state.carry.best_bits))[:, None]
    return {k: np.asarray(v)[:, 0] for k, v in state.problem.decode(bits).items()}


# -- the result -------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class Modules:
    """Per-class modules of a model: binary masks over its kernel graph.

    Attributes:
      masks: `{site: bool (C, K_s)}`, row c = module of class `classes[c]`.
      classes: `(C,)` int class ids.
      class_names: one name per class.
      stats: per-class dicts of kept kernels / params / MACs and fractions.
      history: per-generation metrics of the search (empty when loaded without it).
      graph: the kernel graph the masks are over.
      info: the search's outcome and provenance: `method` (the searcher: "ga"
        or "gradient"), `params_sha256`, `search` (its settings), and for the GA
        best valid fitness, accuracy, diff, best generation, stopped early,
        importance measure, family; for the gradient searcher best epoch,
        best valid accuracy, epochs run.
      apply_fn, variables: the model (None after `load` without them: then
        `apply` / `extract` are unavailable).
      heads: None (GA modules: a module's score is its class logit), or the
        gradient searcher's per-module MLP heads with a leading C axis
        (`{"dense_0": {"kernel": (C, N, H), "bias": (C, H)}, "dense_1":
        {"kernel": (C, H, 1), "bias": (C, 1)}}`, numpy float32).
    """

    masks: dict[str, np.ndarray]
    classes: np.ndarray
    class_names: tuple[str, ...]
    stats: tuple[dict, ...]
    history: tuple[dict, ...]
    graph: Any
    info: dict
    apply_fn: Callable | None = None
    variables: Any = None
    heads: Any = None

    def __post_init__(self):
        if self.heads is not None:
            _check_heads(self.heads, int(np.asarray(self.classes).shape[0]), ModularizeError)

    @property
    def num_classes(self) -> int:
        return int(self.classes.shape[0])

    @property
    def method(self) -> str:
        """The searcher that found the modules: "ga" or "gradient" (files before the field: "ga")."""
        return str(self.info.get("method", "ga"))

    def head(self, c: int) -> dict | None:
        """Class c's head params (no leading C axis), or None for modules without heads."""
        if self.heads is None:
            return None
        r = self._row(c)
        return jax.tree_util.tree_map(lambda a: np.asarray(a)[r], self.heads)

    def _row(self, c: int) -> int:
        hits = np.flatnonzero(self.classes == c)
        if isinstance(c, (bool, np.bool_)) or not isinstance(c, (int, np.integer)) or not hits.size:
            raise ModularizeError(f"no module of class {c!r}; classes are {self.classes.tolist()}")
        return int(hits[0])

    def mask(self, c: int) -> dict[str, np.ndarray]:
        """Class c's mask `{site: bool (K_s,)}`."""
        r = self._row(c)
        return {k: v[r] for k, v in self.masks.items()}

    def _need_model(self, what: str) -> None:
        if self.apply_fn is None or self.variables is None:
            raise ModularizeError(f"Modules.{what} needs the model: Modules.load(path, graph, "
                                  f"apply_fn=..., variables=...)")

    def apply(self, c: int, *, all_logits: bool = False) -> Callable:
        """Class c's module as `fn(x) -> (N,)`, masked with shared weights.

        `fn(x)` is the module's TC score: a logit; sigmoid gives the probability. For
        GA modules (no heads) it is the masked model's class-c logit; for gradient
        modules the pre-sigmoid output of module c's head on the masked model's C
        logits (`gradient.head_logit`). The argmax over classes of the C modules'
        scores is the ensemble's prediction (for gradient modules: the searcher's
        argmax of the sigmoid scores, wherever float32 sigmoids do not round two
        scores to the same value, e.g. both to 1.0 for logits above ~17).

        With `all_logits`, `fn(x) -> (N, C)` (every logit of the masked model, before
        any head).
        """
        self._need_model("apply")
        masked = masked_apply_of(self.graph, self.apply_fn)
        mask = {k: jnp.asarray(v) for k, v in self.mask(c).items()}
        variables, cls = self.variables, int(c)
        if all_logits:
            return jax.jit(lambda x: masked(variables, mask, x))
        head = self.head(c)
        if head is not None:
            from jaxsplit.search.gradient import head_logit

            head = jax.tree_util.tree_map(jnp.asarray, head)
            return jax.jit(lambda x: head_logit(head, masked(variables, mask, x)))
        return jax.jit(lambda x: masked(variables, mask, x)[:, cls])

    def apply_all(self, c: int) -> Callable:
        """`apply(c, all_logits=True)`."""
        return self.apply(c, all_logits=True)

    def extract(self, c: int) -> tuple[Callable, Any]:
        """Class c's module physically extracted: `(module_apply, module_variables)`.

        `module_apply(module_variables, x) -> (N,)` is the module's TC score: a
        logit; sigmoid gives the probability (as `apply(c)`: the class-c logit of
        the extracted model for GA modules; for gradient modules the extracted
        model keeps all C outputs and module c's head, stored in
        `module_variables[HEAD_KEY]`, maps them to its pre-sigmoid logit). Only the
        kept kernels' weights are in `module_variables`; equal to `apply(c)` within
        float32 rounding.
        """
        self._need_model("extract")
        head = self.head(c)
        if head is None:
            return self._extract_model(c, int(c))
        from jaxsplit.search.gradient import head_logit

        inner_apply, inner_vars = self._extract_model(c, None)

        def module_apply(v, x):
            inner = {k: a for k, a in v.items() if k != HEAD_KEY}
            return head_logit(v[HEAD_KEY], inner_apply(inner, x))
        return module_apply, {**inner_vars, HEAD_KEY: jax.tree_util.tree_map(jnp.asarray, head)}

    def _extract_model(self, c: int, target_class: int | None) -> tuple[Callable, Any]:
        """Class c's masked model extracted: `(N,)` logit of `target_class`, or `(N, C)`."""
        from jaxsplit import extract as ext

        mask = self.mask(c)
        generic = _generic_extract()
        if generic is not None and not isinstance(self.graph, ConvSpec):
            return generic.extract(self.graph, self.variables, mask, target_class=target_class)
        convnet = convnet_of(self.apply_fn)
        if convnet is None:
            raise ModularizeError(
                "physical extraction of a model other than a jaxsplit ConvNet needs the generic "
                "extractor (jaxsplit.extract over a traced graph); apply(c) runs the module "
                "masked meanwhile")
        convnet_extract = getattr(ext, "extract_convnet", ext.extract)
        small, small_vars = convnet_extract(convnet, self.variables, mask, target_class=target_class)

        def module_apply(v, x):
            out = small.apply(v, x)
            return out if target_class is None else out[:, 0]
        return module_apply, small_vars

    # -- construction ---------------------------------------------------------------------

    @classmethod
    def from_state(cls, state: ModularizeState, *, stats: bool = True) -> Modules:
        """The best ensemble of a search (`state.carry.best_bits`) as `Modules`."""
        masks = best_masks(state)
        convnet = convnet_of(state.apply_fn)
        classes = np.asarray(state.data[2])
        per_class = tuple(
            {"class": int(c), "name": state.class_names[r],
             **(_py(_module_stats(state.graph, convnet, {k: v[r] for k, v in masks.items()}))
                if stats else {})}
            for r, c in enumerate(classes))
        carry = state.carry
        info = {
            "method": "ga",
            "best_valid_fitness": float(carry.best_valid_fitness),
            "best_acc": float(carry.best_acc), "best_diff": float(carry.best_diff),
            "best_generation": int(carry.best_generation), "stopped_early": bool(carry.stopped),
            "generations_run": int(state.generation), "measure": state.measure,
            "family": state.family, "params_sha256": variables_digest(state.variables),
            "search": search_settings(state.search),
            "init_settings": _py(state.settings),
        }
        return cls(masks=masks, classes=classes, class_names=state.class_names, stats=per_class,
                   history=tuple(state.history), graph=state.graph, info=info,
                   apply_fn=state.apply_fn, variables=state.variables)

    @classmethod
    def from_gradient(cls, splitter: Any, result: Any, apply_fn: Callable, variables: Any, *,
                      graph: Any = None, class_names: Sequence[str] | None = None,
                      history: Sequence[Mapping] = (), search: SearchConfig | None = None,
                      stats: bool = True, info: Mapping[str, Any] | None = None) -> Modules:
        """The gradient searcher's modules (docs/method.md §10) as `Modules`.

        Args:
          splitter: the `search.gradient.GradSplitter` that trained them.
          result: its `GradResult` (`splitter.result(state)`): masks `{site: bool (C, K)}`
            and per-module heads.
          apply_fn, variables: the model.
          graph: the kernel graph the masks are over (default `splitter.sites`; pass the
            traced graph for a ConvNet searched with `for_convnet`).
          class_names: one name per class (default "0", "1", ...).
          history: the per-epoch history of `gradient.train`.
          search: the `SearchConfig` (recorded as `info["search"]`; default: one with
            `method="gradient"` and the splitter's settings).
          stats: compute per-module kept kernels / params / MACs.
          info: more provenance to record (e.g. the training epochs run).

        Returns:
          `Modules` with `heads` (None for `head="none"`: then a module's score is its class
          logit, as for GA modules) and `info["method"] == "gradient"`.
        """
        graph = splitter.sites if graph is None else graph
        if set(graph.names) != set(result.masks):
            raise ModularizeError(f"the result's masks are over sites {sorted(result.masks)}; "
                                  f"the graph has {sorted(graph.names)}")
        masks = {n: np.asarray(result.masks[n], bool) for n in graph.names}
        num = int(splitter.num_classes)
        classes = np.arange(num, dtype=np.int32)
        names = tuple(str(n) for n in (class_names if class_names is not None else classes))
        if len(names) != num:
            raise ModularizeError(f"{len(names)} class names for {num} classes")
        convnet = convnet_of(apply_fn)
        per_class = tuple(
            {"class": int(c), "name": names[c],
             **(_py(_module_stats(graph, convnet, {k: v[c] for k, v in masks.items()}))
                if stats else {})}
            for c in classes)
        heads = None
        if splitter.cfg.head != "none":
            heads = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float32), result.head_params)
        if search is None:
            search = SearchConfig(method="gradient", gradient=splitter.cfg)
        record = {
            "method": "gradient", "gradient": _py(dataclasses.asdict(splitter.cfg)),
            "best_epoch": int(result.best_epoch),
            "best_valid_accuracy": float(result.best_valid_accuracy),
            "epochs_run": len(history), "params_sha256": variables_digest(variables),
            "search": search_settings(search), **_py(dict(info or {})),
        }
        return cls(masks=masks, classes=classes, class_names=names, stats=per_class,
                   history=tuple(_py(list(history))), graph=graph, info=record,
                   apply_fn=apply_fn, variables=variables, heads=heads)

    # -- file -------------------------------------------------------------------------------

    def header(self) -> dict:
        """The JSON header `save` writes."""
        return {"format": FORMAT, "format_version": 1 if self.heads is None else 2,
                "graph_fingerprint": graph_fingerprint(self.graph), "method": self.method,
                "sites": list(self.masks), "class_ids": self.classes.tolist(),
                "class_names": list(self.class_names),
                "params_sha256": self.info.get("params_sha256"),
                "search": self.info.get("search"), "info": _py(self.info),
                "stats": _py(list(self.stats)), "history": _py(list(self.history))}

    def save(self, path: str | os.PathLike) -> Path:
        """Write the modules file atomically (temporary file, then rename over `path`)."""
        path = Path(path)
        arrays = {MASK_PREFIX + k: np.asarray(v, bool) for k, v in self.masks.items()}
        arrays["classes"] = np.asarray(self.classes, np.int32)
        if self.heads is not None:
            arrays.update({HEAD_PREFIX + k: v for k, v in _flat_heads(self.heads).items()})
        arrays[HEADER_KEY] = np.frombuffer(json.dumps(self.header()).encode(), np.uint8)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        try:
            with open(tmp, "wb") as f:
                np.savez(f, **arrays)
            os.replace(tmp, path)
        finally:
            if tmp.exists():
                tmp.unlink()
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, graph: Any, *, apply_fn: Callable | None = None,
             variables: Any = None, check_params: bool = True) -> Modules:
        """Read a modules file for the model whose kernel graph is `graph`.

        Args:
          path: a file written by `save`.
          graph: the model's kernel graph (`jaxsplit.trace`); its fingerprint
            must equal the file's.
          apply_fn, variables: the model, for `apply` / `extract`.
          check_params: refuse `variables` whose SHA-256 differs from the
            file's source variables (the same architecture, other weights).

        Raises:
          ModulesFileError: unreadable, another format or format version, another
            model (graph fingerprint), or other weights; the message names both values.

        Version-1 files (no heads, written before the searcher was recorded) load as
        GA modules (`method == "ga"`, `heads is None`).
        """
        path = Path(path)
        try:
            with np.load(path, allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
        except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
            raise ModulesFileError(f"cannot read modules file {str(path)!r}: "
                                   f"{type(e).__name__}: {e}") from e
        if HEADER_KEY not in arrays:
            raise ModulesFileError(f"{str(path)!r} is not a jaxsplit modules file (no header)")
        header = json.loads(arrays.pop(HEADER_KEY).tobytes().decode())
        if header.get("format") != FORMAT:
            raise ModulesFileError(f"{str(path)!r} has format {header.get('format')!r}; expected "
                                   f"{FORMAT!r}")
        version = header.get("format_version")
        if version not in READABLE_VERSIONS:
            raise ModulesFileError(
                f"{str(path)!r} has format version {version!r}; this jaxsplit reads versions "
                f"{', '.join(map(str, READABLE_VERSIONS))}")
        expected = graph_fingerprint(graph)
        if header.get("graph_fingerprint") != expected:
            raise ModulesFileError(
                f"{str(path)!r} was made for another model: its graph fingerprint is "
                f"{header.get('graph_fingerprint')!r}, this model's is {expected!r}")
        if check_params and variables is not None and header.get("params_sha256"):
            digest = variables_digest(variables)
            if digest != header["params_sha256"]:
                raise ModulesFileError(
                    f"{str(path)!r} was made from other weights: its params SHA-256 is "
                    f"{header['params_sha256']}, these variables' is {digest} (pass "
                    f"check_params=False to load the masks anyway)")
        raw = {k[len(MASK_PREFIX):]: arrays[k] for k in arrays if k.startswith(MASK_PREFIX)}
        missing = [n for n in header["sites"] if n not in raw]
        if missing:
            raise ModulesFileError(f"{str(path)!r} has no masks for sites {missing}")
        masks = {}
        for n in header["sites"]:
            m = raw[n]
            if m.dtype != np.bool_ and not np.isin(m, (0, 1)).all():
                bad = np.unique(m[~np.isin(m, (0, 1))])[:5].tolist()
                raise ModulesFileError(f"{str(path)!r}: the mask of site {n!r} holds values "
                                       f"{bad}; expected booleans (0 or 1)")
            masks[n] = m.astype(bool)
        classes = arrays["classes"].astype(np.int32)
        flat = {k[len(HEAD_PREFIX):]: arrays[k] for k in arrays if k.startswith(HEAD_PREFIX)}
        if flat and version < 2:
            raise ModulesFileError(f"{str(path)!r} has head arrays but format version {version}; "
                                   f"heads need version 2")
        heads = _nested_heads(flat) if flat else None
        if heads is not None:
            _check_heads(heads, int(classes.shape[0]), ModulesFileError, where=f"{str(path)!r}: ")
        info = dict(header["info"])
        info.setdefault("method", "ga")
        return cls(masks=masks, classes=classes,
                   class_names=tuple(header["class_names"]), stats=tuple(header["stats"]),
                   history=tuple(header["history"]), graph=graph, info=info,
                   apply_fn=apply_fn, variables=variables, heads=heads)


def _flat_heads(heads: Mapping[str, Any], prefix: str = "") -> dict[str, np.ndarray]:
    """`{"dense_0": {"kernel": a}}` -> `{"dense_0/kernel": a}` (arrays as they are)."""
    out: dict[str, np.ndarray] = {}
    for k, v in heads.items():
        if "/" in str(k):
            raise ModularizeError(f"head parameter names must not contain '/', got {k!r}")
        if isinstance(v, Mapping):
            out.update(_flat_heads(v, f"{prefix}{k}/"))
        else:
            out[f"{prefix}{k}"] = np.asarray(v)
    return out


def _nested_heads(flat: Mapping[str, np.ndarray]) -> dict:
    out: dict = {}
    for k, v in flat.items():
        node = out
        *parents, leaf = k.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = v
    return out


def _check_heads(heads: Any, num_classes: int, error: type, where: str = "") -> None:
    """Heads must be a dict of arrays, each with a leading axis of one entry per class."""
    if not isinstance(heads, Mapping) or not heads:
        raise error(f"{where}heads must be a non-empty dict of arrays with a leading class axis, "
                    f"got {type(heads).__name__}")
    for k, v in _flat_heads(heads).items():
        if v.ndim < 1 or v.shape[0] != num_classes:
            raise error(f"{where}head array {k!r} has shape {tuple(v.shape)}; expected a leading "
                        f"axis of {num_classes} (one head per class)")


# -- the one call -----------------------------------------------------------------------------


def modularize(apply_fn: Callable, variables: Mapping, data: tuple[Any, Any], *,
               search: SearchConfig = SearchConfig(), key: jax.Array | None = None,
               graph: Any = None, progress: bool = False, **options) -> Modules:
    """Decompose a trained N-class model into N per-class modules (docs/method.md §3-7).

    Args:
      apply_fn: `apply_fn(variables, x) -> logits (N, C)`.
      variables: the full variables dict.
      data: `(images, labels)` the importance and fitness are computed on.
      search: the search settings (`SearchConfig`; reference values by default).
      key: the base key (None: `jax.random.key(search.seed)`).
      graph: the kernel graph (default: traced).
      progress: show a tqdm bar per generation (per epoch for the gradient searcher).
      **options: more `modularize_init` options (`family`, `importance`,
        `measure`, `evaluate_fn`, `class_names`). With `search.method="gradient"`
        (docs/method.md §10): `train_data=(images, labels)`, required, the images
        the masks are trained on (`data` is then the valid split the best epoch
        is chosen on), and `class_names`.

    Returns:
      `Modules` (the GA: the best ensemble over all generations, highest valid
      fitness; the gradient searcher: the best valid epoch's modules with their heads).

    Raises:
      ModularizeError: `search.method="gradient"` without `train_data`, or with GA-only options.
    """
    if search.method == "gradient":
        return _modularize_gradient(apply_fn, variables, data, search=search, key=key, graph=graph,
                                    progress=progress, **options)
    if "train_data" in options:
        raise ModularizeError("train_data is for search.method='gradient'; the GA searches on `data` "
                              "(the valid split) only")
    state = modularize_init(key, apply_fn, variables, data, search=search, graph=graph, **options)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=state.num_steps, unit="gen", dynamic_ncols=True, desc="modularize")
    try:
        while not state.done:
            state, metrics = modularize_step(state)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(fit=f"{metrics['best_fitness']:.4f}",
                                acc=f"{metrics['best_acc']:.4f}")
    finally:
        if bar is not None:
            bar.close()
    return Modules.from_state(state)


def _modularize_gradient(apply_fn: Callable, variables: Mapping, data: tuple[Any, Any], *,
                         search: SearchConfig, key: jax.Array | None, graph: Any, progress: bool,
                         train_data: tuple[Any, Any] | None = None,
                         class_names: Sequence[str] | None = None, **options) -> Modules:
    """`modularize` with the gradient searcher (docs/method.md §10), in memory."""
    from jaxsplit.search import gradient as G

    if train_data is None:
        raise ModularizeError(
            "search.method='gradient' trains the masks on training images: pass "
            "train_data=(images, labels); `data` is the valid split the best epoch is chosen on")
    if options:
        raise ModularizeError(f"option(s) {sorted(options)} are for the GA (search.method='ga'); "
                              f"the gradient searcher takes train_data and class_names")
    train_x, train_y = (np.asarray(a) for a in train_data)
    valid_x, valid_y = (np.asarray(a) for a in data)
    if graph is None:
        graph = trace_graph(apply_fn, variables, np.asarray(valid_x[:1], np.float32))
    splitter = G.GradSplitter.for_model(graph, apply_fn, cfg=search.gradient)  # as the CLI
    state = splitter.init(jax.random.key(search.seed) if key is None else key)
    state, history = G.train(splitter, state, variables,
                             (np.asarray(train_x, np.float32), np.asarray(train_y, np.int32)),
                             (np.asarray(valid_x, np.float32), np.asarray(valid_y, np.int32)),
                             progress=progress)
    result, repairs = splitter.keep_one_per_site(state, splitter.result(state))
    return Modules.from_gradient(splitter, result, apply_fn, variables, graph=graph,
                                 class_names=class_names, history=history, search=search,
                                 info={"repaired_empty_sites": repairs})


class _CallableModule(types.ModuleType):
    """This module, callable: `jaxsplit.modularize(...)` is `modularize(...)`, while
    `import jaxsplit.modularize as m` still gives the module (`m.Modules`, `m.modularize_init`)."""

    def __call__(self, *args, **kwargs) -> Modules:
        return modularize(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
