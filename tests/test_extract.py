"""Tests of jaxsplit.extract: physical modules equal masked models, sizes, bad inputs."""

from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxsplit import extract as E
from jaxsplit import masks as masks_lib
from jaxsplit.models import (
    ConvLayerDef,
    ConvNet,
    conv_macs,
    count_params,
    head_macs,
    random_params,
    rescnn,
    simcnn,
    weak_cnn,
)

TOL = 1e-5


def _tiny_tied() -> ConvNet:
    """Uneven widths, a 3-layer tie group (conv_1 ~ conv_3 ~ conv_4), a hidden Dense layer."""
    convs = (ConvLayerDef(5), ConvLayerDef(6, pool=True), ConvLayerDef(4),
             ConvLayerDef(6, residual_from=1), ConvLayerDef(6, residual_from=3),
             ConvLayerDef(3, pool=True))
    return ConvNet(convs, hidden=(7,), head_dropout=(0.0, 0.0), num_classes=4, in_channels=1,
                   image_size=8)


ARCHS = {
    "simcnn": lambda: simcnn(num_classes=10, in_channels=3, width=0.0625),
    "rescnn": lambda: rescnn(num_classes=10, in_channels=1, width=0.0625),
    "weak_cnn": lambda: weak_cnn(num_classes=6, in_channels=3, width=0.25, hidden=(16,)),
    "tiny_tied": _tiny_tied,
}
NUM_MASKS = {"simcnn": 4, "rescnn": 4, "weak_cnn": 4, "tiny_tied": 8}


def _images(model: ConvNet, seed: int, num: int = 3) -> jax.Array:
    rng = np.random.default_rng(seed)
    return jnp.asarray(rng.normal(size=(num, model.image_size, model.image_size,
                                        model.in_channels)).astype(np.float32))


def _mask(model: ConvNet, seed: int) -> dict[str, np.ndarray]:
    """Random masks of varied density; some keep exactly one kernel in one or every layer."""
    spec = model.conv_spec()
    keep = (0.15, 0.5, 0.85)[seed % 3]
    rng = np.random.default_rng(seed)
    mask = {}
    for name in spec.free_layers:  # (numpy, not masks.random: no jax PRNG compiles)
        m = rng.random(spec.layer(name).num_kernels) < keep
        m[rng.integers(m.size)] = True
        mask[name] = m
    if seed % 4 == 1:  # one kernel in one (free) layer
        name = spec.free_layers[seed % len(spec.free_layers)]
        one = np.zeros(spec.layer(name).num_kernels, bool)
        one[rng.integers(one.size)] = True
        mask[name] = one
    elif seed % 4 == 3:  # one kernel in every layer
        for name in spec.free_layers:
            one = np.zeros(spec.layer(name).num_kernels, bool)
            one[rng.integers(one.size)] = True
            mask[name] = one
    return masks_lib.tie(mask, spec)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_extracted_logits_equal_masked_logits(arch):
    model = ARCHS[arch]()
    spec = model.conv_spec()
    params = random_params(model, 0)
    x = _images(model, 1)
    masked_fn = jax.jit(lambda p, m: model.apply({"params": p}, x, masks=m))
    one_kernel_seen = False
    for seed in range(NUM_MASKS[arch]):
        mask = _mask(model, seed)
        one_kernel_seen |= any(int(v.sum()) == 1 for v in mask.values())
        masked = masked_fn(params, mask)
        assert float(jnp.abs(masked).max()) > 1e-3  # not a trivially-zero comparison

        small, small_params = E.extract(model, params, mask)
        assert isinstance(small, ConvNet) and small.num_classes == model.num_classes
        kept = {n: int(mask[n].sum()) for n in spec.names}
        assert small.conv_spec().num_kernels == kept
        assert small.conv_spec().ties == spec.ties
        assert count_params(small_params) == E.stats_from_mask(model, mask)["params"]
        out = jax.jit(small.apply)({"params": small_params}, x)
        assert out.shape == masked.shape
        assert float(jnp.abs(out - masked).max()) <= TOL, (arch, seed)

        tc = seed % model.num_classes
        small1, small1_params = E.extract(model, params, mask, target_class=tc)
        assert small1.num_classes == 1
        last = f"fc_{len(spec.layers) + len(model.hidden)}"
        assert small1_params[last]["kernel"].shape[-1] == 1
        out1 = jax.jit(small1.apply)({"params": small1_params}, x)
        assert out1.shape == (x.shape[0], 1)
        assert float(jnp.abs(out1[:, 0] - masked[:, tc]).max()) <= TOL, (arch, seed, tc)
    assert one_kernel_seen


@pytest.mark.parametrize("arch", list(ARCHS))
def test_all_ones_mask_is_the_identity(arch):
    model = ARCHS[arch]()
    params = random_params(model, 2)
    full = masks_lib.full(model.conv_spec())
    small, small_params = E.extract(model, params, full)
    assert small == model
    assert count_params(small_params) == count_params(params)
    for a, b in zip(jax.tree_util.tree_leaves(small_params), jax.tree_util.tree_leaves(params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    stats = E.stats_from_mask(model, full)
    for key in ("kept_kernel_fraction", "kept_fraction", "params_fraction", "macs_fraction"):
        assert stats[key] == 1.0, key
    # the one-output module: the classifier's other columns are gone, nothing else
    _, one = E.extract(model, params, full, target_class=model.num_classes - 1)
    d = model.head_widths()[-2]
    assert count_params(one) == count_params(params) - (d + 1) * (model.num_classes - 1)
    assert stats["single_output_params"] == count_params(one)


def test_target_class_keeps_that_column_of_every_head_layout():
    """The classifier is the first Dense layer (ResCNN, weak CNN) or a later one (SimCNN)."""
    for arch in ("rescnn", "weak_cnn", "tiny_tied"):
        model = ARCHS[arch]()
        params = random_params(model, 3)
        mask = _mask(model, 5)
        _, all_cols = E.extract(model, params, mask)
        for tc in (0, model.num_classes - 1):
            _, one = E.extract(model, params, mask, target_class=tc)
            for name in one:
                a, b = one[name], all_cols[name]
                if name == f"fc_{len(model.convs) + len(model.hidden)}":
                    np.testing.assert_array_equal(np.asarray(a["kernel"])[:, 0],
                                                  np.asarray(b["kernel"])[:, tc])
                    np.testing.assert_array_equal(np.asarray(a["bias"]), np.asarray(b["bias"])[[tc]])
                else:
                    np.testing.assert_array_equal(np.asarray(a["kernel"]), np.asarray(b["kernel"]))


@pytest.mark.parametrize("arch", list(ARCHS))
def test_stats_agree_with_the_extracted_modules(arch):
    model = ARCHS[arch]()
    params = random_params(model, 4)
    spec = model.conv_spec()
    full_params = count_params(params)
    full_macs = conv_macs(model) + head_macs(model)
    for seed in range(6):
        mask = _mask(model, seed)
        stats = E.stats_from_mask(model, mask)
        assert E.module_stats(model, params, mask) == stats
        small, small_params = E.extract(model, params, mask)
        small1, small1_params = E.extract(model, params, mask, target_class=0)
        kept = {n: int(mask[n].sum()) for n in spec.names}
        assert stats["kept_per_layer"] == kept
        assert stats["kept_kernels"] == sum(kept.values())
        assert stats["total_kernels"] == spec.total_kernels
        assert stats["kept_kernel_fraction"] == pytest.approx(float(masks_lib.kept_fraction(mask)))
        assert stats["model_params"] == full_params and stats["model_macs"] == full_macs
        assert stats["params"] == count_params(small_params)
        assert stats["macs"] == conv_macs(small) + head_macs(small)
        assert stats["macs"] - head_macs(small) == conv_macs(model, kept)
        assert stats["single_output_params"] == count_params(small1_params)
        assert stats["single_output_macs"] == conv_macs(small1) + head_macs(small1)
        assert stats["params_fraction"] == pytest.approx(stats["params"] / full_params)
        assert stats["macs_fraction"] == pytest.approx(stats["macs"] / full_macs)
        assert stats["single_output_macs_fraction"] == pytest.approx(stats["single_output_macs"] / full_macs)
        assert stats["single_output_params_fraction"] < stats["params_fraction"] <= 1.0
        assert 0 < stats["single_output_macs_fraction"] < stats["macs_fraction"] <= 1.0
        if stats["kept_kernels"] < spec.total_kernels:
            assert stats["params_fraction"] < 1.0 and stats["macs_fraction"] < 1.0


def test_accepts_numpy_jax_masks_and_wrapped_params():
    model = ARCHS["tiny_tied"]()
    params = random_params(model, 5)
    mask = _mask(model, 6)
    _, a = E.extract(model, params, {k: jnp.asarray(v) for k, v in mask.items()})
    wrapped_model, b = E.extract(model, {"params": params}, mask)
    assert set(b) == {"params"}
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b["params"])):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert E.module_stats(model, {"params": params}, mask) == E.stats_from_mask(model, mask)


def test_bad_masks_are_rejected_naming_the_layer():
    model = ARCHS["rescnn"]()
    spec = model.conv_spec()
    params = random_params(model, 6)
    good = {k: np.asarray(v) for k, v in masks_lib.full(spec).items()}

    def bad(**changes):
        m = dict(good)
        for k, v in changes.items():
            if v is None:
                del m[k]
            else:
                m[k] = v
        return m

    k2 = spec.layer("conv_2").num_kernels
    cases = [
        (bad(conv_4=None), "conv_4"),
        (bad(conv_2=np.ones(k2 + 1, bool)), "conv_2"),
        (bad(conv_2=np.ones(k2, np.int32)), "conv_2.*bool"),
        (bad(conv_2=np.zeros(k2, bool)), "conv_2 keeps no kernel"),
        (bad(conv_3=np.r_[False, np.ones(spec.layer("conv_3").num_kernels - 1, bool)]),
         "conv_1 and conv_3"),
        ({k: np.ones((2, v.shape[0]), bool) for k, v in good.items()}, "batch shape"),
    ]
    for mask, match in cases:
        for fn in (lambda m: E.extract(model, params, m), lambda m: E.stats_from_mask(model, m),
                   lambda m: E.module_stats(model, params, m)):
            with pytest.raises(masks_lib.MaskError, match=match):
                fn(mask)


def test_bad_target_class_and_params_are_rejected():
    model = ARCHS["weak_cnn"]()
    params = random_params(model, 7)
    mask = masks_lib.full(model.conv_spec())
    for tc, match in ((6, "out of range"), (-1, "out of range"), (1.0, "int"), (True, "int")):
        with pytest.raises(E.ExtractError, match=match):
            E.extract(model, params, mask, target_class=tc)
    wrong = dict(params, conv_1={"kernel": params["conv_1"]["kernel"][:, :, :1],
                                 "bias": params["conv_1"]["bias"]})
    with pytest.raises(E.ExtractError, match="conv_1/kernel"):
        E.extract(model, wrong, mask)
    with pytest.raises(E.ExtractError, match="fc_3"):
        E.extract(model, {k: v for k, v in params.items() if k != "fc_3"}, mask)
    with pytest.raises(E.ExtractError, match="fc_9"):
        E.extract(model, dict(params, fc_9=params["fc_3"]), mask)
    with pytest.raises(E.ExtractError, match="ConvNet"):
        E.extract(object(), params, mask)
