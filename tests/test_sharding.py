"""The population axis sharded over devices (search.sharding).

The multi-device checks run in a subprocess started with
`XLA_FLAGS=--xla_force_host_platform_device_count=4` (the flag must be set
before JAX starts, so it cannot be set inside this pytest process).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxsplit import masks as M
from jaxsplit.models.convnet import ConvLayerDef, ConvNet, init_params
from jaxsplit.search import evaluate as E
from jaxsplit.search import sharding as S
from jaxsplit.search.config import SearchConfig

CHILD = textwrap.dedent(r"""
    import dataclasses, json, sys
    import jax, jax.numpy as jnp, numpy as np
    from jaxsplit import masks as M
    from jaxsplit.models.convnet import ConvLayerDef, ConvNet, init_params
    from jaxsplit.search import driver as D, evaluate as E, sharding as S
    from jaxsplit.search.config import SearchConfig

    out = {"num_devices": jax.device_count(), "local": jax.local_device_count()}
    # a tiny residual net (conv_2 adds conv_1: tied masks)
    model = ConvNet(convs=(ConvLayerDef(4), ConvLayerDef(6, pool=True),
                           ConvLayerDef(6, residual_from=1)),
                    hidden=(8,), head_dropout=(0.0, 0.0), num_classes=3, in_channels=1,
                    image_size=8)
    spec = model.conv_spec()
    params = jax.jit(lambda k: init_params(model, k))(jax.random.key(0))
    C, P, N = 3, 7, 13  # P = 7 is not a multiple of 4 devices
    rng = np.random.default_rng(1)
    masks = {n: rng.random((C, P, spec.layer(n).num_kernels)) < 0.6 for n in spec.free_layers}
    for m in masks.values():
        m[..., 0] = True  # >= 1 kernel per layer
    masks = {k: jnp.asarray(v) for k, v in M.tie(masks, spec).items()}
    images = jax.random.normal(jax.random.key(2), (N, 8, 8, 1))
    classes = jnp.arange(C, dtype=jnp.int32)

    backends = ["reference", "fast"]
    out["backends"] = {}
    for backend in backends:
        single = E.make_evaluator(model, backend, chunk_individuals=4, chunk_images=5)
        L1 = np.asarray(single({"params": params}, masks, images, classes))
        sharded = S.make_sharded_evaluator(model, backend, chunk_individuals=4, chunk_images=5)
        L4 = sharded({"params": params}, masks, images, classes)
        # inside an outer jit, with the inputs placed on the mesh (as the driver does)
        placed = jax.device_put(({"params": params}, masks, images, classes), sharded.replicated)
        L4j = jax.jit(lambda *a: sharded(*a))(*placed)
        out["backends"][backend] = {
            "shape": list(L4.shape), "num_devices": sharded.num_devices,
            "max_abs_diff": float(np.abs(np.asarray(L4) - L1).max()),
            "max_abs_diff_jit": float(np.abs(np.asarray(L4j) - L1).max()),
            "max_abs": float(np.abs(L1).max()),
            "devices_used": len(L4.sharding.device_set),
            "host_side": sharded.host_side, "inner_host_side": bool(getattr(single, "host_side", False))}

    # config hook: shard=True wraps when there are several devices, shard=False does not
    on = E.make_evaluator_from_config(model, SearchConfig(backend="reference"))
    off = E.make_evaluator_from_config(model, SearchConfig(backend="reference", shard=False))
    out["config_on"] = type(on).__name__
    out["config_off"] = type(off).__name__

    # two driver generations, sharded vs single-device: same metrics
    cfg = SearchConfig(population_size=5, num_generations=2, backend="reference",
                       min_kept_ensembles=3, max_kept_ensembles=10, seed=1)
    rng = np.random.default_rng(0)
    importance = {n: rng.random((C, spec.layer(n).num_kernels)).astype(np.float32)
                  for n in spec.names}
    labels = jnp.asarray(np.arange(N) % C, jnp.int32)
    runs = {}
    for name, fn in (("single", off), ("sharded", on)):
        problem, settings = D.build_problem(model, "weak_cnn", importance, cfg, evaluate_fn=fn)
        bits = D.initial_population(jax.random.key(5), problem, cfg.population_size, settings)
        carry = D.init_carry(jax.random.key(6), problem, bits)
        place = S.input_placement(fn)
        step = D.make_step(problem)
        hist = []
        for g in range(2):
            carry, metrics = step(D._strong(carry, place), jax.random.key(10 + g),
                                  D._strong({"params": params}, place),
                                  *D._strong((images, labels, classes), place))
            hist.append({k: np.asarray(v).tolist() for k, v in metrics.items()})
        runs[name] = {"history": hist, "best_bits": np.asarray(carry.best_bits).tolist()}
    out["driver_same"] = runs["single"] == runs["sharded"]
    out["driver"] = runs
    print("RESULT " + json.dumps(out))
""")


@pytest.fixture(scope="module")
def four_devices():
    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4").strip()
    env["JAX_PLATFORMS"] = "cpu"
    proc = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def test_four_cpu_devices_are_seen(four_devices):
    assert four_devices["num_devices"] == 4
    assert four_devices["local"] == 4


def test_sharded_L_equals_single_device(four_devices):
    assert "reference" in four_devices["backends"]
    for backend, r in four_devices["backends"].items():
        assert r["shape"] == [3, 7, 13], backend
        assert r["num_devices"] == 4, backend
        assert r["max_abs"] > 0.0, backend  # a non-trivial table
        assert r["max_abs_diff"] <= 1e-5 * max(1.0, r["max_abs"]), (backend, r)
        assert r["max_abs_diff_jit"] <= 1e-5 * max(1.0, r["max_abs"]), (backend, r)
        assert r["devices_used"] == 4, (backend, r)
        assert r["host_side"] == r["inner_host_side"], (backend, r)  # "fast": per-device threads


def test_config_hook_shards_only_when_enabled(four_devices):
    assert four_devices["config_on"] == "ShardedEvaluator"
    assert four_devices["config_off"] != "ShardedEvaluator"


def test_driver_generations_match_single_device(four_devices):
    single, sharded = four_devices["driver"]["single"], four_devices["driver"]["sharded"]
    assert len(single["history"]) == 2
    for h1, h4 in zip(single["history"], sharded["history"]):
        assert h1.keys() == h4.keys()
        for key in h1:
            np.testing.assert_allclose(np.asarray(h4[key], float), np.asarray(h1[key], float),
                                       atol=1e-5, err_msg=key)
    assert single["best_bits"] == sharded["best_bits"]


# -- in-process (one device) -------------------------------------------------------


@pytest.fixture(scope="module")
def tiny():
    model = ConvNet(convs=(ConvLayerDef(3, pool=True), ConvLayerDef(5)), hidden=(),
                    head_dropout=(0.0,), num_classes=2, in_channels=1, image_size=4)
    params = jax.jit(lambda k: init_params(model, k))(jax.random.key(0))
    masks = jax.jit(lambda k: M.random(k, model.conv_spec(), 0.7, (2, 3)))(jax.random.key(1))
    images = jax.random.normal(jax.random.key(2), (5, 4, 4, 1))
    return model, params, masks, images, jnp.arange(2, dtype=jnp.int32)


def test_one_device_mesh_is_identity(tiny):
    model, params, masks, images, classes = tiny
    L1 = E.make_evaluator(model, "reference")({"params": params}, masks, images, classes)
    sharded = S.make_sharded_evaluator(model, "reference", devices=jax.devices()[:1])
    np.testing.assert_allclose(np.asarray(sharded({"params": params}, masks, images, classes)),
                               np.asarray(L1), atol=1e-6)
    assert sharded.num_traces == 1
    sharded({"params": params}, masks, images, classes)
    assert sharded.num_traces == 1  # compiled once per shapes


def test_config_hook_single_device_returns_plain_evaluator(tiny):
    model = tiny[0]
    if jax.local_device_count() > 1:
        pytest.skip("this process has several devices")
    fn = E.make_evaluator_from_config(model, SearchConfig(backend="reference"))
    assert not isinstance(fn, S.ShardedEvaluator)
    assert S.input_placement(fn) == jax.devices()[0]


def test_padded_size():
    assert [S.padded_size(p, 4) for p in (1, 4, 5, 7, 8, 101)] == [4, 4, 8, 8, 8, 104]


def test_bad_inputs_have_clear_errors(tiny):
    model, params, masks, images, classes = tiny
    with pytest.raises(S.ShardingError, match="devices is empty"):
        S.population_mesh([])
    with pytest.raises(S.ShardingError, match="jax.Device"):
        S.population_mesh(["cpu:0"])
    sharded = S.shard_evaluator(E.make_evaluator(model, "reference"), model=model)
    flat = {k: v[0] for k, v in masks.items()}  # missing the P axis
    with pytest.raises(E.EvaluatorInputError, match=r"\(C, P"):
        sharded({"params": params}, flat, images, classes)
    with pytest.raises(Exception, match="search.shard"):
        SearchConfig(shard="yes")
