"""The "fast" population evaluator: every module physically extracted, FLOPs on kept kernels only.

Written for `jaxsplit.models.ConvNet` only (its declarative layer table:
3x3 conv blocks, pools, residual adds, an MLP head) and highly tuned for it;
`make_evaluator(..., backend="fast")` selects it for a ConvNet. Any other
traced model gets the generic fast backend,
`jaxsplit.search.fast_graph.GraphFastEvaluator` (the same plan / extract /
run ideas over `jaxsplit.extract.gather`, one jitted function of the whole
traced graph per bucket level; it shares this module's `bucket_step` and row
cache, `RowCache`).

Same contract as `jaxsplit.search.evaluate` (the `Evaluator` protocol):

    evaluate_fn(variables, masks, images, classes) -> L (C, P, N) float32
    L[c, i, n] = logit classes[c] of the model masked with masks[c, i] on image n.

Why another backend: the reference backend (activation masking, shared
weights, `vmap` over individuals) spends the full model's FLOPs on every
module, although a module keeping a fraction f of every layer's kernels needs
about f² of them (docs/method.md §7: a masked kernel is a removed kernel), and `vmap`
turns its convolutions into per-individual grouped convolutions, which XLA's
CPU backend runs far below matmul speed. This backend does what CNNSplitter's
PyTorch loop does (build each module physically, run the images through
it), with the shapes kept static for XLA:

* **Plan (host, numpy).** For every individual m (the C·P mask rows,
  flattened) and conv layer l: the *slots* of l are the kept kernel indices,
  ascending (for a residual tie group: the union over the group, so both
  sides of an add use the same channel order); their count is rounded up to a
  *bucket* size `B_l = bucket_size(count, K_l, num_buckets)` (a multiple of
  `bucket_step(K_l, num_buckets)`: `ceil(K_l / num_buckets)` aligned to 8,
  at most K_l); the extra slots point at a padding index K_l.
  `plan_modules` computes this.
* **Extract (host, numpy): the physically extracted module.** The params are
  padded once per call with a zero input row and a zero output column per
  conv (`prepare_params`); a module's conv l is the dense block
  `w_pad[:, :, slots_{l-1}, cols_l]` of shape `(3, 3, B_{l-1}, B_l)` (cols_l:
  the slots that l keeps itself, the others -> K_l), its bias
  `b_pad[cols_l]`; the first Dense layer keeps the rows of the NHWC flatten
  `(h, w, slot)`; the classifier keeps the single column `classes[c]`.
  Padding slots meet zero weights and zero biases, so they carry exact zeros
  through ReLU, pool and the residual adds: the padded module computes the
  same numbers as the unpadded extracted one (up to float summation order).
  Slicing on the host costs no compilation (a jitted gather per shape
  compiled for 0.1-0.2 s) and ~10-20 ms per full-width module; the next group
  of modules is sliced while the device runs the current one.
* **Run (device, jitted per shape).** Per image chunk, the first conv layer
  of the raw images is computed once for all kernels and shared by all
  individuals (each takes its kept channels). When the first layer is
  narrow (`share_first_conv`, default for <= 32 kernels), the second conv
  layer also runs once per group of `chunk_individuals` modules of the same
  layer-1 bucket size B1: one convolution from all first-layer channels to
  every member's kept kernels side by side (`group_first_conv`: width
  `chunk_individuals * B1` whatever the group's size, so one shape per B1
  and numbers that do not depend on the other members), each member then
  takes its slice. XLA's CPU convolution with ~8 channels on 32x32 maps runs 2-3x
  below its speed with 128 outputs, which pays for the zero rows of the
  first-layer kernels a member does not keep. Then, per individual, one
  jitted call per conv block (conv + bias + ReLU [+ 2x2 max-pool] [+
  residual add]) and one for the head. The convolution is chosen per layer
  by the map's size (`conv_method`): XLA's convolution where it runs near
  matmul speed (maps larger than 2x2), and one dense matmul
  `(n, H·W·B_in) @ (H·W·B_in, H·W·B_out)` for maps of at most 2x2, where
  XLA's convolution runs ~50-100x slower. For a 2x2 map every block of that
  matrix is a real kernel tap (all pairs of positions are neighbours), so it
  does no wasted work. `jax.jit`'s cache compiles each (block kind, n,
  B_in, B_out) once (~40-70 ms each at full width); the buckets keep that
  set small.

Rows are cached (`cache_bytes`): a GA population repeats individuals
(kept parents, the hall of fame, identical children), and a row depends
only on its (class, mask), the params and the images, so those rows are
looked up instead of run again (about a quarter of each generation with
the reference GA's 20 kept parents of 100, or 3 of 16 plus the hall of
fame at the CPU budget).

Modules are not `vmap`ped (that would turn their convolutions back into
grouped convolutions); each runs on `n <= chunk_images` images, so its
convolutions are big enough for the matmul kernels (n·H·W rows). Executions
dispatched from one Python thread run one after another, and XLA runs a
convolution with few channels on large maps on a single core, so
`num_workers` threads (default: the usable cores, at most 4) each run one
module at a time. Results do not depend on the thread count (each module's
numbers are computed by the same compiled code).

Under an outer `jit` (masks are tracers, so no host plan is possible) the
evaluator still works: every bucket is the full K_l (the slots are computed
with `jnp`) and `lax.map` runs the individuals and image chunks. That path
is exact but spends the model's full FLOPs on every module; call the
evaluator outside `jit` to get the savings. The search driver does
(`evaluate_fn.host_side` is True, see `driver.make_step`).

Peak memory (host path, float32, bytes / 4):
      2 · params                         (the params and their padded copy)
    + 2 · chunk_individuals · module     (this group's and the next group's
                                          modules; module ≤ params)
    + 2 · n·H0·W0·K0                     (the shared first-layer maps of two
                                          image chunks)
    + ≈ 3 · num_workers · n · max_l H_l·W_l·B_l   (per running module: a block's
                                          input, output, residual)
    + 2 · n·H1'·W1'·chunk_individuals·B1 (with share_first_conv: the shared
                                          second-layer output of two chunks)
    + images + C·P·N                     (inputs and the output L)
    + cache_bytes / 4                    (the row cache, at most)
with n ≤ chunk_images the image chunk size. Nothing grows with P or N
except the inputs and the output. Example: full-width SimCNN at 32x32, 50%
kept, N = 1000 = chunk_images, chunk_individuals=16: params 59 MB, modules
2 · 16 · 15 MB, first maps 2 · 1000·32·32·64·4 B = 524 MB, block maps
(2 workers) 2 · 3 · 131 MB: ≈ 2 GB.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import os
import threading
from collections.abc import Mapping
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np

from jaxsplit.models.convnet import ConvNet, ConvSpec
from jaxsplit.search.evaluate import EvaluatorInputError, check_eval_inputs, check_variables, is_traced

CONV = "conv"  # XLA convolution
DENSE = "dense"  # the whole (small) map as one matmul
DENSE_MAX_HW = 2  # maps of at most DENSE_MAX_HW x DENSE_MAX_HW use DENSE
DEFAULT_NUM_BUCKETS = 32
ALIGN = 8
MAX_WORKERS = 4
DEFAULT_CACHE_BYTES = 256 * 2**20  # evaluated rows kept for reuse (see `_evaluate_cached`)
SHARE_MAX_K0 = 32  # share the second conv layer by default when the first has <= 32 kernels


def conv_method(hw: tuple[int, int]) -> str:
    """How a conv layer with input map `hw` is computed: "dense" for maps ≤ 2x2, else "conv".

    Rule from measurements on 2 AVX-512 cores (jax 0.10 CPU), n = 256 images,
    useful FLOP/s: XLA conv at 2x2 ran at 3-4 GFLOP/s (256-512 channels) vs
    ~250 for the dense matmul; at 4x4 and larger XLA conv ran at 100-200
    (better than im2col matmuls, 60-140), while a dense matrix would multiply
    by zero blocks (a 4x4 map has 100 of 256 position pairs adjacent).
    """
    return DENSE if hw[0] <= DENSE_MAX_HW and hw[1] <= DENSE_MAX_HW else CONV


def can_share_first_conv(spec: ConvSpec, methods: Mapping[str, str]) -> bool:
    """Whether the second conv layer can run for a group of modules at once
    (`shared_first_conv`): it exists, runs as an XLA convolution, and neither it nor any layer
    adds the first layer's output (the shared path never builds a module's layer-0 output)."""
    if len(spec.layers) < 2:
        return False
    first, second = spec.layers[:2]
    return (methods[second.name] == CONV and second.residual_from is None
            and all(l.residual_from != first.name for l in spec.layers))


def bucket_step(num_kernels: int, num_buckets: int) -> int:
    """Granularity of a layer's slot counts: `ceil(K / num_buckets)` rounded up to a multiple of
    `ALIGN` (8 floats; XLA's convolutions slow down on odd channel counts), at most K."""
    step = -(-num_kernels // num_buckets)
    return min(num_kernels, -(-step // ALIGN) * ALIGN)


def bucket_size(count: np.ndarray | int, num_kernels: int, num_buckets: int) -> np.ndarray:
    """Static slot count for `count` kept kernels of a layer of `num_kernels`.

    `count` is rounded up to a multiple of `bucket_step(num_kernels,
    num_buckets)` (at least one step, at most `num_kernels`), so a layer
    has at most `num_buckets` distinct sizes.

    Example: K=512, 32 buckets: step 16; counts 0..16 -> 16, 17 -> 32,
    500 -> 512. K=64: step 8 (8 sizes). K=6: step 6 (one size, the full layer).
    """
    step = bucket_step(num_kernels, num_buckets)
    count = np.asarray(count)
    return np.minimum(np.maximum(-(-count // step), 1) * step, num_kernels).astype(np.int64)


@dataclasses.dataclass(frozen=True)
class LayerPlan:
    """Slots of one conv layer for all M individuals of a call (host arrays).

    Attributes:
      slots: `(M, K)` int32; row m = the layer's channel slots of individual m
        in ascending order (kept kernels, or a tie group's union), then the
        padding index K.
      cols: `(M, K)` int32; = slots where the layer keeps the kernel itself,
        else K (its weights/bias column is then the zero padding column).
      sizes: `(M,)` int64 bucketed slot counts B (use `slots[m, :sizes[m]]`).
      counts: `(M,)` int64 real slot counts.
    """

    slots: np.ndarray
    cols: np.ndarray
    sizes: np.ndarray
    counts: np.ndarray


def plan_modules(spec: ConvSpec, masks: Mapping[str, np.ndarray],
                 num_buckets: int = DEFAULT_NUM_BUCKETS) -> dict[str, LayerPlan]:
    """Per-layer slots and bucket sizes of every individual (host side, numpy).

    Args:
      spec: the model's conv spec.
      masks: `{conv_name: bool (M, K_l)}` (concrete).
      num_buckets: bucket count per layer (see `bucket_size`).

    Returns:
      `{conv_name: LayerPlan}`; the layers of a tie group share `slots` and
      `sizes` (the union of their masks), so residual adds line up.
    """
    host = {n: np.asarray(masks[n], bool) for n in spec.names}
    group_of = {n: g for g in spec.ties for n in g}
    plans = {}
    for layer in spec.layers:
        k = layer.num_kernels
        own = host[layer.name]
        union = own
        for other in group_of.get(layer.name, ()):
            union = union | host[other]
        counts = union.sum(axis=1).astype(np.int64)
        order = np.argsort(~union, axis=1, kind="stable")  # kept first, ascending
        slots = np.where(np.arange(k)[None, :] < counts[:, None], order, k).astype(np.int32)
        kept_here = np.take_along_axis(own, np.minimum(slots, k - 1), axis=1) & (slots < k)
        cols = np.where(kept_here, slots, k).astype(np.int32)
        plans[layer.name] = LayerPlan(slots, cols, bucket_size(counts, k, num_buckets), counts)
    return plans


# -- building blocks (numpy on the host path, jax.numpy in the traced fallback) ---------


def prepare_params(model: ConvNet, params: Mapping, xp: Any = np) -> dict[str, Any]:
    """Params padded with a zero row/column at index K (the padding slot), float32.

    Args:
      model: the `ConvNet`; params: its inner params dict.
      xp: `numpy` (host path) or `jax.numpy` (traced fallback).

    Returns:
      `{conv_name: (kernel (3, 3, Cin + 1, K + 1), bias (K + 1,)), "head": [(kernel, bias),
      ...]}`; the first head kernel reshaped to `(H_L, W_L, K_L + 1, D_1)`.
    """
    spec = model.conv_spec()
    out: dict[str, Any] = {}
    for layer in spec.layers:
        p = params[layer.name]
        out[layer.name] = (
            xp.pad(xp.asarray(p["kernel"], xp.float32), ((0, 0), (0, 0), (0, 1), (0, 1))),
            xp.pad(xp.asarray(p["bias"], xp.float32), (0, 1)),
        )
    widths = model.head_widths()
    first = len(spec.layers)
    hh, ww = spec.head_in_hw
    k_last = spec.layers[-1].num_kernels
    head = []
    for j in range(len(widths) - 1):
        p = params[f"fc_{first + j}"]
        kernel, bias = xp.asarray(p["kernel"], xp.float32), xp.asarray(p["bias"], xp.float32)
        if j == 0:
            kernel = xp.pad(kernel.reshape(hh, ww, k_last, widths[1]),
                            ((0, 0), (0, 0), (0, 1), (0, 0)))
        head.append((kernel, bias))
    out["head"] = head
    return out


def dense_weight(w: Any, hw: tuple[int, int], xp: Any = np) -> Any:
    """`(3, 3, Bi, Bo)` -> `(H·W·Bi, H·W·Bo)`: the padded 3x3 conv on an H x W map as a matrix.

    Rows are the NHWC flatten of the input map, columns of the output map;
    block (p_in, p_out) is `w[i_in - i_out + 1, j_in - j_out + 1]` when the
    positions are neighbours, else zero (never for maps of at most 2x2).
    """
    height, width = hw
    b_in, b_out = w.shape[2:]
    pairs = [(i_in * width + j_in, i_out * width + j_out, i_in - i_out + 1, j_in - j_out + 1)
             for i_in in range(height) for j_in in range(width)
             for i_out in range(height) for j_out in range(width)]
    if xp is np:  # one pass: write the blocks into a preallocated matrix
        out = np.zeros((height * width * b_in, height * width * b_out), w.dtype)
        for p_in, p_out, di, dj in pairs:
            if 0 <= di < 3 and 0 <= dj < 3:
                out[p_in * b_in:(p_in + 1) * b_in, p_out * b_out:(p_out + 1) * b_out] = w[di, dj]
        return out
    zeros = xp.zeros((b_in, b_out), w.dtype)
    blocks = [w[di, dj] if 0 <= di < 3 and 0 <= dj < 3 else zeros for _, _, di, dj in pairs]
    num = height * width
    return xp.concatenate([xp.concatenate(blocks[r * num:(r + 1) * num], axis=1)
                           for r in range(num)], axis=0)


def gather_conv(kernel_pad: Any, bias_pad: Any, rows: Any, cols: Any, *, method: str,
                hw: tuple[int, int], xp: Any = np) -> tuple[Any, Any]:
    """One module's conv weights (physical extraction of one layer).

    Args:
      kernel_pad: `(3, 3, Cin + 1, K + 1)`; bias_pad `(K + 1,)` (zero padding at the ends).
      rows: `(B_in,)` int input slots (the previous layer's slots; Cin = padding).
      cols: `(B_out,)` int output columns (K = padding).
      method: "conv" -> kernel `(3, 3, B_in, B_out)`; "dense" -> `(H·W·B_in, H·W·B_out)`.

    Returns:
      `(kernel, bias (B_out,))`.
    """
    w = kernel_pad[:, :, rows[:, None], cols[None, :]]
    if method == DENSE:
        w = dense_weight(w, hw, xp)
    return w, bias_pad[cols]


def gather_head(head: list, rows: Any, cls: Any) -> list:
    """One module's head: the first kernel's rows for `rows` slots, the classifier's column `cls`.

    Args:
      head: `prepare_params(...)["head"]`.
      rows: `(B_L,)` int slots of the last conv layer.
      cls: `()` int class id.

    Returns:
      `[(kernel, bias), ...]`; the last kernel is `(D,)` and its bias `()`.
    """
    out = []
    last = len(head) - 1
    for j, (kernel, bias) in enumerate(head):
        if j == 0:
            kernel = kernel[:, :, rows]
            kernel = kernel.reshape(-1, kernel.shape[-1])
        if j == last:
            kernel, bias = kernel[:, cls], bias[cls]
        out.append((kernel, bias))
    return out


def _pool(h: jax.Array) -> jax.Array:
    """2x2/stride-2 max-pool of `(n, H, W, B)` (floor, like `nn.max_pool` with VALID padding)."""
    n, height, width, b = h.shape
    h = h[:, : height // 2 * 2, : width // 2 * 2]
    return h.reshape(n, height // 2, 2, width // 2, 2, b).max(axis=(2, 4))


def conv_block(x: jax.Array, kernel: jax.Array, bias: jax.Array, residual: jax.Array | None, *,
               method: str, pool: bool) -> jax.Array:
    """conv 3x3 (pad 1) + bias -> ReLU -> [2x2 max-pool] -> [+ residual].

    Args:
      x: `(n, H, W, B_in)`; kernel/bias from `gather_conv(method=method)`.
      residual: `(n, H', W', B_out)` or None.

    Returns:
      `(n, H', W', B_out)`.
    """
    n, height, width, _ = x.shape
    if method == DENSE:
        y = (x.reshape(n, -1) @ kernel).reshape(n, height, width, -1)
    else:
        y = jax.lax.conv_general_dilated(x, kernel, (1, 1), ((1, 1), (1, 1)),
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"))
    y = jax.nn.relu(y + bias)
    if pool:
        y = _pool(y)
    if residual is not None:
        y = y + residual
    return y


def first_preactivation(images: jax.Array, kernel_pad: jax.Array, bias_pad: jax.Array) -> jax.Array:
    """The first conv of the raw images for all K0 kernels (before ReLU).

    Args:
      images: `(n, H, W, Cin)`; kernel_pad `(3, 3, Cin + 1, K0 + 1)`; bias_pad `(K0 + 1,)`.

    Returns:
      `(n, H, W, K0)`.
    """
    kernel = kernel_pad[:, :, :-1, :-1]  # the padding column would make XLA's conv 2x slower
    y = jax.lax.conv_general_dilated(images.astype(jnp.float32), kernel, (1, 1), ((1, 1), (1, 1)),
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return y + bias_pad[:-1]


def first_block(pre: jax.Array, cols: jax.Array, *, pool: bool) -> jax.Array:
    """One module's first block from the shared pre-activation: take `cols` (K0 -> 0), ReLU,
    [pool]."""
    y = jax.nn.relu(jnp.take(pre, cols, axis=3, mode="fill", fill_value=0.0))
    return _pool(y) if pool else y


def shared_first_conv(pre: jax.Array, kernel: jax.Array, bias: jax.Array, *, pool0: bool,
                      pool1: bool) -> jax.Array:
    """The second conv layer of a group of modules at once, from the shared first pre-activation.

    Args:
      pre: `(n, H, W, K0)` from `first_preactivation`.
      kernel: `(3, 3, K0, S)`: the members' layer-1 kernels side by side, each with the rows of
        the first-layer kernels it does not keep zeroed (`group_first_conv`).
      bias: `(S,)`.

    Returns:
      `(n, H', W', S)`: ReLU(pre) [pool] -> conv + bias -> ReLU [pool]; member m's layer-1
      output is its slice of the last axis.
    """
    x = jax.nn.relu(pre)
    if pool0:
        x = _pool(x)
    return conv_block(x, kernel, bias, None, method=CONV, pool=pool1)


def take_channels(y: jax.Array, offset: jax.Array, *, size: int) -> jax.Array:
    """`y[..., offset:offset + size]` (one member's slice of `shared_first_conv`'s output)."""
    return jax.lax.dynamic_slice_in_dim(y, offset, size, axis=3)


def group_first_conv(kernel_pad: np.ndarray, bias_pad: np.ndarray, own0: list[np.ndarray],
                     cols1: list[np.ndarray], slot_width: int,
                     num_slots: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A group's layer-1 weights for `shared_first_conv` (host, numpy).

    Member m keeps the first-layer kernels `own0[m]` (bool `(K0,)`) and the layer-1 output
    columns `cols1[m]` (`(B1_m,)`, padding index K1 for slots it does not keep): its block is
    `kernel_pad[:, :, :K0, cols1[m]]` with the rows of the other first-layer kernels zeroed
    (a masked kernel outputs zero after ReLU, so its row contributes nothing). Member m's block
    starts at column `m * slot_width` of a kernel of fixed width `S = num_slots * slot_width`
    (unused columns zero): one compiled shape, and a member's numbers do not depend on the other
    members (XLA's convolution may sum in another order for another output width, and the
    search's results must not depend on how individuals are grouped).

    Returns:
      `(kernel (3, 3, K0, S), bias (S,), offsets (M,))`.
    """
    k0 = kernel_pad.shape[2] - 1
    if len(cols1) > num_slots or any(len(c) > slot_width for c in cols1):
        raise ValueError(f"{len(cols1)} members of at most {slot_width} columns do not fit "
                         f"{num_slots} slots")
    kernel = np.zeros((3, 3, k0, num_slots * slot_width), kernel_pad.dtype)
    bias = np.zeros((num_slots * slot_width,), bias_pad.dtype)
    for m, (own, cols) in enumerate(zip(own0, cols1)):
        start = m * slot_width
        kernel[..., start:start + len(cols)] = (kernel_pad[:, :, :k0, cols]
                                                * own[None, None, :, None])
        bias[start:start + len(cols)] = bias_pad[cols]
    offsets = np.arange(len(cols1), dtype=np.int32) * slot_width
    return kernel, bias, offsets


def head_forward(features: jax.Array, head: list) -> jax.Array:
    """`(n, H_L, W_L, B_L)` -> the module's logit `(n,)` (Dense -> ReLU -> ... -> column)."""
    h = features.reshape(features.shape[0], -1)
    last = len(head) - 1
    for j, (kernel, bias) in enumerate(head):
        h = h @ kernel + bias
        if j < last:
            h = jax.nn.relu(h)
    return h


# -- the evaluator ----------------------------------------------------------------------


def default_num_workers() -> int:
    """Worker threads of the host path: the CPU cores this process may use, at most
    `MAX_WORKERS`.

    XLA's CPU convolution runs on one core for maps with few channels (measured:
    a 32x32, 32->32 conv used 1.0 of 2 idle cores, an 8x8, 128->128 one 1.95),
    and executions dispatched from one Python thread run one after another; two
    threads running two modules used 1.7 cores on such layers (1.7x) and lost
    nothing on the others.
    """
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, min(cores, MAX_WORKERS))


def _same_arrays(current: tuple, cached: tuple) -> bool:
    """Whether `current` are the very `cached` jax arrays (immutable, so same object = same
    values); numpy inputs never match (they can change in place)."""
    return (len(current) == len(cached) and all(isinstance(x, jax.Array) for x in current)
            and all(a is b for a, b in zip(current, cached)))


def _image_chunks(num_images: int, chunk_images: int) -> tuple[int, int]:
    """`(num_chunks, chunk_size)`: equal chunks of at most `chunk_images` covering N."""
    num = -(-num_images // chunk_images)
    return num, -(-num_images // num)


def padded_images(images: Any, chunk_images: int) -> tuple[jax.Array, int, int]:
    """`(images padded to num_chunks * chunk (copies of image 0, cut from results), num_chunks,
    chunk)`: equal chunks of at most `chunk_images` images."""
    num_images = int(images.shape[0])
    num_chunks, chunk = _image_chunks(num_images, chunk_images)
    padded = num_chunks * chunk
    x = jnp.asarray(images, jnp.float32)
    if padded > num_images:
        x = jnp.concatenate([x, jnp.broadcast_to(x[:1], (padded - num_images, *x.shape[1:]))])
    return x, num_chunks, chunk


class RowCache:
    """The row cache of the host-side evaluators (mixed into `FastEvaluator` and
    `jaxsplit.search.fast_graph.GraphFastEvaluator`).

    Attributes:
      cache_bytes: memory for cached rows (0: off).
      cache_names: mask keys in the order their bits form a row's key.
      cache_stats: `Counter` of "hits" and "misses" (rows), for tests and logs.
    """

    def _evaluate_rows(self, weights: Any, masks: Mapping[str, Any], images: Any, classes: Any,
                       num_rows: int, num_individuals: int) -> jax.Array:
        """`L (C, P, N)` of the host path: the C·P mask rows flattened, looked up in the cache,
        the others run by `_evaluate_host(weights, flat_masks, images, row_class)`."""
        total = num_rows * num_individuals
        num_images = int(images.shape[0])
        flat = {n: np.asarray(masks[n], bool).reshape(total, -1) for n in self.cache_names}
        row_class = np.repeat(np.asarray(classes, np.int64), num_individuals)
        out = self._evaluate_cached(weights, flat, images, row_class)  # (M, N)
        result = jnp.asarray(out.reshape(num_rows, num_individuals, num_images))
        chex.assert_shape(result, (num_rows, num_individuals, num_images))
        return result

    def _init_row_cache(self, cache_bytes: int, names) -> None:
        if isinstance(cache_bytes, bool) or not isinstance(cache_bytes, (int, np.integer)) or (
                cache_bytes < 0):
            raise EvaluatorInputError(f"cache_bytes must be an int >= 0, got {cache_bytes!r}")
        self.cache_bytes = int(cache_bytes)
        self.cache_names = tuple(names)
        self._cache: collections.OrderedDict[bytes, np.ndarray] = collections.OrderedDict()
        self._cache_inputs: tuple = ()
        self._cache_lock = threading.Lock()
        self.cache_stats = collections.Counter()  # "hits", "misses" (rows), for tests and logs

    def _evaluate_cached(self, params, flat_masks, images, row_class) -> np.ndarray:
        """`(M, N)` logits; rows already computed for the same params and images are reused.

        `params` is every array a row depends on besides the images (the
        ConvNet's params, or a traced model's full variables with its
        BatchNorm statistics); `self._evaluate_host(params, flat_masks, images,
        row_class)` computes the rows not in the cache.

        A GA's next population repeats individuals (kept parents, the hall of
        fame, identical children): their rows are looked up by (class, mask
        bits) instead of run again. Sound because a row depends only on its
        module, the params and the images: the same compiled code runs it
        whatever the other modules of the call, the grouping or the threads
        (`group_first_conv`; tested bit for bit), and the cache is keyed on
        the identity of the (immutable) param and image arrays, whose
        references it holds. The cache keeps the most recently used rows up
        to `cache_bytes`; 0 turns it off.
        """
        num_images = int(images.shape[0])
        row_bytes = 4 * num_images
        capacity = self.cache_bytes // max(row_bytes, 1)
        if capacity == 0:
            return self._evaluate_host(params, flat_masks, images, row_class)
        inputs = (images, *jax.tree_util.tree_leaves(params))
        bits = np.packbits(np.concatenate([flat_masks[n] for n in self.cache_names], axis=1),
                           axis=1)
        keys = [row_class[m].tobytes() + bits[m].tobytes() for m in range(len(row_class))]
        todo: dict[bytes, int] = {}  # key -> first row index, for the rows not in the cache
        cached: dict[bytes, np.ndarray] = {}
        with self._cache_lock:  # the sharded wrapper calls one evaluator from several threads
            if not _same_arrays(inputs, self._cache_inputs):
                self._cache.clear()
                self._cache_inputs = inputs
            for m, key in enumerate(keys):
                if key in self._cache:
                    cached[key] = self._cache[key]
                    self._cache.move_to_end(key)
                elif key not in todo:
                    todo[key] = m
        out = np.empty((len(keys), num_images), np.float32)
        if todo:
            rows = np.fromiter(todo.values(), np.int64, len(todo))
            computed = self._evaluate_host(params, {n: v[rows] for n, v in flat_masks.items()},
                                           images, row_class[rows])
            fresh = dict(zip(todo, computed))
        else:
            fresh = {}
        for m, key in enumerate(keys):
            out[m] = fresh[key] if key in fresh else cached[key]
        with self._cache_lock:
            self.cache_stats["misses"] += len(todo)
            self.cache_stats["hits"] += len(keys) - len(todo)
            if _same_arrays(inputs, self._cache_inputs):  # (another thread may have reset it)
                for key, row in fresh.items():
                    self._cache[key] = row.copy()  # not a view: evicting frees it
                while len(self._cache) > capacity:
                    self._cache.popitem(last=False)
        return out



class FastEvaluator(RowCache):
    """The "fast" `Evaluator` (see the module docstring).

    Attributes:
      model: the `ConvNet`.
      chunk_individuals: modules extracted (weights held) at once.
      chunk_images: images run through a module at once (bounds memory).
      num_buckets: bucket sizes per layer (see `bucket_size`).
      num_workers: threads running modules concurrently (see `default_num_workers`).
      methods: `{conv_name: "conv" | "dense"}` (see `conv_method`).
      share_first_conv: the second conv layer runs once per group of modules
        (`shared_first_conv`) instead of once per module (see `make_fast_evaluator`).
      trace_counts: `Counter` of traces per jitted piece (one per new shape;
        for tests and for watching compilations).
      host_side: True: call it outside `jit` to get its speed (the search
        driver checks this); under `jit` it falls back to full-size buckets.
    """

    host_side = True

    def __init__(self, model: ConvNet, *, chunk_individuals: int = 16, chunk_images: int = 1000,
                 num_buckets: int = DEFAULT_NUM_BUCKETS, num_workers: int | None = None,
                 share_first_conv: bool | None = None, cache_bytes: int = DEFAULT_CACHE_BYTES):
        if num_workers is None:
            num_workers = default_num_workers()
        for name, value in (("chunk_individuals", chunk_individuals),
                            ("chunk_images", chunk_images), ("num_buckets", num_buckets),
                            ("num_workers", num_workers)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise EvaluatorInputError(f"{name} must be an int >= 1, got {value!r}")
        self.model = model
        self.spec = model.conv_spec()
        self._init_row_cache(cache_bytes, self.spec.names)
        self.chunk_individuals = int(chunk_individuals)
        self.chunk_images = int(chunk_images)
        self.num_buckets = int(num_buckets)
        self.num_workers = int(num_workers)
        self.trace_counts: collections.Counter = collections.Counter()
        lock = threading.Lock()
        self.methods = {l.name: conv_method(l.input_hw) for l in self.spec.layers}
        possible = can_share_first_conv(self.spec, self.methods)
        if share_first_conv is None:
            share_first_conv = possible and self.spec.layers[0].num_kernels <= SHARE_MAX_K0
        elif share_first_conv and not possible:
            raise EvaluatorInputError(
                "share_first_conv=True needs a second conv layer on maps larger than "
                f"{DENSE_MAX_HW}x{DENSE_MAX_HW} and no residual add from or into the first "
                "layer's output; this model has none")
        self.share_first_conv = bool(share_first_conv)
        self._index = {name: i for i, name in enumerate(self.spec.names)}
        self._prepared_cache: tuple[tuple, dict | None] = ((), None)

        def counted(name, fn, **static):
            def traced(*args):
                with lock:
                    self.trace_counts[name] += 1
                return fn(*args, **static)
            return jax.jit(traced)

        self._first = counted("first_preactivation", first_preactivation)
        self._first_block = {p: counted(f"first_block/pool={p}", first_block, pool=p)
                             for p in (False, True)}
        self._conv_block = {}
        for layer in self.spec.layers[1:]:
            key = (self.methods[layer.name], layer.pool, layer.residual_from is not None)
            if key not in self._conv_block:
                self._conv_block[key] = counted(
                    f"conv_block/{key[0]}/pool={key[1]}/residual={key[2]}", _conv_block_positional,
                    method=key[0], pool=key[1])
        self._head = counted("head", head_forward)
        if self.share_first_conv:
            layers = self.spec.layers
            self._shared_first = counted("shared_first_conv", shared_first_conv,
                                         pool0=layers[0].pool, pool1=layers[1].pool)
            self._take = {}  # size -> jitted take_channels

            take_lock = threading.Lock()  # workers call it

            def take(size):
                with take_lock:
                    if size not in self._take:
                        self._take[size] = counted(f"take_channels/{size}", take_channels,
                                                   size=size)
                    return self._take[size]
            self._take_fn = take
        self._traced = counted("traced_evaluate", self._evaluate_traced)

    @property
    def num_traces(self) -> int:
        """Traces of all jitted pieces so far."""
        return sum(self.trace_counts.values())

    def __call__(self, variables: Mapping, masks: Mapping[str, jax.Array], images: jax.Array,
                 classes: jax.Array) -> jax.Array:
        """See `jaxsplit.search.evaluate.Evaluator` (`variables = {"params": params}`)."""
        check_variables(variables)
        params = variables["params"]
        num_rows, num_individuals, num_images = check_eval_inputs(self.model, masks, images,
                                                                  classes)
        if is_traced(([masks[n] for n in self.spec.names], classes, images, params)):
            return self._traced(params, masks, images, classes)
        return self._evaluate_rows(params, masks, images, classes, num_rows, num_individuals)

    # -- host path --------------------------------------------------------------------

    def _evaluate_host(self, params, flat_masks, images, row_class) -> np.ndarray:
        """`(M, N)` logits: modules extracted on the host, run by the jitted blocks."""
        first = self.spec.layers[0]
        plans = plan_modules(self.spec, flat_masks, self.num_buckets)
        prepared = self._prepared(params)
        total = row_class.shape[0]
        num_images = int(images.shape[0])
        images, num_chunks, chunk = padded_images(images, self.chunk_images)
        padded = num_chunks * chunk
        first_weights = jax.device_put(prepared[first.name])
        out = np.empty((total, padded), np.float32)
        shared = self.share_first_conv
        if shared:  # groups of one layer-1 bucket size each (the shared block's slot width)
            sizes1 = plans[self.spec.layers[1].name].sizes
            groups = [rows[start:start + self.chunk_individuals]
                      for size in np.unique(sizes1)
                      for rows in [np.flatnonzero(sizes1 == size)]
                      for start in range(0, len(rows), self.chunk_individuals)]
        else:
            groups = [range(start, min(start + self.chunk_individuals, total))
                      for start in range(0, total, self.chunk_individuals)]

        def extract(members):
            """`(device modules, group)`; group = `((kernel, bias) on device, [(offset, B1)]
            host ints per member)` with `share_first_conv`, else None."""
            modules = jax.device_put([self._extract(prepared, plans, m, int(row_class[m]))
                                      for m in members])
            if not shared:
                return modules, None
            kernel, bias, offsets = self._group_weights(prepared, plans, members)
            # host ints: indexing a device array here would wait on the device queue
            pieces = [(np.int32(o), int(plans[self.spec.layers[1].name].sizes[m]))
                      for o, m in zip(offsets, members)]
            return modules, (jax.device_put((kernel, bias)), pieces)

        def run(start, module, piece=None):  # one module on one chunk, on a worker thread
            return np.asarray(self._forward(start, module, piece))

        modules, group = extract(groups[0])
        with concurrent.futures.ThreadPoolExecutor(self.num_workers) as pool:
            for g, members in enumerate(groups):
                previous = []
                for c in range(num_chunks):
                    pre = self._first(jax.lax.slice_in_dim(images, c * chunk, (c + 1) * chunk),
                                      *first_weights)
                    if shared:  # the second conv layer of all members at once
                        y = self._shared_first(pre, *group[0])
                        pending = [(m, c, pool.submit(run, y, module, piece))
                                   for m, module, piece in zip(members, modules, group[1])]
                    else:
                        pending = [(m, c, pool.submit(run, pre, module))
                                   for m, module in zip(members, modules)]
                    if c == 0:  # slice the next group while the workers run this one
                        nxt = extract(groups[g + 1]) if g + 1 < len(groups) else (None, None)
                    for m_prev, c_prev, future in previous:  # at most two chunks in flight
                        out[m_prev, c_prev * chunk:(c_prev + 1) * chunk] = future.result()
                    previous = pending
                for m_prev, c_prev, future in previous:
                    out[m_prev, c_prev * chunk:(c_prev + 1) * chunk] = future.result()
                modules, group = nxt
        return out[:, :num_images]

    def _prepared(self, params) -> dict[str, Any]:
        """`prepare_params` on the host, reused while the same (immutable) param arrays come
        back (the search passes the same params every generation)."""
        leaves = tuple(jax.tree_util.tree_leaves(params))
        cached_leaves, cached = self._prepared_cache
        if cached is not None and _same_arrays(leaves, cached_leaves):
            return cached
        prepared = prepare_params(self.model, jax.device_get(params))
        self._prepared_cache = (leaves, prepared)
        return prepared

    def _group_weights(self, prepared, plans, members) -> tuple[np.ndarray, ...]:
        """`group_first_conv` for `members` (row indices, one layer-1 bucket size B1):
        `(kernel (3, 3, K0, chunk_individuals * B1), bias, offsets)`."""
        first, second = self.spec.layers[:2]
        k0 = first.num_kernels
        own0 = [np.isin(np.arange(k0), plans[first.name].cols[m]) for m in members]
        cols1 = [plans[second.name].cols[m, :int(plans[second.name].sizes[m])] for m in members]
        return group_first_conv(*prepared[second.name], own0, cols1, len(cols1[0]),
                                self.chunk_individuals)

    def _extract(self, prepared, plans, m: int, cls: int) -> dict[str, Any]:
        """Module m's weights, sliced on the host (numpy): the physically extracted module
        (without its first two conv layers when `share_first_conv`: `_group_weights`)."""
        layers = self.spec.layers
        size = {l.name: int(plans[l.name].sizes[m]) for l in layers}
        first = layers[0]
        skip = 2 if self.share_first_conv else 1
        module = {} if self.share_first_conv else {
            "cols0": plans[first.name].cols[m, :size[first.name]]}
        for prev, layer in zip(layers[skip - 1:-1], layers[skip:]):
            module[layer.name] = gather_conv(
                *prepared[layer.name], plans[prev.name].slots[m, :size[prev.name]],
                plans[layer.name].cols[m, :size[layer.name]], method=self.methods[layer.name],
                hw=layer.input_hw)
        last = layers[-1]
        module["head"] = gather_head(prepared["head"], plans[last.name].slots[m, :size[last.name]],
                                     cls)
        return module

    def _forward(self, start: jax.Array, module: Mapping[str, Any],
                 piece: tuple[np.int32, int] | None = None) -> jax.Array:
        """One module on one image chunk -> logits `(n,)`.

        `start` is the shared first pre-activation `(n, H, W, K0)`, or with
        `share_first_conv` the group's `shared_first_conv` output, of which the
        module's layer-1 output is `piece = (offset, B1)`: B1 channels from offset.
        """
        layers = self.spec.layers
        if piece is None:
            outputs = [self._first_block[layers[0].pool](start, module["cols0"])]
        else:  # layer 0's output is never read again (`can_share_first_conv`)
            offset, size = piece
            outputs = [None, self._take_fn(size)(start, offset)]
        x = outputs[-1]
        for layer in layers[len(outputs):]:
            kernel, bias = module[layer.name]
            res = None if layer.residual_from is None else outputs[self._index[layer.residual_from]]
            block = self._conv_block[(self.methods[layer.name], layer.pool, res is not None)]
            x = block(x, kernel, bias) if res is None else block(x, kernel, bias, res)
            outputs.append(x)
        return self._head(x, module["head"])

    # -- traced fallback (inside an outer jit) ----------------------------------------

    def _evaluate_traced(self, params, masks, images, classes) -> jax.Array:
        """Full-size buckets, slots computed with `jnp`; exact, without the FLOP savings."""
        spec = self.spec
        layers = spec.layers
        num_rows, num_individuals, num_images = check_eval_inputs(self.model, masks, images,
                                                                  classes)
        total = num_rows * num_individuals
        flat = {n: masks[n].reshape(total, -1) for n in spec.names}
        group_of = {n: g for g in spec.ties for n in g}
        slots, cols = {}, {}
        for layer in layers:
            k = layer.num_kernels
            union = flat[layer.name]
            for other in group_of.get(layer.name, ()):
                union = union | flat[other]
            count = union.sum(axis=1)
            order = jnp.argsort(~union, axis=1, stable=True)
            s = jnp.where(jnp.arange(k)[None, :] < count[:, None], order, k).astype(jnp.int32)
            kept = jnp.take_along_axis(flat[layer.name], jnp.minimum(s, k - 1), axis=1) & (s < k)
            slots[layer.name], cols[layer.name] = s, jnp.where(kept, s, k).astype(jnp.int32)
        row_class = jnp.repeat(classes.astype(jnp.int32), num_individuals)
        prepared = prepare_params(self.model, params, jnp)
        num_chunks, chunk = _image_chunks(num_images, self.chunk_images)
        images = images.astype(jnp.float32)
        padded = num_chunks * chunk
        if padded > num_images:
            images = jnp.concatenate(
                [images, jnp.broadcast_to(images[:1], (padded - num_images, *images.shape[1:]))])
        image_chunks = images.reshape(num_chunks, chunk, *images.shape[1:])

        def one_module(pre, args):  # -> (n,)
            m_slots, m_cols, cls = args
            x = first_block(pre, m_cols[layers[0].name], pool=layers[0].pool)
            outputs = [x]
            for prev, layer in zip(layers[:-1], layers[1:]):
                method = self.methods[layer.name]
                kernel, bias = gather_conv(*prepared[layer.name], m_slots[prev.name],
                                           m_cols[layer.name], method=method, hw=layer.input_hw,
                                           xp=jnp)
                res = (None if layer.residual_from is None
                       else outputs[self._index[layer.residual_from]])
                x = conv_block(x, kernel, bias, res, method=method, pool=layer.pool)
                outputs.append(x)
            return head_forward(x, gather_head(prepared["head"], m_slots[layers[-1].name], cls))

        def image_chunk(x):  # (n, H, W, Cin) -> (M, n)
            pre = first_preactivation(x, *prepared[layers[0].name])
            return jax.lax.map(lambda a: one_module(pre, a), (slots, cols, row_class))

        out = jax.lax.map(image_chunk, image_chunks)  # (num_chunks, M, n)
        out = jnp.moveaxis(out, 0, 1).reshape(total, padded)[:, :num_images]
        return out.reshape(num_rows, num_individuals, num_images).astype(jnp.float32)


def _conv_block_positional(x, kernel, bias, residual=None, *, method: str, pool: bool):
    return conv_block(x, kernel, bias, residual, method=method, pool=pool)


def make_fast_evaluator(model: ConvNet, *, chunk_individuals: int = 16, chunk_images: int = 1000,
                        num_buckets: int = DEFAULT_NUM_BUCKETS,
                        num_workers: int | None = None,
                        share_first_conv: bool | None = None,
                        cache_bytes: int = DEFAULT_CACHE_BYTES) -> FastEvaluator:
    """The "fast" `Evaluator` for `model` (what `make_evaluator(model, "fast")` returns).

    Args:
      model: the `ConvNet`.
      chunk_individuals: modules extracted at once (their weights are held
        while all image chunks run through them).
      chunk_images: images run through a module at once.
      num_buckets: distinct slot counts per layer (more: less padding, more
        compiled shapes).
      num_workers: threads running modules concurrently (None:
        `default_num_workers()`).
      share_first_conv: run the second conv layer once per group of
        `chunk_individuals` modules, as one convolution from all first-layer
        channels to all members' kept kernels (`shared_first_conv`), instead
        of once per module. It spends FLOPs on the first-layer kernels a
        member does not keep (zero rows), but XLA's CPU convolution with few
        channels on large maps runs 2-3x below its speed with many outputs
        (measured on 2 cores, 32x32 maps, conv + ReLU + pool fused: 8 -> 8
        channels 44 GFLOP/s, 8 -> 128 82, 16 -> 128 132), so it pays for
        narrow first layers. None: on when the model allows it
        (`can_share_first_conv`) and the first layer has at most
        `SHARE_MAX_K0` kernels.
      cache_bytes: memory for rows of `L` kept for reuse when the same
        (class, mask) comes back with the same params and images (a GA's
        kept parents and hall of fame); 0 turns it off.
    """
    return FastEvaluator(model, chunk_individuals=chunk_individuals, chunk_images=chunk_images,
                         num_buckets=num_buckets, num_workers=num_workers,
                         share_first_conv=share_first_conv, cache_bytes=cache_bytes)
