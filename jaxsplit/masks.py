"""Kernel-mask pytrees: make, check, apply, count, compare.

A *mask* is a dict `{conv_name: bool[..., K_l]}` with one entry per conv layer
of a model's `ConvSpec`, or per site of a traced `jaxsplit.graph.Graph` (any
function here takes either: a `Graph` has the same `names` / `layers` /
`ties` / `free_layers` API). Leading axes are batch axes (a population `(P, K_l)`,
classes x population `(C, P, K_l)`); every function here works on them, under
`jit` and `vmap`. Tied layers (residual adds) carry equal entries: `tie`
copies each group's representative into the others, and `validate` checks it.

Two exact ways to run a masked model:
  * weight masking: `model.apply({"params": apply_to_params(params, mask)}, x)`;
  * activation masking: `model.apply({"params": params}, x, masks=mask)`
    multiplies each post-ReLU activation by its mask, with shared weights.
    This is the population-friendly form: `vmap` over masks only.

For any traced model (`graph = jaxsplit.trace(apply_fn, variables, x)`):
  * `apply_masks(graph, variables, mask)`: weight masking with exact removal
    semantics (every consumer's input slices of a dropped channel are zeroed,
    so BatchNorm shifts and activations with f(0) != 0 contribute nothing);
  * `masked_apply(graph, apply_fn)(variables, mask, x)`: activation masking,
    each consumer's input multiplied by the mask of its channels.
"""

from __future__ import annotations

from collections.abc import Mapping

import chex
import jax
import jax.numpy as jnp
import numpy as np

from jaxsplit import graph as graph_lib
from jaxsplit.graph import Graph
from jaxsplit.errors import JaxsplitError
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
    if isinstance(spec, Graph):
        if isinstance(params, Mapping) and set(params) == {"params"}:
            return apply_masks(spec, params, mask)
        return apply_masks(spec, {"params": params}, mask)["params"]
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


# -- masks over a traced kernel graph -------------------------------------------

def _any_plan(graph: Graph):
    """The graph's analysis for its own apply_fn (the leaf labels do not depend on the batch)."""
    for key, plan in graph._plans.items():
        if key[0] is graph.apply_fn:
            return plan
    return graph.plan((1, *graph.input_shape), graph.input_dtype)


def _check_variables(graph: Graph, variables: Mapping, plan) -> list:
    leaves, treedef = jax.tree_util.tree_flatten(variables)
    if treedef != plan.treedef:
        raise MaskError(f"variables do not have the traced structure: got {treedef}, expected "
                        f"{plan.treedef}")
    for path, leaf, want in zip(graph.leaf_paths, leaves,
                                jax.tree_util.tree_leaves(graph.leaf_shapes)):
        if tuple(np.shape(leaf)) != tuple(want.shape):
            raise MaskError(f"variables leaf {'/'.join(path)} has shape {tuple(np.shape(leaf))}; "
                            f"expected {tuple(want.shape)}")
    return leaves


def _unbatched(graph: Graph, mask: Mapping[str, jax.Array], where: str) -> None:
    validate(mask, graph, batch_shape=(), check_values=False)
    for s in graph.sites:
        chex.assert_shape(mask[s.name], (s.num_kernels,),
                          custom_message=f"{where}: mask of {s.name}")


def apply_masks(graph: Graph, variables: Mapping, mask: Mapping[str, jax.Array]) -> dict:
    """Weight masking with exact removal semantics, for any traced model.

    Zeroes, for every dropped channel: the consumer-side input slices (next
    conv kernels' input channels, Dense rows after a flatten / pooling, with
    concat offsets), the site kernel's output slice and the carriers in the
    `params` collection (bias, BatchNorm scale and bias, depthwise kernels).
    Other collections (BatchNorm mean / var) are left as they are.

    Args:
      graph: `trace(...)` of the model.
      variables: the full variables dict, the traced structure.
      mask: `{site: bool[K_s]}` (one module, no batch axes; `vmap` for more),
        tied sites equal.

    Returns:
      variables of the same structure and shapes:
      `apply_fn(apply_masks(graph, v, m), x)` == `masked_apply(graph, apply_fn)(v, m, x)`
      up to float rounding.
    """
    _unbatched(graph, mask, "apply_masks")
    plan = _any_plan(graph)
    leaves = _check_variables(graph, variables, plan)
    gid = graph.group_of(plan)
    vectors = {gid[n]: mask[n] for n in graph.free_layers}
    consumer_axes = {(leaf, ax) for leaf, ax, _, _ in plan.consumers}
    kernel_axes = {(k, plan.sites[k]["out_axis"]) for k in plan.site_order}
    out = list(leaves)
    for leaf, lab in plan.leaf_labels.items():
        in_params = graph.leaf_paths[leaf][0] == "params"
        for ax, lay in enumerate(lab):
            if lay is None:
                continue
            if not ((leaf, ax) in consumer_axes or (leaf, ax) in kernel_axes or in_params):
                continue
            vec = graph_lib._vector(lay, vectors, {}, jnp.result_type(out[leaf]))
            if vec is None:
                continue
            shape = [1] * np.ndim(out[leaf])
            shape[ax] = -1
            out[leaf] = out[leaf] * vec.reshape(shape)
    return jax.tree_util.tree_unflatten(plan.treedef, out)


def masked_apply(graph: Graph, apply_fn=None):
    """Activation masking with shared weights, for any traced model.

    Args:
      graph: `trace(apply_fn, variables, x)` of the model.
      apply_fn: the apply function (default: the one traced).

    Returns:
      `fn(variables, mask, x) -> logits (N, C)`: the traced computation
      re-evaluated with each consumer's input multiplied by the mask of its
      channels (`mask`: `{site: bool[K_s]}`, tied sites equal), which is exact
      removal of the dropped kernels whatever carriers / activations follow
      them. Pure; `jit` it, and `vmap` it over masks for a population. Any
      batch size N (one analysis per input shape, cached on the graph). For a
      jaxsplit `ConvNet` with binary masks it equals
      `model.apply({"params": p}, x, masks=mask)` bit for bit.
    """
    fn_ = graph.apply_fn if apply_fn is None else apply_fn

    def fn(variables: Mapping, mask: Mapping[str, jax.Array], x: jax.Array) -> jax.Array:
        _unbatched(graph, mask, "masked_apply")
        plan = graph.plan(tuple(x.shape), x.dtype, fn_)
        leaves = _check_variables(graph, variables, plan)
        gid = graph.group_of(plan)
        vectors = {gid[n]: mask[n] for n in graph.free_layers}
        return graph_lib.evaluate(graph, plan, leaves, x, vectors=vectors)

    return fn
