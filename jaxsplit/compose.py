"""Patching by composition: a weak model plus a calibrated module, or any models merged.

CNNSplitter patches a weak model whose target class (TC) is poorly recognised by swapping its TC
probability for the calibrated logit of a strong model's TC module
(`experiments/patch/apply_patch.py` in the reference):

    scores = concat(softmax(weak_logits)[:, :-1], calibrate(module_logit))   # (N, K)
    prediction = argmax(scores)

The softmax runs over *all* K weak classes (TC included) and only then is the TC column dropped,
so the non-TC probabilities keep the mass the weak model gave its TC; `compose` does exactly
that, with the TC at any column (``target_index``, default -1 = last, as the reference).

`compose_joint` is the valid-fitted variant: a calibration of *both* the module's TC logit and
the weak model's TC logit (`joint_features`, e.g. a `jaxsplit.calibration.logistic` fit) decides
TC vs non-TC, and the weak model ranks the non-TC classes.

`merge` is the general form: any number of models and modules, each scoring some of the classes,
merged into one classifier over the union of their classes.

All functions here take and return pure ``apply(inputs)`` functions (for a Flax model,
``functools.partial(model.apply, variables)``); the results are jit-able and vmap-able.
Shape errors are raised when the composed function is called (or traced), since only then are
the output shapes known.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxsplit import calibration as calib
from jaxsplit.errors import JaxsplitError

Array = jax.Array
ApplyFn = Callable[[Any], Array]
CalibrateFn = Callable[[Array], Array]
# A calibration as accepted here: a callable ``scores -> calibrated``, a fitted
# ``(Calibration, state)`` pair, or None for no calibration (identity).
CalibrateLike = CalibrateFn | tuple[calib.Calibration, Any] | None


class CompositionError(JaxsplitError, ValueError):
    """Models, class ids or shapes that cannot be composed."""


def as_calibrate_fn(calibrate: CalibrateLike) -> CalibrateFn:
    """Normalises a calibration argument to a callable ``scores -> calibrated``.

    Args:
      calibrate: a callable (e.g. ``functools.partial(cal.apply, state)``), a fitted
        ``(Calibration, state)`` pair, or ``None`` (identity: scores are used as they are).

    Returns:
      A pure elementwise function.
    """
    if calibrate is None:
        return lambda scores: scores
    if isinstance(calibrate, calib.Calibration):  # a NamedTuple, so test before `tuple`
        raise CompositionError(
            "calibrate got a Calibration without its fitted state; pass (calibration, state)"
        )
    if isinstance(calibrate, tuple):
        if len(calibrate) != 2 or not isinstance(calibrate[0], calib.Calibration):
            raise CompositionError(
                "calibrate as a tuple must be a (Calibration, state) pair, got "
                f"({', '.join(type(x).__name__ for x in calibrate)})"
            )
        method, state = calibrate
        return lambda scores: method.apply(state, scores)
    if callable(calibrate):
        return calibrate
    raise CompositionError(
        "calibrate must be a callable, a (Calibration, state) pair or None, got "
        f"{type(calibrate).__name__}"
    )


def _as_column(scores: Array, num_examples: int, what: str) -> Array:
    """A module output ``(N,)`` or ``(N, 1)`` as ``(N,)``."""
    scores = jnp.asarray(scores)
    if scores.shape not in ((num_examples,), (num_examples, 1)):
        raise CompositionError(
            f"{what} must have shape ({num_examples},) or ({num_examples}, 1) to match the "
            f"{num_examples} examples, got {scores.shape}"
        )
    return scores.reshape(num_examples)


def compose(
    weak_apply: ApplyFn,
    module_apply: ApplyFn,
    *,
    target_index: int = -1,
    calibrate: CalibrateLike = None,
) -> ApplyFn:
    """Patches a weak classifier with a (calibrated) target-class module.

    Args:
      weak_apply: ``inputs -> logits (N, K)`` of the weak model (TC among its K classes).
      module_apply: ``inputs -> (N,)`` or ``(N, 1)`` TC logit of the module.
      target_index: column of the TC in the weak model's output (negative counts from the end;
        the reference's TC is the last column, -1).
      calibrate: how to map the module logit to the probability scale: a callable
        ``scores -> calibrated`` such as ``functools.partial(cal.apply, state)``, a fitted
        ``(Calibration, state)`` pair, or ``None`` (raw logit). See `calibrate_and_compose` to
        fit one.

    Returns:
      ``apply(inputs) -> scores (N, K)``: ``softmax(weak_logits)`` over all K classes with the
      TC column replaced by the calibrated module score. ``argmax`` of it is the patched
      prediction. Jit-able and vmap-able.

    Example:
      >>> import jax.numpy as jnp
      >>> weak = lambda x: jnp.zeros((x.shape[0], 4))
      >>> module = lambda x: x[:, 0]
      >>> patched = compose(weak, module, calibrate=lambda s: s / 10)
      >>> patched(jnp.array([[5.0], [1.0]]))
      Array([[0.25, 0.25, 0.25, 0.5 ],
             [0.25, 0.25, 0.25, 0.1 ]], dtype=float32)
    """
    if not isinstance(target_index, int):
        raise CompositionError(f"target_index must be an int, got {target_index!r}")
    calibrate_fn = as_calibrate_fn(calibrate)

    def apply(inputs: Any) -> Array:
        logits = jnp.asarray(weak_apply(inputs))
        if logits.ndim != 2:
            raise CompositionError(
                f"weak_apply must return logits of shape (N, K), got {logits.shape}"
            )
        num_examples, num_classes = logits.shape
        if not -num_classes <= target_index < num_classes:
            raise CompositionError(
                f"target_index {target_index} is out of range for a weak model with "
                f"{num_classes} classes"
            )
        module_scores = _as_column(module_apply(inputs), num_examples, "module_apply output")
        calibrated = _as_column(
            calibrate_fn(module_scores), num_examples, "the calibrated module score"
        )
        probs = jax.nn.softmax(logits, axis=-1)
        return probs.at[:, target_index].set(calibrated.astype(probs.dtype))

    return apply


def joint_features(weak_logits: Any, module_scores: Any, target_index: int = -1) -> Array:
    """The per-image features a valid-fitted calibration sees: ``(N, 2)``.

    Column 0 is the module's raw TC logit; column 1 the weak model's TC logit in one-vs-rest
    form, ``log p_tc - log(1 - p_tc)`` of its softmax (computed stably from the logits).

    Args:
      weak_logits: ``(N, K)`` weak model logits.
      module_scores: ``(N,)`` or ``(N, 1)`` module TC logits.
      target_index: TC column of the weak model.
    """
    logits = jnp.asarray(weak_logits)
    if logits.ndim != 2:
        raise CompositionError(f"weak logits must have shape (N, K), got {logits.shape}")
    num_examples, num_classes = logits.shape
    if not -num_classes <= target_index < num_classes:
        raise CompositionError(
            f"target_index {target_index} is out of range for a weak model with {num_classes} classes"
        )
    tc = target_index % num_classes
    module = _as_column(module_scores, num_examples, "module_apply output")
    others = jnp.delete(logits, tc, axis=1, assume_unique_indices=True)
    weak_tc = logits[:, tc] - jax.nn.logsumexp(others, axis=1)
    return jnp.stack([module.astype(logits.dtype), weak_tc], axis=1)


def compose_joint(
    weak_apply: ApplyFn,
    module_apply: ApplyFn,
    calibrate: CalibrateLike,
    *,
    target_index: int = -1,
) -> ApplyFn:
    """Patches a weak classifier with a TC decision made from the module AND the weak model.

    The calibration maps `joint_features` ``(N, 2)`` (module TC logit, weak TC logit) to a TC
    score ``c (N,)`` in (0, 1), decision-centred at 0.5: e.g. a `logistic` probability, or a
    `chain` of it with a valid-chosen `threshold`. Unlike `compose` (the reference's rule, where
    the calibrated module score competes in an argmax with the weak model's other
    probabilities), the patched model predicts the TC iff ``c > 0.5`` and otherwise the weak
    model's best non-TC class; its non-TC ranking is the weak model's.

    Args:
      weak_apply: ``inputs -> logits (N, K)``.
      module_apply: ``inputs -> (N,)`` or ``(N, 1)`` TC logits.
      calibrate: ``features (N, 2) -> c (N,)``: a callable or a fitted ``(Calibration, state)``.
      target_index: TC column of the weak model.

    Returns:
      ``apply(inputs) -> scores (N, K)``: the TC column is ``c``, every other column
      ``(1 - c) * p_j / max_j p_j`` over the weak model's non-TC softmax ``p``, so the best
      non-TC class scores ``1 - c`` and ``argmax`` is the rule above (ties at 0.5 go to the
      non-TC class in front of a last-column TC). Jit-able and vmap-able.
    """
    if not isinstance(target_index, int):
        raise CompositionError(f"target_index must be an int, got {target_index!r}")
    calibrate_fn = as_calibrate_fn(calibrate)

    def apply(inputs: Any) -> Array:
        logits = jnp.asarray(weak_apply(inputs))
        features = joint_features(logits, module_apply(inputs), target_index)
        num_examples, num_classes = logits.shape
        tc = target_index % num_classes
        c = _as_column(calibrate_fn(features), num_examples, "the calibrated TC score")
        c = c.astype(logits.dtype)
        masked = logits.at[:, tc].set(-jnp.inf)
        rel = jnp.exp(masked - jnp.max(masked, axis=1, keepdims=True))  # p_j / max p, TC -> 0
        return (rel * (1.0 - c)[:, None]).at[:, tc].set(c)

    return apply


def calibrate_and_compose(
    weak_apply: ApplyFn,
    module_apply: ApplyFn,
    calibration: str | calib.Calibration,
    fit_inputs: Any,
    fit_labels: Any = None,
    *,
    target_index: int = -1,
    **calibration_kwargs: Any,
) -> tuple[ApplyFn, calib.Calibration, Any]:
    """Fits a calibration on the module's outputs, then `compose`s.

    Args:
      weak_apply: ``inputs -> logits (N, K)``.
      module_apply: ``inputs -> (N,)`` or ``(N, 1)`` TC logits.
      calibration: a name for `jaxsplit.calibration.get` or a `Calibration`.
      fit_inputs: inputs to fit on. For the reference's min-max: the valid images of the TC.
      fit_labels: ``None`` or ``(N_fit,)`` *binary* labels of ``fit_inputs`` (1 = TC). The
        unsupervised methods fit on the positives only (all inputs when ``None``); `temperature`
        and `platt` need them.
      target_index: TC column of the weak model.
      **calibration_kwargs: factory arguments when ``calibration`` is a name.

    Returns:
      ``(apply, calibration, state)``: the patched apply function (see `compose`), the method
      and its fitted state.
    """
    if isinstance(calibration, str):
        method = calib.get(calibration, **calibration_kwargs)
    elif isinstance(calibration, calib.Calibration):
        if calibration_kwargs:
            raise CompositionError(
                "calibration_kwargs are only for a calibration given by name, got "
                f"{sorted(calibration_kwargs)} with a Calibration"
            )
        method = calibration
    else:
        raise CompositionError(
            f"calibration must be a name ({', '.join(calib.NAMES)}) or a Calibration, got "
            f"{type(calibration).__name__}"
        )
    scores = jnp.asarray(module_apply(fit_inputs))
    state = method.fit(scores, fit_labels)
    patched = compose(weak_apply, module_apply, target_index=target_index,
                      calibrate=(method, state))
    return patched, method, state


def _member_scores(scores: Array, num_examples: int, width: int, what: str) -> Array:
    """A member's scores as ``(N, width)``; a one-class member may give ``(N,)``."""
    scores = jnp.asarray(scores)
    if width == 1 and scores.shape == (num_examples,):
        return scores[:, None]
    if scores.shape != (num_examples, width):
        raise CompositionError(
            f"{what} must have shape ({num_examples}, {width}) for its {width} class id(s) "
            f"(N = {num_examples} from member 0), got {scores.shape}"
        )
    return scores


def merge(
    members: Sequence[tuple[ApplyFn, Sequence[int | None]]],
    num_classes: int,
    *,
    calibrations: Sequence[CalibrateLike] | None = None,
    normalize: str = "softmax",
    on_overlap: str = "error",
) -> ApplyFn:
    """Merges models and modules into one classifier over the union of their classes.

    Each member ``(apply_fn, class_ids)`` scores ``len(class_ids)`` classes:
    ``apply_fn(inputs) -> (N, len(class_ids))`` (a one-class module may return ``(N,)``).
    Its column j becomes class ``class_ids[j]`` of the merged output. A class id of ``None``
    drops that column after normalisation: ``(weak_apply, [0, ..., K-2, None])`` keeps the
    reference's softmax over all K weak classes and drops the TC, so
    ``merge([(weak, [0, ..., K-2, None]), (module, [K-1])], K, calibrations=[None, cal])``
    equals ``compose(weak, module, calibrate=cal)``.

    Args:
      members: ``(apply_fn, class_ids)`` pairs; class ids are ints in ``[0, num_classes)``
        (or ``None``), without repeats inside a member.
      num_classes: C, the number of merged classes; every class must be claimed by a member.
      calibrations: optional, one per member: a calibration (see `as_calibrate_fn`) applied to
        that member's raw scores instead of the normalisation, or ``None`` to normalise.
      normalize: what a member without calibration gets: ``"softmax"`` over its own columns,
        or ``"none"`` (raw scores). Softmax over one column is the constant 1, so a one-class
        member under ``"softmax"`` needs a calibration.
      on_overlap: a class claimed by two members: ``"error"`` (default; raises at construction)
        or ``"last"`` (the later member's column wins).

    Returns:
      ``apply(inputs) -> scores (N, C)``, jit-able and vmap-able.
    """
    if not (isinstance(num_classes, int) and num_classes >= 1):
        raise CompositionError(f"num_classes must be an int >= 1, got {num_classes!r}")
    if normalize not in ("softmax", "none"):
        raise CompositionError(f"normalize must be 'softmax' or 'none', got {normalize!r}")
    if on_overlap not in ("error", "last"):
        raise CompositionError(f"on_overlap must be 'error' or 'last', got {on_overlap!r}")
    members = list(members)
    if not members:
        raise CompositionError("merge needs at least one member")
    if calibrations is None:
        calibrations = [None] * len(members)
    calibrations = list(calibrations)
    if len(calibrations) != len(members):
        raise CompositionError(
            f"got {len(calibrations)} calibrations for {len(members)} members; give one per "
            "member (None for none)"
        )

    # Static bookkeeping: for each class, (member, column) of the column that provides it.
    source: dict[int, tuple[int, int]] = {}
    member_ids: list[tuple[int | None, ...]] = []
    for m, member in enumerate(members):
        if not (isinstance(member, (tuple, list)) and len(member) == 2 and callable(member[0])):
            raise CompositionError(
                f"member {m} must be a pair (apply_fn, class_ids), got {type(member).__name__}"
            )
        ids = tuple(member[1])
        if not ids:
            raise CompositionError(f"member {m} has no class ids")
        for c in ids:
            if c is not None and not (isinstance(c, int) and 0 <= c < num_classes):
                raise CompositionError(
                    f"member {m}: class id {c!r} is not an int in [0, {num_classes})"
                )
        kept = [c for c in ids if c is not None]
        if len(set(kept)) != len(kept):
            raise CompositionError(f"member {m} repeats a class id: {list(ids)}")
        if normalize == "softmax" and calibrations[m] is None and len(ids) == 1:
            raise CompositionError(
                f"member {m} scores one class; softmax over one column is the constant 1. "
                "Give it a calibration or use normalize='none'"
            )
        for j, c in enumerate(ids):
            if c is None:
                continue
            if c in source and on_overlap == "error":
                raise CompositionError(
                    f"class {c} is claimed by members {source[c][0]} and {m}; "
                    "use on_overlap='last' to let the later member win"
                )
            source[c] = (m, j)
        member_ids.append(ids)
    missing = sorted(set(range(num_classes)) - set(source))
    if missing:
        raise CompositionError(f"classes {missing} are not scored by any member")

    calibrate_fns = [None if c is None else as_calibrate_fn(c) for c in calibrations]
    # Position of each class in the concatenation of all members' columns.
    offsets = [0]
    for ids in member_ids:
        offsets.append(offsets[-1] + len(ids))
    gather = np.array([offsets[m] + j for m, j in (source[c] for c in range(num_classes))])

    def apply(inputs: Any) -> Array:
        columns = []
        num_examples = None
        for m, ((apply_fn, _), ids) in enumerate(zip(members, member_ids)):
            scores = jnp.asarray(apply_fn(inputs))
            if num_examples is None:
                if scores.ndim not in (1, 2):
                    raise CompositionError(
                        f"member {m} must return scores of shape (N, {len(ids)}), "
                        f"got {scores.shape}"
                    )
                num_examples = scores.shape[0]
            scores = _member_scores(scores, num_examples, len(ids), f"member {m} output")
            if calibrate_fns[m] is not None:
                scores = _member_scores(
                    calibrate_fns[m](scores), num_examples, len(ids), f"member {m} calibrated"
                )
            elif normalize == "softmax":
                scores = jax.nn.softmax(scores, axis=-1)
            columns.append(scores)
        dtype = jnp.result_type(*columns)
        return jnp.concatenate([c.astype(dtype) for c in columns], axis=1)[:, gather]

    return apply
