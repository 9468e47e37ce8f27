"""The "fast" population evaluator for any traced model: FLOPs on kept kernels only.

Same contract as `jaxsplit.search.evaluate` (the `Evaluator` protocol):

    evaluate_fn(variables, masks, images, classes) -> L (C, P, N) float32
    L[c, i, n] = logit classes[c] of the model masked with masks[c, i] on image n.

Why another backend: the reference backend (activation masking, shared
weights, `vmap` over individuals) spends the full model's FLOPs on every
module, although a module keeping a fraction f of every layer's kernels
needs about f² of them (docs/method.md §7: a masked kernel is a removed
kernel), and `vmap` turns its convolutions into per-individual grouped
convolutions, which XLA's CPU backend runs far below matmul speed. This
backend does what CNNSplitter's PyTorch loop does, for any model
`jaxsplit.trace` accepts (SimCNN, ResCNN, BatchNorm ResNets, VGGs, concats,
your own flax Module): it builds each module physically and runs the images
through it, with shapes kept static for XLA.

* **Plan (host, numpy; `plan_rows`).** The C·P mask rows are flattened.
  For every row and free (representative) site s of K_s kernels: the kept
  kernels ascending, then the dropped ones as padding, cut to the bucket
  `B_s = fast_evaluate.bucket_size(count, K_s, num_buckets)` (a multiple of
  `bucket_step`, 8-aligned: at most `num_buckets` sizes per site). Tied
  sites use the representative's mask, as `masks.masked_apply` does (the
  search keeps tied masks equal).
* **Extract and run, segment by segment (`jaxsplit.segments`).** The traced
  model is cut into one segment per site (its conv and what follows up to
  the next site's conv: bias, BatchNorm, activation, pooling, residual add);
  each segment is compiled for the bucket sizes of the channel groups it
  touches only, typically its (B_in, B_out). Per row, each segment gathers
  its kept weights (conv kernels on both sides, carriers, Dense rows, the
  classifier's column `classes[c]`) on the host, with every consumer's
  weights for its padded channels zeroed, then the image chunks run through
  the segments. Padded channels so contribute exactly zero: a row's numbers
  are the unpadded extracted module's (up to float summation order) and do
  not depend on the other rows of the call (`_evaluate_host`).
  Why segments and not one function of the whole model per module shape:
  rows differ in their buckets at some site almost always, and each new
  tuple of buckets would compile the whole model again (~1.5 s for SimCNN
  width 0.25 on 2 cores, against ~0.5 s to run the row on 1000 images);
  per segment, the distinct (B_in, B_out) pairs are few and each compiles in
  tens of milliseconds. FLOPs per row: about `f²` of the full model's at a
  kept fraction f, plus the bucket rounding.
* **Small maps as one matmul.** Convs whose input maps are at most
  `matmul_max_hw` (default `fast_evaluate.DENSE_MAX_HW` = 2) in every
  spatial dimension run as one dense matmul (`graph._conv_as_matmul`): XLA's
  CPU convolution runs 2x2 maps with hundreds of channels ~50-100x below
  matmul speed (`fast_evaluate.DENSE_MAX_HW`). Measured on full-width SimCNN
  (2 cores, 8 rows x 256 images, 50% kept): 5x faster rows.
* **Members one after another, on `num_workers` threads.** Every row is its
  own sequence of jitted calls (no `vmap` over rows: that would turn the
  convolutions into grouped ones; measured on 2 shared cores, SimCNN width
  0.25, 8 rows x 256 images, a jitted `vmap` over the rows took 5.0 s, 8
  sequential calls 1.8 s). XLA runs a convolution with few channels on one
  core, so threads run rows concurrently (results do not depend on the
  thread count).

Rows are cached (`fast_evaluate.RowCache`, keyed on (class, mask bits) and
the identity of the variables and image arrays): a GA population repeats
individuals (kept parents, the hall of fame).

Under an outer `jit` (masks are tracers, no host plan) the evaluator runs
the reference backend's computation (`ReferenceEvaluator` over
`masks.masked_apply`): exact, full FLOPs. `host_side` is True, so the search
driver calls it outside its jit.

Peak memory (float32): variables + images + L + the row cache + the shared
first segment and prefixes (at most `prefix_bytes`) + per running row
(`num_workers` at once) its gathered weights (≤ variables) and about 3 of
its largest activations of one image chunk (n ≤ chunk_images images).
"""

from __future__ import annotations

import concurrent.futures
from collections.abc import Mapping
from typing import Any

import chex
import jax
import numpy as np

from jaxsplit import masks as masks_lib
from jaxsplit import segments as segments_lib
from jaxsplit.graph import CLASS_GID
from jaxsplit.search.evaluate import (
    EvaluatorInputError,
    ReferenceEvaluator,
    check_eval_inputs,
    check_variables,
    is_traced,
)
from jaxsplit.search.fast_evaluate import (
    DEFAULT_CACHE_BYTES,
    DEFAULT_NUM_BUCKETS,
    DENSE_MAX_HW,
    SHARE_MAX_K0,
    RowCache,
    bucket_size,
    default_num_workers,
    padded_images,
)

DEFAULT_PREFIX_BYTES = 512 * 2**20


@chex.dataclass(frozen=True)
class RowPlan:
    """The host plan of M mask rows (numpy).

    Attributes:
      sizes: `{free site: (M,)}` int64 bucket sizes B_s.
      indices: `{free site: (M, K_s)}` int32, the kept kernels ascending, then
        the dropped ones; a row uses the first `B_s`.
      counts: `{free site: (M,)}` int64 kept kernels.
    """

    sizes: dict
    indices: dict
    counts: dict


def plan_rows(graph: Any, flat_masks: Mapping[str, np.ndarray],
              num_buckets: int = DEFAULT_NUM_BUCKETS) -> RowPlan:
    """Each row's bucket sizes and indices (host side).

    Args:
      graph: the traced kernel graph.
      flat_masks: `{site: bool (M, K_s)}` (concrete; only the free sites are read).
      num_buckets: bucket sizes per site (`fast_evaluate.bucket_size`).

    Returns:
      a `RowPlan`.
    """
    sizes, indices, counts = {}, {}, {}
    for name in graph.free_layers:
        m = np.asarray(flat_masks[name], bool)
        count = m.sum(axis=1).astype(np.int64)
        indices[name] = np.argsort(~m, axis=1, kind="stable").astype(np.int32)
        counts[name] = count
        sizes[name] = bucket_size(count, int(graph.num_kernels[name]), num_buckets)
    return RowPlan(sizes=sizes, indices=indices, counts=counts)


class GraphFastEvaluator(RowCache):
    """The "fast" `Evaluator` of any traced model (see the module docstring).

    Attributes:
      graph: the kernel graph (`jaxsplit.trace`).
      chunk_individuals: rows per chunk of the traced fallback (under `jit`).
      chunk_images: images run through a module at once (bounds memory).
      num_buckets: bucket sizes per site (`fast_evaluate.bucket_size`).
      matmul_max_hw: convs on maps of at most this size run as one matmul.
      prefix_bytes: memory for the first segments' outputs that rows share
        (`shared_prefixes`) and the first segment at full width; 0 turns the
        sharing off.
      group_rows: this many rows run their second segment as one wider module
        (`segments.Segmented.second_grouping`; the last group of a call padded);
        1 turns it off.
      share_first: None (default): the first segment at full width for all rows
        when exact, the grouped second segment when the first site has at most
        `SHARE_MAX_K0` kernels; True: grouped whatever the width; False: neither.
      num_workers: threads running rows concurrently.
      host_side: True: call it outside `jit` for its speed.
    """

    host_side = True

    def __init__(self, graph: Any, *, chunk_individuals: int = 16, chunk_images: int = 1000,
                 num_buckets: int = DEFAULT_NUM_BUCKETS, num_workers: int | None = None,
                 cache_bytes: int = DEFAULT_CACHE_BYTES, matmul_max_hw: int = DENSE_MAX_HW,
                 prefix_bytes: int = DEFAULT_PREFIX_BYTES, group_rows: int = 16,
                 share_first: bool | None = None):
        from jaxsplit.graph import Graph  # late: keeps this module light to import

        if not isinstance(graph, Graph):
            raise EvaluatorInputError(
                f"GraphFastEvaluator takes a kernel graph (jaxsplit.trace), got "
                f"{type(graph).__name__}")
        if num_workers is None:
            num_workers = default_num_workers()
        for name, value, low in (("chunk_individuals", chunk_individuals, 1),
                                 ("chunk_images", chunk_images, 1),
                                 ("num_buckets", num_buckets, 1), ("num_workers", num_workers, 1),
                                 ("matmul_max_hw", matmul_max_hw, 0),
                                 ("prefix_bytes", prefix_bytes, 0),
                                 ("group_rows", group_rows, 1)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
                raise EvaluatorInputError(f"{name} must be an int >= {low}, got {value!r}")
        self.graph = graph
        self.target = graph
        self._init_row_cache(cache_bytes, graph.names)
        self.chunk_individuals = int(chunk_individuals)
        self.chunk_images = int(chunk_images)
        self.num_buckets = int(num_buckets)
        self.num_workers = int(num_workers)
        self.matmul_max_hw = int(matmul_max_hw)
        self.prefix_bytes = int(prefix_bytes)
        self.group_rows = int(group_rows)
        if share_first not in (None, True, False):
            raise EvaluatorInputError(f"share_first must be None, True or False, got "
                                      f"{share_first!r}")
        self.share_first = share_first
        self._reference = ReferenceEvaluator(graph, masks_lib.masked_apply(graph),
                                             chunk_individuals=chunk_individuals,
                                             chunk_images=chunk_images)

    @property
    def num_compiles(self) -> int:
        """Compiled (segment, channel counts, chunk shape) functions so far, over all calls."""
        total = 0
        for value in self.graph._modules.values():
            if isinstance(value, segments_lib.Segmented) and \
                    value.matmul_max_hw == self.matmul_max_hw:
                total += sum(f._cache_size() for f in value._run_fns)
        return total

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

    def _evaluate_host(self, variables, flat_masks, images, row_class) -> np.ndarray:
        """`(M, N)` logits: each row's module, segment by segment, on worker threads.

        How a row is computed depends only on the model, the images' shape and
        the options, never on the other rows of the call (so rows can be
        cached and a search resumed bit for bit):

        * `share_first` not False, segment 0 shareable
          (`Segmented.first_is_shareable`) and its full-width values within
          `prefix_bytes`: segment 0 runs once at full width and every row takes
          its channels (`take_live`); then, if the first site is narrow (<=
          `SHARE_MAX_K0` kernels, or `share_first=True`) and `second_grouping`
          allows, segment 1 of the rows that do not keep both first sites
          whole runs for `group_rows` rows at once (groups padded to that
          width);
        * otherwise rows start from the images.
        Rows that gather the same weights in further segments (a GA's
        sensitive layers) run those once (`shared_prefixes`): the same compiled
        functions on the same values, so the same numbers (with grouping, only
        the rows that run on their own share prefixes; in a group, a block's
        numbers do not depend on the other blocks).
        """
        plan = plan_rows(self.graph, flat_masks, self.num_buckets)
        total = int(row_class.shape[0])
        num_images = int(images.shape[0])
        x, num_chunks, chunk = padded_images(images, self.chunk_images)
        x = jax.device_put(x)
        chunks = [x[i * chunk:(i + 1) * chunk] for i in range(num_chunks)]
        segs = segments_lib.segment(self.graph, (chunk, *x.shape[1:]), x.dtype,
                                    matmul_max_hw=self.matmul_max_hw)
        leaves = [np.asarray(v) for v in jax.tree_util.tree_leaves(variables)]
        gid = self.graph.group_of(segs.plan)
        free = self.graph.free_layers
        has_class = segs.plan.has_class
        x_var = segs.plan.closed.jaxpr.invars[-1]
        num_segments = len(segs.segments)

        def row_inputs(m):
            sizes, idx, valid = {}, {}, {}
            for n in free:
                g, b = gid[n], int(plan.sizes[n][m])
                sizes[g], idx[g] = b, plan.indices[n][m, :b]
                valid[g] = np.arange(b) < plan.counts[n][m]
            if has_class:
                sizes[CLASS_GID], idx[CLASS_GID] = 1, np.asarray([row_class[m]], np.int32)
            return sizes, idx, valid

        inputs = [row_inputs(m) for m in range(total)]  # (sizes, indices, valid) per row

        def run_chunk(env, first, stop, sizes, valid, gathered):
            """Segments [first, stop) of one image chunk; keeps only the values live after."""
            for k in range(first, stop):
                seg = segs.segments[k]
                vals = segs.run(k, sizes, gathered[k], valid, [env[v] for v in seg.live_in],
                                folded=True)
                env.update(zip(seg.live_out, vals))
                env = {v: env[v] for v in segs.live_after[k]} if k + 1 < num_segments else env
            return env

        def gathered_from(m, first, stop):
            """Row m's sizes, valid flags and gathered leaves (valid folded in) of segments
            [first, stop)."""
            sizes, idx, valid = inputs[m]
            return sizes, valid, {k: segs.gather(k, sizes, leaves, idx, valid)
                                  for k in range(first, stop)}

        def logits(m, outs):
            out = np.concatenate([np.asarray(o) for o in outs], axis=0)
            return out[:, 0] if has_class else out[:, int(row_class[m])]

        # -- the first segment at full width, once per call
        full_first = None
        if self.share_first is not False and self.prefix_bytes and segs.first_is_shareable():
            full_sizes = {gid[n]: self.graph.num_kernels[n] for n in free}
            if segs.live_bytes(0, full_sizes) * num_chunks <= self.prefix_bytes:
                full_first = []
                for c in chunks:
                    env = run_chunk({x_var: c}, 0, 1, {}, {}, {0: segs.gather(0, {}, leaves, {}, {})})
                    full_first.append([env[v] for v in segs.live_after[0]])
        grouping = None
        if full_first is not None and self.group_rows > 1:
            grouping = segs.second_grouping()
            if grouping is not None and self.share_first is None and \
                    full_sizes[grouping.g0] > SHARE_MAX_K0:
                grouping = None  # a wide first site: the rows' own narrower inputs are faster
        grouped = [False] * total
        if grouping is not None:
            # a row keeping both first sites whole (the GA's sensitive layers) runs on its own,
            # from a prefix shared with the other such rows; the others in groups. Decided by
            # the row alone, so its numbers do not depend on the call.
            site0 = next(n for n in free if gid[n] == grouping.g0)
            site1 = next(n for n in free if gid[n] == grouping.g1)
            g1 = grouping.g1
            whole = (plan.counts[site0] == self.graph.num_kernels[site0]) & \
                (plan.counts[site1] == self.graph.num_kernels[site1])
            grouped = [not bool(w) for w in whole]

        def start_envs(m):
            """Row m's values after its first computed segments: (envs per chunk, next)."""
            if full_first is None:
                return [{x_var: c} for c in chunks], 0
            sizes, idx, _ = inputs[m]
            return [dict(zip(segs.live_after[0], segs.take_live(0, sizes, vals, idx)))
                    for vals in full_first], 1

        # -- shared prefixes: rows that gather the same weights up to a segment compute it once
        budget = self.prefix_bytes - (0 if full_first is None else
                                      segs.live_bytes(0, full_sizes) * num_chunks)
        alone = [m for m in range(total) if not grouped[m]]
        sub_depth, sub_key, prefix_of = shared_prefixes(
            segs, [inputs[m] for m in alone], chunk_rows=num_chunks,
            budget=max(budget, 0), min_depth=0 if full_first is None else 1)
        prefix_of = {k: (alone[j], d) for k, (j, d) in prefix_of.items()}
        depth, key_of = [-1] * total, [b""] * total
        for j, m in enumerate(alone):
            depth[m], key_of[m] = sub_depth[j], sub_key[j]
        prefixes: dict = {}

        def grouped_second(padded, vals0):
            """Segment 1 of `padded` rows (same bucket) as one module on one chunk -> the
            values live after it, shared by the rows (block j of each g1 axis is row j's)."""
            b1 = int(plan.sizes[site1][padded[0]])
            blocks = [(plan.indices[site1][m, :b1], flat_masks[site0][m]) for m in padded]
            group_leaves = segs.gather_group(grouping, leaves, blocks)
            sizes_g = {g1: b1 * len(padded)}
            valid_g = {g1: np.concatenate([inputs[m][2][g1] for m in padded])}
            seg1 = segs.segments[1]
            env0 = dict(zip(segs.live_after[0], vals0))
            env1 = dict(zip(seg1.live_out, segs.run(1, sizes_g, group_leaves, valid_g,
                                                    [env0[v] for v in seg1.live_in])))
            return [env1[v] if v in env1 else env0[v] for v in segs.live_after[1]], b1

        def member_env(shared, b1, j):
            return {v: value if ax is None else
                    jax.lax.slice_in_dim(value, j * b1, (j + 1) * b1, axis=ax)
                    for v, value, ax in zip(segs.live_after[1], shared, grouping.slice_axis)}

        def compute_prefix(key):
            m, d = prefix_of[key]
            envs, first = start_envs(m)
            sizes, valid, gathered = gathered_from(m, first, d + 1)
            return key, [run_chunk(env, first, d + 1, sizes, valid, gathered) for env in envs]

        def run_row(m):
            d = depth[m]
            if d >= 0:
                envs, first = prefixes[key_of[m]], d + 1
            else:
                envs, first = start_envs(m)
            sizes, valid, gathered = gathered_from(m, first, num_segments)
            return [(m, logits(m, [run_chunk(dict(env), first, num_segments, sizes, valid,
                                             gathered)[segs.out_var] for env in envs]))]

        def run_group(members):
            """`group_rows` rows (the last repeated to fill) with the same segment-1 bucket:
            segment 1 as one module, then each row on its own."""
            padded = list(members) + [members[-1]] * (self.group_rows - len(members))
            rows = [gathered_from(m, 2, num_segments) for m in members]
            outs = [[] for _ in members]

            def finish(args):
                j, shared, b1 = args
                sizes, valid, gathered = rows[j]
                return run_chunk(member_env(shared, b1, j), 2, num_segments, sizes, valid,
                                 gathered)[segs.out_var]

            for vals0 in full_first:
                shared, b1 = grouped_second(padded, vals0)
                jobs = [(j, shared, b1) for j in range(len(members))]
                # fewer groups than workers (a small call): the members' own segments on threads
                done = inner.map(finish, jobs) if inner is not None else map(finish, jobs)
                for j, out_j in enumerate(done):
                    outs[j].append(out_j)
            return [(m, logits(m, o)) for m, o in zip(members, outs)]

        # rows with equal buckets one after another: a new shape compiles once, on one thread
        order = [int(m) for m in np.lexsort([plan.sizes[n] for n in free][::-1])]
        if grouping is not None:
            by_bucket: dict = {}
            tasks = []
            for m in order:
                if grouped[m]:
                    by_bucket.setdefault(int(plan.sizes[site1][m]), []).append(m)
                else:
                    tasks.append((run_row, m))
            tasks += [(run_group, members[i:i + self.group_rows])
                      for members in by_bucket.values()
                      for i in range(0, len(members), self.group_rows)]
        else:
            tasks = [(run_row, m) for m in order]
        num_groups = sum(1 for t in tasks if t[0] is run_group)
        inner = None
        if 0 < num_groups < self.num_workers:
            inner = concurrent.futures.ThreadPoolExecutor(self.num_workers)
        out = np.empty((total, num_chunks * chunk), np.float32)
        with concurrent.futures.ThreadPoolExecutor(self.num_workers) as pool:
            for key, envs in pool.map(compute_prefix, list(prefix_of)):
                prefixes[key] = envs
            try:
                for done in pool.map(lambda t: t[0](t[1]), tasks):
                    for m, row in done:
                        out[m] = row
            finally:
                if inner is not None:
                    inner.shutdown()
        return out[:, :num_images]


def prefix_keys(segs: segments_lib.Segmented, row: tuple, min_depth: int = 0) -> list[bytes]:
    """Per depth d, what segments 0..d of a row compute from: its channels and flags at the
    groups of those segments (b"" below `min_depth`). Built segment by segment."""
    sizes, idx, valid = row
    seen: set[int] = set()
    key, out = b"", []
    for d, seg in enumerate(segs.segments[:-1]):
        for g in seg.groups:
            if g in sizes and g not in seen:
                seen.add(g)
                key += (b"|%d:" % g + np.asarray(idx[g], np.int32).tobytes()
                        + np.asarray(valid.get(g, ()), bool).tobytes())
        out.append(key if d >= min_depth else b"")
    return out


def shared_prefixes(segs: segments_lib.Segmented, rows: list, *, chunk_rows: int,
                    budget: int, min_depth: int = 0) -> tuple[list[int], list[bytes], dict]:
    """For every row, the deepest segment whose outputs another row of the call shares.

    Rows that gather the same channels at every group of segments 0..d
    compute the same values there (on the same images), so those are
    computed once per call and kept (for all image chunks) while the rows
    run. Deepest shared prefixes first, each kept only while the kept values
    fit in `budget` bytes. Depths below `min_depth` are not considered (those
    segments are computed once for all rows another way).

    Args:
      rows: per row `(sizes, indices, valid)`, by group.

    Returns:
      `(depth, key, prefix_of)`: `depth[m]` is -1 (nothing shared) or the last
      shared segment d, `key[m]` the prefix key of row m at that depth
      (`prefix_keys`), `prefix_of[key] = (first row, d)` for the prefixes to
      compute.
    """
    num = len(segs.segments)
    depth, chosen = [-1] * len(rows), [b""] * len(rows)
    if num < 2 or len(rows) < 2:
        return depth, chosen, {}
    keys = [prefix_keys(segs, row, min_depth) for row in rows]
    counts: dict = {}
    for row_keys in keys:
        for d, k in enumerate(row_keys):
            counts[(d, k)] = counts.get((d, k), 0) + 1
    prefix_of: dict = {}
    used = 0
    for m, row in enumerate(rows):
        for d in range(num - 2, min_depth - 1, -1):
            k = keys[m][d]
            if counts[(d, k)] < 2:
                continue
            if k in prefix_of and prefix_of[k][1] == d:
                depth[m], chosen[m] = d, k
                break
            size = segs.live_bytes(d, row[0]) * chunk_rows
            if used + size <= budget:
                used += size
                prefix_of[k] = (m, d)
                depth[m], chosen[m] = d, k
                break
    return depth, chosen, prefix_of
