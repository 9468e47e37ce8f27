"""Cooperative fitness of the per-class populations (SPEC §6), on device.

Inputs are the logit table `L (C, P, N)` from an evaluator
(`jaxsplit.search.evaluate`) and the flattened kept-kernel masks
`(C, P, K)`. Axes: C class rows (populations), P individuals per row, N
valid images, K kernels over all conv layers, E ensembles.

An *ensemble* picks one individual per class row; its prediction on image n
is the class of `argmax_c L[c, i_c, n]`, its accuracy is measured on the
images whose label is among its classes, its diff is the mean over class
pairs of `1 - Jaccard` of the kept-kernel sets, and its fitness is
`acc_ratio · acc + (1 - alpha) · diff`. An individual's score is the best
fitness of any final ensemble containing it (0 if none).

Two schemes (`FitnessParams.ensemble`):

* "hierarchical" (the reference, faithful): classes are shuffled (`key`),
  then groups are paired level by level, an odd last group passing through
  (10 classes: [2,2,2,2,2] -> [4,4,2] -> [8,2] -> [10]; 5 classes:
  [2,2,1] -> [4,1] -> [5]). For two groups with candidate lists of K1 and K2
  ensembles all K1·K2 combinations are scored, and those with accuracy >=
  threshold(size) are kept, at least `min_kept` and at most `max_kept`, best
  accuracy first. Instead of re-running the argmax over all classes, each
  candidate keeps per image its max logit over its classes and whether it is
  correct within its classes; a combination of a (from E1) and b (from E2)
  is then correct on image n iff
      label in E1: correct1[a, n] and max1[a, n] >= max2[b, n]
      label in E2: correct2[b, n] and max2[b, n] >  max1[a, n]
  (ties go to the group that comes first in the shuffled order, i.e. the
  combined argmax takes the first maximum like `numpy.argmax`). This costs
  O(K1·K2·N) compares, done `row_chunk` rows of K1 at a time with `lax.map`
  so memory stays O(row_chunk·K2·N). The diff of a kept combination is
  `(sum1 + sum2 + cross) / num_pairs` with `cross = sum_{p in E1, q in E2}
  D[p, q, i_p, i_q]`.
* "sampled" (a simpler alternative, not in the reference): stage 1 scores
  `num_sampled` ensembles drawn uniformly (one individual per class) plus the
  hall-of-fame ensemble; stage 2 takes the best of them (by fitness) as a
  *base* and scores, for every class row c and individual i, the base with
  row c replaced by i (C·P ensembles, each O(N) thanks to the base's top-2
  logits per image). So every individual is scored at least once, as a
  substitute in a good ensemble. All ensembles are scored on all valid images.

Hall of fame: the driver appends the previous generation's best ensemble as
an extra individual at the LAST index of every class row (so P = population
+ 1); with `has_hall_of_fame` the ensemble made of all those members is
always kept in every candidate list (as the reference appends it when it is
not among the kept). Scores are returned for all P; the driver drops the last.

The returned score is to be *maximised*; `to_minimise` gives the value for
evosax (which minimises).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp
from flax import struct

from jaxsplit.errors import JaxsplitError

# Reference acc thresholds per ensemble size (CNNSplitter configures/*_cifar10.py, *_svhn.py).
REFERENCE_THRESHOLDS: dict[int, float] = {2: 0.95, 4: 0.95, 8: 0.85, 10: 0.80}
# The reference's 5-class task (configures/*_svhn_5.py).
REFERENCE_THRESHOLDS_5: dict[int, float] = {2: 0.95, 4: 0.90, 5: 0.85}
SCHEMES = ("hierarchical", "sampled")


class FitnessInputError(JaxsplitError, ValueError):
    """Fitness inputs whose shapes or settings do not fit together."""


def reference_thresholds(num_classes: int) -> dict[int, float]:
    """The reference's thresholds for a task of `num_classes` classes.

    5-class tasks use the reference's svhn_5 table {2: .95, 4: .90, 5: .85};
    every other task the 10-class table {2: .95, 4: .95, 8: .85, 10: .80}.
    """
    return dict(REFERENCE_THRESHOLDS_5 if num_classes == 5 else REFERENCE_THRESHOLDS)


def threshold_for(size: int, thresholds: Mapping[int, float]) -> float:
    """Threshold of an ensemble of `size` classes: the entry of the largest listed
    count <= size (the smallest listed count's entry when none is smaller)."""
    if not thresholds:
        raise FitnessInputError("thresholds are empty; expected {num_classes: accuracy}")
    keys = sorted(int(k) for k in thresholds)
    table = {int(k): float(v) for k, v in thresholds.items()}
    below = [k for k in keys if k <= size]
    return table[below[-1] if below else keys[0]]


def level_plan(num_classes: int) -> tuple[tuple[tuple[int, ...], ...], ...]:
    """The static grouping of the hierarchical scheme, over shuffled positions.

    Returns one entry per level; each level is its groups, each group the
    tuple of class *positions* (0..C-1 after the shuffle) it covers. A group
    is either the union of two consecutive groups of the previous level or
    the odd last group passed through.

    Example:
      >>> [tuple(len(g) for g in lv) for lv in level_plan(5)]
      [(2, 2, 1), (4, 1), (5,)]
    """
    if num_classes < 1:
        raise FitnessInputError(f"num_classes must be >= 1, got {num_classes}")
    groups: list[tuple[int, ...]] = [(j,) for j in range(num_classes)]
    levels = []
    while len(groups) > 1:
        groups = [groups[i] + groups[i + 1] if i + 1 < len(groups) else groups[i]
                  for i in range(0, len(groups), 2)]
        levels.append(tuple(groups))
    return tuple(levels)


# -- params, state, info ------------------------------------------------------


@struct.dataclass
class FitnessParams:
    """Settings of the cooperative fitness.

    Attributes:
      alpha: weight of accuracy; `(1 - alpha)` weighs the diff (reference 0.9).
      gamma: target accuracy in the acc_ratio update (reference 0.9).
      ensemble: "hierarchical" (reference) or "sampled".
      thresholds: `((size, acc), ...)` sorted pairs, or None for
        `reference_thresholds(C)`.
      min_kept: least candidates kept per combination (reference 50).
      max_kept: most candidates kept per combination (reference 500).
      has_hall_of_fame: the last individual of every row is the previous
        best ensemble's member; its ensemble is always kept.
      num_sampled: random ensembles of the "sampled" scheme.
      patience: generations without a better valid fitness before stopping
        (0 disables).
      row_chunk: rows of K1 compared at once (memory/speed trade-off).
      ensemble_chunk: ensembles scored at once in the "sampled" scheme.
    """

    alpha: float = 0.9
    gamma: float = 0.9
    ensemble: str = struct.field(pytree_node=False, default="hierarchical")
    thresholds: tuple[tuple[int, float], ...] | None = struct.field(pytree_node=False, default=None)
    min_kept: int = struct.field(pytree_node=False, default=50)
    max_kept: int = struct.field(pytree_node=False, default=500)
    has_hall_of_fame: bool = struct.field(pytree_node=False, default=True)
    num_sampled: int = struct.field(pytree_node=False, default=2000)
    patience: int = struct.field(pytree_node=False, default=20)
    row_chunk: int = struct.field(pytree_node=False, default=8)
    ensemble_chunk: int = struct.field(pytree_node=False, default=64)

    @classmethod
    def create(cls, *, thresholds: Mapping[int, float] | None = None, **kwargs) -> "FitnessParams":
        """Checked construction; `thresholds` may be a dict (keys may be str from YAML)."""
        params = cls(thresholds=_freeze_thresholds(thresholds), **kwargs)
        check_params(params)
        return params

    @classmethod
    def from_config(cls, search_cfg, *, has_hall_of_fame: bool = True, **overrides) -> "FitnessParams":
        """From a `SearchConfig` (alpha, gamma, ensemble, thresholds, min/max kept,
        num_sampled_ensembles, early_stop); `overrides` win."""
        kwargs = dict(
            alpha=float(search_cfg.alpha), gamma=float(search_cfg.gamma),
            ensemble=search_cfg.ensemble, thresholds=search_cfg.thresholds,
            min_kept=int(search_cfg.min_kept_ensembles), max_kept=int(search_cfg.max_kept_ensembles),
            has_hall_of_fame=has_hall_of_fame, num_sampled=int(search_cfg.num_sampled_ensembles),
            patience=int(search_cfg.early_stop),
        )
        kwargs.update(overrides)
        return cls.create(**kwargs)


def _freeze_thresholds(thresholds) -> tuple[tuple[int, float], ...] | None:
    if thresholds is None:
        return None
    if isinstance(thresholds, Mapping):
        items = thresholds.items()
    else:
        items = tuple(thresholds)
    try:
        out = tuple(sorted((int(k), float(v)) for k, v in items))
    except (TypeError, ValueError) as err:
        raise FitnessInputError(
            f"thresholds must map ensemble sizes (int) to accuracies (float), got {thresholds!r}"
        ) from err
    for k, v in out:
        if k < 1 or not 0.0 <= v <= 1.0:
            raise FitnessInputError(
                f"threshold {k}: {v} is invalid; sizes must be >= 1 and accuracies in [0, 1]")
    if not out:
        raise FitnessInputError("thresholds are empty; expected {num_classes: accuracy} or None")
    return out


def check_params(params: FitnessParams) -> None:
    """Raise `FitnessInputError` on bad static settings."""
    if params.ensemble not in SCHEMES:
        raise FitnessInputError(f"ensemble scheme {params.ensemble!r} unknown; expected one of {SCHEMES}")
    if not 1 <= params.min_kept <= params.max_kept:
        raise FitnessInputError(
            f"need 1 <= min_kept <= max_kept, got min_kept={params.min_kept}, max_kept={params.max_kept}")
    for name in ("num_sampled", "row_chunk", "ensemble_chunk"):
        if getattr(params, name) < 1:
            raise FitnessInputError(f"{name} must be >= 1, got {getattr(params, name)}")
    if params.patience < 0:
        raise FitnessInputError(f"patience must be >= 0, got {params.patience}")
    if params.thresholds is not None:
        _freeze_thresholds(params.thresholds)


@struct.dataclass
class FitnessInfo:
    """What one fitness evaluation found (E = number of final ensembles).

    Attributes:
      best_members: `(C,)` int32, the best final ensemble's individual per row.
      best_acc, best_diff, best_fitness: `()` of that ensemble (fitness with
        the current acc_ratio).
      best_valid_fitness: `()` alpha·acc + (1 - alpha)·diff (early stopping).
      num_candidates: per level, `int32[num_groups]` candidates kept by each
        group (hierarchical; "sampled" has one level with the ensemble count).
      final_members: `(E, C)` int32 individuals of the final ensembles (rows).
      final_acc, final_diff, final_fitness: `(E,)` float32.
      final_valid: `(E,)` bool, which of the E slots hold a kept ensemble.
      permutation: `(C,)` int32, row at each shuffled position.
    """

    best_members: jax.Array
    best_acc: jax.Array
    best_diff: jax.Array
    best_fitness: jax.Array
    best_valid_fitness: jax.Array
    num_candidates: tuple
    final_members: jax.Array
    final_acc: jax.Array
    final_diff: jax.Array
    final_fitness: jax.Array
    final_valid: jax.Array
    permutation: jax.Array


@struct.dataclass
class FitnessState:
    """Across-generation state of the fitness (SPEC §6 step 6).

    Attributes:
      acc_ratio: `()` float32, weight of accuracy in the ensemble fitness.
      best_valid_fitness: `()` float32, best valid fitness so far (-inf at start).
      num_stalled: `()` int32, generations without a better valid fitness.
      improved: `()` bool, whether the last update improved it.
      generation: `()` int32, updates so far.
    """

    acc_ratio: jax.Array
    best_valid_fitness: jax.Array
    num_stalled: jax.Array
    improved: jax.Array
    generation: jax.Array

    @classmethod
    def create(cls, params: FitnessParams) -> "FitnessState":
        """acc_ratio = alpha, nothing seen yet."""
        return cls(acc_ratio=jnp.asarray(params.alpha, jnp.float32),
                   best_valid_fitness=jnp.asarray(-jnp.inf, jnp.float32),
                   num_stalled=jnp.asarray(0, jnp.int32), improved=jnp.asarray(False),
                   generation=jnp.asarray(0, jnp.int32))


def update_acc_ratio(best_acc: jax.Array, params: FitnessParams) -> jax.Array:
    """`alpha + max(0, gamma - best_acc)` (SPEC §6 step 6)."""
    return jnp.asarray(params.alpha + jnp.maximum(0.0, params.gamma - best_acc), jnp.float32)


def early_stopping(best_valid_fitness: jax.Array, num_stalled: jax.Array, valid_fitness: jax.Array,
                   patience: int) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """One early-stopping step, as the reference: a strictly better valid
    fitness resets the counter; otherwise it grows, and reaching `patience`
    stops (`patience` 0 never stops).

    Returns:
      `(best_valid_fitness, num_stalled, improved, stop)`.
    """
    improved = valid_fitness > best_valid_fitness
    best = jnp.where(improved, valid_fitness, best_valid_fitness)
    stalled = jnp.where(improved, 0, num_stalled + 1).astype(jnp.int32)
    stop = (stalled >= patience) & (patience > 0)
    return best, stalled, improved, stop


def update_fitness_state(state: FitnessState, info: FitnessInfo,
                         params: FitnessParams) -> tuple[FitnessState, jax.Array]:
    """After a generation: new acc_ratio from the best ensemble's accuracy and
    the early-stopping step on its valid fitness. Returns `(state, stop)`."""
    best, stalled, improved, stop = early_stopping(
        state.best_valid_fitness, state.num_stalled, info.best_valid_fitness, params.patience)
    new = state.replace(acc_ratio=update_acc_ratio(info.best_acc, params), best_valid_fitness=best,
                        num_stalled=stalled, improved=improved, generation=state.generation + 1)
    return new, stop


def to_minimise(score: jax.Array) -> jax.Array:
    """The value evosax minimises: `-score`."""
    return -score


# -- building blocks ---------------------------------------------------------


@jax.jit
def diff_table(flat_masks: jax.Array) -> jax.Array:
    """Module difference `D[c, c', i, j] = 1 - Jaccard(masks[c, i], masks[c', j])`.

    Intersections are one matmul of 0/1 floats (HIGHEST precision, so counts
    are exact on accelerators too); two empty masks have diff 0.

    Args:
      flat_masks: `(C, P, K)` bool (`masks.flatten`).

    Returns:
      `D (C, C, P, P)` float32.
    """
    if flat_masks.ndim != 3:
        raise FitnessInputError(
            f"flat_masks have shape {tuple(flat_masks.shape)}; expected (C, P, K)")
    ones = flat_masks.astype(jnp.float32)
    inter = jnp.einsum("cik,djk->cdij", ones, ones, precision=jax.lax.Precision.HIGHEST)
    sizes = ones.sum(-1)  # (C, P)
    union = sizes[:, None, :, None] + sizes[None, :, None, :] - inter
    sim = jnp.where(union > 0, inter / jnp.maximum(union, 1.0), 1.0)
    return (1.0 - sim).astype(jnp.float32)


def _label_rows(labels: jax.Array, classes: jax.Array) -> jax.Array:
    """`(N,)` int32 row c with `classes[c] == labels[n]`, or -1 (image ignored)."""
    hit = labels[:, None] == classes[None, :]
    return jnp.where(hit.any(-1), jnp.argmax(hit, -1), -1).astype(jnp.int32)


def _num_pairs(num_classes: int) -> int:
    return num_classes * (num_classes - 1) // 2


def _ensemble_fitness(acc, diff, acc_ratio, alpha):
    return acc_ratio * acc + (1.0 - alpha) * diff


def _individual_scores(members: jax.Array, fitness: jax.Array, valid: jax.Array,
                       num_individuals: int) -> jax.Array:
    """Best fitness of any valid ensemble containing each individual (0 if none).

    members `(E, C)`, fitness/valid `(E,)` -> `(C, P)` via a scatter-max.
    """
    num_ens, num_rows = members.shape
    fit = jnp.where(valid, fitness, 0.0)
    rows = jnp.broadcast_to(jnp.arange(num_rows)[None, :], (num_ens, num_rows))
    vals = jnp.broadcast_to(fit[:, None], (num_ens, num_rows))
    return jnp.zeros((num_rows, num_individuals), jnp.float32).at[rows, members].max(vals)


class _Candidates(NamedTuple):
    """Candidate ensembles of one group of classes (K slots, m classes, N images)."""

    positions: tuple[int, ...]  # static: shuffled class positions covered
    members: jax.Array  # (K, m) int32 individual per position
    valid: jax.Array  # (K,) bool
    is_hof: jax.Array  # (K,) bool, the all-hall-of-fame ensemble
    diff_sum: jax.Array  # (K,) float32, sum of pairwise diffs
    max_logit: jax.Array  # (K, N) float32, max over the group's classes
    correct: jax.Array  # (K, N) bool, correct within the group (False off-group)
    acc: jax.Array  # (K,) float32
    count: jax.Array  # () int32, valid slots


def _singletons(position: int, logits: jax.Array, label_pos: jax.Array,
                has_hof: bool) -> _Candidates:
    """Level-0 candidates: the P individuals of one class (accuracy 1 on it)."""
    num_individuals, num_images = logits.shape
    own = label_pos == position
    idx = jnp.arange(num_individuals, dtype=jnp.int32)
    return _Candidates(
        positions=(position,), members=idx[:, None], valid=jnp.ones(num_individuals, bool),
        is_hof=(idx == num_individuals - 1) if has_hof else jnp.zeros(num_individuals, bool),
        diff_sum=jnp.zeros(num_individuals, jnp.float32), max_logit=logits,
        correct=jnp.broadcast_to(own[None, :], (num_individuals, num_images)),
        acc=jnp.broadcast_to(jnp.where(own.any(), 1.0, 0.0), (num_individuals,)).astype(jnp.float32),
        count=jnp.asarray(num_individuals, jnp.int32))


def _pair_counts(g1: _Candidates, g2: _Candidates, row_chunk: int) -> jax.Array:
    """Correct images of every combination (a, b): `(K1, K2)` int32."""

    def one_row(args):  # (N,), (N,) -> (K2,)
        correct_a, max_a = args
        win1 = correct_a[None, :] & (max_a[None, :] >= g2.max_logit)
        win2 = g2.correct & (g2.max_logit > max_a[None, :])
        return jnp.sum(win1 | win2, axis=-1, dtype=jnp.int32)  # disjoint image sets

    return jax.lax.map(one_row, (g1.correct, g1.max_logit),
                       batch_size=min(row_chunk, g1.correct.shape[0]))


def _select(acc, valid, is_hof, threshold: float, cap: int, min_kept: int, max_kept: int,
            has_hof: bool):
    """Indices of the kept combinations (best accuracy first; hall of fame forced).

    keep = clip(#valid with acc >= threshold, min_kept, max_kept), at most
    #valid; if the hall-of-fame combination is not among the `keep` best it
    is added (so up to `max_kept + 1`). It is placed first in the list.

    Returns:
      `(idx (cap,), kept (cap,) bool, count ())`.
    """
    n_valid = jnp.sum(valid, dtype=jnp.int32)
    n_pass = jnp.sum(valid & (acc >= threshold), dtype=jnp.int32)
    keep = jnp.minimum(jnp.minimum(jnp.maximum(n_pass, min_kept), max_kept), n_valid)
    sort_key = jnp.where(valid, acc, -1.0)
    if has_hof:
        hof = is_hof & valid
        hof_acc = jnp.max(jnp.where(hof, acc, -jnp.inf))
        n_better = jnp.sum(valid & ~hof & (acc > hof_acc), dtype=jnp.int32)
        keep = keep + (hof.any() & (n_better >= keep)).astype(jnp.int32)
        sort_key = jnp.where(hof, 2.0, sort_key)
    _, idx = jax.lax.top_k(sort_key, cap)
    kept = jnp.arange(cap) < keep
    return idx, kept, keep


def _combine(g1: _Candidates, g2: _Candidates, D: jax.Array, label_pos: jax.Array,
             threshold: float, params: FitnessParams) -> _Candidates:
    """All K1·K2 combinations of two groups, filtered to the kept list."""
    k1, k2 = g1.valid.shape[0], g2.valid.shape[0]
    positions = g1.positions + g2.positions
    in_group = jnp.isin(label_pos, jnp.asarray(positions))
    num_images = jnp.sum(in_group, dtype=jnp.int32)
    counts = _pair_counts(g1, g2, params.row_chunk)  # (K1, K2)
    acc = (counts / jnp.maximum(num_images, 1)).astype(jnp.float32).reshape(-1)
    valid = (g1.valid[:, None] & g2.valid[None, :]).reshape(-1)
    is_hof = (g1.is_hof[:, None] & g2.is_hof[None, :]).reshape(-1)
    cap = min(params.max_kept + int(params.has_hall_of_fame), k1 * k2)
    idx, kept, count = _select(acc, valid, is_hof, threshold, cap, params.min_kept,
                               params.max_kept, params.has_hall_of_fame)
    a, b = idx // k2, idx % k2
    m1, m2 = g1.members[a], g2.members[b]  # (cap, m1), (cap, m2)
    p1 = jnp.asarray(g1.positions)[None, :, None]
    p2 = jnp.asarray(g2.positions)[None, None, :]
    cross = D[p1, p2, m1[:, :, None], m2[:, None, :]].sum((1, 2))
    max1, max2 = g1.max_logit[a], g2.max_logit[b]
    correct = (g1.correct[a] & (max1 >= max2)) | (g2.correct[b] & (max2 > max1))
    return _Candidates(
        positions=positions, members=jnp.concatenate([m1, m2], axis=1), valid=kept,
        is_hof=is_hof[idx] & kept, diff_sum=g1.diff_sum[a] + g2.diff_sum[b] + cross,
        max_logit=jnp.maximum(max1, max2), correct=correct, acc=acc[idx], count=count)


def _hierarchical(key, L, D, labels, classes, acc_ratio, params: FitnessParams):
    num_rows, num_individuals, _ = L.shape
    perm = jax.random.permutation(key, num_rows).astype(jnp.int32)  # position j -> row perm[j]
    Lp, Dp = L[perm], D[perm][:, perm]
    label_pos = _label_rows(labels, classes[perm])
    thresholds = (dict(params.thresholds) if params.thresholds is not None
                  else reference_thresholds(num_rows))
    groups = [_singletons(j, Lp[j], label_pos, params.has_hall_of_fame) for j in range(num_rows)]
    num_candidates = []
    for level in level_plan(num_rows):
        new_groups, i = [], 0
        for target in level:
            if groups[i].positions == target:  # odd group passes through
                new_groups.append(groups[i])
                i += 1
            else:
                thr = threshold_for(len(target), thresholds)
                new_groups.append(_combine(groups[i], groups[i + 1], Dp, label_pos, thr, params))
                i += 2
        groups = new_groups
        num_candidates.append(jnp.stack([g.count for g in groups]))
    final = groups[0]
    inv = jnp.argsort(perm)
    members = final.members[:, inv]  # positions -> rows
    pairs = _num_pairs(num_rows)
    diff = final.diff_sum / pairs if pairs else jnp.zeros_like(final.diff_sum)
    return members, final.acc, diff, final.valid, tuple(num_candidates), perm


def _ensemble_accuracy(L, members, label_rows, chunk: int) -> jax.Array:
    """Accuracy of each ensemble `members (E, C)` on the valid images: `(E,)`."""
    num_rows = L.shape[0]
    rows = jnp.arange(num_rows)
    num_valid = jnp.maximum(jnp.sum(label_rows >= 0), 1)

    def one(m):  # (C,) -> ()
        pred = jnp.argmax(L[rows, m], axis=0)  # (N,), first max wins
        return jnp.sum((pred == label_rows) & (label_rows >= 0), dtype=jnp.int32)

    counts = jax.lax.map(one, members, batch_size=min(chunk, members.shape[0]))
    return (counts / num_valid).astype(jnp.float32)


def _ensemble_diff_sum(D, members) -> jax.Array:
    """Sum over class pairs c < c' of `D[c, c', m_c, m_c']`: `(E,)`."""
    num_rows = members.shape[1]
    rows = jnp.arange(num_rows)
    pair_d = D[rows[None, :, None], rows[None, None, :], members[:, :, None], members[:, None, :]]
    upper = jnp.triu(jnp.ones((num_rows, num_rows), bool), k=1)
    return jnp.sum(jnp.where(upper, pair_d, 0.0), axis=(1, 2))


def _substitution_accuracy(L, base, label_rows) -> jax.Array:
    """Accuracy of `base` with row c replaced by individual i, for all (c, i): `(C, P)`.

    Uses the base's top-2 logits per image: the rest of the ensemble's best
    row when row c is swapped out is the first or the second of them.
    """
    num_rows, num_individuals, num_images = L.shape
    rows = jnp.arange(num_rows)
    num_valid = jnp.maximum(jnp.sum(label_rows >= 0), 1)
    base_logits = L[rows, base]  # (C, N)
    if num_rows == 1:
        pred = jnp.zeros((1, num_individuals, num_images), jnp.int32)
    else:
        vals, idx = jax.lax.top_k(base_logits.T, 2)  # (N, 2), ties: lower row first
        first_is_c = idx[None, :, 0] == rows[:, None]  # (C, N)
        other_max = jnp.where(first_is_c, vals[None, :, 1], vals[None, :, 0])
        other_arg = jnp.where(first_is_c, idx[None, :, 1], idx[None, :, 0])
        wins = (L > other_max[:, None, :]) | (
            (L == other_max[:, None, :]) & (rows[:, None, None] < other_arg[:, None, :]))
        pred = jnp.where(wins, rows[:, None, None], other_arg[:, None, :])
    correct = (pred == label_rows[None, None, :]) & (label_rows >= 0)[None, None, :]
    return (jnp.sum(correct, axis=-1, dtype=jnp.int32) / num_valid).astype(jnp.float32)


def _substitution_diff_sum(D, base, base_diff_sum) -> jax.Array:
    """Diff sum of `base` with row c replaced by i, for all (c, i): `(C, P)`."""
    num_rows, _, num_individuals, _ = D.shape
    rows = jnp.arange(num_rows)
    # cross[c, c', i] = D[c, c', i, base[c']]
    cross = D[rows[:, None, None], rows[None, :, None], jnp.arange(num_individuals)[None, None, :],
              base[None, :, None]]
    off_diag = ~jnp.eye(num_rows, dtype=bool)[:, :, None]
    new = jnp.sum(jnp.where(off_diag, cross, 0.0), axis=1)  # (C, P)
    old = new[rows, base]  # (C,)
    return base_diff_sum - old[:, None] + new


def _sampled(key, L, D, labels, classes, acc_ratio, params: FitnessParams):
    num_rows, num_individuals, _ = L.shape
    num_pop = num_individuals - int(params.has_hall_of_fame)
    label_rows = _label_rows(labels, classes)
    pairs = _num_pairs(num_rows)
    scale = 1.0 / pairs if pairs else 0.0
    stage1 = jax.random.randint(key, (params.num_sampled, num_rows), 0, num_pop, dtype=jnp.int32)
    if params.has_hall_of_fame:
        stage1 = jnp.concatenate([jnp.full((1, num_rows), num_individuals - 1, jnp.int32), stage1])
    acc1 = _ensemble_accuracy(L, stage1, label_rows, params.ensemble_chunk)
    dsum1 = _ensemble_diff_sum(D, stage1)
    best1 = jnp.argmax(_ensemble_fitness(acc1, dsum1 * scale, acc_ratio, params.alpha))
    base = stage1[best1]
    acc2 = _substitution_accuracy(L, base, label_rows).reshape(-1)
    dsum2 = _substitution_diff_sum(D, base, dsum1[best1]).reshape(-1)
    rows = jnp.repeat(jnp.arange(num_rows), num_individuals)
    inds = jnp.tile(jnp.arange(num_individuals, dtype=jnp.int32), num_rows)
    stage2 = jnp.broadcast_to(base, (num_rows * num_individuals, num_rows))
    stage2 = stage2.at[jnp.arange(stage2.shape[0]), rows].set(inds)
    members = jnp.concatenate([stage1, stage2])
    acc = jnp.concatenate([acc1, acc2])
    diff = jnp.concatenate([dsum1, dsum2]) * scale
    valid = jnp.ones(members.shape[0], bool)
    counts = (jnp.asarray([members.shape[0]], jnp.int32),)
    return members, acc, diff, valid, counts, jnp.arange(num_rows, dtype=jnp.int32)


def check_fitness_inputs(L, flat_masks, labels, classes, params: FitnessParams) -> tuple[int, int, int]:
    """Raise `FitnessInputError` naming the shapes unless they fit; return `(C, P, N)`."""
    check_params(params)
    if L.ndim != 3:
        raise FitnessInputError(f"L has shape {tuple(L.shape)}; expected (C, P, N)")
    num_rows, num_individuals, num_images = (int(s) for s in L.shape)
    if flat_masks.ndim != 3 or tuple(flat_masks.shape[:2]) != (num_rows, num_individuals):
        raise FitnessInputError(
            f"flat_masks have shape {tuple(flat_masks.shape)}; expected ({num_rows}, "
            f"{num_individuals}, K) to match L of shape {tuple(L.shape)}")
    if flat_masks.dtype != jnp.bool_:
        raise FitnessInputError(f"flat_masks have dtype {flat_masks.dtype}; expected bool")
    if labels.ndim != 1 or int(labels.shape[0]) != num_images:
        raise FitnessInputError(
            f"labels have shape {tuple(labels.shape)}; expected ({num_images},) to match L of "
            f"shape {tuple(L.shape)} (C, P, N)")
    if classes.ndim != 1 or int(classes.shape[0]) != num_rows:
        raise FitnessInputError(
            f"classes have shape {tuple(classes.shape)}; expected ({num_rows},) to match L of "
            f"shape {tuple(L.shape)} (C, P, N)")
    for name, arr in (("labels", labels), ("classes", classes)):
        if not jnp.issubdtype(arr.dtype, jnp.integer):
            raise FitnessInputError(f"{name} have dtype {arr.dtype}; expected an integer dtype")
    if params.has_hall_of_fame and num_individuals < 2:
        raise FitnessInputError(
            f"has_hall_of_fame needs P >= 2 (population + the hall-of-fame slot), got P={num_individuals}")
    return num_rows, num_individuals, num_images


def _cooperative_fitness(key: jax.Array, L: jax.Array, flat_masks: jax.Array, labels: jax.Array,
                         classes: jax.Array, acc_ratio: jax.Array,
                         params: FitnessParams) -> tuple[jax.Array, FitnessInfo]:
    """Cooperative fitness of all individuals (SPEC §6 steps 2-5).

    Args:
      key: PRNG key (class shuffle of the hierarchical scheme / ensemble sampling).
      L: `(C, P, N)` float32 logit table from an evaluator; with
        `params.has_hall_of_fame` index P-1 of every row is the hall-of-fame slot.
      flat_masks: `(C, P, K)` bool kept kernels (`masks.flatten`).
      labels: `(N,)` int class ids; images whose label is not in `classes` are ignored.
      classes: `(C,)` int class id of each row (usually `arange(C)`).
      acc_ratio: `()` weight of accuracy (`FitnessState.acc_ratio`).
      params: `FitnessParams` (static fields select the scheme and shapes).

    Returns:
      `(score (C, P) float32 to maximise, FitnessInfo)`. Jit-compiled once per
      shapes and static params.
    """
    num_rows, num_individuals, _ = check_fitness_inputs(L, flat_masks, labels, classes, params)
    L = L.astype(jnp.float32)
    labels, classes = labels.astype(jnp.int32), classes.astype(jnp.int32)
    acc_ratio = jnp.asarray(acc_ratio, jnp.float32)
    chex.assert_shape(acc_ratio, ())
    D = diff_table(flat_masks)
    scheme = _hierarchical if params.ensemble == "hierarchical" else _sampled
    members, acc, diff, valid, num_candidates, perm = scheme(key, L, D, labels, classes, acc_ratio,
                                                             params)
    fitness = jnp.where(valid, _ensemble_fitness(acc, diff, acc_ratio, params.alpha), 0.0)
    scores = _individual_scores(members, fitness, valid, num_individuals)
    best = jnp.argmax(jnp.where(valid, fitness, -jnp.inf))
    info = FitnessInfo(
        best_members=members[best], best_acc=acc[best], best_diff=diff[best],
        best_fitness=fitness[best],
        best_valid_fitness=params.alpha * acc[best] + (1.0 - params.alpha) * diff[best],
        num_candidates=num_candidates, final_members=members, final_acc=acc, final_diff=diff,
        final_fitness=fitness, final_valid=valid, permutation=perm)
    chex.assert_shape(scores, (num_rows, num_individuals))
    return scores, info


cooperative_fitness = jax.jit(_cooperative_fitness)
