"""Physical extraction of a module: only its kept kernels, for any traced model.

Generic (any flax linen CNN, through `jaxsplit.trace`):

* `extract(graph, variables, mask, target_class=None)` -> `(module_apply,
  module_variables)`: every channel-labelled leaf axis (site kernels' output
  axis, consumers' input axis / Dense rows, carriers) is sliced to the kept
  channels, and `module_apply` re-evaluates the traced jaxpr with every
  channel-labelled shape replaced by its kept size (the shape params of
  `reshape` / `broadcast_in_dim` / `slice`, a depthwise conv's
  `feature_group_count`), so no flax Module is rebuilt. Concat offsets and
  flatten orders follow from the layouts.
* `gather(graph, variables, indices, valid)`: the same with a static bucket
  of B_s >= kept channels per site (traced indices are fine under jit/vmap);
  consumer inputs are multiplied by `valid`, so padded channels contribute
  exactly zero. `extract` is `gather` with exact indices and no padding.
* `module_stats(graph, mask)`: kept kernels, params and MACs of the module and
  their fractions of the model, counted from the same layouts.

`extract(model, params, mask, ...)` and `module_stats(model, params, mask)`
with a jaxsplit `ConvNet` as first argument keep their ConvNet behaviour
(`extract_convnet`, `convnet_module_stats`): a smaller `ConvNet`.

ConvNet-only extraction (`extract_convnet`):

A module of class c (docs/method.md §7) is the model with c's kept kernels; masking a
kernel zeroes its output channel, so a masked conv -> ReLU -> (pool) block
equals the same block with the channel removed. `extract` removes them:

* conv layer l keeps the output kernels `mask[l]` (kernel `(3, 3, C_in, K_l)`
  -> `(3, 3, C_in', K_l')`, bias `(K_l,)` -> `(K_l',)`), and its input
  channels follow the previous layer's kept kernels (the image channels for
  the first layer);
* a residual add `h_l + h_r` keeps the tied channels (the masks of a tie group
  are equal, checked by `masks.validate`), so both sides still line up;
* the first Dense layer keeps the input rows of the last feature map's kept
  channels, in the NHWC flatten order `(h * W + w) * K + k`;
* the other Dense layers are kept whole; the classifier keeps all its columns,
  or only the `target_class` column (then the module has `num_classes=1`).

Everything is derived from `ConvNet.conv_spec()` (layer order, pools, ties),
so SimCNN, ResCNN and the weak CNNs share this one code path.

Size statistics (`stats_from_mask`, `module_stats`) follow one convention for
the headline fractions, `params_fraction` and `macs_fraction`: the module
**with the whole classifier** against the whole model, so an all-ones mask is
exactly 1.0 and the fraction measures only what the mask removes. The module as used
for patching outputs one logit; its sizes are reported too, as
`single_output_params` / `single_output_macs` and their fractions of the whole
model. The two differ only by the classifier's other columns (for SimCNN
`512 x (N - 1)` weights).

MACs count multiply-accumulates of convs and Dense layers for one image
(`models.conv_macs` + `models.head_macs`); ReLU, pooling, bias and residual
adds are not counted.

Example (README-ready):

    >>> import jax
    >>> from jaxsplit import extract, masks
    >>> from jaxsplit.models import init_params, simcnn
    >>> model = simcnn(num_classes=10, in_channels=1, width=0.125)
    >>> params = init_params(model, jax.random.key(0))
    >>> mask = masks.random(jax.random.key(1), model.conv_spec(), keep_prob=0.5)
    >>> small_model, small_params = extract.extract_convnet(model, params, mask, target_class=3)
    >>> x = model.dummy_input(2)
    >>> small_model.apply({"params": small_params}, x).shape  # the class-3 logit
    (2, 1)
    >>> stats = extract.stats_from_mask(model, mask)
    >>> 0 < stats["macs_fraction"] < 1 and 0 < stats["params_fraction"] < 1
    True
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import math
import sys
import types

import chex
import jax
import jax.numpy as jnp
import numpy as np

from jaxsplit import graph as graph_lib
from jaxsplit import masks as masks_lib
from jaxsplit.graph import CLASS_GID, Graph
from jaxsplit.errors import JaxsplitError
from jaxsplit.models.convnet import (
    ConvLayerDef,
    ConvNet,
    ConvSpec,
    conv_macs,
    count_params,
    head_macs,
)


class ExtractError(JaxsplitError, ValueError):
    """Params, model or target class that do not fit together."""


def _host_mask(model: ConvNet, mask: Mapping[str, Any]) -> tuple[ConvSpec, dict[str, np.ndarray]]:
    """Validate one (unbatched) mask against `model` and return it as host bool arrays."""
    if not isinstance(model, ConvNet):
        raise ExtractError(f"extract works on a jaxsplit ConvNet, got {type(model).__name__}")
    spec = model.conv_spec()
    masks_lib.validate(mask, spec, batch_shape=())
    return spec, {name: np.asarray(mask[name], dtype=bool) for name in spec.names}


def _kept_counts(spec: ConvSpec, mask: Mapping[str, np.ndarray]) -> dict[str, int]:
    return {name: int(mask[name].sum()) for name in spec.names}


def _small_model(model: ConvNet, kept: Mapping[str, int], num_outputs: int) -> ConvNet:
    """The `ConvNet` with `kept[name]` kernels per conv layer and `num_outputs` logits."""
    spec = model.conv_spec()
    convs = tuple(
        ConvLayerDef(kept[layer.name], pool=d.pool, residual_from=d.residual_from)
        for layer, d in zip(spec.layers, model.convs)
    )
    return ConvNet(convs=convs, hidden=tuple(model.hidden), head_dropout=tuple(model.head_dropout),
                   num_classes=num_outputs, in_channels=model.in_channels,
                   image_size=model.image_size)


def _check_target(model: ConvNet, target_class: int | None) -> None:
    if target_class is None:
        return
    if isinstance(target_class, (bool, np.bool_)) or not isinstance(target_class, (int, np.integer)):
        raise ExtractError(f"target_class must be an int class index or None, got {target_class!r}")
    if not 0 <= int(target_class) < model.num_classes:
        raise ExtractError(
            f"target_class {int(target_class)} is out of range; the model has classes "
            f"0..{model.num_classes - 1}"
        )


def _leaf(params: Mapping, layer: str, leaf: str, shape: tuple[int, ...]) -> np.ndarray:
    """`params[layer][leaf]` as a host array, checked against `shape`."""
    if layer not in params or not isinstance(params[layer], Mapping) or leaf not in params[layer]:
        raise ExtractError(f"params have no {layer}/{leaf}; found layers {sorted(params)}")
    value = np.asarray(params[layer][leaf])
    if value.shape != shape:
        raise ExtractError(
            f"params {layer}/{leaf} has shape {value.shape}; the model expects {shape}"
        )
    return value


def extract_convnet(model: ConvNet, params: Mapping, mask: Mapping[str, Any],
                    target_class: int | None = None) -> tuple[ConvNet, dict]:
    """The module of `mask` as a smaller `ConvNet` and its params.

    Args:
      model: the full model.
      params: its params, the inner dict `{conv_0: ..., fc_13: ...}` (or
        `{"params": inner}`, then the result is wrapped the same way).
      mask: one module's kernel mask `{conv_name: bool[K_l]}` (numpy or jax,
        no batch axes), every layer keeping at least one kernel and tied
        layers equal; checked by `masks.validate` (a `MaskError` names the
        layer).
      target_class: keep only this classifier column (the module then has
        `num_classes=1` and outputs the class-`target_class` logit); None
        keeps all columns.

    Returns:
      `(small_model, small_params)`: conv layer l has kernel
      `(3, 3, K'_{l-1}, K'_l)` and bias `(K'_l,)` with `K'_l = mask[l].sum()`
      (`K'_{-1}` = image channels); the first Dense layer has kernel
      `(H_L * W_L * K'_L, D_1)`; the other Dense layers are unchanged except
      the classifier, `(D, 1)` when `target_class` is given. For any images
      `x (N, H, W, C)`:
      `small_model.apply({"params": small_params}, x)` ==
      `model.apply({"params": params}, x, masks=mask)[:, cols]` up to float
      rounding, where `cols` is `[target_class]` or all classes.

    Host-side slicing (numpy), not jitted: the output shapes depend on the
    mask's values.
    """
    spec, host_mask = _host_mask(model, mask)
    _check_target(model, target_class)
    wrapped = isinstance(params, Mapping) and set(params) == {"params"}
    inner = params["params"] if wrapped else params
    if not isinstance(inner, Mapping):
        raise ExtractError(f"params must be a dict of layers, got {type(inner).__name__}")

    kept_idx = {name: np.flatnonzero(host_mask[name]) for name in spec.names}
    out: dict[str, dict[str, jax.Array]] = {}
    prev_idx = np.arange(spec.image_shape[2])
    prev_k = spec.image_shape[2]
    for layer in spec.layers:
        k_idx = kept_idx[layer.name]
        kernel = _leaf(inner, layer.name, "kernel", (3, 3, prev_k, layer.num_kernels))
        bias = _leaf(inner, layer.name, "bias", (layer.num_kernels,))
        out[layer.name] = {
            "kernel": jnp.asarray(kernel[:, :, prev_idx[:, None], k_idx[None, :]]),
            "bias": jnp.asarray(bias[k_idx]),
        }
        prev_idx, prev_k = k_idx, layer.num_kernels

    # Head: the first Dense sees the NHWC flatten of the last map (H_L, W_L, K_L).
    widths = model.head_widths()  # (flat, *hidden, num_classes)
    first_fc = len(spec.layers)
    num_dense = len(widths) - 1
    hh, ww = spec.head_in_hw
    for j in range(num_dense):
        name = f"fc_{first_fc + j}"
        kernel = _leaf(inner, name, "kernel", (widths[j], widths[j + 1]))
        bias = _leaf(inner, name, "bias", (widths[j + 1],))
        if j == 0:
            kernel = kernel.reshape(hh, ww, prev_k, widths[1])[:, :, prev_idx, :]
            kernel = kernel.reshape(hh * ww * len(prev_idx), widths[1])
        if j == num_dense - 1 and target_class is not None:
            cols = np.asarray([int(target_class)])
            kernel, bias = kernel[:, cols], bias[cols]
        out[name] = {"kernel": jnp.asarray(kernel), "bias": jnp.asarray(bias)}

    extra = sorted(set(inner) - set(out))
    if extra:
        raise ExtractError(f"params have layers the model does not: {extra}")
    small = _small_model(model, _kept_counts(spec, host_mask),
                         model.num_classes if target_class is None else 1)
    return small, ({"params": out} if wrapped else out)


def _size(model: ConvNet, kept: Mapping[str, int] | None, num_outputs: int) -> tuple[int, int]:
    """(params, MACs per image) of `model` with `kept` kernels and `num_outputs` logits."""
    spec = model.conv_spec()
    kept = dict(spec.num_kernels if kept is None else kept)
    params = 0
    prev = spec.image_shape[2]
    for layer in spec.layers:
        k = kept[layer.name]
        params += 9 * prev * k + k
        prev = k
    widths = list(model.head_widths())
    widths[0] = spec.head_in_hw[0] * spec.head_in_hw[1] * prev
    widths[-1] = num_outputs
    params += sum(a * b + b for a, b in zip(widths[:-1], widths[1:]))
    macs = conv_macs(model, kept) + head_macs(model, last_kept=prev, num_outputs=num_outputs)
    return params, macs


def _stats(kept: Mapping[str, int], total_kernels: int, full: tuple[int, int],
           module: tuple[int, int], single: tuple[int, int]) -> dict[str, float | int]:
    kept_kernels = int(sum(kept.values()))
    return {
        "kept_kernels": kept_kernels,
        "total_kernels": int(total_kernels),
        "kept_kernel_fraction": kept_kernels / total_kernels,
        "kept_fraction": kept_kernels / total_kernels,  # the name the search summary uses
        "params": int(module[0]),
        "macs": int(module[1]),
        "model_params": int(full[0]),
        "model_macs": int(full[1]),
        "params_fraction": module[0] / full[0],
        "macs_fraction": module[1] / full[1],
        "single_output_params": int(single[0]),
        "single_output_macs": int(single[1]),
        "single_output_params_fraction": single[0] / full[0],
        "single_output_macs_fraction": single[1] / full[1],
        "kept_per_layer": {name: int(k) for name, k in kept.items()},
    }


def stats_from_mask(model: ConvNet, mask: Mapping[str, Any]) -> dict[str, float | int]:
    """Kept kernels, parameters and MACs of a module, and their fractions of the model.

    Computed from the mask and the conv spec alone (no params). Convention
    (see the module docstring): `params`/`macs` and `params_fraction`/
    `macs_fraction` are the module with the whole classifier against the
    whole model (all-ones mask -> 1.0); `single_output_*` are the
    one-logit module that `extract(..., target_class=c)` returns.

    Args:
      model: the full model.
      mask: one module's mask `{conv_name: bool[K_l]}` (validated).

    Returns:
      a dict of Python ints/floats: `kept_kernels`, `total_kernels`,
      `kept_kernel_fraction` (alias `kept_fraction`), `params`, `macs`,
      `model_params`, `model_macs`, `params_fraction`, `macs_fraction`,
      `single_output_params`, `single_output_macs`,
      `single_output_params_fraction`, `single_output_macs_fraction`, and
      `kept_per_layer` (`{conv_name: int}`).
    """
    spec, host_mask = _host_mask(model, mask)
    kept = _kept_counts(spec, host_mask)
    full = _size(model, None, model.num_classes)
    return _stats(kept, spec.total_kernels, full, _size(model, kept, model.num_classes),
                  _size(model, kept, 1))


def convnet_module_stats(model: ConvNet, params: Mapping,
                         mask: Mapping[str, Any]) -> dict[str, float | int]:
    """`stats_from_mask`'s keys, counted on the actually extracted modules.

    Parameters are `count_params` of the params `extract` returns (with all
    classifier columns, and with one for `single_output_*`) and of `params`;
    MACs are those of the extracted `ConvNet`s. They equal `stats_from_mask`'s
    analytic counts; this is the check that the module is as small as claimed.
    """
    spec, host_mask = _host_mask(model, mask)
    kept = _kept_counts(spec, host_mask)

    def size(m: ConvNet, p: Mapping) -> tuple[int, int]:
        return count_params(p), conv_macs(m) + head_macs(m)

    module = size(*extract_convnet(model, params, host_mask))
    single = size(*extract_convnet(model, params, host_mask, target_class=0))
    full = size(model, params["params"] if set(params) == {"params"} else params)
    return _stats(kept, spec.total_kernels, full, module, single)


# -- generic extraction over a traced kernel graph ------------------------------------

VALID_KEY = "channel_valid"  # module_variables entry of gather's valid flags


def _class_check(graph: Graph, target_class: int | None) -> None:
    if target_class is None:
        return
    if isinstance(target_class, (bool, np.bool_)) or not isinstance(target_class, (int, np.integer)):
        raise ExtractError(f"target_class must be an int class index or None, got {target_class!r}")
    if not 0 <= int(target_class) < graph.num_outputs:
        raise ExtractError(f"target_class {int(target_class)} is out of range; the model has "
                           f"classes 0..{graph.num_outputs - 1}")


def _module_apply(graph: Graph, buckets: dict[str, int], target_class: int | None,
                  matmul_max_hw: int = 0):
    """`fn(module_variables, x)` for modules with `buckets[rep]` channels per tie group.

    One function object per (buckets, target_class, matmul_max_hw), cached on
    the graph, so `jax.jit(module_apply)` compiles once for all modules of the
    same sizes.
    """
    key = (tuple(sorted(buckets.items())), target_class, int(matmul_max_hw))
    if key not in graph._modules:
        graph._modules[key] = _make_module_apply(graph, dict(buckets), target_class,
                                                 int(matmul_max_hw))
    return graph._modules[key]


def _make_module_apply(graph: Graph, buckets: dict[str, int], target_class: int | None,
                       matmul_max_hw: int = 0):

    def module_apply(module_variables: Mapping, x: jax.Array) -> jax.Array:
        """Module output: `(N,)` class logit with a target class, else `(N, C)`."""
        chex.assert_rank(x, len(graph.input_shape) + 1)
        variables = {k: v for k, v in module_variables.items() if k != VALID_KEY}
        valid = module_variables.get(VALID_KEY)
        plan = graph.plan(tuple(x.shape), x.dtype)
        gid = graph.group_of(plan)
        sizes = {gid[n]: b for n, b in buckets.items()}
        if target_class is not None and plan.has_class:
            sizes[CLASS_GID] = 1
        leaves, treedef = jax.tree_util.tree_flatten(variables)
        if treedef != plan.treedef:
            raise ExtractError(f"module variables do not have the traced structure: got "
                               f"{treedef}, expected {plan.treedef}")
        vectors = {} if valid is None else {gid[n]: valid[n] for n in buckets}
        out = graph_lib.evaluate(graph, plan, leaves, x, sizes=sizes, vectors=vectors,
                                 matmul_max_hw=matmul_max_hw)
        if target_class is None:
            return out
        return out[:, 0] if plan.has_class else out[:, int(target_class)]

    return module_apply


def _gather_leaves(graph: Graph, variables: Mapping, idx_by_name: Mapping[str, jax.Array],
                   target_class: int | None) -> dict:
    plan = masks_lib._any_plan(graph)
    leaves = masks_lib._check_variables(graph, variables, plan)
    gid = graph.group_of(plan)
    host = all(isinstance(v, np.ndarray) for v in idx_by_name.values())
    xp = np if host else jnp
    idx = {gid[n]: xp.asarray(v, xp.int32) for n, v in idx_by_name.items()}
    if target_class is not None and plan.has_class:
        idx[CLASS_GID] = xp.asarray([int(target_class)], xp.int32)
    out = list(leaves)
    for leaf, lab in plan.leaf_labels.items():
        if not any(lay is not None and graph_lib._groups(lay) & set(idx) for lay in lab):
            continue
        value = np.asarray(out[leaf]) if host else out[leaf]
        out[leaf] = jnp.asarray(graph_lib.take_channels(value, lab, idx, xp))
    return jax.tree_util.tree_unflatten(plan.treedef, out)


def gather(graph: Graph, variables: Mapping, indices: Mapping[str, jax.Array],
           valid: Mapping[str, jax.Array], target_class: int | None = None, *,
           matmul_max_hw: int = 0):
    """A padded module: B_s gathered channels per site, `valid` flags which are real.

    Args:
      graph: `jaxsplit.trace(...)` of the model.
      variables: the full variables dict.
      indices: `{site: int[B_s]}` for every free (representative) site, a static
        bucket size B_s >= its kept count; padding entries may point at any
        channel. Tied members, if given, are ignored (the representative's are
        used). May be traced (jit / vmap).
      valid: `{site: bool[B_s]}`, True for real entries, same keys.
      target_class: keep only this output column (then the module outputs `(N,)`).
      matmul_max_hw: convs whose input maps are at most this size in every
        spatial dimension run as one dense matmul (faster on CPU for 2x2 maps,
        see `jaxsplit.search.fast_evaluate.DENSE_MAX_HW`); 0: as traced.

    Returns:
      `(module_apply, module_variables)`: `module_variables` is `variables` with
      every channel-labelled axis gathered, plus `{"channel_valid": valid}`;
      `module_apply(module_variables, x)` multiplies every consumer's input by
      `valid`, so padded channels contribute exactly zero, and equals
      `masked_apply` with the mask of the valid indices up to float rounding.
    """
    _class_check(graph, target_class)
    reps = graph.free_layers
    for d, what in ((indices, "indices"), (valid, "valid")):
        if not isinstance(d, Mapping):
            raise ExtractError(f"{what} must be a dict {{site: array}}, got {type(d).__name__}")
        missing = [n for n in reps if n not in d]
        unknown = [n for n in d if n not in graph.names]
        if missing or unknown:
            raise ExtractError(f"{what} must have an entry per free site {list(reps)}; missing "
                               f"{missing}, unknown {unknown}")
    buckets = {}
    for n in reps:
        chex.assert_rank(indices[n], 1, custom_message=f"indices of {n}")
        chex.assert_shape(valid[n], indices[n].shape, custom_message=f"valid of {n}")
        buckets[n] = int(indices[n].shape[0])
        if buckets[n] < 1:
            raise ExtractError(f"bucket of {n} is empty; every site keeps at least one channel")
    module_variables = dict(_gather_leaves(graph, variables, {n: indices[n] for n in reps},
                                           target_class))
    module_variables[VALID_KEY] = {n: jnp.asarray(valid[n]) for n in reps}
    return _module_apply(graph, buckets, target_class, matmul_max_hw), module_variables


def _generic_host_mask(graph: Graph, mask: Mapping[str, Any]) -> dict[str, np.ndarray]:
    masks_lib.validate(mask, graph, batch_shape=())
    return {n: np.asarray(mask[n], dtype=bool) for n in graph.names}


def extract(graph: Graph | ConvNet, variables: Mapping, mask: Mapping[str, Any],
            target_class: int | None = None):
    """The module of `mask` with only its kept kernels, for any traced model.

    Args:
      graph: `jaxsplit.trace(apply_fn, variables, x)`. (A jaxsplit `ConvNet`
        here instead selects `extract_convnet`, which returns a smaller ConvNet.)
      variables: the full variables dict of the traced structure.
      mask: one module's mask `{site: bool[K_s]}` (host or device, no batch
        axes), every site keeping >= 1 kernel and tied sites equal (a
        `MaskError` names the site otherwise).
      target_class: None keeps all C outputs; an int keeps that output only.

    Returns:
      `(module_apply, module_variables)`: `module_variables` has the traced
      structure with only kept kernels (site kernels `(..., K'_s)`, consumer
      inputs and Dense rows `K'`-sized, carriers `(K'_s,)`; the classifier's
      column `c` only when the head is a plain Dense); `module_apply(
      module_variables, x)` -> `(N,)` logit of `target_class`, or `(N, C)`;
      equal to `masked_apply` within float rounding.
    """
    if isinstance(graph, ConvNet):
        return extract_convnet(graph, variables, mask, target_class)
    if not isinstance(graph, Graph):
        raise ExtractError(f"extract takes a jaxsplit Graph (or ConvNet), got {type(graph).__name__}")
    _class_check(graph, target_class)
    host = _generic_host_mask(graph, mask)
    idx = {n: np.flatnonzero(host[n]) for n in graph.free_layers}
    buckets = {n: int(v.size) for n, v in idx.items()}
    module_variables = _gather_leaves(graph, variables, idx, target_class)
    return _module_apply(graph, buckets, target_class), module_variables


def _generic_stats(graph: Graph, mask: Mapping[str, Any],
                   target_class: int | None) -> dict[str, Any]:
    _class_check(graph, target_class)
    host = _generic_host_mask(graph, mask)
    plan = masks_lib._any_plan(graph)
    gid = graph.group_of(plan)
    kept = {n: int(host[n].sum()) for n in graph.names}
    sizes = {gid[n]: kept[n] for n in graph.free_layers}
    if target_class is not None and plan.has_class:
        sizes[CLASS_GID] = 1
    shapes = jax.tree_util.tree_leaves(graph.leaf_shapes)

    def counts(sz: Mapping[int, int]) -> tuple[int, int]:
        params = variables = 0
        for leaf, (path, sds) in enumerate(zip(graph.leaf_paths, shapes)):
            lab = plan.leaf_labels.get(leaf, (None,) * len(sds.shape))
            n = math.prod(s if lay is None else graph_lib._size(lay, sz)
                          for s, lay in zip(sds.shape, lab))
            variables += n
            params += n if path[0] == "params" else 0
        return params, variables

    params, variables = counts(sizes)
    full_params, full_variables = counts({})
    macs, full_macs = graph_lib.macs(plan, sizes), graph_lib.macs(plan, {})
    total = graph.total_kernels
    kept_kernels = sum(kept.values())
    return {
        "kept_kernels": kept_kernels,
        "kernels": total,
        "total_kernels": total,
        "kept_fraction": kept_kernels / total,
        "kept_kernel_fraction": kept_kernels / total,
        "params": params,
        "variables": variables,
        "macs": macs,
        "model_params": full_params,
        "model_variables": full_variables,
        "model_macs": full_macs,
        "params_fraction": params / full_params,
        "macs_fraction": macs / full_macs,
        "kept_per_layer": kept,
    }


def module_stats(graph: Graph | ConvNet, mask: Mapping[str, Any], *args,
                 target_class: int | None = None) -> dict[str, Any]:
    """Kept kernels, params and MACs of a module and their fractions of the model.

    `module_stats(graph, mask, target_class=None)` for a traced `Graph`:
    `params` counts the `params` collection of exactly what `extract` returns
    (`variables` counts every collection), `macs` the convs and Dense layers
    per image with the kept channel counts (`model_*`: the full model).
    Keys: `kept_kernels`, `kernels` (alias `total_kernels`), `kept_fraction`
    (alias `kept_kernel_fraction`), `params`, `variables`, `macs`,
    `model_params`, `model_variables`, `model_macs`, `params_fraction`,
    `macs_fraction`, `kept_per_layer`.

    `module_stats(model, params, mask)` with a jaxsplit `ConvNet` is
    `convnet_module_stats` (counted on the extracted ConvNets).
    """
    if isinstance(graph, ConvNet):
        if len(args) != 1:
            raise ExtractError("module_stats(model, params, mask) takes the ConvNet's params "
                               "and one mask")
        return convnet_module_stats(graph, mask, args[0])
    if args:
        raise ExtractError(f"module_stats(graph, mask) takes no further positional arguments, "
                           f"got {len(args)}")
    if not isinstance(graph, Graph):
        raise ExtractError(f"module_stats takes a jaxsplit Graph (or ConvNet), got "
                           f"{type(graph).__name__}")
    return _generic_stats(graph, mask, target_class)


class _CallableModule(types.ModuleType):
    """`jaxsplit.extract` is this module and also the generic `extract` function.

    `from jaxsplit import extract` keeps giving the module (`extract.extract`,
    `extract.stats_from_mask`, ...), and `jaxsplit.extract(graph, variables,
    mask)` calls `extract.extract`.
    """

    def __call__(self, *args, **kwargs):
        return extract(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
