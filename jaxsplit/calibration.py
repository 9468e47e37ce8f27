"""Calibration of a module's target-class logit, so it can stand next to softmax probabilities.

A CNNSplitter module outputs one raw logit for its class (the target class, TC). To patch a weak
model, that logit replaces the weak model's TC probability (see `jaxsplit.compose`), so it must
first be brought onto a probability-like scale. The reference fits a *range* (low, high) on the
module's outputs on the TC images of the valid split and maps x -> (x - low) / (high - low)
(`utils/module_tools.py::load_range_of_module_output`, applied in
`experiments/patch/apply_patch.py`). Its modes, and their names here:

=================  ==========================================  =================================
reference mode     range (low, high)                           here
=================  ==========================================  =================================
``min_max``        (min, max)                    (default)     `min_max()`
``percentile``     (P10, P90) by default                       `percentile(lower=10, upper=90)`
``outlier``        (Q1 - 1.5 IQR, Q3 + 1.5 IQR)                `iqr(k=1.5)`
``norm``           (mean, std)                                 `z_norm()`
=================  ==========================================  =================================

jaxsplit adds two calibrations learned on held-out *labelled* data (binary labels, 1 = TC):
`temperature()` (sigmoid(x / T)) and `platt()` (sigmoid(a x + b)), and measures calibration with
`expected_calibration_error` / `reliability_bins`.

Min-max on TC images alone cannot know what the module's score means on the weak task's other
classes, which the strong model never saw (a module may fire on them). Fitted on the weak task's
labelled valid split (TC and non-TC images) instead (`VALID_FITTED`):

* `logistic(l2)`: an L2-regularised logistic regression on several features per image (for
  patching: the module's TC logit and the weak model's TC logit), so the fit learns how much to
  trust the module against the weak model; ``apply`` maps ``(N, F) -> (N,)``;
* `threshold(objective)`: the decision threshold that maximises TC F1 or TC-vs-rest accuracy on
  the valid data, returned as a score centred on it (above 0.5 iff above the threshold);
* `chain(*methods)`: methods one after the other, e.g.
  ``chain(logistic(), threshold("f1", space="logit"))``.

Design (optax style): a method is a `Calibration` NamedTuple of two pure functions,

* ``fit(scores, labels=None) -> state``: a small pytree (NamedTuple) of fitted parameters;
* ``apply(state, scores) -> calibrated``: elementwise, same shape as ``scores``.

Unsupervised methods (`min_max`, `percentile`, `iqr`, `z_norm`) are fitted on TC scores only:
with ``labels=None`` every score is taken as a TC score; with binary ``labels`` only the scores
with ``labels == 1`` are used (the reference fits on TC valid images). Supervised methods
(`temperature`, `platt`) need binary labels with both classes present.

Bad input (wrong rank, empty, NaN/inf, labels not in {0, 1}, constant scores that would divide by
zero) raises `CalibrationError` naming the method and the value. These value checks need concrete
arrays: when ``fit`` itself is traced (inside `jax.jit`/`jax.vmap`) only shape checks run, and a
degenerate input then gives non-finite parameters instead of an error. Everything else is
jit-able and vmap-able (masked reductions and `jnp.nanpercentile` keep shapes static).

Example:
  >>> import jax.numpy as jnp
  >>> cal = get("min_max")
  >>> state = cal.fit(jnp.array([1.0, 2.0, 3.0]))
  >>> cal.apply(state, jnp.array([1.0, 2.0, 3.0, 5.0]))
  Array([0. , 0.5, 1. , 2. ], dtype=float32)
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxsplit.errors import JaxsplitError

Array = jax.Array
CalibState = Any  # a NamedTuple of scalar arrays; see the *State classes below.


class CalibrationError(JaxsplitError, ValueError):
    """Scores, labels or settings a calibration method cannot work with."""


class Calibration(NamedTuple):
    """A calibration method as a pair of pure functions (cf. `optax.GradientTransformation`).

    Attributes:
      fit: ``fit(scores, labels=None) -> state``. ``scores``: ``(N,)`` (or ``(N, 1)``) raw module
        logits; ``labels``: ``None`` or ``(N,)`` binary, 1 = target class.
      apply: ``apply(state, scores) -> calibrated``, elementwise, same shape as ``scores``.
    """

    fit: Callable[..., CalibState]
    apply: Callable[[CalibState, Array], Array]


class RangeState(NamedTuple):
    """A fitted range; ``apply`` maps ``x -> (x - low) / (high - low)``."""

    low: Array  # shape=(), float32
    high: Array  # shape=(), float32


class NormState(NamedTuple):
    """Mean and standard deviation of the TC scores."""

    mean: Array  # shape=(), float32
    std: Array  # shape=(), float32


class TemperatureState(NamedTuple):
    """``apply`` maps ``x -> sigmoid(x / T)`` with ``T = exp(log_temperature) > 0``."""

    log_temperature: Array  # shape=(), float32


class PlattState(NamedTuple):
    """``apply`` maps ``x -> sigmoid(slope * x + intercept)``."""

    slope: Array  # shape=(), float32
    intercept: Array  # shape=(), float32


# --------------------------------------------------------------------------------------------
# Input checks.


def _is_concrete(*xs: Any) -> bool:
    return not any(isinstance(x, jax.core.Tracer) for x in xs)


def _finite_float(x: jax.Array, method: str, what: str, detail: str = "") -> jax.Array:
    """`x` as a float array, refused (when concrete) if it holds NaN or inf."""
    if not jnp.issubdtype(x.dtype, jnp.floating):
        x = x.astype(jnp.float32)
    if _is_concrete(x):
        num_bad = int(np.sum(~np.isfinite(np.asarray(x))))
        if num_bad:
            raise CalibrationError(
                f"{method}: {what} contain {num_bad} non-finite value(s) (NaN or inf){detail}")
    return x


def _as_scores(scores: Any, method: str) -> Array:
    """Validates and flattens scores to ``(N,)`` float."""
    scores = jnp.asarray(scores)
    if scores.ndim == 2 and scores.shape[1] == 1:
        scores = scores[:, 0]
    if scores.ndim != 1:
        raise CalibrationError(
            f"{method}: scores must have shape (N,) or (N, 1), got {scores.shape}"
        )
    if scores.shape[0] == 0:
        raise CalibrationError(f"{method}: scores are empty (shape {scores.shape})")
    return _finite_float(scores, method, "scores", f" out of {scores.shape[0]}")


def _as_labels(labels: Any, num_examples: int, method: str) -> Array:
    """Validates binary labels ``(N,)`` and returns them as a bool mask (True = target class)."""
    labels = jnp.asarray(labels)
    if labels.shape != (num_examples,):
        raise CalibrationError(
            f"{method}: labels must have shape ({num_examples},) like the scores, "
            f"got {labels.shape}"
        )
    if _is_concrete(labels):
        values = np.unique(np.asarray(labels))
        if not np.all(np.isin(values, [0, 1])):
            raise CalibrationError(
                f"{method}: labels must be binary (1 = target class, 0 = other), "
                f"got values {values.tolist()}"
            )
    return labels.astype(bool)


def _positive_mask(scores: Array, labels: Any, method: str) -> Array:
    """The mask of TC scores an unsupervised method is fitted on."""
    if labels is None:
        return jnp.ones(scores.shape, dtype=bool)
    mask = _as_labels(labels, scores.shape[0], method)
    if _is_concrete(mask) and not bool(jnp.any(mask)):
        raise CalibrationError(
            f"{method}: fitted on target-class scores (labels == 1), but no label is 1"
        )
    return mask


def _check_both_classes(mask: Array, method: str) -> None:
    if _is_concrete(mask):
        num_pos = int(jnp.sum(mask))
        if num_pos == 0 or num_pos == mask.shape[0]:
            raise CalibrationError(
                f"{method}: needs labels of both classes to fit, got {num_pos} positive(s) "
                f"out of {mask.shape[0]}"
            )


def _check_range(state: RangeState, method: str, what: str) -> None:
    if _is_concrete(state.low, state.high):
        low, high = float(state.low), float(state.high)
        if not high > low:
            raise CalibrationError(
                f"{method}: {what} are equal ({low:g} and {high:g}); cannot scale by "
                f"high - low = {high - low:g}. The scores are (nearly) constant."
            )


# --------------------------------------------------------------------------------------------
# Masked statistics (shape-static, so jit-able): entries where mask is False are ignored.


def _masked_min_max(x: Array, mask: Array) -> tuple[Array, Array]:
    return jnp.min(jnp.where(mask, x, jnp.inf)), jnp.max(jnp.where(mask, x, -jnp.inf))


def _masked_percentile(x: Array, mask: Array, q: Any) -> Array:
    # numpy's default 'linear' method, as the reference's np.percentile.
    return jnp.nanpercentile(jnp.where(mask, x, jnp.nan), jnp.asarray(q, x.dtype))


def _range_apply(clip: bool) -> Callable[[RangeState, Array], Array]:
    def apply(state: RangeState, scores: Array) -> Array:
        scores = jnp.asarray(scores)
        out = (scores - state.low) / (state.high - state.low)
        return jnp.clip(out, 0.0, 1.0) if clip else out

    return apply


# --------------------------------------------------------------------------------------------
# Unsupervised (range) methods.


def min_max(*, clip: bool = False) -> Calibration:
    """Min-max scaling, the reference default: ``(x - min) / (max - min)``.

    Args:
      clip: clip the result to [0, 1]. The reference does not (``False``): a test score above
        the fitted maximum becomes > 1.

    Returns:
      A `Calibration` whose state is a `RangeState(low=min, high=max)` of the TC scores.
    """

    def fit(scores: Any, labels: Any = None) -> RangeState:
        scores = _as_scores(scores, "min_max")
        mask = _positive_mask(scores, labels, "min_max")
        state = RangeState(*_masked_min_max(scores, mask))
        _check_range(state, "min_max", "the minimum and maximum score")
        return state

    return Calibration(fit=fit, apply=_range_apply(clip))


def percentile(lower: float = 10.0, upper: float = 90.0, *, clip: bool = False) -> Calibration:
    """Percentile scaling: min-max with the ``lower``/``upper`` percentiles as the range.

    Args:
      lower: lower percentile in [0, 100); the reference default is 10.
      upper: upper percentile in (lower, 100]; the reference default is 90.
      clip: clip the result to [0, 1] (the reference does not).

    Returns:
      A `Calibration` whose state is a `RangeState(low=P_lower, high=P_upper)`.
    """
    if not 0.0 <= lower < upper <= 100.0:
        raise CalibrationError(
            f"percentile: need 0 <= lower < upper <= 100, got lower={lower}, upper={upper}"
        )

    def fit(scores: Any, labels: Any = None) -> RangeState:
        scores = _as_scores(scores, "percentile")
        mask = _positive_mask(scores, labels, "percentile")
        low, high = _masked_percentile(scores, mask, [lower, upper])
        state = RangeState(low, high)
        _check_range(state, "percentile", f"the {lower:g}th and {upper:g}th percentiles")
        return state

    return Calibration(fit=fit, apply=_range_apply(clip))


def iqr(k: float = 1.5, *, range_from: str = "fences", clip: bool = False) -> Calibration:
    """Outlier-robust scaling with Tukey's fences ``[Q1 - k IQR, Q3 + k IQR]``.

    Args:
      k: fence width in inter-quartile ranges (the reference uses 1.5).
      range_from: ``"fences"`` (reference ``outlier`` mode): the fences themselves are the
        range. ``"inliers"``: scores outside the fences are dropped as outliers and the range is
        the min and max of the remaining scores (always within the fences).
      clip: clip the result to [0, 1] (the reference does not).

    Returns:
      A `Calibration` whose state is a `RangeState`.
    """
    if not k >= 0.0:
        raise CalibrationError(f"iqr: k must be >= 0, got {k}")
    if range_from not in ("fences", "inliers"):
        raise CalibrationError(
            f"iqr: range_from must be 'fences' or 'inliers', got {range_from!r}"
        )

    def fit(scores: Any, labels: Any = None) -> RangeState:
        scores = _as_scores(scores, "iqr")
        mask = _positive_mask(scores, labels, "iqr")
        q1, q3 = _masked_percentile(scores, mask, [25.0, 75.0])
        low, high = q1 - k * (q3 - q1), q3 + k * (q3 - q1)
        if range_from == "inliers":
            inliers = mask & (scores >= low) & (scores <= high)
            low, high = _masked_min_max(scores, inliers)
        state = RangeState(low, high)
        _check_range(state, "iqr", f"the ends of the {range_from} range")
        return state

    return Calibration(fit=fit, apply=_range_apply(clip))


def z_norm(*, squash: bool = True) -> Calibration:
    """Z-normalisation ``z = (x - mean) / std`` of the TC scores, squashed into (0, 1).

    The reference stores (mean, std) (``norm`` mode) but its patch script only applies min-max,
    so how it maps z to the probability scale is not given. jaxsplit squashes with a sigmoid
    (``squash=True``), so the score lives in (0, 1) like the softmax probabilities it sits next
    to: a TC score at the TC mean becomes 0.5. ``squash=False`` returns the raw z-score.

    Returns:
      A `Calibration` whose state is a `NormState(mean, std)` (population std, ``ddof=0``, as
      ``np.std``).
    """

    def fit(scores: Any, labels: Any = None) -> NormState:
        scores = _as_scores(scores, "z_norm")
        mask = _positive_mask(scores, labels, "z_norm")
        count = jnp.sum(mask)
        mean = jnp.sum(jnp.where(mask, scores, 0.0)) / count
        var = jnp.sum(jnp.where(mask, (scores - mean) ** 2, 0.0)) / count
        state = NormState(mean, jnp.sqrt(var))
        if _is_concrete(state.std) and not float(state.std) > 0.0:
            raise CalibrationError(
                f"z_norm: the scores are constant ({float(mean):g}), std = 0; cannot normalise"
            )
        return state

    def apply(state: NormState, scores: Array) -> Array:
        z = (jnp.asarray(scores) - state.mean) / state.std
        return jax.nn.sigmoid(z) if squash else z

    return Calibration(fit=fit, apply=apply)


# --------------------------------------------------------------------------------------------
# Supervised (learned) methods.


def _minimise_lbfgs(loss_fn: Callable[[Array], Array], init: Array, num_steps: int) -> Array:
    """Minimises ``loss_fn`` from ``init`` with a fixed number of optax L-BFGS steps."""
    opt = optax.lbfgs()
    value_and_grad = optax.value_and_grad_from_state(loss_fn)

    def step(_, carry):
        params, opt_state = carry
        value, grad = value_and_grad(params, state=opt_state)
        updates, opt_state = opt.update(
            grad, opt_state, params, value=value, grad=grad, value_fn=loss_fn
        )
        return optax.apply_updates(params, updates), opt_state

    params, _ = jax.lax.fori_loop(0, num_steps, step, (init, opt.init(init)))
    return params


@functools.partial(jax.jit, static_argnames=("num_steps",))
def _fit_platt(scores: Array, targets: Array, num_steps: int) -> PlattState:
    # The fit runs on standardised scores (mean 0, std 1) so that L-BFGS starts well conditioned
    # whatever the logit scale; the slope and intercept are then mapped back to raw scores.
    mean, std = jnp.mean(scores), jnp.maximum(jnp.std(scores), 1e-12)
    z = (scores - mean) / std

    def loss_fn(params: Array) -> Array:
        return jnp.mean(optax.sigmoid_binary_cross_entropy(params[0] * z + params[1], targets))

    slope_z, intercept_z = _minimise_lbfgs(loss_fn, jnp.array([1.0, 0.0], scores.dtype), num_steps)
    return PlattState(slope=slope_z / std, intercept=intercept_z - slope_z * mean / std)


@functools.partial(jax.jit, static_argnames=("num_steps",))
def _fit_temperature(scores: Array, targets: Array, num_steps: int) -> TemperatureState:
    # Fit on scores divided by their root mean square (no shift: the model has no bias), for
    # the same conditioning reason as in `_fit_platt`; T scales back by the same factor.
    scale = jnp.maximum(jnp.sqrt(jnp.mean(scores**2)), 1e-12)
    z = scores / scale

    def loss_fn(params: Array) -> Array:
        return jnp.mean(optax.sigmoid_binary_cross_entropy(z * jnp.exp(-params[0]), targets))

    (log_t,) = _minimise_lbfgs(loss_fn, jnp.zeros((1,), scores.dtype), num_steps)
    return TemperatureState(log_temperature=log_t + jnp.log(scale))


def _supervised_inputs(scores: Any, labels: Any, method: str) -> tuple[Array, Array]:
    scores = _as_scores(scores, method)
    if labels is None:
        raise CalibrationError(
            f"{method}: is learned from labelled data; give binary labels (1 = target class)"
        )
    mask = _as_labels(labels, scores.shape[0], method)
    _check_both_classes(mask, method)
    return scores, mask.astype(scores.dtype)


def _check_num_steps(num_steps: int, method: str) -> None:
    if not (isinstance(num_steps, int) and num_steps >= 1):
        raise CalibrationError(f"{method}: num_steps must be an int >= 1, got {num_steps!r}")


def temperature(*, num_steps: int = 50) -> Calibration:
    """Binary temperature scaling ``sigmoid(x / T)``, ``T > 0`` (parametrised as ``log T``).

    Learned by minimising binary cross-entropy on held-out scores and binary labels with a fixed
    number of jit-compiled, deterministic L-BFGS steps (optax). It keeps the decision threshold
    at logit 0; `platt` also learns a shift.

    Args:
      num_steps: L-BFGS iterations.

    Returns:
      A `Calibration` whose state is a `TemperatureState`.
    """
    _check_num_steps(num_steps, "temperature")

    def fit(scores: Any, labels: Any = None) -> TemperatureState:
        scores, targets = _supervised_inputs(scores, labels, "temperature")
        return _fit_temperature(scores, targets, num_steps)

    def apply(state: TemperatureState, scores: Array) -> Array:
        return jax.nn.sigmoid(jnp.asarray(scores) * jnp.exp(-state.log_temperature))

    return Calibration(fit=fit, apply=apply)


def platt(*, num_steps: int = 50) -> Calibration:
    """Platt scaling ``sigmoid(a x + b)``.

    Learned by minimising binary cross-entropy on held-out scores and binary labels with a fixed
    number of jit-compiled, deterministic L-BFGS steps (optax). Targets are the hard labels (no
    Platt target smoothing); on linearly separable data ``a`` grows with ``num_steps``.

    Args:
      num_steps: L-BFGS iterations.

    Returns:
      A `Calibration` whose state is a `PlattState(slope=a, intercept=b)`.
    """
    _check_num_steps(num_steps, "platt")

    def fit(scores: Any, labels: Any = None) -> PlattState:
        scores, targets = _supervised_inputs(scores, labels, "platt")
        return _fit_platt(scores, targets, num_steps)

    def apply(state: PlattState, scores: Array) -> Array:
        return jax.nn.sigmoid(state.slope * jnp.asarray(scores) + state.intercept)

    return Calibration(fit=fit, apply=apply)


# --------------------------------------------------------------------------------------------
# Calibrations fitted on the weak task's valid split (TC and non-TC images).
#
# The module has only seen the strong model's classes, so its score on the weak task's other
# classes means nothing that min-max on TC images alone can know. These methods are fitted on
# labelled valid images of the weak task, TC (1) and non-TC (0).


class LogisticState(NamedTuple):
    """``apply`` maps features ``x (N, F) -> sigmoid(((x - mean) / scale) @ weights + bias)``."""

    weights: Array  # shape=(F,), float32; on standardised features
    bias: Array  # shape=(), float32
    mean: Array  # shape=(F,), float32
    scale: Array  # shape=(F,), float32


class ThresholdState(NamedTuple):
    """``apply`` maps ``x -> sigmoid((g(x) - threshold) / scale)``: above 0.5 iff ``g(x) > threshold``.

    ``g`` is the identity (``space="score"``) or the logit (``space="logit"``, for probabilities).
    """

    threshold: Array  # shape=(), float32, in the space of g
    scale: Array  # shape=(), float32, > 0


class ChainState(NamedTuple):
    """The fitted states of a `chain`'s methods, in order."""

    states: tuple


def _as_features(features: Any, method: str) -> Array:
    """Validates features to ``(N, F)`` float; ``(N,)`` is one feature."""
    features = jnp.asarray(features)
    if features.ndim == 1:
        features = features[:, None]
    if features.ndim != 2 or features.shape[0] == 0 or features.shape[1] == 0:
        raise CalibrationError(
            f"{method}: features must have shape (N,) or (N, F) with N, F >= 1, got {features.shape}"
        )
    return _finite_float(features, method, "features")


@functools.partial(jax.jit, static_argnames=("num_steps",))
def _fit_logistic(features: Array, targets: Array, weights: Array, l2: Array,
                  num_steps: int) -> LogisticState:
    # Standardised features (so one l2 means the same for every feature scale), bias not
    # penalised; a fixed number of L-BFGS steps from zero: deterministic and jit-compiled.
    # ``weights`` is 1 for real rows and 0 for the padding that keeps shapes in few buckets.
    total = jnp.sum(weights)
    mean = jnp.sum(weights[:, None] * features, axis=0) / total
    var = jnp.sum(weights[:, None] * (features - mean) ** 2, axis=0) / total
    scale = jnp.maximum(jnp.sqrt(var), 1e-6)
    z = (features - mean) / scale
    num_features = features.shape[1]

    def loss_fn(params: Array) -> Array:
        w, b = params[:num_features], params[num_features]
        bce = optax.sigmoid_binary_cross_entropy(z @ w + b, targets)
        return jnp.sum(weights * bce) / total + 0.5 * l2 * jnp.sum(w**2)

    prior = jnp.clip(jnp.sum(weights * targets) / total, 1e-6, 1 - 1e-6)
    init = jnp.zeros((num_features + 1,), features.dtype).at[-1].set(jnp.log(prior / (1 - prior)))
    params = _minimise_lbfgs(loss_fn, init, num_steps)
    return LogisticState(params[:num_features], params[num_features], mean, scale)


def logistic(*, l2: float = 1e-2, num_steps: int = 100) -> Calibration:
    """L2-regularised logistic regression of the TC label on several scores.

    For patching, the features are the module's TC logit and the weak model's TC logit
    (`jaxsplit.compose.joint_features`), so the fit learns how far to trust the module against
    the weak model on the weak task's own classes, which the module has never seen. Fitted on
    the weak task's valid images (TC = 1, other classes = 0) by minimising mean binary
    cross-entropy + ``l2 / 2 * |w|^2`` on standardised features (the bias is not penalised) with
    a fixed number of jit-compiled, deterministic L-BFGS steps (optax), from ``w = 0`` and the
    bias at the log prior odds.

    Args:
      l2: ridge penalty on the standardised weights, >= 0.
      num_steps: L-BFGS iterations.

    Returns:
      A `Calibration` whose ``fit(features (N, F) or (N,), labels (N,))`` gives a
      `LogisticState` and whose ``apply(state, features (N, F)) -> (N,)`` gives the TC
      probability (not elementwise: one output per row).
    """
    _check_num_steps(num_steps, "logistic")
    if not (isinstance(l2, (int, float)) and l2 >= 0):
        raise CalibrationError(f"logistic: l2 must be a number >= 0, got {l2!r}")

    def fit(features: Any, labels: Any = None) -> LogisticState:
        features = _as_features(features, "logistic")
        if labels is None:
            raise CalibrationError(
                "logistic: is learned from labelled data; give binary labels (1 = target class)"
            )
        mask = _as_labels(labels, features.shape[0], "logistic")
        _check_both_classes(mask, "logistic")
        # Pad N up to a multiple of 1024 (zero weight) so folds of slightly different sizes
        # share one compilation.
        n = features.shape[0]
        pad = -n % 1024
        weights = jnp.concatenate([jnp.ones((n,), features.dtype), jnp.zeros((pad,), features.dtype)])
        features = jnp.concatenate([features, jnp.zeros((pad, features.shape[1]), features.dtype)])
        targets = jnp.concatenate([mask.astype(features.dtype), jnp.zeros((pad,), features.dtype)])
        return _fit_logistic(features, targets, weights, jnp.asarray(l2, features.dtype), num_steps)

    def apply(state: LogisticState, features: Array) -> Array:
        features = jnp.asarray(features)
        if features.ndim == 1:
            features = features[:, None]
        chex.assert_shape(features, (None, state.weights.shape[0]))
        return jax.nn.sigmoid(((features - state.mean) / state.scale) @ state.weights + state.bias)

    return Calibration(fit=fit, apply=apply)


THRESHOLD_OBJECTIVES = ("f1", "accuracy")


def _objective_at_cuts(sorted_targets: np.ndarray, objective: str) -> np.ndarray:
    """Objective of "the top k scores are TC", for k = 0..N (``(N + 1,)``)."""
    n = sorted_targets.shape[0]
    tp = np.concatenate([[0.0], np.cumsum(sorted_targets)])
    k = np.arange(n + 1, dtype=np.float64)
    num_pos = tp[-1]
    if objective == "f1":
        return np.where(k + num_pos > 0, 2 * tp / np.maximum(k + num_pos, 1), 0.0)
    fp = k - tp
    return (tp + (n - num_pos) - fp) / n


def threshold(objective: str = "f1", *, space: str = "score") -> Calibration:
    """A decision threshold on a score, chosen on labelled valid data for ``objective``.

    ``fit`` tries every cut between consecutive distinct scores (and the two "none" / "all"
    cuts), scores the rule "TC iff score > t" on the labelled data, and keeps the best cut (the
    highest threshold among ties, i.e. the most conservative TC rule); the threshold is the
    midpoint between the two scores around the cut. ``apply`` centres the score on the
    threshold: ``sigmoid((g(x) - t) / scale) > 0.5`` iff ``g(x) > t``, so a patched model's
    decision "calibrated score > 0.5" is the chosen rule. ``fit`` is a sort and a cumulative
    sum on the host (numpy, exact, no compilation per data size); ``apply`` is jit-able.

    Args:
      objective: ``"f1"`` (TC F1) or ``"accuracy"`` (TC-vs-rest accuracy).
      space: ``"score"`` (raw scores; ``scale`` = their std) or ``"logit"`` (scores are
        probabilities, e.g. after `logistic`: the threshold lives on their logit and
        ``scale = 1``, so a threshold at probability 0.5 leaves the probabilities unchanged).

    Returns:
      A `Calibration` with a `ThresholdState`; elementwise.
    """
    if objective not in THRESHOLD_OBJECTIVES:
        raise CalibrationError(
            f"threshold: objective must be one of {THRESHOLD_OBJECTIVES}, got {objective!r}"
        )
    if space not in ("score", "logit"):
        raise CalibrationError(f"threshold: space must be 'score' or 'logit', got {space!r}")

    def to_space(scores: Any, xp: Any = jnp) -> Any:
        if space == "logit":
            p = xp.clip(scores, 1e-7, 1 - 1e-7)
            return xp.log(p) - xp.log1p(-p)
        return scores

    def fit(scores: Any, labels: Any = None) -> ThresholdState:
        scores = _as_scores(scores, "threshold")
        if not _is_concrete(scores, labels):
            raise CalibrationError("threshold: fit runs on the host; call it outside jit/vmap")
        if labels is None:
            raise CalibrationError(
                "threshold: is chosen on labelled data; give binary labels (1 = target class)"
            )
        mask = _as_labels(labels, scores.shape[0], "threshold")
        _check_both_classes(mask, "threshold")
        g = to_space(np.asarray(scores, np.float64), np)
        order = np.argsort(-g, kind="stable")
        g_sorted = g[order]
        values = _objective_at_cuts(np.asarray(mask)[order].astype(np.float64), objective)
        # A cut after position k - 1 is valid only between distinct scores.
        distinct = np.concatenate([[True], g_sorted[:-1] > g_sorted[1:], [True]])
        values = np.where(distinct, values, -np.inf)
        k = int(np.argmax(values))  # first maximum = fewest TC predictions = highest threshold
        n = g.shape[0]
        spread = max(float(g_sorted[0] - g_sorted[-1]), 1.0)
        above = g_sorted[k - 1] if k > 0 else g_sorted[0] + spread
        below = g_sorted[k] if k < n else g_sorted[-1] - spread
        scale = 1.0 if space == "logit" else max(float(np.std(g)), 1e-6)
        dtype = scores.dtype
        return ThresholdState(threshold=jnp.asarray((above + below) / 2, dtype),
                              scale=jnp.asarray(scale, dtype))

    def apply(state: ThresholdState, scores: Array) -> Array:
        return jax.nn.sigmoid((to_space(jnp.asarray(scores)) - state.threshold) / state.scale)

    return Calibration(fit=fit, apply=apply)


def chain(*methods: Calibration) -> Calibration:
    """Methods applied one after the other (cf. `optax.chain`).

    ``fit`` fits the first method on ``(scores, labels)``, applies it, fits the second on its
    output with the same labels, and so on; ``apply`` applies them in order. E.g.
    ``chain(logistic(), threshold("f1", space="logit"))``: a logistic TC probability, then the
    decision threshold on it that maximises TC F1.

    Returns:
      A `Calibration` whose state is a `ChainState` of the methods' states.
    """
    if not methods or not all(isinstance(m, Calibration) for m in methods):
        raise CalibrationError(
            f"chain: needs one or more Calibration, got {[type(m).__name__ for m in methods]}"
        )

    def fit(scores: Any, labels: Any = None) -> ChainState:
        states = []
        for method in methods:
            state = method.fit(scores, labels)
            scores = method.apply(state, scores)
            states.append(state)
        return ChainState(tuple(states))

    def apply(state: ChainState, scores: Array) -> Array:
        for method, s in zip(methods, state.states):
            scores = method.apply(s, scores)
        return scores

    return Calibration(fit=fit, apply=apply)


# --------------------------------------------------------------------------------------------
# Registry.

_FACTORIES: dict[str, Callable[..., Calibration]] = {
    "min_max": min_max,
    "percentile": percentile,
    "iqr": iqr,
    "z_norm": z_norm,
    "temperature": temperature,
    "platt": platt,
}
NAMES: tuple[str, ...] = tuple(_FACTORIES)  # the elementwise score calibrations
SUPERVISED: frozenset[str] = frozenset({"temperature", "platt"})
# Fitted on the weak task's labelled valid split; `logistic` takes several features per image.
VALID_FITTED: tuple[str, ...] = ("logistic", "threshold")
_FACTORIES.update({"logistic": logistic, "threshold": threshold})


def get(name: str, **kwargs: Any) -> Calibration:
    """Builds the calibration method ``name`` with the factory's keyword arguments.

    Args:
      name: one of `NAMES` ("min_max", "percentile", "iqr", "z_norm", "temperature", "platt")
        or `VALID_FITTED` ("logistic", "threshold").
      **kwargs: passed to the factory (e.g. ``get("percentile", lower=5, upper=95)``).

    Raises:
      CalibrationError: unknown name.
    """
    if name not in _FACTORIES:
        raise CalibrationError(
            f"unknown calibration {name!r}; valid names: {', '.join((*NAMES, *VALID_FITTED))}"
        )
    return _FACTORIES[name](**kwargs)


# --------------------------------------------------------------------------------------------
# Calibration error.


class ReliabilityBins(NamedTuple):
    """Per-bin reliability statistics, for ECE and reliability diagrams (B bins).

    Attributes:
      confidence: ``(B,)`` mean predicted TC probability in each bin (NaN for an empty bin).
      accuracy: ``(B,)`` fraction of TC examples in each bin (NaN for an empty bin).
      count: ``(B,)`` int32 number of examples in each bin.
      edges: ``(B + 1,)`` bin edges, ``linspace(0, 1, B + 1)``; bins are ``[e_i, e_{i+1})``,
        the last one closed.
    """

    confidence: Array
    accuracy: Array
    count: Array
    edges: Array


def reliability_bins(probs: Any, labels: Any, num_bins: int = 15) -> ReliabilityBins:
    """Bins predicted target-class probabilities and measures how often each bin is the TC.

    Args:
      probs: ``(N,)`` predicted probability that each example is the target class. Values are
        clipped to [0, 1] first (an unclipped min-max score can fall outside).
      labels: ``(N,)`` binary, 1 = the example is the target class.
      num_bins: number B of equal-width bins on [0, 1].

    Returns:
      A `ReliabilityBins`.
    """
    if not (isinstance(num_bins, int) and num_bins >= 1):
        raise CalibrationError(f"reliability_bins: num_bins must be an int >= 1, got {num_bins!r}")
    probs = jnp.clip(_as_scores(probs, "reliability_bins"), 0.0, 1.0)
    targets = _as_labels(labels, probs.shape[0], "reliability_bins").astype(probs.dtype)
    edges = jnp.linspace(0.0, 1.0, num_bins + 1, dtype=probs.dtype)
    bin_index = jnp.searchsorted(edges[1:-1], probs, side="right")
    count = jax.ops.segment_sum(jnp.ones_like(probs), bin_index, num_segments=num_bins)
    prob_sum = jax.ops.segment_sum(probs, bin_index, num_segments=num_bins)
    pos_sum = jax.ops.segment_sum(targets, bin_index, num_segments=num_bins)
    safe = jnp.maximum(count, 1.0)
    nonempty = count > 0
    chex.assert_shape([count, prob_sum, pos_sum], (num_bins,))
    return ReliabilityBins(
        confidence=jnp.where(nonempty, prob_sum / safe, jnp.nan),
        accuracy=jnp.where(nonempty, pos_sum / safe, jnp.nan),
        count=count.astype(jnp.int32),
        edges=edges,
    )


def expected_calibration_error(probs: Any, labels: Any, num_bins: int = 15) -> Array:
    """Binary expected calibration error of target-class probabilities.

    ``ECE = sum_b (n_b / N) * |accuracy_b - confidence_b|`` over `reliability_bins`, where
    confidence is the mean predicted TC probability in bin b and accuracy the fraction of TC
    examples in it.

    Args:
      probs: ``(N,)`` predicted TC probabilities (clipped to [0, 1]).
      labels: ``(N,)`` binary, 1 = target class.
      num_bins: number of equal-width bins.

    Returns:
      Scalar ECE in [0, 1].
    """
    bins = reliability_bins(probs, labels, num_bins)
    weight = bins.count / jnp.sum(bins.count)
    gap = jnp.where(bins.count > 0, jnp.abs(bins.accuracy - bins.confidence), 0.0)
    return jnp.sum(weight * gap)
