"""Tests for jaxsplit.compose: patching a weak model with a module, and merging models."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxsplit import calibration as calib
from jaxsplit import compose as jcompose
from jaxsplit.compose import (
    CompositionError,
    as_calibrate_fn,
    calibrate_and_compose,
    compose,
    merge,
)

# Toy "models" on inputs x of shape (N, 2): the weak model's softmax is known exactly,
# the module returns the first input feature as its TC logit.
WEAK_PROBS = np.array([[0.1, 0.2, 0.3, 0.4], [0.4, 0.3, 0.2, 0.1]], np.float32)
INPUTS = jnp.array([[5.0, 0.0], [1.0, 0.0]])


def weak_apply(x):
    # log-probabilities + a per-row constant are logits whose softmax is WEAK_PROBS.
    return jnp.log(jnp.asarray(WEAK_PROBS)) + x[:, 1:2] + 3.0


def module_apply(x):
    return x[:, 0]


def div10(s):
    return s / 10.0


def test_compose_replaces_last_column_by_calibrated_module():
    out = compose(weak_apply, module_apply, calibrate=div10)(INPUTS)
    expected = np.array([[0.1, 0.2, 0.3, 0.5], [0.4, 0.3, 0.2, 0.1]])
    np.testing.assert_allclose(out, expected, rtol=1e-6)


def test_compose_softmaxes_all_classes_before_dropping_the_target():
    # Non-TC columns keep the weak softmax over all K classes (not renormalised over K - 1).
    out = compose(weak_apply, module_apply, calibrate=lambda s: 0.0 * s)(INPUTS)
    np.testing.assert_allclose(out[:, :3], WEAK_PROBS[:, :3], rtol=1e-6)
    assert np.all(np.asarray(out.sum(axis=1)) < 1.0)


def test_compose_target_index_not_last():
    out = compose(weak_apply, module_apply, target_index=1, calibrate=div10)(INPUTS)
    expected = np.array([[0.1, 0.5, 0.3, 0.4], [0.4, 0.1, 0.2, 0.1]])
    np.testing.assert_allclose(out, expected, rtol=1e-6)
    same = compose(weak_apply, module_apply, target_index=-3, calibrate=div10)(INPUTS)
    np.testing.assert_allclose(same, expected, rtol=1e-6)


def test_compose_accepts_calibration_pair_partial_and_none():
    cal = calib.min_max()
    state = cal.fit(jnp.array([1.0, 9.0]))
    expected = np.array([[0.1, 0.2, 0.3, 0.5], [0.4, 0.3, 0.2, 0.0]])
    for calibrate in ((cal, state), functools.partial(cal.apply, state)):
        out = compose(weak_apply, module_apply, calibrate=calibrate)(INPUTS)
        np.testing.assert_allclose(out, expected, rtol=1e-6, atol=1e-7)
    raw = compose(weak_apply, module_apply)(INPUTS)
    np.testing.assert_allclose(raw[:, -1], [5.0, 1.0])
    np.testing.assert_array_equal(jnp.argmax(raw, axis=1), [3, 3])


def test_compose_module_column_output_is_accepted():
    out = compose(weak_apply, lambda x: x[:, :1], calibrate=div10)(INPUTS)
    np.testing.assert_allclose(out[:, -1], [0.5, 0.1], rtol=1e-6)


def test_compose_jit_and_vmap_over_batch_of_batches():
    patched = compose(weak_apply, module_apply, target_index=2, calibrate=div10)
    eager = patched(INPUTS)
    np.testing.assert_allclose(jax.jit(patched)(INPUTS), eager, rtol=1e-6)
    batches = jnp.stack([INPUTS, INPUTS * 2.0, INPUTS - 1.0])  # (B=3, N=2, 2)
    vmapped = jax.jit(jax.vmap(patched))(batches)
    assert vmapped.shape == (3, 2, 4)
    for b in range(3):
        np.testing.assert_allclose(vmapped[b], patched(batches[b]), rtol=1e-6)


def test_compose_shape_errors():
    with pytest.raises(CompositionError, match=r"\(2,\) or \(2, 1\).*got \(3,\)"):
        compose(weak_apply, lambda x: jnp.zeros(3))(INPUTS)
    with pytest.raises(CompositionError, match=r"got \(2, 2\)"):
        compose(weak_apply, lambda x: x)(INPUTS)
    with pytest.raises(CompositionError, match=r"logits of shape \(N, K\), got \(2,\)"):
        compose(lambda x: x[:, 0], module_apply)(INPUTS)
    with pytest.raises(CompositionError, match="target_index 4 is out of range.*4 classes"):
        compose(weak_apply, module_apply, target_index=4)(INPUTS)
    with pytest.raises(CompositionError, match="calibrated module score"):
        compose(weak_apply, module_apply, calibrate=lambda s: s[:1])(INPUTS)
    # Shape errors also surface while tracing under jit.
    with pytest.raises(CompositionError, match="module_apply output"):
        jax.jit(compose(weak_apply, lambda x: jnp.zeros(3)))(INPUTS)


def test_bad_calibrate_arguments():
    with pytest.raises(CompositionError, match="callable, a \\(Calibration, state\\) pair"):
        compose(weak_apply, module_apply, calibrate=3.0)
    with pytest.raises(CompositionError, match="pair, got \\(str, int\\)"):
        as_calibrate_fn(("min_max", 1))
    with pytest.raises(CompositionError, match="without its fitted state"):
        as_calibrate_fn(calib.min_max())
    with pytest.raises(CompositionError, match="target_index must be an int"):
        compose(weak_apply, module_apply, target_index=1.0)


def test_calibrate_and_compose_fits_on_module_outputs():
    fit_inputs = jnp.array([[2.0, 0.0], [4.0, 0.0], [6.0, 0.0]])
    patched, cal, state = calibrate_and_compose(weak_apply, module_apply, "min_max", fit_inputs)
    np.testing.assert_allclose(state, [2.0, 6.0])
    np.testing.assert_allclose(patched(INPUTS)[:, -1], [0.75, -0.25])
    assert cal.apply(state, 4.0) == 0.5
    # Binary fit labels: the unsupervised method uses the TC (label 1) inputs only.
    _, _, state = calibrate_and_compose(weak_apply, module_apply, "percentile", fit_inputs,
                                        jnp.array([1, 1, 0]), lower=0, upper=100)
    np.testing.assert_allclose(state, [2.0, 4.0])
    with pytest.raises(calib.CalibrationError, match="unknown calibration 'bogus'"):
        calibrate_and_compose(weak_apply, module_apply, "bogus", fit_inputs)
    with pytest.raises(calib.CalibrationError, match="min_max.*constant"):
        calibrate_and_compose(weak_apply, module_apply, "min_max", jnp.ones((3, 2)))
    with pytest.raises(CompositionError, match="only for a calibration given by name"):
        calibrate_and_compose(weak_apply, module_apply, calib.min_max(), fit_inputs, clip=True)


def test_calibrate_and_compose_with_platt():
    rng = np.random.default_rng(0)
    fit_inputs = jnp.asarray(rng.normal(size=(200, 2)).astype(np.float32))
    fit_labels = (np.asarray(fit_inputs[:, 0]) + 0.3 * rng.normal(size=200) > 0).astype(np.int32)
    patched, cal, state = calibrate_and_compose(weak_apply, module_apply, "platt", fit_inputs,
                                                fit_labels, target_index=0)
    assert float(state.slope) > 0.0  # larger module logit -> more likely the TC
    out = patched(INPUTS)
    np.testing.assert_allclose(out[:, 0], cal.apply(state, INPUTS[:, 0]), rtol=1e-6)
    assert np.all((np.asarray(out) >= 0) & (np.asarray(out) <= 1))


# ---------------------------------------------------------------------------------------------
# merge


def _three_class_model(x):  # (N, 3) logits with softmax [0.2, 0.3, 0.5]
    return jnp.log(jnp.array([[0.2, 0.3, 0.5]])) + jnp.zeros((x.shape[0], 1))


def test_merge_places_columns_at_class_ids():
    merged = merge(
        [(_three_class_model, [4, 0, 2]), (module_apply, [3]), (lambda x: x * 0.0, [1, 5])],
        num_classes=6,
        calibrations=[None, div10, None],
    )
    out = merged(INPUTS)
    expected = np.array([[0.3, 0.5, 0.5, 0.5, 0.2, 0.5], [0.3, 0.5, 0.5, 0.1, 0.2, 0.5]])
    np.testing.assert_allclose(out, expected, rtol=1e-6)
    raw = merge([(_three_class_model, [2, 0, 1])], 3, normalize="none")(INPUTS)
    np.testing.assert_allclose(raw[0], np.log([0.3, 0.5, 0.2]), rtol=1e-6)


def test_merge_with_a_dropped_column_equals_compose():
    cal = calib.min_max()
    state = cal.fit(jnp.array([0.0, 10.0]))
    merged = merge([(weak_apply, [0, 1, 2, None]), (module_apply, [3])], 4,
                   calibrations=[None, (cal, state)])
    composed = compose(weak_apply, module_apply, calibrate=(cal, state))
    np.testing.assert_allclose(merged(INPUTS), composed(INPUTS), rtol=1e-6)


def test_merge_overlap_error_and_last_wins():
    members = [(_three_class_model, [0, 1, 2]), (module_apply, [1])]
    with pytest.raises(CompositionError, match="class 1 is claimed by members 0 and 1"):
        merge(members, 3, calibrations=[None, div10])
    out = merge(members, 3, calibrations=[None, div10], on_overlap="last")(INPUTS)
    np.testing.assert_allclose(out, [[0.2, 0.5, 0.5], [0.2, 0.1, 0.5]], rtol=1e-6)


def test_merge_construction_errors():
    with pytest.raises(CompositionError, match=r"classes \[1, 3\] are not scored"):
        merge([(lambda x: x, [0, 2])], 4)
    with pytest.raises(CompositionError, match=r"class id 5 is not an int in \[0, 4\)"):
        merge([(lambda x: x, [0, 5])], 4)
    with pytest.raises(CompositionError, match="repeats a class id"):
        merge([(lambda x: x, [0, 0])], 1)
    with pytest.raises(CompositionError, match="member 0 scores one class; softmax"):
        merge([(module_apply, [0])], 1)
    with pytest.raises(CompositionError, match="2 calibrations for 1 members"):
        merge([(lambda x: x, [0, 1])], 2, calibrations=[None, None])
    with pytest.raises(CompositionError, match="member 0 must be a pair"):
        merge([lambda x: x], 2)
    with pytest.raises(CompositionError, match="normalize must be"):
        merge([(lambda x: x, [0, 1])], 2, normalize="sigmoid")


def test_merge_call_shape_errors():
    merged = merge([(lambda x: x, [0, 1]), (lambda x: jnp.zeros(3), [2])], 3,
                   calibrations=[None, div10])
    with pytest.raises(CompositionError, match=r"member 1 output must have shape \(2, 1\)"):
        merged(INPUTS)
    wrong_width = merge([(lambda x: x, [0, 1, 2])], 3)
    with pytest.raises(CompositionError, match=r"member 0 output.*\(2, 3\).*got \(2, 2\)"):
        wrong_width(INPUTS)


def test_merge_jit_and_vmap():
    merged = merge([(_three_class_model, [4, 0, 2]), (module_apply, [3]), (lambda x: x, [1, 5])],
                   6, calibrations=[None, div10, None])
    batches = jnp.stack([INPUTS, INPUTS + 1.0])
    vmapped = jax.jit(jax.vmap(merged))(batches)
    assert vmapped.shape == (2, 2, 6)
    for b in range(2):
        np.testing.assert_allclose(vmapped[b], merged(batches[b]), rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# Real Flax models.


class _TinyConvNet(nn.Module):
    num_classes: int

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(4, (3, 3))(x))
        x = nn.max_pool(x, (2, 2), (2, 2))
        return nn.Dense(self.num_classes)(x.reshape(x.shape[0], -1))


class _TinyDense(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(1)(nn.relu(nn.Dense(8)(x.reshape(x.shape[0], -1))))


def test_flax_models_composed_jitted_equal_eager():
    key_weak, key_module, key_data = jax.random.split(jax.random.key(0), 3)
    images = jax.random.normal(key_data, (2, 6, 8, 8, 1))  # (B, N, H, W, C)
    weak, module = _TinyConvNet(num_classes=5), _TinyDense()
    weak_vars = weak.init(key_weak, images[0])
    module_vars = module.init(key_module, images[0])
    weak_fn = functools.partial(weak.apply, weak_vars)
    module_fn = functools.partial(module.apply, module_vars)

    patched, cal, state = calibrate_and_compose(weak_fn, module_fn, "min_max", images[0],
                                                target_index=2)
    eager = patched(images[1])
    assert eager.shape == (6, 5)
    np.testing.assert_allclose(jax.jit(patched)(images[1]), eager, rtol=1e-5, atol=1e-6)
    probs = jax.nn.softmax(weak_fn(images[1]))
    np.testing.assert_allclose(eager[:, [0, 1, 3, 4]], probs[:, [0, 1, 3, 4]], rtol=1e-5)
    np.testing.assert_allclose(eager[:, 2], cal.apply(state, module_fn(images[1])[:, 0]),
                               rtol=1e-5, atol=1e-6)
    # On the fitting inputs, min-max puts the module's scores exactly in [0, 1].
    fitted = patched(images[0])[:, 2]
    np.testing.assert_allclose([fitted.min(), fitted.max()], [0.0, 1.0], atol=1e-6)
    vmapped = jax.vmap(patched)(images)
    np.testing.assert_allclose(vmapped[1], eager, rtol=1e-5, atol=1e-6)


def test_joint_features_and_compose_joint_decide_by_the_calibrated_score():
    logits = jnp.array([[1.0, 2.0, 0.0], [0.0, 0.0, 3.0], [2.0, 0.0, 1.0]])
    module = jnp.array([5.0, -1.0, 0.5])
    feats = jcompose.joint_features(logits, module)
    p = jax.nn.softmax(logits, axis=-1)[:, 2]
    np.testing.assert_allclose(feats[:, 0], module)
    np.testing.assert_allclose(feats[:, 1], np.log(p / (1 - p)), rtol=1e-5)
    c = jnp.array([0.7, 0.2, 0.51])
    patched = jcompose.compose_joint(lambda x: logits, lambda x: module, lambda f: c)
    scores = patched(None)
    np.testing.assert_allclose(scores[:, 2], c)
    # TC iff c > 0.5, otherwise the weak model's best non-TC class (with score 1 - c)
    np.testing.assert_array_equal(scores.argmax(-1), [2, 0, 2])
    np.testing.assert_allclose(scores[1, :2], [0.8, 0.8])
    np.testing.assert_allclose(scores[0, :2], [0.3 * np.exp(-1.0), 0.3], rtol=1e-5)
    # TC in the middle column
    mid = jcompose.compose_joint(lambda x: logits, lambda x: module, lambda f: c, target_index=1)(None)
    np.testing.assert_allclose(mid[:, 1], c)
    with pytest.raises(CompositionError, match="out of range"):
        jcompose.joint_features(logits, module, target_index=3)
