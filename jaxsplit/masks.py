"""Kernel-mask pytrees: make, check, apply, count, compare.

A *mask* is a dict `{conv_name: bool[..., K_l]}` with one entry per conv layer
of a model's `ConvSpec`. Leading axes are batch axes (a population `(P, K_l)`,
classes x population `(C, P, K_l)`); every function here works on them, under
`jit` and `vmap`. Tied layers (residual adds) carry equal entries: `tie`
copies each group's representative into the others, and `validate` checks it.

Two exact ways to run a masked model:
  * weight masking: `model.apply({"params": apply_to_params(params, mask)}, x)`;
  * activation masking: `model.apply({"params": params}, x, masks=mask)`
    multiplies each post-ReLU activation by its mask, with shared weights.
    This is the population-friendly form: `vmap` over masks only.
"""

from __future__ import annotations

from jaxsplit.errors import JaxsplitError
from collections.abc import Mapping

import chex
import jax
import jax.numpy as jnp
import numpy as np

from jaxsplit.models.convnet import ConvSpec

Mask = dict[str, jax.Array]


class MaskError(JaxsplitError, ValueError):
    """A mask that does not fit the model's conv spec."""


def full(spec: ConvSpec, batch_shape: tuple[int, ...] = ()) -> Mask:
    """All kernels kept: `{name: ones bool[*batch_shape, K_l]}`."""
    return {l.name: jnp.ones((*batch_shape, l.num_kernels), bool) for l in spec.layers}


def tie(mask: Mapping[str, jax.Array], spec: ConvSpec) -> Mask:
    """Copy each tie group's representative entry into its other members."""
    out = dict(mask)
    for group in spec.ties:
        for name in group[1:]:
            out[name] = out[group[0]]
    return out


def random(key: jax.Array, spec: ConvSpec, keep_prob: float | jax.Array = 0.5,
           batch_shape: tuple[int, ...] = ()) -> Mask:
    """Random masks: each kernel kept with probability `keep_prob`.

    Every layer keeps at least one kernel (one is forced on at a random
    position), and tied layers are equal.

    Returns:
      `{name: bool[*batch_shape, K_l]}`.
    """
    out = {}
    free = spec.free_layers
    keys = jax.random.split(key, 2 * len(free))
    for i, name in enumerate(free):
        k = spec.layer(name).num_kernels
        m = jax.random.bernoulli(keys[2 * i], keep_prob, (*batch_shape, k))
        forced = jax.random.randint(keys[2 * i + 1], batch_shape, 0, k)
        out[name] = m | jax.nn.one_hot(forced, k, dtype=bool)
    return tie(out, spec)


def validate(mask: Mapping[str, jax.Array], spec: ConvSpec,
             batch_shape: tuple[int, ...] | None = None, *, check_values: bool = True) -> None:
    """Raise `MaskError` (naming the layer) unless `mask` fits `spec`.

    Checks: the same layer names, boolean dtype, last axis = the layer's
    kernel count, equal leading (batch) axes across layers (and equal to
    `batch_shape` when given). With `check_values` and concrete arrays: every
    layer keeps at least one kernel, and tied layers are equal.
    """
    if not isinstance(mask, Mapping):
        raise MaskError(f"a mask is a dict {{conv_name: bool array}}, got {type(mask).__name__}")
    names = set(spec.names)
    missing, extra = sorted(names - set(mask)), sorted(set(mask) - names)
    if missing or extra:
        raise MaskError(
            f"mask layers do not match the model: missing {missing}, unexpected {extra}; "
            f"expected {list(spec.names)}"
        )
    lead = batch_shape
    for layer in spec.layers:
        m = mask[layer.name]
        if not hasattr(m, "dtype") or m.dtype != jnp.bool_:
            raise MaskError(
                f"mask of {layer.name} has dtype {getattr(m, 'dtype', type(m).__name__)}; "
                f"expected bool"
            )
        if m.ndim < 1 or m.shape[-1] != layer.num_kernels:
            raise MaskError(
                f"mask of {layer.name} has shape {tuple(m.shape)}; expected (..., "
                f"{layer.num_kernels}) for its {layer.num_kernels} kernels"
            )
        if lead is None:
            lead = tuple(m.shape[:-1])
        elif tuple(m.shape[:-1]) != tuple(lead):
            raise MaskError(
                f"mask of {layer.name} has batch shape {tuple(m.shape[:-1])}; expected "
                f"{tuple(lead)} like the other layers"
            )
    if not check_values or any(isinstance(v, jax.core.Tracer) for v in mask.values()):
        return
    for layer in spec.layers:
        kept = np.asarray(mask[layer.name]).sum(-1)
        if np.any(kept == 0):
            where = np.argwhere(np.atleast_1d(kept == 0))[0].tolist() if kept.ndim else []
            raise MaskError(
                f"mask of {layer.name} keeps no kernel"
                + (f" (batch index {tuple(where)})" if where else "")
                + "; every layer must keep at least one"
            )
    for group in spec.ties:
        ref = np.asarray(mask[group[0]])
        for name in group[1:]:
            if not np.array_equal(ref, np.asarray(mask[name])):
                raise MaskError(
                    f"masks of {group[0]} and {name} differ, but their outputs are added "
                    f"(residual tie) so they must be equal; use masks.tie(mask, spec)"
                )


def apply_to_params(params: Mapping, mask: Mapping[str, jax.Array], spec: ConvSpec) -> dict:
    """Zero the weights and biases of masked kernels ("weight masking").

    Args:
      params: the model's params (inner dict or `{"params": ...}`).
      mask: `{name: bool[..., K_l]}`; leading axes broadcast into the result
        (a `(P, K_l)` mask gives params with a leading P axis on conv leaves).

    Returns:
      params of the same tree structure.
    """
    if "params" in params and len(params) == 1:
        return {"params": apply_to_params(params["params"], mask, spec)}
    validate(mask, spec, check_values=False)
    out = dict(params)
    for layer in spec.layers:
        if layer.name not in params:
            raise MaskError(f"params have no layer {layer.name}; found {sorted(params)}")
        m = mask[layer.name]
        p = params[layer.name]
        kernel = p["kernel"]
        chex.assert_shape(kernel, (3, 3, None, layer.num_kernels))
        mk = m[..., None, None, None, :].astype(kernel.dtype)
        out[layer.name] = {"kernel": kernel * mk, "bias": p["bias"] * m.astype(kernel.dtype)}
    return out


def count_per_layer(mask: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
    """Kept kernels per layer, `{name: int[...]}`."""
    return {k: jnp.sum(v, axis=-1, dtype=jnp.int32) for k, v in mask.items()}


def count(mask: Mapping[str, jax.Array]) -> jax.Array:
    """Kept kernels over all layers, `int[...]`."""
    return sum(count_per_layer(mask).values())


def kept_fraction(mask: Mapping[str, jax.Array]) -> jax.Array:
    """Fraction of all kernels kept, `float[...]`."""
    total = sum(v.shape[-1] for v in mask.values())
    return count(mask) / total


def flatten(mask: Mapping[str, jax.Array], spec: ConvSpec) -> jax.Array:
    """Concatenate layers in spec order: `bool[..., K_total]`."""
    return jnp.concatenate([mask[n] for n in spec.names], axis=-1)


def unflatten(flat: jax.Array, spec: ConvSpec) -> Mask:
    """Inverse of `flatten`."""
    chex.assert_axis_dimension(flat, -1, spec.total_kernels)
    splits = np.cumsum([l.num_kernels for l in spec.layers])[:-1]
    return dict(zip(spec.names, jnp.split(flat, splits, axis=-1)))


def intersection(a: Mapping[str, jax.Array], b: Mapping[str, jax.Array]) -> Mask:
    """Kernels kept by both (broadcasting leading axes)."""
    _check_same_layers(a, b)
    return {k: a[k] & b[k] for k in a}


def union(a: Mapping[str, jax.Array], b: Mapping[str, jax.Array]) -> Mask:
    """Kernels kept by either (broadcasting leading axes)."""
    _check_same_layers(a, b)
    return {k: a[k] | b[k] for k in a}


def jaccard(a: Mapping[str, jax.Array], b: Mapping[str, jax.Array]) -> jax.Array:
    """|a ∩ b| / |a ∪ b| over all kernels of all layers, `float[...]`.

    The module *difference* of SPEC §6 is `1 - jaccard`. Two empty masks have
    Jaccard 1 (they are the same set).
    """
    _check_same_layers(a, b)
    inter = sum(jnp.sum(a[k] & b[k], -1) for k in a)
    uni = sum(jnp.sum(a[k] | b[k], -1) for k in a)
    return jnp.where(uni > 0, inter / jnp.maximum(uni, 1), 1.0)


def to_indices(mask: Mapping[str, jax.Array]) -> dict[str, np.ndarray]:
    """Kept kernel indices per layer of one (unbatched) mask, as host arrays."""
    for k, v in mask.items():
        if np.ndim(v) != 1:
            raise MaskError(f"to_indices takes one mask; {k} has shape {np.shape(v)}")
    return {k: np.flatnonzero(np.asarray(v)) for k, v in mask.items()}


def from_indices(indices: Mapping[str, np.ndarray], spec: ConvSpec) -> Mask:
    """Mask keeping exactly the given kernel indices of each layer."""
    out = {}
    for layer in spec.layers:
        if layer.name not in indices:
            raise MaskError(f"no indices for layer {layer.name}; expected {list(spec.names)}")
        idx = np.asarray(indices[layer.name], dtype=np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= layer.num_kernels):
            raise MaskError(
                f"indices of {layer.name} must lie in [0, {layer.num_kernels}); got "
                f"{idx.min()}..{idx.max()}"
            )
        m = np.zeros(layer.num_kernels, bool)
        m[idx] = True
        out[layer.name] = jnp.asarray(m)
    return out


def _check_same_layers(a: Mapping, b: Mapping) -> None:
    if set(a) != set(b):
        raise MaskError(f"masks have different layers: {sorted(a)} vs {sorted(b)}")
