"""Kernel importance and layer sensitivity (docs/method.md §3).

Importance of kernel k of conv layer l for class c: the mean, over the valid
images of class c that the model classifies as c with softmax confidence
>= `confidence` (reference 0.9), of the spatial sum of k's post-ReLU feature
map (the reference's "L1 of the feature map"; post-ReLU values are >= 0, so
the sum is the L1 norm).

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

import math
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxsplit.errors import JaxsplitError
from jaxsplit.models.convnet import ConvNet, ConvSpec, activations

DEFAULT_RATIOS: tuple[float, ...] = tuple(i / 10 for i in range(1, 11))


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


def _check_images_labels(model: ConvNet, images, labels) -> None:
    spec = model.conv_spec()
    if np.ndim(images) != 4 or tuple(np.shape(images)[1:]) != spec.image_shape:
        raise ImportanceError(
            f"images have shape {tuple(np.shape(images))}; expected (N, "
            f"{', '.join(map(str, spec.image_shape))}) (NHWC)")
    if np.ndim(labels) != 1 or np.shape(labels)[0] != np.shape(images)[0]:
        raise ImportanceError(
            f"labels have shape {tuple(np.shape(labels))}; expected ({np.shape(images)[0]},) "
            f"one label per image")
    if not np.issubdtype(np.asarray(labels).dtype, np.integer):
        raise ImportanceError(f"labels have dtype {np.asarray(labels).dtype}; expected integers")
    lab = np.asarray(labels)
    if lab.size and (lab.min() < 0 or lab.max() >= model.num_classes):
        raise ImportanceError(
            f"labels must lie in [0, {model.num_classes}) (the model's classes); got "
            f"{lab.min()}..{lab.max()}")


@partial(jax.jit, static_argnames=("model", "batch_size"))
def _importance_sums(model: ConvNet, params, images: jax.Array, labels: jax.Array,
                     valid: jax.Array, confidence: jax.Array, batch_size: int):
    """Per-class sums of spatially-summed post-ReLU maps, confident and all.

    Args:
      images: `(B * num_batches, H, W, Cin)`, padded; `labels`, `valid`: `(B * num_batches,)`.

    Returns:
      `(sums_conf {name: (C, K)}, count_conf (C,), sums_all {name: (C, K)}, count_all (C,))`.
    """
    num_classes = model.num_classes
    spec = model.conv_spec()
    xs = images.reshape(-1, batch_size, *images.shape[1:])
    ys = labels.reshape(-1, batch_size)
    vs = valid.reshape(-1, batch_size)

    def body(acc, batch):
        x, y, v = batch
        logits, acts = activations(model, params, x)
        probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
        own = jnp.take_along_axis(probs, y[:, None], axis=-1)[:, 0]
        confident = v & (jnp.argmax(logits, axis=-1) == y) & (own >= confidence)
        onehot = jax.nn.one_hot(y, num_classes, dtype=jnp.float32)  # (B, C)
        w_conf = onehot * confident[:, None]
        w_all = onehot * v[:, None]
        sums_conf, n_conf, sums_all, n_all = acc
        new_conf, new_all = {}, {}
        for name in spec.names:
            s = acts[name].astype(jnp.float32).sum(axis=(1, 2))  # (B, K)
            # one-hot matmul = per-class segment sum; HIGHEST keeps it exact-ish on accelerators.
            new_conf[name] = sums_conf[name] + jnp.matmul(w_conf.T, s, precision="highest")
            new_all[name] = sums_all[name] + jnp.matmul(w_all.T, s, precision="highest")
        return (new_conf, n_conf + w_conf.sum(0), new_all, n_all + w_all.sum(0)), None

    zeros = {l.name: jnp.zeros((num_classes, l.num_kernels), jnp.float32) for l in spec.layers}
    init = (zeros, jnp.zeros(num_classes), dict(zeros), jnp.zeros(num_classes))
    (sums_conf, n_conf, sums_all, n_all), _ = jax.lax.scan(body, init, (xs, ys, vs))
    return sums_conf, n_conf, sums_all, n_all


def kernel_importance(model: ConvNet, params, images, labels, *, confidence: float = 0.9,
                      batch_size: int = 256) -> ImportanceResult:
    """Kernel importance of every class and conv layer (docs/method.md §3).

    Args:
      model: the trained `ConvNet`.
      params: its params (inner dict).
      images: `(N, H, W, Cin)` float32 valid images.
      labels: `(N,)` int labels in `[0, model.num_classes)`.
      confidence: softmax probability of the true class needed (reference 0.9);
        the image must also be classified as its class.
      batch_size: images per step of the scan (last batch padded and masked).

    Returns:
      `ImportanceResult` with `importance {conv_name: (C, K_l) float32}`.
    """
    _check_images_labels(model, images, labels)
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
        model, params, jnp.asarray(x), jnp.asarray(y), jnp.asarray(v),
        jnp.asarray(confidence, jnp.float32), bs))
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
    num_ind = len(spec.layers) * num_ratios
    out = {l.name: np.ones((num_classes, num_ind, l.num_kernels), bool) for l in spec.layers}
    for li, layer in enumerate(spec.layers):
        group = next((g for g in spec.ties if layer.name in g), (layer.name,))
        order = np.asarray(ranks[layer.name])
        for ri, ratio in enumerate(ratios):
            keep = top_kernels_count(layer.num_kernels, ratio)
            m = np.zeros((num_classes, layer.num_kernels), bool)
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


def layer_sensitivity(model: ConvNet, params, images, labels, importance: Mapping[str, np.ndarray],
                      ratios: Sequence[float] = DEFAULT_RATIOS, *,
                      evaluate_fn: Callable | None = None,
                      classes: Sequence[int] | None = None) -> np.ndarray:
    """Ensemble accuracy when one layer keeps only its top-r kernels (docs/method.md §3).

    Args:
      model, params: the trained model.
      images: `(N, H, W, Cin)`; labels: `(N,)`.
      importance: `{conv_name: (C, K_l)}` (from `kernel_importance`).
      ratios: fractions of kernels kept (reference 0.1, 0.2, ..., 1.0).
      evaluate_fn: an `Evaluator` (default: `make_evaluator(model, "reference")`).
      classes: class id of each importance row (default `arange(C)`).

    Returns:
      `(num_layers, num_ratios)` float accuracies, layers in `model.conv_spec()` order.
    """
    _check_images_labels(model, images, labels)
    if len(ratios) == 0 or any(not 0.0 < r <= 1.0 for r in ratios):
        raise ImportanceError(f"ratios must be a non-empty list of values in (0, 1], got {ratios}")
    spec = model.conv_spec()
    ranks = rank(importance)
    num_classes = next(iter(ranks.values())).shape[0]
    classes = np.arange(num_classes) if classes is None else np.asarray(classes)
    if classes.shape != (num_classes,):
        raise ImportanceError(f"classes have shape {classes.shape}; expected ({num_classes},)")
    if evaluate_fn is None:
        from jaxsplit.search.evaluate import make_evaluator  # late: avoid an import cycle

        evaluate_fn = make_evaluator(model, "reference")
    masks = {k: jnp.asarray(v) for k, v in sensitivity_masks(spec, ranks, ratios).items()}
    L = np.asarray(evaluate_fn(params, masks, jnp.asarray(images, jnp.float32),
                               jnp.asarray(classes, jnp.int32)))
    acc = ensemble_accuracy(L, np.asarray(labels), classes)
    return acc.reshape(len(spec.layers), len(ratios))


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
