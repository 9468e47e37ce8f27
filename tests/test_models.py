"""Tests of jaxsplit.models: reference sizes, conv specs, activations, bad inputs."""

from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxsplit.models import (
    ConvLayerDef,
    ConvNet,
    ModelInputError,
    activations,
    build_model,
    conv_macs,
    count_params,
    head_macs,
    init_params,
    random_params,
    rescnn,
    simcnn,
    weak_cnn,
)
from jaxsplit.models.convnet import RESCNN_BLOCKS, SIMCNN_WIDTHS


def _shapes(model: ConvNet):
    """The params tree as ShapeDtypeStructs (traced, never allocated or compiled)."""
    return jax.eval_shape(lambda: init_params(model, jax.random.key(0)))


# -- the reference sizes (docs/method.md §1) -----------------------------------------------------------


def test_simcnn_reference_params_and_macs():
    model = simcnn(num_classes=10, in_channels=3, width=1.0)
    assert count_params(_shapes(model)) == 15_245_130
    assert conv_macs(model) == 313_196_544
    assert model.head_widths() == (512, 512, 512, 10)
    assert head_macs(model) == 512 * 512 * 2 + 512 * 10


def test_rescnn_reference_params():
    model = rescnn(num_classes=10, in_channels=3, width=1.0)
    assert count_params(_shapes(model)) == 16_010_122
    assert model.head_widths() == (512, 10)  # flatten (1x1x512) -> Linear(512, 10)


def test_param_shapes_follow_the_conv_spec():
    for model in (simcnn(num_classes=7, in_channels=1), rescnn(num_classes=5),
                  weak_cnn(num_classes=4, hidden=(64,))):
        spec, shapes = model.conv_spec(), _shapes(model)
        for layer in spec.layers:
            assert shapes[layer.name]["kernel"].shape == (3, 3, layer.in_channels, layer.num_kernels)
            assert shapes[layer.name]["bias"].shape == (layer.num_kernels,)
        widths = model.head_widths()
        for j, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
            assert shapes[f"fc_{len(spec.layers) + j}"]["kernel"].shape == (a, b)
        assert len(shapes) == len(spec.layers) + len(widths) - 1
        # counting by hand from the spec gives the same total
        by_hand = sum(9 * l.in_channels * l.num_kernels + l.num_kernels for l in spec.layers)
        by_hand += sum(a * b + b for a, b in zip(widths[:-1], widths[1:]))
        assert count_params(shapes) == by_hand


# -- conv specs ----------------------------------------------------------------------------------


def test_simcnn_conv_spec():
    spec = simcnn().conv_spec()
    assert spec.names == tuple(f"conv_{i}" for i in range(13))
    assert tuple(spec.num_kernels.values()) == SIMCNN_WIDTHS
    assert spec.total_kernels == 4224
    assert spec.ties == () and spec.free_layers == spec.names
    assert [l.index for l in spec.layers if l.pool] == [1, 3, 6, 9, 12]
    assert [l.input_hw[0] for l in spec.layers] == [32, 32, 16, 16, 8, 8, 8, 4, 4, 4, 2, 2, 2]
    assert [l.in_channels for l in spec.layers] == [3, *SIMCNN_WIDTHS[:-1]]
    assert spec.head_in_hw == (1, 1) and spec.image_shape == (32, 32, 3)


def test_rescnn_conv_spec_and_ties():
    model = rescnn()
    spec = model.conv_spec()
    assert spec.names == tuple(f"conv_{i}" for i in range(12))
    assert tuple(spec.num_kernels.values()) == tuple(c for c, _ in RESCNN_BLOCKS)
    assert [l.pool for l in spec.layers] == [p for _, p in RESCNN_BLOCKS]
    # docs/method.md §1: block 4 += block 2, 8 += 6, 12 += 10 (1-based)
    assert spec.ties == (("conv_1", "conv_3"), ("conv_5", "conv_7"), ("conv_9", "conv_11"))
    assert {l.name: l.residual_from for l in spec.layers if l.residual_from} == {
        "conv_3": "conv_1", "conv_7": "conv_5", "conv_11": "conv_9"}
    assert spec.free_layers == tuple(f"conv_{i}" for i in (0, 1, 2, 4, 5, 6, 8, 9, 10))
    assert spec.representative("conv_7") == "conv_5" and spec.representative("conv_6") == "conv_6"
    for a, b in spec.ties:  # an add needs equal shapes on both sides
        assert spec.layer(a).output_hw == spec.layer(b).output_hw
        assert spec.layer(a).num_kernels == spec.layer(b).num_kernels
    assert spec.head_in_hw == (1, 1)
    with pytest.raises(KeyError, match="conv_12"):
        spec.layer("conv_12")


def test_weak_cnn_and_build_model():
    model = weak_cnn(num_classes=6, in_channels=1, width=0.5, hidden=(32,))
    spec = model.conv_spec()
    assert tuple(spec.num_kernels.values()) == (16, 32, 64)
    assert all(l.pool for l in spec.layers) and spec.head_in_hw == (4, 4)
    assert model.head_widths() == (4 * 4 * 64, 16, 6)
    assert build_model("weak_cnn", num_classes=6, in_channels=1, width=0.5, hidden=(32,)) == model
    assert build_model("simcnn", width=0.25) == simcnn(width=0.25)
    with pytest.raises(ValueError, match="unknown model 'vgg'"):
        build_model("vgg")


def test_width_multiplier_and_one_channel_inputs():
    for factory, widths in ((simcnn, SIMCNN_WIDTHS), (rescnn, tuple(c for c, _ in RESCNN_BLOCKS))):
        for width in (0.0625, 0.25, 0.5):
            spec = factory(width=width, in_channels=1).conv_spec()
            assert tuple(spec.num_kernels.values()) == tuple(max(1, round(c * width)) for c in widths)
            assert spec.layers[0].in_channels == 1 and spec.image_shape == (32, 32, 1)
        assert all(k == 1 for k in factory(width=1e-4).conv_spec().num_kernels.values())
        with pytest.raises(ValueError, match="width multiplier must be > 0"):
            factory(width=0.0)
    # 1 vs 3 input channels changes only conv_0's kernel: 9 * 64 * 2 weights
    assert count_params(_shapes(simcnn(in_channels=3))) - count_params(_shapes(simcnn(in_channels=1))) \
        == 9 * 64 * 2
    assert simcnn(width=0.5).head_widths() == (256, 256, 256, 10)


def test_conv_and_head_macs_of_a_module():
    model = weak_cnn(num_classes=3, in_channels=1, widths=(4, 8), hidden=(16,), image_size=8)
    assert conv_macs(model) == 8 * 8 * 9 * 1 * 4 + 4 * 4 * 9 * 4 * 8
    kept = {"conv_0": 2, "conv_1": 3}
    assert conv_macs(model, kept) == 8 * 8 * 9 * 1 * 2 + 4 * 4 * 9 * 2 * 3
    assert head_macs(model) == (2 * 2 * 8) * 16 + 16 * 3
    assert head_macs(model, last_kept=3, num_outputs=1) == (2 * 2 * 3) * 16 + 16 * 1


# -- forward passes ------------------------------------------------------------------------------


@pytest.mark.parametrize("name, kw", [
    ("simcnn", dict(width=0.0625, in_channels=1)),
    ("rescnn", dict(width=0.0625, in_channels=3)),
    ("weak_cnn", dict(width=0.25, in_channels=1, hidden=(16,))),
])
def test_activations_returns_every_post_relu_map(name, kw):
    model = build_model(name, num_classes=5, **kw)
    spec = model.conv_spec()
    params = random_params(model, 0)
    x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 32, 32, model.in_channels)), jnp.float32)
    mask = {l.name: jnp.asarray(np.arange(l.num_kernels) % 2 == 0) for l in spec.layers}

    @jax.jit
    def run(p, x, m):
        plain = model.apply({"params": p}, x)
        return plain, activations(model, p, x), activations(model, p, x, masks=m)

    plain, (logits, acts), (mlogits, macts) = run(params, x, mask)
    np.testing.assert_array_equal(np.asarray(logits), np.asarray(plain))
    assert logits.shape == (2, 5)
    assert set(acts) == set(spec.names)  # (a dict through jit comes back key-sorted)
    for layer in spec.layers:
        a = np.asarray(acts[layer.name])
        assert a.shape == (2, *layer.input_hw, layer.num_kernels)
        assert a.min() >= 0.0 and a.max() > 0.0  # post-ReLU, not dead
        m = np.asarray(macts[layer.name])
        assert np.all(m[..., 1::2] == 0.0)  # masked kernels are zero after the mask
    # the first layer sees the raw image, so its kept channels are unchanged by masking
    np.testing.assert_allclose(np.asarray(macts["conv_0"])[..., ::2],
                               np.asarray(acts["conv_0"])[..., ::2], rtol=1e-6)
    assert not np.allclose(np.asarray(mlogits), np.asarray(logits))


def test_bad_input_shapes_are_rejected():
    model = weak_cnn(num_classes=3, in_channels=1, widths=(2,), image_size=8)
    params = random_params(model, 0)
    for shape in ((2, 8, 8, 3), (2, 16, 16, 1), (8, 8, 1)):
        with pytest.raises(ModelInputError, match=r"expected \(N, 8, 8, 1\)"):
            model.apply({"params": params}, jnp.zeros(shape))
    bad_head = ConvNet((ConvLayerDef(2, pool=True),), hidden=(4,), head_dropout=(0.0,),
                       num_classes=2, in_channels=1, image_size=8)
    with pytest.raises(ModelInputError, match="head_dropout has 1 rates"):
        bad_head.init(jax.random.key(0), bad_head.dummy_input())
    bad_tie = ConvNet((ConvLayerDef(2), ConvLayerDef(3, residual_from=0)), in_channels=1, image_size=8)
    with pytest.raises(ModelInputError, match="conv_1 adds conv_0 but their widths differ"):
        bad_tie.conv_spec()
    x = jnp.zeros((1, 8, 8, 1))
    with pytest.raises(ModelInputError, match=r"mask of conv_0 has shape \(3,\); expected \(2,\)"):
        model.apply({"params": params}, x, masks={"conv_0": jnp.ones(3, bool)})
    with pytest.raises(ModelInputError, match="no entry for conv_0"):
        model.apply({"params": params}, x, masks={"conv_1": jnp.ones(2, bool)})
