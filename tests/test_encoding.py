"""Gene encoding, decoding, repair and the heuristic initial population (search.encoding)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxsplit import masks as masks_lib
from jaxsplit.models.convnet import rescnn, simcnn, weak_cnn
from jaxsplit.search import encoding as E


def random_importance(spec, num_classes, seed=0):
    rng = np.random.default_rng(seed)
    return {l.name: rng.random((num_classes, l.num_kernels)).astype(np.float32) for l in spec.layers}


@pytest.fixture(scope="module")
def small():
    """A 3-class ResCNN at 1/16 width: ties, layers of 4..32 kernels (fewer than 10 groups)."""
    spec = rescnn(num_classes=3, width=1 / 16).conv_spec()
    imp = random_importance(spec, 3)
    return spec, imp, E.build_encoding(spec, imp)


def test_simcnn_has_940_genes_and_rescnn_630():
    spec = simcnn().conv_spec()
    assert E.expected_genes(spec) == 940
    enc = E.build_encoding(spec, random_importance(spec, 2))
    assert enc.num_genes == 940
    assert enc.num_groups == (10,) * 4 + (100,) * 9
    spec_r = rescnn().conv_spec()
    enc_r = E.build_encoding(spec_r, random_importance(spec_r, 2))
    assert enc_r.num_genes == 630
    # the reference's genome order: a tie group's genes sit at its later layer
    assert enc_r.layers == ("conv_0", "conv_2", "conv_1", "conv_4", "conv_6", "conv_5",
                            "conv_8", "conv_10", "conv_9")


def test_groups_follow_array_split_of_the_importance_order(small):
    spec, imp, enc = small
    tied = {n: imp[n] + imp["conv_3"] if n == "conv_1" else imp[n] for n in enc.layers}
    tied["conv_5"] = imp["conv_5"] + imp["conv_7"]
    tied["conv_9"] = imp["conv_9"] + imp["conv_11"]
    for name, n in zip(enc.layers, enc.num_groups):
        k = spec.layer(name).num_kernels
        assert n == min(10 if k < 256 else 100, k)
        groups = np.asarray(enc.groups[name])
        for c in range(3):
            order = np.argsort(-tied[name][c], kind="stable")
            expected = np.concatenate([np.full(len(p), g)
                                       for g, p in enumerate(np.array_split(np.arange(k), n))])
            np.testing.assert_array_equal(groups[c][order], expected)


def test_fewer_kernels_than_groups_uses_one_group_per_kernel():
    spec = weak_cnn(num_classes=2, widths=(4, 12)).conv_spec()
    enc = E.build_encoding(spec, random_importance(spec, 2))
    assert enc.num_groups == (4, 10)
    assert E.groups_for(4) == 4 and E.groups_for(300) == 100 and E.groups_for(255) == 10


def test_decode_encode_round_trips(small):
    spec, _, enc = small
    for seed in range(20):
        genes = jax.random.bernoulli(jax.random.key(seed), 0.5, (3, 5, enc.num_genes))
        masks = E.decode(enc, genes)
        masks_lib.validate(masks, spec, batch_shape=(3, 5), check_values=False)
        np.testing.assert_array_equal(E.encode(enc, masks), genes)
        # decoded masks are unions of whole groups, so they round-trip too
        again = E.decode(enc, E.encode(enc, masks))
        for name in spec.names:
            np.testing.assert_array_equal(again[name], masks[name])


def test_all_ones_is_the_full_model_and_ties_share_genes(small):
    spec, _, enc = small
    full = E.decode(enc, jnp.ones((3, 2, enc.num_genes), bool))
    for name in spec.names:
        assert bool(full[name].all())
    genes = jax.random.bernoulli(jax.random.key(3), 0.5, (3, 4, enc.num_genes))
    masks = E.decode(enc, genes)
    for group in spec.ties:
        for member in group[1:]:
            np.testing.assert_array_equal(masks[member], masks[group[0]])


def test_partially_kept_group_encodes_as_off(small):
    spec, _, enc = small
    masks = E.decode(enc, jnp.ones((3, 1, enc.num_genes), bool))
    name = "conv_4"  # 16 kernels in 10 groups: group 0 has 2 kernels
    first_group = np.flatnonzero(np.asarray(enc.groups[name][0]) == 0)
    assert len(first_group) == 2
    m = np.asarray(masks[name]).copy()
    m[0, 0, first_group[0]] = False
    genes = np.asarray(E.encode(enc, {**masks, name: jnp.asarray(m)}))
    sl = enc.layer_slice(name)
    assert not genes[0, 0, sl][0] and genes[0, 0, sl][1:].all()
    assert genes[1:].all()


def test_decode_is_jittable_and_vmappable(small):
    _, _, enc = small
    genes = jax.random.bernoulli(jax.random.key(0), 0.5, (3, 4, enc.num_genes))
    eager = E.decode(enc, genes)
    jitted = jax.jit(E.decode)(enc, genes)
    vmapped = jax.vmap(lambda g: E.decode(enc, g), in_axes=1, out_axes=1)(genes[:, :, None])
    for name in eager:
        np.testing.assert_array_equal(jitted[name], eager[name])
        np.testing.assert_array_equal(vmapped[name][:, :, 0], eager[name])


def test_repair_forces_the_most_important_group(small):
    spec, _, enc = small
    genes = np.array(jax.random.bernoulli(jax.random.key(1), 0.5, (3, 6, enc.num_genes)))
    sl = enc.layer_slice("conv_2")
    genes[0, 0, sl] = False
    fixed = np.asarray(E.repair(enc, jnp.asarray(genes)))
    assert fixed[0, 0, sl][0] and not fixed[0, 0, sl][1:].any()
    counts = np.asarray(E.layer_counts(enc, fixed))
    assert (counts >= 1).all()
    changed = fixed != genes
    assert changed.sum() == np.sum(np.asarray(E.layer_counts(enc, jnp.asarray(genes))) == 0)
    as_float = E.repair(enc, jnp.asarray(genes, jnp.float32))
    assert as_float.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(as_float) > 0.5, fixed)
    # kernel-0 fallback of the reference at decoding time
    masks = E.decode(enc, jnp.asarray(genes), empty="kernel0")
    m = np.asarray(masks["conv_2"][0, 0])
    assert m[0] and m.sum() == 1


def test_init_population_respects_ratios_and_never_empties(small):
    spec, _, enc = small
    sensitive = (0, 1)  # conv_0 and the tie group of conv_1/conv_3
    ratios_s, ratios_o = (0.6, 0.7, 0.8), (0.05, 0.2, 0.4)
    pop = E.init_population(jax.random.key(0), enc, 64, sensitive, ratios_s, ratios_o)
    assert pop.shape == (3, 64, enc.num_genes) and pop.dtype == jnp.bool_
    counts = np.asarray(E.layer_counts(enc, pop))
    sens = E.sensitive_free_layers(enc, sensitive)
    assert sens == ("conv_0", "conv_1")
    for i, (name, n) in enumerate(zip(enc.layers, enc.num_groups)):
        ratios = ratios_s if name in sens else ratios_o
        allowed = {max(1, int(np.floor(n * r + 1e-9))) for r in ratios}
        assert set(np.unique(counts[..., i])) <= allowed, name
        assert counts[..., i].min() >= 1
    # the important groups are favoured: group 0 is on more often than the last group
    big = E.init_population(jax.random.key(1), enc, 400, (), (0.5,), (0.5,))
    sl = enc.layer_slice("conv_6")  # 32 kernels, 10 groups
    freq = np.asarray(big)[..., sl].mean(axis=(0, 1))
    assert freq[0] > freq[-1] + 0.05
    assert np.all(np.diff(freq[[0, 4, 9]]) < 0)


def test_reference_settings_and_ratio_floor():
    assert E.reference_init_settings("simcnn")["sensitive"] == tuple(range(7))
    assert E.reference_init_settings("rescnn")["ratios_other"] == (0.2, 0.3, 0.4)
    assert E.reference_init_settings("weak_cnn")["sensitive"] == ()
    spec = simcnn(num_classes=2).conv_spec()
    enc = E.build_encoding(spec, random_importance(spec, 2))
    pop = E.init_population(jax.random.key(0), enc, 30, tuple(range(7)), (0.7,), (0.3,))
    counts = np.asarray(E.layer_counts(enc, pop))
    # int(10 * 0.7) = 7 and int(100 * 0.3) = 30 exactly, as the reference
    assert set(np.unique(counts[..., :4])) == {7}
    assert set(np.unique(counts[..., 4:7])) == {70}
    assert set(np.unique(counts[..., 7:])) == {30}


def test_bad_inputs_raise(small):
    spec, imp, enc = small
    with pytest.raises(E.EncodingError, match="expected"):
        E.decode(enc, jnp.ones((2, 4, enc.num_genes), bool))
    with pytest.raises(E.EncodingError, match="ratios_other"):
        E.init_population(jax.random.key(0), enc, 4, (), (0.5,), (0.0,))
    with pytest.raises(E.EncodingError, match="population_size"):
        E.init_population(jax.random.key(0), enc, 0, (), (0.5,), (0.5,))
    with pytest.raises(E.EncodingError, match="out of range"):
        E.sensitive_free_layers(enc, (99,))
    with pytest.raises(E.EncodingError, match="permutations"):
        E.encoding_from_ranks(spec, {n: np.zeros((3, spec.layer(n).num_kernels), int)
                                     for n in spec.free_layers})
    with pytest.raises(E.EncodingError, match="empty"):
        E.decode(enc, jnp.ones((3, 1, enc.num_genes), bool), empty="bogus")
