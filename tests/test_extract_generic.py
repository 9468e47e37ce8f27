"""Generic extraction over a traced graph: extract == masked_apply == apply_masks, gather, stats."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_graph import convnet, inception_like, resnet_like

import jaxsplit
from jaxsplit import extract as E
from jaxsplit import masks as M
from jaxsplit.models import count_params, rescnn, simcnn

NUM_MASKS = 20

MODELS = {
    "simcnn": lambda: convnet(simcnn, 0.05),
    "rescnn": lambda: convnet(rescnn, 0.05),
    "resnet_like": resnet_like,
    "inception_like": inception_like,
}


def seeded_masks(graph, num=NUM_MASKS, profiles=1):
    """`num` random tied masks with `profiles` distinct kept-count profiles.

    A profile fixes how many kernels each free site keeps (one site keeps a
    single kernel, a different one per profile); mask s takes profile
    s % profiles and draws the kept positions at random. Few profiles mean
    few extracted module shapes, so few compiles.
    """
    free = graph.free_layers
    counts = []
    for p in range(profiles):
        rng = np.random.default_rng(1000 + p)
        c = {n: int(rng.integers(1, graph.layer(n).num_kernels + 1)) for n in free}
        c[free[(len(free) // 2 + p) % len(free)]] = 1
        counts.append(c)
    out = []
    for seed in range(num):
        rng = np.random.default_rng(seed)
        m = {}
        for n in free:
            k = graph.layer(n).num_kernels
            v = np.zeros(k, bool)
            v[rng.permutation(k)[: counts[seed % profiles][n]]] = True
            m[n] = v
        out.append(M.tie(m, graph))
    return out


PROFILES = {"simcnn": 1, "rescnn": 1, "resnet_like": 2, "inception_like": 3}


def stack(masks):
    return {n: jnp.asarray(np.stack([m[n] for m in masks])) for n in masks[0]}


_MASKED: dict = {}


def masked_outputs(name, graph, variables, masks, x):
    """`masked_apply` of the stacked masks (one compile per model, shared by the tests)."""
    if name not in _MASKED:
        fn = jax.jit(jax.vmap(jaxsplit.masked_apply(graph), (None, 0, None)))
        _MASKED[name] = fn(variables, stack(masks), x)
    return _MASKED[name]


@pytest.fixture(scope="module", params=sorted(MODELS))
def setup(request):
    model, variables, x = MODELS[request.param]()
    x = jax.random.normal(jax.random.key(3), x.shape)
    graph = jaxsplit.trace(model.apply, variables, x)
    return request.param, model, variables, x, graph


def test_extract_equals_masked_apply_and_apply_masks(setup):
    name, model, variables, x, graph = setup
    masks = seeded_masks(graph, profiles=PROFILES[name])
    for m in masks:
        M.validate(m, graph)
        assert any(int(v.sum()) == 1 for v in m.values())
    batched = stack(masks)
    masked = masked_outputs(name, graph, variables, masks, x)
    weighted = jax.jit(jax.vmap(lambda m: model.apply(jaxsplit.apply_masks(graph, variables, m),
                                                      x)))(batched)
    np.testing.assert_allclose(weighted, masked, atol=1e-5, rtol=1e-5)
    assert masked.shape == (NUM_MASKS, x.shape[0], 3)

    targets = [None if i % 2 == 0 else 1 for i in range(NUM_MASKS)]
    modules = [jaxsplit.extract(graph, variables, m, target_class=t) for m, t in zip(masks, targets)]
    fns = [fn for fn, _ in modules]
    shapes = {(i % PROFILES[name], t) for i, t in enumerate(targets)}
    assert len({id(fn) for fn in fns}) == len(shapes)  # one cached module_apply per shape
    small = [jax.jit(fn)(mv, x) for fn, mv in modules]
    for i, (m, t, (_, mv), out) in enumerate(zip(masks, targets, modules, small)):
        want = masked[i] if t is None else masked[i][:, t]
        assert out.shape == want.shape
        np.testing.assert_allclose(out, want, atol=1e-5, rtol=1e-5, err_msg=f"{name} mask {i}")
        stats = E.module_stats(graph, m, target_class=t)
        assert count_params(mv["params"]) == stats["params"], (name, i)
        assert count_params(mv) == stats["variables"]
        # only kept kernels: every site kernel has kept-count output channels
        for site in graph.sites:
            leaf = mv
            for k in site.kernel_path:
                leaf = leaf[k]
            assert leaf.shape[-1] == int(m[site.name].sum())
    if name in ("simcnn", "rescnn"):  # the classifier keeps one column with a target class
        _, mv = modules[1]
        last = sorted(variables["params"], key=lambda k: int(k.split("_")[1]))[-1]
        assert mv["params"][last]["kernel"].shape[-1] == 1


def test_gather_padded_buckets_under_vmap(setup):
    name, model, variables, x, graph = setup
    masks = seeded_masks(graph, profiles=PROFILES[name])
    buckets = {n: graph.layer(n).num_kernels for n in graph.free_layers}

    def padded(m):
        idx, val = {}, {}
        for n, b in buckets.items():
            kept = np.flatnonzero(m[n])
            idx[n] = np.concatenate([kept, np.zeros(b - kept.size, np.int64)]).astype(np.int32)
            val[n] = np.arange(b) < kept.size
        return idx, val

    pads = [padded(m) for m in masks]
    idx = {n: jnp.asarray(np.stack([p[0][n] for p in pads])) for n in buckets}
    val = {n: jnp.asarray(np.stack([p[1][n] for p in pads])) for n in buckets}

    def one(i, v):
        fn, mv = jaxsplit.gather(graph, variables, i, v)
        return fn(mv, x)

    got = jax.jit(jax.vmap(one))(idx, val)
    want = masked_outputs(name, graph, variables, masks, x)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


def test_module_stats_of_full_and_convnet_convention(setup):
    name, model, variables, x, graph = setup
    full = {n: np.ones(k, bool) for n, k in graph.num_kernels.items()}
    stats = E.module_stats(graph, full)
    assert stats["params_fraction"] == 1.0 and stats["macs_fraction"] == 1.0
    assert stats["params"] == count_params(variables["params"])
    assert stats["kept_kernels"] == stats["kernels"] == graph.total_kernels
    assert stats["macs"] >= sum(s.macs for s in graph.sites)
    m = seeded_masks(graph, 1)[0]
    small = E.module_stats(graph, m)
    assert 0 < small["macs_fraction"] < 1 and 0 < small["params_fraction"] < 1
    if name in ("simcnn", "rescnn"):  # same numbers as the ConvNet-only analytic stats
        ref = E.stats_from_mask(model, m)
        assert small["params"] == ref["params"] and small["macs"] == ref["macs"]
        assert stats["macs"] == ref["model_macs"]


def test_ties_are_never_broken():
    model, variables, x = resnet_like()
    graph = jaxsplit.trace(model.apply, variables, x)
    m = seeded_masks(graph, 1)[0]
    broken = dict(m)
    broken["block1/conv2"] = ~m["block1/conv2"] | (np.arange(6) == 0)
    with pytest.raises(M.MaskError, match="block0/conv2 and block1/conv2"):
        M.validate(broken, graph)
    with pytest.raises(M.MaskError, match="block0/conv2"):
        jaxsplit.extract(graph, variables, broken)
    fixed = M.tie(broken, graph)
    assert np.array_equal(fixed["block1/conv2"], m["block0/conv2"])
    assert np.array_equal(fixed["block0/proj"], m["block0/conv2"])
    M.validate(fixed, graph)
    # gather reads only the representative's indices, so tied sites cannot diverge
    k = graph.layer("block0/conv2").num_kernels
    idx = {n: jnp.arange(graph.layer(n).num_kernels) for n in graph.free_layers}
    val = {n: jnp.ones(graph.layer(n).num_kernels, bool) for n in graph.free_layers}
    _, mv = jaxsplit.gather(graph, variables, idx, val)
    assert mv["params"]["block1"]["conv2"]["kernel"].shape[-1] == k


def test_bad_inputs_are_named():
    model, variables, x = inception_like()
    graph = jaxsplit.trace(model.apply, variables, x)
    m = seeded_masks(graph, 1)[0]
    with pytest.raises(E.ExtractError, match="target_class 7"):
        jaxsplit.extract(graph, variables, m, target_class=7)
    with pytest.raises(M.MaskError, match="missing"):
        jaxsplit.extract(graph, variables, {k: v for k, v in m.items() if k != "mix"})
    empty = dict(m, mix=np.zeros(4, bool))
    with pytest.raises(M.MaskError, match="mix keeps no kernel"):
        jaxsplit.extract(graph, variables, empty)
    idx = {n: jnp.arange(2) for n in graph.free_layers if n != "side"}
    with pytest.raises(E.ExtractError, match="side"):
        jaxsplit.gather(graph, variables, idx, idx)


def test_small_maps_as_one_matmul_equal_the_convolution():
    """`gather(..., matmul_max_hw=h)` runs convs on maps of at most h x h as one dense matmul
    (the fast evaluator's CPU path): strides, SAME / VALID / explicit padding, 1x1 and 2x2
    kernels, a channels-first lax conv, BatchNorm and a residual add give the same numbers."""
    import flax.linen as nn
    from jax import lax

    class Small(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.relu(nn.Conv(6, (3, 3))(x))                              # 4x4, SAME
            x = nn.Conv(8, (3, 3), strides=2)(x)                             # 4x4 -> 2x2
            x = nn.relu(nn.BatchNorm(use_running_average=True)(x))
            x = nn.relu(x + nn.Conv(8, (3, 3), padding=((2, 0), (0, 2)))(x))  # explicit pads
            k = self.param("nchw", nn.initializers.lecun_normal(), (5, 8, 2, 2))  # OIHW
            x = lax.conv_general_dilated(x.transpose(0, 3, 1, 2), k, (1, 1), "VALID",
                                         dimension_numbers=("NCHW", "OIHW", "NCHW"))
            x = nn.relu(x.transpose(0, 2, 3, 1))                             # 2x2 -> 1x1
            x = nn.relu(nn.Conv(7, (1, 1))(x))
            return nn.Dense(3)(x.reshape(x.shape[0], -1))

    model = Small()
    x = jax.random.normal(jax.random.key(0), (5, 4, 4, 2))
    variables = model.init(jax.random.key(1), x)
    variables = jax.tree_util.tree_map(
        lambda v: v + 0.2 * jax.random.normal(jax.random.key(2), v.shape), variables)
    graph = jaxsplit.trace(model.apply, variables, x)
    rng = np.random.default_rng(3)
    indices, valid = {}, {}
    for n in graph.free_layers:
        k = graph.num_kernels[n]
        indices[n] = np.sort(rng.permutation(k)[:max(1, k - 2)]).astype(np.int32)
        valid[n] = rng.random(indices[n].shape[0]) < 0.7
        valid[n][0] = True
    for target in (None, 1):
        conv_fn, conv_vars = jaxsplit.extract.gather(graph, variables, indices, valid, target)
        mm_fn, mm_vars = jaxsplit.extract.gather(graph, variables, indices, valid, target,
                                                 matmul_max_hw=4)
        want = np.asarray(jax.jit(conv_fn)(conv_vars, x))
        assert np.abs(want).max() > 1e-2
        np.testing.assert_allclose(np.asarray(jax.jit(mm_fn)(mm_vars, x)), want,
                                   rtol=1e-5, atol=1e-5)


def test_single_output_stats_drop_the_other_classifier_columns():
    """`module_stats(..., target_class=c)` counts the module that outputs one logit: params and
    MACs of the classifier's other C - 1 columns are not counted, and equal what extraction keeps."""
    import flax.linen as nn

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.relu(nn.Conv(4, (3, 3))(x)).mean(axis=(1, 2))
            x = nn.relu(nn.Dense(6)(x))
            return nn.Dense(10)(x)

    model = Net()
    x = jnp.zeros((1, 8, 8, 1))
    variables = model.init(jax.random.key(0), x)
    graph = jaxsplit.trace(model.apply, variables, x)
    full = {n: np.ones(k, bool) for n, k in graph.num_kernels.items()}
    whole = jaxsplit.module_stats(graph, full)
    one = jaxsplit.module_stats(graph, full, target_class=3)
    assert whole["macs"] - one["macs"] == 9 * 6  # the other 9 columns of the 6 -> 10 classifier
    assert whole["params"] - one["params"] == 9 * 6 + 9  # and their biases
    _, module_vars = jaxsplit.extract(graph, variables, full, target_class=3)
    assert one["params"] == sum(np.size(v) for v in jax.tree_util.tree_leaves(
        module_vars["params"]))
