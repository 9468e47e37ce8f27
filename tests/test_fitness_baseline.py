"""The NumPy/multiprocessing fitness baseline (benchmarks/fitness_baseline.py) against
jaxsplit's on-device `cooperative_fitness`."""

from __future__ import annotations

import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxsplit.search import fitness as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import fitness_baseline as FB  # noqa: E402


def perfect_table(num_classes, num_individuals, num_images, seed):
    """L where exactly one individual per class (a "star") is a perfect module.

    A star gives +5 on its class's images and -5 elsewhere. Every other individual of
    class c gives +7 on class (c+1)'s images (stealing them) and -6 on its own, so any
    ensemble with a non-star is wrong on some images: the all-star ensemble is the unique
    one with accuracy 1.
    """
    rng = np.random.default_rng(seed)
    labels = np.arange(num_images) % num_classes
    rng.shuffle(labels)
    stars = rng.integers(0, num_individuals, num_classes)
    L = np.empty((num_classes, num_individuals, num_images), np.float32)
    for c in range(num_classes):
        own = labels == c
        stolen = labels == (c + 1) % num_classes
        for i in range(num_individuals):
            noise = rng.uniform(-0.3, 0.3, num_images)
            if i == stars[c]:
                L[c, i] = np.where(own, 5.0, -5.0) + noise
            else:
                L[c, i] = np.where(stolen, 7.0, np.where(own, -6.0, -5.0)) + noise
    masks = rng.random((num_classes, num_individuals, 40)) < 0.5
    return L, masks, labels.astype(np.int32), stars


def jax_fitness(L, masks, labels, acc_ratio, key=0, **params):
    p = F.FitnessParams.create(**params)
    C = L.shape[0]
    score, info = F.cooperative_fitness(jax.random.key(key), jnp.asarray(L), jnp.asarray(masks),
                                        jnp.asarray(labels), jnp.arange(C, dtype=jnp.int32),
                                        jnp.asarray(acc_ratio, jnp.float32), p)
    return np.asarray(score), info


@pytest.mark.parametrize("num_classes,hof", [(4, False), (5, True)])
def test_same_best_ensemble_on_a_table_with_perfect_modules(num_classes, hof):
    P, N = 7, 60
    L, masks, labels, stars = perfect_table(num_classes, P, N, seed=num_classes)
    kw = dict(min_kept=3, max_kept=6, has_hall_of_fame=hof)
    acc_ratio = 0.93
    score_j, info_j = jax_fitness(L, masks, labels, acc_ratio, **kw)
    score_n, info_n = FB.hierarchical_fitness(L, masks, labels, np.arange(num_classes), acc_ratio,
                                              seed=1, processes=0, **kw)
    np.testing.assert_array_equal(info_n["best_members"], stars)
    np.testing.assert_array_equal(np.asarray(info_j.best_members), stars)
    assert info_n["best_acc"] == 1.0 and float(info_j.best_acc) == 1.0
    np.testing.assert_allclose(info_n["best_diff"], float(info_j.best_diff), atol=1e-6)
    np.testing.assert_allclose(info_n["best_fitness"], float(info_j.best_fitness), atol=1e-6)
    np.testing.assert_allclose(info_n["best_valid_fitness"], float(info_j.best_valid_fitness),
                               atol=1e-6)
    rows = np.arange(num_classes)
    np.testing.assert_allclose(score_n[rows, stars], score_j[rows, stars], atol=1e-6)
    np.testing.assert_allclose(score_n[rows, stars], info_n["best_fitness"], atol=1e-9)


def test_scores_agree_when_every_ensemble_is_kept():
    # with min_kept = max_kept >= P^C nothing is cut, so the final ensembles are all P^C
    # combinations whatever the class shuffle: every individual's score must agree
    C, P, N = 3, 4, 30
    rng = np.random.default_rng(0)
    L = rng.normal(size=(C, P, N)).astype(np.float32)
    masks = rng.random((C, P, 25)) < 0.5
    labels = rng.integers(0, C, N).astype(np.int32)
    kw = dict(min_kept=100, max_kept=100, has_hall_of_fame=True)
    score_j, info_j = jax_fitness(L, masks, labels, 0.95, key=3, **kw)
    score_n, info_n = FB.hierarchical_fitness(L, masks, labels, np.arange(C), 0.95, seed=7,
                                              processes=2, **kw)
    assert len(info_n["final_members"]) == P ** C
    assert int(np.sum(np.asarray(info_j.final_valid))) == P ** C
    np.testing.assert_allclose(score_n, score_j, atol=1e-6)
    np.testing.assert_allclose(info_n["best_fitness"], float(info_j.best_fitness), atol=1e-6)


def test_pool_and_serial_give_the_same_result():
    L, masks, labels, _ = perfect_table(4, 6, 40, seed=9)
    L = L + np.random.default_rng(1).normal(0, 3, L.shape).astype(np.float32)  # real selection
    kw = dict(min_kept=4, max_kept=8, seed=2)
    s0, i0 = FB.hierarchical_fitness(L, masks, labels, np.arange(4), processes=0, **kw)
    s2, i2 = FB.hierarchical_fitness(L, masks, labels, np.arange(4), processes=2, **kw)
    np.testing.assert_array_equal(s0, s2)
    np.testing.assert_array_equal(i0["final_members"], i2["final_members"])
    assert i0["num_candidates"] == i2["num_candidates"]
    assert all(n <= 8 + 1 for level in i0["num_candidates"] for n in level)


def test_threshold_table():
    assert FB.threshold(2, FB.REFERENCE_THRESHOLDS) == 0.95
    assert FB.threshold(6, FB.REFERENCE_THRESHOLDS) == 0.95
    assert FB.threshold(10, FB.REFERENCE_THRESHOLDS) == 0.80
    assert FB.thresholds_for_task(5) == FB.REFERENCE_THRESHOLDS_5
    for size in range(1, 11):
        assert FB.threshold(size, FB.REFERENCE_THRESHOLDS) == F.threshold_for(
            size, F.REFERENCE_THRESHOLDS)
