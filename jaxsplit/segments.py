"""A traced model cut into per-site segments, each compiled for its own channel counts.

`jaxsplit.extract.gather` re-evaluates the whole traced jaxpr with every
site's channel count (bucket) as a static shape, so one compiled function
serves only modules whose buckets agree at *every* site: two modules that
differ in one layer's bucket compile the whole model again. A population
evaluator (`jaxsplit.search.fast_graph`) runs thousands of modules whose
kept counts differ per layer, so it cuts the model's top-level equations
into *segments*, one starting at every site's convolution (the first one
also holds whatever comes before the first site), and compiles each segment
for the channel counts of the groups it touches only (typically its input
and output channels: a conv block's (B_in, B_out)). The number of compiles
is then about the sum over segments of their distinct bucket pairs, not the
product over sites; this is what the tuned per-block calls of a hand-written
evaluator do, derived here from the traced graph of any model.

Each segment has

* `gather(k, sizes, leaves, indices)`: its variables leaves, gathered along
  every channel-labelled axis on the host (`graph.take_channels`, the rule
  of `jaxsplit.extract`) — once per module;
* `run(k, sizes, gathered, valid, live)`: its equations, jitted, on one image
  chunk, from the values it reads (`live`: the previous segments' outputs it
  uses, the images for the first) to the values later segments or the output
  read.

`key` is the static tuple of (group, size) of the segment's groups; values
are interpreted with `jaxsplit.graph`'s evaluation rules (consumer inputs
multiplied by `valid`, so padded channels contribute exactly zero; small
maps as one matmul with `matmul_max_hw`). The numbers are those of
`gather`'s module up to float summation order.

Hand-written because no library splits a jaxpr into independently compiled,
shape-polymorphic pieces.
"""

from __future__ import annotations

import dataclasses
import functools
import threading
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jcore

from jaxsplit import graph as graph_lib
from jaxsplit.graph import CLASS_GID, Graph, GraphError


@dataclasses.dataclass(frozen=True, eq=False)
class Segment:
    """Top-level equations `[start, stop)` of a plan's jaxpr.

    Attributes:
      eqns: the equations.
      live_in: jaxpr variables it reads that earlier segments define (or the input).
      live_out: variables it defines that later segments or the output read.
      leaves: indices of the variables leaves it reads.
      groups: channel groups whose sizes shape it (sorted; `CLASS_GID` included
        when it touches the classifier's columns).
    """

    eqns: tuple
    live_in: tuple
    live_out: tuple
    leaves: tuple[int, ...]
    groups: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class SecondGrouping:
    """`Segmented.second_grouping`: segment 1 of several rows as one module.

    Attributes:
      g0, g1: the first site's group and segment 1's own group.
      concat_axis: per leaf of segment 1, its g1 axis (rows' leaves are
        concatenated there) or None (the same for every row).
      fold_axes: per leaf, its g0 consumer axes (multiplied by a row's g0 mask).
      slice_axis: per value of `live_after[1]`, its g1 axis (each row takes
        its block) or None (unlabelled: shared).
    """

    g0: int
    g1: int
    concat_axis: tuple
    fold_axes: tuple
    slice_axis: tuple


@dataclasses.dataclass(frozen=True, eq=False)
class Segmented:
    """The segments of one plan (input shape), and what running them needs."""

    graph: Graph
    plan: Any
    segments: tuple[Segment, ...]
    infos: dict  # top-level jaxpr variable (leaves and input included) -> graph._Info
    out_var: Any
    matmul_max_hw: int
    live_after: tuple  # per segment d: the variables defined up to d and read after it
    _lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)
    _run_fns: list = dataclasses.field(default_factory=list)
    _take_fns: dict = dataclasses.field(default_factory=dict)
    _consumer_axes: dict = dataclasses.field(default_factory=dict)  # leaf -> ((axis, layout),)

    def gather(self, k: int, sizes: Mapping[int, int], leaves: Sequence[np.ndarray],
               indices: Mapping[int, np.ndarray], valid: Mapping[int, np.ndarray] | None = None
               ) -> tuple:
        """Segment k's leaves gathered with `indices` (`{group: int[B_g]}`), on the host.

        numpy, not jitted: slicing costs no compilation (a jitted gather
        compiles once per shape) and well under a millisecond per full-width
        layer. Groups missing from `sizes` stay whole (e.g. the classifier's
        columns without a target class). With `valid` (`{group: bool[B_g]}`),
        every consumer axis (a conv kernel's input axis, Dense rows) is also
        multiplied by its valid flags, so padded channels meet zero weights and
        `run(..., folded=True)` need not mask the activations.
        """
        seg = self.segments[k]
        labels = self.plan.leaf_labels
        idx = {g: np.asarray(indices[g], np.int32) for g in seg.groups if g in sizes}
        flags = {g: v for g, v in (valid or {}).items() if g in idx}
        out = []
        for i in seg.leaves:
            value = graph_lib.take_channels(leaves[i], labels.get(i, ()), idx, np)
            if flags:
                for ax, lay in self._consumer_axes.get(i, ()):
                    vec = graph_lib._vector(lay, flags, sizes, value.dtype, np)
                    if vec is not None:
                        value = _scale_axis(value, ax, vec)
            out.append(value)
        return tuple(jax.device_put(out))

    def gather_group(self, grouping: SecondGrouping, leaves: Sequence[np.ndarray],
                     rows: Sequence[tuple]) -> tuple:
        """Segment 1's leaves for rows side by side (`second_grouping`), on the host.

        `rows`: per row `(idx1 int[B1], mask0 bool[K0])`, all with the same B1.
        """
        seg = self.segments[1]
        out = []
        for j, i in enumerate(seg.leaves):
            axis = grouping.concat_axis[j]
            if axis is None:
                out.append(leaves[i])
                continue
            blocks = []
            for idx1, mask0 in rows:
                value = np.take(leaves[i], np.asarray(idx1, np.int32), axis=axis)
                for ax in grouping.fold_axes[j]:
                    value = _scale_axis(value, ax, np.asarray(mask0, value.dtype))
                blocks.append(value)
            out.append(np.concatenate(blocks, axis=axis))
        return tuple(jax.device_put(out))

    def take_live(self, d: int, sizes: Mapping[int, int], values: Sequence[jax.Array],
                  indices: Mapping[int, Any]) -> tuple:
        """`live_after[d]` computed at full width -> the channels `indices` of a module.

        Every op of a segment acts channel by channel on labelled axes (what
        `jaxsplit.trace` checks), so the values of a module whose groups
        keep the channels `indices` are the full model's values taken at
        those channels: the segments up to d run once for all rows.
        """
        groups = tuple(sorted({g for v in self.live_after[d] for g in _var_groups(self.infos[v])
                               if g in sizes}))
        key = (d, tuple((g, int(sizes[g])) for g in groups))
        if key not in self._take_fns:
            self._take_fns[key] = jax.jit(functools.partial(_take, [
                tuple(self.infos[v].lab) for v in self.live_after[d]]))
        return self._take_fns[key](tuple(values), {g: indices[g] for g in groups})

    def first_is_shareable(self) -> bool:
        """Whether segment 0 can run once at full width for all rows (`take_live(0, ...)`).

        True when it touches one channel group (its site's, tied sites
        included) and reads no channel of it at a consumer (a conv input or
        Dense row): then a module's values after it are the full model's at
        the module's channels, and dropped channels are zeroed later, where
        segment 1 consumes them.
        """
        if len(self.segments) < 2:
            return False
        seg = self.segments[0]
        if len(seg.groups) != 1 or seg.groups[0] == CLASS_GID:
            return False
        consumer_paths = {c.path for site in self.graph.sites for c in site.consumers}
        return not any(self.graph.leaf_paths[i] in consumer_paths for i in seg.leaves)

    def second_grouping(self) -> SecondGrouping | None:
        """How rows can run segment 1 side by side as one wider module, or None.

        With segment 0 run once at full width (`first_is_shareable`), G rows'
        segment 1 is one computation: its input keeps all K0 channels of
        group g0, each row's consumer weights of g0 are multiplied by its
        g0 mask (so dropped channels contribute zero), and the rows' g1
        channels are concatenated (sizes G·B1). XLA runs one convolution
        with G·B1 outputs far faster than G narrow ones. Needs: segment 1
        touches exactly g0 and another group g1; every labelled leaf axis
        there is a plain channel axis; every g0 consumer leaf also has a g1
        axis; the values live after it are labelled by g1 only and defined
        in it (or unlabelled).
        """
        if not self.first_is_shareable():
            return None
        (g0,) = self.segments[0].groups
        seg = self.segments[1]
        if len(seg.groups) != 2 or g0 not in seg.groups or CLASS_GID in seg.groups:
            return None
        (g1,) = [g for g in seg.groups if g != g0]
        gid = self.graph.group_of(self.plan)
        consumers = {(c.path, c.axis) for site in self.graph.sites if gid[site.name] == g0
                     for c in site.consumers}
        concat_axis, fold_axes = [], []
        for i in seg.leaves:
            lab = self.plan.leaf_labels.get(i, ())
            g1_axes = []
            for ax, lay in enumerate(lab):
                if lay is None:
                    continue
                if lay[0] != "chan" or lay[1] not in (g0, g1):
                    return None
                if lay[1] == g1:
                    g1_axes.append(ax)
            folds = [ax for ax, lay in enumerate(lab) if lay is not None and lay[1] == g0
                     and (self.graph.leaf_paths[i], ax) in consumers]
            if len(g1_axes) > 1 or (folds and not g1_axes):
                return None
            concat_axis.append(g1_axes[0] if g1_axes else None)
            fold_axes.append(tuple(folds))
        defined = {v for e in seg.eqns for v in e.outvars}
        slice_axis = []
        for v in self.live_after[1]:
            lab = [lay for lay in self.infos[v].lab]
            axes = [ax for ax, lay in enumerate(lab) if lay is not None]
            if not axes:
                slice_axis.append(None)
                continue
            if len(axes) != 1 or v not in defined or lab[axes[0]][0] != "chan" \
                    or lab[axes[0]][1] != g1:
                return None
            slice_axis.append(axes[0])
        return SecondGrouping(g0, g1, tuple(concat_axis), tuple(fold_axes), tuple(slice_axis))

    def live_bytes(self, d: int, sizes: Mapping[int, int]) -> int:
        """Bytes of `live_after[d]` for one image chunk with channel counts `sizes`."""
        total = 0
        for v in self.live_after[d]:
            info = self.infos[v]
            shape = [s if lay is None else graph_lib._size(lay, sizes)
                     for s, lay in zip(info.shape, info.lab)]
            total += int(np.prod(shape)) * np.dtype(v.aval.dtype).itemsize
        return total

    def run(self, k: int, sizes: Mapping[int, int], gathered: tuple,
            valid: Mapping[int, Any], live: Sequence[jax.Array], *, folded: bool = False) -> tuple:
        """Segment k on one chunk: `live` (values of `live_in`) -> values of `live_out`.

        `folded`: `gathered` came from `gather(..., valid=...)`: consumers whose
        kernel is a plain leaf do not mask their inputs (others still do)."""
        seg = self.segments[k]
        key = (tuple((g, int(sizes[g])) for g in seg.groups if g in sizes), bool(folded))
        val = {g: valid[g] for g in seg.groups if g in valid and g in sizes}
        return self._run_fns[k](key, gathered, val, tuple(live))


def _scale_axis(value: np.ndarray, axis: int, vec: np.ndarray) -> np.ndarray:
    """`value` multiplied by `vec` along `axis` (a consumer axis zeroed at dropped channels)."""
    shape = [1] * value.ndim
    shape[axis] = -1
    return value * vec.reshape(shape)


def _var_groups(info: Any) -> set[int]:
    out: set[int] = set()
    for lay in info.lab:
        if lay is not None:
            out |= graph_lib._groups(lay)
    return out


def _top_level_infos(graph: Graph, plan: Any) -> dict:
    """Every top-level variable's abstract value (`_Info`, leaves and input included): one dry
    evaluation walk."""
    ctx = graph_lib._Ctx(graph.leaf_paths, plan.leaf_labels, plan.excluded, plan.batch,
                         evaluate=True)
    ctx.root_of = dict(plan.root_of)
    jaxpr = plan.closed.jaxpr
    leaf_infos = [graph_lib._leaf_info(i, tuple(s.shape), plan.leaf_labels.get(i))
                  for i, s in enumerate(jax.tree_util.tree_leaves(graph.leaf_shapes))]
    x_aval = plan.closed.in_avals[-1]
    x_info = graph_lib._Info(tuple(x_aval.shape), (None,) * len(x_aval.shape), False,
                             (graph_lib.OPAQUE,) * len(x_aval.shape))
    env: dict[Any, tuple] = {v: (graph_lib._const_info(tuple(np.shape(c))), None)
                             for v, c in zip(jaxpr.constvars, plan.closed.consts)}
    env.update({v: (info, None) for v, info in zip(jaxpr.invars, leaf_infos + [x_info])})
    graph_lib._walk_eqns(jaxpr.eqns, env, ctx, values=False)
    return {v: info for v, (info, _) in env.items()}


def _cut_points(graph: Graph, plan: Any) -> list[int]:
    """Indices of the top-level equations that start a segment: each site's conv."""
    jaxpr = plan.closed.jaxpr
    num_leaves = len(jaxpr.invars) - 1
    leaf_of = {v: i for i, v in enumerate(jaxpr.invars[:num_leaves])}
    # a kernel may reach its conv through a dtype cast (a flax dtype / param_dtype)
    for eqn in jaxpr.eqns:
        if eqn.primitive.name in graph_lib._CAST and eqn.invars and \
                not isinstance(eqn.invars[0], jcore.Literal) and eqn.invars[0] in leaf_of:
            leaf_of[eqn.outvars[0]] = leaf_of[eqn.invars[0]]
    kernels = set(plan.site_order)
    cuts = [0]
    for i, eqn in enumerate(jaxpr.eqns):
        if eqn.primitive.name != "conv_general_dilated" or i == 0:
            continue
        rhs = eqn.invars[1]
        if not isinstance(rhs, jcore.Literal) and leaf_of.get(rhs) in kernels:
            cuts.append(i)
    return cuts


def segment(graph: Graph, x_shape: tuple[int, ...], x_dtype: Any, *,
            matmul_max_hw: int = 0) -> Segmented:
    """The segments of `graph` for inputs of `x_shape` (cached on the graph).

    Raises:
      GraphError: the plan's output is not a top-level variable.
    """
    key = ("segments", tuple(x_shape), jnp.dtype(x_dtype).name, int(matmul_max_hw))
    if key in graph._modules:
        return graph._modules[key]
    plan = graph.plan(tuple(x_shape), x_dtype)
    jaxpr = plan.closed.jaxpr
    infos = _top_level_infos(graph, plan)
    num_leaves = len(jaxpr.invars) - 1
    leaf_index = {v: i for i, v in enumerate(jaxpr.invars[:num_leaves])}
    x_var = jaxpr.invars[-1]
    consts = set(jaxpr.constvars)
    (out_var,) = jaxpr.outvars
    if isinstance(out_var, jcore.Literal):
        raise GraphError("the model's output is a constant")
    cuts = _cut_points(graph, plan) + [len(jaxpr.eqns)]
    bounds = [(a, b) for a, b in zip(cuts[:-1], cuts[1:]) if b > a]
    # where each variable is read last (segment index); the output is read "after" the end
    last_read: dict[Any, int] = {out_var: len(bounds)}
    for k, (a, b) in enumerate(bounds):
        for eqn in jaxpr.eqns[a:b]:
            for v in eqn.invars:
                if not isinstance(v, jcore.Literal):
                    last_read[v] = max(last_read.get(v, -1), k)
    segments = []
    for k, (a, b) in enumerate(bounds):
        eqns = tuple(jaxpr.eqns[a:b])
        defined = {v for e in eqns for v in e.outvars}
        reads = []
        for e in eqns:
            for v in e.invars:
                if not isinstance(v, jcore.Literal) and v not in defined and v not in consts \
                        and v not in reads:
                    reads.append(v)
        leaves = tuple(sorted({leaf_index[v] for v in reads if v in leaf_index}))
        live_in = tuple(v for v in reads if v not in leaf_index)
        live_out = tuple(v for e in eqns for v in e.outvars if last_read.get(v, -1) > k)
        groups: set[int] = set()
        for v in (*reads, *defined):
            groups |= _var_groups(infos[v])
        segments.append(Segment(eqns, live_in, live_out, leaves, tuple(sorted(groups))))
    if segments and any(v is not x_var for v in segments[0].live_in):
        raise GraphError("internal: the first segment reads values defined nowhere")
    defined_in = {x_var: -1}
    for k, seg in enumerate(segments):
        for e in seg.eqns:
            for v in e.outvars:
                defined_in[v] = k
    live_after = tuple(tuple(v for v, k in defined_in.items() if k <= d and last_read.get(v, -1) > d)
                       for d in range(len(segments)))
    out = Segmented(graph, plan, tuple(segments), infos, out_var, int(matmul_max_hw),
                    live_after)
    for leaf, ax, lay, _ in plan.consumers:
        if (ax, lay) not in out._consumer_axes.get(leaf, ()):
            out._consumer_axes[leaf] = out._consumer_axes.get(leaf, ()) + ((ax, lay),)
    for k in range(len(segments)):
        out._run_fns.append(jax.jit(_run_fn(out, k), static_argnums=0))
    graph._modules[key] = out
    return out


def _take(labels: list, values: tuple, idx: dict) -> tuple:
    return tuple(graph_lib.take_channels(v, lab, idx, jnp) for lab, v in zip(labels, values))


def _run_fn(seg_set: Segmented, k: int):
    seg = seg_set.segments[k]
    graph, plan = seg_set.graph, seg_set.plan
    jaxpr = plan.closed.jaxpr
    leaf_var = jaxpr.invars[:len(jaxpr.invars) - 1]
    consts = {v: (seg_set.infos[v], c) for v, c in zip(jaxpr.constvars, plan.closed.consts)}

    def run(key, gathered, valid, live):
        group_sizes, folded = key
        ctx = graph_lib._Ctx(graph.leaf_paths, plan.leaf_labels, plan.excluded, plan.batch,
                             evaluate=True, sizes=dict(group_sizes), vectors=dict(valid),
                             matmul_max_hw=seg_set.matmul_max_hw, folded=folded)
        ctx.root_of = dict(plan.root_of)
        env = dict(consts)
        env.update({leaf_var[i]: (seg_set.infos[leaf_var[i]], value)
                    for i, value in zip(seg.leaves, gathered)})
        env.update({v: (seg_set.infos[v], value) for v, value in zip(seg.live_in, live)})
        with seg_set._lock:  # the interpreter's context is per call; plans are shared
            graph_lib._walk_eqns(seg.eqns, env, ctx, values=True)
        return tuple(env[v][1] for v in seg.live_out)

    return run
