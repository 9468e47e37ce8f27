"""Kernel importance and layer sensitivity (docs/method.md §3).

Importance of kernel k of conv layer l for class c: the mean, over the valid
images of class c that the model classifies as c with softmax confidence
>= `confidence` (reference 0.9), of the spatial sum of k's post-ReLU feature
map (the reference's "L1 of the feature map"; post-ReLU values are >= 0, so
the sum is the L1 norm).

Any model: `kernel_importance(apply_fn, variables, images, labels, graph=graph)`
reads every kernel site's map from the traced computation (`site_maps`: the
model's jaxpr re-evaluated with a tap at each site; the model is not
changed). Where the map is measured (`measure`, see `MEASURES`):

* "activation": the site's map after its first nonlinearity (before any
  pooling): the output of the first nonlinear primitive (the `max` of a
  ReLU, a `tanh`, ...) and of the elementwise ops of that same map that
  follow it (GELU is `x * 0.5 * (1 + tanh(...))`, SiLU `x * sigmoid(x)`),
  up to the first op that is not elementwise or mixes in another site's map
  (a pool, a consumer, a residual add). A site that reaches a consumer
  before any nonlinearity is measured at that consumer's input. The
  reference's SimCNN rule.
* "block_output": the map right before its consumers (the next conv, a
  Dense layer, a flatten): after the pool and after a residual add. When
  several maps of a site reach consumers, the last in forward order counts
  (for a residual pair that is the map after the add, one array shared by
  all members of the tie group). The reference's ResCNN rule (docs/method.md §3).

Default (`default_measure`): "block_output" for a `ConvNet` with residual
adds (the ResCNN family), "activation" for every other model (SimCNN, weak
CNNs, any traced model).

All classes and layers are computed in ONE jit-compiled pass over the images:
a `lax.scan` over fixed-size batches (the last one padded and masked), which
accumulates per-class sums and counts with one-hot matmuls. No Python loop
over images, one compilation per (batch size, image shape).

Fallback (not in the reference, which would divide by zero): a class with no
confident image uses the mean over ALL its images, and the result says so in
`ImportanceResult.fallback_classes` / `warnings`. A class with no image at all
gets zero importance (every kernel ties; the stable ranking then keeps the
kernel order) and a warning.

Layer sensitivity (docs/method.md §3): for each conv layer l and ratio r, every class
module keeps only the top `max(1, floor(r * K_l))` kernels of layer l by its
own importance ranking (all other layers full; the tied partners of a
residual layer get the same kernels, as the reference copies them), and the
module ensemble's accuracy is measured (argmax over classes of each class
module's own logit).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxsplit.errors import JaxsplitError
from jaxsplit.models.convnet import ConvNet, ConvSpec, convnet_of

DEFAULT_RATIOS: tuple[float, ...] = tuple(i / 10 for i in range(1, 11))
MEASURES = ("activation", "block_output")
Measure = Literal["activation", "block_output"]


class ImportanceError(JaxsplitError, ValueError):
    """Inputs of the importance / sensitivity analysis that do not fit together."""


class ImportanceResult(NamedTuple):
    """Kernel importance of every (class, conv layer).

    Attributes:
      importance: `{conv_name: (C, K_l) float32}`.
      num_confident: `(C,)` int, images of each class used (confident and correct).
      num_images: `(C,)` int, images of each class seen.
      fallback_classes: classes with no confident image (mean over all their images).
      warnings: human-readable notes (fallbacks, classes with no image).
    """

    importance: dict[str, np.ndarray]
    num_confident: np.ndarray
    num_images: np.ndarray
    fallback_classes: tuple[int, ...]
    warnings: tuple[str, ...]


# -- site maps read from the traced computation ----------------------------------------------

# primitives whose sub-jaxpr is evaluated inline (their value is the sub-jaxpr's)
_CALLS = ("pjit", "jit", "closed_call", "core_call", "custom_jvp_call", "custom_vjp_call",
          "custom_vjp_call_jaxpr", "remat", "checkpoint")
_SUB_KEYS = ("jaxpr", "call_jaxpr", "fun_jaxpr")
# elementwise maps of a site's channels (bias, norm affine, residual add, casts)
_ELEMENTWISE = ("add", "add_any", "sub", "mul", "div", "neg", "convert_element_type", "copy",
                "copy_p", "integer_pow", "square", "select_n", "clamp", "stop_gradient")
_NONLINEAR = ("max", "tanh", "logistic", "exp", "erf", "log1p", "expm1", "sin", "cos", "abs",
              "sign", "min")
_POOLS = ("reduce_window_max", "reduce_window_sum", "reduce_window_min", "reduce_window")


def _kernel_path(graph: Any, name: str) -> tuple[str, ...]:
    site = graph.layer(name)
    path = getattr(site, "kernel_path", None)
    return tuple(path) if path is not None else ("params", *name.split("/"), "kernel")


def _key_name(k: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def _sub_jaxpr(eqn) -> tuple[Any, Sequence] | None:
    if eqn.primitive.name not in _CALLS:
        return None
    for k in _SUB_KEYS:
        sub = eqn.params.get(k)
        if sub is None:
            continue
        if hasattr(sub, "jaxpr") and hasattr(sub, "consts"):  # ClosedJaxpr
            return sub.jaxpr, sub.consts
        if hasattr(sub, "eqns"):  # Jaxpr
            return sub, ()
    return None


class _Taps:
    """What the tapped evaluation records: per site, the spatial sums `(N, K)` of its map."""

    def __init__(self, graph: Any, measure: str):
        self.graph = graph
        self.measure = measure
        self.activation: dict[str, jax.Array] = {}
        self.block_output: dict[str, jax.Array] = {}

    def _sums(self, site: str, value: jax.Array) -> jax.Array:
        k = self.graph.num_kernels[site]
        if value.ndim < 2 or value.shape[-1] != k:
            raise ImportanceError(
                f"site {site}: its map has shape {tuple(value.shape)}; expected the channel axis "
                f"last with {k} channels (N, ..., {k})")
        return value.astype(jnp.float32).sum(axis=tuple(range(1, value.ndim - 1)))

    def nonlinearity(self, sites, value, update: bool = False) -> None:
        """The first nonlinearity of `sites` (`update`: a later op of its elementwise tail)."""
        for s in sites:
            if update or s not in self.activation:
                self.activation[s] = self._sums(s, value)

    def consumed(self, sites, value) -> None:
        self.nonlinearity(sites, value)  # no nonlinearity before the consumer: measured here
        if self.measure == "block_output":
            for s in sites:
                self.block_output[s] = self._sums(s, value)

    def result(self) -> dict[str, jax.Array]:
        found = self.activation if self.measure == "activation" else self.block_output
        missing = [n for n in self.graph.names if n not in found]
        if missing:
            raise ImportanceError(
                f"no {self.measure!r} map found for sites {missing} in the traced computation "
                f"(expected each site's map to reach a nonlinearity or a consumer)")
        return {n: found[n] for n in self.graph.names}


def _rule(taps: _Taps, eqn, ins, tags, outs) -> list:
    """Tags of `eqn`'s outputs; records the site maps it sees.

    A tag is `("kernel", site)` or `("map", sites, stage)`; stage "pre" (before
    the first nonlinearity), "open" (the first nonlinearity and the elementwise
    tail that finishes it, e.g. GELU's `x * 0.5 * (1 + tanh(...))`: the
    activation is the tail's last value) or "act" (after it).
    """
    name = eqn.primitive.name
    none = [None] * len(outs)
    maps = [t for t in tags if t is not None and t[0] == "map"]
    if name == "conv_general_dilated":
        if tags[0] is not None and tags[0][0] == "map":
            taps.consumed(tags[0][1], ins[0])
        if tags[1] is not None and tags[1][0] == "kernel":
            return [("map", (tags[1][1],), "pre")]
        return none
    kernels = [t for t in tags if t is not None and t[0] == "kernel"]
    if kernels and name in ("convert_element_type", "copy", "copy_p") and len(outs) == 1:
        return [kernels[0]]
    if not maps:
        return none
    sites = tuple(dict.fromkeys(s for t in maps for s in t[1]))
    stages = {t[2] for t in maps}
    one_chain = len({t[1] for t in maps}) == 1  # every labelled operand carries the same sites
    out = outs[0]
    k = taps.graph.num_kernels[sites[0]]
    keeps_channels = len(outs) == 1 and getattr(out, "ndim", 0) >= 2 and out.shape[-1] == k
    if keeps_channels and one_chain and (name in _NONLINEAR or name in _ELEMENTWISE) \
            and "act" not in stages and (name in _NONLINEAR or "open" in stages):
        taps.nonlinearity(sites, out, update="open" in stages)
        return [("map", sites, "open")]
    closed = "pre" if "pre" in stages else "act"
    if name in _ELEMENTWISE and keeps_channels:
        return [("map", sites, closed)]
    if (name in _POOLS or name == "reshape") and keeps_channels and out.ndim == ins[0].ndim:
        return [("map", sites, closed)]
    # anything else (dot_general, a flatten, a global reduction, ...) consumes the map
    for t in maps:
        taps.consumed(t[1], ins[tags.index(t)])
    return none


def _run_tapped(taps: _Taps, jaxpr, consts, args, tags) -> tuple[list, list]:
    from jax.extend.core import Literal

    env, tag = {}, {}

    def read(v):
        return v.val if isinstance(v, Literal) else env[v]

    for v, c in zip(jaxpr.constvars, consts):
        env[v] = c
    for v, a, t in zip(jaxpr.invars, args, tags):
        env[v] = a
        tag[v] = t
    for eqn in jaxpr.eqns:
        ins = [read(v) for v in eqn.invars]
        tin = [None if isinstance(v, Literal) else tag.get(v) for v in eqn.invars]
        sub = _sub_jaxpr(eqn)
        if sub is not None:
            outs, touts = _run_tapped(taps, sub[0], sub[1], ins, tin)
        else:
            outs = eqn.primitive.bind(*ins, **eqn.params)
            outs = list(outs) if eqn.primitive.multiple_results else [outs]
            touts = _rule(taps, eqn, ins, tin, outs) if any(t is not None for t in tin) else \
                [None] * len(outs)
        for v, o, t in zip(eqn.outvars, outs, touts):
            env[v] = o
            tag[v] = t
    return ([read(v) for v in jaxpr.outvars],
            [None if isinstance(v, Literal) else tag.get(v) for v in jaxpr.outvars])


def site_maps(graph: Any, apply_fn: Callable, variables: Mapping, x: jax.Array, *,
              measure: Measure = "activation") -> tuple[jax.Array, dict[str, jax.Array]]:
    """Logits and every site's spatially-summed map, read from the traced computation.

    The model's jaxpr (`jax.make_jaxpr(apply_fn)`) is re-evaluated equation by
    equation (inlining jit / custom_jvp / custom_vjp / closed_call bodies) with
    a tap on the values that carry a site's channels: a conv whose kernel is the
    site's kernel leaf starts them; elementwise ops (bias, norm affine, a
    residual add), pools and the first nonlinearity carry them on; a consumer
    (conv, Dense, flatten, global reduction) ends them. Jittable.

    Args:
      graph: the kernel graph (site names, `num_kernels`; a Graph's
        `layer(name).kernel_path`, else `("params", *name.split("/"), "kernel")`).
      apply_fn: `apply_fn(variables, x) -> logits (N, C)`.
      variables: the full variables dict.
      x: `(N, ...)` inputs.
      measure: "activation" or "block_output" (module docstring).

    Returns:
      `(logits (N, C), {site: (N, K_s) float32})`: the sum over every axis but
      the first and the (last) channel axis.
    """
    if measure not in MEASURES:
        raise ImportanceError(f"measure must be one of {MEASURES}, got {measure!r}")
    leaves, treedef = jax.tree_util.tree_flatten_with_path(variables)
    paths = [tuple(_key_name(k) for k in p) for p, _ in leaves]
    values = [v for _, v in leaves]
    by_path = {_kernel_path(graph, n): n for n in graph.names}
    missing = [n for pth, n in by_path.items() if pth not in paths]
    if missing:
        raise ImportanceError(
            f"sites {missing} have no kernel leaf in the variables (expected paths "
            f"{[by_path_inv for by_path_inv, m in by_path.items() if m in missing]})")

    def fn(vals, x):
        return apply_fn(jax.tree_util.tree_unflatten(treedef, vals), x)

    closed = jax.make_jaxpr(fn)(values, x)
    tags = [("kernel", by_path[p]) if p in by_path else None for p in paths] + [None]
    taps = _Taps(graph, measure)
    outs, _ = _run_tapped(taps, closed.jaxpr, closed.consts, [*values, x], tags)
    return outs[0], taps.result()


def default_measure(model: Any) -> Measure:
    """"block_output" for a ConvNet with residual adds (ResCNN), else "activation"."""
    if isinstance(model, ConvNet) and any(c.residual_from is not None for c in model.convs):
        return "block_output"
    return "activation"


def as_variables(params: Mapping) -> dict:
    """`{"params": params}` for an inner params dict; a full variables dict unchanged."""
    if isinstance(params, Mapping) and "params" in params:
        return dict(params)
    return {"params": params}


@partial(jax.jit, static_argnames=("apply_fn", "graph", "num_classes", "measure", "batch_size"))
def _importance_sums(apply_fn: Callable, graph: Any, num_classes: int, measure: str, variables,
                     images: jax.Array, labels: jax.Array, valid: jax.Array,
                     confidence: jax.Array, batch_size: int):
    """Per-class sums of spatially-summed site maps, confident and all.

    Args:
      images: `(B * num_batches, ...)`, padded; `labels`, `valid`: `(B * num_batches,)`.

    Returns:
      `(sums_conf {site: (C, K)}, count_conf (C,), sums_all {site: (C, K)}, count_all (C,))`.
    """
    names = tuple(graph.names)
    xs = images.reshape(-1, batch_size, *images.shape[1:])
    ys = labels.reshape(-1, batch_size)
    vs = valid.reshape(-1, batch_size)

    def body(acc, batch):
        x, y, v = batch
        logits, sums = site_maps(graph, apply_fn, variables, x, measure=measure)
        probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
        own = jnp.take_along_axis(probs, y[:, None], axis=-1)[:, 0]
        confident = v & (jnp.argmax(logits, axis=-1) == y) & (own >= confidence)
        onehot = jax.nn.one_hot(y, num_classes, dtype=jnp.float32)  # (B, C)
        w_conf = onehot * confident[:, None]
        w_all = onehot * v[:, None]
        sums_conf, n_conf, sums_all, n_all = acc
        new_conf, new_all = {}, {}
        for name in names:
            s = sums[name]  # (B, K)
            # one-hot matmul = per-class segment sum; HIGHEST keeps it exact-ish on accelerators.
            new_conf[name] = sums_conf[name] + jnp.matmul(w_conf.T, s, precision="highest")
            new_all[name] = sums_all[name] + jnp.matmul(w_all.T, s, precision="highest")
        return (new_conf, n_conf + w_conf.sum(0), new_all, n_all + w_all.sum(0)), None

    zeros = {n: jnp.zeros((num_classes, graph.num_kernels[n]), jnp.float32) for n in names}
    init = (zeros, jnp.zeros(num_classes), dict(zeros), jnp.zeros(num_classes))
    (sums_conf, n_conf, sums_all, n_all), _ = jax.lax.scan(body, init, (xs, ys, vs))
    return sums_conf, n_conf, sums_all, n_all


def _resolve(model: Any, params: Mapping, graph: Any) -> tuple[Callable, dict, Any, ConvNet | None]:
    """`(apply_fn, variables, graph, convnet or None)` of a ConvNet or an apply function."""
    convnet = model if isinstance(model, ConvNet) else convnet_of(model)
    if isinstance(model, ConvNet):
        apply_fn = inference_apply(model)
    elif callable(model):
        apply_fn = model
    else:
        raise ImportanceError(f"expected a ConvNet or apply_fn(variables, x) -> logits, got "
                              f"{type(model).__name__}")
    variables = as_variables(params)
    if graph is None:
        if convnet is None:
            raise ImportanceError("an apply_fn needs its kernel graph: graph=jaxsplit.trace("
                                  "apply_fn, variables, example_x)")
        graph = convnet.conv_spec()
    return apply_fn, variables, graph, convnet


@functools.lru_cache(maxsize=None)
def inference_apply(model: ConvNet) -> Callable:
    """`functools.partial(model.apply, train=False)`, one object per model (cached, so jitted
    functions that take it as a static argument compile once per model)."""
    return partial(model.apply, train=False)


def _check_images_labels(graph: Any, num_classes: int, images, labels) -> None:
    from jaxsplit.search.evaluate import example_shape

    shape = example_shape(graph)
    if np.ndim(images) != len(shape) + 1 or tuple(np.shape(images)[1:]) != shape:
        raise ImportanceError(
            f"images have shape {tuple(np.shape(images))}; expected (N, "
            f"{', '.join(map(str, shape))})" + (" (NHWC)" if len(shape) == 3 else ""))
    if np.ndim(labels) != 1 or np.shape(labels)[0] != np.shape(images)[0]:
        raise ImportanceError(
            f"labels have shape {tuple(np.shape(labels))}; expected ({np.shape(images)[0]},) "
            f"one label per image")
    if not np.issubdtype(np.asarray(labels).dtype, np.integer):
        raise ImportanceError(f"labels have dtype {np.asarray(labels).dtype}; expected integers")
    lab = np.asarray(labels)
    if lab.size and (lab.min() < 0 or lab.max() >= num_classes):
        raise ImportanceError(
            f"labels must lie in [0, {num_classes}) (the model's classes); got "
            f"{lab.min()}..{lab.max()}")


def _num_outputs(apply_fn, variables, graph, convnet, images) -> int:
    if convnet is not None:
        return int(convnet.num_classes)
    if getattr(graph, "num_outputs", None) is not None:
        return int(graph.num_outputs)
    out = jax.eval_shape(apply_fn, variables, jnp.asarray(images[:1], jnp.float32))
    return int(out.shape[-1])


def kernel_importance(model: Any, params: Mapping, images, labels, *, confidence: float = 0.9,
                      batch_size: int = 256, measure: Measure | None = None,
                      graph: Any = None) -> ImportanceResult:
    """Kernel importance of every class and kernel site (docs/method.md §3).

    Args:
      model: a `ConvNet`, or any `apply_fn(variables, x) -> logits (N, C)`
        (e.g. `functools.partial(module.apply, train=False)`).
      params: the full variables dict (`{"params": ..., "batch_stats": ...}`);
        for a ConvNet its inner params dict also works.
      images: `(N, ...)` float32 valid images.
      labels: `(N,)` int labels in `[0, C)`.
      confidence: softmax probability of the true class needed (reference 0.9);
        the image must also be classified as its class.
      batch_size: images per step of the scan (last batch padded and masked).
      measure: where a site's map is measured: "activation" or "block_output"
        (module docstring); None: `default_measure(model)`.
      graph: the kernel graph (`jaxsplit.trace`); None for a ConvNet (its conv spec).

    Returns:
      `ImportanceResult` with `importance {site: (C, K_s) float32}`.
    """
    apply_fn, variables, graph, convnet = _resolve(model, params, graph)
    measure = default_measure(convnet) if measure is None else measure
    if measure not in MEASURES:
        raise ImportanceError(f"measure must be one of {MEASURES}, got {measure!r}")
    num_classes = _num_outputs(apply_fn, variables, graph, convnet, np.asarray(images))
    _check_images_labels(graph, num_classes, images, labels)
    if not 0.0 <= confidence < 1.0:
        raise ImportanceError(f"confidence must be in [0, 1), got {confidence}")
    if batch_size < 1:
        raise ImportanceError(f"batch_size must be >= 1, got {batch_size}")
    images = np.asarray(images, np.float32)
    labels = np.asarray(labels, np.int32)
    num = images.shape[0]
    bs = max(1, min(batch_size, num))
    padded = -(-max(num, 1) // bs) * bs
    pad = padded - num
    x = np.concatenate([images, np.zeros((pad, *images.shape[1:]), np.float32)])
    y = np.concatenate([labels, np.zeros(pad, np.int32)])
    v = np.arange(padded) < num
    sums_conf, n_conf, sums_all, n_all = jax.device_get(_importance_sums(
        apply_fn, graph, num_classes, measure, variables, jnp.asarray(x), jnp.asarray(y),
        jnp.asarray(v), jnp.asarray(confidence, jnp.float32), bs))
    n_conf = np.rint(n_conf).astype(np.int64)
    n_all = np.rint(n_all).astype(np.int64)
    fallback = tuple(int(c) for c in np.flatnonzero((n_conf == 0) & (n_all > 0)))
    empty = tuple(int(c) for c in np.flatnonzero(n_all == 0))
    warnings = []
    if fallback:
        warnings.append(
            f"classes {list(fallback)} have no valid image classified with confidence >= "
            f"{confidence}; their importance is the mean over all their images")
    if empty:
        warnings.append(f"classes {list(empty)} have no valid image; their importance is zero")
    use_conf = (n_conf > 0)[:, None]
    importance = {}
    for name in sums_conf:
        mean_conf = sums_conf[name] / np.maximum(n_conf, 1)[:, None]
        mean_all = sums_all[name] / np.maximum(n_all, 1)[:, None]
        importance[name] = np.where(use_conf, mean_conf, mean_all).astype(np.float32)
    return ImportanceResult(importance, n_conf, n_all, fallback, tuple(warnings))


def rank(importance: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Kernel order by importance, most important first.

    `rank(imp)[name][c, j]` is the index of the j-th most important kernel of
    layer `name` for class c. Ties keep the lower kernel index first (a stable
    descending sort, like the reference's `sorted(..., reverse=True)`).

    Args:
      importance: `{name: (C, K_l)}`.

    Returns:
      `{name: (C, K_l) int32}`, each row a permutation of `0..K_l-1`.
    """
    out = {}
    for name, imp in importance.items():
        imp = np.asarray(imp)
        if imp.ndim != 2:
            raise ImportanceError(f"importance of {name} has shape {imp.shape}; expected (C, K)")
        out[name] = np.argsort(-imp, axis=-1, kind="stable").astype(np.int32)
    return out


def tied_importance(importance: Mapping[str, np.ndarray], spec: ConvSpec) -> dict[str, np.ndarray]:
    """Importance of each FREE layer: a tie group's members summed.

    A residual tie group shares one kernel mask, and a kept channel carries
    both members' maps, so the group is ranked by the sum of its members'
    importance (the reference instead ranked each member on its own, which
    gives the two sides of an add different kernels; see `search.encoding`).

    Returns:
      `{free_layer: (C, K_l) float32}` in `spec.free_layers` order.
    """
    missing = sorted(set(spec.names) - set(importance))
    if missing:
        raise ImportanceError(f"importance lacks layers {missing}; expected {list(spec.names)}")
    out = {}
    for name in spec.free_layers:
        members = next((g for g in spec.ties if g[0] == name), (name,))
        out[name] = np.sum([np.asarray(importance[m], np.float32) for m in members], axis=0)
    return out


# -- layer sensitivity --------------------------------------------------------


def top_kernels_count(num_kernels: int, ratio: float) -> int:
    """Kernels kept at `ratio`: `max(1, floor(ratio * K))` (reference `int(K * r)`, never 0)."""
    return max(1, int(math.floor(num_kernels * ratio + 1e-9)))


def sensitivity_masks(spec: ConvSpec, ranks: Mapping[str, np.ndarray],
                      ratios: Sequence[float]) -> dict[str, np.ndarray]:
    """Masks of the sensitivity analysis: `{name: bool (C, num_layers * num_ratios, K)}`.

    Individual `l * num_ratios + r` keeps the top `top_kernels_count(K_l, r)`
    kernels of layer l (by each class's ranking of that layer) and every
    kernel of the other layers; tied partners of layer l get the same kernels.
    """
    num_classes = next(iter(ranks.values())).shape[0]
    num_ratios = len(ratios)
    names, sizes = tuple(spec.names), spec.num_kernels
    num_ind = len(names) * num_ratios
    out = {n: np.ones((num_classes, num_ind, sizes[n]), bool) for n in names}
    for li, name in enumerate(names):
        group = next((g for g in spec.ties if name in g), (name,))
        order = np.asarray(ranks[name])
        for ri, ratio in enumerate(ratios):
            keep = top_kernels_count(sizes[name], ratio)
            m = np.zeros((num_classes, sizes[name]), bool)
            np.put_along_axis(m, order[:, :keep], True, axis=-1)
            for member in group:
                out[member][:, li * num_ratios + ri] = m
    return out


def ensemble_accuracy(L: np.ndarray, labels: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """Accuracy of the module ensembles of a logit table.

    Args:
      L: `(C, E, N)`: row c's module logit for ensemble e on image n.
      labels: `(N,)` class ids; images whose label is not in `classes` are ignored.
      classes: `(C,)` class id of each row.

    Returns:
      `(E,)` float: accuracy of `classes[argmax_c L[c, e, n]]` (first max wins).
    """
    L = np.asarray(L)
    classes = np.asarray(classes)
    labels = np.asarray(labels)
    pred = classes[np.argmax(L, axis=0)]  # (E, N)
    use = np.isin(labels, classes)
    return ((pred == labels[None]) & use[None]).sum(-1) / max(int(use.sum()), 1)


def layer_sensitivity(model: Any, params: Mapping, images, labels,
                      importance: Mapping[str, np.ndarray],
                      ratios: Sequence[float] = DEFAULT_RATIOS, *,
                      evaluate_fn: Callable | None = None,
                      classes: Sequence[int] | None = None, graph: Any = None) -> np.ndarray:
    """Ensemble accuracy when one layer keeps only its top-r kernels (docs/method.md §3).

    Args:
      model: a `ConvNet` or an `apply_fn(variables, x) -> logits` (then with `graph`).
      params: the full variables dict (a ConvNet's inner params dict also works).
      images: `(N, ...)`; labels: `(N,)`.
      importance: `{site: (C, K_s)}` (from `kernel_importance`).
      ratios: fractions of kernels kept (reference 0.1, 0.2, ..., 1.0).
      evaluate_fn: an `Evaluator` (default: the reference evaluator of the model).
      classes: class id of each importance row (default `arange(C)`).
      graph: the kernel graph; None for a ConvNet.

    Returns:
      `(num_sites, num_ratios)` float accuracies, sites in graph order.
    """
    apply_fn, variables, graph, convnet = _resolve(model, params, graph)
    num_outputs = _num_outputs(apply_fn, variables, graph, convnet, np.asarray(images))
    _check_images_labels(graph, num_outputs, images, labels)
    if len(ratios) == 0 or any(not 0.0 < r <= 1.0 for r in ratios):
        raise ImportanceError(f"ratios must be a non-empty list of values in (0, 1], got {ratios}")
    ranks = rank(importance)
    num_classes = next(iter(ranks.values())).shape[0]
    classes = np.arange(num_classes) if classes is None else np.asarray(classes)
    if classes.shape != (num_classes,):
        raise ImportanceError(f"classes have shape {classes.shape}; expected ({num_classes},)")
    if evaluate_fn is None:
        from jaxsplit.search.evaluate import make_evaluator  # late: avoid an import cycle

        if convnet is not None and isinstance(model, ConvNet):
            evaluate_fn = make_evaluator(convnet, "reference")
        else:
            from jaxsplit.search.evaluate import masked_apply_of

            evaluate_fn = make_evaluator(graph, "reference",
                                         masked_fn=masked_apply_of(graph, apply_fn))
    masks = {k: jnp.asarray(v) for k, v in sensitivity_masks(graph, ranks, ratios).items()}
    L = np.asarray(evaluate_fn(variables, masks, jnp.asarray(images, jnp.float32),
                               jnp.asarray(classes, jnp.int32)))
    acc = ensemble_accuracy(L, np.asarray(labels), classes)
    return acc.reshape(len(graph.names), len(ratios))


def sensitive_layers(curves: np.ndarray, ratios: Sequence[float], *, drop: float = 0.05,
                     at: float = 0.5) -> tuple[int, ...]:
    """Layers whose ensemble accuracy drops sharply at small ratios.

    Rule: layer l is sensitive iff its accuracy at ratio `at` is more than
    `drop` below its accuracy at the largest ratio (1.0: the full model).
    The reference chose its lists by reading the curves; this rule reproduces
    "drops sharply at small r" with explicit thresholds.

    Args:
      curves: `(num_layers, num_ratios)` from `layer_sensitivity`.
      ratios: the ratios of the columns; must contain `at`.

    Returns:
      sorted 0-based indices of the sensitive conv layers.
    """
    curves = np.asarray(curves)
    ratios = [float(r) for r in ratios]
    if curves.ndim != 2 or curves.shape[1] != len(ratios):
        raise ImportanceError(
            f"curves have shape {curves.shape}; expected (num_layers, {len(ratios)})")
    hits = [i for i, r in enumerate(ratios) if abs(r - at) < 1e-9]
    if not hits:
        raise ImportanceError(f"ratio at={at} is not among the ratios {ratios}")
    full = curves[:, int(np.argmax(ratios))]
    return tuple(int(i) for i in np.flatnonzero(curves[:, hits[0]] < full - drop))
