"""Patching weak models with modules (docs/method.md §8): tasks, weak models, patching, metrics, driver.

A *weak* model is trained on a mixed task whose last class is the target class (TC); the
*strong* model (the run's model) recognises the TC well. Patching swaps the weak model's TC
probability for the calibrated TC logit of the strong model's TC *module* (`jaxsplit.compose`):

    patched(x) = argmax concat(softmax(weak(x))[:, :-1], calibrate(module(x)))

Tasks
-----
* ``"self"`` (`make_self_task`), on any N-class dataset: the strong model knows classes A
  (``patch.strong_classes``), the weak model learns classes B (``patch.weak_classes``) plus one
  TC from A, with at most ``patch.tc_train_images`` TC training images. Weak labels: B relabelled
  ``0 .. |B|-1`` in the order given, TC = ``|B|`` (the last class). The weak valid and test
  splits keep every image of B and TC (the test split is the dataset's test split).
* ``"cifar100_cifar10"`` (`make_cifar100_cifar10_task`), the reference's main task: 9 CIFAR-100
  classes + a CIFAR-10 TC with 500 training images (split 80/20 into train/valid) and 100 test
  images; the strong model is a CIFAR-10 model. Loaded through TFDS (`load_cifar100_cifar10`,
  needs internet the first time).

Protocol decision: which strong model
-------------------------------------
The run's strong model may have been trained on all N classes (the demo trains one 10-class
model and modularises it once, to save time) or only on A (the faithful protocol:
``configs/fashion_mnist_self_patch.yaml`` trains the strong model with
``data.classes: [0, 1, 2, 3, 4]``). Either way the module for TC comes from the run's
modularization (``runs/NAME/modularize/modules.npz``, a `jaxsplit.modularize.Modules` file of
either searcher), loaded for the strong model's traced kernel graph (`load_modules`: another
model or other weights are refused) and physically extracted with `Modules.extract`; its output
is the module's TC score (the strong model's TC logit through the module's kernels). Any
traced model works: the jaxsplit ConvNets and the zoo's BatchNorm ResNets / VGGs alike. When the
strong model was trained on a subset, class ids are mapped through ``data.classes`` (TC's module
is class ``data.classes.index(TC)`` of the modules, and the whole model's logit that column).
Training the strong model on all N classes means it has seen the weak classes B as negatives,
which makes its TC module a better one-vs-rest detector than in the faithful protocol; results
of the two are reported separately and must not be mixed. The results record which searcher
made the modules (``modules.searcher``: "ga" or "gradient").

Calibration data
----------------
* Unsupervised calibrations (min-max, percentile, IQR, z-norm) are fitted, as in the reference,
  on the module's outputs on the TC images of the strong model's own **valid** split (images the
  strong model did not train on).
* Learned calibrations (temperature, Platt) need negatives too: they are fitted on held-out
  data = the weak task's valid images of classes B (never TC) plus those same TC valid images,
  with binary labels (1 = TC).
The test split is used only for the reported metrics.

Valid-fitted patches and the validation gate (``summary`` in the results)
------------------------------------------------------------------------
The reference's min-max patch can make a weak model worse: the module has only seen the strong
model's classes, so its score on the weak task's other classes means nothing, and a range fitted
on TC images cannot know that. jaxsplit therefore also fits patches on the weak task's **valid**
split (TC and non-TC images, labelled) and gates them (`choose_on_valid`):

* methods (``patch.decision_methods``; ``patch.method`` is the one users get, default
  ``min_max`` behind the gate, chosen on valid figures: see `jaxsplit.patch_config`):
  ``min_max`` (the reference calibration, out-of-fold on the valid TC images), ``module+f1`` (a valid-chosen
  threshold on the module logit), ``logistic`` (a logistic combination of the module logit and
  the weak model's TC logit, `jaxsplit.compose.compose_joint`) and ``logistic+f1`` (that, then
  the decision threshold that maximises TC F1 on valid);
* valid figures are out-of-fold (``patch.valid_folds`` stratified folds, each predicted by a fit
  on the others); the final fit uses the whole valid split;
* the gate (``patch.gate``) keeps the weak model for a TC unless the patch beats it on valid:
  ``patch.gate_objective`` (TC F1) higher by more than ``patch.gate_min_gain`` and non-TC
  accuracy at most ``patch.gate_non_tc_tolerance`` lower (default 0: not lower at all). It says
  why, e.g. "rejected on valid: F1 86.1 -> 84.0".
Only then is the test split measured (`measure_on_test`): per TC the weak model, the patch, and
the ``final`` model (the patch if accepted, else the weak model).

Metrics (on the weak task's test split, before and after patching): TC precision, recall, F1;
non-TC accuracy (images whose label is not TC; predicting TC for them is an error); overall
accuracy; confusion matrix; the expected calibration error (ECE) of the calibrated module score
as a TC probability; the module's MACs/parameters against the strong model's. A baseline patches
with the WHOLE strong model's TC logit (same calibrations): what modularization costs or gains.

The pure parts (task construction, `patch_metrics`, `evaluate_patch`) take arrays and apply
functions; `run_patch` is the driver (loads the run, trains/caches weak models, writes JSON and
plots).
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxsplit import calibration as calib
from jaxsplit import checkpoint
from jaxsplit import compose as jcompose
from jaxsplit import config as jconfig
from jaxsplit import data as jdata
from jaxsplit import metrics, pipeline
from jaxsplit import plots as jplots
from jaxsplit import train as jtrain
from jaxsplit.errors import JaxsplitError

log = logging.getLogger(__name__)

__all__ = [
    "PatchError",
    "PatchTask",
    "make_self_task",
    "make_cifar100_cifar10_task",
    "CalibrationData",
    "batched",
    "patch_scores",
    "patch_metrics",
    "evaluate_patch",
    "fit_calibration",
    "average_metrics",
    "average_results",
    "acceptance",
    "DecisionData",
    "JOINT_METHODS",
    "decision_method",
    "fit_decision",
    "decision_scores",
    "cross_fit_predictions",
    "gate",
    "choose_on_valid",
    "measure_on_test",
    "patch_decision",
    "decision_summary",
    "format_summary",
    "evaluate_decisions",
    "summary_blocks",
    "load_cifar100_cifar10",
    "weak_config",
    "train_weak",
    "poor_fit_config",
    "train_poor_fit",
    "load_modules",
    "check_extractable",
    "tc_module",
    "module_size",
    "apply_predict",
    "format_table",
    "run_patch",
    "CIFAR100_REFERENCE_CLASSES",
]

CIFAR100_REFERENCE_CLASSES = (0, 2, 5, 8, 9, 12, 15, 22, 70)  # apple baby bed bicycle bottle bridge camel clock rose


class PatchError(JaxsplitError, ValueError):
    """A patching setting or input that cannot be used."""


@dataclasses.dataclass(frozen=True, eq=False)
class PatchTask:
    """A weak model's mixed task; labels live in the weak model's space (TC last).

    Attributes:
      train, valid, test: `jaxsplit.data.Dataset` with ``num_classes = K = |B| + 1``; label
        ``K - 1`` is the TC.
      target_class: the TC's class id in the strong model's dataset (e.g. 0..9 of CIFAR-10).
      weak_classes: the source class ids of weak labels ``0 .. K-2`` (in the weak-side dataset).
      name: a short description for reports.
    """

    train: jdata.Dataset
    valid: jdata.Dataset
    test: jdata.Dataset
    target_class: int
    weak_classes: tuple[int, ...]
    name: str

    @property
    def num_classes(self) -> int:
        """K, the weak model's number of classes."""
        return len(self.weak_classes) + 1

    @property
    def tc_index(self) -> int:
        """The TC's label in the weak model's space (always the last, ``K - 1``)."""
        return len(self.weak_classes)

    def counts(self) -> dict[str, list[int]]:
        """Images per weak class in each split (JSON-ready)."""
        return {s: getattr(self, s).class_counts().tolist() for s in ("train", "valid", "test")}


def _check_class_ids(ids: Sequence[int], num_classes: int, what: str) -> tuple[int, ...]:
    out = []
    for c in ids:
        if isinstance(c, (bool, np.bool_)) or not isinstance(c, (int, np.integer)):
            raise PatchError(f"{what}: class ids must be ints, got {c!r}")
        if not 0 <= int(c) < num_classes:
            raise PatchError(f"{what}: class id {int(c)} is out of range for a {num_classes}-class dataset")
        out.append(int(c))
    if len(set(out)) != len(out):
        raise PatchError(f"{what}: repeated class ids in {out}")
    return tuple(out)


def _check_count(value: int | None, what: str, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise PatchError(f"{what} must be an int >= 1{' or None' if allow_none else ''}, got {value!r}")


def make_self_task(
    train: jdata.Dataset,
    valid: jdata.Dataset,
    test: jdata.Dataset,
    strong_classes: Sequence[int],
    weak_classes: Sequence[int],
    tc: int,
    tc_train_images: int,
    seed: int,
    weak_images_per_class: int | None = None,
) -> PatchTask:
    """The "self" mixed task on one N-class dataset.

    Args:
      train, valid, test: the dataset's splits, N-class labels, same image shape.
      strong_classes: A, the strong model's classes (TC must be one of them).
      weak_classes: B, the weak model's own classes (disjoint from A).
      tc: the target class, a member of A.
      tc_train_images: keep at most this many TC images in the weak training split (chosen at
        random by ``seed``); valid and test keep every TC image.
      seed: seed of that choice.
      weak_images_per_class: keep at most this many training images of each class of B
        (None: all); valid and test keep every image.

    Returns:
      A `PatchTask` with labels ``B -> 0 .. |B|-1`` (in the given order) and ``TC -> |B|``.
    """
    num_classes = train.num_classes
    for name, ds in (("valid", valid), ("test", test)):
        if ds.num_classes != num_classes:
            raise PatchError(f"{name} has {ds.num_classes} classes but train has {num_classes}")
        if ds.image_shape != train.image_shape:
            raise PatchError(f"{name} images are {ds.image_shape} but train images are {train.image_shape}")
    strong = _check_class_ids(strong_classes, num_classes, "strong_classes")
    weak = _check_class_ids(weak_classes, num_classes, "weak_classes")
    (tc,) = _check_class_ids([tc], num_classes, "tc")
    if not weak:
        raise PatchError("weak_classes must name at least one class")
    if tc not in strong:
        raise PatchError(f"target class {tc} is not among strong_classes {strong}")
    overlap = sorted(set(strong) & set(weak))
    if overlap:
        raise PatchError(f"weak_classes {weak} overlap strong_classes {strong} at {overlap}")
    _check_count(tc_train_images, "tc_train_images")
    _check_count(weak_images_per_class, "weak_images_per_class", allow_none=True)
    classes = (*weak, tc)
    tc_index = len(weak)
    train_w = jdata.select_classes(train, classes, relabel=True)
    train_w = jdata.subsample_per_class(seed, train_w, int(tc_train_images), classes=[tc_index])
    name = f"self: classes {list(weak)} + TC {tc} (<= {tc_train_images} TC train images"
    if weak_images_per_class is not None:
        train_w = jdata.subsample_per_class(seed, train_w, int(weak_images_per_class),
                                            classes=list(range(tc_index)))
        name += f", <= {weak_images_per_class} per weak class"
    valid_w = jdata.select_classes(valid, classes, relabel=True)
    test_w = jdata.select_classes(test, classes, relabel=True)
    return PatchTask(train_w, valid_w, test_w, tc, weak, name=name + ")")


def make_cifar100_cifar10_task(
    cifar100_train: jdata.Dataset,
    cifar100_test: jdata.Dataset,
    cifar10_train: jdata.Dataset,
    cifar10_test: jdata.Dataset,
    cifar100_classes: Sequence[int],
    tc: int,
    *,
    tc_train_images: int = 500,
    tc_test_images: int | None = 100,
    valid_fraction: float = 0.2,
    split_seed: int = 1009,
    seed: int = 0,
) -> PatchTask:
    """The reference's mixed task: CIFAR-100 classes + one CIFAR-10 target class.

    As the reference (``experiments/patch/patch_for_weak_model/train.py``): the chosen CIFAR-100
    classes of the (unsplit) train set are split ``1 - valid_fraction`` / ``valid_fraction`` by
    ``split_seed``; ``tc_train_images`` random TC images of the CIFAR-10 train set (as many as a
    CIFAR-100 class has) are split the same way; the test split is the CIFAR-100 test images of
    the chosen classes plus ``tc_test_images`` TC test images (as many as a CIFAR-100 class has;
    None: all). Works on any datasets with these roles (tests use small arrays).

    Args:
      cifar100_train, cifar100_test: the weak side's dataset (unsplit train, test).
      cifar10_train, cifar10_test: the strong side's dataset (unsplit train, test).
      cifar100_classes: the weak classes B (CIFAR-100 ids; reference
        `CIFAR100_REFERENCE_CLASSES`).
      tc: the TC, a CIFAR-10 class id.
      tc_train_images: TC images taken from the CIFAR-10 train set (train + valid).
      tc_test_images: TC test images kept (the first ones), or None for all.
      valid_fraction, split_seed: the 80/20 split (reference seed 1009).
      seed: seed of the choice of TC images.

    Returns:
      A `PatchTask`; labels: B -> ``0 .. |B|-1``, TC -> ``|B|``.
    """
    for name, ds in (("cifar100_test", cifar100_test), ("cifar10_train", cifar10_train),
                     ("cifar10_test", cifar10_test)):
        if ds.image_shape != cifar100_train.image_shape:
            raise PatchError(f"{name} images are {ds.image_shape} but cifar100_train images are "
                             f"{cifar100_train.image_shape}")
    weak = _check_class_ids(cifar100_classes, cifar100_train.num_classes, "cifar100_classes")
    if not weak:
        raise PatchError("cifar100_classes must name at least one class")
    (tc,) = _check_class_ids([tc], cifar10_train.num_classes, "tc")
    _check_count(tc_train_images, "tc_train_images")
    _check_count(tc_test_images, "tc_test_images", allow_none=True)
    tc_index = len(weak)
    k = tc_index + 1

    def weak_side(ds: jdata.Dataset) -> jdata.Dataset:
        return jdata.select_classes(ds, weak, relabel=True)

    def tc_side(ds: jdata.Dataset) -> jdata.Dataset:
        return jdata.select_classes(ds, [tc], relabel=True)  # one class, label 0

    train_b, valid_b = jdata.split(weak_side(cifar100_train), valid_fraction, split_seed)
    tc_all = tc_side(cifar10_train)
    if len(tc_all) == 0:
        raise PatchError(f"cifar10_train has no image of target class {tc}")
    tc_pool = jdata.subsample_per_class(seed, tc_all, int(tc_train_images))
    train_t, valid_t = jdata.split(tc_pool, valid_fraction, split_seed)
    test_t = tc_side(cifar10_test)
    if tc_test_images is not None:
        test_t = jdata.take(test_t, int(tc_test_images))

    names = None
    if cifar100_train.class_names is not None and cifar10_train.class_names is not None:
        names = tuple(cifar100_train.class_names[c] for c in weak) + (cifar10_train.class_names[tc],)

    def mix(b: jdata.Dataset, t: jdata.Dataset) -> jdata.Dataset:
        b = dataclasses.replace(b, class_names=None)
        t = dataclasses.replace(t, class_names=None)
        return dataclasses.replace(jdata.concat(b, t, offset_labels=tc_index, num_classes=k),
                                   class_names=names)

    return PatchTask(mix(train_b, train_t), mix(valid_b, valid_t), mix(weak_side(cifar100_test), test_t),
                     tc, weak,
                     name=f"cifar100_cifar10: CIFAR-100 classes {list(weak)} + CIFAR-10 TC {tc} "
                          f"({tc_train_images} TC images)")


# --------------------------------------------------------------------------------------------
# Patching and its metrics (pure: arrays and apply functions in, JSON-ready dicts out).


class CalibrationData(NamedTuple):
    """The module's raw TC scores on the data its calibrations are fitted on.

    Attributes:
      tc_scores: ``(M,)`` scores on TC valid images (fit of the unsupervised methods).
      heldout_scores: ``(M2,)`` scores on held-out labelled images (fit of the learned methods).
      heldout_labels: ``(M2,)`` binary, 1 = TC.
    """

    tc_scores: np.ndarray
    heldout_scores: np.ndarray
    heldout_labels: np.ndarray


def fit_calibration(name: str, data: CalibrationData) -> tuple[calib.Calibration, Any]:
    """Fits calibration ``name`` on the right part of ``data``.

    Unsupervised methods see ``tc_scores`` only (the reference's fit on TC valid images);
    ``temperature``/``platt`` see ``heldout_scores`` with their binary labels.

    Returns:
      ``(method, state)``, the pair `jaxsplit.compose.compose` accepts as ``calibrate``.
    """
    method = calib.get(name)
    if name in calib.SUPERVISED:
        state = method.fit(jnp.asarray(data.heldout_scores), jnp.asarray(data.heldout_labels))
    else:
        state = method.fit(jnp.asarray(data.tc_scores))
    return method, state


def _weak_logits(inputs: dict) -> jax.Array:
    return inputs["weak"]


def _module_scores(inputs: dict) -> jax.Array:
    return inputs["module"]


def patch_scores(
    weak_logits: Any,
    module_scores: Any,
    calibrate: jcompose.CalibrateLike,
    tc_index: int = -1,
) -> jax.Array:
    """Patched scores from precomputed outputs, through `jaxsplit.compose.compose`.

    The weak model and the module are each run once over the test images; `compose` is then
    applied to lookups of those outputs, so trying several calibrations costs no forward pass.

    Args:
      weak_logits: ``(N, K)`` weak model logits.
      module_scores: ``(N,)`` raw module TC scores.
      calibrate: what `compose` accepts (a fitted ``(Calibration, state)`` pair, a callable,
        or None).
      tc_index: the TC column of the weak model.

    Returns:
      ``(N, K)`` patched scores; argmax is the patched prediction.
    """
    patched = jcompose.compose(_weak_logits, _module_scores, target_index=tc_index,
                               calibrate=calibrate)
    return patched({"weak": jnp.asarray(weak_logits), "module": jnp.asarray(module_scores)})


def _state_dict(state: Any) -> dict[str, float]:
    if hasattr(state, "_asdict"):
        return {k: float(v) for k, v in state._asdict().items()}
    return {}


def patch_metrics(
    weak_logits: Any,
    module_scores: Any,
    labels: Any,
    tc_index: int,
    calibrations: Sequence[str],
    calibration_data: CalibrationData,
    num_bins: int = 15,
) -> dict:
    """Before/after metrics of patching one weak model with one module.

    Args:
      weak_logits: ``(N, K)`` weak model logits on the test images.
      module_scores: ``(N,)`` raw module TC scores on the same images.
      labels: ``(N,)`` weak-space labels.
      tc_index: the TC's label.
      calibrations: names (`jaxsplit.calibration.NAMES`).
      calibration_data: the module's scores to fit the calibrations on.
      num_bins: bins of the expected calibration error.

    Returns:
      ``{"before": m, "after": {name: m}}`` where ``m`` is
      `jaxsplit.metrics.target_class_summary` plus ``tc_ece`` (ECE of the TC probability: the
      weak softmax before, the calibrated module score after) and, after, the fitted
      ``calibration_state``.
    """
    weak_logits = np.asarray(weak_logits)
    labels = np.asarray(labels)
    module_scores = np.asarray(module_scores)
    if weak_logits.ndim != 2 or weak_logits.shape[0] != labels.shape[0]:
        raise PatchError(f"weak_logits must be (N, K) with N = {labels.shape[0]} labels, got {weak_logits.shape}")
    if module_scores.shape != labels.shape:
        raise PatchError(f"module_scores must be (N,) with N = {labels.shape[0]} labels, got {module_scores.shape}")
    num_classes = weak_logits.shape[1]
    if not 0 <= tc_index < num_classes:
        raise PatchError(f"tc_index {tc_index} is out of range for {num_classes} weak classes")
    is_tc = (labels == tc_index).astype(np.int32)
    before = metrics.target_class_summary(labels, weak_logits.argmax(-1), num_classes, tc_index)
    weak_tc_prob = jax.nn.softmax(jnp.asarray(weak_logits), axis=-1)[:, tc_index]
    before["tc_ece"] = float(calib.expected_calibration_error(weak_tc_prob, is_tc, num_bins))
    after = {}
    for name in calibrations:
        method, state = fit_calibration(name, calibration_data)
        scores = np.asarray(patch_scores(weak_logits, module_scores, (method, state), tc_index))
        m = metrics.target_class_summary(labels, scores.argmax(-1), num_classes, tc_index)
        m["tc_ece"] = float(calib.expected_calibration_error(scores[:, tc_index], is_tc, num_bins))
        m["calibration_state"] = _state_dict(state)
        after[name] = m
    return {"before": before, "after": after}


PredictFn = Callable[[np.ndarray], np.ndarray]


def batched(apply_fn: Callable[[jax.Array], jax.Array], batch_size: int = 1000) -> PredictFn:
    """A host predictor from a pure apply function: jitted once, run in fixed-size batches.

    Args:
      apply_fn: ``images (B, H, W, C) -> outputs (B, ...)``, pure and jit-able.
      batch_size: B. Every batch (the last one zero-padded) has exactly this size, so one
        compilation serves every call whatever N.

    Returns:
      ``predict(images (N, H, W, C)) -> numpy outputs (N, ...)``.
    """
    _check_count(batch_size, "batch_size")
    return _padded_batches(jax.jit(apply_fn), int(batch_size))


def _padded_batches(fn: Callable[[jax.Array], Any], size: int) -> PredictFn:
    """``predict(images)``: ``fn`` on fixed-size batches of ``size`` (the last zero-padded)."""

    def predict(images: np.ndarray) -> np.ndarray:
        images = np.asarray(images)
        n = images.shape[0]
        if n == 0:
            raise PatchError("cannot predict on zero images")
        outs = []
        for start in range(0, n, size):
            batch = images[start:start + size]
            pad = size - batch.shape[0]
            if pad:
                batch = np.concatenate([batch, np.zeros((pad, *batch.shape[1:]), batch.dtype)])
            outs.append(np.asarray(fn(jnp.asarray(batch)))[: size - pad])
        return np.concatenate(outs)

    return predict


def _as_scores(out: np.ndarray, what: str) -> np.ndarray:
    if out.ndim == 2 and out.shape[1] == 1:
        out = out[:, 0]
    if out.ndim != 1:
        raise PatchError(f"{what} must return (N,) or (N, 1) TC scores, got shape {out.shape}")
    return out


def evaluate_patch(
    weak_predict: PredictFn,
    module_predict: PredictFn,
    task: PatchTask,
    tc_valid_images: np.ndarray,
    calibrations: Sequence[str],
    *,
    num_bins: int = 15,
    weak_test_logits: np.ndarray | None = None,
) -> dict:
    """Runs a weak model and a TC module over a task and measures patching (`patch_metrics`).

    Each model runs once per image set (host predictors, e.g. `batched(apply_fn)` or
    `jaxsplit.train.predict_logits`); the patched model is then `jaxsplit.compose.compose` of
    the two on those outputs (`patch_scores`), once per calibration.

    Args:
      weak_predict: ``images (N, H, W, C) -> (N, K)`` weak logits.
      module_predict: ``images -> (N,)`` or ``(N, 1)`` raw TC scores (a module, or a whole
        model's TC logit for the baseline).
      task: the weak task (its ``test`` split is measured; its ``valid`` images of the non-TC
        classes are the negatives of the learned calibrations' held-out data).
      tc_valid_images: ``(M, H, W, C)`` TC images of the strong model's valid split: the
        unsupervised calibrations' fit data and the positives of the learned ones.
      calibrations: calibration names.
      num_bins: ECE bins.
      weak_test_logits: precomputed ``weak_predict(task.test.images)`` (reused across modules).

    Returns:
      The dict of `patch_metrics`.
    """
    if len(tc_valid_images) == 0:
        raise PatchError(f"no TC valid image to fit the calibrations of target class {task.target_class}")
    if weak_test_logits is None:
        weak_test_logits = np.asarray(weak_predict(task.test.images))
    test_scores = _as_scores(np.asarray(module_predict(task.test.images)), "module_predict")
    tc_scores = _as_scores(np.asarray(module_predict(tc_valid_images)), "module_predict")
    negatives = task.valid.images[task.valid.labels != task.tc_index]
    if len(negatives):
        neg_scores = _as_scores(np.asarray(module_predict(negatives)), "module_predict")
    else:
        neg_scores = np.zeros((0,), tc_scores.dtype)
    data = CalibrationData(
        tc_scores=tc_scores,
        heldout_scores=np.concatenate([neg_scores, tc_scores]),
        heldout_labels=np.concatenate([np.zeros(len(neg_scores), np.int32), np.ones(len(tc_scores), np.int32)]),
    )
    return patch_metrics(weak_test_logits, test_scores, task.test.labels, task.tc_index, calibrations,
                         data, num_bins)


# --------------------------------------------------------------------------------------------
# Decisions fitted on the weak task's valid split, the validation gate, and the per-TC summary
# (pure: arrays in, JSON-ready dicts out). The test split is only measured, after every choice.

# Method specs of the valid-fitted family (`patch.decision_methods`, `patch.method`):
#   a name of `jaxsplit.calibration.NAMES` (min_max: the reference) -> that calibration of the
#     module score, composed with the reference rule (`jaxsplit.compose.compose`); the
#     unsupervised ones fit on the valid TC images, temperature/platt on all valid images;
#   "logistic"               -> a logistic TC probability from (module logit, weak TC logit);
#   "logistic+f1" / "+accuracy" -> that, then the valid-chosen threshold for TC F1 / accuracy;
#   "module+f1" / "+accuracy"   -> a valid-chosen threshold on the module logit alone;
# the last three kinds are composed with `jaxsplit.compose.compose_joint` (TC iff score > 0.5).
JOINT_METHODS = ("logistic", "logistic+f1", "logistic+accuracy", "module+f1", "module+accuracy")
GATE_OBJECTIVES = ("tc_f1", "accuracy")
_REPORTED = ("tc_precision", "tc_recall", "tc_f1", "non_tc_accuracy", "accuracy")


class DecisionData(NamedTuple):
    """Outputs of the weak model and the module on one labelled split of the weak task.

    Attributes:
      weak_logits: ``(N, K)`` weak model logits.
      module_scores: ``(N,)`` raw module TC logits.
      labels: ``(N,)`` weak-space labels (TC = ``tc_index``).
    """

    weak_logits: np.ndarray
    module_scores: np.ndarray
    labels: np.ndarray


class _Column(NamedTuple):
    pass


def _column(index: int) -> calib.Calibration:
    """A parameter-free 'calibration' that picks one feature column."""
    return calib.Calibration(fit=lambda scores, labels=None: _Column(),
                             apply=lambda state, scores: jnp.asarray(scores)[:, index])


def decision_method(spec: str) -> tuple[str, calib.Calibration]:
    """``(kind, calibration)`` of a method spec; kind ``"score"`` (module score, reference rule)
    or ``"joint"`` (`jaxsplit.compose.joint_features`, TC iff calibrated score > 0.5)."""
    if spec in calib.NAMES:
        return "score", calib.get(spec)
    if spec == "logistic":
        return "joint", calib.logistic()
    base, _, objective = spec.partition("+")
    if spec in JOINT_METHODS and base == "logistic":
        return "joint", calib.chain(calib.logistic(), calib.threshold(objective, space="logit"))
    if spec in JOINT_METHODS and base == "module":
        return "joint", calib.chain(_column(0), calib.threshold(objective))
    raise PatchError(f"unknown patch method {spec!r}; expected one of {(*calib.NAMES, *JOINT_METHODS)}")


def _check_decision_data(data: DecisionData, tc_index: int, what: str) -> DecisionData:
    weak = np.asarray(data.weak_logits, np.float32)
    scores = np.asarray(data.module_scores, np.float32)
    labels = np.asarray(data.labels)
    if weak.ndim != 2 or weak.shape[0] != labels.shape[0] or labels.ndim != 1:
        raise PatchError(f"{what}: weak_logits must be (N, K) with N = len(labels) = {labels.shape[0]}, "
                         f"got {weak.shape}")
    if scores.shape != labels.shape:
        raise PatchError(f"{what}: module_scores must be ({labels.shape[0]},), got {scores.shape}")
    if not 0 <= tc_index < weak.shape[1]:
        raise PatchError(f"{what}: tc_index {tc_index} is out of range for {weak.shape[1]} weak classes")
    return DecisionData(weak, scores, labels)


_BUCKET = 1024  # row counts are padded to a multiple of this for eager jnp ops (few compilations)


def _padded(fn: Callable[..., Any], *arrays: np.ndarray) -> np.ndarray:
    """``fn(*arrays)`` row-wise, with the rows zero-padded to a multiple of `_BUCKET` and cut back."""
    n = arrays[0].shape[0]
    pad = -n % _BUCKET
    padded = [np.concatenate([a, np.zeros((pad, *a.shape[1:]), a.dtype)]) if pad else a for a in arrays]
    return np.asarray(fn(*(jnp.asarray(a) for a in padded)))[:n]


def fit_decision(spec: str, data: DecisionData, tc_index: int) -> tuple[str, calib.Calibration, Any]:
    """Fits method ``spec`` on labelled data (the weak task's valid split, or folds of it).

    Returns:
      ``(kind, calibration, state)`` for `decision_scores`.
    """
    kind, method = decision_method(spec)
    is_tc = (np.asarray(data.labels) == tc_index).astype(np.int32)
    if kind == "joint":
        features = _padded(lambda w, m: jcompose.joint_features(w, m, tc_index), np.asarray(data.weak_logits),
                           np.asarray(data.module_scores))
        state = method.fit(jnp.asarray(features), jnp.asarray(is_tc))
    elif spec in calib.SUPERVISED:
        state = method.fit(jnp.asarray(data.module_scores), jnp.asarray(is_tc))
    else:  # the reference: fitted on the TC images only
        state = method.fit(jnp.asarray(data.module_scores[is_tc == 1]))
    return kind, method, state


def decision_scores(kind: str, method: calib.Calibration, state: Any, weak_logits: Any, module_scores: Any,
                    tc_index: int) -> np.ndarray:
    """``(N, K)`` patched scores of a fitted method (argmax = the patched prediction)."""
    if kind == "score":
        return _padded(lambda w, m: patch_scores(w, m, (method, state), tc_index), np.asarray(weak_logits),
                       np.asarray(module_scores))
    patched = jcompose.compose_joint(_weak_logits, _module_scores, (method, state), target_index=tc_index)
    return _padded(lambda w, m: patched({"weak": w, "module": m}), np.asarray(weak_logits),
                   np.asarray(module_scores))


def _fold_ids(labels: np.ndarray, tc_index: int, num_folds: int, seed: int) -> np.ndarray:
    """A fold per example, stratified by TC / non-TC, deterministic in ``seed``."""
    rng = np.random.default_rng(seed)
    folds = np.empty(labels.shape[0], np.int64)
    for group in (labels == tc_index, labels != tc_index):
        idx = np.flatnonzero(group)
        folds[rng.permutation(idx)] = np.arange(idx.size) % num_folds
    return folds


def cross_fit_predictions(spec: str, data: DecisionData, tc_index: int, num_folds: int = 5,
                          seed: int = 0) -> np.ndarray:
    """Out-of-fold predictions ``(N,)`` of method ``spec`` on ``data``: each fold is predicted by
    the method fitted on the other folds, so valid figures are not measured on the fit data."""
    _check_count(num_folds, "num_folds")
    if num_folds < 2:
        raise PatchError(f"num_folds must be >= 2 for out-of-fold predictions, got {num_folds}")
    folds = _fold_ids(np.asarray(data.labels), tc_index, num_folds, seed)
    preds = np.empty(folds.shape, np.int64)
    for f in range(num_folds):
        fit_idx, pred_idx = folds != f, folds == f
        kind, method, state = fit_decision(spec, DecisionData(*(np.asarray(a)[fit_idx] for a in data)), tc_index)
        scores = decision_scores(kind, method, state, data.weak_logits[pred_idx], data.module_scores[pred_idx],
                                 tc_index)
        preds[pred_idx] = scores.argmax(-1)
    return preds


def _pick(m: dict) -> dict:
    return {k: float(m[k]) for k in _REPORTED}


def gate(before: dict, after: dict, *, objective: str = "tc_f1", non_tc_tolerance: float = 0.0,
         min_gain: float = 0.0) -> dict:
    """Accept a patch only when it beats the weak model on valid.

    Accepted iff ``after[objective] > before[objective] + min_gain`` and
    ``after["non_tc_accuracy"] >= before["non_tc_accuracy"] - non_tc_tolerance`` (fractions).

    Args:
      before, after: `jaxsplit.metrics.target_class_summary`-style dicts of the weak and the
        patched model on the weak task's valid split.

    Returns:
      ``{"accepted", "objective", "before", "after", "non_tc_before", "non_tc_after", "reason"}``;
      reason reads e.g. "rejected on valid: F1 86.1 -> 84.0".
    """
    if objective not in GATE_OBJECTIVES:
        raise PatchError(f"gate objective must be one of {GATE_OBJECTIVES}, got {objective!r}")
    label = {"tc_f1": "F1", "accuracy": "accuracy"}[objective]
    b, a = float(before[objective]), float(after[objective])
    nb, na = float(before["non_tc_accuracy"]), float(after["non_tc_accuracy"])
    gain_ok = a > b + min_gain
    non_tc_ok = na >= nb - non_tc_tolerance
    accepted = bool(gain_ok and non_tc_ok)
    reason = f"{'accepted' if accepted else 'rejected'} on valid: {label} {100 * b:.1f} -> {100 * a:.1f}"
    if not non_tc_ok:
        reason += f", non-TC accuracy {100 * nb:.1f} -> {100 * na:.1f} (tolerance {100 * non_tc_tolerance:.1f})"
    elif accepted or gain_ok:
        reason += f", non-TC accuracy {100 * nb:.1f} -> {100 * na:.1f}"
    return {"accepted": accepted, "objective": objective, "before": b, "after": a, "non_tc_before": nb,
            "non_tc_after": na, "reason": reason}


def choose_on_valid(valid: DecisionData, tc_index: int, methods: Sequence[str], *, gate_on: bool = True,
                    objective: str = "tc_f1", non_tc_tolerance: float = 0.0, min_gain: float = 0.0,
                    num_folds: int = 5, seed: int = 0) -> dict:
    """Every choice of a TC's patch, made on the weak task's valid split only (no test input).

    For each method: its out-of-fold valid figures (`cross_fit_predictions`), its fit on the
    whole valid split (the state used on test), and the gate's verdict on the out-of-fold
    figures (``gate_on=False``: always accepted).

    Returns:
      ``{"before": weak valid metrics, "methods": {spec: {"after", "gate", "state"}}}`` plus
      the fitted ``(kind, calibration, state)`` under the private key ``"_fitted"``.
    """
    valid = _check_decision_data(valid, tc_index, "valid")
    num_classes = valid.weak_logits.shape[1]
    before = metrics.target_class_summary(valid.labels, valid.weak_logits.argmax(-1), num_classes, tc_index)
    out: dict = {"before": _pick(before), "methods": {}, "_fitted": {}}
    for spec in methods:
        try:
            preds = cross_fit_predictions(spec, valid, tc_index, num_folds, seed)
            fitted = fit_decision(spec, valid, tc_index)
        except calib.CalibrationError as e:  # e.g. constant scores in a small fold: keep the weak model
            reason = f"rejected on valid: {spec} cannot be fitted on this valid split ({e})"
            out["methods"][spec] = {"after": _pick(before), "state": None, "gate": {
                "accepted": False, "objective": objective, "before": float(before[objective]),
                "after": float(before[objective]), "non_tc_before": float(before["non_tc_accuracy"]),
                "non_tc_after": float(before["non_tc_accuracy"]), "reason": reason}}
            out["_fitted"][spec] = None
            continue
        after = metrics.target_class_summary(valid.labels, preds, num_classes, tc_index)
        verdict = gate(before, after, objective=objective, non_tc_tolerance=non_tc_tolerance, min_gain=min_gain)
        if not gate_on:
            verdict = {**verdict, "accepted": True, "reason": "gate off: " + verdict["reason"].split(" on valid: ")[1]}
        out["methods"][spec] = {"after": _pick(after), "gate": verdict, "state": _tree_dict(fitted[2])}
        out["_fitted"][spec] = fitted
    return out


def _tree_dict(state: Any) -> Any:
    """A fitted state as JSON-ready nested lists / dicts."""
    if hasattr(state, "_asdict"):
        return {k: _tree_dict(v) for k, v in state._asdict().items()}
    if isinstance(state, (tuple, list)):
        return [_tree_dict(v) for v in state]
    arr = np.asarray(state)
    return arr.tolist() if arr.ndim else float(arr)


def measure_on_test(choices: dict, test: DecisionData, tc_index: int) -> dict:
    """Test figures of the choices of `choose_on_valid` (nothing is fitted or chosen here).

    Returns:
      ``{"before": weak, "methods": {spec: {"patched": m, "final": m}}}``: ``patched`` is the
      method's patch whatever the gate said, ``final`` what the user gets (the patch when
      accepted, else the weak model).
    """
    test = _check_decision_data(test, tc_index, "test")
    num_classes = test.weak_logits.shape[1]
    before = _pick(metrics.target_class_summary(test.labels, test.weak_logits.argmax(-1), num_classes, tc_index))
    out = {"before": before, "methods": {}}
    for spec, fitted in choices["_fitted"].items():
        if fitted is None:  # could not be fitted on valid: the weak model is kept
            out["methods"][spec] = {"patched": before, "final": before}
            continue
        kind, method, state = fitted
        scores = decision_scores(kind, method, state, test.weak_logits, test.module_scores, tc_index)
        patched = _pick(metrics.target_class_summary(test.labels, scores.argmax(-1), num_classes, tc_index))
        accepted = choices["methods"][spec]["gate"]["accepted"]
        out["methods"][spec] = {"patched": patched, "final": patched if accepted else before}
    return out


def patch_decision(valid: DecisionData, test: DecisionData, tc_index: int, methods: Sequence[str],
                   **choose_kwargs: Any) -> dict:
    """`choose_on_valid`, then `measure_on_test`: ``{"valid": ..., "test": ...}`` (JSON-ready)."""
    choices = choose_on_valid(valid, tc_index, methods, **choose_kwargs)
    test_part = measure_on_test(choices, test, tc_index)
    choices.pop("_fitted")
    return {"valid": choices, "test": test_part}


def _decision_kwargs(pcfg: Any) -> dict:
    return {"gate_on": pcfg.gate, "objective": pcfg.gate_objective, "non_tc_tolerance": pcfg.gate_non_tc_tolerance,
            "min_gain": pcfg.gate_min_gain, "num_folds": pcfg.valid_folds, "seed": pcfg.seed}


def _delta(after: dict, before: dict) -> dict:
    return {k: float(after[k] - before[k]) for k in _REPORTED}


SUMMARY_DEFINITIONS = {
    "improved_both": "test TC precision and TC recall both higher than the weak model's",
    "worse": "test TC F1 lower than the weak model's",
    "worse_non_tc": "test non-TC accuracy lower than the weak model's",
    "low_recall": "TCs whose weak model has test TC recall below 90% (measured, not a choice)",
    "final": "what the user gets: the patch where the gate accepted it on valid, else the weak model",
    "valid after": "out-of-fold figures on the weak task's valid split (each fold predicted by a fit on the others)",
}


def decision_summary(per_tc: dict[str, dict], method: str) -> dict:
    """The per-TC and averaged report of one method after the gate (``results["summary"]``).

    Args:
      per_tc: ``{tc: entry}`` with ``entry["decision"]`` from `patch_decision` and
        ``entry["class_name"]``.
      method: the method spec.

    Returns:
      JSON-ready: ``method``, ``per_tc`` (list of rows: ``target_class``, ``class_name``,
      ``accepted``, ``reason``, ``valid`` {before, after}, ``test`` {before, patched, final},
      ``delta_test`` (final - before), ``improved_both``, ``worse``, ``worse_non_tc``),
      ``average`` {valid: {before, after}, test: {before, patched, final}, delta_test},
      ``num_tcs``, ``num_accepted``, ``num_improved_both``, ``num_worse``, ``num_worse_non_tc``,
      ``low_recall`` {target_classes, delta_tc_f1}, ``definitions``.
    """
    rows = []
    for tc, entry in per_tc.items():
        d = entry["decision"]
        v, t = d["valid"]["methods"][method], d["test"]["methods"][method]
        before, final = d["test"]["before"], t["final"]
        delta = _delta(final, before)
        rows.append({
            "target_class": int(entry.get("target_class", tc)), "class_name": entry.get("class_name", str(tc)),
            "accepted": v["gate"]["accepted"], "reason": v["gate"]["reason"],
            "valid": {"before": d["valid"]["before"], "after": v["after"]},
            "test": {"before": before, "patched": t["patched"], "final": final},
            "delta_test": delta,
            "improved_both": bool(delta["tc_precision"] > 0 and delta["tc_recall"] > 0),
            "worse": bool(delta["tc_f1"] < 0), "worse_non_tc": bool(delta["non_tc_accuracy"] < 0)})
    if not rows:
        raise PatchError("no target class to summarise")

    def mean(get: Callable[[dict], dict]) -> dict:
        return {k: float(np.mean([get(r)[k] for r in rows])) for k in _REPORTED}

    average = {"valid": {"before": mean(lambda r: r["valid"]["before"]), "after": mean(lambda r: r["valid"]["after"])},
               "test": {s: mean(lambda r, s=s: r["test"][s]) for s in ("before", "patched", "final")}}
    average["delta_test"] = _delta(average["test"]["final"], average["test"]["before"])
    low = [r for r in rows if r["test"]["before"]["tc_recall"] < 0.9]
    return {
        "method": method,
        "per_tc": rows,
        "average": average,
        "num_tcs": len(rows),
        "num_accepted": sum(r["accepted"] for r in rows),
        "num_improved_both": sum(r["improved_both"] for r in rows),
        "num_worse": sum(r["worse"] for r in rows),
        "num_worse_non_tc": sum(r["worse_non_tc"] for r in rows),
        "low_recall": {"target_classes": [r["target_class"] for r in low],
                       "delta_tc_f1": float(np.mean([r["delta_test"]["tc_f1"] for r in low])) if low else None},
        "definitions": SUMMARY_DEFINITIONS,
    }


def format_summary(summary: dict) -> str:
    """Plain-text per-TC table of a `decision_summary` (test split, weak -> what the user gets)."""
    def pair(b: dict, a: dict, k: str) -> str:
        return f"{100 * b[k]:6.2f} -> {100 * a[k]:6.2f}"

    lines = [f"patch method {summary['method']} with the validation gate (test split: weak -> final)",
             f"{'TC':<16} {'gate':<9} {'TC precision %':>16}   {'TC recall %':>16}   {'TC F1 %':>16}   "
             f"{'non-TC acc %':>16}   valid"]
    for r in summary["per_tc"]:
        b, f = r["test"]["before"], r["test"]["final"]
        lines.append(f"{str(r['target_class']) + ' ' + r['class_name']:<16} "
                     f"{'accepted' if r['accepted'] else 'rejected':<9} "
                     + "   ".join(pair(b, f, k) for k in ("tc_precision", "tc_recall", "tc_f1", "non_tc_accuracy"))
                     + f"   {r['reason'].split(' on valid: ')[1]}")
    avg = summary["average"]["test"]
    lines.append(f"{'mean':<16} {'':<9} " + "   ".join(pair(avg["before"], avg["final"], k) for k in
                                                     ("tc_precision", "tc_recall", "tc_f1", "non_tc_accuracy")))
    low = summary["low_recall"]
    lines.append(f"{summary['num_accepted']}/{summary['num_tcs']} accepted; improved on both precision and recall: "
                 f"{summary['num_improved_both']}; worse TC F1: {summary['num_worse']}; worse non-TC accuracy: "
                 f"{summary['num_worse_non_tc']}"
                 + (f"; TCs with weak recall < 90% {low['target_classes']}: TC F1 {100 * low['delta_tc_f1']:+.2f} pts"
                    if low["target_classes"] else ""))
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Aggregation over target classes.

_AVERAGED = ("tc_precision", "tc_recall", "tc_f1", "non_tc_accuracy", "accuracy", "tc_ece")
ACCEPTANCE_CRITERION = ("averaged over the target classes, the patched models improve TC precision and "
                        "TC recall over the weak models and lower non-TC accuracy by at most 1 point")


def average_metrics(per_tc: Sequence[dict]) -> dict[str, float]:
    """Mean of the scalar metrics (`_AVERAGED`) over target classes."""
    if not per_tc:
        raise PatchError("no per-target-class metrics to average")
    return {k: float(np.mean([m[k] for m in per_tc])) for k in _AVERAGED if all(k in m for m in per_tc)}


def average_results(per_tc: dict[str, dict], calibrations: Sequence[str]) -> dict:
    """Averages of `patch_metrics`-style results over target classes.

    Args:
      per_tc: ``{tc: {"before": m, "module_patch": {cal: m}, "whole_model_patch": {cal: m}}}``.
      calibrations: the calibration names.

    Returns:
      ``{"before": avg, "module_patch": {cal: avg}, "whole_model_patch": {cal: avg}}``.
    """
    rows = list(per_tc.values())
    out = {"before": average_metrics([r["before"] for r in rows])}
    for kind in ("module_patch", "whole_model_patch"):
        if all(kind in r for r in rows):
            out[kind] = {c: average_metrics([r[kind][c] for r in rows]) for c in calibrations}
    return out


def acceptance(average: dict, calibration: str, max_non_tc_drop: float = 0.01) -> dict:
    """The project's acceptance check on averaged results, for one (pre-declared) calibration.

    Passed when the patched models' mean TC precision and mean TC recall are both higher than the
    weak models', and mean non-TC accuracy is at most ``max_non_tc_drop`` lower.
    """
    before, after = average["before"], average["module_patch"][calibration]
    delta = {k: after[k] - before[k] for k in ("tc_precision", "tc_recall", "non_tc_accuracy")}
    passed = delta["tc_precision"] > 0 and delta["tc_recall"] > 0 and delta["non_tc_accuracy"] >= -max_non_tc_drop
    return {"calibration": calibration, "criterion": ACCEPTANCE_CRITERION,
            **{f"delta_{k}": float(v) for k, v in delta.items()}, "passed": bool(passed)}


# --------------------------------------------------------------------------------------------
# Data loading for the driver (I/O edge).


def _renormalize(ds: jdata.Dataset, from_stats: dict, to_stats: dict) -> jdata.Dataset:
    """Images normalised with ``from_stats`` re-expressed with ``to_stats`` (exact, affine)."""
    mean_f, std_f = np.asarray(from_stats["mean"], np.float32), np.asarray(from_stats["std"], np.float32)
    mean_t, std_t = np.asarray(to_stats["mean"], np.float32), np.asarray(to_stats["std"], np.float32)
    if np.array_equal(mean_f, mean_t) and np.array_equal(std_f, std_t):
        return ds
    images = ((ds.images * std_f + mean_f) - mean_t) / std_t
    return dataclasses.replace(ds, images=images.astype(np.float32))


def _strong_local_class(data_cfg: Any, tc: int) -> int:
    """The strong model's label of dataset class ``tc`` (mapped through ``data.classes``)."""
    if data_cfg.classes is None:
        return int(tc)
    if tc not in data_cfg.classes:
        raise PatchError(
            f"target class {tc} is not among the strong model's data.classes {list(data_cfg.classes)}; "
            f"patch.target_classes / patch.strong_classes must be classes the strong model was trained on")
    return list(data_cfg.classes).index(tc)


def load_cifar100_cifar10(data_cfg: Any, stats: dict) -> dict[str, jdata.Dataset]:
    """CIFAR-100 and CIFAR-10 (unsplit train, test) through TFDS, padded and normalised with the
    strong model's statistics ``stats`` (``{"mean", "std"}``). Needs `tensorflow_datasets`."""
    source = data_cfg.source if data_cfg.source in ("tfds", "npz") else "tfds"
    out = {}
    for name in ("cifar100", "cifar10"):
        for split in ("train", "test"):
            ds = jdata.load(source, name, split, data_cfg.data_dir)
            ds = jdata.pad_to(ds, data_cfg.image_size)
            out[f"{name}_{split}"] = jdata.normalize(ds, stats["mean"], stats["std"])
    return out


# --------------------------------------------------------------------------------------------
# Weak models (driver edge: training, checkpoints under runs/NAME/patch/).

# Patch fields that do not change a weak model: excluded from its cached config, so that trying
# other calibrations or target classes reuses the trained weak models.
_NOT_WEAK_FIELDS = ("target_classes", "calibrations", "calibration_bins", "poor_fit",
                    "underfit_epochs", "overfit_epochs", "poor_fit_images_per_class", "method",
                    "decision_methods", "gate", "gate_objective", "gate_non_tc_tolerance", "gate_min_gain",
                    "valid_folds")


def weak_config(run_cfg: Any, pcfg: Any, task: PatchTask) -> Any:
    """The `jaxsplit.config.Config` a weak model is trained with.

    Model ``patch.weak_model`` at ``patch.weak_width`` (its family's dropout); training as the
    run's ``train`` section except optimizer, learning rate, epochs (``patch.weak_*``), seed
    (``patch.seed``) and no warm-up. ``data.classes`` records the weak classes + TC (the data
    itself is the task's, passed explicitly).
    """
    default = jconfig.PatchConfig()
    patch_section = dataclasses.replace(pcfg, **{f: getattr(default, f) for f in _NOT_WEAK_FIELDS})
    # Only what changes the weak model is kept: the data location and the search settings are
    # reset, so that moving the data or re-running the search does not retrain weak models.
    data = dataclasses.replace(run_cfg.data, classes=None, data_dir=None)
    if pcfg.task == "self":
        data = dataclasses.replace(data, classes=(*task.weak_classes, task.target_class))
    return dataclasses.replace(
        run_cfg,
        name=f"{run_cfg.name}_weak_tc{task.target_class}",
        data=data,
        model=jconfig.ModelConfig(name=pcfg.weak_model, width=pcfg.weak_width, dropout=None),
        train=dataclasses.replace(run_cfg.train, optimizer=pcfg.weak_optimizer,
                                  learning_rate=pcfg.weak_learning_rate, epochs=pcfg.weak_epochs,
                                  warmup_epochs=0, seed=pcfg.seed),
        search=jconfig.SearchConfig(),
        patch=patch_section,
    )


def _cached_model(workdir: Path, cfg: Any) -> tuple[Any, Any, dict] | None:
    """``(model, params, metrics)`` of a checkpoint in ``workdir`` trained with ``cfg``, or None."""
    if not checkpoint.checkpoint_path(workdir).exists():
        return None
    try:
        model, params, saved_cfg, metrics = checkpoint.load_model(workdir)
    except checkpoint.CheckpointError:
        return None
    if jconfig.to_dict(saved_cfg) != jconfig.to_dict(cfg):
        return None
    return model, params, metrics


def train_weak(cfg: Any, task: PatchTask, workdir: Path, *, progress: bool = True) -> tuple[Any, Any, dict, bool]:
    """Trains the weak model of ``task`` with `jaxsplit.train.train_and_evaluate` (best on valid),
    or reuses the one cached in ``workdir`` when it was trained with the same config.

    Returns:
      ``(model, params, metrics, reused)``.
    """
    workdir = Path(workdir)
    cached = _cached_model(workdir, cfg)
    if cached is not None:
        return (*cached, True)
    overwrite = checkpoint.checkpoint_path(workdir).exists()
    res = jtrain.train_and_evaluate(cfg, workdir, data=(task.train, task.valid, task.test),
                                    progress=progress, overwrite=overwrite)
    return res.model, res.params, res.metrics, False


def poor_fit_config(weak_cfg: Any, pcfg: Any) -> Any:
    """The config of the poor-fit run: ``overfit_epochs`` at a constant learning rate, no weight
    decay, no dropout (the reference trains its poor-fit models with plain SGD, no
    regularisation, and takes an early and a late epoch's checkpoint)."""

    return dataclasses.replace(
        weak_cfg,
        name=weak_cfg.name + "_poor_fit",
        model=jconfig.ModelConfig(name=weak_cfg.model.name, width=weak_cfg.model.width, dropout=0.0),
        train=dataclasses.replace(weak_cfg.train, epochs=pcfg.overfit_epochs, weight_decay=0.0,
                                  schedule="constant", augment=False),
        patch=dataclasses.replace(weak_cfg.patch, underfit_epochs=pcfg.underfit_epochs,
                                  overfit_epochs=pcfg.overfit_epochs,
                                  poor_fit_images_per_class=pcfg.poor_fit_images_per_class),
    )


def train_poor_fit(cfg: Any, task: PatchTask, underfit_epochs: int, workdir: Path, *,
                   progress: bool = True) -> dict[str, tuple[Any, Any, dict]]:
    """One unregularised run of ``cfg.train.epochs`` epochs on ``task.train``; the parameters
    after ``underfit_epochs`` epochs are the under-fitted model, the final ones the over-fitted
    model (no best-on-valid selection). Cached in ``workdir/{underfit,overfit}/``.

    Returns:
      ``{"underfit": (model, params, metrics), "overfit": (...)}``; metrics hold the train,
      valid and test accuracy and the snapshot's epoch.
    """
    workdir = Path(workdir)
    snapshots = {"underfit": min(int(underfit_epochs), cfg.train.epochs), "overfit": cfg.train.epochs}
    cached = {k: _cached_model(workdir / k, cfg) for k in snapshots}
    if all(c is not None and c[2].get("snapshot_epoch") == snapshots[k] for k, c in cached.items()):
        return cached  # type: ignore[return-value]
    h, _, c = task.train.image_shape
    model = pipeline.build_model(cfg.model, task.num_classes, c, h)
    batch_size = min(cfg.train.batch_size, len(task.train))
    tx = jtrain.make_optimizer(cfg.train, len(task.train) // batch_size)
    init_key, dropout_key = jax.random.split(jax.random.key(cfg.train.seed))
    state = jtrain.create_train_state(init_key, model, tx)
    params_at = {}
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.train.epochs, unit="epoch", desc=f"poor-fit {cfg.name}", dynamic_ncols=True)
    try:
        for epoch in range(1, cfg.train.epochs + 1):
            state, _ = jtrain.train_epoch(state, task.train, batch_size, dropout_key, epoch=epoch,
                                          seed=cfg.train.seed, augment=False)
            for kind, at in snapshots.items():
                if epoch == at:
                    params_at[kind] = state.params
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    out = {}
    for kind, params in params_at.items():
        m = {"snapshot_epoch": snapshots[kind]}
        for split in ("train", "valid", "test"):
            m[f"{split}_accuracy"] = jtrain.evaluate(model, params, getattr(task, split),
                                                     cfg.train.eval_batch_size)["accuracy"]
        (workdir / kind).mkdir(parents=True, exist_ok=True)
        jconfig.save(cfg, workdir / kind / "config.yaml")
        checkpoint.save_model(workdir / kind, params, cfg, m, model=model, overwrite=True)
        out[kind] = (model, params, m)
    return out


# --------------------------------------------------------------------------------------------
# Modules of the strong model.

MODULES_FILE = "modules.npz"  # the run's `jaxsplit.Modules` file, in ``modularize/``


class ModulesNotFoundError(PatchError, FileNotFoundError):
    """The run has no ``modularize/modules.npz``."""


def _searcher(modules: Any) -> str:
    """The searcher that made ``modules`` ("ga" / "gradient"), as the file records it."""
    info = modules.info if isinstance(modules.info, dict) else {}
    search = info.get("search") if isinstance(info.get("search"), dict) else {}
    return str(info.get("method") or search.get("method") or "ga")


def load_modules(run_dir: str | Path, apply_fn: Callable, variables: Any, example_x: Any,
                 target_classes: Sequence[int] = ()) -> Any:
    """The run's modules (``modularize/modules.npz``) for its strong model, checked.

    The model's kernel graph is traced (`jaxsplit.modularize.trace_graph`) and the file read
    with `jaxsplit.modularize.Modules.load`, which refuses another format version or a file
    made for another model (graph fingerprint); the file must also record these weights (its
    params SHA-256), hold one module per model output (class ids ``0 .. C-1``), and the search
    that wrote it must have finished (``summary.json`` next to it). Each module of
    ``target_classes`` (the strong model's class ids) must keep at least one kernel at every
    site, so it can be extracted.

    Args:
      run_dir: the run folder.
      apply_fn, variables: the strong model (`checkpoint.LoadedModel.apply_fn` / ``.variables``).
      example_x: one input ``(1, H, W, C)`` to trace the graph with.
      target_classes: the strong model's class ids whose modules will be extracted.

    Returns:
      `jaxsplit.modularize.Modules` with the model attached (``extract`` works).

    Raises:
      ModulesNotFoundError: no modules file (the message says which command writes it).
      PatchError: any other problem, naming the file and the command that makes it again.
    """
    import zipfile

    from jaxsplit import masks as masks_lib
    from jaxsplit import modularize as modz

    run_dir = Path(run_dir)
    path = run_dir / "modularize" / MODULES_FILE
    summary_path = path.parent / "summary.json"
    cmd = f"jaxsplit modularize --run {run_dir}"
    if not path.is_file():
        if (path.parent / "masks.npz").is_file():
            raise ModulesNotFoundError(
                f"no modules file at {str(path)!r} (an older jaxsplit wrote only masks.npz); write "
                f"it from the search's checkpoints with `{cmd} --resume`, or search again with "
                f"`{cmd} --restart`")
        raise ModulesNotFoundError(f"no modules file at {str(path)!r}; run the modularization first "
                                   f"(`{cmd}`)")
    if not summary_path.is_file():
        raise PatchError(f"{summary_path} is missing, so the search that wrote {path} did not "
                         f"finish; finish it with `{cmd} --resume`")
    graph = modz.trace_graph(apply_fn, variables, example_x)
    try:
        modules = modz.Modules.load(path, graph, apply_fn=apply_fn, variables=variables,
                                    check_params=False)
    except modz.ModulesFileError as e:
        raise PatchError(f"{e}; make it again for the run's model with `{cmd} --restart`") from e
    except (KeyError, TypeError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise PatchError(f"{str(path)!r} is not a readable modules file ({type(e).__name__}: {e}); "
                         f"make it again with `{cmd} --restart`") from e
    recorded = modules.info.get("params_sha256") if isinstance(modules.info, dict) else None
    if not recorded:
        raise PatchError(f"{str(path)!r} does not record the weights its modules come from; search "
                         f"again with `{cmd} --restart`")
    digest = modz.variables_digest(variables)
    if recorded != digest:
        raise PatchError(
            f"the modules in {str(path)!r} were searched on other weights (params SHA-256 "
            f"{recorded[:12]}) than the run's checkpoint now holds ({digest[:12]}): the model was "
            f"retrained after modularize; search again with `{cmd} --restart`")
    num_outputs = int(graph.num_outputs)
    if modules.classes.tolist() != list(range(num_outputs)):
        raise PatchError(f"{str(path)!r} holds modules of classes {modules.classes.tolist()}, but the "
                         f"model has {num_outputs} outputs (classes 0..{num_outputs - 1}); search "
                         f"again with `{cmd} --restart`")
    try:
        masks_lib.validate(modules.masks, graph, (num_outputs,), check_values=False)
    except masks_lib.MaskError as e:
        raise PatchError(f"{str(path)!r}: {e}; make it again with `{cmd} --restart`") from e
    check_extractable(modules, target_classes, run_dir)
    return modules


def check_extractable(modules: Any, classes: Sequence[int], run_dir: str | Path) -> None:
    """Refuse (`PatchError`, naming the file, class and site) a module of ``classes`` that
    keeps no kernel at some site, or whose tied sites differ: it cannot be extracted."""
    from jaxsplit import masks as masks_lib

    path = Path(run_dir) / "modularize" / MODULES_FILE
    cmd = f"jaxsplit modularize --run {Path(run_dir)}"
    for c in classes:
        mask = modules.mask(int(c))
        empty = [n for n in modules.graph.names if not np.asarray(mask[n]).any()]
        if empty:
            raise PatchError(
                f"{str(path)!r}: the module of class {int(c)} keeps no kernel at site {empty[0]!r}; "
                f"a module must keep at least one kernel at every site to be extracted (search "
                f"again with `{cmd} --restart`)")
        try:
            masks_lib.validate(mask, modules.graph, ())
        except masks_lib.MaskError as e:
            raise PatchError(f"{str(path)!r}: the module of class {int(c)}: {e}; make it again "
                             f"with `{cmd} --restart`") from e


def _json_stats(stats: dict) -> dict:
    return {k: (float(v) if isinstance(v, (float, np.floating)) else int(v) if isinstance(v, (int, np.integer)) else v)
            for k, v in dict(stats).items() if _is_json_scalar(v)}


def _is_json_scalar(v: Any) -> bool:
    return isinstance(v, (bool, int, float, str, np.integer, np.floating)) or v is None


def module_size(graph: Any, mask: dict[str, np.ndarray], local_tc: int) -> dict:
    """Kept kernels / params / MACs of a module and their fractions of the strong model
    (`jaxsplit.extract.module_stats`: with the whole classifier, so an all-ones mask is 1.0),
    plus ``single_output_params`` / ``single_output_macs`` (and fractions): the one-output
    module patching runs."""
    from jaxsplit import extract

    stats = _json_stats(extract.module_stats(graph, mask))
    single = extract.module_stats(graph, mask, target_class=int(local_tc))
    stats.update(single_output_params=int(single["params"]), single_output_macs=int(single["macs"]),
                 single_output_params_fraction=float(single["params_fraction"]),
                 single_output_macs_fraction=float(single["macs_fraction"]))
    return stats


def tc_module(modules: Any, local_tc: int) -> tuple[Callable, Any, dict]:
    """The physically extracted module of the strong model's class ``local_tc`` and its size.

    Returns:
      ``(module_apply, module_variables, stats)``: ``module_apply(module_variables, x)`` ->
      ``(N,)``, the module's TC score (`jaxsplit.modularize.Modules.extract`); ``stats`` from
      `module_size`.
    """
    module_apply, module_variables = modules.extract(int(local_tc))
    return module_apply, module_variables, module_size(modules.graph, modules.mask(int(local_tc)), local_tc)


def apply_predict(apply_fn: Callable[[Any, jax.Array], jax.Array], variables: Any,
                  batch_size: int) -> PredictFn:
    """Host predictor of ``apply_fn(variables, images)``: jitted once with the variables as an
    argument (not baked into the program), run in fixed-size zero-padded batches."""
    _check_count(batch_size, "batch_size")
    fn = jax.jit(apply_fn)
    dev_vars = jax.tree_util.tree_map(jnp.asarray, variables)
    return _padded_batches(lambda x: fn(dev_vars, x), int(batch_size))


# --------------------------------------------------------------------------------------------
# The driver.


def _tc_name(task: PatchTask) -> str:
    names = task.test.class_names
    return str(names[task.tc_index]) if names is not None else str(task.target_class)


def evaluate_decisions(weak_predict: PredictFn, module_predict: PredictFn, task: PatchTask, pcfg: Any,
                       weak_test_logits: np.ndarray | None = None) -> dict:
    """`patch_decision` of one weak model and one module over a task: every method of
    ``pcfg.decision_methods`` (and ``pcfg.method``) is fitted and gated on ``task.valid``, then
    measured on ``task.test``."""
    if weak_test_logits is None:
        weak_test_logits = weak_predict(task.test.images)
    valid = DecisionData(np.asarray(weak_predict(task.valid.images)),
                         _as_scores(np.asarray(module_predict(task.valid.images)), "module_predict"),
                         task.valid.labels)
    test = DecisionData(np.asarray(weak_test_logits),
                        _as_scores(np.asarray(module_predict(task.test.images)), "module_predict"),
                        task.test.labels)
    methods = list(dict.fromkeys([pcfg.method, *pcfg.decision_methods]))
    return patch_decision(valid, test, task.tc_index, methods, **_decision_kwargs(pcfg))


def summary_blocks(per_tc: dict[str, dict], pcfg: Any) -> dict:
    """``{"summary": decision_summary(pcfg.method), "summary_by_method": {spec: ...},
    "decision_settings": {...}}`` for a results dict."""
    methods = list(dict.fromkeys([pcfg.method, *pcfg.decision_methods]))
    return {
        "summary": decision_summary(per_tc, pcfg.method),
        "summary_by_method": {m: decision_summary(per_tc, m) for m in methods},
        "decision_settings": {"method": pcfg.method, "decision_methods": methods, "gate": pcfg.gate,
                              "gate_objective": pcfg.gate_objective,
                              "gate_non_tc_tolerance": pcfg.gate_non_tc_tolerance,
                              "gate_min_gain": pcfg.gate_min_gain, "valid_folds": pcfg.valid_folds,
                              "fit_split": "the weak task's valid split (TC and non-TC images); test only measured"},
    }


def _load_tasks(pcfg: Any, data_cfg: Any) -> tuple[Callable[[int], PatchTask], jdata.Dataset, dict]:
    """``(make_task(tc), strong_valid, strong_stats)`` for the run's data and patch settings."""
    s_train, s_valid, s_test, s_stats = pipeline.load_splits(data_cfg)
    if pcfg.task == "self":
        if data_cfg.classes is None:
            full = (s_train, s_valid, s_test)
        else:
            f_train, f_valid, f_test, f_stats = pipeline.load_splits(dataclasses.replace(data_cfg, classes=None))
            full = tuple(_renormalize(d, f_stats, s_stats) for d in (f_train, f_valid, f_test))

        def make_task(tc: int) -> PatchTask:
            return make_self_task(*full, pcfg.strong_classes, pcfg.weak_classes, tc, pcfg.tc_train_images,
                                  pcfg.seed, weak_images_per_class=pcfg.weak_images_per_class)
    else:
        raw = load_cifar100_cifar10(data_cfg, s_stats)

        def make_task(tc: int) -> PatchTask:
            return make_cifar100_cifar10_task(
                raw["cifar100_train"], raw["cifar100_test"], raw["cifar10_train"], raw["cifar10_test"],
                pcfg.weak_classes, tc, tc_train_images=pcfg.tc_train_images, tc_test_images=pcfg.tc_test_images,
                valid_fraction=data_cfg.valid_fraction, split_seed=data_cfg.split_seed, seed=pcfg.seed)
    return make_task, s_valid, s_stats


def _protocol(pcfg: Any, data_cfg: Any, num_strong_classes: int) -> str:
    if pcfg.task == "cifar100_cifar10":
        return (f"Strong model: the run's {data_cfg.name} model ({num_strong_classes} classes); weak models: "
                f"CIFAR-100 classes {list(pcfg.weak_classes)} + one CIFAR-10 target class.")
    if data_cfg.classes is None:
        return (f"Strong model trained on all {num_strong_classes} classes (demo protocol: it has seen the weak "
                f"classes {list(pcfg.weak_classes)} as negatives); weak models: classes "
                f"{list(pcfg.weak_classes)} + one target class from {list(pcfg.strong_classes)}.")
    return (f"Strong model trained only on classes {list(data_cfg.classes)} (faithful protocol); weak models: "
            f"classes {list(pcfg.weak_classes)} + one target class from {list(pcfg.strong_classes)}.")


def _weak_entry(metrics_: dict, reused: bool) -> dict:
    keys = ("test_accuracy", "valid_accuracy", "best_epoch", "epochs", "train_time_s", "num_train", "num_params",
            "snapshot_epoch", "train_accuracy")
    return {**{k: metrics_[k] for k in keys if k in metrics_}, "reused": reused}


def format_table(results: dict) -> str:
    """A plain-text table of per-TC and averaged results (primary calibration)."""
    primary = results["primary_calibration"]

    def row(label: str, before: dict, after: dict, whole: dict) -> str:
        return (f"{label:<10} {100 * before['tc_precision']:6.2f} -> {100 * after['tc_precision']:6.2f}   "
                f"{100 * before['tc_recall']:6.2f} -> {100 * after['tc_recall']:6.2f}   "
                f"{100 * before['non_tc_accuracy']:6.2f} -> {100 * after['non_tc_accuracy']:6.2f}   "
                f"{100 * whole['tc_f1']:6.2f} / {100 * after['tc_f1']:6.2f}")

    lines = [f"patching ({results['task']}, calibration {primary}): weak -> patched; F1 whole-model / module",
             f"{'TC':<10} {'TC precision %':>18}   {'TC recall %':>16}   {'non-TC acc %':>16}   {'F1 %':>15}"]
    for tc, r in results["per_tc"].items():
        lines.append(row(str(tc), r["before"], r["module_patch"][primary], r["whole_model_patch"][primary]))
    avg = results["average"]
    lines.append(row("mean", avg["before"], avg["module_patch"][primary], avg["whole_model_patch"][primary]))
    acc = results["acceptance"]
    lines.append(f"acceptance ({acc['calibration']}): {'PASSED' if acc['passed'] else 'NOT passed'} "
                 f"(precision {100 * acc['delta_tc_precision']:+.2f}, recall {100 * acc['delta_tc_recall']:+.2f}, "
                 f"non-TC {100 * acc['delta_non_tc_accuracy']:+.2f} pts)")
    if "summary" in results:
        lines.append(format_summary(results["summary"]))
    return "\n".join(lines)


def run_patch(run_dir: str | Path, cfg: Any, *, progress: bool = True, plots: bool = True,
              verbose: bool = True) -> dict:
    """Patches weak models with the run's modules and measures it (``jaxsplit patch --run``).

    Loads the run's strong model (``checkpoint/``) and modules (``modularize/modules.npz``,
    `load_modules`);
    for each target class builds the weak task, trains the weak model (cached in
    ``patch/weak_tc{TC}/``, reused when its config is unchanged), patches it with the extracted
    TC module under every calibration of ``cfg.patch.calibrations`` and with the whole strong
    model (baseline), and measures before/after on the task's test split. With
    ``patch.poor_fit`` also patches an under- and an over-fitted weak model
    (``patch/weak_tc{TC}_poor_fit/``).

    Args:
      run_dir: the run folder.
      cfg: the config; its ``patch`` section is used (and ``data.data_dir`` when set); the data
        protocol (dataset, classes, split, normalisation) is the strong model's own, from its
        checkpoint.
      progress: progress bars while training weak models.
      plots: write the PNG plots.
      verbose: log the results table (logger ``jaxsplit.patch``, level INFO).

    Returns:
      The results dict, also written to ``patch/patch_results.json``.
    """


    t_start = time.perf_counter()
    run_dir = Path(run_dir)
    pcfg = cfg.patch
    loaded = checkpoint.load_model(run_dir)
    model, strong_cfg, strong_metrics = loaded.model, loaded.cfg, loaded.metrics
    apply_fn, variables = loaded.apply_fn, loaded.variables
    num_strong = int(jax.eval_shape(apply_fn, variables, model.dummy_input(1)).shape[-1])
    modules = load_modules(run_dir, apply_fn, variables, model.dummy_input(1))
    data_cfg = strong_cfg.data
    if cfg.data.data_dir is not None:
        data_cfg = dataclasses.replace(data_cfg, data_dir=cfg.data.data_dir)
    target_classes = tuple(pcfg.target_classes or pcfg.strong_classes)
    local = {tc: _strong_local_class(data_cfg, tc) for tc in target_classes}
    for tc, lc in local.items():
        if not 0 <= lc < num_strong:
            raise PatchError(f"target class {tc} is class {lc} of the strong model, which has only "
                             f"{num_strong} classes")
    check_extractable(modules, sorted(set(local.values())), run_dir)
    modules_entry = {"searcher": _searcher(modules),
                     "file": str(Path("modularize") / MODULES_FILE),
                     "params_sha256": modules.info.get("params_sha256")}
    make_task, strong_valid, _ = _load_tasks(pcfg, data_cfg)
    out_dir = run_dir / "patch"
    out_dir.mkdir(parents=True, exist_ok=True)
    batch_size = cfg.train.eval_batch_size
    calibrations = list(pcfg.calibrations)
    per_tc: dict[str, dict] = {}
    for i, tc in enumerate(target_classes):
        lc = local[tc]
        task = make_task(tc)
        names = strong_valid.class_names
        label = f"target class {tc} ({names[lc]})" if names else f"target class {tc}"
        if verbose:
            log.info(f"[patch {i + 1}/{len(target_classes)}] {label}: weak model in "
                  f"{out_dir / f'weak_tc{tc}'}")
        tc_valid = strong_valid.images[strong_valid.labels == lc]
        if len(tc_valid) == 0:
            raise PatchError(f"the strong model's valid split has no image of target class {tc}")
        wcfg = weak_config(strong_cfg, pcfg, task)
        weak_model, weak_params, weak_metrics, reused = train_weak(wcfg, task, out_dir / f"weak_tc{tc}",
                                                                   progress=progress)
        if verbose:
            log.info(f"  {'reused the cached' if reused else 'trained the'} weak model "
                  f"(test accuracy {weak_metrics.get('test_accuracy', float('nan')):.4f}); "
                  f"evaluating the patches of {label}")
        module_apply, module_variables, stats = tc_module(modules, lc)
        module_predict = apply_predict(module_apply, module_variables, batch_size)
        whole_predict = apply_predict(lambda v, x, c=lc: apply_fn(v, x)[:, c], variables, batch_size)

        def patch_one(w_model: Any, w_params: Any, baseline: bool = True) -> dict:
            weak_predict = functools.partial(jtrain.predict_logits, w_model, w_params, batch_size=batch_size)
            logits = weak_predict(task.test.images)
            mod = evaluate_patch(weak_predict, module_predict, task, tc_valid, calibrations,
                                 num_bins=pcfg.calibration_bins, weak_test_logits=logits)
            out = {"before": mod["before"], "module_patch": mod["after"],
                   "decision": evaluate_decisions(weak_predict, module_predict, task, pcfg, logits)}
            if baseline:
                whole = evaluate_patch(weak_predict, whole_predict, task, tc_valid, calibrations,
                                       num_bins=pcfg.calibration_bins, weak_test_logits=logits)
                out["whole_model_patch"] = whole["after"]
            return out

        entry = {"target_class": tc, "class_name": _tc_name(task), "strong_class": lc,
                 "task": {"name": task.name, "counts": task.counts()},
                 "weak": _weak_entry(weak_metrics, reused), "module": stats,
                 "num_tc_valid_images": int(len(tc_valid)), **patch_one(weak_model, weak_params)}
        if pcfg.poor_fit:
            small = task
            if pcfg.poor_fit_images_per_class is not None:
                small = dataclasses.replace(task, train=jdata.subsample_per_class(
                    pcfg.seed, task.train, pcfg.poor_fit_images_per_class))
            pf_cfg = poor_fit_config(wcfg, pcfg)
            snaps = train_poor_fit(pf_cfg, small, pcfg.underfit_epochs, out_dir / f"weak_tc{tc}_poor_fit",
                                   progress=progress)
            entry["poor_fit"] = {kind: {"weak": _weak_entry(m, False), **patch_one(mdl, prm, baseline=False)}
                                 for kind, (mdl, prm, m) in snaps.items()}
        per_tc[str(tc)] = entry
    average = average_results(per_tc, calibrations)
    results = {
        "task": pcfg.task,
        "run": run_dir.name,
        "dataset": data_cfg.name,
        "protocol": _protocol(pcfg, data_cfg, num_strong),
        "strong_model": {"family": strong_cfg.model.name, "width": strong_cfg.model.width,
                         "num_classes": num_strong,
                         "trained_classes": list(data_cfg.classes) if data_cfg.classes is not None else None,
                         "test_accuracy": strong_metrics.get("test_accuracy")},
        "modules": modules_entry,
        "weak_model": {"name": pcfg.weak_model, "width": pcfg.weak_width, "epochs": pcfg.weak_epochs,
                       "optimizer": pcfg.weak_optimizer, "learning_rate": pcfg.weak_learning_rate,
                       "tc_train_images": pcfg.tc_train_images,
                       "weak_images_per_class": pcfg.weak_images_per_class},
        "target_classes": list(target_classes),
        "calibrations": calibrations,
        "primary_calibration": calibrations[0],
        "calibration_fit": ("unsupervised methods: module outputs on the TC images of the strong model's valid "
                            "split; temperature/platt: the weak task's valid images of the other classes (label 0) "
                            "plus those TC images (label 1). The test split is only measured."),
        "per_tc": per_tc,
        "average": average,
        "acceptance": acceptance(average, calibrations[0]),
        **summary_blocks(per_tc, pcfg),
        "elapsed_s": time.perf_counter() - t_start,
        "machine": jtrain.machine_info(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "patch_config": _plain(pcfg),
    }
    if pcfg.poor_fit:
        results["average_poor_fit"] = {
            kind: {"before": average_metrics([r["poor_fit"][kind]["before"] for r in per_tc.values()]),
                   "module_patch": {c: average_metrics([r["poor_fit"][kind]["module_patch"][c]
                                                        for r in per_tc.values()]) for c in calibrations}}
            for kind in ("underfit", "overfit")}
    from jaxsplit.io import atomic_write_json

    atomic_write_json(out_dir / "patch_results.json", results)
    if plots:
        jplots.plot_patch_results(results, out_dir)
    if verbose:
        log.info("%s", format_table(results))
    return results


def _plain(cfg_section: Any) -> dict:

    return jconfig.to_dict(cfg_section)
