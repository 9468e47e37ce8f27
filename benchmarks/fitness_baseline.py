"""The reference's hierarchical cooperative fitness in NumPy, with a multiprocessing pool (docs/method.md §6).

The baseline that jaxsplit's on-device `jaxsplit.search.fitness.cooperative_fitness` is
compared with. Written from docs/method.md §6, the way the reference organises the work:
ensembles are scored one by one in worker processes (a `multiprocessing.Pool` over blocks of
candidate ensembles), each by taking the argmax of its members' logits on the images of its
classes. NumPy vectorises within a block (a few hundred ensembles at a time), so this is a
fair, not a strawman, CPU baseline.

The scheme (as `cooperative_fitness(..., ensemble="hierarchical")`):

1. classes are shuffled (`seed`), then grouped pairwise level by level, an odd last group
   passing through (10 classes: [2,2,2,2,2] -> [4,4,2] -> [8,2] -> [10]);
2. for two groups with K1 and K2 candidate ensembles, all K1·K2 combinations are scored
   (accuracy on the images whose label is among the combined classes; prediction = the class
   of the first maximal logit, classes in shuffled order), and those with accuracy >=
   threshold(size) are kept — at least `min_kept`, at most `max_kept`, best accuracy first;
   the hall-of-fame combination (every member = the last individual, P - 1) is always kept;
3. each final ensemble gets `diff` = mean over class pairs of 1 - Jaccard(kept kernels) and
   `fitness = acc_ratio · acc + (1 - alpha) · diff`;
4. an individual's score = the best fitness of a final ensemble containing it (0 if none).

It is not bit-identical to jaxsplit's run for the same seed (the class shuffle uses NumPy's
RNG, and ties in accuracy may be ordered differently); on a table where the selection is
unambiguous both give the same ensembles and values (tests/test_fitness_baseline.py).

    sys.path.insert(0, "benchmarks")
    from fitness_baseline import hierarchical_fitness
    scores, info = hierarchical_fitness(L, flat_masks, labels, classes, acc_ratio=0.9, seed=0)

The pool uses the "fork" start method (workers inherit the arrays; the reference runs on
Linux, where fork is the default). Only NumPy runs in the workers.
"""

from __future__ import annotations

import math
import multiprocessing
import os
import warnings
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np

REFERENCE_THRESHOLDS = {2: 0.95, 4: 0.95, 8: 0.85, 10: 0.80}
REFERENCE_THRESHOLDS_5 = {2: 0.95, 4: 0.90, 5: 0.85}
ENSEMBLE_BLOCK = 256  # ensembles scored at once in a worker (bounds its memory)

# Per worker process: the arrays every task reads, set once by `_init_worker` (inherited
# through fork, never pickled per task).
_WORKER: dict[str, np.ndarray] = {}


def thresholds_for_task(num_classes: int) -> dict[int, float]:
    """The reference's thresholds: its 5-class table for 5 classes, else the 10-class one."""
    return dict(REFERENCE_THRESHOLDS_5 if num_classes == 5 else REFERENCE_THRESHOLDS)


def threshold(size: int, thresholds: Mapping[int, float]) -> float:
    """Entry of the largest listed size <= `size` (the smallest listed size's otherwise)."""
    keys = sorted(int(k) for k in thresholds)
    below = [k for k in keys if k <= size]
    return float({int(k): v for k, v in thresholds.items()}[below[-1] if below else keys[0]])


class Group(NamedTuple):
    """Candidate ensembles over some classes.

    rows: L rows covered, in shuffled order; members: `(K, m)` individual per row;
    is_hof: `(K,)` the all-hall-of-fame ensemble; acc: `(K,)` accuracy on the group's images.
    """

    rows: tuple[int, ...]
    members: np.ndarray
    is_hof: np.ndarray
    acc: np.ndarray


def _init_worker(L: np.ndarray, labels: np.ndarray, classes: np.ndarray) -> None:
    _WORKER.update(L=L, labels=labels, classes=classes)


def _score_block(task: tuple) -> np.ndarray:
    """Accuracies of `members1 (ba, m1) x members2 (K2, m2)`: `(ba * K2,)` float64."""
    rows, members1, members2 = task
    L, labels, classes = _WORKER["L"], _WORKER["labels"], _WORKER["classes"]
    group_classes = classes[list(rows)]  # (m,)
    image_idx = np.flatnonzero(np.isin(labels, group_classes))
    if image_idx.size == 0:
        return np.zeros(len(members1) * len(members2))
    # target[n] = position (in `rows`) of image n's class
    target = np.argmax(labels[image_idx][:, None] == group_classes[None, :], axis=1)
    Lg = L[np.asarray(rows)][:, :, image_idx]  # (m, P, N_g)
    m = len(rows)
    k2 = len(members2)
    combos = np.concatenate([np.repeat(members1, k2, axis=0),
                             np.tile(members2, (len(members1), 1))], axis=1)  # (ba*K2, m)
    out = np.empty(len(combos))
    pos = np.arange(m)[None, :]
    for start in range(0, len(combos), ENSEMBLE_BLOCK):
        block = combos[start:start + ENSEMBLE_BLOCK]
        logits = Lg[pos, block]  # (E, m, N_g): each ensemble's members' logits
        pred = np.argmax(logits, axis=1)  # first maximum, classes in shuffled order
        out[start:start + len(block)] = np.mean(pred == target[None, :], axis=1)
    return out


def _combine(g1: Group, g2: Group, accs: np.ndarray, thr: float, min_kept: int, max_kept: int,
             has_hof: bool) -> Group:
    """Keep the best combinations of g1 x g2 given their accuracies `(K1 * K2,)`."""
    k2 = len(g2.members)
    n = len(accs)
    n_pass = int(np.sum(accs >= thr))
    keep = min(max(n_pass, min_kept), max_kept, n)
    order = np.argsort(-accs, kind="stable")[:keep]
    is_hof = (g1.is_hof[:, None] & g2.is_hof[None, :]).reshape(-1)
    if has_hof and is_hof.any():
        hof = int(np.flatnonzero(is_hof)[0])
        if hof not in set(order.tolist()):
            order = np.concatenate([order, [hof]])
    a, b = order // k2, order % k2
    return Group(g1.rows + g2.rows, np.concatenate([g1.members[a], g2.members[b]], axis=1),
                 is_hof[order], accs[order])


def _diffs(flat_masks: np.ndarray, rows: Sequence[int], members: np.ndarray) -> np.ndarray:
    """Mean over class pairs of 1 - Jaccard for ensembles `members (E, C)`: `(E,)`."""
    num = len(rows)
    if num < 2:
        return np.zeros(len(members))
    rows_arr = np.asarray(rows)
    out = np.empty(len(members))
    upper = np.triu(np.ones((num, num), bool), k=1)
    for e, mem in enumerate(members):
        m = flat_masks[rows_arr, mem].astype(np.float64)  # (C, K)
        inter = m @ m.T
        sizes = m.sum(1)
        union = sizes[:, None] + sizes[None, :] - inter
        sim = np.where(union > 0, inter / np.maximum(union, 1.0), 1.0)
        out[e] = np.mean((1.0 - sim)[upper])
    return out


def hierarchical_fitness(L: np.ndarray, flat_masks: np.ndarray, labels: np.ndarray,
                         classes: np.ndarray, acc_ratio: float = 0.9, *, alpha: float = 0.9,
                         thresholds: Mapping[int, float] | None = None, min_kept: int = 50,
                         max_kept: int = 500, has_hall_of_fame: bool = True, seed: int = 0,
                         processes: int | None = None) -> tuple[np.ndarray, dict[str, Any]]:
    """The reference's cooperative fitness of all individuals (module docstring).

    Args:
      L: `(C, P, N)` logits (`L[c, i, n]` = class `classes[c]` logit of module (c, i)).
      flat_masks: `(C, P, K)` bool kept kernels.
      labels: `(N,)` int labels; images whose label is not in `classes` are ignored.
      classes: `(C,)` int class id of each row.
      acc_ratio: weight of accuracy in the fitness.
      alpha: `(1 - alpha)` weighs the diff.
      thresholds: `{ensemble size: accuracy}`; None: the reference's for C classes.
      min_kept, max_kept: candidates kept per combination.
      has_hall_of_fame: individual P - 1 of every row is the previous best ensemble's member.
      seed: class shuffle.
      processes: worker processes (None: `os.cpu_count()`; 0 or 1: no pool, in this process).

    Returns:
      `(scores (C, P) float64, info)`; info holds `best_members (C,)` (per row),
      `best_acc`, `best_diff`, `best_fitness`, `best_valid_fitness`, `final_members (E, C)`,
      `final_acc`, `final_diff`, `final_fitness`, `num_candidates` (per level), `permutation`.
    """
    L = np.asarray(L, np.float32)
    flat_masks = np.asarray(flat_masks, bool)
    labels = np.asarray(labels).astype(np.int64)
    classes = np.asarray(classes).astype(np.int64)
    if L.ndim != 3:
        raise ValueError(f"L has shape {L.shape}; expected (C, P, N)")
    num_rows, num_individuals, num_images = L.shape
    if flat_masks.shape[:2] != (num_rows, num_individuals) or flat_masks.ndim != 3:
        raise ValueError(f"flat_masks have shape {flat_masks.shape}; expected ({num_rows}, "
                         f"{num_individuals}, K)")
    if labels.shape != (num_images,) or classes.shape != (num_rows,):
        raise ValueError(f"labels {labels.shape} / classes {classes.shape} do not fit L "
                         f"{L.shape}; expected ({num_images},) / ({num_rows},)")
    thresholds = thresholds_for_task(num_rows) if thresholds is None else dict(thresholds)
    perm = np.random.default_rng(seed).permutation(num_rows)
    idx = np.arange(num_individuals)
    hof_flags = (idx == num_individuals - 1) if has_hall_of_fame else np.zeros(num_individuals, bool)
    groups = [Group((int(r),), idx[:, None], hof_flags.copy(),
                    np.full(num_individuals, float(np.any(labels == classes[r]))))
              for r in perm]
    processes = os.cpu_count() if processes is None else int(processes)
    pool = None
    try:
        if processes > 1 and num_rows > 1:
            with warnings.catch_warnings():  # JAX warns on fork; workers only run NumPy
                warnings.simplefilter("ignore", RuntimeWarning)
                pool = multiprocessing.get_context("fork").Pool(
                    processes, initializer=_init_worker, initargs=(L, labels, classes))
            run = pool.map
        else:
            _init_worker(L, labels, classes)
            run = lambda f, tasks: list(map(f, tasks))  # noqa: E731
        num_candidates = []
        while len(groups) > 1:
            pairs = [(groups[i], groups[i + 1]) for i in range(0, len(groups) - 1, 2)]
            tasks, spans = [], []
            for g1, g2 in pairs:
                k1 = len(g1.members)
                block = max(1, math.ceil(k1 / (4 * max(processes, 1))))
                first = len(tasks)
                for a0 in range(0, k1, block):
                    tasks.append((g1.rows + g2.rows, g1.members[a0:a0 + block], g2.members))
                spans.append((first, len(tasks)))
            results = run(_score_block, tasks)
            new = []
            for (g1, g2), (t0, t1) in zip(pairs, spans):
                accs = np.concatenate(results[t0:t1])
                thr = threshold(len(g1.rows) + len(g2.rows), thresholds)
                new.append(_combine(g1, g2, accs, thr, min_kept, max_kept, has_hall_of_fame))
            if len(groups) % 2:
                new.append(groups[-1])
            groups = new
            num_candidates.append([len(g.members) for g in groups])
    finally:
        if pool is not None:
            pool.close()
            pool.join()
        else:
            _WORKER.clear()
    final = groups[0]
    inv = np.argsort(np.asarray(final.rows))
    members = final.members[:, inv]  # columns in row order 0..C-1
    rows_sorted = tuple(sorted(final.rows))
    diff = _diffs(flat_masks, rows_sorted, members)
    fitness = acc_ratio * final.acc + (1.0 - alpha) * diff
    scores = np.zeros((num_rows, num_individuals))
    for e in range(len(members)):
        cur = scores[np.arange(num_rows), members[e]]
        scores[np.arange(num_rows), members[e]] = np.maximum(cur, fitness[e])
    best = int(np.argmax(fitness))
    info = {
        "best_members": members[best], "best_acc": float(final.acc[best]),
        "best_diff": float(diff[best]), "best_fitness": float(fitness[best]),
        "best_valid_fitness": float(alpha * final.acc[best] + (1.0 - alpha) * diff[best]),
        "final_members": members, "final_acc": final.acc, "final_diff": diff,
        "final_fitness": fitness, "num_candidates": num_candidates, "permutation": perm,
    }
    return scores, info
