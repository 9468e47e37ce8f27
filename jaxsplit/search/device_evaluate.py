"""The "device" population evaluator: kept kernels gathered on device, jit-only.

Same contract as `jaxsplit.search.evaluate` (the `Evaluator` protocol):

    evaluate_fn(params, masks, images, classes) -> L (C, P, N) float32
    L[c, i, n] = logit classes[c] of the model masked with masks[c, i] on image n.

The reference backend spends the full model's FLOPs on every module; the
"fast" backend spends them on kept kernels only but plans every module on the
host (concrete masks, one jitted call per block), which keeps an accelerator
waiting. This backend does the fast backend's arithmetic inside one `jit`,
with no host planning in the step, so it also runs inside the driver's
compiled generation step and under `shard_map` (`search/sharding.py`):

* **Bucketed kept counts (device).** The C·P mask rows are flattened. Level
  j = 1..J (J = `num_levels`) gives conv layer l (K_l kernels) the slot
  count `B_l(j)` = `ceil(j·K_l / J)` rounded up to the layer's step
  `fast_evaluate.bucket_step(K_l, J)` (about K_l / J, a multiple of 8), at
  most K_l: about the fraction j / J of every layer. A row's level is the
  smallest j whose slots hold the kept count of every layer, so there are
  J static shape sets.
* **Groups.** Rows are sorted by level (`argsort`, stable) and cut into
  groups of `chunk_individuals` rows; a group runs at its largest member's
  level (`lax.switch` inside a `lax.map` over groups: only the taken level's
  code runs). Sorting keeps groups homogeneous, so few rows run above their
  own level.
* **Gather (device).** Per member: the slots of layer l are its kept kernel
  indices ascending (`argsort(~mask)[:B_l]`; tied residual layers have equal
  masks, hence equal slots), padded with arbitrary indices whose `valid`
  flag is False. The member's conv l is the dense block
  `w_l[:, :, slots_{l-1}, slots_l]` (3, 3, B_{l-1}, B_l) with padded rows and
  columns multiplied by zero, its bias `b_l[slots_l]·valid`; the first Dense
  layer keeps the rows of the NHWC flatten `(h, w, slot)`; the classifier
  keeps the single column `classes[c]`. Padded channels have zero weights
  and zero bias, so they carry exact zeros through ReLU, pool and residual
  adds: a padded module computes the numbers of the unpadded extracted one
  (up to float summation order).
* **Run.** Per image chunk the first conv layer of the raw images runs once
  for all its kernels (shared by the group; each member takes its slots),
  then `vmap` over the group's members runs the gathered modules
  (`member_loop="vmap"`, accelerators), or a `lax.map` runs them one after
  another (`"map"`, the CPU default: plain instead of grouped convolutions). FLOPs per
  row are those of its level's blocks: about `f²` of the full model's at a
  kept fraction f (`flops_per_individual` counts them).

Compute dtype (`compute_dtype`): "float32" (default; convolutions and dots
at `Precision.HIGHEST`), "tensorfloat32" (`Precision.HIGH`: TF32 tensor
cores on NVIDIA Ampere and later, bf16x3 passes on TPU), or "bfloat16"
(operands cast to bf16, accumulation in float32 via
`preferred_element_type`). Biases, ReLU, pooling, adds and the output stay
float32. `benchmarks/bench_device_backend.py` and
`benchmarks/device_check.py` report the argmax agreement and max |ΔL| of
each against float32.

Two gathers (`extractor`):

* "convnet" (default): written for jaxsplit's `ConvNet` (its conv chain, pools,
  residual ties, MLP head); shares the first conv across a group and supports
  every compute dtype.
* "graph": the generic `jaxsplit.extract.gather(graph, variables, indices,
  valid)` over the kernel graph traced from the model's apply
  (`jaxsplit.trace`); each member runs the traced computation at its bucket
  sizes with padded channels multiplied by `valid`. Works for any model
  `jaxsplit.trace` accepts; float32 only (the traced convolutions keep their
  own precision), and without the shared first conv.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from functools import partial
from typing import Any, Literal

import chex
import jax
import jax.numpy as jnp
import numpy as np

from jaxsplit.models.convnet import ConvNet, conv_macs, head_macs
from jaxsplit.search.evaluate import (
    EvaluatorInputError,
    _chunks,
    check_eval_inputs,
    check_variables,
)
from jaxsplit.search.fast_evaluate import bucket_step

ComputeDtype = Literal["float32", "tensorfloat32", "bfloat16"]
EXTRACTORS = ("convnet", "graph")
COMPUTE_DTYPES = ("float32", "tensorfloat32", "bfloat16")
_PRECISION = {"float32": jax.lax.Precision.HIGHEST, "tensorfloat32": jax.lax.Precision.HIGH,
              "bfloat16": jax.lax.Precision.DEFAULT}
_DIMS = ("NHWC", "HWIO", "NHWC")


def level_sizes(model: ConvNet, num_levels: int) -> tuple[dict[str, int], ...]:
    """`{conv: B_l(j)}` for the levels j = 1..num_levels (repeats dropped: at most num_levels).

    `B_l(j)` = `ceil(j·K_l / num_levels)` rounded up to a multiple of the layer's step
    `fast_evaluate.bucket_step(K_l, num_levels)`, at most K_l: level j keeps about the
    fraction j / num_levels of every layer (narrow layers in coarser, 8-aligned steps).
    """
    spec = model.conv_spec()
    out = []
    for j in range(1, num_levels + 1):
        sizes = {}
        for ly in spec.layers:
            k = ly.num_kernels
            step = bucket_step(k, num_levels)
            sizes[ly.name] = min(k, -(-(-(-j * k // num_levels)) // step) * step)
        if not out or sizes != out[-1]:  # equal consecutive levels would compile twice
            out.append(sizes)
    return tuple(out)


def row_levels(model: ConvNet, num_levels: int, flat_masks: Mapping[str, jax.Array]) -> jax.Array:
    """0-based level of each row: the smallest j whose sizes hold every layer's kept count,
    `(M,)` int32 (jnp or np, as the masks)."""
    spec = model.conv_spec()
    xp = np if all(isinstance(m, np.ndarray) for m in flat_masks.values()) else jnp
    levels = level_sizes(model, num_levels)
    level = None
    for ly in spec.layers:
        sizes = xp.asarray([lv[ly.name] for lv in levels])  # (J,) non-decreasing
        count = xp.sum(flat_masks[ly.name].astype(xp.int32), axis=-1)
        lv = xp.sum(sizes[None, :] < count[:, None], axis=-1)  # sizes below the count
        level = lv if level is None else xp.maximum(level, lv)
    return xp.minimum(level, len(levels) - 1).astype(xp.int32)


def _conv(x, w, dtype: str):
    if dtype == "bfloat16":
        x, w = x.astype(jnp.bfloat16), w.astype(jnp.bfloat16)
    return jax.lax.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=_DIMS,
                                        precision=_PRECISION[dtype],
                                        preferred_element_type=jnp.float32)


def _dot(x, w, dtype: str):
    if dtype == "bfloat16":
        x, w = x.astype(jnp.bfloat16), w.astype(jnp.bfloat16)
    return jnp.matmul(x, w, precision=_PRECISION[dtype], preferred_element_type=jnp.float32)


def _pool(x):
    return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")


class DeviceEvaluator:
    """Bucketed, gathered modules evaluated with `vmap`, all inside one `jit`.

    Peak memory ≈ chunk_individuals × (the gathered weights of one module at
    the group's level + chunk_images × the largest per-image activation × a
    small constant) + the first layer's full activation of one image chunk +
    params + images + L.

    Attributes:
      model: the `ConvNet`.
      chunk_individuals: rows per group (one `vmap`).
      chunk_images: images per chunk.
      num_levels: bucket levels per layer (static shape sets; each is compiled).
      compute_dtype: "float32", "tensorfloat32" or "bfloat16" (see module doc).
      extractor: "convnet" (ConvNet-specific gather) or "graph" (`extract.gather`).
      graph: the traced kernel graph ("graph" extractor), else None.
      member_loop: "vmap" (the group's members batched: grouped convolutions)
        or "map" (members one after another inside the jit: plain convolutions,
        which XLA's CPU backend runs ~12x faster at SimCNN width 0.25); "auto"
        (default) = "map" on CPU, "vmap" on accelerators (not yet measured
        there: `benchmarks/device_check.sh` times both).
      levels: `level_sizes(model, num_levels)`.
      num_traces: traces of the jitted evaluation (for tests).
      host_side: False (jit-able: runs inside the driver's step and `shard_map`).
    """

    host_side = False

    def __init__(self, model: ConvNet, *, chunk_individuals: int = 16, chunk_images: int = 1000,
                 num_levels: int = 8, compute_dtype: ComputeDtype = "float32",
                 extractor: Literal["convnet", "graph"] = "convnet",
                 member_loop: Literal["auto", "vmap", "map"] = "auto"):
        for name, value in (("chunk_individuals", chunk_individuals),
                            ("chunk_images", chunk_images), ("num_levels", num_levels)):
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
                raise EvaluatorInputError(f"{name} must be an int >= 1, got {value!r}")
        if compute_dtype not in COMPUTE_DTYPES:
            raise EvaluatorInputError(
                f"compute_dtype must be one of {COMPUTE_DTYPES}, got {compute_dtype!r}")
        if extractor not in EXTRACTORS:
            raise EvaluatorInputError(f"extractor must be one of {EXTRACTORS}, got {extractor!r}")
        if member_loop not in ("auto", "vmap", "map"):
            raise EvaluatorInputError(
                f"member_loop must be 'auto', 'vmap' or 'map', got {member_loop!r}")
        if member_loop == "auto":
            member_loop = "map" if jax.default_backend() == "cpu" else "vmap"
        if extractor == "graph" and compute_dtype != "float32":
            raise EvaluatorInputError(
                f"compute_dtype {compute_dtype!r} needs extractor='convnet'; the 'graph' "
                f"extractor runs the traced model in float32")
        self.model = model
        self.extractor = extractor
        self.member_loop = member_loop
        self.graph = self._trace(model) if extractor == "graph" else None
        self.chunk_individuals = int(chunk_individuals)
        self.chunk_images = int(chunk_images)
        self.num_levels = int(num_levels)
        self.compute_dtype = compute_dtype
        self.levels = level_sizes(model, self.num_levels)
        self.num_traces = 0
        self._jitted = jax.jit(self._evaluate)

    def __call__(self, variables: Mapping, masks: Mapping[str, jax.Array], images: jax.Array,
                 classes: jax.Array) -> jax.Array:
        """See `jaxsplit.search.evaluate.Evaluator` (`variables = {"params": params}`)."""
        check_variables(variables)
        check_eval_inputs(self.model, masks, images, classes)
        return self._jitted(variables["params"], masks, images, classes)

    @staticmethod
    def _trace(model: ConvNet):
        from jaxsplit import graph as graph_lib
        from jaxsplit.models.convnet import init_params

        shapes = jax.eval_shape(lambda: {"params": init_params(model, jax.random.key(0))})
        return graph_lib.trace(partial(model.apply, train=False), shapes, model.dummy_input(1))

    def _graph_forward(self, params, mask: Mapping[str, jax.Array], cls: jax.Array,
                       sizes: Mapping[str, int], x: jax.Array) -> jax.Array:
        """One member through `extract.gather` (mask `{site: (K,)}`, cls `()`, x chunk) -> `(n,)`."""
        from jaxsplit import extract

        indices, valid = {}, {}
        for name in self.graph.free_layers:
            m = mask[name].astype(bool)
            indices[name] = jnp.argsort(~m, stable=True)[:sizes[name]].astype(jnp.int32)
            valid[name] = jnp.arange(sizes[name]) < jnp.sum(m, dtype=jnp.int32)
        module_apply, module_variables = extract.gather(self.graph, {"params": params}, indices,
                                                        valid)
        return jnp.take(module_apply(module_variables, x), cls, axis=1)

    # -- one module ---------------------------------------------------------------------

    def _gather(self, params, mask: Mapping[str, jax.Array], cls: jax.Array,
                sizes: Mapping[str, int]) -> dict[str, Any]:
        """Member weights at slot counts `sizes` (mask `{conv: (K_l,)}`, cls `()`)."""
        spec = self.model.conv_spec()
        slots, valid = {}, {}
        for ly in spec.layers:
            m = mask[ly.name].astype(bool)
            b = sizes[ly.name]
            slots[ly.name] = jnp.argsort(~m, stable=True)[:b].astype(jnp.int32)
            valid[ly.name] = (jnp.arange(b) < jnp.sum(m, dtype=jnp.int32)).astype(jnp.float32)
        out: dict[str, Any] = {"slots0": slots[spec.layers[0].name],
                               "valid0": valid[spec.layers[0].name]}
        for prev, ly in zip(spec.layers[:-1], spec.layers[1:]):
            w = params[ly.name]["kernel"]  # (3, 3, K_prev, K)
            w = jnp.take(jnp.take(w, slots[prev.name], axis=2), slots[ly.name], axis=3)
            w = w * valid[prev.name][:, None] * valid[ly.name][None, :]
            out[ly.name] = (w, jnp.take(params[ly.name]["bias"], slots[ly.name]) * valid[ly.name])
        last = spec.layers[-1]
        hf, wf = spec.head_in_hw
        num_convs = len(spec.layers)
        dense = [params[f"fc_{num_convs + j}"] for j in range(len(self.model.hidden) + 1)]
        w0 = dense[0]["kernel"].reshape(hf, wf, last.num_kernels, -1)
        w0 = jnp.take(w0, slots[last.name], axis=2) * valid[last.name][:, None]
        b0 = dense[0]["bias"]
        if len(dense) == 1:  # the first Dense is the classifier: keep column cls only
            w0, b0 = jnp.take(w0, cls, axis=3)[..., None], jnp.take(b0, cls)[None]
        head = [(w0.reshape(hf * wf * sizes[last.name], -1), b0)]
        for j, d in enumerate(dense[1:], start=1):
            if j == len(dense) - 1:
                head.append((jnp.take(d["kernel"], cls, axis=1)[:, None], jnp.take(d["bias"], cls)[None]))
            else:
                head.append((d["kernel"], d["bias"]))
        out["head"] = head
        return out

    def _forward(self, gathered: Mapping[str, Any], h0_full: jax.Array) -> jax.Array:
        """One member on an image chunk: `h0_full (n, H, W, K_0)` (first conv + ReLU of all
        kernels) -> `(n,)` logits of the member's class."""
        spec = self.model.conv_spec()
        dtype = self.compute_dtype
        first = spec.layers[0]
        h = jnp.take(h0_full, gathered["slots0"], axis=-1) * gathered["valid0"]
        if first.pool:
            h = _pool(h)
        outputs = {first.name: h}
        for ly in spec.layers[1:]:
            w, b = gathered[ly.name]
            h = jax.nn.relu(_conv(h, w, dtype) + b)
            if ly.pool:
                h = _pool(h)
            if ly.residual_from is not None:
                h = h + outputs[ly.residual_from]
            outputs[ly.name] = h
        h = h.reshape(h.shape[0], -1)
        for j, (w, b) in enumerate(gathered["head"]):
            h = _dot(h, w, dtype) + b
            if j < len(gathered["head"]) - 1:
                h = jax.nn.relu(h)
        return h[:, 0]

    # -- the population -----------------------------------------------------------------

    def _evaluate(self, params, masks, images, classes) -> jax.Array:
        self.num_traces += 1
        num_rows, num_individuals, num_images = check_eval_inputs(self.model, masks, images, classes)
        spec = self.model.conv_spec()
        first = spec.layers[0]
        total = num_rows * num_individuals
        g = min(self.chunk_individuals, total)
        bn = min(self.chunk_images, num_images)
        flat = {n: masks[n].reshape(total, -1) for n in spec.names}
        row_class = jnp.repeat(classes.astype(jnp.int32), num_individuals)
        level = row_levels(self.model, self.num_levels, flat)
        order = jnp.argsort(level, stable=True)
        num_groups = -(-total // g)
        # pad with the last (highest-level) row so padding never raises a group's level
        order_pad = jnp.concatenate([order, jnp.broadcast_to(order[-1:], (num_groups * g - total,))])
        group_rows = order_pad.reshape(num_groups, g)
        group_level = level[group_rows[:, -1]]  # sorted: the last member has the group's level
        group_masks = {n: flat[n][group_rows] for n in spec.names}  # (num_groups, g, K)
        group_cls = row_class[group_rows]
        image_chunks = _chunks(images.astype(jnp.float32), bn)  # (num_chunks, bn, H, W, Cin)
        w0, b0 = params[first.name]["kernel"], params[first.name]["bias"]

        def graph_branch(sizes, member_masks, member_cls):  # -> (g, N_pad)
            def per_chunk(x):
                one = partial(self._graph_forward, params, sizes=sizes, x=x)
                if self.member_loop == "map":
                    return jax.lax.map(lambda a: one(*a), (member_masks, member_cls))
                return jax.vmap(one)(member_masks, member_cls)  # (g, bn)

            out = jax.lax.map(per_chunk, image_chunks)
            return jnp.moveaxis(out, 0, 1).reshape(g, -1)

        def branch(sizes, member_masks, member_cls):  # -> (g, N_pad)
            if self.extractor == "graph":
                return graph_branch(sizes, member_masks, member_cls)
            gathered = jax.vmap(partial(self._gather, params, sizes=sizes))(member_masks, member_cls)

            def per_chunk(x):
                h0 = jax.nn.relu(_conv(x, w0, self.compute_dtype) + b0)
                if self.member_loop == "map":  # one member at a time: plain convolutions
                    return jax.lax.map(lambda one: self._forward(one, h0), gathered)
                return jax.vmap(self._forward, in_axes=(0, None))(gathered, h0)  # (g, bn)

            out = jax.lax.map(per_chunk, image_chunks)  # (num_chunks, g, bn)
            return jnp.moveaxis(out, 0, 1).reshape(g, -1)

        branches = [partial(branch, sizes) for sizes in self.levels]

        def one_group(args):
            lv, member_masks, member_cls = args
            if len(branches) == 1:
                return branches[0](member_masks, member_cls)
            return jax.lax.switch(lv, branches, member_masks, member_cls)

        out = jax.lax.map(one_group, (group_level, group_masks, group_cls))  # (G, g, N_pad)
        out = out.reshape(num_groups * g, -1)[:total, :num_images]
        inverse = jnp.argsort(order)
        result = out[inverse].reshape(num_rows, num_individuals, num_images).astype(jnp.float32)
        chex.assert_shape(result, (num_rows, num_individuals, num_images))
        return result


def make_device_evaluator(model: ConvNet, *, chunk_individuals: int = 16, chunk_images: int = 1000,
                          num_levels: int = 8, compute_dtype: ComputeDtype = "float32",
                          extractor: Literal["convnet", "graph"] = "convnet",
                          member_loop: Literal["auto", "vmap", "map"] = "auto",
                          **unused_options) -> DeviceEvaluator:
    """A `DeviceEvaluator` (other backends' options, e.g. `cache_bytes`, are ignored)."""
    del unused_options
    return DeviceEvaluator(model, chunk_individuals=chunk_individuals, chunk_images=chunk_images,
                           num_levels=num_levels, compute_dtype=compute_dtype,
                           extractor=extractor, member_loop=member_loop)


def flops_per_individual(model: ConvNet, masks: Mapping[str, np.ndarray], *, num_levels: int = 8,
                         chunk_individuals: int = 16) -> dict[str, np.ndarray]:
    """Counted FLOPs (2 × multiply-accumulates) per image of each row, from kept counts.

    Args:
      model: the `ConvNet`.
      masks: `{conv: bool[..., K_l]}` (numpy; any leading axes, flattened to M rows).
      num_levels, chunk_individuals: the `DeviceEvaluator`'s settings.

    Returns:
      `{"kept": (M,), "device": (M,), "reference": (M,)}`: the unpadded extracted
      module (what a physically extracted module costs), this backend at the
      row's own bucket level (the first conv layer counted in full and shared
      by the `chunk_individuals` rows of a group), and the reference backend
      (the full model on every row). Groups can run a row above its own level
      (their largest member's); `flops_per_group` is not counted here.
    """
    spec = model.conv_spec()
    flat = {n: np.asarray(masks[n]).reshape(-1, spec.layer(n).num_kernels).astype(bool)
            for n in spec.names}
    num = next(iter(flat.values())).shape[0]
    levels = level_sizes(model, num_levels)
    row_level = row_levels(model, num_levels, flat)
    first = spec.layers[0]
    first_full = first.input_hw[0] * first.input_hw[1] * 9 * first.in_channels * first.num_kernels
    one_out = 1  # the module's single class logit
    full = conv_macs(model) + head_macs(model, num_outputs=one_out)
    kept = np.zeros(num)
    device = np.zeros(num)
    for m in range(num):
        counts = {n: int(flat[n][m].sum()) for n in spec.names}
        kept[m] = conv_macs(model, counts) + head_macs(model, counts[spec.layers[-1].name], one_out)
        sizes = levels[int(row_level[m])]
        device[m] = (conv_macs(model, sizes) - _first_layer_macs(model, sizes)
                     + first_full / chunk_individuals
                     + head_macs(model, sizes[spec.layers[-1].name], one_out))
    return {"kept": 2 * kept, "device": 2 * device, "reference": np.full(num, 2.0 * full)}


def _first_layer_macs(model: ConvNet, sizes: Mapping[str, int]) -> int:
    first = model.conv_spec().layers[0]
    return math.prod(first.input_hw) * 9 * first.in_channels * int(sizes[first.name])
