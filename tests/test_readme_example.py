"""The README's library example, run as written (jaxsplit.modularize on a model defined here)."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import jaxsplit
from jaxsplit.compose import merge


def test_readme_example(tmp_path):
    # --- README example (begin) ---
    class Net(nn.Module):  # any flax CNN: convs, BatchNorm, pooling, a Dense head
        @nn.compact
        def __call__(self, x, train=False):
            for width in (8, 16):
                x = nn.relu(nn.BatchNorm(use_running_average=not train)(nn.Conv(width, (3, 3))(x)))
                x = nn.max_pool(x, (2, 2), strides=(2, 2))
            return nn.Dense(3)(x.mean(axis=(1, 2)))

    net = Net()
    variables = net.init(jax.random.key(0), jnp.zeros((1, 16, 16, 1)))  # (train it first)
    apply_fn = functools.partial(net.apply, train=False)
    images = np.random.default_rng(0).normal(size=(60, 16, 16, 1)).astype(np.float32)
    labels = np.asarray(apply_fn(variables, images)).argmax(-1)  # the valid split's labels

    graph = jaxsplit.trace(apply_fn, variables, images[:1])  # kernel sites, ties, consumers
    modules = jaxsplit.modularize(apply_fn, variables, (images, labels), graph=graph,
                                  search=jaxsplit.SearchConfig(population_size=8,
                                                               num_generations=3),
                                  key=jax.random.key(1))
    print(modules.stats[0]["kept_fraction"], modules.stats[0]["macs_fraction"])
    module_apply, module_vars = modules.extract(0)  # only class 0's kept kernels
    logit0 = module_apply(module_vars, images)      # (N,) class-0 logit
    modules.save(tmp_path / "modules.npz")
    again = jaxsplit.Modules.load(tmp_path / "modules.npz", graph, apply_fn=apply_fn,
                                  variables=variables)
    members = [(functools.partial(*again.extract(c)), [c]) for c in again.classes.tolist()]
    ensemble = merge(members, 3, normalize="none")  # one classifier from the 3 modules
    predictions = jnp.argmax(ensemble(images), axis=-1)
    # --- README example (end) ---
    assert logit0.shape == (60,)
    np.testing.assert_allclose(np.asarray(logit0), np.asarray(modules.apply(0)(images)),
                               rtol=1e-4, atol=1e-5)
    assert predictions.shape == (60,)
    assert set(modules.masks) == set(graph.names) and len(graph.names) == 2
