"""Every evaluator backend on the default device equals the reference on the CPU (marker `device`).

On a GPU/TPU machine these run the backends on the accelerator (`jax.devices()[0]`) and
compare with the reference backend computed on the host CPU (`jax.devices("cpu")[0]`);
`benchmarks/device_check.sh` runs them there (`pytest -m device`). On a CPU-only machine
both sides are the CPU, so they also run in `make test`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxsplit import masks as M
from jaxsplit.models.convnet import ConvLayerDef, ConvNet, random_params
from jaxsplit.search import evaluate as E
from jaxsplit.search import sharding as S

pytestmark = pytest.mark.device

MODEL = ConvNet(convs=(ConvLayerDef(8), ConvLayerDef(16, pool=True),
                       ConvLayerDef(16, residual_from=1), ConvLayerDef(24, pool=True)),
                hidden=(12,), head_dropout=(0.0, 0.0), num_classes=4, in_channels=3, image_size=8)
# (backend, options, relative tolerance on L); tolerances of the reduced-precision dtypes
# hold for these random weights and images (|L| ~ 1-10)
CASES = [("reference", {}, 1e-5), ("fast", {"cache_bytes": 0}, 1e-5),
         ("device", {"num_levels": 4}, 1e-5),
         ("device", {"num_levels": 4, "extractor": "graph"}, 1e-5),
         ("device", {"num_levels": 4, "member_loop": "map"}, 1e-5),
         ("device", {"num_levels": 4, "member_loop": "vmap"}, 1e-5),
         ("device", {"num_levels": 4, "compute_dtype": "tensorfloat32"}, 2e-2),
         ("device", {"num_levels": 4, "compute_dtype": "bfloat16"}, 5e-2)]


@pytest.fixture(scope="module")
def problem():
    spec = MODEL.conv_spec()
    rng = np.random.default_rng(0)
    C, P, N = 4, 9, 32
    frac = rng.uniform(0.2, 1.0, (C, P, 1))
    masks = {n: rng.random((C, P, spec.layer(n).num_kernels)) < frac for n in spec.free_layers}
    masks = {k: np.asarray(v) for k, v in M.tie(masks, spec).items()}
    images = rng.normal(size=(N, 8, 8, 3)).astype(np.float32)
    classes = np.arange(C, dtype=np.int32)
    params = {"params": jax.device_get(random_params(MODEL, 0))}
    cpu = jax.devices("cpu")[0]
    with jax.default_device(cpu):
        ref = E.make_evaluator(MODEL, "reference", chunk_individuals=4, chunk_images=8)
        want = np.asarray(ref(*jax.device_put((params, masks, images, classes), cpu)))
    return params, masks, images, classes, want


def _on_default_device(evaluate_fn, params, masks, images, classes):
    dev = jax.devices()[0]
    with jax.default_matmul_precision("float32"):  # no silent TF32 in the fp32 cases on GPUs
        return np.asarray(evaluate_fn(*jax.device_put((params, masks, images, classes), dev)))


@pytest.mark.parametrize("backend,options,tol", CASES,
                         ids=[f"{b}-{o.get('extractor', '')}-{o.get('member_loop', '')}-"
                              f"{o.get('compute_dtype', 'float32')}"
                              for b, o, _ in CASES])
def test_backend_on_device_equals_cpu_reference(problem, backend, options, tol):
    params, masks, images, classes, want = problem
    evaluate_fn = E.make_evaluator(MODEL, backend, chunk_individuals=4, chunk_images=8, **options)
    got = _on_default_device(evaluate_fn, params, masks, images, classes)
    scale = max(1.0, float(np.abs(want).max()))
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=0, atol=tol * scale)
    if tol > 1e-5:  # reduced precision: the per-image winner among a row's classes mostly holds
        assert np.mean(got.argmax(0) == want.argmax(0)) >= 0.9


def test_sharded_device_backend_equals_cpu_reference(problem):
    params, masks, images, classes, want = problem
    sharded = S.shard_evaluator(E.make_evaluator(MODEL, "device", num_levels=4), model=MODEL)
    with jax.default_matmul_precision("float32"):
        got = np.asarray(sharded(params, {k: jnp.asarray(v) for k, v in masks.items()},
                                 images, classes))
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * max(1.0, float(np.abs(want).max())))
