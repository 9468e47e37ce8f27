"""The "device" backend (search.device_evaluate): bucketed gathered modules inside one jit."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxsplit import masks as M
from jaxsplit.models.convnet import ConvLayerDef, ConvNet, random_params
from jaxsplit.search import device_evaluate as DE
from jaxsplit.search import evaluate as E
from jaxsplit.search.config import SearchConfig

# widths 8/16/24 with num_levels=4 give 3 levels (steps of 8), a residual tie (conv_2 adds conv_1)
MODEL = ConvNet(convs=(ConvLayerDef(8), ConvLayerDef(16, pool=True),
                       ConvLayerDef(16, residual_from=1), ConvLayerDef(24, pool=True)),
                hidden=(12,), head_dropout=(0.0, 0.0), num_classes=4, in_channels=1, image_size=8)
NO_HIDDEN = ConvNet(convs=(ConvLayerDef(8, pool=True), ConvLayerDef(16)), hidden=(),
                    head_dropout=(0.0,), num_classes=3, in_channels=2, image_size=6)


def _problem(model, seed, C, P, N):
    spec = model.conv_spec()
    rng = np.random.default_rng(seed)
    frac = rng.uniform(0.05, 1.0, (C, P, 1))
    masks = {n: rng.random((C, P, spec.layer(n).num_kernels)) < frac for n in spec.free_layers}
    masks = {k: np.asarray(v) for k, v in M.tie(masks, spec).items()}
    masks[spec.names[-1]][0, 0] = False  # an empty layer: its channels are all removed
    masks[spec.names[0]][-1, -1] = True  # a full layer
    h, w, cin = spec.image_shape
    images = jnp.asarray(rng.normal(size=(N, h, w, cin)), jnp.float32)
    classes = jnp.asarray(rng.permutation(model.num_classes)[:C], jnp.int32)
    return ({"params": random_params(model, seed)}, {k: jnp.asarray(v) for k, v in masks.items()},
            images, classes)


@pytest.mark.parametrize("extractor,member_loop",
                         [("convnet", "vmap"), ("convnet", "map"), ("graph", "vmap")])
@pytest.mark.parametrize("model", [MODEL, NO_HIDDEN], ids=["residual+hidden", "no-hidden"])
def test_equals_reference(model, extractor, member_loop):
    reference = E.make_evaluator(model, "reference", chunk_individuals=4, chunk_images=5)
    device = DE.DeviceEvaluator(model, chunk_individuals=4, chunk_images=5, num_levels=4,
                                extractor=extractor, member_loop=member_loop)
    assert device.member_loop == member_loop
    for seed in range(2 if (extractor, member_loop) == ("convnet", "vmap") else 1):
        C = min(3, model.num_classes)
        params, masks, images, classes = _problem(model, seed, C, 7, 11)  # C·P = 21: padded groups
        want = np.asarray(reference(params, masks, images, classes))
        got = np.asarray(device(params, masks, images, classes))
        assert got.shape == want.shape == (C, 7, 11)
        scale = max(1.0, float(np.abs(want).max()))
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * scale, err_msg=f"seed {seed}")
    assert len(device.levels) == (3 if model is MODEL else 2)  # repeated levels dropped


def test_levels_and_groups_cover_rows():
    spec = MODEL.conv_spec()
    flat = {n: np.zeros((4, spec.layer(n).num_kernels), bool) for n in spec.names}
    for n in spec.names:
        flat[n][:, 0] = True
    flat["conv_3"][1, :8] = True  # exactly one step: level 0
    flat["conv_3"][2, :9] = True  # one more than a step: level 1
    flat["conv_3"][3, :] = True  # full 24 = 3 steps: level 2
    # conv_3 (K=24, 4 levels, step 8): sizes 8, 16, 24, 24; conv_1 (K=16): 8, 8, 16, 16
    assert DE.row_levels(MODEL, 4, flat).tolist() == [0, 0, 1, 2]
    assert DE.level_sizes(MODEL, 4)[1] == {"conv_0": 8, "conv_1": 8, "conv_2": 8, "conv_3": 16}
    flat["conv_1"][0, :9] = True  # 9 of 16 needs the level with 16 slots: level 2
    flat["conv_2"][0, :9] = True  # (its tie)
    assert DE.row_levels(MODEL, 4, flat).tolist()[0] == 2


def test_jit_inside_outer_jit_single_trace():
    device = DE.DeviceEvaluator(MODEL, chunk_individuals=8, chunk_images=16, num_levels=4)
    params, masks, images, classes = _problem(MODEL, 3, 2, 5, 6)
    first = device(params, masks, images, classes)
    again = device(params, masks, images, classes)
    assert device.num_traces == 1
    np.testing.assert_array_equal(np.asarray(first), np.asarray(again))
    outer = jax.jit(lambda *a: device(*a) * 1.0)(params, masks, images, classes)
    np.testing.assert_allclose(np.asarray(outer), np.asarray(first), atol=1e-6)
    assert device.host_side is False


def test_compute_dtypes_close_to_float32():
    params, masks, images, classes = _problem(MODEL, 4, 3, 6, 16)
    f32 = np.asarray(DE.DeviceEvaluator(MODEL, num_levels=4)(params, masks, images, classes))
    for dtype, tol in (("tensorfloat32", 2e-2), ("bfloat16", 5e-2)):
        got = np.asarray(DE.DeviceEvaluator(MODEL, num_levels=4, compute_dtype=dtype)(
            params, masks, images, classes))
        assert np.abs(got - f32).max() <= tol * max(1.0, np.abs(f32).max()), dtype
        assert np.isfinite(got).all()


def test_flops_count_kept_kernels_only():
    spec = MODEL.conv_spec()
    full = {n: np.ones((1, spec.layer(n).num_kernels), bool) for n in spec.names}
    half = {n: np.zeros((1, spec.layer(n).num_kernels), bool) for n in spec.names}
    for n in spec.names:
        half[n][:, : spec.layer(n).num_kernels // 2] = True
    f_full = DE.flops_per_individual(MODEL, full, num_levels=4, chunk_individuals=1)
    f_half = DE.flops_per_individual(MODEL, half, num_levels=4, chunk_individuals=1)
    assert f_full["kept"][0] == f_full["reference"][0] == f_full["device"][0]
    assert 0.2 < f_half["kept"][0] / f_half["reference"][0] < 0.4  # ~ (1/2)² beyond layer 0
    assert f_half["kept"][0] <= f_half["device"][0] < f_half["reference"][0]


def test_backend_selection_and_bad_options():
    assert E.default_backend("gpu") == "device"
    assert E.default_backend("tpu") == "device"
    assert E.default_backend("cpu") in ("fast", "reference")
    ev = E.make_evaluator(MODEL, "device", compute_dtype="bfloat16", num_levels=4,
                          share_first_conv=None, cache_bytes=0)
    assert isinstance(ev, DE.DeviceEvaluator) and ev.compute_dtype == "bfloat16"
    cfg_ev = E.make_evaluator_from_config(MODEL, SearchConfig(backend="device", shard=False,
                                                              compute_dtype="tensorfloat32"))
    assert isinstance(cfg_ev, DE.DeviceEvaluator) and cfg_ev.compute_dtype == "tensorfloat32"
    with pytest.raises(E.EvaluatorInputError, match="compute_dtype"):
        DE.DeviceEvaluator(MODEL, compute_dtype="float16")
    with pytest.raises(E.EvaluatorInputError, match="extractor"):
        DE.DeviceEvaluator(MODEL, extractor="torch")
    with pytest.raises(E.EvaluatorInputError, match="needs extractor='convnet'"):
        DE.DeviceEvaluator(MODEL, extractor="graph", compute_dtype="bfloat16")
    with pytest.raises(E.EvaluatorInputError, match="member_loop"):
        DE.DeviceEvaluator(MODEL, member_loop="scan")
    assert DE.DeviceEvaluator(MODEL).member_loop == ("map" if jax.default_backend() == "cpu"
                                                     else "vmap")
    with pytest.raises(E.EvaluatorInputError, match="num_levels"):
        DE.DeviceEvaluator(MODEL, num_levels=0)
    params, masks, images, classes = _problem(MODEL, 0, 2, 3, 4)
    with pytest.raises(E.EvaluatorInputError, match="images"):
        ev(params, masks, images[..., :0], classes)
