"""Model variables: `{"params": ..., "batch_stats": ...}` and the inference apply function.

The ConvNet families have parameters only; the BatchNorm models (`resnet`, `vgg`) also carry
running averages in the `batch_stats` collection. The functions here let every stage treat
both alike:

* `init_variables(model, key)`: the full variables dict of a fresh model.
* `inference_apply(model)`: `apply_fn(variables, x) -> logits (N, C)`, BatchNorm on its
  running averages, no dropout (`model.apply` with `train=False`); the same function object for
  equal models, so jit caches keyed on it are reused.
* `as_variables(params_or_variables)`: the full dict from either a model's inner params dict
  (ConvNet) or an already full variables dict.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax

__all__ = ["COLLECTIONS", "STATE_COLLECTIONS", "init_variables", "inference_apply",
           "as_variables", "is_variables", "variable_collections", "has_state"]

COLLECTIONS = ("params", "batch_stats")
STATE_COLLECTIONS = ("batch_stats",)  # non-trainable collections updated in training


def init_variables(model: nn.Module, key: jax.Array) -> dict[str, Any]:
    """The variables of a fresh `model` (`model.init` on `model.dummy_input()`).

    Returns:
      `{"params": ...}`, plus `"batch_stats"` for models with BatchNorm.
    """
    return dict(model.init(key, model.dummy_input()))


@functools.lru_cache(maxsize=128)
def variable_collections(model: nn.Module) -> tuple[str, ...]:
    """The collections of `model`'s variables (shapes only, nothing is computed), sorted."""
    shapes = jax.eval_shape(lambda: init_variables(model, jax.random.key(0)))
    unknown = sorted(set(shapes) - set(COLLECTIONS))
    if unknown:
        raise ValueError(f"model {type(model).__name__} has variable collections {unknown}; "
                         f"jaxsplit handles {list(COLLECTIONS)}")
    return tuple(c for c in COLLECTIONS if c in shapes)


def has_state(model: nn.Module) -> bool:
    """Whether `model` has `batch_stats` (running averages) besides its params."""
    return any(c in variable_collections(model) for c in STATE_COLLECTIONS)


def is_variables(tree: Any) -> bool:
    """Whether `tree` is a full variables dict (keys among `COLLECTIONS`, `params` included)
    rather than a model's inner params dict (keys = layer names)."""
    return isinstance(tree, Mapping) and "params" in tree and set(tree) <= set(COLLECTIONS)


def as_variables(params_or_variables: Any) -> dict[str, Any]:
    """`{"params": p}` for an inner params dict `p`; a (shallow) copy of a variables dict."""
    if is_variables(params_or_variables):
        return dict(params_or_variables)
    return {"params": params_or_variables}


@functools.lru_cache(maxsize=128)
def inference_apply(model: nn.Module) -> Callable[[Any, jax.Array], jax.Array]:
    """`apply_fn(variables, x) -> logits (N, C)` of `model` in inference mode.

    `variables` is the full dict (`{"params", "batch_stats"}` for BatchNorm models): BatchNorm
    uses the running averages and dropout is off. Cached: equal models give the same function.
    """
    return functools.partial(model.apply, train=False)
