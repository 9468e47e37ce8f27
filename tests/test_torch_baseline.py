"""The PyTorch baseline (benchmarks/torch_baseline.py): the reference's per-module loop gives
the same logit table L as jaxsplit's evaluator, on the same exported weights and masks."""

from __future__ import annotations

import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from jaxsplit import masks as M
from jaxsplit.models.convnet import random_params, rescnn, simcnn, weak_cnn
from jaxsplit.search import evaluate as E

torch = pytest.importorskip("torch")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import torch_baseline as TB  # noqa: E402

from jaxsplit.interop.torch import params_to_state_dict  # noqa: E402

pytestmark = pytest.mark.torch
TOL = 1e-4
C, P, N = 3, 4, 6


def numpy_masks(spec, keep_prob, seed):
    """Random tied masks `{name: bool[C, P, K]}` with >= 1 kernel per layer (numpy: no compile)."""
    rng = np.random.default_rng(seed)
    out = {}
    for name in spec.free_layers:
        k = spec.layer(name).num_kernels
        m = rng.random((C, P, k)) < keep_prob
        m[np.arange(C)[:, None], np.arange(P)[None, :], rng.integers(0, k, (C, P))] = True
        out[name] = m
    return M.tie(out, spec)


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """Tiny tensors: threads only add overhead (and contention on a shared CPU)."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


CASES = {
    "simcnn": lambda: simcnn(num_classes=5, in_channels=3, width=0.0625),
    "rescnn": lambda: rescnn(num_classes=5, in_channels=1, width=0.0625),
    # 3 pools on 32x32: a 4x4 last map, so the NCHW column order of the first Linear matters
    "weak_cnn": lambda: weak_cnn(num_classes=5, in_channels=1, width=0.125, hidden=(16,)),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_torch_loop_equals_reference_evaluator(name):
    model = CASES[name]()
    spec = model.conv_spec()
    params = random_params(model, seed=1)
    masks = numpy_masks(spec, 0.5, seed=2)
    rng = np.random.default_rng(3)
    images = rng.normal(size=(N, model.image_size, model.image_size, model.in_channels)).astype(
        np.float32)
    classes = np.array([4, 0, 2], np.int32)
    L_jax = np.asarray(E.make_evaluator(model, "reference")(
        {"params": params}, {k: jnp.asarray(v) for k, v in masks.items()}, jnp.asarray(images),
        jnp.asarray(classes)))
    state_dict = params_to_state_dict(params, model)  # "rescnn" naming for ResCNN
    timings = {}
    L_torch = TB.torch_logit_table(model, state_dict, masks, images, classes, batch_size=4,
                                   timings=timings)
    assert L_torch.shape == (C, P, N) and L_torch.dtype == np.float32
    assert np.abs(L_jax).max() > 0.1  # a non-trivial table
    np.testing.assert_allclose(L_torch, L_jax, atol=TOL, rtol=TOL)
    assert timings["extract_s"] > 0 and timings["forward_s"] > 0


def test_extracted_module_is_physically_smaller():
    model = CASES["weak_cnn"]()
    spec = model.conv_spec()
    params = random_params(model, seed=4)
    tensors = TB.layer_tensors(model, params_to_state_dict(params, model))
    mask = {n: np.zeros(spec.layer(n).num_kernels, bool) for n in spec.names}
    kept = {"conv_0": [0, 2], "conv_1": [1, 3, 5], "conv_2": [7]}
    for n, idx in kept.items():
        mask[n][idx] = True
    module = TB.extract_module(model, tensors, mask, class_id=3)
    assert [tuple(c.weight.shape) for c in module.convs] == [(2, 1, 3, 3), (3, 2, 3, 3),
                                                            (1, 3, 3, 3)]
    h, w = spec.head_in_hw
    hidden = model.hidden[0]
    assert tuple(module.fcs[0].weight.shape) == (hidden, 1 * h * w)
    assert tuple(module.fcs[-1].weight.shape) == (1, hidden)
    # the sliced weights are the model's: conv_1 keeps rows 1, 3, 5 and input channels 0, 2
    full = tensors["conv_1"]["kernel"]
    np.testing.assert_array_equal(module.convs[1].weight.numpy(), full[[1, 3, 5]][:, [0, 2]].numpy())


def test_bad_masks_are_rejected():
    model = CASES["rescnn"]()
    spec = model.conv_spec()
    params = random_params(model, seed=5)
    tensors = TB.layer_tensors(model, params_to_state_dict(params, model))
    full = {n: np.ones(spec.layer(n).num_kernels, bool) for n in spec.names}
    untied = dict(full)
    dst = spec.ties[0][1]
    untied[dst] = full[dst].copy()
    untied[dst][0] = False
    with pytest.raises(TB.ExtractionError, match="tie them"):
        TB.extract_module(model, tensors, untied, 0)
    empty = dict(full)
    empty["conv_0"] = np.zeros_like(full["conv_0"])
    with pytest.raises(TB.ExtractionError, match="keeps no kernel"):
        TB.extract_module(model, tensors, empty, 0)
