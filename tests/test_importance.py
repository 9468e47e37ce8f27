"""Kernel importance, ranking and layer sensitivity (jaxsplit.importance)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxsplit import importance as I
from jaxsplit.models.convnet import activations, init_params, random_params, rescnn, weak_cnn

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


def _naive_from_maps(maps_fn, images, labels, num_classes, confidence):
    """Per-image loop: mean over confident correct images of each class of the maps' spatial sums
    (`maps_fn(x) -> (logits (C,), {site: (H, W, K)})`)."""
    sums, counts = {}, np.zeros(num_classes)
    for x, y in zip(images, labels):
        logits, maps = maps_fn(x)
        logits = np.asarray(logits, np.float64)
        probs = np.exp(logits - logits.max())
        probs /= probs.sum()
        if np.argmax(logits) != y or probs[y] < confidence:
            continue
        counts[y] += 1
        for name, a in maps.items():
            s = np.asarray(a, np.float64).sum(axis=(0, 1))
            sums.setdefault(name, np.zeros((num_classes, s.size)))[y] += s
    return {n: v / np.maximum(counts, 1)[:, None] for n, v in sums.items()}, counts


def test_rescnn_block_output_is_the_reference_rule():
    """ResCNN's default: each block's output after its pool, and for a residual pair the map
    after the add, one array for both members (the reference's `extract_feature_map_L1`)."""
    model = rescnn(num_classes=2, in_channels=1, width=1 / 32)
    params = random_params(model, 3)
    rng = np.random.default_rng(3)
    images = rng.normal(size=(10, 32, 32, 1)).astype(np.float32)
    logits_all = np.asarray(model.apply({"params": params}, images))
    labels = logits_all.argmax(-1).astype(np.int32)  # every image correct
    pairs = {f"conv_{d}": f"conv_{s}" for d, s in ((3, 1), (7, 5), (11, 9))}

    @jax.jit
    def block_outputs(x):  # the reference's forward, block by block
        h, outs, maps = jnp.asarray(x[None]), [], {}
        for i, layer in enumerate(model.convs):
            p = params[f"conv_{i}"]
            h = jax.lax.conv_general_dilated(h, p["kernel"], (1, 1), ((1, 1), (1, 1)),
                                             dimension_numbers=("NHWC", "HWIO", "NHWC"))
            h = jax.nn.relu(h + p["bias"])
            if layer.pool:
                h = jax.lax.reduce_window(h, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1),
                                          "VALID")
            if layer.residual_from is not None:
                h = h + outs[layer.residual_from]
            outs.append(h)
            maps[f"conv_{i}"] = h[0]
        for dst, src in pairs.items():
            maps[src] = maps[dst]
        return model.apply({"params": params}, x[None])[0], maps

    expected, counts = _naive_from_maps(block_outputs, images, labels, 2, 0.0)
    assert I.default_measure(model) == "block_output"
    result = I.kernel_importance(model, params, images, labels, confidence=0.0)
    np.testing.assert_array_equal(result.num_confident, counts)
    for name, value in expected.items():
        np.testing.assert_allclose(result.importance[name], value, rtol=1e-4, atol=1e-5)
    for dst, src in pairs.items():
        np.testing.assert_array_equal(result.importance[src], result.importance[dst])
    act = I.kernel_importance(model, params, images, labels, confidence=0.0, measure="activation")
    same = [n for n in act.importance if np.array_equal(act.importance[n], result.importance[n])]
    assert sorted(same) == ["conv_0", "conv_10", "conv_2", "conv_6"]  # no pool, no residual add


def test_importance_of_any_traced_model():
    """A BatchNorm model (ReLU, then GELU) with global average pooling: both measures read from
    the jaxpr equal the maps the model sows (the model's computation is unchanged by `sow`)."""
    import flax.linen as nn

    from jaxsplit.graph import trace

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            for i, (width, act) in enumerate(((5, nn.relu), (7, nn.gelu))):
                x = nn.Conv(width, (3, 3), name=f"conv{i}")(x)
                x = nn.BatchNorm(use_running_average=True, name=f"bn{i}")(x)
                x = act(x)
                self.sow("intermediates", f"act{i}", x)
                x = nn.max_pool(x, (2, 2), strides=(2, 2))
                self.sow("intermediates", f"out{i}", x)
            return nn.Dense(3, name="head")(x.mean(axis=(1, 2)))

    net = Net()
    variables = net.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)))
    variables = {"params": variables["params"],
                 "batch_stats": jax.tree_util.tree_map(lambda v: v + 0.2, variables["batch_stats"])}
    rng = np.random.default_rng(1)
    images = rng.normal(size=(12, 8, 8, 1)).astype(np.float32)
    labels = np.asarray(net.apply(variables, images)).argmax(-1).astype(np.int32)
    graph = trace(net.apply, variables, images[:1])
    assert I.default_measure(None) == "activation"
    for measure, tag in (("activation", "act"), ("block_output", "out")):
        @jax.jit
        def sown(x, tag=tag):
            logits, st = net.apply(variables, x[None], mutable=["intermediates"])
            inter = st["intermediates"]
            return logits[0], {f"conv{i}": inter[f"{tag}{i}"][0][0] for i in range(2)}

        expected, counts = _naive_from_maps(sown, images, labels, 3, 0.0)
        result = I.kernel_importance(net.apply, variables, images, labels, confidence=0.0,
                                     measure=measure, graph=graph)
        np.testing.assert_array_equal(result.num_confident, counts)
        for name, value in expected.items():
            np.testing.assert_allclose(result.importance[name], value, rtol=1e-4, atol=1e-5)
    with pytest.raises(I.ImportanceError, match="measure must be one of"):
        I.kernel_importance(net.apply, variables, images, labels, graph=graph, measure="pre_pool")
    with pytest.raises(I.ImportanceError, match="needs its kernel graph"):
        I.kernel_importance(net.apply, variables, images, labels)
