"""Tests of the population evaluator (the logit table L of docs/method.md §6 step 1)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxsplit import masks as M
from jaxsplit.models.convnet import ConvLayerDef, ConvNet, init_params
from jaxsplit.search import evaluate as E
from jaxsplit.search import fitness as F
from jaxsplit.search.config import SearchConfig

C, P, N = 3, 7, 23  # chunk sizes 4 and 5 divide neither C·P = 21 nor N


@pytest.fixture(scope="module")
def setup():
    # a tiny residual net: conv_2 adds conv_1's output, so their masks are tied
    model = ConvNet(convs=(ConvLayerDef(4), ConvLayerDef(6, pool=True),
                           ConvLayerDef(6, residual_from=1)),
                    hidden=(8,), head_dropout=(0.0, 0.0), num_classes=5, in_channels=1,
                    image_size=8)
    # jitted: eager flax init / mask sampling dispatch op by op and are slow on CPU
    params = jax.jit(lambda key: init_params(model, key))(jax.random.key(0))
    masks = random_masks(model, jax.random.key(1), 0.6)
    images = jax.random.normal(jax.random.key(2), (N, 8, 8, 1))
    classes = jnp.array([0, 2, 4], jnp.int32)
    return model, params, masks, images, classes


def random_masks(model, key, keep_prob):
    spec = model.conv_spec()
    return jax.jit(lambda k: M.random(k, spec, keep_prob, (C, P)))(key)


def loop_reference(model, params, masks, images, classes):
    """L by one model.apply per individual."""
    apply_fn = jax.jit(lambda p, x, m: model.apply({"params": p}, x, masks=m))
    out = np.zeros((C, P, N), np.float32)
    for c in range(C):
        for i in range(P):
            mask = {k: v[c, i] for k, v in masks.items()}
            logits = apply_fn(params, images, mask)
            out[c, i] = np.asarray(logits)[:, int(classes[c])]
    return out


def test_reference_matches_per_individual_loop(setup):
    model, params, masks, images, classes = setup
    expected = loop_reference(*setup)
    for chunk_individuals, chunk_images in ((4, 5), (1, 23), (100, 1000)):
        evaluate_fn = E.make_evaluator(model, "reference", chunk_individuals=chunk_individuals,
                                       chunk_images=chunk_images)
        L = evaluate_fn({"params": params}, masks, images, classes)
        assert L.shape == (C, P, N) and L.dtype == jnp.float32
        np.testing.assert_allclose(np.asarray(L), expected, atol=1e-5, rtol=1e-5)


def test_single_trace_per_shape(setup):
    model, params, masks, images, classes = setup
    evaluate_fn = E.ReferenceEvaluator(model, chunk_individuals=4, chunk_images=5)
    evaluate_fn({"params": params}, masks, images, classes)
    other = random_masks(model, jax.random.key(7), 0.3)
    L = evaluate_fn({"params": params}, other, images + 1.0, classes[::-1])
    assert evaluate_fn.num_traces == 1
    np.testing.assert_allclose(
        np.asarray(L), loop_reference(model, params, other, images + 1.0, classes[::-1]), atol=1e-5)
    evaluate_fn({"params": params}, masks, images[:10], classes)  # a new N is a new shape
    assert evaluate_fn.num_traces == 2


def test_bad_inputs_raise_naming_shapes(setup):
    model, params, masks, images, classes = setup
    evaluate_fn = E.make_evaluator(model, "reference", chunk_individuals=4, chunk_images=5)
    flat = {k: v[0] for k, v in masks.items()}
    with pytest.raises(E.EvaluatorInputError, match=r"\(C, P, 4\).*\(7, 4\)"):
        evaluate_fn({"params": params}, flat, images, classes)
    with pytest.raises(E.EvaluatorInputError, match=r"classes.*\(2,\).*\(3,\)"):
        evaluate_fn({"params": params}, masks, images, classes[:2])
    with pytest.raises(E.EvaluatorInputError, match=r"images.*\(23, 8, 8, 3\).*\(N, 8, 8, 1\)"):
        evaluate_fn({"params": params}, masks, jnp.tile(images, (1, 1, 1, 3)), classes)
    with pytest.raises(E.EvaluatorInputError, match=r"\[0, 2, 5\].*\[0, 5\)"):
        evaluate_fn({"params": params}, masks, images, jnp.array([0, 2, 5], jnp.int32))
    bad = dict(masks)
    bad["conv_0"] = bad["conv_0"][:, :5]
    with pytest.raises(E.EvaluatorInputError, match=r"'conv_0': \(3, 5\), 'conv_1': \(3, 7\)"):
        evaluate_fn({"params": params}, bad, images, classes)
    with pytest.raises(E.EvaluatorInputError, match="chunk_images"):
        E.ReferenceEvaluator(model, chunk_images=0)


def test_backend_selection(setup):
    model = setup[0]
    assert E.default_backend("gpu") == "device"  # search/device_evaluate.py (rule in default_backend)
    assert E.default_backend("metal") == "reference"
    assert E.default_backend("cpu") == "fast"
    with pytest.raises(E.EvaluatorBackendError, match="unknown evaluator backend 'gpu'"):
        E.make_evaluator(model, "gpu")
    cfg = SearchConfig(backend="reference", chunk_individuals=3, chunk_images=7)
    evaluate_fn = E.make_evaluator_from_config(model, cfg)
    assert isinstance(evaluate_fn, E.ReferenceEvaluator)
    assert (evaluate_fn.chunk_individuals, evaluate_fn.chunk_images) == (3, 7)


def test_auto_backend_gives_the_reference_values(setup):
    model, params, masks, images, classes = setup
    L_auto = E.make_evaluator(model, "auto", chunk_individuals=4, chunk_images=5)(
        {"params": params}, masks, images, classes)
    np.testing.assert_allclose(np.asarray(L_auto), loop_reference(*setup), atol=1e-4, rtol=1e-4)


def test_evaluator_feeds_the_fitness(setup):
    model, params, masks, images, classes = setup
    L = E.make_evaluator(model, chunk_individuals=8, chunk_images=8)({"params": params}, masks, images, classes)
    labels = jnp.asarray(np.resize(np.asarray(classes), N))
    fparams = F.FitnessParams.create(min_kept=2, max_kept=6)
    flat = M.flatten(masks, model.conv_spec())
    score, info = F.cooperative_fitness(jax.random.key(0), L, flat, labels, classes, 0.9, fparams)
    assert score.shape == (C, P)
    assert np.all(np.isfinite(np.asarray(score))) and float(info.best_fitness) > 0


def test_any_traced_model_through_masked_apply(setup):
    """The reference backend over `jaxsplit.masked_apply(trace(...))` equals the ConvNet's own
    masked apply bit for bit; "auto" is the generic fast backend for a graph on CPU (reference
    elsewhere); "device" refuses a graph."""
    from functools import partial

    from jaxsplit.graph import trace

    model, params, masks, images, classes = setup
    variables = {"params": params}
    apply_fn = partial(model.apply, train=False)
    graph = trace(apply_fn, variables, images[:1])
    masked_fn = E.masked_apply_of(graph, apply_fn)
    generic = E.make_evaluator(graph, "reference", masked_fn=masked_fn, chunk_individuals=4,
                               chunk_images=5)
    assert isinstance(generic, E.ReferenceEvaluator) and generic.graph is graph
    auto = E.make_evaluator(graph, "auto", masked_fn=masked_fn)
    assert type(auto).__name__ == ("GraphFastEvaluator" if jax.default_backend() == "cpu"
                                   else "ReferenceEvaluator")
    own = E.make_evaluator(model, "reference", chunk_individuals=4, chunk_images=5)
    np.testing.assert_array_equal(np.asarray(generic(variables, masks, images, classes)),
                                  np.asarray(own(variables, masks, images, classes)))
    with pytest.raises(E.EvaluatorBackendError, match="'device' needs a jaxsplit.models.ConvNet"):
        E.make_evaluator(graph, "device", masked_fn=masked_fn)
    with pytest.raises(E.EvaluatorInputError, match="full variables dict"):
        generic(params, masks, images, classes)
