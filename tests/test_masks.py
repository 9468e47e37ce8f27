"""Tests of jaxsplit.masks: construction, validation, both masking forms, set algebra."""

from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxsplit import masks as M
from jaxsplit.models import random_params, rescnn, simcnn, weak_cnn

ARCHS = {
    "simcnn": lambda: simcnn(num_classes=10, in_channels=1, width=0.0625),
    "rescnn": lambda: rescnn(num_classes=10, in_channels=3, width=0.0625),
    "weak_cnn": lambda: weak_cnn(num_classes=6, in_channels=3, width=0.25, hidden=(16,)),
}


def _np(mask):
    return {k: np.asarray(v) for k, v in mask.items()}


def _rand(seed, spec, keep=0.5, batch_shape=()):
    """Random tied masks from numpy, each layer keeping >= 1 kernel (no jax PRNG compiles)."""
    rng = np.random.default_rng(seed)
    out = {}
    for name in spec.free_layers:
        k = spec.layer(name).num_kernels
        m = rng.random((*batch_shape, k)) < keep
        forced = rng.integers(k, size=batch_shape)
        out[name] = m | (np.arange(k) == np.asarray(forced)[..., None])
    return M.tie(out, spec)


# -- construction ----------------------------------------------------------------------------------


def test_full_and_random_shapes_ties_and_never_empty():
    spec = rescnn(width=0.125).conv_spec()
    full = M.full(spec, (2, 3))
    assert all(v.shape == (2, 3, spec.layer(k).num_kernels) and v.dtype == jnp.bool_ and bool(v.all())
               for k, v in full.items())
    random_fn = jax.jit(lambda key, keep: M.random(key, spec, keep, (4, 6)))
    for seed in range(5):
        for keep in (0.0, 0.3, 1.0):
            m = _np(random_fn(jax.random.key(seed), keep))
            M.validate(m, spec, (4, 6))  # never empty, ties equal
            for k, v in m.items():
                assert v.shape == (4, 6, spec.layer(k).num_kernels) and v.dtype == bool
            if keep == 0.0:  # exactly the one forced kernel per layer
                assert all((v.sum(-1) == 1).all() for v in m.values())
            if keep == 1.0:
                assert all(v.all() for v in m.values())
    a, b, c = (_np(random_fn(jax.random.key(s), 0.5)) for s in (0, 0, 1))
    assert all(np.array_equal(a[k], b[k]) for k in spec.names)
    assert any(not np.array_equal(a[k], c[k]) for k in spec.names)
    # the keep rate is respected (keep_prob is traced: one compile for every rate above)
    rate = float(np.mean(M.kept_fraction(_np(random_fn(jax.random.key(9), 0.3)))))
    assert abs(rate - 0.3) < 0.03


def test_tie_copies_the_representative():
    spec = rescnn(width=0.125).conv_spec()
    m = _rand(0, spec)
    for group in spec.ties:
        for name in group[1:]:
            m[name] = ~m[group[0]]
    with pytest.raises(M.MaskError, match="residual tie"):
        M.validate(m, spec)
    tied = M.tie(m, spec)
    M.validate(tied, spec)
    for a, b in spec.ties:
        np.testing.assert_array_equal(tied[b], m[a])


# -- validation ------------------------------------------------------------------------------------


def test_validate_names_the_bad_layer():
    spec = rescnn(width=0.125).conv_spec()
    good = _np(M.full(spec))
    k = {n: spec.layer(n).num_kernels for n in spec.names}

    def with_(**changes):
        out = dict(good)
        for name, v in changes.items():
            if v is None:
                del out[name]
            else:
                out[name] = v
        return out

    cases = [
        (with_(conv_5=None), r"missing \['conv_5'\]"),
        (dict(good, conv_99=np.ones(3, bool)), r"unexpected \['conv_99'\]"),
        (with_(conv_2=np.ones(k["conv_2"] - 1, bool)), rf"conv_2 has shape \({k['conv_2'] - 1},\).*{k['conv_2']}"),
        (with_(conv_2=np.ones(k["conv_2"], np.int8)), "conv_2 has dtype int8; expected bool"),
        (with_(conv_2=np.ones(k["conv_2"], np.float32)), "conv_2 has dtype float32"),
        (with_(conv_2=[True] * k["conv_2"]), "conv_2 has dtype list"),
        (with_(conv_6=np.zeros(k["conv_6"], bool)), "conv_6 keeps no kernel"),
        (with_(conv_3=np.r_[False, np.ones(k["conv_3"] - 1, bool)]), "conv_1 and conv_3 differ"),
        (with_(conv_4=np.ones((2, k["conv_4"]), bool)), r"conv_4 has batch shape \(2,\)"),
        ([1, 2], "a mask is a dict"),
    ]
    for mask, match in cases:
        with pytest.raises(M.MaskError, match=match):
            M.validate(mask, spec)
    batched = _np(M.full(spec, (3,)))
    batched["conv_0"] = batched["conv_0"].copy()
    batched["conv_0"][2] = False
    with pytest.raises(M.MaskError, match=r"conv_0 keeps no kernel \(batch index \(2,\)\)"):
        M.validate(batched, spec)
    with pytest.raises(M.MaskError, match=r"batch shape \(3,\); expected \(4,\)"):
        M.validate(M.full(spec, (3,)), spec, batch_shape=(4,))
    M.validate(batched, spec, check_values=False)  # structure only

    @jax.jit
    def traced(m):  # values are not checked on tracers; structure still is
        M.validate(m, spec)
        return M.count(m)

    assert int(traced(with_(conv_6=np.zeros(k["conv_6"], bool)))) == spec.total_kernels - k["conv_6"]
    with pytest.raises(M.MaskError, match="conv_2 has dtype"):
        traced(with_(conv_2=np.ones(k["conv_2"], np.int32)))


# -- the two masking forms -------------------------------------------------------------------------


@pytest.mark.parametrize("arch", list(ARCHS))
def test_weight_masking_equals_activation_masking_over_a_population(arch):
    model = ARCHS[arch]()
    spec = model.conv_spec()
    params = random_params(model, 0)
    x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 32, 32, model.in_channels)), jnp.float32)
    pop = _rand(3, spec, np.linspace(0.05, 0.95, 64)[:, None], (64,))

    def by_activation(m):
        return model.apply({"params": params}, x, masks=m)

    def by_weights(m):
        return model.apply({"params": M.apply_to_params(params, m, spec)}, x)

    act = jax.jit(jax.vmap(by_activation))(pop)
    wts = jax.jit(jax.vmap(by_weights))(pop)
    assert act.shape == wts.shape == (64, 2, model.num_classes)
    assert float(jnp.abs(act - wts).max()) <= 1e-5 * max(1.0, float(jnp.abs(act).max()))
    assert float(jnp.std(act[:, 0, 0])) > 1e-3  # the masks change the outputs
    # a batched mask gives params with a leading population axis on the conv leaves only
    batched = M.apply_to_params(params, pop, spec)
    assert batched["conv_0"]["kernel"].shape == (64, *params["conv_0"]["kernel"].shape)
    last_fc = max(n for n in params if n.startswith("fc_"))
    assert batched[last_fc]["kernel"].shape == params[last_fc]["kernel"].shape
    # one individual, unbatched, both forms, and the {"params": ...} wrapping
    one = {k: v[7] for k, v in pop.items()}
    wrapped = M.apply_to_params({"params": params}, one, spec)
    np.testing.assert_allclose(np.asarray(model.apply(wrapped, x)), np.asarray(act[7]), atol=1e-5)
    # the all-ones mask changes nothing
    ident = M.apply_to_params(params, M.full(spec), spec)
    for a, b in zip(jax.tree_util.tree_leaves(ident), jax.tree_util.tree_leaves(params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_apply_to_params_rejects_bad_inputs():
    model = ARCHS["weak_cnn"]()
    spec = model.conv_spec()
    params = random_params(model, 0)
    with pytest.raises(M.MaskError, match="params have no layer conv_1"):
        M.apply_to_params({k: v for k, v in params.items() if k != "conv_1"}, M.full(spec), spec)
    with pytest.raises(M.MaskError, match="conv_2 has shape"):
        M.apply_to_params(params, dict(M.full(spec), conv_2=jnp.ones(3, bool)), spec)


# -- counting and set algebra ----------------------------------------------------------------------


def test_counts_and_set_algebra_with_batch_axes_and_under_jit_vmap():
    spec = rescnn(width=0.125).conv_spec()
    a = _rand(0, spec, 0.4, (3, 5))  # (C, P, K_l)
    b = _rand(1, spec, 0.6, (3, 5))
    fa, fb = np.concatenate([a[n] for n in spec.names], -1), np.concatenate([b[n] for n in spec.names], -1)

    def stats(x, y):
        return {"count": M.count(x), "per_layer": M.count_per_layer(x), "kept": M.kept_fraction(x),
                "inter": M.count(M.intersection(x, y)), "union": M.count(M.union(x, y)),
                "jac": M.jaccard(x, y), "jac_yx": M.jaccard(y, x), "jac_xx": M.jaccard(x, x)}

    # batched arrays (C, P, K_l) directly, and a double vmap over (C, P): same numbers
    for got in (jax.jit(stats)(a, b), jax.jit(jax.vmap(jax.vmap(stats)))(a, b)):
        got = jax.tree_util.tree_map(np.asarray, got)
        np.testing.assert_array_equal(got["count"], fa.sum(-1))
        for n in spec.names:
            np.testing.assert_array_equal(got["per_layer"][n], a[n].sum(-1))
        np.testing.assert_allclose(got["kept"], fa.mean(-1), rtol=1e-6)
        np.testing.assert_array_equal(got["inter"], (fa & fb).sum(-1))
        np.testing.assert_array_equal(got["union"], (fa | fb).sum(-1))
        np.testing.assert_allclose(got["jac"], (fa & fb).sum(-1) / (fa | fb).sum(-1), rtol=1e-6)
        assert got["jac"].shape == (3, 5) and np.all((0 <= got["jac"]) & (got["jac"] <= 1))
        np.testing.assert_allclose(got["jac_yx"], got["jac"], rtol=1e-6)
        np.testing.assert_allclose(got["jac_xx"], 1.0)

    empty = {k: np.zeros_like(v[0, 0]) for k, v in a.items()}
    one = {k: v[0, 0] for k, v in a.items()}
    edge = jax.jit(lambda e, o: (M.jaccard(e, e), M.jaccard(o, e)))(empty, one)
    assert float(edge[0]) == 1.0 and float(edge[1]) == 0.0
    # broadcasting: all pairs of class 0's and class 1's individuals -> (P, P)
    pairs = jax.jit(M.jaccard)({k: v[0][:, None] for k, v in a.items()},
                               {k: v[1][None] for k, v in a.items()})
    assert pairs.shape == (5, 5)
    np.testing.assert_allclose(pairs, (fa[0][:, None] & fa[1][None]).sum(-1)
                               / (fa[0][:, None] | fa[1][None]).sum(-1), rtol=1e-6)
    with pytest.raises(M.MaskError, match="different layers"):
        M.union(a, {k: v for k, v in b.items() if k != "conv_0"})


def test_flatten_unflatten_and_indices_round_trip():
    spec = rescnn(width=0.125).conv_spec()
    for seed in range(5):
        m = _rand(seed, spec, 0.5, (2, 3))
        flat = M.flatten(m, spec)
        assert flat.shape == (2, 3, spec.total_kernels)
        back = M.unflatten(flat, spec)
        assert list(back) == list(spec.names)
        for n in spec.names:
            np.testing.assert_array_equal(np.asarray(back[n]), m[n])
        np.testing.assert_array_equal(M.count(m), np.asarray(flat).sum(-1))
        one = {k: v[1, 2] for k, v in m.items()}
        idx = M.to_indices(one)
        for n in spec.names:
            np.testing.assert_array_equal(idx[n], np.flatnonzero(one[n]))
        again = M.from_indices(idx, spec)
        for n in spec.names:
            np.testing.assert_array_equal(np.asarray(again[n]), one[n])
    jitted = jax.jit(lambda f: M.unflatten(f, spec))(flat)
    np.testing.assert_array_equal(np.asarray(jitted["conv_11"]), m["conv_11"])
    with pytest.raises(Exception, match=str(spec.total_kernels)):
        M.unflatten(flat[..., 1:], spec)
    with pytest.raises(M.MaskError, match="to_indices takes one mask"):
        M.to_indices(m)
    with pytest.raises(M.MaskError, match=r"indices of conv_0 must lie in \[0, 8\)"):
        M.from_indices(dict(idx, conv_0=np.array([0, 8])), spec)
    with pytest.raises(M.MaskError, match="no indices for layer conv_3"):
        M.from_indices({k: v for k, v in idx.items() if k != "conv_3"}, spec)


# -- masks over a traced kernel graph ----------------------------------------------

@pytest.mark.parametrize("arch", ["simcnn", "rescnn"])
def test_masked_apply_over_graph_equals_convnet_masks_bit_for_bit(arch):
    import jaxsplit

    model = ARCHS[arch]()
    params = random_params(model, 0)
    x = jax.random.normal(jax.random.key(0), model.dummy_input(3).shape)
    graph = jaxsplit.trace(model.apply, {"params": params}, x)
    assert graph.names == model.conv_spec().names and graph.ties == model.conv_spec().ties
    masks = _rand(1, graph, batch_shape=(4,))
    masks = {k: jnp.asarray(v) for k, v in masks.items()}
    fn = jax.jit(jaxsplit.masked_apply(graph))
    ref = jax.jit(lambda p, m, xx: model.apply({"params": p}, xx, masks=m))
    for i in range(4):  # one compile each, masks are arguments
        one = {k: v[i] for k, v in masks.items()}
        assert np.array_equal(np.asarray(fn({"params": params}, one, x)),
                              np.asarray(ref(params, one, x)))
    # vmapped over masks (XLA may fuse the batched programs differently: float rounding)
    got = jax.jit(jax.vmap(jaxsplit.masked_apply(graph), (None, 0, None)))(
        {"params": params}, masks, x)
    want = jax.jit(jax.vmap(lambda m: model.apply({"params": params}, x, masks=m)))(masks)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    # weight masking over the graph equals the ConvNet weight masking
    one = {k: v[0] for k, v in masks.items()}
    a = M.apply_masks(graph, {"params": params}, one)["params"]
    b = M.apply_to_params(params, one, model.conv_spec())
    for name in graph.names:
        np.testing.assert_array_equal(a[name]["bias"], b[name]["bias"])
    np.testing.assert_array_equal(
        jax.jit(model.apply)({"params": a}, x),
        jax.jit(lambda p: model.apply({"params": p}, x, masks=one))(params))
    assert M.apply_to_params(params, one, graph).keys() == params.keys()


def test_graph_masks_validate_and_refuse():
    import jaxsplit

    model = ARCHS["rescnn"]()
    params = random_params(model, 0)
    graph = jaxsplit.trace(model.apply, {"params": params}, model.dummy_input(1))
    mask = M.full(graph)
    M.validate(mask, graph, batch_shape=())
    broken = dict(mask, conv_3=mask["conv_3"].at[0].set(False))
    with pytest.raises(M.MaskError, match="conv_1 and conv_3"):
        M.validate(broken, graph)
    with pytest.raises(M.MaskError, match="missing"):
        jaxsplit.masked_apply(graph)({"params": params}, {"conv_0": mask["conv_0"]},
                                     model.dummy_input(1))
    with pytest.raises(M.MaskError, match="conv_0"):
        jaxsplit.apply_masks(graph, {"params": {k: v for k, v in params.items()}},
                             dict(mask, conv_0=mask["conv_0"][:-1]))
