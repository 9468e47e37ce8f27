"""Helpers shared by the tests (importable as `helpers`: pytest puts tests/ on sys.path)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxsplit.models import ConvNet, init_params


def random_params(model: ConvNet, seed: int) -> dict:
    """He-normal weights, N(0, 0.1) biases of `model`, drawn with numpy.

    Shapes come from `jax.eval_shape`, so nothing is compiled: jax's per-shape RNG compiles make
    `init_params` take many seconds on a 2-core CPU. Logits stay O(1).
    """
    shapes = jax.eval_shape(lambda: init_params(model, jax.random.key(0)))
    rng = np.random.default_rng(seed)

    def draw(leaf):
        std = math.sqrt(2.0 / math.prod(leaf.shape[:-1])) if len(leaf.shape) > 1 else 0.1
        return jnp.asarray(rng.normal(0.0, std, leaf.shape).astype(np.float32))

    return jax.tree_util.tree_map(draw, shapes)
