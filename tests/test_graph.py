"""The kernel graph traced from the jaxpr: sites, ties, carriers, consumers, refusals."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxsplit
from jaxsplit import graph as G
from jaxsplit import masks as M
from jaxsplit.models import random_params, rescnn, simcnn


# -- models defined only here ---------------------------------------------------

class _Block(nn.Module):
    features: int
    strides: int = 1

    @nn.compact
    def __call__(self, x):
        bn = functools.partial(nn.BatchNorm, use_running_average=True)
        h = nn.Conv(self.features, (3, 3), (self.strides, self.strides), use_bias=False,
                    name="conv1")(x)
        h = nn.relu(bn(name="bn1")(h))
        h = nn.Conv(self.features, (3, 3), use_bias=False, name="conv2")(h)
        h = bn(name="bn2")(h)
        if x.shape[-1] != self.features or self.strides != 1:
            x = nn.Conv(self.features, (1, 1), (self.strides, self.strides), use_bias=False,
                        name="proj")(x)
            x = bn(name="proj_bn")(x)
        return nn.relu(h + x)


class ResNetLike(nn.Module):
    """Stem conv + BN, a strided stage with a 1x1 projection and an identity block, GAP, Dense."""

    num_classes: int = 3

    @nn.compact
    def __call__(self, x):
        h = nn.Conv(4, (3, 3), name="stem")(x)
        h = nn.gelu(nn.BatchNorm(use_running_average=True, name="stem_bn")(h))  # gelu(0) = 0 but
        h = _Block(6, strides=2, name="block0")(h)  # BN shifts make removal need consumer zeroing
        h = _Block(6, name="block1")(h)
        h = jnp.mean(h, axis=(1, 2))
        return nn.Dense(self.num_classes, name="head")(h)


class InceptionLike(nn.Module):
    """A conv, an Inception block (1x1 and 3x3 branches concatenated), a conv, flatten -> Dense."""

    num_classes: int = 3

    @nn.compact
    def __call__(self, x):
        h = nn.elu(nn.Conv(4, (3, 3), name="stem")(x))  # elu: f(x) != 0 for x < 0
        a = nn.relu(nn.Conv(3, (1, 1), name="branch1x1")(h))
        b = nn.sigmoid(nn.Conv(5, (3, 3), name="branch3x3")(h))  # sigmoid(0) = 0.5
        h = jnp.concatenate([a, b], axis=-1)
        h = nn.max_pool(h, (2, 2), (2, 2))
        h = nn.relu(nn.Conv(4, (3, 3), name="mix")(h))
        c = nn.relu(nn.Conv(2, (1, 1), name="side")(h))
        h = jnp.concatenate([h, c], axis=-1)
        h = h.reshape((h.shape[0], -1))
        h = nn.relu(nn.Dense(7, name="fc1")(h))
        return nn.Dense(self.num_classes, name="fc2")(h)


def random_variables(model: nn.Module, x: jax.Array, seed: int) -> dict:
    """Random weights and non-trivial BatchNorm statistics of `model`'s shapes."""
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), x))
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name = str(path[-1].key)
        if name == "var":
            return jnp.asarray(rng.uniform(0.5, 2.0, leaf.shape).astype(np.float32))
        if name == "scale":
            return jnp.asarray(rng.uniform(0.5, 1.5, leaf.shape).astype(np.float32))
        std = np.sqrt(2.0 / np.prod(leaf.shape[:-1])) if len(leaf.shape) > 1 else 0.3
        return jnp.asarray(rng.normal(0.0, std, leaf.shape).astype(np.float32))

    return jax.tree_util.tree_map_with_path(draw, shapes)


def resnet_like():
    model = ResNetLike()
    x = jax.random.normal(jax.random.key(1), (3, 8, 8, 3))
    return model, random_variables(model, x, 0), x


def inception_like():
    model = InceptionLike()
    x = jax.random.normal(jax.random.key(2), (3, 8, 8, 1))
    return model, random_variables(model, x, 1), x


def convnet(family, width):
    model = family(num_classes=3, in_channels=1, width=width, image_size=32)
    return model, {"params": random_params(model, 0)}, model.dummy_input(2)


# -- tests -------------------------------------------------------------------------

def test_convnet_sites_equal_conv_spec():
    for family in (simcnn, rescnn):
        model, variables, x = convnet(family, 0.05)
        graph = jaxsplit.trace(model.apply, variables, x)
        spec = model.conv_spec()
        assert graph.names == spec.names
        assert graph.ties == spec.ties
        assert graph.num_kernels == spec.num_kernels
        assert graph.free_layers == spec.free_layers
        assert graph.num_outputs == 3 and graph.input_shape == (32, 32, 1)
        for site, layer in zip(graph.sites, spec.layers):
            assert site.in_channels == layer.in_channels
            assert site.kernel_size == (3, 3)
            assert site.kernel_path == ("params", layer.name, "kernel")
            group = next((g for g in spec.ties if layer.name in g), (layer.name,))
            assert set(site.carriers) == {(("params", n, "bias"), 0) for n in group}
        # the last conv's channels are read by the first Dense's rows (NHWC flatten)
        last = graph.sites[-1]
        fc = [c for c in last.consumers if c.kind == "dense"]
        assert len(fc) == 1 and fc[0].axis == 0 and fc[0].path[-1] == "kernel"
        # masks functions take the graph in place of the ConvSpec
        m = M.tie({n: np.random.default_rng(0).random((4, k)) < 0.5
                   for n, k in graph.num_kernels.items()}, graph)
        m = {n: v | (np.arange(v.shape[-1]) == 0) for n, v in m.items()}
        M.validate(m, graph)
        flat = M.flatten(m, graph)
        assert flat.shape == (4, graph.total_kernels)
        assert all(np.array_equal(M.unflatten(flat, graph)[n], m[n]) for n in m)


def test_resnet_like_ties_carriers_consumers():
    model, variables, x = resnet_like()
    graph = jaxsplit.trace(model.apply, variables, x)
    assert graph.names == ("stem", "block0/conv1", "block0/conv2", "block0/proj",
                           "block1/conv1", "block1/conv2")
    # the whole identity-shortcut stage and its projection conv are one tie group
    assert graph.ties == (("block0/conv2", "block0/proj", "block1/conv2"),)
    assert graph.free_layers == ("stem", "block0/conv1", "block0/conv2", "block1/conv1")
    assert graph.representative("block1/conv2") == "block0/conv2"
    stem = graph.layer("stem")
    assert set(stem.carriers) == {(("params", "stem", "bias"), 0),
                                  (("params", "stem_bn", "scale"), 0),
                                  (("params", "stem_bn", "bias"), 0),
                                  (("batch_stats", "stem_bn", "mean"), 0),
                                  (("batch_stats", "stem_bn", "var"), 0)}
    assert {c.path for c in stem.consumers} == {("params", "block0", "conv1", "kernel"),
                                                ("params", "block0", "proj", "kernel")}
    b0 = graph.layer("block0/conv1")
    assert b0.input_hw == (8, 8) and b0.output_hw == (4, 4) and b0.macs == 16 * 9 * 4 * 6
    proj = graph.layer("block0/proj")
    assert proj.kernel_size == (1, 1) and proj.tie == "block0/conv2"
    tied = graph.layer("block1/conv2")
    assert (("params", "head", "kernel"), 0) in {(c.path, c.axis) for c in tied.consumers}
    assert (("batch_stats", "block1", "bn2", "var"), 0) in tied.carriers
    text = graph.summary()
    for name in graph.names:
        assert name in text
    assert len(graph.fingerprint) == 16


def test_inception_concat_offsets_and_flatten():
    model, variables, x = inception_like()
    graph = jaxsplit.trace(model.apply, variables, x)
    assert graph.names == ("stem", "branch1x1", "branch3x3", "mix", "side")
    assert graph.ties == ()
    (mix_in,) = graph.layer("branch3x3").consumers
    assert mix_in.path == ("params", "mix", "kernel") and mix_in.axis == 2
    assert mix_in.offset == 3 and mix_in.layout == "cat(branch1x1[3], branch3x3[5])"
    (fc,) = graph.layer("side").consumers
    assert fc.path == ("params", "fc1", "kernel") and fc.kind == "dense"
    assert fc.offset == 4 and fc.layout == "16xcat(mix[4], side[2])"
    text = graph.summary()
    assert all(n in text for n in graph.names)


def test_fingerprint_is_structural():
    model, variables, x = inception_like()
    a = jaxsplit.trace(model.apply, variables, x)
    b = jaxsplit.trace(model.apply, random_variables(model, x, 7), x[:1])
    assert a.fingerprint == b.fingerprint
    c = jaxsplit.trace(model.apply, random_variables(model, x[..., :1], 7), x)
    assert c.fingerprint == a.fingerprint
    model2, v2, x2 = resnet_like()
    assert jaxsplit.trace(model2.apply, v2, x2).fingerprint != a.fingerprint


def test_terminal_convs_are_not_sites():
    class FullyConv(nn.Module):
        @nn.compact
        def __call__(self, x):
            h = nn.relu(nn.Conv(4, (3, 3), name="body")(x))
            h = nn.Conv(3, (1, 1), name="classifier")(h)
            return jnp.mean(h, axis=(1, 2))

    model = FullyConv()
    x = jnp.ones((2, 6, 6, 1))
    variables = random_variables(model, x, 0)
    graph = jaxsplit.trace(model.apply, variables, x)
    assert graph.names == ("body",)


class _LayerNormNet(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.Conv(4, (3, 3), name="conv")(x)
        h = nn.LayerNorm(name="norm")(h)
        return nn.Dense(2, name="fc")(jnp.mean(h, axis=(1, 2)))


class _SliceNet(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.Conv(4, (3, 3), name="conv")(x)
        h = h[..., :2]
        return nn.Dense(2, name="fc")(jnp.mean(h, axis=(1, 2)))


class _GroupedNet(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.Conv(4, (3, 3), name="conv")(x)
        h = nn.Conv(4, (3, 3), feature_group_count=2, name="grouped")(h)
        return nn.Dense(2, name="fc")(jnp.mean(h, axis=(1, 2)))


class _PartialAddNet(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.Conv(3, (3, 3), name="conv")(x) + x
        return nn.Dense(2, name="fc")(jnp.mean(h, axis=(1, 2)))


@pytest.mark.parametrize("model, words", [
    (_LayerNormNet(), ("reduce_sum", "norm", "conv")),
    (_SliceNet(), ("slice", "channel axis", "conv")),
    (_GroupedNet(), ("conv_general_dilated", "feature_group_count=2", "grouped")),
    (_PartialAddNet(), ("add", "unlabelled activation", "conv")),
])
def test_unsupported_models_are_refused_naming_op_and_path(model, words):
    x = jnp.ones((2, 6, 6, 3))
    variables = random_variables(model, x, 0)
    with pytest.raises(G.GraphError) as err:
        jaxsplit.trace(model.apply, variables, x)
    for w in words:
        assert w in str(err.value), (w, str(err.value))


def test_depthwise_multiplier_one_is_a_carrier():
    class Depthwise(nn.Module):
        @nn.compact
        def __call__(self, x):
            h = nn.relu(nn.Conv(4, (3, 3), name="conv")(x))
            h = nn.Conv(4, (3, 3), feature_group_count=4, name="dw")(h)
            h = nn.relu(nn.Conv(5, (1, 1), name="pw")(h))
            return nn.Dense(2, name="fc")(jnp.mean(h, axis=(1, 2)))

    model = Depthwise()
    x = jax.random.normal(jax.random.key(0), (2, 6, 6, 3))
    variables = random_variables(model, x, 0)
    graph = jaxsplit.trace(model.apply, variables, x)
    assert graph.names == ("conv", "pw")
    assert (("params", "dw", "kernel"), 3) in graph.layer("conv").carriers
    assert (("params", "dw", "bias"), 0) in graph.layer("conv").carriers
    mask = {"conv": jnp.array([True, False, True, False]), "pw": jnp.ones(5, bool)}
    want = jax.jit(M.masked_apply(graph))(variables, mask, x)
    fn, mv = jaxsplit.extract(graph, variables, mask)
    assert mv["params"]["dw"]["kernel"].shape == (3, 3, 1, 2)
    np.testing.assert_allclose(jax.jit(fn)(mv, x), want, atol=1e-5)


def test_other_batch_sizes_and_jit():
    model, variables, x = resnet_like()
    graph = jaxsplit.trace(model.apply, variables, x)
    fn = jax.jit(M.masked_apply(graph))
    full = M.full(graph)
    ref = jax.jit(model.apply)
    for n in (5,):
        xx = jax.random.normal(jax.random.key(n), (n, 8, 8, 3))
        np.testing.assert_allclose(fn(variables, full, xx), ref(variables, xx), atol=1e-5)


def test_channel_first_flatten_and_shared_conv():
    class NCHWHead(nn.Module):
        @nn.compact
        def __call__(self, x):
            conv = nn.Conv(3, (3, 3), name="shared")
            h = nn.relu(conv(nn.relu(nn.Conv(3, (3, 3), name="first")(x))))
            h = nn.tanh(conv(h))  # the same kernel applied twice: one site, tied to itself
            h = jnp.transpose(h, (0, 3, 1, 2)).reshape((h.shape[0], -1))  # NCHW flatten
            return nn.Dense(2, name="fc")(h)

    model = NCHWHead()
    x = jax.random.normal(jax.random.key(0), (2, 4, 4, 1))
    variables = random_variables(model, x, 0)
    graph = jaxsplit.trace(model.apply, variables, x)
    assert graph.names == ("first", "shared")
    assert graph.ties == (("first", "shared"),)  # shared's input and output channels are one axis
    (fc,) = [c for c in graph.layer("shared").consumers if c.kind == "dense"]
    assert fc.layout == "first[3]x16"
    mask = {"first": jnp.array([False, True, True]), "shared": jnp.array([False, True, True])}
    fn, mv = jaxsplit.extract(graph, variables, mask)
    assert mv["params"]["fc"]["kernel"].shape == (32, 2)
    np.testing.assert_allclose(jax.jit(fn)(mv, x),
                               jax.jit(M.masked_apply(graph))(variables, mask, x), atol=1e-5)


def test_encoding_takes_a_graph():
    from jaxsplit.search import encoding as enc_lib

    model, variables, x = resnet_like()
    graph = jaxsplit.trace(model.apply, variables, x)
    rng = np.random.default_rng(0)
    importance = {n: rng.random((3, graph.layer(n).num_kernels)) for n in graph.names}
    enc = enc_lib.build_encoding(graph, importance)
    genes = jnp.asarray(rng.random((3, enc.num_genes)) < 0.5)
    mask = enc_lib.decode(enc, genes, empty="none")
    assert set(mask) == set(graph.names)
    assert np.array_equal(mask["block1/conv2"], mask["block0/conv2"])
    assert np.array_equal(enc_lib.encode(enc, mask), genes)


@jax.custom_vjp
def _leaky(x):
    return jnp.where(x > 0, x, 0.1 * x)


_leaky.defvjp(lambda x: (_leaky(x), x), lambda x, g: (jnp.where(x > 0, g, 0.1 * g),))


def test_sub_jaxprs_remat_custom_vjp_and_jit():
    class Wrapped(nn.Module):
        @nn.compact
        def __call__(self, x):
            h = _leaky(nn.Conv(4, (3, 3), name="a")(x))  # custom_vjp_call
            h = nn.remat(nn.Conv)(5, (3, 3), name="b")(h)  # remat2
            h = jax.jit(lambda v: jnp.tanh(v) + 0.5)(h)  # jit, f(0) != 0
            return nn.Dense(2, name="fc")(jnp.max(h, axis=(1, 2)))

    model = Wrapped()
    x = jax.random.normal(jax.random.key(0), (2, 5, 5, 2))
    variables = random_variables(model, x, 0)
    graph = jaxsplit.trace(model.apply, variables, x)
    assert graph.names == ("a", "b")
    mask = {"a": jnp.array([True, False, False, True]), "b": jnp.array([0, 1, 1, 0, 1], bool)}
    want = jax.jit(M.masked_apply(graph))(variables, mask, x)
    fn, mv = jaxsplit.extract(graph, variables, mask)
    np.testing.assert_allclose(jax.jit(fn)(mv, x), want, atol=1e-5)
    weighted = jax.jit(model.apply)(jaxsplit.apply_masks(graph, variables, mask), x)
    np.testing.assert_allclose(weighted, want, atol=1e-5)
