"""The library entry point: jaxsplit.modularize, Modules, the step API (jaxsplit.modularize)."""

from __future__ import annotations

import functools
import hashlib
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import call_with_default_xla

import jaxsplit
from jaxsplit import masks as masks_lib
from jaxsplit.graph import Graph, trace
from jaxsplit.models.convnet import random_params, rescnn, simcnn
from jaxsplit.modularize import (
    FORMAT_VERSION,
    HEADER_KEY,
    ModularizeError,
    Modules,
    ModulesFileError,
    modularize_init,
    modularize_step,
)
from jaxsplit.search import core
from jaxsplit.search.config import SearchConfig


class TinyBN(nn.Module):
    """Conv -> BatchNorm -> ReLU -> pool, twice, global average pooling, Dense."""

    num_classes: int = 3

    @nn.compact
    def __call__(self, x, train: bool = False):
        for i, width in enumerate((6, 8)):
            x = nn.Conv(width, (3, 3), name=f"conv{i}")(x)
            x = nn.BatchNorm(use_running_average=not train, name=f"bn{i}")(x)
            x = nn.relu(x)
            x = nn.max_pool(x, (2, 2), strides=(2, 2))
        x = x.mean(axis=(1, 2))
        return nn.Dense(self.num_classes, name="head")(x)


def tiny_search(**kw) -> SearchConfig:
    base = dict(population_size=4, num_generations=2, backend="reference", min_kept_ensembles=2,
                max_kept_ensembles=8, chunk_individuals=8, importance_confidence=0.0, seed=1)
    base.update(kw)
    return SearchConfig(**base)


@pytest.fixture(scope="module")
def bn_model():
    model = TinyBN()
    variables = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 8, 8, 1)))
    # non-trivial running statistics, so BatchNorm's shift matters
    stats = jax.tree_util.tree_map(lambda v: v + 0.3, variables["batch_stats"])
    variables = {"params": variables["params"], "batch_stats": stats}
    apply_fn = functools.partial(model.apply, train=False)
    rng = np.random.default_rng(0)
    images = rng.normal(size=(18, 8, 8, 1)).astype(np.float32)
    labels = np.array(jnp.argmax(apply_fn(variables, images), -1), np.int32)
    labels[:3] = [0, 1, 2]  # every class present
    return apply_fn, variables, images, labels


@pytest.fixture(scope="module")
def bn_modules(bn_model):
    apply_fn, variables, images, labels = bn_model
    return jaxsplit.modularize(apply_fn, variables, (images, labels), search=tiny_search(),
                               key=jax.random.key(7))


def test_modularize_a_batchnorm_model_in_memory(bn_model, bn_modules):
    apply_fn, variables, images, labels = bn_model
    mods = bn_modules
    assert isinstance(mods.graph, Graph) and mods.graph.names == ("conv0", "conv1")
    assert mods.classes.tolist() == [0, 1, 2] and mods.class_names == ("0", "1", "2")
    for name, k in mods.graph.num_kernels.items():
        assert mods.masks[name].shape == (3, k) and mods.masks[name].dtype == bool
        assert mods.masks[name].any(axis=1).all()  # every module keeps a kernel of every site
    assert len(mods.history) == mods.info["generations_run"] == 3  # generations 0..2
    assert len(mods.stats) == 3 and all(s["kept_kernels"] >= 2 for s in mods.stats)
    masked = jax.jit(masks_lib.masked_apply(mods.graph, apply_fn))
    x = jnp.asarray(images[:5])
    for c in range(3):
        expected = masked(variables, {k: jnp.asarray(v) for k, v in mods.mask(c).items()}, x)
        np.testing.assert_allclose(np.asarray(mods.apply(c)(x)), np.asarray(expected[:, c]),
                                   rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(np.asarray(mods.apply(c, all_logits=True)(x)),
                                   np.asarray(expected), rtol=1e-6, atol=1e-7)
    with pytest.raises(ModularizeError, match=r"no module of class 5; classes are \[0, 1, 2\]"):
        mods.mask(5)


def test_save_load_round_trip_is_exact(bn_model, bn_modules, tmp_path):
    apply_fn, variables, images, _ = bn_model
    path = bn_modules.save(tmp_path / "modules.npz")
    assert not list(tmp_path.glob(".*"))  # no temporary left behind
    loaded = Modules.load(path, trace(apply_fn, variables, images[:1]), apply_fn=apply_fn,
                          variables=variables)
    assert list(loaded.masks) == list(bn_modules.masks)
    for k in bn_modules.masks:
        np.testing.assert_array_equal(loaded.masks[k], bn_modules.masks[k])
        assert loaded.masks[k].dtype == bool
    np.testing.assert_array_equal(loaded.classes, bn_modules.classes)
    assert loaded.class_names == bn_modules.class_names
    assert json.dumps(list(loaded.stats)) == json.dumps(list(bn_modules.stats))
    assert json.dumps(list(loaded.history)) == json.dumps(list(bn_modules.history))
    assert loaded.info == json.loads(json.dumps(bn_modules.info))
    x = jnp.asarray(images[:4])
    np.testing.assert_array_equal(np.asarray(loaded.apply(1)(x)),
                                  np.asarray(bn_modules.apply(1)(x)))


def test_load_refuses_another_model_and_another_format_version(bn_model, bn_modules, tmp_path):
    apply_fn, variables, images, _ = bn_model
    path = bn_modules.save(tmp_path / "modules.npz")
    other = TinyBN(num_classes=4)
    other_vars = jax.jit(other.init)(jax.random.key(1), jnp.zeros((1, 8, 8, 1)))
    other_graph = trace(functools.partial(other.apply, train=False), other_vars, images[:1])
    with pytest.raises(ModulesFileError, match="another model") as err:
        Modules.load(path, other_graph)
    assert bn_modules.graph.fingerprint in str(err.value)
    assert other_graph.fingerprint in str(err.value)
    # other weights, same architecture
    moved = jax.tree_util.tree_map(lambda v: v + 1.0, variables)
    with pytest.raises(ModulesFileError, match="other weights"):
        Modules.load(path, bn_modules.graph, apply_fn=apply_fn, variables=moved)
    Modules.load(path, bn_modules.graph, apply_fn=apply_fn, variables=moved, check_params=False)
    # another format version
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files}
    header = json.loads(arrays[HEADER_KEY].tobytes().decode())
    header["format_version"] = FORMAT_VERSION + 98
    arrays[HEADER_KEY] = np.frombuffer(json.dumps(header).encode(), np.uint8)
    future = tmp_path / "future.npz"
    np.savez(future, **arrays)
    with pytest.raises(ModulesFileError,
                       match=f"format version {FORMAT_VERSION + 98}; this jaxsplit reads "
                             f"versions 1, 2"):
        Modules.load(future, bn_modules.graph)


def test_load_refuses_a_damaged_file_and_non_boolean_masks(bn_modules, tmp_path):
    path = bn_modules.save(tmp_path / "modules.npz")
    cut = tmp_path / "cut.npz"
    cut.write_bytes(path.read_bytes()[:200])  # a truncated copy (an interrupted transfer)
    with pytest.raises(ModulesFileError, match="cannot read modules file"):
        Modules.load(cut, bn_modules.graph)
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files}
    site = bn_modules.graph.names[0]
    key = next(k for k in arrays if k.endswith(site) and k != HEADER_KEY)
    bad = arrays[key].astype(np.int8)
    bad.flat[0] = 2
    edited = tmp_path / "edited.npz"
    np.savez(edited, **{**arrays, key: bad})
    with pytest.raises(ModulesFileError, match=rf"site '{site}' holds values \[2\]"):
        Modules.load(edited, bn_modules.graph)
    del arrays[key]
    np.savez(edited, **arrays)
    with pytest.raises(ModulesFileError, match=rf"no masks for sites \['{site}'\]"):
        Modules.load(edited, bn_modules.graph)
    assert path.read_bytes()  # the good file is untouched


@pytest.fixture(scope="module")
def simcnn_case():
    model = simcnn(3, 1, width=1 / 16)
    variables = {"params": random_params(model, 2)}
    rng = np.random.default_rng(2)
    images = rng.normal(size=(12, 32, 32, 1)).astype(np.float32)
    labels = (np.arange(12) % 3).astype(np.int32)
    return functools.partial(model.apply, train=False), variables, images, labels


def test_step_api_equals_modularize(bn_model, bn_modules):
    apply_fn, variables, images, labels = bn_model
    key = jax.random.key(7)  # as bn_modules
    state = modularize_init(key, apply_fn, variables, (images, labels), search=tiny_search(),
                            compile=False)
    assert state.generation == 0 and not state.done and state.num_steps == 3
    state, m0 = modularize_step(state, core.generation_key(key, 0))  # the default key, explicit
    assert m0["generation"] == 0
    while not state.done:
        state, metrics = modularize_step(state)
        assert metrics["generation"] == state.generation - 1
    with pytest.raises(ModularizeError, match="the search is done"):
        modularize_step(state)
    stepped = Modules.from_state(state)
    for k in bn_modules.masks:
        np.testing.assert_array_equal(stepped.masks[k], bn_modules.masks[k])
    strip = lambda h: [{k: v for k, v in e.items() if k != "time_s"} for e in h]
    assert strip(stepped.history) == strip(bn_modules.history)
    assert stepped.info == bn_modules.info


@pytest.mark.slow  # the default suite covers it: test_readme_example (modularize + extract of a
# model), the SimCNN generic-path search below, tests/test_extract_generic.py (extract == masked)
def test_modularize_a_tiny_simcnn_and_extract(simcnn_case):
    apply_fn, variables, images, labels = simcnn_case
    mods = jaxsplit.modularize(apply_fn, variables, (images, labels), search=tiny_search(seed=4),
                               key=jax.random.key(11), family="simcnn",
                               class_names=("a", "b", "c"))
    assert mods.graph.names == tuple(f"conv_{i}" for i in range(13))
    assert mods.class_names == ("a", "b", "c") and mods.info["family"] == "simcnn"
    assert all(0 < s["kept_fraction"] <= 1 for s in mods.stats)
    module_apply, module_vars = mods.extract(2)  # physically smaller, same logit
    x = jnp.asarray(images[:4])
    np.testing.assert_allclose(np.asarray(module_apply(module_vars, x)),
                               np.asarray(mods.apply(2)(x)), atol=1e-5, rtol=1e-5)
    kept = sum(int(v[2].sum()) for v in mods.masks.values())
    assert kept == mods.stats[2]["kept_kernels"] < mods.graph.total_kernels


def _sha(*arrays) -> str:
    h = hashlib.sha256()
    for a in arrays:
        h.update(np.ascontiguousarray(np.asarray(a)).tobytes())
    return h.hexdigest()[:16]


# Recorded on CPU (jax 0.10.2) with the code before the search took any traced model
# (`model.apply(..., masks=...)`, flax-sown activations); the generic path (jaxsplit.trace,
# masked_apply, importance read from the jaxpr) reproduced every value bit for bit before they
# were written here. ResCNN is compared with measure="activation", the old rule (its default is
# now "block_output", the reference's rule: tests/test_importance.py).
RECORDED = {
    "simcnn": {"importance": "eb6832d637d772c7", "n_conf": [0, 0, 3, 0],
               "masks0": "4d0f1fe7d4aecd20", "L0": "881adcfc9323b428",
               "best_bits": "3efebf8b054c9704", "history": "334abc9ecba0036d",
               "best_valid_fitness": 0.396294504404068},
    "rescnn": {"importance": "ad89800929ef9ef7", "n_conf": [1, 0, 0, 0],
               "masks0": "7d9cfba11062e9b0", "L0": "b1aedbf3c2bd35f0",
               "best_bits": "485a1586bc5acb33", "history": "d2d19ddcf556eac0",
               "best_valid_fitness": 0.5609341263771057},
}


def generic_path_digests(family: str) -> dict:
    """Digests of the importance, first population, fitness and search of `family`."""
    model, seed = (simcnn(4, 1, width=1 / 16), 0) if family == "simcnn" else \
        (rescnn(4, 1, width=1 / 16), 1)
    params = random_params(model, seed)
    rng = np.random.default_rng(seed)
    images = rng.normal(size=(24, 32, 32, 1)).astype(np.float32)
    labels = rng.integers(0, 4, 24).astype(np.int32)
    cfg = SearchConfig(population_size=6, num_generations=3, backend="reference",
                       min_kept_ensembles=5, max_kept_ensembles=20, seed=seed,
                       chunk_individuals=8, importance_confidence=0.3)
    state = modularize_init(jax.random.key(seed), functools.partial(model.apply, train=False),
                            {"params": params}, (images, labels), search=cfg, family=family,
                            measure="activation", compile=False)
    assert isinstance(state.graph, Graph)  # traced, not the ConvNet's own spec
    res = state.importance
    got = {"importance": _sha(*[res.importance[k] for k in sorted(res.importance)]),
           "n_conf": res.num_confident.tolist()}
    _, masks = jax.jit(lambda c: core.decode_population(state.problem, c))(state.carry)
    L = state.problem.evaluate_fn(state.variables, masks, state.data[0], state.data[2])
    got["masks0"], got["L0"] = _sha(*[masks[k] for k in sorted(masks)]), _sha(L)
    history = []
    while not state.done:
        state, m = modularize_step(state)
        history.append({k: v for k, v in m.items() if k not in ("generation", "time_s")})
    got["best_bits"] = _sha(state.carry.best_bits)
    got["history"] = hashlib.sha256(json.dumps(history).encode()).hexdigest()[:16]
    got["best_valid_fitness"] = float(state.carry.best_valid_fitness)
    return got


@pytest.fixture(scope="module")
def generic_path_runs() -> dict:
    """Both families' digests, with XLA's default optimization (the one RECORDED was made with).

    The suite compiles with less optimization (tests/conftest.py), which may change the last
    bits; then both families run in one subprocess with the default XLA flags.
    """
    return call_with_default_xla("test_modularize", "generic_path_digests_of", "simcnn", "rescnn")


def generic_path_digests_of(*families: str) -> dict:
    return {f: generic_path_digests(f) for f in families}


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="values recorded on CPU")
@pytest.mark.parametrize("family", ["simcnn", "rescnn"])
def test_convnet_through_the_generic_path_is_bit_identical(family, generic_path_runs):
    assert generic_path_runs[family] == RECORDED[family]


def test_bad_inputs_are_named(bn_model):
    apply_fn, variables, images, labels = bn_model
    with pytest.raises(ModularizeError, match="full variables dict"):
        modularize_init(None, apply_fn, variables["params"], (images, labels))
    with pytest.raises(ModularizeError, match=r"labels must lie in \[0, 3\)"):
        modularize_init(None, apply_fn, variables, (images, labels + 3))
    with pytest.raises(ModularizeError, match="data must be"):
        modularize_init(None, apply_fn, variables, images)
