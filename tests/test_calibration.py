"""Tests for jaxsplit.calibration: the reference's range calibrations, learned ones, and ECE."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxsplit import calibration as calib
from jaxsplit.calibration import CalibrationError


def _logistic_data(seed, num, slope, intercept, loc=1.0, scale=3.0):
    """Scores ~ N(loc, scale) and labels ~ Bernoulli(sigmoid(slope * x + intercept))."""
    rng = np.random.default_rng(seed)
    x = rng.normal(loc, scale, size=num).astype(np.float32)
    p = 1.0 / (1.0 + np.exp(-(slope * x + intercept)))
    y = (rng.random(num) < p).astype(np.int32)
    return x, y


# ---------------------------------------------------------------------------------------------
# Range methods.


def test_min_max_maps_known_scores():
    cal = calib.min_max()
    state = cal.fit(jnp.array([1.0, 2.0, 3.0]))
    np.testing.assert_allclose(state, [1.0, 3.0])
    np.testing.assert_allclose(cal.apply(state, jnp.array([1.0, 2.0, 3.0])), [0.0, 0.5, 1.0])


def test_min_max_does_not_clip_by_default_and_clips_on_request():
    scores = jnp.array([1.0, 2.0, 3.0])
    outside = jnp.array([-1.0, 5.0])
    faithful = calib.min_max()
    np.testing.assert_allclose(faithful.apply(faithful.fit(scores), outside), [-1.0, 2.0])
    clipped = calib.min_max(clip=True)
    np.testing.assert_allclose(clipped.apply(clipped.fit(scores), outside), [0.0, 1.0])


def test_apply_keeps_shape_of_column_scores():
    cal = calib.min_max()
    state = cal.fit(jnp.array([[0.0], [4.0]]))  # (N, 1) accepted for fitting
    out = cal.apply(state, jnp.array([[1.0], [2.0], [3.0]]))
    assert out.shape == (3, 1)
    np.testing.assert_allclose(out[:, 0], [0.25, 0.5, 0.75])


def test_unsupervised_methods_fit_on_positives_only():
    scores = jnp.array([-50.0, 1.0, 2.0, 3.0, 60.0])
    labels = jnp.array([0, 1, 1, 1, 0])
    for name in ("min_max", "percentile", "iqr", "z_norm"):
        cal = calib.get(name)
        with_labels = cal.fit(scores, labels)
        positives_only = cal.fit(jnp.array([1.0, 2.0, 3.0]))
        np.testing.assert_allclose(with_labels, positives_only, rtol=1e-6, err_msg=name)


def test_percentile_defaults_to_reference_10_90_and_resists_an_outlier():
    scores = np.append(np.arange(1.0, 100.0), 1000.0).astype(np.float32)
    state = calib.percentile().fit(scores)
    np.testing.assert_allclose(state, np.percentile(scores, [10, 90]), rtol=1e-5)
    # Hand-computed on a small case: 25th and 75th percentiles of 0..4 are 1 and 3.
    cal = calib.percentile(25, 75)
    state = cal.fit(jnp.arange(5.0))
    np.testing.assert_allclose(state, [1.0, 3.0])
    np.testing.assert_allclose(cal.apply(state, jnp.array([2.0, 4.0])), [0.5, 1.5])
    # Min-max squeezes all inliers near 0 because of the outlier; percentile spreads them.
    mm = calib.min_max()
    spread_mm = np.ptp(mm.apply(mm.fit(scores), scores[:-1]))
    pct = calib.percentile()
    spread_pct = np.ptp(pct.apply(pct.fit(scores), scores[:-1]))
    assert spread_mm < 0.1 < 1.0 < spread_pct


def test_iqr_fences_and_inliers_with_an_outlier():
    scores = jnp.array([1.0, 2.0, 3.0, 4.0, 100.0])  # Q1 = 2, Q3 = 4, IQR = 2
    fences = calib.iqr().fit(scores)
    np.testing.assert_allclose(fences, [2.0 - 3.0, 4.0 + 3.0])
    inliers = calib.iqr(range_from="inliers").fit(scores)
    np.testing.assert_allclose(inliers, [1.0, 4.0])
    wider = calib.iqr(k=100.0, range_from="inliers").fit(scores)
    np.testing.assert_allclose(wider, [1.0, 100.0])  # nothing is an outlier any more


def test_z_norm_sigmoid_and_raw():
    scores = jnp.array([1.0, 2.0, 3.0])
    cal = calib.z_norm()
    state = cal.fit(scores)
    std = np.sqrt(2.0 / 3.0)
    np.testing.assert_allclose(state, [2.0, std], rtol=1e-6)
    out = cal.apply(state, jnp.array([2.0, 3.0, -100.0]))
    np.testing.assert_allclose(out, [0.5, 1.0 / (1.0 + np.exp(-1.0 / std)), 0.0], atol=1e-6)
    raw = calib.z_norm(squash=False)
    np.testing.assert_allclose(raw.apply(state, jnp.array([1.0, 3.0])), [-1 / std, 1 / std],
                               rtol=1e-6)


@pytest.mark.parametrize("name", ["min_max", "percentile", "iqr", "z_norm"])
def test_unsupervised_fit_jit_and_vmap_match_eager(name):
    cal = calib.get(name)
    rng = np.random.default_rng(0)
    batch = rng.normal(size=(3, 16)).astype(np.float32)
    labels = (rng.random((3, 16)) < 0.7).astype(np.int32)
    labels[:, 0] = 1
    eager = [cal.fit(s, y) for s, y in zip(batch, labels)]
    jitted = jax.jit(cal.fit)(batch[0], labels[0])
    np.testing.assert_allclose(jitted, eager[0], rtol=1e-5)
    vmapped = jax.vmap(cal.fit)(batch, labels)
    np.testing.assert_allclose(vmapped, np.stack([np.asarray(e) for e in eager], axis=1), rtol=1e-5)
    applied = jax.jit(cal.apply)(eager[0], batch[0])
    np.testing.assert_allclose(applied, cal.apply(eager[0], batch[0]), rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# Learned methods.


def test_platt_recovers_a_known_logistic_model():
    slope, intercept = 1.5, -2.0
    x, y = _logistic_data(0, 20000, slope, intercept)
    state = calib.platt().fit(x, y)
    assert abs(float(state.slope) - slope) < 0.15
    assert abs(float(state.intercept) - intercept) < 0.15


def test_platt_reaches_the_cross_entropy_minimum():
    x, y = _logistic_data(1, 20000, 0.7, 0.5, loc=10.0, scale=5.0)  # off-centre, large logits

    def loss(params):
        return jnp.mean(optax.sigmoid_binary_cross_entropy(params[0] * x + params[1], y))

    state = calib.platt().fit(x, y)
    grad = jax.grad(loss)(jnp.array([state.slope, state.intercept]))
    assert float(jnp.max(jnp.abs(grad))) < 1e-3
    # The learned calibration beats both the identity sigmoid and the start point (1, 0).
    assert loss(jnp.array([state.slope, state.intercept])) < loss(jnp.array([1.0, 0.0]))


def test_platt_is_deterministic_and_jittable():
    x, y = _logistic_data(2, 20000, 1.0, 0.0)
    cal = calib.platt()
    first, second = cal.fit(x, y), cal.fit(x, y)
    np.testing.assert_array_equal(first, second)
    np.testing.assert_allclose(jax.jit(cal.fit)(x, y), first, rtol=1e-4, atol=1e-5)


def test_temperature_recovers_known_temperature_and_stays_positive():
    true_t = 2.5
    x, y = _logistic_data(3, 20000, 1.0 / true_t, 0.0, loc=0.0, scale=4.0)
    cal = calib.temperature()
    state = cal.fit(x, y)
    t = float(jnp.exp(state.log_temperature))
    assert abs(t - true_t) < 0.2
    np.testing.assert_allclose(cal.apply(state, jnp.array([0.0, true_t])),
                               [0.5, 1.0 / (1.0 + np.exp(-1.0 / t * true_t))], rtol=1e-5)
    # Labels anti-correlated with the scores: the best T > 0 is huge, but still positive/finite.
    anti = cal.fit(x, 1 - y)
    assert np.isfinite(float(anti.log_temperature))
    assert float(jnp.exp(anti.log_temperature)) > 0.0


def test_learned_calibration_lowers_ece_of_a_miscalibrated_score():
    x, y = _logistic_data(4, 20000, 0.3, -1.0)
    raw_ece = calib.expected_calibration_error(jax.nn.sigmoid(x), y)
    for name in ("platt", "temperature"):
        cal = calib.get(name)
        ece = calib.expected_calibration_error(cal.apply(cal.fit(x, y), x), y)
        assert ece < raw_ece, name
    platt = calib.platt()
    assert calib.expected_calibration_error(platt.apply(platt.fit(x, y), x), y) < 0.03


def test_supervised_methods_need_labels_of_both_classes():
    x = jnp.array([0.0, 1.0, 2.0])
    for name in ("platt", "temperature"):
        with pytest.raises(CalibrationError, match=f"{name}.*labels"):
            calib.get(name).fit(x)
        with pytest.raises(CalibrationError, match="both classes.*3 positive"):
            calib.get(name).fit(x, jnp.ones(3, jnp.int32))


# ---------------------------------------------------------------------------------------------
# Registry and bad input.


def test_get_builds_every_method_and_passes_kwargs():
    for name in calib.NAMES:
        assert isinstance(calib.get(name), calib.Calibration)
    state = calib.get("percentile", lower=0, upper=100).fit(jnp.array([3.0, 1.0, 2.0]))
    np.testing.assert_allclose(state, [1.0, 3.0])


def test_unknown_name_lists_valid_names():
    with pytest.raises(CalibrationError, match="'minmax'.*min_max, percentile, iqr, z_norm"):
        calib.get("minmax")


@pytest.mark.parametrize("name", ["min_max", "percentile", "iqr", "z_norm"])
def test_constant_scores_raise_naming_method_and_value(name):
    with pytest.raises(CalibrationError, match=f"{name}.*3\\.5"):
        calib.get(name).fit(jnp.full((4,), 3.5))


@pytest.mark.parametrize("name", calib.NAMES)
def test_bad_scores_raise(name):
    cal = calib.get(name)
    labels = jnp.array([0, 1, 1])
    with pytest.raises(CalibrationError, match=f"{name}: scores are empty"):
        cal.fit(jnp.zeros((0,)), jnp.zeros((0,), jnp.int32))
    with pytest.raises(CalibrationError, match=f"{name}: scores contain 1 non-finite"):
        cal.fit(jnp.array([0.0, jnp.nan, 2.0]), labels)
    with pytest.raises(CalibrationError, match=r"shape \(N,\) or \(N, 1\), got \(2, 3\)"):
        cal.fit(jnp.zeros((2, 3)), labels)
    with pytest.raises(CalibrationError, match=r"labels must have shape \(3,\)"):
        cal.fit(jnp.arange(3.0), jnp.array([0, 1]))
    with pytest.raises(CalibrationError, match=r"binary.*\[0, 1, 2\]"):
        cal.fit(jnp.arange(3.0), jnp.array([0, 1, 2]))


def test_unsupervised_with_no_positive_label_raises():
    with pytest.raises(CalibrationError, match="min_max.*no label is 1"):
        calib.min_max().fit(jnp.arange(3.0), jnp.zeros(3, jnp.int32))


def test_bad_factory_settings_raise():
    with pytest.raises(CalibrationError, match="lower=90, upper=10"):
        calib.percentile(90, 10)
    with pytest.raises(CalibrationError, match="k must be >= 0, got -1"):
        calib.iqr(k=-1)
    with pytest.raises(CalibrationError, match="range_from"):
        calib.iqr(range_from="trimmed")
    with pytest.raises(CalibrationError, match="num_steps.*0"):
        calib.platt(num_steps=0)


# ---------------------------------------------------------------------------------------------
# Calibration error.


def test_ece_perfectly_calibrated_bins_is_zero():
    probs = jnp.array([0.25] * 4 + [0.75] * 4)
    labels = jnp.array([1, 0, 0, 0, 1, 1, 1, 0])
    np.testing.assert_allclose(calib.expected_calibration_error(probs, labels, 10), 0.0, atol=1e-7)


def test_ece_always_confident_half_right_is_one_half():
    probs = jnp.ones(10)
    labels = jnp.array([1, 0] * 5)
    np.testing.assert_allclose(calib.expected_calibration_error(probs, labels), 0.5, rtol=1e-6)


def test_ece_and_bins_hand_computed():
    probs = jnp.array([0.1, 0.1, 0.9, 0.9, 0.0, 1.0])
    labels = jnp.array([1, 1, 1, 0, 0, 1])
    bins = calib.reliability_bins(probs, labels, num_bins=5)
    np.testing.assert_array_equal(bins.count, [3, 0, 0, 0, 3])
    np.testing.assert_allclose(np.asarray(bins.confidence)[[0, 4]], [0.2 / 3, 2.8 / 3], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(bins.accuracy)[[0, 4]], [2 / 3, 2 / 3], rtol=1e-6)
    assert np.all(np.isnan(bins.confidence[1:4])) and np.all(np.isnan(bins.accuracy[1:4]))
    np.testing.assert_allclose(bins.edges, [0.0, 0.2, 0.4, 0.6, 0.8, 1.0], atol=1e-7)
    # ECE = 0.5 * |2/3 - 0.2/3| + 0.5 * |2/3 - 2.8/3| = 0.5 * 0.6 + 0.5 * 0.8/3
    expected = 0.5 * 0.6 + 0.5 * 0.8 / 3
    np.testing.assert_allclose(calib.expected_calibration_error(probs, labels, 5), expected,
                               rtol=1e-6)


def test_ece_clips_out_of_range_scores_and_is_jittable():
    probs = jnp.array([1.7, -0.3])  # unclipped min-max scores
    labels = jnp.array([1, 0])
    np.testing.assert_allclose(calib.expected_calibration_error(probs, labels), 0.0, atol=1e-7)
    ece = jax.jit(calib.expected_calibration_error, static_argnames="num_bins")
    probs = jnp.array([0.1, 0.1, 0.9, 0.9])
    labels = jnp.array([1, 1, 1, 0])
    np.testing.assert_allclose(ece(probs, labels, num_bins=5),
                               calib.expected_calibration_error(probs, labels, 5), rtol=1e-6)


def test_ece_of_bernoulli_labels_is_small():
    for seed in range(5):
        rng = np.random.default_rng(seed)
        p = rng.random(20000).astype(np.float32)
        y = (rng.random(20000) < p).astype(np.int32)
        assert float(calib.expected_calibration_error(p, y)) < 0.03
        # A systematically over-confident predictor is clearly worse.
        assert float(calib.expected_calibration_error(np.sqrt(p), y)) > 0.1


# ---------------------------------------------------------------------------------------------
# Valid-fitted methods: logistic combination, decision threshold, chain.


def test_threshold_on_separable_scores_sits_between_the_classes():
    scores = jnp.array([0.0, 1.0, 2.0, 5.0, 6.0, 7.0])
    labels = jnp.array([0, 0, 0, 1, 1, 1])
    for objective in ("f1", "accuracy"):
        method = calib.threshold(objective)
        state = method.fit(scores, labels)
        assert float(state.threshold) == pytest.approx(3.5)
        out = method.apply(state, jnp.array([2.0, 3.4, 3.6, 5.0]))
        np.testing.assert_array_equal(np.asarray(out) > 0.5, [False, False, True, True])


def test_threshold_objectives_pick_their_own_optimum():
    # 2 TC at the top, then 3 negatives, then 3 TC, then 2 negatives: F1 prefers calling the top
    # 8 TC (F1 10/13 = 0.77), accuracy only the top 2 (7/10).
    scores = jnp.arange(10.0, 0.0, -1.0)  # 10, 9, ..., 1
    labels = jnp.array([1, 1, 0, 0, 0, 1, 1, 1, 0, 0])
    f1 = calib.threshold("f1").fit(scores, labels)
    acc = calib.threshold("accuracy").fit(scores, labels)
    assert float(f1.threshold) == pytest.approx(2.5)  # TC = 10..3: F1 2*5/(8+5) = 0.769
    assert float(acc.threshold) == pytest.approx(8.5)  # TC = 10, 9: accuracy 7/10
    # no threshold does better than the chosen one on its objective
    for t in np.arange(0.5, 11.0, 1.0):
        pred = np.asarray(scores) > t
        tp = np.sum(pred & (np.asarray(labels) == 1))
        assert 2 * tp / (pred.sum() + 5) <= 2 * 5 / 13 + 1e-9
        assert np.mean(pred == (np.asarray(labels) == 1)) <= 0.7 + 1e-9


def test_threshold_logit_space_at_one_half_keeps_probabilities():
    probs = jnp.array([0.1, 0.3, 0.7, 0.9])
    state = calib.threshold("f1", space="logit").fit(probs, jnp.array([0, 0, 1, 1]))
    assert float(state.threshold) == pytest.approx(0.0, abs=1e-6)  # logit(0.3) and logit(0.7) mirror
    np.testing.assert_allclose(calib.threshold(space="logit").apply(state, probs), probs, rtol=1e-5)


def test_threshold_ties_and_errors():
    # tied scores are never split by the cut
    state = calib.threshold().fit(jnp.array([1.0, 1.0, 1.0, 0.0]), jnp.array([1, 0, 1, 0]))
    assert float(state.threshold) == pytest.approx(0.5)
    with pytest.raises(CalibrationError, match="objective must be one of"):
        calib.threshold("precision")
    with pytest.raises(CalibrationError, match="space must be"):
        calib.threshold(space="log")
    with pytest.raises(CalibrationError, match="labelled data"):
        calib.threshold().fit(jnp.array([0.0, 1.0]))
    with pytest.raises(CalibrationError, match="both classes"):
        calib.threshold().fit(jnp.array([0.0, 1.0]), jnp.array([1, 1]))


def _two_feature_data(seed, num=2000):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(num, 2)).astype(np.float32) * np.array([3.0, 0.5], np.float32)
    logit = 1.0 * x[:, 0] - 4.0 * x[:, 1] + 0.5
    y = (rng.random(num) < 1.0 / (1.0 + np.exp(-logit))).astype(np.int32)
    return x, y


def test_logistic_weight_signs_probabilities_and_determinism():
    x, y = _two_feature_data(0)
    method = calib.logistic()
    state = method.fit(x, y)
    w_raw = np.asarray(state.weights) / np.asarray(state.scale)  # weights on the raw features
    assert w_raw[0] > 0 and w_raw[1] < 0
    weak_penalty = calib.logistic(l2=1e-5).fit(x, y)  # nearly the maximum-likelihood fit
    np.testing.assert_allclose(np.asarray(weak_penalty.weights) / np.asarray(weak_penalty.scale),
                               [1.0, -4.0], rtol=0.1)
    p = np.asarray(method.apply(state, x))
    assert p.shape == (len(y),) and np.all((p > 0) & (p < 1))
    assert np.mean((p > 0.5) == (y == 1)) > 0.8
    again = method.fit(x, y)
    for a, b in zip(state, again):
        np.testing.assert_array_equal(a, b)


def test_logistic_l2_shrinks_and_one_feature_works():
    x, y = _two_feature_data(1)
    small = calib.logistic(l2=1e-3).fit(x, y)
    big = calib.logistic(l2=10.0).fit(x, y)
    assert np.linalg.norm(big.weights) < 0.5 * np.linalg.norm(small.weights)
    one = calib.logistic().fit(x[:, 1], y)  # (N,) is one feature
    assert one.weights.shape == (1,) and float(one.weights[0]) < 0
    with pytest.raises(CalibrationError, match="labelled data"):
        calib.logistic().fit(x)
    with pytest.raises(CalibrationError, match="l2 must be"):
        calib.logistic(l2=-1.0)
    with pytest.raises(CalibrationError, match="non-finite"):
        calib.logistic().fit(np.array([[0.0, np.nan], [1.0, 2.0]]), np.array([0, 1]))


def test_chain_equals_fitting_one_after_the_other():
    x, y = _two_feature_data(2)
    first, second = calib.logistic(), calib.threshold("f1", space="logit")
    chained = calib.chain(first, second)
    state = chained.fit(x, y)
    s1 = first.fit(x, y)
    s2 = second.fit(first.apply(s1, x), y)
    np.testing.assert_allclose(state.states[1].threshold, s2.threshold, rtol=1e-6)
    np.testing.assert_allclose(chained.apply(state, x), second.apply(s2, first.apply(s1, x)), rtol=1e-6)
    assert calib.get("logistic") is not None and calib.get("threshold", objective="accuracy") is not None
    with pytest.raises(CalibrationError, match="chain"):
        calib.chain()
