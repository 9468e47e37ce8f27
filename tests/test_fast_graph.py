"""The generic "fast" evaluator (search.fast_graph): any traced model, exact vs the reference."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_extract_generic import seeded_masks
from test_graph import convnet, inception_like, random_variables, resnet_like

import jaxsplit
from jaxsplit.models import inference_apply, rescnn, resnet20, simcnn
from jaxsplit.search import evaluate as E
from jaxsplit.search import fast_evaluate as FE
from jaxsplit.search import fast_graph as FG
from jaxsplit.search.config import SearchConfig

C, P, N = 2, 3, 7  # chunk_images=4 pads the last image chunk


def zoo_resnet():
    """resnet20 of the BatchNorm zoo (projection shortcuts: tie groups) at width 0.25 (4-8-16
    kernels) on 8x8 images, with random running statistics."""
    model = resnet20(num_classes=4, in_channels=1, width=0.25, image_size=8)
    x = model.dummy_input(2)
    return inference_apply(model), random_variables(model, x, 2), x


def _traced(make):
    model, variables, x = make()
    return model.apply, variables, x


MODELS = {
    "simcnn": lambda: _traced(lambda: convnet(simcnn, 0.05)),
    "rescnn": lambda: _traced(lambda: convnet(rescnn, 0.05)),
    "resnet": zoo_resnet,
    "inception_like": lambda: _traced(inception_like),  # concats, flatten -> Dense
    "resnet_like": lambda: _traced(resnet_like),  # BatchNorm, gelu; only for the cache test
}


@pytest.fixture(scope="module")
def cases():
    """`{name: (graph, variables, masks (C, P, K), images, classes, reference L)}`, lazily."""
    cache = {}

    def get(name):
        if name not in cache:
            apply_fn, variables, x = MODELS[name]()
            # traced at the image-chunk size (4) that the evaluators run: one analysis per model
            graph = jaxsplit.trace(apply_fn, variables, jnp.zeros((4, *x.shape[1:]), x.dtype))
            # seeded random tied masks; in each, one site keeps a single kernel
            rows = seeded_masks(graph, C * P, profiles=2)
            masks = {n: jnp.asarray(np.stack([r[n] for r in rows]).reshape(C, P, -1))
                     for n in graph.names}
            images = jax.random.normal(jax.random.key(5), (N, *graph.input_shape))
            classes = jnp.asarray([graph.num_outputs - 1, 0], jnp.int32)
            ref = E.ReferenceEvaluator(graph, jaxsplit.masked_apply(graph), chunk_individuals=4,
                                       chunk_images=4)(variables, masks, images, classes)
            cache[name] = (graph, variables, masks, images, classes, np.asarray(ref))
        return cache[name]

    return get


def assert_close(L, ref):
    scale = max(1.0, float(np.abs(ref).max()))
    np.testing.assert_allclose(np.asarray(L), ref, rtol=0, atol=1e-4 * scale)


@pytest.mark.parametrize("name", ["simcnn", "rescnn", "resnet", "inception_like"])
def test_matches_the_reference_backend(cases, name):
    graph, variables, masks, images, classes, ref = cases(name)
    assert np.abs(ref).max() > 0.05  # a non-trivial table
    for n in graph.free_layers:  # a site keeping one kernel, tie groups equal
        assert (np.asarray(masks[n]).sum(-1) >= 1).all()
    assert any((np.asarray(masks[n]).sum(-1) == 1).any() for n in graph.free_layers)
    for group in graph.ties:
        for other in group[1:]:
            np.testing.assert_array_equal(masks[other], masks[group[0]])
    evaluate_fn = E.make_evaluator(graph, "fast", chunk_images=4, num_buckets=3, cache_bytes=0)
    assert isinstance(evaluate_fn, FG.GraphFastEvaluator) and evaluate_fn.host_side
    assert evaluate_fn.num_buckets == 3
    L = evaluate_fn(variables, masks, images, classes)
    assert L.shape == (C, P, N) and L.dtype == jnp.float32
    assert_close(L, ref)
    flat = {n: np.asarray(v).reshape(C * P, -1) for n, v in masks.items()}
    plan = FG.plan_rows(graph, flat, evaluate_fn.num_buckets)
    # padded channels were run: some row's bucket holds more than its kept count
    assert any((plan.sizes[n] > plan.counts[n]).any() for n in graph.free_layers)
    assert all((plan.sizes[n] >= plan.counts[n]).all() for n in graph.free_layers)


def test_bucket_padding_is_exact(cases):
    """Padding to any bucket gives the numbers of the unpadded extracted modules; so do the
    small-map matmul and the shared prefixes, which are on and off here."""
    graph, variables, masks, images, classes, ref = cases("inception_like")
    whole = FG.GraphFastEvaluator(graph, chunk_images=4, num_buckets=1, cache_bytes=0,
                                  matmul_max_hw=0, prefix_bytes=0)  # every site at full width
    L_full = np.asarray(whole(variables, masks, images, classes))
    fine = np.asarray(FG.GraphFastEvaluator(graph, chunk_images=8, num_buckets=64, cache_bytes=0,
                                            matmul_max_hw=8)(variables, masks, images, classes))
    for c in range(C):
        for i in range(P):
            mask = {n: np.asarray(v[c, i]) for n, v in masks.items()}
            fn, mv = jaxsplit.extract(graph, variables, mask, target_class=int(classes[c]))
            exact = np.asarray(fn(mv, images))
            np.testing.assert_allclose(L_full[c, i], exact, rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(fine[c, i], exact, rtol=1e-5, atol=1e-5)
    assert_close(L_full, ref)


def test_plan_rows():
    class Wide:  # the duck API plan_rows reads
        free_layers = ("a", "b")
        num_kernels = {"a": 64, "b": 20}

    masks = {"a": np.zeros((3, 64), bool), "b": np.zeros((3, 20), bool)}
    masks["a"][0, [5, 1]] = True   # counts (2, 9)
    masks["b"][0, :9] = True
    masks["a"][1, :33] = True      # counts (33, 1)
    masks["b"][1, 19] = True
    masks["a"][2] = True           # counts (64, 20): the full model
    masks["b"][2] = True
    plan = FG.plan_rows(Wide, masks, num_buckets=8)
    # a: step 8; b: ceil(20 / 8) = 3 -> 8-aligned step 8, at most 20
    np.testing.assert_array_equal(plan.sizes["a"], [8, 40, 64])
    np.testing.assert_array_equal(plan.sizes["b"], [16, 8, 20])
    np.testing.assert_array_equal(plan.indices["a"][0, :2], [1, 5])  # kept ascending first
    assert plan.indices["b"][1, 0] == 19 and plan.counts["b"].tolist() == [9, 1, 20]


def test_segments_compile_per_site_not_per_module():
    """One segment per site; a segment's compiled shapes follow only its own groups' buckets,
    so modules that differ in one site's bucket recompile only the segments touching it."""
    from jaxsplit import segments as S

    model, variables, x = convnet(simcnn, 0.05)
    graph = jaxsplit.trace(model.apply, variables, jnp.zeros((4, *x.shape[1:]), x.dtype))
    segs = S.segment(graph, (4, *x.shape[1:]), x.dtype)
    assert len(segs.segments) == len(graph.names)  # one per conv site
    gid = graph.group_of(segs.plan)
    first, last = segs.segments[0], segs.segments[-1]
    assert first.groups == (gid[graph.names[0]],)  # image channels are not a group
    assert set(last.groups) == {gid[graph.names[-2]], gid[graph.names[-1]], S.CLASS_GID}
    evaluate_fn = FG.GraphFastEvaluator(graph, chunk_images=4, cache_bytes=0, num_workers=1,
                                        prefix_bytes=0)
    images = jax.random.normal(jax.random.key(0), (4, *graph.input_shape))
    base = {n: np.ones((1, 1, k), bool) for n, k in graph.num_kernels.items()}
    evaluate_fn(variables, base, images, jnp.asarray([0]))
    before = evaluate_fn.num_compiles
    assert before == len(graph.names)
    narrow = dict(base)
    k = graph.num_kernels[graph.names[5]]
    narrow[graph.names[5]] = np.arange(k)[None, None] < 1  # one bucket smaller at site 5 only
    L = np.asarray(evaluate_fn(variables, narrow, images, jnp.asarray([0])))
    assert evaluate_fn.num_compiles - before == 2  # segment 5 (its output) and 6 (its input)
    ref = E.ReferenceEvaluator(graph, jaxsplit.masked_apply(graph))(
        variables, {n: jnp.asarray(v) for n, v in narrow.items()}, images, jnp.asarray([0]))
    assert_close(L, np.asarray(ref))


def test_rows_share_the_segments_they_compute_alike(cases):
    """Rows that keep the same kernels in the first sites (a GA's sensitive layers) compute
    those segments once per call; the numbers equal the unshared ones and the reference's."""
    graph, variables, masks, images, classes, ref = cases("resnet")
    first = graph.free_layers[0]
    same = {n: np.asarray(v).copy() for n, v in masks.items()}
    same[first][:] = True  # every row keeps the whole first site (and its tied sites)
    for group in graph.ties:
        for n in group[1:]:
            same[n] = same[group[0]]
    # from the images (share_first=False: no full-width first segment, which would cover depth 0)
    shared = FG.GraphFastEvaluator(graph, chunk_images=4, cache_bytes=0, share_first=False)
    alone = FG.GraphFastEvaluator(graph, chunk_images=4, cache_bytes=0, prefix_bytes=0)
    segs_rows = []
    orig = FG.shared_prefixes

    def spy(*args, **kwargs):
        out = orig(*args, **kwargs)
        segs_rows.append(out)
        return out

    FG.shared_prefixes = spy
    try:
        L_shared = np.asarray(shared(variables, same, images, classes))
    finally:
        FG.shared_prefixes = orig
    (depth, _, prefix_of), = segs_rows
    assert min(depth) >= 0  # every row reuses at least the first segment of another
    assert 1 <= len(prefix_of) < C * P
    L_alone = np.asarray(alone(variables, same, images, classes))
    np.testing.assert_array_equal(L_shared, L_alone)  # the same functions on the same values
    want = E.ReferenceEvaluator(graph, jaxsplit.masked_apply(graph), chunk_individuals=4,
                                chunk_images=4)(variables, same, images, classes)
    assert_close(L_shared, np.asarray(want))


@pytest.mark.parametrize("name,share,sensitive", [
    ("simcnn", None, False), ("simcnn", None, True), ("simcnn", True, False),
    ("resnet", None, True), ("rescnn", None, False)])
def test_a_row_does_not_depend_on_the_other_rows_of_the_call(cases, name, share, sensitive):
    """Whatever shares work between rows (the first segment at full width, the grouped second
    segment, shared prefixes), each row's numbers are those it gets alone: the row cache and
    a resumed search rely on it. `sensitive`: every row keeps the first two sites whole (as
    the GA's sensitive layers), so rows share prefixes."""
    graph, variables, masks, images, classes, ref = cases(name)
    if sensitive:
        masks = {n: np.asarray(v).copy() for n, v in masks.items()}
        for n in graph.free_layers[:2]:
            masks[n][:] = True
        for group in graph.ties:
            for n in group[1:]:
                masks[n] = masks[group[0]]
        ref = np.asarray(E.ReferenceEvaluator(graph, jaxsplit.masked_apply(graph),
                                              chunk_images=4)(variables, masks, images, classes))
    evaluate_fn = FG.GraphFastEvaluator(graph, chunk_images=4, cache_bytes=0, share_first=share,
                                        group_rows=4)
    together = np.asarray(evaluate_fn(variables, masks, images, classes))
    assert_close(together, ref)
    from jaxsplit import segments as S

    segs = S.segment(graph, (4, *graph.input_shape), jnp.float32, matmul_max_hw=2)
    assert segs.first_is_shareable()  # the ways of sharing are really in use here
    assert (segs.second_grouping() is not None) == (name != "resnet")
    for c in range(C):
        for i in range(P):
            one = {n: v[c:c + 1, i:i + 1] for n, v in masks.items()}
            alone = np.asarray(evaluate_fn(variables, one, images, classes[c:c + 1]))
            np.testing.assert_array_equal(alone[0, 0], together[c, i])


def test_row_cache_returns_identical_rows(cases):
    graph, variables, masks, images, classes, ref = cases("resnet_like")
    evaluate_fn = FG.GraphFastEvaluator(graph, chunk_images=4, num_buckets=3)
    first = np.asarray(evaluate_fn(variables, masks, images, classes))
    assert evaluate_fn.cache_stats == {"misses": C * P, "hits": 0}
    compiles = evaluate_fn.num_compiles
    # the next "generation": the same modules in another order
    perm = np.array([2, 0, 1])
    again = np.asarray(evaluate_fn(variables, {n: v[:, perm] for n, v in masks.items()}, images,
                                   classes))
    assert evaluate_fn.cache_stats == {"misses": C * P, "hits": C * P}
    assert evaluate_fn.num_compiles == compiles  # nothing new ran
    np.testing.assert_array_equal(again, first[:, perm])
    # other BatchNorm statistics: other rows, nothing reused
    other = {**variables, "batch_stats": jax.tree_util.tree_map(lambda v: v * 1.5 + 0.1,
                                                                variables["batch_stats"])}
    moved = np.asarray(evaluate_fn(other, masks, images, classes))
    assert evaluate_fn.cache_stats["misses"] == 2 * C * P
    assert not np.allclose(moved, first, atol=1e-3)
    want = E.ReferenceEvaluator(graph, jaxsplit.masked_apply(graph), chunk_individuals=6,
                                chunk_images=8)(other, masks, images, classes)
    assert_close(moved, np.asarray(want))


def test_under_jit_falls_back_to_the_reference(cases):
    graph, variables, masks, images, classes, ref = cases("inception_like")
    evaluate_fn = FG.GraphFastEvaluator(graph, chunk_images=4)
    before = evaluate_fn.num_compiles  # the graph's segments, compiled by the other tests
    assert_close(jax.jit(evaluate_fn)(variables, masks, images, classes), ref)
    assert evaluate_fn.num_compiles == before  # no host plan under jit


def test_bad_inputs_are_named(cases):
    graph, variables, masks, images, classes, _ = cases("inception_like")
    evaluate_fn = FG.GraphFastEvaluator(graph, chunk_images=4)
    with pytest.raises(E.EvaluatorInputError, match=r"\(C, P, 4\)"):
        evaluate_fn(variables, {k: v[0] for k, v in masks.items()}, images, classes)
    with pytest.raises(E.EvaluatorInputError, match=r"classes.*\(1,\).*\(2,\)"):
        evaluate_fn(variables, masks, images, classes[:1])
    with pytest.raises(E.EvaluatorInputError, match=r"images.*\(N, 8, 8, 1\)"):
        evaluate_fn(variables, masks, images[:, :4], classes)
    with pytest.raises(E.EvaluatorInputError, match=r"\[0, 3\].*\[0, 3\)"):
        evaluate_fn(variables, masks, images, jnp.array([0, 3], jnp.int32))
    with pytest.raises(E.EvaluatorInputError, match="full variables dict"):
        evaluate_fn(variables["params"], masks, images, classes)
    bad = jax.tree_util.tree_map(lambda v: v, variables)
    bad["params"]["mix"]["kernel"] = bad["params"]["mix"]["kernel"][..., :2]
    with pytest.raises(jaxsplit.masks.MaskError, match=r"params/mix/kernel.*\(3, 3, 8, 4\)"):
        evaluate_fn(bad, masks, images, classes)
    for option in ({"chunk_images": 0}, {"num_buckets": 0}, {"num_workers": 1.5},
                   {"cache_bytes": -1}, {"chunk_individuals": True}, {"matmul_max_hw": -1},
                   {"prefix_bytes": -2}):
        with pytest.raises(E.EvaluatorInputError, match=next(iter(option))):
            FG.GraphFastEvaluator(graph, **option)
    with pytest.raises(E.EvaluatorInputError, match="got dict"):
        FG.GraphFastEvaluator({"conv": 3})
    with pytest.raises(E.EvaluatorBackendError, match="'device' needs a jaxsplit.models.ConvNet"):
        E.make_evaluator(graph, "device")
    with pytest.raises(E.EvaluatorBackendError, match="'fast' needs .* got str"):
        E.make_evaluator("simcnn", "fast")


def test_backend_selection(cases):
    graph = cases("inception_like")[0]
    model = simcnn(num_classes=3, in_channels=1, width=0.05, image_size=32)
    traced = E.make_evaluator(model, "fast")  # a ConvNet is traced like any other model
    assert isinstance(traced, FG.GraphFastEvaluator)
    assert traced.graph.names == model.conv_spec().names
    assert traced.graph.fingerprint == FE.convnet_graph(model).fingerprint
    generic = E.make_evaluator(graph, "fast", chunk_individuals=3, chunk_images=9,
                               share_first_conv=True, num_workers=1, compute_dtype="bfloat16")
    assert isinstance(generic, FG.GraphFastEvaluator)  # (compute_dtype: the device backend's)
    assert (generic.chunk_images, generic.num_workers, generic.graph) == (9, 1, graph)
    assert generic.share_first is True
    for platform, convnet_backend, graph_backend in (("cpu", "fast", "fast"),
                                                     ("gpu", "device", "reference"),
                                                     ("tpu", "device", "reference"),
                                                     ("metal", "reference", "reference")):
        assert E.resolve_backend(model, platform) == convnet_backend
        assert E.resolve_backend(graph, platform) == graph_backend
    if jax.default_backend() == "cpu":
        assert isinstance(E.make_evaluator(graph, "auto"), FG.GraphFastEvaluator)
    cfg = SearchConfig(backend="auto", chunk_images=16, eval_cache_mib=1, shard=False)
    from_cfg = E.make_evaluator_from_config(graph, cfg)
    if jax.default_backend() == "cpu":
        assert isinstance(from_cfg, FG.GraphFastEvaluator)
        assert from_cfg.cache_bytes == 2**20 and from_cfg.chunk_images == 16



def test_the_driver_runs_it_outside_jit(cases):
    """The GA driver's step evaluates a host-side evaluator outside its jit (a whole zoo search
    with backend "auto" runs in tests/test_driver_zoo.py)."""
    from jaxsplit.search import driver as D

    graph = cases("inception_like")[0]
    rng = np.random.default_rng(0)
    importance = {n: rng.random((graph.num_outputs, k)).astype(np.float32)
                  for n, k in graph.num_kernels.items()}
    cfg = SearchConfig(population_size=4, num_generations=2, backend="auto", seed=1, shard=False)
    problem, _ = D.build_problem(graph, None, importance, cfg,
                                 evaluate_fn=E.make_evaluator_from_config(graph, cfg))
    if jax.default_backend() == "cpu":
        assert isinstance(problem.evaluate_fn, FG.GraphFastEvaluator)
        assert isinstance(D.make_step(problem), D.HostEvaluatedStep)
