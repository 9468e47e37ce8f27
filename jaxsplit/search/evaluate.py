"""Population evaluator: the logit table L of docs/method.md §6 step 1.

For every class row c and individual i, the module "model masked with
`masks[c, i]`" gives its class-`classes[c]` logit on every image:

    L[c, i, n] = masked_fn(variables, masks[c, i], images[n])[classes[c]]

where `masked_fn = jaxsplit.masked_apply(graph, apply_fn)` (activation
masking with shared weights over the traced kernel graph). This is the
expensive step of the search (C·P·N forward passes). Everything downstream
(`fitness.py`) only needs L and the masks.

The interface every backend implements (`Evaluator`):

    evaluate_fn(variables, masks, images, classes) -> L
      variables: the model's full variables dict ({"params": ..., "batch_stats": ...}).
      masks:     {site: bool[C, P, K_s]}   (C class rows, P individuals)
      images:    float32 (N, *input_shape)
      classes:   int32 (C,)   class id of each mask row (usually arange(C))
      L:         float32 (C, P, N)

Backends: "reference" (here: any traced model; `jit(vmap)` over
individuals, chunked over individuals and images), "fast" (host-planned,
physically extracted modules, imported lazily:
`jaxsplit.search.fast_evaluate.make_fast_evaluator`, the segment-wise
`jaxsplit.search.fast_graph.GraphFastEvaluator` over any traced model, a
`jaxsplit.models.ConvNet` traced like the others) and "device"
(`jaxsplit.search.device_evaluate.make_device_evaluator`: kept kernels
gathered on device into bucketed blocks, jit-only; ConvNet only).
`make_evaluator` picks one; "auto" follows `resolve_backend(target, platform)`:
`default_backend(platform)`, with "reference" instead of "device" for a model
that is not a ConvNet.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Literal, Protocol

import chex
import jax
import jax.numpy as jnp
import numpy as np

from jaxsplit import masks as masks_lib
from jaxsplit.errors import JaxsplitError
from jaxsplit.models.convnet import ConvNet, ConvSpec, convnet_of

Backend = Literal["reference", "fast", "device", "auto"]
BACKENDS = ("reference", "fast", "device", "auto")


class EvaluatorInputError(JaxsplitError, ValueError):
    """Variables, masks, images or classes that do not fit the evaluator."""


class EvaluatorBackendError(JaxsplitError, ValueError):
    """An unknown or unavailable evaluator backend."""


class Evaluator(Protocol):
    """`evaluate_fn(variables, masks, images, classes) -> L (C, P, N) float32`.

    Args:
      variables: the model's full variables dict (`{"params": ..., ...}`).
      masks: `{site: bool[C, P, K_s]}`, one entry per kernel site of the graph.
      images: `(N, *input_shape)` float32.
      classes: `(C,)` int32, the class id each mask row is a module of.

    Returns:
      `L (C, P, N)` float32; `L[c, i, n]` = logit `classes[c]` of the model
      masked with row `(c, i)` on image n.
    """

    def __call__(self, variables: Mapping, masks: Mapping[str, jax.Array], images: jax.Array,
                 classes: jax.Array) -> jax.Array: ...


# -- what an evaluator needs to know of a model --------------------------------------------


def model_graph(model: ConvNet) -> Any:
    """The kernel graph of a `ConvNet` (its `conv_spec()`: the same names, kernel counts and
    ties as `jaxsplit.trace` gives for it)."""
    return model.conv_spec()


def model_masked_apply(model: ConvNet) -> Callable:
    """`fn(variables, mask, x) -> logits` of a `ConvNet` (activation masking, shared weights)."""
    def fn(variables, mask, x):
        return model.apply(variables, x, masks=mask)
    return fn


def masked_apply_of(graph: Any, apply_fn: Callable) -> Callable:
    """`fn(variables, mask, x) -> logits`: activation masking of the model behind `apply_fn`.

    `jaxsplit.masks.masked_apply(graph, apply_fn)` for a traced graph; for a
    `ConvNet`'s conv spec, `model_masked_apply` (its built-in mask argument).
    """
    masked_apply = getattr(masks_lib, "masked_apply", None)
    if masked_apply is not None and not isinstance(graph, ConvSpec):
        return masked_apply(graph, apply_fn)
    convnet = convnet_of(apply_fn)
    if convnet is not None:
        return model_masked_apply(convnet)
    raise EvaluatorInputError(
        f"no masked apply for {type(graph).__name__}: trace the model with jaxsplit.trace")


def example_shape(graph: Any) -> tuple[int, ...]:
    """The shape of one input (no batch axis) of a graph's model."""
    shape = getattr(graph, "image_shape", None)
    if shape is None:
        shape = getattr(graph, "input_shape", ())
    return tuple(int(d) for d in shape)


def target_info(target: Any) -> tuple[Any, tuple[int, ...], int]:
    """`(graph, input_shape without the batch axis, num_classes)` of a ConvNet or a graph.

    A graph is anything with the kernel-graph API (`names`, `num_kernels`,
    `ties`, `layer(name)`) plus `input_shape` and `num_outputs` (a
    `jaxsplit.graph.Graph`) or a `ConvSpec` (`image_shape`).
    """
    if isinstance(target, ConvNet):
        spec = model_graph(target)
        return spec, tuple(spec.image_shape), int(target.num_classes)
    if hasattr(target, "input_shape") and hasattr(target, "num_outputs"):
        return target, example_shape(target), int(target.num_outputs)
    if hasattr(target, "image_shape"):
        return target, example_shape(target), -1
    raise EvaluatorInputError(
        f"expected a ConvNet or a kernel graph (jaxsplit.trace), got {type(target).__name__}")


def check_eval_inputs(target: Any, masks: Mapping[str, jax.Array], images: jax.Array,
                      classes: jax.Array) -> tuple[int, int, int]:
    """Validate evaluator inputs (works on tracers); return `(C, P, N)`.

    Args:
      target: a `ConvNet` or a kernel graph (see `target_info`).

    Raises:
      EvaluatorInputError: naming the bad shape/dtype and what was expected.
    """
    spec, input_shape, num_classes = target_info(target)
    names = tuple(spec.names)
    if not isinstance(masks, Mapping):
        raise EvaluatorInputError(
            f"masks must be a dict {{site: bool[C, P, K_s]}}, got {type(masks).__name__}")
    first = masks.get(names[0]) if names else None
    if first is None or np.ndim(first) != 3:
        raise EvaluatorInputError(
            f"masks need leading axes (C, P): expected {names[0]} of shape (C, P, "
            f"{spec.num_kernels[names[0]]}), got "
            f"{None if first is None else tuple(np.shape(first))}")
    num_rows, num_individuals = int(first.shape[0]), int(first.shape[1])
    lead = {n: tuple(np.shape(masks[n])[:-1]) for n in names if n in masks}
    if len(set(lead.values())) > 1:
        raise EvaluatorInputError(
            f"mask layers have different leading (C, P) axes: {lead}; expected the same (C, P) "
            f"for every layer")
    try:
        masks_lib.validate(masks, spec, batch_shape=(num_rows, num_individuals), check_values=False)
    except masks_lib.MaskError as err:
        raise EvaluatorInputError(f"masks: {err}") from err
    if np.ndim(images) != len(input_shape) + 1 or tuple(images.shape[1:]) != input_shape:
        raise EvaluatorInputError(
            f"images have shape {tuple(np.shape(images))}; expected (N, "
            f"{', '.join(map(str, input_shape))})" + (" (NHWC)" if len(input_shape) == 3 else ""))
    if not jnp.issubdtype(images.dtype, jnp.floating):
        raise EvaluatorInputError(f"images have dtype {images.dtype}; expected float32")
    if np.ndim(classes) != 1 or int(classes.shape[0]) != num_rows:
        raise EvaluatorInputError(
            f"classes have shape {tuple(np.shape(classes))}; expected ({num_rows},) = one class "
            f"id per mask row (masks have C={num_rows} rows)")
    if not jnp.issubdtype(classes.dtype, jnp.integer):
        raise EvaluatorInputError(f"classes have dtype {classes.dtype}; expected int32")
    if num_classes > 0 and not isinstance(classes, jax.core.Tracer):
        cls = np.asarray(classes)
        if cls.size and (cls.min() < 0 or cls.max() >= num_classes):
            raise EvaluatorInputError(
                f"classes {cls.tolist()} must lie in [0, {num_classes}) (the model's "
                f"outputs)")
    return num_rows, num_individuals, int(images.shape[0])


def is_traced(tree: Any) -> bool:
    """Whether any leaf of `tree` is a tracer (the call runs under `jit`/`vmap`/`shard_map`)."""
    return any(isinstance(x, jax.core.Tracer) for x in jax.tree_util.tree_leaves(tree))


def check_variables(variables: Any) -> None:
    """A full variables dict (`{"params": ...}`), not the inner params dict."""
    if not isinstance(variables, Mapping) or "params" not in variables:
        keys = list(variables)[:4] if isinstance(variables, Mapping) else type(variables).__name__
        raise EvaluatorInputError(
            f"evaluators take the model's full variables dict {{'params': ..., ...}}; got "
            f"{keys} (wrap inner params as {{'params': params}})")


def _pad_axis0(x: jax.Array, size: int) -> jax.Array:
    """Pad axis 0 up to `size` by repeating row 0 (any real row keeps the math finite)."""
    extra = size - x.shape[0]
    if extra == 0:
        return x
    return jnp.concatenate([x, jnp.broadcast_to(x[:1], (extra, *x.shape[1:]))], axis=0)


def _chunks(x: jax.Array, chunk: int) -> jax.Array:
    """`(M, ...)` -> `(ceil(M / chunk), chunk, ...)`, padding the last chunk."""
    num = -(-x.shape[0] // chunk)
    return _pad_axis0(x, num * chunk).reshape(num, chunk, *x.shape[1:])


class ReferenceEvaluator:
    """Activation masking with shared weights, `vmap` over individuals, chunked.

    Works on any traced model: `masked_fn(variables, mask, x) -> logits`
    is `jaxsplit.masked_apply(graph, apply_fn)` (for a `ConvNet`,
    `model_masked_apply(model)` gives the same values).

    The C·P individuals are flattened and processed `chunk_individuals` at a
    time (outer `lax.map`); for each chunk the images are processed
    `chunk_images` at a time (inner `lax.map`); a chunk is one
    `vmap(masked_fn)` over `chunk_individuals` masks on `chunk_images`
    images. Last chunks are padded (with a copy of the first row/image) and
    the padding is cut from the result, so values do not depend on the chunk
    sizes.

    Peak memory ≈ chunk_individuals × chunk_images × (largest per-image
    activation of one layer, in bytes, × a small constant for the live
    input/output of a conv) + variables + images + the output L (C·P·N·4
    bytes). It does not grow with P or N beyond the inputs and the output.
    E.g. SimCNN at 32x32: the largest activation is 32·32·64·4 B = 256 KiB
    per image, so 16 × 1000 chunks need ≈ 4 GiB × 2-3; lower
    `chunk_images` on small devices.

    One compilation per (C, P, N, variables, image) shapes; `num_traces`
    counts traces (for tests).

    Attributes:
      graph: the kernel graph (mask names and sizes; a `ConvSpec` for a ConvNet).
      masked_fn: `fn(variables, mask {site: (K_s,)}, x (n, ...)) -> (n, num_outputs)`.
      chunk_individuals: masks evaluated together (capped at C·P).
      chunk_images: images evaluated together (capped at N).
    """

    def __init__(self, target: Any, masked_fn: Callable | None = None, *,
                 chunk_individuals: int = 16, chunk_images: int = 1000):
        for name, value in (("chunk_individuals", chunk_individuals), ("chunk_images", chunk_images)):
            if not isinstance(value, (int, np.integer)) or value < 1:
                raise EvaluatorInputError(f"{name} must be an int >= 1, got {value!r}")
        if masked_fn is None:
            if not isinstance(target, ConvNet):
                raise EvaluatorInputError(
                    "ReferenceEvaluator of a graph needs masked_fn = jaxsplit.masked_apply(graph, "
                    "apply_fn)")
            masked_fn = model_masked_apply(target)
        self.target = target
        self.graph = target_info(target)[0]
        self.masked_fn = masked_fn
        self.chunk_individuals = int(chunk_individuals)
        self.chunk_images = int(chunk_images)
        self.num_traces = 0
        self._jitted = jax.jit(self._evaluate)

    def __call__(self, variables: Mapping, masks: Mapping[str, jax.Array], images: jax.Array,
                 classes: jax.Array) -> jax.Array:
        """See `Evaluator`."""
        check_variables(variables)
        check_eval_inputs(self.target, masks, images, classes)  # value checks need concrete arrays
        return self._jitted(variables, masks, images, classes)

    def _evaluate(self, variables, masks, images, classes) -> jax.Array:
        self.num_traces += 1
        num_rows, num_individuals, num_images = check_eval_inputs(self.target, masks, images,
                                                                  classes)
        names = tuple(self.graph.names)
        total = num_rows * num_individuals
        bi = min(self.chunk_individuals, total)
        bn = min(self.chunk_images, num_images)
        # (C, P, K) -> (M, K) -> (num_chunks, bi, K), in graph order.
        flat_masks = {n: _chunks(masks[n].reshape(total, -1), bi) for n in names}
        row_class = _chunks(jnp.repeat(classes.astype(jnp.int32), num_individuals), bi)
        image_chunks = _chunks(images.astype(jnp.float32), bn)  # (num_image_chunks, bn, ...)

        def one_module(mask, cls, x):  # mask {n: (K,)}, cls (), x (bn, ...) -> (bn,)
            logits = self.masked_fn(variables, mask, x)
            return logits[:, cls]

        def individual_chunk(args):  # ({n: (bi, K)}, (bi,)) -> (bi, N_pad)
            mask_chunk, cls_chunk = args
            per_images = jax.lax.map(
                lambda x: jax.vmap(one_module, in_axes=(0, 0, None))(mask_chunk, cls_chunk, x),
                image_chunks)  # (num_image_chunks, bi, bn)
            return jnp.moveaxis(per_images, 0, 1).reshape(bi, -1)

        out = jax.lax.map(individual_chunk, (flat_masks, row_class))  # (num_chunks, bi, N_pad)
        out = out.reshape(-1, out.shape[-1])[:total, :num_images]
        result = out.reshape(num_rows, num_individuals, num_images).astype(jnp.float32)
        chex.assert_shape(result, (num_rows, num_individuals, num_images))
        return result


def default_backend(platform: str) -> Literal["reference", "fast", "device"]:
    """The backend "auto" picks on a JAX platform ("cpu", "gpu", "cuda", "rocm", "tpu", ...).

    Rule: "fast" on CPU (for any model: the tuned evaluator for a ConvNet,
    `jaxsplit.search.fast_graph` for any other traced model); "device" on an
    accelerator (gpu/cuda/rocm/tpu; ConvNet only, `resolve_backend` gives
    any other model "reference" there); "reference" on any other platform. The "device" backend does the fast
    backend's kept-kernel arithmetic (about f² of the reference's FLOPs at a
    kept fraction f) inside one jit, with no host planning in the step, so
    an accelerator is never left waiting on Python; `benchmarks/device_check.sh`
    measures it against the reference and the PyTorch loop on the device. Measured on 2 shared CPU cores (AVX-512, jax
    0.10, `benchmarks/fast_evaluator_probe.py`, 50% of kernels kept, same
    process): SimCNN width 0.25, 24 modules x 256 images: fast 9,660 vs
    reference 1,315 solution·images/s (7.3x); width 1.0, 4 x 64: 1,400 vs
    53 (27x). Same probe, SimCNN width 0.25, 16 modules x 1000 32x32x3
    images, 50% kept, load 2-6 on the 2 cores (`--backends graph,fast,reference`):
    tuned fast 5,399, generic fast (`fast_graph` over the traced SimCNN) 2,787,
    reference 977. The fast backend spends FLOPs on kept kernels only and avoids
    the vmapped (grouped) convolutions that XLA's CPU backend runs slowly.
    On GPU/TPU it is not measured here: it runs a few modules at a time
    (small kernels, host-side planning), where the vmapped reference is
    expected to use an accelerator better.
    """
    if platform == "cpu":
        return "fast"
    if platform in ("gpu", "cuda", "rocm", "tpu"):
        return "device"
    return "reference"


def resolve_backend(target: Any, platform: str) -> Literal["reference", "fast", "device"]:
    """The backend "auto" picks for `target` (a `ConvNet` or a traced graph) on `platform`.

    `default_backend(platform)`, except that the "device" backend is written
    for a `ConvNet` only, so any other model gets "reference" on an
    accelerator. On CPU every model gets "fast" (the tuned ConvNet evaluator
    for a ConvNet, `jaxsplit.search.fast_graph` for any other traced model).
    """
    backend = default_backend(platform)
    if backend == "device" and not isinstance(target, ConvNet):
        return "reference"
    return backend


def make_evaluator(target: Any, backend: Backend = "reference", *,
                   masked_fn: Callable | None = None, chunk_individuals: int = 16,
                   chunk_images: int = 1000, **fast_options) -> Evaluator:
    """An `Evaluator` for a model.

    Args:
      target: a `ConvNet`, or the kernel graph of any traced model
        (`jaxsplit.trace`), then with `masked_fn`.
      backend: "reference" (`ReferenceEvaluator`), "fast"
        (`jaxsplit.search.fast_evaluate.make_fast_evaluator`: a ConvNet is traced,
        then as any graph), "device" (`jaxsplit.search.device_evaluate.make_device_evaluator`,
        ConvNet only), or "auto" (`resolve_backend(target, jax.default_backend())`:
        "fast" on CPU for every model, "device" on an accelerator for a ConvNet,
        else "reference").
      masked_fn: `jaxsplit.masked_apply(graph, apply_fn)` for a graph target
        (default for a ConvNet: `model_masked_apply(model)`).
      chunk_individuals: masks evaluated together (bounds peak memory).
      chunk_images: images evaluated together (bounds peak memory).
      **fast_options: more options of `make_fast_evaluator` (`num_buckets`,
        `num_workers`, `share_first_conv`, `cache_bytes`, `matmul_max_hw`,
        `prefix_bytes`, `group_rows`) or of `make_device_evaluator`
        (`compute_dtype`, `num_levels`); each backend takes its own and ignores
        the others ("reference" ignores all).

    Raises:
      EvaluatorBackendError: unknown backend, "device" for a model that is not a
        ConvNet, or "fast" for a target that is neither a ConvNet nor a graph.
    """
    if backend not in BACKENDS:
        raise EvaluatorBackendError(f"unknown evaluator backend {backend!r}; expected one of {BACKENDS}")
    is_convnet = isinstance(target, ConvNet)
    if backend == "auto":
        backend = resolve_backend(target, jax.default_backend())
    if backend == "reference":
        return ReferenceEvaluator(target, masked_fn, chunk_individuals=chunk_individuals,
                                  chunk_images=chunk_images)
    device_keys = ("compute_dtype", "num_levels", "extractor", "member_loop")
    if backend == "device":
        if not is_convnet:
            raise EvaluatorBackendError(
                f"evaluator backend {backend!r} needs a jaxsplit.models.ConvNet, got "
                f"{type(target).__name__}; use backend='fast', 'reference' or 'auto'")
        from jaxsplit.search import device_evaluate  # late: it imports this module

        return device_evaluate.make_device_evaluator(
            target, chunk_individuals=chunk_individuals, chunk_images=chunk_images,
            **{k: v for k, v in fast_options.items() if k in device_keys})
    from jaxsplit.graph import Graph  # late: graph imports masks, which is light here

    if not is_convnet and not isinstance(target, Graph):
        raise EvaluatorBackendError(
            f"evaluator backend 'fast' needs a jaxsplit.models.ConvNet or a traced kernel "
            f"graph (jaxsplit.trace), got {type(target).__name__}")
    from jaxsplit.search import fast_evaluate  # late: it imports this module

    fast_keys = ("num_buckets", "num_workers", "share_first_conv", "cache_bytes",
                 "matmul_max_hw", "prefix_bytes", "group_rows")
    return fast_evaluate.make_fast_evaluator(
        target, chunk_individuals=chunk_individuals, chunk_images=chunk_images,
        **{k: v for k, v in fast_options.items() if k in fast_keys})


def make_evaluator_from_config(target: Any, search_cfg, *,
                               masked_fn: Callable | None = None) -> Evaluator:
    """`make_evaluator` with `SearchConfig.backend`, `chunk_individuals`, `chunk_images`
    (and, for the fast backend, `share_first_conv` and `eval_cache_mib`; for the
    device backend, `compute_dtype`).

    `target`, `masked_fn`: as `make_evaluator`. With `search_cfg.shard` and more
    than one device (`jax.device_count()`: all processes' devices after
    `jax.distributed.initialize`), the evaluator is wrapped by
    `jaxsplit.search.sharding.shard_evaluator` (population axis split over all
    of them).
    """
    evaluate_fn = make_evaluator(target, search_cfg.backend, masked_fn=masked_fn,
                                 chunk_individuals=search_cfg.chunk_individuals,
                                 chunk_images=search_cfg.chunk_images,
                                 share_first_conv=search_cfg.share_first_conv,
                                 cache_bytes=int(search_cfg.eval_cache_mib) * 2**20,
                                 compute_dtype=getattr(search_cfg, "compute_dtype", "float32"))
    if getattr(search_cfg, "shard", False) and jax.device_count() > 1:
        from jaxsplit.search.sharding import shard_evaluator  # late: sharding imports this module

        evaluate_fn = shard_evaluator(evaluate_fn, model=target)
    return evaluate_fn
