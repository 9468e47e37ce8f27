"""The "fast" population evaluator for any traced model, built on `jaxsplit.extract.gather`.

Same contract as `jaxsplit.search.evaluate` (the `Evaluator` protocol):

    evaluate_fn(variables, masks, images, classes) -> L (C, P, N) float32
    L[c, i, n] = logit classes[c] of the model masked with masks[c, i] on image n.

`jaxsplit.search.fast_evaluate.FastEvaluator` is tuned for jaxsplit's own
`ConvNet` (per-block jitted calls, a shared first conv); this evaluator
takes the same ideas to any model `jaxsplit.trace` accepts (BatchNorm
ResNets, VGGs, concats, your own flax Module), with the generic padded
extraction `jaxsplit.extract.gather(graph, variables, indices, valid)`:

* **Plan (host, numpy; `plan_rows`).** The C·P mask rows are flattened.
  Level j = 1..J (J = `num_levels`) gives every free (representative) site s
  of K_s kernels the bucket size `B_s(j)` = `ceil(j·K_s / J)` rounded up to
  `fast_evaluate.bucket_step(K_s, J)` (a multiple of 8), at most K_s
  (`level_sizes`). A row's level is the smallest j whose buckets hold the
  kept count of every site. Its indices at site s are the kept kernels
  ascending, then the dropped ones (padding, `valid` False), cut to B_s(j).
  Tied sites use the representative's mask, as `masks.masked_apply` and
  `gather` do (the search keeps tied masks equal).
  Why one level per row and not one bucket per site (as the ConvNet
  backend does): the ConvNet backend compiles one small function per conv
  block, so per-site buckets give few shapes per function; here a module
  is one function of the whole traced graph, compiled once per bucket
  tuple, and per-site buckets make nearly every row a new tuple (a new
  compile of the whole model: ~1.5 s for SimCNN width 0.25 on 2 loaded
  cores, against ~0.5 s to run the row on 1000 images). Levels bound the
  compiles at J for the whole search, at the cost of running a row at the
  level of its fullest site. Measured (same SimCNN, 16 rows x 1000 images,
  50% kept, interleaved runs): J = 2, 4, 8, 16 gave 1,240, 2,680, 2,880,
  3,020 solution·images/s; 8 is the default (16 doubles the compiles for 5%).
* **Run (jitted per level and image-chunk shape; `GraphFastEvaluator`).**
  For one row: `gather` its module (the kept kernels' weights and their
  carriers / consumers, B_s channels per site), then the module on every
  image chunk (`lax.map`), taking logit `classes[c]`. Padded channels are
  multiplied by `valid = False` at every consumer, so they contribute exactly
  zero: a row's numbers are the unpadded extracted module's (up to float
  summation order), and do not depend on the other rows of the call.
  FLOPs per row: about `f²` of the full model's at a kept fraction f.
* **Members one after another, on `num_workers` threads.** Every row is
  its own jitted call (no padding of groups, plain convolutions). A `vmap`
  over a group's rows would turn the convolutions into grouped ones, which
  XLA's CPU backend runs slowly: measured on 2 shared cores (SimCNN width
  0.25, 32x32x3, 50% kept, 8 rows at one level x 256 images, one thread) a
  jitted `vmap` over the 8 rows took 5.0 s, 8 sequential jitted calls of the
  same modules 1.8 s (2.8x). XLA runs a
  convolution with few channels on one core, so threads run rows
  concurrently (results do not depend on the thread count).

Rows are cached as in the ConvNet backend (`fast_evaluate.RowCache`, keyed
on (class, mask bits) and the identity of the variables and image arrays):
a GA population repeats individuals (kept parents, the hall of fame).

Under an outer `jit` (masks are tracers, no host plan) the evaluator runs
the reference backend's computation (`ReferenceEvaluator` over
`masks.masked_apply`): exact, full FLOPs. `host_side` is True, so the search
driver calls it outside its jit.

Peak memory (float32): variables + images + L + the row cache + per running
row (`num_workers` at once) its gathered module (≤ variables) and about 3
of its largest activations of one image chunk (n ≤ chunk_images images).
"""

from __future__ import annotations

import collections
import concurrent.futures
import threading
from collections.abc import Mapping
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np

from jaxsplit import extract as extract_lib
from jaxsplit import masks as masks_lib
from jaxsplit.search.evaluate import (
    EvaluatorInputError,
    ReferenceEvaluator,
    check_eval_inputs,
    check_variables,
    is_traced,
)
from jaxsplit.search.fast_evaluate import (
    DEFAULT_CACHE_BYTES,
    RowCache,
    bucket_step,
    default_num_workers,
    padded_images,
)

DEFAULT_NUM_LEVELS = 8


def level_sizes(graph: Any, num_levels: int) -> tuple[dict[str, int], ...]:
    """`{free site: B_s(j)}` for the levels j = 1..num_levels (repeats dropped).

    `B_s(j)` = `ceil(j·K_s / num_levels)` rounded up to a multiple of
    `fast_evaluate.bucket_step(K_s, num_levels)`, at most K_s: level j keeps
    about the fraction j / num_levels of every site; the last level is the
    full model.

    Example: K = 64, 8 levels: step 8, sizes 8, 16, ..., 64. K = 6: step 6,
    the full site at every level.
    """
    out = []
    for j in range(1, num_levels + 1):
        sizes = {}
        for name in graph.free_layers:
            k = int(graph.num_kernels[name])
            step = bucket_step(k, num_levels)
            sizes[name] = min(k, -(-(-(-j * k // num_levels)) // step) * step)
        if not out or sizes != out[-1]:
            out.append(sizes)
    return tuple(out)


@chex.dataclass(frozen=True)
class RowPlan:
    """The host plan of M mask rows (numpy).

    Attributes:
      levels: `(M,)` int64, each row's index into `level_sizes`.
      indices: `{free site: (M, K_s)}` int32, the kept kernels ascending, then
        the dropped ones; a row at level j uses the first `B_s(j)`.
      counts: `{free site: (M,)}` int64 kept kernels.
    """

    levels: np.ndarray
    indices: dict
    counts: dict


def plan_rows(graph: Any, flat_masks: Mapping[str, np.ndarray],
              levels: tuple[dict[str, int], ...]) -> RowPlan:
    """Each row's level and indices (host side).

    Args:
      graph: the traced kernel graph.
      flat_masks: `{site: bool (M, K_s)}` (concrete; only the free sites are read).
      levels: `level_sizes(graph, J)`.

    Returns:
      a `RowPlan`.
    """
    num_rows = None
    level = None
    indices, counts = {}, {}
    for name in graph.free_layers:
        m = np.asarray(flat_masks[name], bool)
        num_rows = m.shape[0]
        count = m.sum(axis=1).astype(np.int64)
        indices[name] = np.argsort(~m, axis=1, kind="stable").astype(np.int32)
        counts[name] = count
        sizes = np.asarray([lv[name] for lv in levels])  # non-decreasing
        lv = (sizes[None, :] < count[:, None]).sum(axis=1)
        level = lv if level is None else np.maximum(level, lv)
    level = np.minimum(level, len(levels) - 1).astype(np.int64)
    assert level.shape == (num_rows,)
    return RowPlan(levels=level, indices=indices, counts=counts)


class GraphFastEvaluator(RowCache):
    """The "fast" `Evaluator` of any traced model (see the module docstring).

    Attributes:
      graph: the kernel graph (`jaxsplit.trace`).
      chunk_individuals: rows per chunk of the traced fallback (under `jit`).
      chunk_images: images run through a module at once (bounds memory).
      num_levels: bucket levels (at most this many compiled module shapes
        per image-chunk shape).
      levels: `level_sizes(graph, num_levels)`.
      num_workers: threads running rows concurrently.
      trace_counts: `Counter` of traces per level (one per new shape; tests).
      host_side: True: call it outside `jit` for its speed.
    """

    host_side = True

    def __init__(self, graph: Any, *, chunk_individuals: int = 16, chunk_images: int = 1000,
                 num_levels: int = DEFAULT_NUM_LEVELS, num_workers: int | None = None,
                 cache_bytes: int = DEFAULT_CACHE_BYTES):
        from jaxsplit.graph import Graph  # late: keeps this module light to import

        if not isinstance(graph, Graph):
            raise EvaluatorInputError(
                f"GraphFastEvaluator takes a kernel graph (jaxsplit.trace), got "
                f"{type(graph).__name__}")
        if num_workers is None:
            num_workers = default_num_workers()
        for name, value in (("chunk_individuals", chunk_individuals),
                            ("chunk_images", chunk_images), ("num_levels", num_levels),
                            ("num_workers", num_workers)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise EvaluatorInputError(f"{name} must be an int >= 1, got {value!r}")
        self.graph = graph
        self.target = graph
        self._init_row_cache(cache_bytes, graph.names)
        self.chunk_individuals = int(chunk_individuals)
        self.chunk_images = int(chunk_images)
        self.num_levels = int(num_levels)
        self.num_workers = int(num_workers)
        self.levels = level_sizes(graph, self.num_levels)
        self.trace_counts: collections.Counter = collections.Counter()
        self._trace_lock = threading.Lock()  # traces (graph caches) one at a time
        self._run = jax.jit(self._run_row)
        self._compiled: set = set()  # (level, image chunks shape) already run once
        self._reference = ReferenceEvaluator(graph, masks_lib.masked_apply(graph),
                                             chunk_individuals=chunk_individuals,
                                             chunk_images=chunk_images)

    @property
    def num_traces(self) -> int:
        """Traces of the jitted row function so far."""
        return sum(self.trace_counts.values())

    def __call__(self, variables: Mapping, masks: Mapping[str, jax.Array], images: jax.Array,
                 classes: jax.Array) -> jax.Array:
        """See `jaxsplit.search.evaluate.Evaluator`."""
        check_variables(variables)
        num_rows, num_individuals, num_images = check_eval_inputs(self.graph, masks, images,
                                                                  classes)
        if is_traced(([masks[n] for n in self.graph.names], classes, images, variables)):
            return self._reference._evaluate(variables, masks, images, classes)
        masks_lib._check_variables(self.graph, variables, masks_lib._any_plan(self.graph))
        return self._evaluate_rows(variables, masks, images, classes, num_rows, num_individuals)

    def _run_row(self, variables, indices, valid, cls, image_chunks) -> jax.Array:
        """One row: gather its module, run it on every image chunk -> `(num_chunks * n,)`."""
        with self._trace_lock:
            self.trace_counts[tuple(indices[n].shape[0] for n in self.graph.free_layers)] += 1
            module_apply, module_variables = extract_lib.gather(self.graph, variables, indices,
                                                                valid)

            def one_chunk(x):
                return jnp.take(module_apply(module_variables, x), cls, axis=1)

            out = jax.lax.map(one_chunk, image_chunks)  # traces the graph here
        return out.reshape(-1)

    def _evaluate_host(self, variables, flat_masks, images, row_class) -> np.ndarray:
        """`(M, N)` logits: one jitted call per row, at its level, on worker threads."""
        plan = plan_rows(self.graph, flat_masks, self.levels)
        total = int(row_class.shape[0])
        num_images = int(images.shape[0])
        x, num_chunks, chunk = padded_images(images, self.chunk_images)
        padded = num_chunks * chunk
        image_chunks = x.reshape(num_chunks, chunk, *x.shape[1:])
        variables = jax.device_put(variables)
        free = self.graph.free_layers

        def run(m):
            sizes = self.levels[int(plan.levels[m])]
            idx = {n: plan.indices[n][m, :sizes[n]] for n in free}
            val = {n: np.arange(sizes[n]) < plan.counts[n][m] for n in free}
            return np.asarray(self._run(variables, idx, val, np.int32(row_class[m]),
                                        image_chunks))

        out = np.empty((total, padded), np.float32)
        rest = []
        for m in np.argsort(plan.levels, kind="stable"):  # one level's rows together
            key = (int(plan.levels[m]), tuple(image_chunks.shape))
            if key in self._compiled:
                rest.append(m)
            else:  # the first row of a new shape compiles it, here, once (not on two threads)
                out[m] = run(m)
                self._compiled.add(key)
        with concurrent.futures.ThreadPoolExecutor(self.num_workers) as pool:
            for m, row in zip(rest, pool.map(run, rest)):
                out[m] = row
        return out[:, :num_images]


def make_graph_fast_evaluator(graph: Any, *, chunk_individuals: int = 16,
                              chunk_images: int = 1000, num_levels: int = DEFAULT_NUM_LEVELS,
                              num_workers: int | None = None,
                              cache_bytes: int = DEFAULT_CACHE_BYTES,
                              **unused_options) -> GraphFastEvaluator:
    """A `GraphFastEvaluator` (what `make_evaluator(graph, "fast")` returns for a model that is
    not a `ConvNet`). The ConvNet backend's own options (`share_first_conv`, `num_buckets`)
    do not apply and are ignored."""
    del unused_options
    return GraphFastEvaluator(graph, chunk_individuals=chunk_individuals,
                              chunk_images=chunk_images, num_levels=num_levels,
                              num_workers=num_workers, cache_bytes=cache_bytes)
