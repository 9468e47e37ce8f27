"""The "fast" evaluator backend: what its implementation shares, and `make_fast_evaluator`.

The evaluator itself is `jaxsplit.search.fast_graph.GraphFastEvaluator`
(every module physically extracted, FLOPs on kept kernels only, for any
model `jaxsplit.trace` accepts). jaxsplit's own `ConvNet` (SimCNN, ResCNN,
the weak CNNs) goes through it too, traced like any other model
(`convnet_graph`): a former ConvNet-only evaluator of this module, with its
own extraction from the layer table, was removed once the generic one
matched or beat it in the same run (README, Performance).

Here: the bucket sizes that bound the compiled shapes (`bucket_step`,
`bucket_size`), the rule for small maps (`DENSE_MAX_HW`), the worker count,
image padding into equal chunks, and the row cache (`RowCache`) that lets a
GA's repeated individuals be looked up instead of run again.

Same contract as `jaxsplit.search.evaluate` (the `Evaluator` protocol):

    evaluate_fn(variables, masks, images, classes) -> L (C, P, N) float32
    L[c, i, n] = logit classes[c] of the model masked with masks[c, i] on image n.
"""

from __future__ import annotations

import collections
import functools
import os
import threading
from collections.abc import Mapping
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np

from jaxsplit.search.evaluate import EvaluatorInputError

# Convs whose input maps are at most DENSE_MAX_HW x DENSE_MAX_HW run as one dense matmul
# (`jaxsplit.graph._conv_as_matmul`). Measured on 2 AVX-512 cores (jax 0.10 CPU), n = 256
# images, useful FLOP/s: XLA's conv at 2x2 ran at 3-4 GFLOP/s (256-512 channels) against ~250
# for the dense matmul; at 4x4 and larger XLA's conv ran at 100-200 (better than im2col
# matmuls, 60-140), while a dense matrix would multiply by zero blocks (a 4x4 map has 100 of
# 256 position pairs adjacent).
DENSE_MAX_HW = 2
DEFAULT_NUM_BUCKETS = 32
ALIGN = 8
MAX_WORKERS = 4
DEFAULT_CACHE_BYTES = 256 * 2**20  # evaluated rows kept for reuse (see `_evaluate_cached`)
SHARE_MAX_K0 = 32  # group the second segment of rows by default when the first site has <= 32


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
    """The row cache of the host-side evaluator (mixed into
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

        `params` is every array a row depends on besides the images (a traced
        model's full variables, with its BatchNorm statistics);
        `self._evaluate_host(params, flat_masks, images, row_class)` computes
        the rows not in the cache.

        A GA's next population repeats individuals (kept parents, the hall of
        fame, identical children): their rows are looked up by (class, mask
        bits) instead of run again. Sound because a row depends only on its
        module, the params and the images: the same compiled code runs it
        whatever the other modules of the call, the grouping or the threads
        (`GraphFastEvaluator._evaluate_host`; tested bit for bit), and the cache is keyed on
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


@functools.lru_cache(maxsize=16)
def convnet_graph(model: Any) -> Any:
    """The kernel graph of a jaxsplit `ConvNet` (`jaxsplit.trace` of its inference apply on
    abstract params: nothing is initialised).

    Cached per model (ConvNets are frozen, hashable dataclasses): every evaluator of the same
    model, e.g. the search's and the sensitivity analysis', shares one trace and the segment
    functions compiled on it."""
    from jaxsplit.graph import trace  # late: graph imports masks, which imports this package
    from jaxsplit.models import inference_apply
    from jaxsplit.models.convnet import init_params

    shapes = jax.eval_shape(lambda: {"params": init_params(model, jax.random.key(0))})
    example = jax.eval_shape(lambda: model.dummy_input(1))
    return trace(inference_apply(model), shapes, example)


def make_fast_evaluator(target: Any, *, chunk_individuals: int = 16, chunk_images: int = 1000,
                        num_buckets: int = DEFAULT_NUM_BUCKETS,
                        num_workers: int | None = None,
                        share_first_conv: bool | None = None,
                        cache_bytes: int = DEFAULT_CACHE_BYTES, **graph_options) -> Any:
    """The "fast" `Evaluator` (what `make_evaluator(target, "fast")` returns).

    Args:
      target: a jaxsplit `ConvNet` (traced with `convnet_graph`) or the kernel
        graph of any model (`jaxsplit.trace`).
      chunk_individuals: rows per chunk of the traced fallback (under `jit`).
      chunk_images: images run through a module at once.
      num_buckets: bucket sizes per site (more: less padding, more compiled shapes).
      num_workers: threads running modules concurrently (None: `default_num_workers()`).
      share_first_conv: `GraphFastEvaluator`'s `share_first`: None (default): the
        first segment at full width for all rows when exact and, with a first
        site of at most `SHARE_MAX_K0` kernels, the second segment for groups of
        rows at once; True: grouped whatever the width; False: neither.
      cache_bytes: memory for rows of `L` kept for reuse when the same
        (class, mask) comes back with the same variables and images (a GA's
        kept parents and hall of fame); 0 turns it off.
      **graph_options: `GraphFastEvaluator`'s `matmul_max_hw`, `prefix_bytes`, `group_rows`.
    """
    from jaxsplit.graph import Graph  # late: see convnet_graph
    from jaxsplit.search import fast_graph  # late: it imports this module

    graph = target if isinstance(target, Graph) else convnet_graph(target)
    return fast_graph.GraphFastEvaluator(graph, chunk_individuals=chunk_individuals,
                                         chunk_images=chunk_images, num_buckets=num_buckets,
                                         num_workers=num_workers, cache_bytes=cache_bytes,
                                         share_first=share_first_conv, **graph_options)
