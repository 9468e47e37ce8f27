"""The "fast" evaluator backend on jaxsplit's ConvNets (traced, `fast_evaluate.make_fast_evaluator`):
exact vs the reference, buckets, rows independent of the call, the row cache, the config."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxsplit import importance as imp_lib
from jaxsplit import masks as M
from jaxsplit.models.convnet import ConvLayerDef, ConvNet, random_params, simcnn, weak_cnn
from jaxsplit.search import driver as D
from jaxsplit.search import evaluate as E
from jaxsplit.search import fast_evaluate as FE
from jaxsplit.search import fast_graph as FG
from jaxsplit.search.config import SearchConfig

C, P, N = 3, 4, 21  # chunk sizes 5 (individuals) and 8 (images) divide neither C·P nor N


def tiny_residual() -> ConvNet:
    """Two tie groups: conv_3 adds conv_1 ("conv" on 4x4 maps), conv_6 adds conv_5 ("dense" on
    1x1 maps); maps 8x8 -> 4x4 -> 2x2 ("dense") -> 1x1."""
    return ConvNet(convs=(ConvLayerDef(12), ConvLayerDef(24, pool=True), ConvLayerDef(16),
                          ConvLayerDef(24, residual_from=1), ConvLayerDef(20, pool=True),
                          ConvLayerDef(18, pool=True), ConvLayerDef(18, residual_from=5)),
                   hidden=(16,), head_dropout=(0.0, 0.0), num_classes=5, in_channels=2,
                   image_size=8)


MODELS = {
    # widths >= 16 so that layers have several bucket sizes (step 8) and padded slots
    "simcnn": lambda: simcnn(num_classes=10, in_channels=3, width=0.125),  # 2x2 maps: "dense"
    "weak": lambda: weak_cnn(num_classes=6, in_channels=1, width=0.25, image_size=28),  # 7x7, 3x3
    "residual": tiny_residual,
}


def random_masks(model: ConvNet, keep: float, seed: int, batch=(C, P)) -> dict:
    """Masks `(*batch, K)`: each kernel kept with probability `keep`, at least one per layer,
    ties copied (numpy: `masks.random` under jit would compile per model)."""
    rng = np.random.default_rng(seed)
    out = {}
    for layer in model.conv_spec().layers:
        m = rng.random((*batch, layer.num_kernels)) < keep
        forced = rng.integers(0, layer.num_kernels, batch)
        np.put_along_axis(m, forced[..., None], True, axis=-1)
        out[layer.name] = m
    return {k: jnp.asarray(v) for k, v in M.tie(out, model.conv_spec()).items()}


@pytest.fixture(scope="module")
def cases():
    out = {}
    for i, (name, make) in enumerate(MODELS.items()):
        model = make()
        spec = model.conv_spec()
        params = random_params(model, i)
        images = jax.random.normal(jax.random.key(100 + i), (N, *spec.image_shape))
        classes = jnp.asarray(np.arange(C) % model.num_classes, jnp.int32)[::-1]
        out[name] = (model, params, images, classes)
    return out


def reference_L(model, params, masks, images, classes) -> np.ndarray:
    evaluate_fn = E.make_evaluator(model, "reference", chunk_individuals=6, chunk_images=32)
    return np.asarray(evaluate_fn({"params": params}, masks, images, classes))


def assert_close(L, ref):
    scale = max(1.0, float(np.abs(ref).max()))
    np.testing.assert_allclose(np.asarray(L), ref, rtol=0, atol=1e-4 * scale)


@pytest.mark.parametrize("share", [False, True, None])
@pytest.mark.parametrize("name", list(MODELS))
def test_matches_the_reference_backend(cases, name, share):
    model, params, images, classes = cases[name]
    spec = model.conv_spec()
    masks = random_masks(model, 0.5, 7)
    # row 0: all kernels kept; row 1, individual 0: one kernel per layer; the rest random
    one = random_masks(model, 0.0, 8, (1,))
    masks = {n: masks[n].at[0].set(True).at[1, 0].set(one[n][0]) for n in spec.names}
    ref = reference_L(model, params, masks, images, classes)
    assert np.abs(ref).max() > 0.1  # a non-trivial table
    fast = FE.make_fast_evaluator(model, chunk_individuals=5, chunk_images=8,
                                  share_first_conv=share)
    assert isinstance(fast, FG.GraphFastEvaluator) and fast.share_first is share
    L = fast({"params": params}, masks, images, classes)
    assert L.shape == (C, P, N) and L.dtype == jnp.float32
    assert_close(L, ref)
    if name == "residual":  # inside an outer jit: the traced fallback (the reference's)
        assert_close(jax.jit(fast)({"params": params}, masks, images, classes), ref)


def test_chunking_and_buckets_do_not_change_values(cases):
    model, params, images, classes = cases["weak"]
    masks = random_masks(model, 0.4, 3)
    ref = reference_L(model, params, masks, images, classes)
    tables = []
    for chunk_individuals, chunk_images, num_buckets, num_workers in ((1, 21, 1, 1),
                                                                     (12, 5, 64, 3),
                                                                     (5, 8, 32, 1), (5, 8, 32, 2)):
        fast = FE.make_fast_evaluator(model, chunk_individuals=chunk_individuals,
                                      chunk_images=chunk_images, num_buckets=num_buckets,
                                      num_workers=num_workers)
        tables.append(np.asarray(fast({"params": params}, masks, images, classes)))
        assert_close(tables[-1], ref)
    np.testing.assert_array_equal(tables[2], tables[3])  # threads do not change a bit


def test_new_params_are_used(cases):
    """The padded params are cached per params object; other params give their own table."""
    model, params, images, classes = cases["residual"]
    masks = random_masks(model, 0.6, 9)
    fast = FE.make_fast_evaluator(model)
    assert_close(fast({"params": params}, masks, images, classes), reference_L(model, params, masks, images,
                                                                  classes))
    other = random_params(model, 99)
    assert_close(fast({"params": other}, masks, images, classes), reference_L(model, other, masks, images,
                                                                 classes))


def test_untied_and_empty_layers_follow_the_reference(cases):
    """Masks the search never makes: a layer that keeps no kernel (all zeros) gives the
    reference's numbers; tied layers whose masks differ follow the group's first (its
    representative), as `jaxsplit.masked_apply` does."""
    import jaxsplit

    model, params, images, classes = cases["residual"]
    masks = random_masks(model, 0.5, 4)
    masks["conv_2"] = masks["conv_2"].at[2, 1].set(False)
    ref = reference_L(model, params, masks, images, classes)
    fast = FE.make_fast_evaluator(model, chunk_individuals=5, chunk_images=8)
    assert_close(fast({"params": params}, masks, images, classes), ref)
    untied = dict(masks)
    untied["conv_3"] = jnp.asarray(np.random.default_rng(5).random((C, P, 24)) < 0.5)
    graph = fast.graph
    want = E.ReferenceEvaluator(graph, jaxsplit.masked_apply(graph))(
        {"params": params}, untied, images, classes)
    assert_close(fast({"params": params}, untied, images, classes), np.asarray(want))
    assert_close(want, ref)  # conv_3 follows conv_1, whose mask is unchanged


def test_bucket_size_boundaries():
    assert FE.bucket_step(512, 32) == 16
    assert FE.bucket_step(64, 32) == 8  # ceil(64 / 32) = 2, aligned to 8
    assert FE.bucket_step(6, 32) == 6  # never more than K: one size, the full layer
    sizes = FE.bucket_size(np.array([0, 1, 15, 16, 17, 32, 33, 500, 511, 512]), 512, 32)
    assert sizes.tolist() == [16, 16, 16, 16, 32, 32, 48, 512, 512, 512]
    assert FE.bucket_size(np.array([1, 8, 9, 10]), 10, 2).tolist() == [8, 8, 10, 10]
    assert FE.bucket_size(np.array([1, 5, 6]), 6, 32).tolist() == [6, 6, 6]
    for k in (3, 16, 64, 100, 512):
        for nb in (1, 4, 32, 1000):
            counts = np.arange(k + 1)
            sizes = FE.bucket_size(counts, k, nb)
            assert np.all(sizes >= np.maximum(counts, 1)) and np.all(sizes <= k)
            assert len(np.unique(sizes)) <= nb


def test_rows_do_not_depend_on_the_other_modules(cases):
    """Bit for bit: a module's row is the same whatever its position, its group's other
    members, or the call's other rows (what makes the row cache sound)."""
    for name in ("weak", "residual"):
        model, params, images, classes = cases[name]
        masks = random_masks(model, 0.5, 11)
        for share in (False, True, None):
            fast = FE.make_fast_evaluator(model, chunk_individuals=3, chunk_images=8,
                                          share_first_conv=share, cache_bytes=0)
            base = np.asarray(fast({"params": params}, masks, images, classes))
            perm = np.random.default_rng(1).permutation(P)
            shuffled = np.asarray(fast({"params": params}, {k: v[:, perm] for k, v in masks.items()},
                                       images, classes))
            np.testing.assert_array_equal(shuffled[:, np.argsort(perm)], base)
            alone = np.asarray(fast({"params": params}, {k: v[1:2, 2:3] for k, v in masks.items()}, images,
                                    classes[1:2]))
            np.testing.assert_array_equal(alone[0, 0], base[1, 2])


def test_row_cache_reuses_repeated_modules(cases):
    model, params, images, classes = cases["residual"]
    masks = random_masks(model, 0.5, 12)
    fast = FE.make_fast_evaluator(model, chunk_individuals=5, chunk_images=8)
    plain = FE.make_fast_evaluator(model, chunk_individuals=5, chunk_images=8, cache_bytes=0)
    first = np.asarray(fast({"params": params}, masks, images, classes))
    assert fast.cache_stats == {"misses": C * P, "hits": 0}
    # the next "generation": two rows kept, one duplicated inside the call, the rest new
    new = random_masks(model, 0.5, 13)
    nxt = {k: new[k].at[:, 0].set(masks[k][:, 2]).at[:, 1].set(masks[k][:, 3])
           .at[:, 3].set(new[k][:, 2]) for k in masks}
    second = np.asarray(fast({"params": params}, nxt, images, classes))
    # rows run: one per class (column 2; column 3 is its copy); the other three are reused
    assert fast.cache_stats["hits"] == 3 * C and fast.cache_stats["misses"] == C * P + C
    np.testing.assert_array_equal(second, np.asarray(plain({"params": params}, nxt, images, classes)))
    np.testing.assert_array_equal(second[:, :2], first[:, 2:4])
    assert plain.cache_stats["hits"] == 0
    # other params (or other images): nothing reused
    other = random_params(model, 98)
    assert_close(fast({"params": other}, nxt, images, classes), reference_L(model, other, nxt, images, classes))
    assert fast.cache_stats["hits"] == 4 * C  # only the copy inside the call
    # the same class with the same mask but another class row is another module
    swapped = np.asarray(fast({"params": other}, nxt, images, classes[::-1]))
    assert_close(swapped, reference_L(model, other, nxt, images, classes[::-1]))


def test_bad_inputs_raise(cases):
    model, params, images, classes = cases["residual"]
    masks = random_masks(model, 0.5, 0)
    fast = E.make_evaluator(model, "fast", chunk_individuals=4, chunk_images=5)
    with pytest.raises(E.EvaluatorInputError, match=r"\(C, P, 12\)"):
        fast({"params": params}, {k: v[0] for k, v in masks.items()}, images, classes)
    with pytest.raises(E.EvaluatorInputError, match=r"classes.*\(2,\).*\(3,\)"):
        fast({"params": params}, masks, images, classes[:2])
    with pytest.raises(E.EvaluatorInputError, match=r"images.*\(N, 8, 8, 2\)"):
        fast({"params": params}, masks, images[..., :1], classes)
    with pytest.raises(E.EvaluatorInputError, match=r"\[0, 1, 7\].*\[0, 5\)"):
        fast({"params": params}, masks, images, jnp.array([0, 1, 7], jnp.int32))
    for bad in ({"chunk_images": 0}, {"chunk_individuals": 1.5}, {"num_buckets": 0},
                {"num_workers": 0}, {"cache_bytes": -1}):
        with pytest.raises(E.EvaluatorInputError, match=next(iter(bad))):
            FE.make_fast_evaluator(model, **bad)
    with pytest.raises(E.EvaluatorInputError, match="share_first must be None, True or False"):
        FE.make_fast_evaluator(model, share_first_conv="yes")


def test_backend_selection_and_config(cases):
    model = cases["residual"][0]
    fast = E.make_evaluator(model, "fast", chunk_individuals=3, chunk_images=7)
    assert isinstance(fast, FG.GraphFastEvaluator) and fast.host_side
    assert (fast.chunk_individuals, fast.chunk_images) == (3, 7)
    assert 1 <= fast.num_workers == FE.default_num_workers() <= FE.MAX_WORKERS
    assert E.default_backend("cpu") == "fast" and E.default_backend("gpu") == "device"
    if jax.default_backend() == "cpu":
        assert isinstance(E.make_evaluator(model, "auto"), FG.GraphFastEvaluator)
    cfg = SearchConfig(backend="fast", chunk_individuals=2, chunk_images=9, shard=False)
    from_cfg = E.make_evaluator_from_config(model, cfg)
    assert isinstance(from_cfg, FG.GraphFastEvaluator) and from_cfg.chunk_images == 9
    assert from_cfg.cache_bytes == 256 * 2**20 and from_cfg.share_first is None  # the defaults
    tuned = E.make_evaluator_from_config(model, SearchConfig(
        backend="fast", shard=False, share_first_conv=False, eval_cache_mib=0))
    assert tuned.cache_bytes == 0 and tuned.share_first is False
    reference = E.make_evaluator_from_config(model, SearchConfig(backend="reference", shard=False,
                                                                 eval_cache_mib=0))
    assert isinstance(reference, E.ReferenceEvaluator)
    # the small-map rule: convs on maps of at most 2x2 run as one matmul, larger ones as convs
    assert FE.DENSE_MAX_HW == 2 and fast.matmul_max_hw == FE.DENSE_MAX_HW
    from jaxsplit import segments as S

    segs = S.segment(fast.graph, (4, *fast.graph.input_shape), jnp.float32,
                     matmul_max_hw=fast.matmul_max_hw)
    params = random_params(model, 0)
    small = set()
    for k, seg in enumerate(segs.segments):
        site = fast.graph.sites[k]  # segment k starts at site k's conv
        gathered = tuple(jax.tree_util.tree_leaves({"params": params})[i] for i in seg.leaves)
        live = tuple(jnp.zeros(segs.infos[v].shape) for v in seg.live_in)
        jaxpr = jax.make_jaxpr(lambda g, l: S._run_fn(segs, k)(((), False), g, {}, l))(
            gathered, live)
        convs = sum(e.primitive.name == "conv_general_dilated" for e in jaxpr.jaxpr.eqns)
        assert convs == (0 if max(site.input_hw) <= 2 else 1), (site.name, site.input_hw)
        small |= {site.input_hw} if convs == 0 else set()
    assert small == {(2, 2), (1, 1)}  # both kinds were seen


def test_search_step_with_the_fast_backend(cases, tmp_path):
    """The driver runs the fast evaluator outside its jit; the generation loop resumes from a
    checkpoint bit-identically."""
    model, params, _, _ = cases["weak"]
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.normal(size=(24, 28, 28, 1)).astype(np.float32))
    labels = jnp.asarray(np.arange(24) % model.num_classes, jnp.int32)
    classes = jnp.arange(model.num_classes, dtype=jnp.int32)
    importance = imp_lib.kernel_importance(model, params, images, labels).importance
    cfg = SearchConfig(population_size=4, num_generations=3, backend="fast", chunk_images=16,
                       min_kept_ensembles=3, max_kept_ensembles=10, seed=1, shard=False)
    problem, settings = D.build_problem(model, "weak_cnn", importance, cfg)
    assert isinstance(problem.evaluate_fn, FG.GraphFastEvaluator)
    base = jax.random.key(cfg.seed)
    k_init, k_pop = jax.random.split(base)
    bits = D.initial_population(k_pop, problem, cfg.population_size, settings)
    step = D.make_step(problem)
    assert isinstance(step, D.HostEvaluatedStep)
    compiled = D.compile_step(step, D.init_carry(k_init, problem, bits), D.generation_key(base, 0),
                              {"params": params}, images, labels, classes)
    carry, metrics = D.init_carry(k_init, problem, bits), []
    for g in range(3):
        carry, m = compiled(D._strong(carry), D.generation_key(base, g), {"params": params}, images, labels,
                            classes)
        metrics.append(D._to_host(m))
        if g == 0:
            path = D.save_search_checkpoint(tmp_path, 1, carry, base, {"fingerprint": {}})
    # generations 1 and 2 reused rows (kept parents, hall of fame) from the row cache ...
    assert problem.evaluate_fn.cache_stats["hits"] >= 2 * model.num_classes
    template = jax.eval_shape(lambda: D.init_carry(k_init, problem, bits))
    resumed, _ = D.load_search_checkpoint(path, template, base, {})
    problem.evaluate_fn._cache.clear()  # ... which a resumed run starts without
    for g in range(1, 3):
        resumed, m = step(D._strong(resumed), D.generation_key(base, g), {"params": params}, images, labels,
                          classes)
        assert D._to_host(m) == metrics[g]
    for a, b in zip(jax.tree_util.tree_leaves(carry), jax.tree_util.tree_leaves(resumed)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
