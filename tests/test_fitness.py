"""Tests of the cooperative fitness (docs/method.md §6) against brute-force numpy."""

import itertools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxsplit.search import fitness as F
from jaxsplit.search.config import SearchConfig

ALPHA = 0.9


# -- numpy brute force ---------------------------------------------------------


def np_diff_table(flat):
    C, P, _ = flat.shape
    D = np.zeros((C, C, P, P), np.float32)
    for c, d, i, j in itertools.product(range(C), range(C), range(P), range(P)):
        a, b = set(np.flatnonzero(flat[c, i])), set(np.flatnonzero(flat[d, j]))
        D[c, d, i, j] = 1.0 - (len(a & b) / len(a | b) if a | b else 1.0)
    return D


def np_ensemble(L, D, labels, classes, ens):
    """(acc, diff) of the ensemble `ens` (one individual per row), numpy argmax."""
    C = len(ens)
    keep = np.isin(labels, classes)
    logits = np.stack([L[c, ens[c]] for c in range(C)])  # (C, N)
    pred = np.asarray(classes)[np.argmax(logits, 0)]
    acc = np.mean(pred[keep] == labels[keep])
    pairs = list(itertools.combinations(range(C), 2))
    diff = np.mean([D[a, b, ens[a], ens[b]] for a, b in pairs]) if pairs else 0.0
    return acc, diff


def make_problem(seed, C, P, N, K=20, signal=1.0):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, C, N).astype(np.int32)
    L = rng.normal(size=(C, P, N)).astype(np.float32)
    L[labels, :, np.arange(N)] += signal * rng.random((N, P)).astype(np.float32)
    flat = rng.random((C, P, K)) < 0.5
    return L, flat, labels


def run(L, flat, labels, params, seed=0, acc_ratio=ALPHA, classes=None):
    C = L.shape[0]
    classes = jnp.arange(C, dtype=jnp.int32) if classes is None else jnp.asarray(classes)
    return F.cooperative_fitness(jax.random.key(seed), jnp.asarray(L), jnp.asarray(flat),
                                 jnp.asarray(labels), classes, jnp.float32(acc_ratio), params)


# -- diff table ----------------------------------------------------------------


def test_diff_table_matches_numpy_loop():
    for seed in range(3):
        rng = np.random.default_rng(seed)
        flat = rng.random((3, 4, 17)) < 0.4
        flat[0, 0] = False  # an empty mask
        flat[1, 2] = False  # another one: two empty masks differ by 0
        D = np.asarray(F.diff_table(jnp.asarray(flat)))
        np.testing.assert_allclose(D, np_diff_table(flat), atol=1e-6)
    assert D[0, 1, 0, 2] == 0.0
    np.testing.assert_allclose(np.diagonal(np.diagonal(D, axis1=0, axis2=1), axis1=0, axis2=1), 0,
                               atol=1e-6)


# -- structure -----------------------------------------------------------------


def test_level_plan_matches_reference_grouping():
    sizes = lambda C: [tuple(len(g) for g in lv) for lv in F.level_plan(C)]
    assert sizes(10) == [(2, 2, 2, 2, 2), (4, 4, 2), (8, 2), (10,)]
    assert sizes(5) == [(2, 2, 1), (4, 1), (5,)]
    assert sizes(2) == [(2,)]
    assert sizes(1) == []
    assert F.level_plan(5)[1] == ((0, 1, 2, 3), (4,))


def test_thresholds_lookup_and_reference_tables():
    t10 = F.reference_thresholds(10)
    assert t10 == {2: 0.95, 4: 0.95, 8: 0.85, 10: 0.80}
    assert [F.threshold_for(s, t10) for s in (2, 3, 4, 6, 8, 9, 10, 12)] == [
        0.95, 0.95, 0.95, 0.95, 0.85, 0.85, 0.80, 0.80]
    t5 = F.reference_thresholds(5)
    assert [F.threshold_for(s, t5) for s in (2, 4, 5)] == [0.95, 0.90, 0.85]
    assert F.threshold_for(2, {4: 0.7}) == 0.7  # nothing smaller: the smallest listed
    with pytest.raises(F.FitnessInputError, match="threshold"):
        F.FitnessParams.create(thresholds={2: 1.5})


def test_num_candidates_per_level_for_10_and_5_classes():
    for C, expected_groups in ((10, [5, 3, 2, 1]), (5, [3, 2, 1])):
        L, flat, labels = make_problem(C, C, 4, 6 * C)
        params = F.FitnessParams.create(min_kept=3, max_kept=5, has_hall_of_fame=False)
        _, info = run(L, flat, labels, params)
        counts = [np.asarray(c) for c in info.num_candidates]
        assert [len(c) for c in counts] == expected_groups
        # a combined group keeps between min_kept and max_kept; a pass-through keeps its count
        assert all(3 <= v <= 5 for v in counts[0][: C // 2])
        if C == 5:
            assert counts[0][2] == 4  # the odd class passes through with its P individuals
            assert counts[1][1] == 4
        assert counts[-1][0] == int(np.sum(info.final_valid))


# -- hierarchical vs brute force -------------------------------------------------


@pytest.mark.parametrize("C", [3, 4])
def test_hierarchical_equals_brute_force_when_nothing_is_pruned(C):
    P, N = 3, 60
    params = F.FitnessParams.create(thresholds={2: 0.0}, min_kept=1, max_kept=100,
                                    has_hall_of_fame=False, row_chunk=2)  # 2 divides no K1
    for seed in range(3):
        L, flat, labels = make_problem(seed, C, P, N)
        D = np_diff_table(flat)
        score, info = run(L, flat, labels, params, seed=seed, acc_ratio=0.95)
        valid = np.asarray(info.final_valid)
        members = np.asarray(info.final_members)[valid]
        assert sorted(map(tuple, members)) == list(itertools.product(range(P), repeat=C))
        best = np.zeros((C, P))
        for row, (acc, diff, fit) in zip(members, zip(*(np.asarray(x)[valid] for x in (
                info.final_acc, info.final_diff, info.final_fitness)))):
            ref_acc, ref_diff = np_ensemble(L, D, labels, np.arange(C), row)
            np.testing.assert_allclose([acc, diff], [ref_acc, ref_diff], atol=1e-5)
            ref_fit = 0.95 * ref_acc + (1 - ALPHA) * ref_diff
            np.testing.assert_allclose(fit, ref_fit, atol=1e-5)
            best[np.arange(C), row] = np.maximum(best[np.arange(C), row], ref_fit)
        np.testing.assert_allclose(np.asarray(score), best, atol=1e-5)
        top = np.argmax(np.asarray(info.final_fitness))
        np.testing.assert_array_equal(info.best_members, np.asarray(info.final_members)[top])
        np.testing.assert_allclose(info.best_valid_fitness,
                                   ALPHA * info.best_acc + (1 - ALPHA) * info.best_diff, atol=1e-6)


def test_perfect_individuals_form_the_best_ensemble():
    C, P, N, K = 4, 6, 120, 20
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(C), N // C).astype(np.int32)
    perfect = np.where(labels[None, :] == np.arange(C)[:, None], 5.0, -5.0)  # (C, N)
    L = np.empty((C, P, N), np.float32)
    for c, i in itertools.product(range(C), range(P)):
        flip = rng.random(N) < (0.0 if i == 2 else 0.4)
        L[c, i] = np.where(flip, -perfect[c], perfect[c]) + 0.01 * rng.normal(size=N)
    flat = rng.random((C, P, K)) < 0.5
    params = F.FitnessParams.create(has_hall_of_fame=False)  # reference thresholds, 50..500
    score, info = run(L, flat, labels, params)
    np.testing.assert_array_equal(info.best_members, [2, 2, 2, 2])
    assert float(info.best_acc) == 1.0
    np.testing.assert_array_equal(np.argmax(np.asarray(score), axis=1), [2, 2, 2, 2])
    np.testing.assert_allclose(np.asarray(score)[:, 2], float(info.best_fitness), atol=1e-6)
    D = np_diff_table(flat)
    valid = np.asarray(info.final_valid)
    for row, acc in zip(np.asarray(info.final_members)[valid], np.asarray(info.final_acc)[valid]):
        np.testing.assert_allclose(acc, np_ensemble(L, D, labels, np.arange(C), row)[0], atol=1e-6)


def test_kept_counts_respect_min_and_max():
    C, P, N = 2, 8, 80
    L, flat, labels = make_problem(1, C, P, N)
    D = np_diff_table(flat)
    all_acc = sorted((np_ensemble(L, D, labels, np.arange(C), e)[0]
                      for e in itertools.product(range(P), repeat=C)), reverse=True)
    # nothing reaches threshold 1.0 -> min_kept; everything passes threshold 0 -> max_kept
    assert all_acc[0] < 1.0
    for thr, expected in ((1.0, 5), (0.0, 12)):
        params = F.FitnessParams.create(thresholds={2: thr}, min_kept=5, max_kept=12,
                                        has_hall_of_fame=False)
        _, info = run(L, flat, labels, params)
        assert int(info.num_candidates[0][0]) == expected
        kept = np.sort(np.asarray(info.final_acc)[np.asarray(info.final_valid)])[::-1]
        np.testing.assert_allclose(kept, all_acc[:expected], atol=1e-6)  # the best accuracies
    # threshold in between: exactly those passing (within [min, max])
    thr = float(all_acc[7])
    params = F.FitnessParams.create(thresholds={2: thr}, min_kept=2, max_kept=30,
                                    has_hall_of_fame=False)
    _, info = run(L, flat, labels, params)
    assert int(info.num_candidates[0][0]) == sum(np.float32(a) >= np.float32(thr) for a in all_acc)


def test_hall_of_fame_is_always_kept():
    C, P, N = 5, 6, 100
    L, flat, labels = make_problem(2, C, P, N, signal=3.0)
    rng = np.random.default_rng(9)
    L[:, P - 1] = rng.normal(size=(C, N)) - 2.0  # a hopeless hall of fame
    params = F.FitnessParams.create(min_kept=1, max_kept=3, has_hall_of_fame=True)
    for seed in range(4):
        score, info = run(L, flat, labels, params, seed=seed)
        assert score.shape == (C, P)
        valid = np.asarray(info.final_valid)
        members = np.asarray(info.final_members)[valid]
        assert any((m == P - 1).all() for m in members)
        hof = np.flatnonzero([(m == P - 1).all() for m in members])[0]
        assert np.asarray(info.final_acc)[valid][hof] < 0.85  # below every threshold
        counts = [np.asarray(level) for level in info.num_candidates]  # sizes [2,2,1] [4,1] [5]
        assert all(1 <= k <= 3 + 1 for k in (*counts[0][:2], counts[1][0], counts[2][0]))
        assert counts[0][2] == P  # the pass-through class keeps its individuals
        assert np.all(np.asarray(score)[:, P - 1] > 0)  # the hof members are in a kept ensemble
        assert not (np.asarray(info.best_members) == P - 1).all()


def test_labels_outside_classes_are_ignored():
    P, N = 3, 90  # 3 modules (classes 3, 0, 4) of 5 classes
    L, flat, labels = make_problem(4, 5, P, N)  # 5 classes of images
    classes = np.array([3, 0, 4], np.int32)
    L = L[classes]  # rows are modules of classes 3, 0, 4
    flat = flat[classes]
    params = F.FitnessParams.create(thresholds={2: 0.0}, min_kept=1, max_kept=100,
                                    has_hall_of_fame=False)
    score, info = run(L, flat, labels, params, classes=classes)
    keep = np.isin(labels, classes)
    score2, info2 = run(L[:, :, keep], flat, labels[keep], params, classes=classes)
    np.testing.assert_allclose(score, score2, atol=1e-6)
    D = np_diff_table(flat)
    acc, _ = np_ensemble(L, D, labels, classes, np.asarray(info.best_members))
    np.testing.assert_allclose(info.best_acc, acc, atol=1e-6)


# -- sampled scheme ----------------------------------------------------------


def test_sampled_scheme_matches_brute_force():
    C, P, N = 4, 5, 80
    for seed in range(2):
        L, flat, labels = make_problem(seed, C, P, N)
        D = np_diff_table(flat)
        params = F.FitnessParams.create(ensemble="sampled", num_sampled=7, ensemble_chunk=3)
        score, info = run(L, flat, labels, params, seed=seed)
        members = np.asarray(info.final_members)
        assert members.shape == (1 + 7 + C * P, C)
        np.testing.assert_array_equal(members[0], [P - 1] * C)  # hall of fame first
        assert members[1:8].max() < P - 1  # random ones use the population only
        best = np.zeros((C, P))
        for row, acc, diff, fit in zip(members, *(np.asarray(x) for x in (
                info.final_acc, info.final_diff, info.final_fitness))):
            ref_acc, ref_diff = np_ensemble(L, D, labels, np.arange(C), row)
            np.testing.assert_allclose([acc, diff], [ref_acc, ref_diff], atol=1e-5)
            np.testing.assert_allclose(fit, ALPHA * ref_acc + (1 - ALPHA) * ref_diff, atol=1e-5)
            best[np.arange(C), row] = np.maximum(best[np.arange(C), row], fit)
        np.testing.assert_allclose(np.asarray(score), best, atol=1e-6)
        assert np.all(np.asarray(score) > 0)  # every individual is scored by a substitution


# -- state updates ---------------------------------------------------------------


def _info_with(acc, valid_fitness):
    z = jnp.zeros(())
    return F.FitnessInfo(best_members=jnp.zeros(2, jnp.int32), best_acc=jnp.float32(acc),
                         best_diff=z, best_fitness=z, best_valid_fitness=jnp.float32(valid_fitness),
                         num_candidates=(), final_members=jnp.zeros((1, 2), jnp.int32),
                         final_acc=z[None], final_diff=z[None], final_fitness=z[None],
                         final_valid=jnp.ones(1, bool), permutation=jnp.arange(2))


def test_acc_ratio_update():
    params = F.FitnessParams.create(alpha=0.9, gamma=0.9)
    state = F.FitnessState.create(params)
    assert float(state.acc_ratio) == pytest.approx(0.9)
    assert float(F.update_acc_ratio(jnp.float32(0.75), params)) == pytest.approx(1.05)
    assert float(F.update_acc_ratio(jnp.float32(0.97), params)) == pytest.approx(0.9)
    state, _ = F.update_fitness_state(state, _info_with(0.8, 0.5), params)
    assert float(state.acc_ratio) == pytest.approx(1.0)


def test_early_stopping_after_patience_generations():
    params = F.FitnessParams.create(patience=3)
    state = F.FitnessState.create(params)
    stops, improved = [], []
    for v in [0.5, 0.6, 0.6, 0.55, 0.59, 0.7, 0.1, 0.1, 0.1]:
        state, stop = jax.jit(F.update_fitness_state)(state, _info_with(0.9, v), params)
        stops.append(bool(stop))
        improved.append(bool(state.improved))
    assert improved == [True, True, False, False, False, True, False, False, False]
    assert stops == [False] * 4 + [True] + [False] * 3 + [True]
    assert float(state.best_valid_fitness) == pytest.approx(0.7)
    never = F.FitnessParams.create(patience=0)
    state = F.FitnessState.create(never)
    for _ in range(5):
        state, stop = F.update_fitness_state(state, _info_with(0.9, 0.0), never)
        assert not bool(stop)


def test_to_minimise_is_negated_score():
    score = jnp.array([[0.1, 0.7]])
    np.testing.assert_allclose(F.to_minimise(score), -score)


# -- params / errors / compilation -------------------------------------------------


def test_params_from_config():
    cfg = SearchConfig(alpha=0.8, gamma=0.95, thresholds={"2": 0.9, 4: 0.8}, min_kept_ensembles=3,
                       max_kept_ensembles=7, ensemble="sampled", num_sampled_ensembles=11,
                       early_stop=4)
    p = F.FitnessParams.from_config(cfg, has_hall_of_fame=False)
    assert (p.alpha, p.gamma, p.ensemble, p.min_kept, p.max_kept, p.num_sampled, p.patience) == (
        0.8, 0.95, "sampled", 3, 7, 11, 4)
    assert p.thresholds == ((2, 0.9), (4, 0.8)) and not p.has_hall_of_fame
    with pytest.raises(F.FitnessInputError, match="ensemble scheme"):
        F.FitnessParams.create(ensemble="exhaustive")
    with pytest.raises(F.FitnessInputError, match="min_kept"):
        F.FitnessParams.create(min_kept=10, max_kept=5)


def test_bad_shapes_raise_naming_them():
    L, flat, labels = make_problem(0, 3, 4, 30)
    params = F.FitnessParams.create()
    with pytest.raises(F.FitnessInputError, match=r"\(3, 5, 20\).*\(3, 4, 30\)"):
        run(L, np.concatenate([flat, flat[:, :1]], 1), labels, params)
    with pytest.raises(F.FitnessInputError, match=r"labels.*\(29,\).*\(30,\)"):
        run(L, flat, labels[:29], params)
    with pytest.raises(F.FitnessInputError, match=r"classes.*\(2,\).*\(3,\)"):
        run(L, flat, labels, params, classes=np.arange(2, dtype=np.int32))
    with pytest.raises(F.FitnessInputError, match=r"L has shape \(3, 4\)"):
        run(L[..., 0], flat, labels, params)
    with pytest.raises(F.FitnessInputError, match="bool"):
        run(L, flat.astype(np.float32), labels, params)
    with pytest.raises(F.FitnessInputError, match="P >= 2"):
        run(L[:, :1], flat[:, :1], labels, params)


def test_single_trace_per_shape():
    counted = jax.jit(chex.assert_max_traces(F._cooperative_fitness, n=1))
    params = F.FitnessParams.create(min_kept=2, max_kept=4)
    for seed in range(3):
        L, flat, labels = make_problem(seed, 3, 4, 30)
        counted(jax.random.key(seed), jnp.asarray(L), jnp.asarray(flat), jnp.asarray(labels),
                jnp.arange(3), jnp.float32(0.9 + 0.01 * seed), params)
