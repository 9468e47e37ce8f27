"""Kernel importance, ranking and layer sensitivity (jaxsplit.importance)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxsplit import importance as I
from jaxsplit.models.convnet import activations, init_params, rescnn, weak_cnn

NUM_CLASSES = 3


@pytest.fixture(scope="module")
def tiny():
    model = weak_cnn(num_classes=NUM_CLASSES, in_channels=1, widths=(4, 6), image_size=8)
    params = init_params(model, jax.random.key(0))
    rng = np.random.default_rng(0)
    images = rng.normal(size=(29, 8, 8, 1)).astype(np.float32)
    labels = rng.integers(0, NUM_CLASSES, 29).astype(np.int32)
    return model, params, images, labels


def naive_importance(model, params, images, labels, confidence):
    """Per-image loop in numpy: the definition of docs/method.md §3."""
    sums, counts = {}, np.zeros(NUM_CLASSES)
    sums_all, counts_all = {}, np.zeros(NUM_CLASSES)
    for x, y in zip(images, labels):
        logits, acts = activations(model, params, jnp.asarray(x[None]))
        logits = np.asarray(logits[0], np.float64)
        probs = np.exp(logits - logits.max())
        probs /= probs.sum()
        for name, a in acts.items():
            s = np.asarray(a[0], np.float64).sum(axis=(0, 1))
            sums.setdefault(name, np.zeros((NUM_CLASSES, s.size)))
            sums_all.setdefault(name, np.zeros((NUM_CLASSES, s.size)))
            sums_all[name][y] += s
            if np.argmax(logits) == y and probs[y] >= confidence:
                sums[name][y] += s
        counts_all[y] += 1
        if np.argmax(logits) == y and probs[y] >= confidence:
            counts[y] += 1
    out = {}
    for name in sums:
        conf = sums[name] / np.maximum(counts, 1)[:, None]
        alls = sums_all[name] / np.maximum(counts_all, 1)[:, None]
        out[name] = np.where((counts > 0)[:, None], conf, alls)
    return out, counts, counts_all


def test_importance_matches_naive_per_image_loop(tiny):
    model, params, images, labels = tiny
    # 0.35 filters some images (for 3 classes the top probability is always >= 1/3).
    expected, counts, counts_all = naive_importance(model, params, images, labels, 0.35)
    for batch_size in (4, 64):  # padding + masking must not change the result
        result = I.kernel_importance(model, params, images, labels, confidence=0.35,
                                     batch_size=batch_size)
        np.testing.assert_array_equal(result.num_confident, counts)
        np.testing.assert_array_equal(result.num_images, counts_all)
        assert set(result.importance) == set(model.conv_spec().names)
        for name, value in expected.items():
            assert result.importance[name].dtype == np.float32
            assert result.importance[name].shape == (NUM_CLASSES, model.conv_spec().layer(name).num_kernels)
            np.testing.assert_allclose(result.importance[name], value, rtol=1e-5, atol=1e-6)


def test_fallback_to_all_images_is_reported(tiny):
    model, params, images, labels = tiny
    result = I.kernel_importance(model, params, images, labels, confidence=0.999)
    assert result.fallback_classes == tuple(range(NUM_CLASSES))
    assert result.warnings and "confidence" in result.warnings[0]
    expected, _, _ = naive_importance(model, params, images, labels, 2.0)  # nobody passes
    for name, value in expected.items():
        np.testing.assert_allclose(result.importance[name], value, rtol=1e-5, atol=1e-6)


def test_class_without_images_gets_zero_and_a_warning(tiny):
    model, params, images, labels = tiny
    keep = labels != 2
    result = I.kernel_importance(model, params, images[keep], labels[keep], confidence=0.0)
    assert result.num_images[2] == 0
    assert any("no valid image" in w for w in result.warnings)
    for value in result.importance.values():
        assert np.all(value[2] == 0)


def test_rank_is_descending_with_stable_ties():
    imp = {"conv_0": np.array([[0.1, 0.5, 0.5, 0.0, 0.9]], np.float32)}
    order = I.rank(imp)["conv_0"]
    np.testing.assert_array_equal(order, [[4, 1, 2, 0, 3]])
    rng = np.random.default_rng(1)
    for seed in range(10):
        x = rng.integers(0, 4, size=(3, 17)).astype(np.float32)  # many ties
        order = I.rank({"a": x})["a"]
        for c in range(3):
            vals = x[c, order[c]]
            assert np.all(np.diff(vals) <= 0)
            for v in np.unique(vals):  # equal values keep increasing kernel index
                assert np.all(np.diff(order[c][vals == v]) > 0)


def test_tied_importance_sums_tie_groups():
    spec = rescnn(width=1 / 32).conv_spec()
    rng = np.random.default_rng(0)
    imp = {l.name: rng.random((2, l.num_kernels)).astype(np.float32) for l in spec.layers}
    tied = I.tied_importance(imp, spec)
    assert tuple(tied) == spec.free_layers
    np.testing.assert_allclose(tied["conv_1"], imp["conv_1"] + imp["conv_3"])
    np.testing.assert_allclose(tied["conv_0"], imp["conv_0"])


def test_layer_sensitivity_matches_direct_masked_model(tiny):
    model, params, images, labels = tiny
    result = I.kernel_importance(model, params, images, labels, confidence=0.0)
    ratios = (0.25, 0.5, 1.0)
    curves = I.layer_sensitivity(model, params, images, labels, result.importance, ratios)
    assert curves.shape == (len(model.conv_spec().layers), len(ratios))
    model_acc = np.mean(np.argmax(model.apply({"params": params}, images), -1) == labels)
    np.testing.assert_allclose(curves[:, -1], model_acc)  # ratio 1.0 = the model itself
    order = I.rank(result.importance)
    spec = model.conv_spec()
    for li, layer in enumerate(spec.layers):
        for ri, ratio in enumerate(ratios):
            keep = I.top_kernels_count(layer.num_kernels, ratio)
            per_class = []
            for c in range(NUM_CLASSES):
                mask = {l.name: jnp.ones(l.num_kernels, bool) for l in spec.layers}
                m = np.zeros(layer.num_kernels, bool)
                m[order[layer.name][c, :keep]] = True
                mask[layer.name] = jnp.asarray(m)
                per_class.append(np.asarray(model.apply({"params": params}, images, masks=mask))[:, c])
            pred = np.argmax(np.stack(per_class, 1), 1)
            assert curves[li, ri] == pytest.approx(np.mean(pred == labels))


def test_top_kernels_count_never_zero():
    assert I.top_kernels_count(4, 0.1) == 1
    assert I.top_kernels_count(10, 0.7) == 7
    assert I.top_kernels_count(512, 0.3) == 153


def test_sensitive_layers_rule_and_errors():
    ratios = (0.1, 0.5, 1.0)
    curves = np.array([[0.2, 0.50, 0.90],   # drops 0.40 at 0.5 -> sensitive
                       [0.5, 0.88, 0.90],   # drops 0.02 -> not
                       [0.1, 0.80, 0.90]])  # drops 0.10 -> sensitive
    assert I.sensitive_layers(curves, ratios, drop=0.05, at=0.5) == (0, 2)
    assert I.sensitive_layers(curves, ratios, drop=0.2, at=0.5) == (0,)
    with pytest.raises(I.ImportanceError, match="not among the ratios"):
        I.sensitive_layers(curves, ratios, at=0.3)
    with pytest.raises(I.ImportanceError, match="expected"):
        I.sensitive_layers(curves[:, :2], ratios)


def test_bad_inputs_raise(tiny):
    model, params, images, labels = tiny
    with pytest.raises(I.ImportanceError, match="NHWC"):
        I.kernel_importance(model, params, images[..., 0], labels)
    with pytest.raises(I.ImportanceError, match="must lie in"):
        I.kernel_importance(model, params, images, labels + 5)
    with pytest.raises(I.ImportanceError, match="one label per image"):
        I.kernel_importance(model, params, images, labels[:3])
    with pytest.raises(I.ImportanceError, match="confidence"):
        I.kernel_importance(model, params, images, labels, confidence=1.5)
    with pytest.raises(I.ImportanceError, match="ratios"):
        I.layer_sensitivity(model, params, images, labels, {}, ratios=(0.0, 1.0))
