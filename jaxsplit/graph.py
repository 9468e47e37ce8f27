"""The kernel graph of any Flax linen CNN, traced from its jaxpr.

`trace(apply_fn, variables, example_x)` finds the model's *kernel sites*
(the conv layers whose output kernels a module may drop, docs/method.md §7)
and everything indexed by their output channels, for any inference
`apply_fn(variables, x) -> logits (N, C)`: BatchNorm, strided convs, 1x1
projection shortcuts, residual adds, global average pooling, channel
concats, flatten -> Dense heads.

Why the jaxpr and not only flax method interception: `nn.intercept_methods`
sees `Conv.__call__` and `Dense.__call__`, but the adds of a residual
shortcut, the `jnp.concatenate` of an Inception block, a `reshape` flatten
or a `jnp.mean` global pooling are plain jax ops that no module method sees.
Those ops decide which channels must be removed together (ties) and which
Dense rows follow a kept channel. The jaxpr (`jax.make_jaxpr`) has every op,
so the analysis is exact, and it is also what extraction re-evaluates.

The analysis is an abstract interpretation of the jaxpr (recursing into
`jit`, `custom_jvp_call`, `custom_vjp_call`, `closed_call` and `remat`
sub-jaxprs). Every value gets a *channel label* per axis, a layout:

* `("chan", g, n)`: the n output channels of site group g;
* `("fixed", n)`: n channels that no mask touches (e.g. image channels);
* `("cat", parts)`: a concatenation along the axis (channel concats);
* `("prod", factors)`: a row-major merge of axes (a flatten: NHWC gives
  `prod(fixed(H), fixed(W), chan)`, NCHW gives `prod(chan, fixed(H*W))`).

Rules: a conv whose kernel is a variables leaf labels its output feature
axis with its own site; elementwise ops carry labels and *tie* the groups
of labelled operands that meet (union-find; a residual add ties both sides);
a values-only operand meeting a labelled axis (conv bias, BatchNorm
scale/bias/mean/var, any per-channel affine) makes the variables leaves it
derives from *carriers* of that axis; a conv input or a `dot_general` with a
variables-derived operand is a *consumer* (its kernel's input axis / Dense
rows follow the layout). Convs whose channels reach the model output without
a consumer are *terminal* and are not sites.

Refused with a `GraphError` that names the primitive, the module (flax name
stack) and the variables involved: reductions, windows, pads, slices,
squeezes, reversals, sorts, gathers, scans over a labelled axis (LayerNorm /
GroupNorm over channels, channel slicing), reshapes that split a channel
axis, `dot_general`/conv between two activations with labelled operands,
elementwise ops that combine labelled channels with differently laid out or
unlabelled activation channels (partial-channel adds), grouped convs
(`feature_group_count > 1`) other than depthwise with multiplier 1, and any
primitive not known to be channel-wise when it touches a labelled value.

Depthwise convs with channel multiplier 1 (`feature_group_count == C_in ==
C_out`) are supported as carriers: their kernel's output axis follows the
input channels, and extraction sets `feature_group_count` to the kept count.
Convs whose kernel is computed (not a variables leaf up to a dtype cast) are
not sites (their output channels are left whole).

Traces are per input shape; `Graph` caches one analysis per (input shape,
dtype) so the functions built on it work for any batch size.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.extend import core as jcore

from jaxsplit.errors import JaxsplitError

__all__ = ["Consumer", "Graph", "GraphError", "Site", "trace"]


class GraphError(JaxsplitError, ValueError):
    """A model whose kernels cannot be removed exactly (names the op and the variables)."""


# -- layouts -----------------------------------------------------------------

CLASS_GID = -1  # pseudo group of the classifier's output columns (target_class slicing)

Layout = tuple  # ("chan", g, n) | ("fixed", n) | ("cat", parts) | ("prod", factors)


def _fixed(n: int) -> Layout:
    return ("fixed", int(n))


def _full_size(lay: Layout) -> int:
    kind = lay[0]
    if kind == "chan":
        return lay[2]
    if kind == "fixed":
        return lay[1]
    if kind == "cat":
        return sum(_full_size(p) for p in lay[1])
    return math.prod(_full_size(f) for f in lay[1])


def _size(lay: Layout, sizes: Mapping[int, int]) -> int:
    kind = lay[0]
    if kind == "chan":
        return int(sizes.get(lay[1], lay[2]))
    if kind == "fixed":
        return lay[1]
    if kind == "cat":
        return sum(_size(p, sizes) for p in lay[1])
    return math.prod(_size(f, sizes) for f in lay[1])


def _has_chan(lay: Layout) -> bool:
    if lay[0] == "chan":
        return True
    if lay[0] == "fixed":
        return False
    return any(_has_chan(p) for p in lay[1])


def _groups(lay: Layout) -> set[int]:
    if lay[0] == "chan":
        return {lay[1]}
    if lay[0] == "fixed":
        return set()
    out: set[int] = set()
    for p in lay[1]:
        out |= _groups(p)
    return out


def _normalize(lay: Layout) -> Layout | None:
    """Canonical form; None when no channel of any site is inside."""
    if lay[0] in ("chan", "fixed"):
        return lay if lay[0] == "chan" else None
    kind = lay[0]
    parts = []
    for p in lay[1]:
        q = _normalize(p)
        q = _fixed(_full_size(p)) if q is None else q
        if kind == "prod" and q[0] == "prod":
            parts.extend(q[1])
        elif kind == "cat" and q[0] == "cat":
            parts.extend(q[1])
        else:
            parts.append(q)
    if kind == "prod":
        parts = [p for p in parts if not (p[0] == "fixed" and p[1] == 1)]
    merged: list[Layout] = []
    for p in parts:  # merge neighbouring fixed parts
        if merged and p[0] == "fixed" and merged[-1][0] == "fixed":
            a = merged.pop()[1]
            merged.append(_fixed(a * p[1] if kind == "prod" else a + p[1]))
        else:
            merged.append(p)
    if not any(_has_chan(p) for p in merged):
        return None
    if len(merged) == 1:
        return merged[0]
    return (kind, tuple(merged))


def _map_groups(lay: Layout, fn: Callable[[int], int]) -> Layout:
    if lay[0] == "chan":
        return ("chan", fn(lay[1]), lay[2])
    if lay[0] == "fixed":
        return lay
    return (lay[0], tuple(_map_groups(p, fn) for p in lay[1]))


def _indices(lay: Layout, idx: Mapping[int, Any], xp: Any = jnp) -> Any:
    """Positions in the full layout of the kept (or gathered) entries, int32.

    `xp` is `jnp` (traced indices) or `np` (host indices, nothing compiled).
    """
    kind = lay[0]
    if kind == "chan":
        g = lay[1]
        return xp.asarray(idx[g], xp.int32) if g in idx else xp.arange(lay[2], dtype=xp.int32)
    if kind == "fixed":
        return xp.arange(lay[1], dtype=xp.int32)
    if kind == "cat":
        out, off = [], 0
        for p in lay[1]:
            out.append(_indices(p, idx, xp) + off)
            off += _full_size(p)
        return xp.concatenate(out)
    flat = xp.zeros((1,), xp.int32)
    for f in lay[1]:
        flat = (flat[:, None] * _full_size(f) + _indices(f, idx, xp)[None, :]).reshape(-1)
    return flat


def take_channels(value: Any, lab: Sequence[Layout | None], idx: Mapping[int, Any],
                  xp: Any = jnp) -> Any:
    """`value` (a variables leaf or an activation whose axes are laid out as `lab`) with every
    channel-labelled axis cut to the channels `idx` (`{group: int[B_g]}`; groups not in `idx`
    stay whole). The one gathering rule of extraction (`jaxsplit.extract`) and of the fast
    evaluator's segments (`jaxsplit.segments`); `xp` is `jnp` or `np`."""
    axes = [ax for ax, lay in enumerate(lab) if lay is not None and _groups(lay) & set(idx)]
    if xp is np and len(axes) == 2 and axes[1] == axes[0] + 1:
        # a conv kernel's (in, out) or a Dense kernel: one fancy-indexing pass instead of two
        # takes (measured: 0.28 against 0.44 ms for a 3x3x512x512 kernel cut to 160 x 160)
        rows, cols = (_indices(lab[a], idx, np) for a in axes)
        return value[(slice(None),) * axes[0] + (rows[:, None], cols[None, :])]
    for ax in axes:
        value = xp.take(value, _indices(lab[ax], idx, xp), axis=ax)
    return value


def _vector(lay: Layout, vec: Mapping[int, jax.Array], sizes: Mapping[int, int],
            dtype: Any, xp: Any = jnp) -> jax.Array | None:
    """The per-entry multiplier of a layout (mask / valid), or None when all ones.

    `xp`: `jnp` (traced) or `np` (host arrays, nothing compiled)."""
    kind = lay[0]
    if kind == "chan":
        v = vec.get(lay[1])
        return None if v is None else xp.asarray(v).astype(dtype)
    if kind == "fixed":
        return None
    parts = [_vector(p, vec, sizes, dtype, xp) for p in lay[1]]
    if all(p is None for p in parts):
        return None
    parts = [xp.ones((_size(p, sizes),), dtype) if v is None else v for p, v in zip(lay[1], parts)]
    if kind == "cat":
        return xp.concatenate(parts)
    out = xp.ones((1,), dtype)
    for p in parts:
        out = (out[:, None] * p[None, :]).reshape(-1)
    return out


def _describe(lay: Layout | None, names: Mapping[int, str]) -> str:
    if lay is None:
        return "-"
    kind = lay[0]
    if kind == "chan":
        return f"{names.get(lay[1], lay[1])}[{lay[2]}]"
    if kind == "fixed":
        return str(lay[1])
    inner = [_describe(p, names) for p in lay[1]]
    return ("cat(" + ", ".join(inner) + ")") if kind == "cat" else "x".join(inner)


def _offset(lay: Layout, g: int) -> int:
    """Position of group g's first entry in the layout's first channel block."""
    kind = lay[0]
    if kind == "chan":
        return 0 if lay[1] == g else -1
    if kind == "fixed":
        return -1
    if kind == "cat":
        off = 0
        for p in lay[1]:
            o = _offset(p, g)
            if o >= 0:
                return off + o
            off += _full_size(p)
        return -1
    for f in lay[1]:
        o = _offset(f, g)
        if o >= 0:
            return o
    return -1


# -- union-find ----------------------------------------------------------------

class _UnionFind:
    def __init__(self) -> None:
        self.parent: dict[int, int] = {}

    def find(self, a: int) -> int:
        self.parent.setdefault(a, a)
        while self.parent[a] != a:
            self.parent[a] = self.parent[self.parent[a]]
            a = self.parent[a]
        return a

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


# -- value info ----------------------------------------------------------------

OPAQUE = "opaque"  # provenance of an axis that is not one leaf axis (merged, computed)


@dataclasses.dataclass(frozen=True)
class _Info:
    """Abstract value: full shape, per-axis layouts, and provenance if variables-only."""

    shape: tuple[int, ...]
    lab: tuple[Layout | None, ...]
    pdep: bool  # derived only from variables leaves and constants
    prov: tuple[Any, ...]  # per axis: frozenset[(leaf, axis)] (empty = uniform) or OPAQUE
    leaf: int | None = None  # the leaf this value is, up to a dtype cast

    @property
    def labelled(self) -> bool:
        return any(lay is not None for lay in self.lab)


def _const_info(shape: tuple[int, ...]) -> _Info:
    return _Info(tuple(shape), (None,) * len(shape), True,
                 tuple(frozenset() if s == 1 else OPAQUE for s in shape))


# -- primitives ------------------------------------------------------------------

_ELEMENTWISE = frozenset("""
neg sign floor ceil round is_finite exp exp2 log log1p expm1 tanh logistic sin cos tan asin acos
atan sinh cosh asinh acosh atanh sqrt rsqrt cbrt abs not square integer_pow erf erfc erf_inv
lgamma digamma convert_element_type reduce_precision copy copy_p real imag conj population_count
clz sharding_constraint mesh_cast pvary add sub mul div rem pow max min atan2 nextafter and or
xor eq ne lt le gt ge select_n clamp shift_left shift_right_arithmetic shift_right_logical add_any
mulhi igamma igammac random_gamma_grad bessel_i0e bessel_i1e polygamma zeta regularized_incomplete_beta
complex stop_gradient
""".split())
_CAST = frozenset({"convert_element_type", "copy", "copy_p", "reduce_precision",
                   "sharding_constraint", "mesh_cast", "pvary"})
_REDUCE = frozenset({"reduce_sum", "reduce_max", "reduce_min", "reduce_prod", "reduce_and",
                     "reduce_or", "reduce_xor", "argmax", "argmin"})
_WINDOW = frozenset({"reduce_window_max", "reduce_window_min", "reduce_window_sum", "reduce_window"})
_CUMULATIVE = frozenset({"cumsum", "cumprod", "cummax", "cummin", "cumlogsumexp"})
# always interpreted: they keep the leaf provenance that carriers are found by
_STRUCTURAL = frozenset({"broadcast_in_dim", "reshape", "transpose", "concatenate"})
_SUBJAXPR = frozenset({"jit", "pjit", "closed_call", "core_call", "custom_jvp_call",
                       "custom_vjp_call", "remat2", "checkpoint", "remat"})


def _sub_jaxpr(eqn) -> tuple[Any, Sequence[Any]]:
    for key in ("jaxpr", "call_jaxpr"):
        if key in eqn.params:
            j = eqn.params[key]
            if isinstance(j, jcore.ClosedJaxpr):
                return j.jaxpr, j.consts
            return j, ()
    raise GraphError(f"primitive `{eqn.primitive.name}` has no sub-jaxpr parameter")


# -- the analysis / evaluation context -----------------------------------------------

class _Ctx:
    """State of one walk over the jaxpr.

    In analysis mode (`values is None` everywhere) it records sites, ties,
    carriers, consumers and MAC terms. In evaluation mode it binds each
    primitive with channel-labelled shapes resized to `sizes` and multiplies
    consumer inputs by `vectors` (masks or valid flags).
    """

    def __init__(self, leaf_paths: Sequence[tuple[str, ...]], leaf_labels: Mapping[int, tuple],
                 excluded: frozenset[int], batch: int, *, evaluate: bool = False,
                 sizes: Mapping[int, int] | None = None,
                 vectors: Mapping[int, jax.Array] | None = None,
                 dense_sites: bool = False, matmul_max_hw: int = 0,
                 folded: bool = False) -> None:
        self.leaf_paths = leaf_paths
        self.leaf_labels = leaf_labels
        self.excluded = excluded
        self.batch = batch
        self.evaluate = evaluate
        self.sizes = dict(sizes or {})
        self.vectors = dict(vectors or {})
        self.dense_sites = dense_sites
        self.matmul_max_hw = matmul_max_hw
        # evaluation: the vectors are already multiplied into the consumer leaves (a segment's
        # host gather), so a consumer whose kernel is a plain leaf does not mask its input
        self.folded = folded
        self.uf = _UnionFind()
        self.found: dict[tuple[int, int], Layout] = {}  # (leaf, axis) -> layout
        self.sites: dict[int, dict] = {}  # kernel leaf -> info, forward order
        self.consumers: list[tuple[int, int, Layout, str]] = []
        self.macs: list[tuple[tuple, tuple[int, ...], tuple]] = []
        self.dense_counter = 0
        self.root_of: dict[int, int] = {}  # evaluation: kernel leaf -> group root

    # -- naming for errors
    def leaf_name(self, leaf: int) -> str:
        return "/".join(self.leaf_paths[leaf])

    def where(self, eqn, infos: Sequence[_Info]) -> str:
        stack = str(eqn.source_info.name_stack) or "<top level>"
        leaves = sorted({self.leaf_name(l) for i in infos if i.pdep and i.prov
                         for p in i.prov if p != OPAQUE for l, _ in p})
        sites = sorted({_site_name(self.leaf_paths[g]) if g >= 0 else "a Dense output"
                        for i in infos for lay in i.lab if lay is not None for g in _groups(lay)})
        txt = f" in module `{stack}`"
        if sites:
            txt += f" on the channels of site(s) {', '.join(sites)}"
        if leaves:
            txt += f" (variables {', '.join(leaves)})"
        return txt

    def fail(self, eqn, infos: Sequence[_Info], what: str) -> GraphError:
        return GraphError(f"primitive `{eqn.primitive.name}` {what}{self.where(eqn, infos)}; "
                          "its kernels cannot be removed exactly, so the model is not supported")

    # -- layouts
    def unify(self, a: Layout, b: Layout, eqn, infos) -> Layout:
        if a[0] != b[0] or (a[0] in ("cat", "prod") and len(a[1]) != len(b[1])):
            raise self.fail(eqn, infos, f"combines differently laid out channels "
                                        f"({_describe(a, {})} vs {_describe(b, {})})")
        if a[0] == "chan":
            if a[2] != b[2]:
                raise self.fail(eqn, infos, "combines channel groups of different sizes")
            if (a[1] == CLASS_GID) != (b[1] == CLASS_GID):
                raise self.fail(eqn, infos, "combines classifier columns with conv channels")
            if not self.evaluate:
                self.uf.union(a[1], b[1])
            elif a[1] != b[1]:
                raise GraphError(f"internal: groups {a[1]} and {b[1]} meet at "
                                 f"`{eqn.primitive.name}` but were not tied by the analysis")
            return a
        if a[0] == "fixed":
            if a[1] != b[1]:
                raise self.fail(eqn, infos, "combines channel blocks of different sizes")
            return a
        return (a[0], tuple(self.unify(p, q, eqn, infos) for p, q in zip(a[1], b[1])))

    def mark_leaves(self, info: _Info, axis: int, lay: Layout, eqn, infos, role: str) -> None:
        """Record that the leaves behind `info`'s axis are indexed by `lay`."""
        if self.evaluate:
            return
        prov = info.prov[axis]
        if info.lab[axis] is not None:
            self.unify(info.lab[axis], lay, eqn, infos)
        if prov == OPAQUE:
            if info.lab[axis] is None:
                raise self.fail(eqn, infos, f"meets channel-labelled values with a {role} that "
                                            "is computed (not one axis of a variables leaf)")
            return
        for leaf, ax in prov:
            key = (leaf, ax)
            if key in self.found:
                self.unify(self.found[key], lay, eqn, infos)
            else:
                self.found[key] = lay

    def new_size(self, info: _Info, lab: Sequence[Layout | None]) -> tuple[int, ...]:
        return tuple(s if lay is None else _size(lay, self.sizes) for s, lay in zip(info.shape, lab))


def _leaf_info(leaf: int, shape: tuple[int, ...], labels: tuple | None) -> _Info:
    lab = labels if labels is not None else (None,) * len(shape)
    return _Info(tuple(shape), tuple(lab), True,
                 tuple(frozenset({(leaf, a)}) if s > 1 else frozenset() for a, s in enumerate(shape)),
                 leaf)


def _walk(jaxpr, consts: Sequence[Any], infos: Sequence[_Info], vals: Sequence[Any] | None,
          ctx: _Ctx) -> tuple[list[_Info], list[Any] | None]:
    env: dict[Any, tuple[_Info, Any]] = {}
    for v, c in zip(jaxpr.constvars, consts):
        env[v] = (_const_info(tuple(np.shape(c))), c)
    for i, v in enumerate(jaxpr.invars):
        env[v] = (infos[i], None if vals is None else vals[i])
    _walk_eqns(jaxpr.eqns, env, ctx, values=vals is not None)
    outs = [_read(env, a) for a in jaxpr.outvars]
    return [i for i, _ in outs], (None if vals is None else [v for _, v in outs])


def _read(env: Mapping[Any, tuple[_Info, Any]], a) -> tuple[_Info, Any]:
    if isinstance(a, jcore.Literal):
        return _const_info(tuple(np.shape(a.val))), a.val
    return env[a]


def _walk_eqns(eqns: Sequence[Any], env: dict[Any, tuple[_Info, Any]], ctx: _Ctx, *,
               values: bool) -> None:
    """Interpret `eqns` in order: `env` (variable -> (info, value or None)) gains their
    outputs. `values=False`: abstract values only (analysis, or infos of an evaluation)."""
    for eqn in eqns:
        ins = [_read(env, a) for a in eqn.invars]
        in_infos = [i for i, _ in ins]
        in_vals = [v for _, v in ins] if values else None
        if eqn.primitive.name in _SUBJAXPR:
            sub, sub_consts = _sub_jaxpr(eqn)
            out_infos, out_vals = _walk(sub, sub_consts, in_infos, in_vals, ctx)
        else:
            out_infos, out_vals = _rule(eqn, in_infos, in_vals, ctx)
        for k, v in enumerate(eqn.outvars):
            env[v] = (out_infos[k], None if out_vals is None else out_vals[k])


def _avals(eqn) -> list[tuple[int, ...]]:
    return [tuple(v.aval.shape) for v in eqn.outvars]


def _bind(eqn, vals, ctx: _Ctx, out_infos: Sequence[_Info], **override) -> list[Any]:
    params = dict(eqn.params, **override)
    try:
        out = eqn.primitive.bind(*vals, **params)
    except Exception as exc:  # a shape rewrite this module does not know
        raise GraphError(f"re-evaluating primitive `{eqn.primitive.name}` with kept channel "
                         f"counts failed ({type(exc).__name__}: {exc})") from exc
    out = list(out) if eqn.primitive.multiple_results else [out]
    for o, info in zip(out, out_infos):
        want = ctx.new_size(info, info.lab)
        if tuple(np.shape(o)) != want:
            raise GraphError(f"re-evaluating primitive `{eqn.primitive.name}` gave shape "
                             f"{tuple(np.shape(o))}, expected {want}")
    return out


def _untouched(eqn, infos: Sequence[_Info], vals, ctx: _Ctx) -> tuple[list[_Info], list | None]:
    """Any primitive without labelled operands: outputs are unlabelled."""
    pdep = all(i.pdep for i in infos)
    outs = [_Info(s, (None,) * len(s), pdep,
                  tuple(frozenset() if d == 1 else OPAQUE for d in s)) for s in _avals(eqn)]
    if vals is None:
        return outs, None
    return outs, _bind(eqn, vals, ctx, outs)


def _rule(eqn, infos: list[_Info], vals, ctx: _Ctx) -> tuple[list[_Info], list | None]:
    name = eqn.primitive.name
    if name in _ELEMENTWISE:
        return _elementwise(eqn, infos, vals, ctx)
    if name == "conv_general_dilated":
        return _conv(eqn, infos, vals, ctx)
    if name == "dot_general":
        return _dot(eqn, infos, vals, ctx)
    if not any(i.labelled for i in infos) and name not in _STRUCTURAL:
        return _untouched(eqn, infos, vals, ctx)
    x = infos[0]
    (out_shape,) = _avals(eqn) if not eqn.primitive.multiple_results else (None,)
    if name == "transpose":
        perm = eqn.params["permutation"]
        out = _Info(out_shape, tuple(x.lab[p] for p in perm), x.pdep, tuple(x.prov[p] for p in perm))
        return [out], None if vals is None else _bind(eqn, vals, ctx, [out])
    if name == "broadcast_in_dim":
        return _broadcast(eqn, infos, vals, ctx, out_shape)
    if name == "reshape":
        return _reshape(eqn, infos, vals, ctx, out_shape)
    if name == "concatenate":
        return _concat(eqn, infos, vals, ctx, out_shape)
    if name in _REDUCE:
        axes = tuple(eqn.params["axes"])
        bad = [a for a in axes if x.lab[a] is not None]
        if bad:
            raise ctx.fail(eqn, infos, f"reduces over the channel axis {bad[0]}")
        keep = [a for a in range(len(x.shape)) if a not in axes]
        out = _Info(out_shape, tuple(x.lab[a] for a in keep), x.pdep, tuple(x.prov[a] for a in keep))
        return [out], None if vals is None else _bind(eqn, vals, ctx, [out])
    if name in _WINDOW:
        p = eqn.params
        n_ops = len(infos) // 2 if name == "reduce_window" else 1
        for a, lay in enumerate(x.lab):
            if lay is None:
                continue
            if (p["window_dimensions"][a] != 1 or p["window_strides"][a] != 1
                    or tuple(p["padding"][a]) != (0, 0) or p["base_dilation"][a] != 1
                    or p["window_dilation"][a] != 1):
                raise ctx.fail(eqn, infos, f"has a window over the channel axis {a}")
        for i in infos[1:n_ops]:
            if i.lab != x.lab:
                raise ctx.fail(eqn, infos, "reduces operands with different channel layouts")
        outs = [_Info(s, x.lab, x.pdep, tuple(OPAQUE for _ in s)) for s in _avals(eqn)]
        return outs, None if vals is None else _bind(eqn, vals, ctx, outs)
    if name in _CUMULATIVE:
        if x.lab[eqn.params["axis"]] is not None:
            raise ctx.fail(eqn, infos, f"accumulates along the channel axis {eqn.params['axis']}")
        out = _Info(out_shape, x.lab, x.pdep, tuple(OPAQUE for _ in out_shape))
        return [out], None if vals is None else _bind(eqn, vals, ctx, [out])
    if name == "pad":
        cfg = eqn.params["padding_config"]
        for a, lay in enumerate(x.lab):
            if lay is not None and tuple(cfg[a]) != (0, 0, 0):
                raise ctx.fail(eqn, infos, f"pads the channel axis {a}")
        out = _Info(out_shape, x.lab, x.pdep, tuple(OPAQUE for _ in out_shape))
        return [out], None if vals is None else _bind(eqn, vals, ctx, [out])
    if name == "slice":
        p = eqn.params
        strides = p["strides"] or (1,) * len(x.shape)
        limits = list(p["limit_indices"])
        for a, lay in enumerate(x.lab):
            if lay is None:
                continue
            if p["start_indices"][a] != 0 or limits[a] != x.shape[a] or strides[a] != 1:
                raise ctx.fail(eqn, infos, f"slices the channel axis {a}")
            limits[a] = _size(lay, ctx.sizes)
        out = _Info(out_shape, x.lab, x.pdep, tuple(OPAQUE for _ in out_shape))
        return [out], None if vals is None else _bind(eqn, vals, ctx, [out],
                                                       limit_indices=tuple(limits))
    if name in ("squeeze", "rev", "split"):
        dims = eqn.params.get("dimensions") or (eqn.params.get("axis"),)
        dims = tuple(d % len(x.shape) for d in dims)
        bad = [d for d in dims if x.lab[d] is not None]
        if bad:
            raise ctx.fail(eqn, infos, f"acts on the channel axis {bad[0]}")
        keep = [a for a in range(len(x.shape)) if name != "squeeze" or a not in dims]
        outs = [_Info(s, tuple(x.lab[a] for a in keep), x.pdep, tuple(OPAQUE for _ in s))
                for s in _avals(eqn)]
        return outs, None if vals is None else _bind(eqn, vals, ctx, outs)
    labelled = [i for i in infos if i.labelled]
    if labelled:
        raise ctx.fail(eqn, infos, "is not known to act channel-wise, and it reads channel-"
                                   "labelled values")
    return _untouched(eqn, infos, vals, ctx)


def _elementwise(eqn, infos: list[_Info], vals, ctx: _Ctx):
    (out_shape,) = _avals(eqn)
    r = len(out_shape)
    lab: list[Layout | None] = []
    for a in range(r):
        full = [i for i in infos if len(i.shape) == r and i.shape[a] == out_shape[a]]
        lays = [i.lab[a] for i in full if i.lab[a] is not None]
        if not lays:
            lab.append(None)
            continue
        lay = lays[0]
        for other in lays[1:]:
            lay = ctx.unify(lay, other, eqn, infos)
        if out_shape[a] > 1:
            for i in full:
                if i.pdep:
                    if i.prov[a] != frozenset():
                        ctx.mark_leaves(i, a, lay, eqn, infos, "per-channel operand")
                elif i.lab[a] is None:
                    raise ctx.fail(eqn, infos, f"combines channel-labelled values with "
                                               f"unlabelled activation channels on axis {a} "
                                               "(a partial-channel op)")
        for i in infos:
            if len(i.shape) == r and i.shape[a] != out_shape[a] and i.lab[a] is not None:
                raise ctx.fail(eqn, infos, f"broadcasts a one-channel axis {a}")
        lab.append(lay)
    pdep = all(i.pdep for i in infos)
    prov = []
    for a in range(r):
        acc: Any = frozenset()
        for i in infos:
            if len(i.shape) == r and i.shape[a] == out_shape[a] and out_shape[a] > 1:
                if i.prov[a] == OPAQUE or acc == OPAQUE:
                    acc = OPAQUE
                else:
                    acc = acc | i.prov[a]
            elif len(i.shape) != r and len(i.shape) != 0:
                acc = OPAQUE
        prov.append(acc)
    leaf = infos[0].leaf if eqn.primitive.name in _CAST else None
    out = _Info(out_shape, tuple(lab), pdep, tuple(prov), leaf)
    if vals is None:
        return [out], None
    vals = list(vals)
    for k, i in enumerate(infos):  # uniform values-only operands: cut to the kept size
        if len(i.shape) != r:
            continue
        for a in range(r):
            if lab[a] is not None and i.lab[a] is None and i.shape[a] == out_shape[a] > 1:
                vals[k] = lax.slice_in_dim(vals[k], 0, _size(lab[a], ctx.sizes), axis=a)
    return [out], _bind(eqn, vals, ctx, [out])


def _broadcast(eqn, infos, vals, ctx: _Ctx, out_shape):
    x = infos[0]
    dims = eqn.params["broadcast_dimensions"]
    lab: list[Layout | None] = [None] * len(out_shape)
    prov: list[Any] = [frozenset()] * len(out_shape)
    for i, d in enumerate(dims):
        if x.shape[i] == out_shape[d]:
            lab[d], prov[d] = x.lab[i], x.prov[i]
        elif x.lab[i] is not None:
            raise ctx.fail(eqn, infos, f"broadcasts the one-channel axis {i}")
    out = _Info(out_shape, tuple(lab), x.pdep, tuple(prov))
    if vals is None:
        return [out], None
    shape = ctx.new_size(out, lab)
    return [out], _bind(eqn, vals, ctx, [out], shape=shape)


def _reshape(eqn, infos, vals, ctx: _Ctx, out_shape):
    x = infos[0]
    if eqn.params.get("dimensions") is not None:
        if x.labelled:
            raise ctx.fail(eqn, infos, "reshapes with a transposition")
        return _untouched(eqn, infos, vals, ctx)
    ins, outs = x.shape, out_shape
    pin = [math.prod(ins[:a]) for a in range(len(ins))]
    pout = [math.prod(outs[:b]) for b in range(len(outs))]
    lab: list[Layout | None] = [None] * len(outs)
    prov: list[Any] = [frozenset() if s == 1 else OPAQUE for s in outs]
    members: dict[int, list[int]] = {}  # out axis -> in axes (s > 1) that merge into it
    used1: set[int] = set()
    for a, s in enumerate(ins):
        if s == 1:
            if x.lab[a] is None:
                continue
            b = next((b for b in range(len(outs)) if pout[b] == pin[a] and outs[b] == 1
                      and b not in used1), None)
            if b is not None:
                used1.add(b)
                lab[b] = x.lab[a]
                continue
            b = next((b for b in range(len(outs)) if pout[b] <= pin[a] <= pout[b] * outs[b]
                      and outs[b] > 1), None)
            if b is None:
                raise ctx.fail(eqn, infos, "reshapes away a one-channel axis")
            members.setdefault(b, []).append(a)
            continue
        b = next((b for b in range(len(outs)) if pout[b] == pin[a] and outs[b] == s), None)
        if b is not None:
            members.setdefault(b, []).append(a)
            continue
        b = next((b for b in range(len(outs))
                  if pout[b] <= pin[a] and pin[a] * s <= pout[b] * outs[b]), None)
        if b is None:
            if x.lab[a] is not None:
                raise ctx.fail(eqn, infos, f"splits the channel axis {a} (shape {ins} -> {outs})")
            continue
        members.setdefault(b, []).append(a)
    for b, axes in members.items():
        axes = sorted(axes)
        if len(axes) == 1 and ins[axes[0]] == outs[b]:
            lab[b], prov[b] = x.lab[axes[0]], x.prov[axes[0]]
            continue
        factors = [x.lab[a] if x.lab[a] is not None else _fixed(ins[a]) for a in axes]
        lab[b] = _normalize(("prod", tuple(factors)))
        prov[b] = OPAQUE
    out = _Info(out_shape, tuple(lab), x.pdep, tuple(prov))
    if vals is None:
        return [out], None
    return [out], _bind(eqn, vals, ctx, [out], new_sizes=ctx.new_size(out, lab))


def _concat(eqn, infos, vals, ctx: _Ctx, out_shape):
    dim = eqn.params["dimension"]
    r = len(out_shape)
    lab: list[Layout | None] = []
    for a in range(r):
        if a == dim:
            parts = [i.lab[a] if i.lab[a] is not None else _fixed(i.shape[a]) for i in infos]
            lab.append(_normalize(("cat", tuple(parts))))  # unlabelled parts: fixed blocks
            continue
        lays = [i.lab[a] for i in infos if i.lab[a] is not None]
        lay = lays[0] if lays else None
        for other in lays[1:]:
            lay = ctx.unify(lay, other, eqn, infos)
        if lay is not None and any(i.lab[a] is None and out_shape[a] > 1 for i in infos):
            raise ctx.fail(eqn, infos, f"concatenates values with and without channel labels "
                                       f"on axis {a}")
        lab.append(lay)
    prov = tuple(OPAQUE if (a == dim or not all(i.pdep for i in infos)) else
                 (frozenset().union(*[i.prov[a] for i in infos])
                  if all(i.prov[a] != OPAQUE for i in infos) else OPAQUE) for a in range(r))
    out = _Info(out_shape, tuple(lab), all(i.pdep for i in infos), prov)
    return [out], None if vals is None else _bind(eqn, vals, ctx, [out])


def _masked(val, lay: Layout | None, axis: int, ctx: _Ctx):
    if lay is None or not ctx.vectors:
        return val
    vec = _vector(lay, ctx.vectors, ctx.sizes, val.dtype)
    if vec is None:
        return val
    shape = [1] * np.ndim(val)
    shape[axis] = -1
    return val * vec.reshape(shape)


def _conv(eqn, infos, vals, ctx: _Ctx):
    lhs, rhs = infos
    (out_shape,) = _avals(eqn)
    p = eqn.params
    dn = p["dimension_numbers"]
    lf, ro, ri, of = dn.lhs_spec[1], dn.rhs_spec[0], dn.rhs_spec[1], dn.out_spec[1]
    groups, bgroups = p["feature_group_count"], p["batch_group_count"]
    if not lhs.labelled and not rhs.labelled and not (rhs.pdep and rhs.leaf is not None) \
            and groups == 1:
        return _untouched(eqn, infos, vals, ctx)
    for a, lay in enumerate(lhs.lab):
        if lay is not None and a != lf:
            raise ctx.fail(eqn, infos, f"convolves over the channel-labelled axis {a}")
    if not rhs.pdep and (lhs.labelled or rhs.labelled):
        raise ctx.fail(eqn, infos, "convolves channel-labelled values with a kernel that is "
                                   "not derived from the variables")
    if bgroups != 1:
        raise ctx.fail(eqn, infos, f"has batch_group_count={bgroups}")
    lab: list[Layout | None] = [None] * len(out_shape)
    l_in = lhs.lab[lf]
    override = {}
    rhs_spatial = [rhs.shape[d] for d in dn.rhs_spec[2:]]
    if groups == 1:
        if l_in is not None:
            ctx.mark_leaves(rhs, ri, l_in, eqn, infos, "conv kernel")
            if not ctx.evaluate:
                for leaf, ax in (rhs.prov[ri] if rhs.prov[ri] != OPAQUE else ()):
                    ctx.consumers.append((leaf, ax, l_in, "conv"))
        elif rhs.lab[ri] is not None:
            raise ctx.fail(eqn, infos, "reads unlabelled channels with a labelled kernel")
        if rhs.leaf is not None and rhs.leaf not in ctx.excluded and rhs.pdep:
            k = rhs.leaf
            lay = ("chan", ctx.root_of.get(k, k), rhs.shape[ro])
            lab[of] = lay
            if not ctx.evaluate:
                ctx.mark_leaves(rhs, ro, lay, eqn, infos, "conv kernel")
                info = ctx.sites.setdefault(k, {"macs": 0, "calls": 0})
                spatial_in = tuple(lhs.shape[d] for d in dn.lhs_spec[2:])
                spatial_out = tuple(out_shape[d] for d in dn.out_spec[2:])
                info.update(in_channels=rhs.shape[ri], kernel_size=tuple(rhs_spatial),
                            input_hw=spatial_in, output_hw=spatial_out,
                            kernel_shape=rhs.shape, out_axis=ro)
                info["calls"] += 1
                info["macs"] += math.prod(out_shape) // max(ctx.batch, 1) * \
                    math.prod(rhs_spatial) * rhs.shape[ri]
        elif rhs.lab[ro] is not None:
            lab[of] = rhs.lab[ro]
    else:
        c_in = lhs.shape[lf]
        if not (groups == c_in == out_shape[of] and rhs.shape[ri] == 1):
            raise ctx.fail(eqn, infos, f"is a grouped conv (feature_group_count={groups}, "
                                       f"{c_in} -> {out_shape[of]} channels); only depthwise "
                                       "convs with channel multiplier 1 are supported")
        if l_in is not None:
            ctx.mark_leaves(rhs, ro, l_in, eqn, infos, "depthwise kernel")
            lab[of] = l_in
            override["feature_group_count"] = _size(l_in, ctx.sizes)
    out = _Info(out_shape, tuple(lab), lhs.pdep and rhs.pdep, tuple(OPAQUE for _ in out_shape))
    if not ctx.evaluate and not lhs.pdep:
        ctx.macs.append(("conv", tuple(lab), out_shape,
                         ((l_in if groups == 1 else None, rhs.shape[ri]),), math.prod(rhs_spatial)))
    if vals is None:
        return [out], None
    folded = ctx.folded and rhs.leaf is not None
    x = _masked(vals[0], l_in, lf, ctx) if groups == 1 and not folded else vals[0]
    if groups == 1 and _small_map(eqn, x, ctx.matmul_max_hw):
        y = _conv_as_matmul(eqn, x, vals[1])
        want = ctx.new_size(out, out.lab)
        if tuple(y.shape) != want:
            raise GraphError(f"internal: conv as matmul gave shape {tuple(y.shape)}, "
                             f"expected {want}")
        return [out], [y]
    return [out], _bind(eqn, [x, vals[1]], ctx, [out], **override)


def _small_map(eqn, x, max_hw: int) -> bool:
    """Whether a conv runs as one matmul: every input spatial size <= `max_hw`, no dilation."""
    p = eqn.params
    dn = p["dimension_numbers"]
    return (max_hw > 0 and all(np.shape(x)[d] <= max_hw for d in dn.lhs_spec[2:])
            and all(d == 1 for d in p["lhs_dilation"]) and all(d == 1 for d in p["rhs_dilation"]))


def _conv_as_matmul(eqn, x: jax.Array, w: jax.Array) -> jax.Array:
    """The conv of a small map as one dense matmul `(N, P_in·C_in) @ (P_in·C_in, P_out·C_out)`.

    Hand-written because XLA's CPU convolution runs 2x2 maps with hundreds of
    channels ~50-100x below matmul speed (measured: see
    `jaxsplit.search.fast_evaluate.DENSE_MAX_HW`), and no library lowers a
    conv this way. Block (p_in, p_out) of the matrix is the kernel tap that
    joins the two positions under the conv's strides and padding, or zero;
    for a 3x3 "SAME" conv on a 2x2 map every pair is joined, so no work is
    wasted. Same numbers as the convolution up to float summation order.
    """
    p = eqn.params
    dn = p["dimension_numbers"]
    nd = len(dn.lhs_spec) - 2
    xs = jnp.transpose(x, (dn.lhs_spec[0], *dn.lhs_spec[2:], dn.lhs_spec[1]))  # (N, *S, Ci)
    ws = jnp.transpose(w, (*dn.rhs_spec[2:], dn.rhs_spec[1], dn.rhs_spec[0]))  # (*K, Ci, Co)
    s_in = xs.shape[1:-1]
    ksz = ws.shape[:nd]
    (out_aval,) = [v.aval for v in eqn.outvars]
    s_out = tuple(out_aval.shape[d] for d in dn.out_spec[2:])
    pos_in = np.stack(np.unravel_index(np.arange(math.prod(s_in)), s_in), -1)  # (P_in, nd)
    pos_out = np.stack(np.unravel_index(np.arange(math.prod(s_out)), s_out), -1)
    lo = np.asarray([pad[0] for pad in p["padding"]])
    taps = pos_in[:, None, :] - pos_out[None, :, :] * np.asarray(p["window_strides"]) + lo
    ok = np.all((taps >= 0) & (taps < np.asarray(ksz)), axis=-1)  # (P_in, P_out)
    taps = np.where(ok[..., None], taps, 0)
    blocks = ws[tuple(taps[..., j] for j in range(nd))]  # (P_in, P_out, Ci, Co)
    blocks = blocks * jnp.asarray(ok, blocks.dtype)[:, :, None, None]
    ci, co = ws.shape[-2:]
    matrix = jnp.transpose(blocks, (0, 2, 1, 3)).reshape(len(pos_in) * ci, len(pos_out) * co)
    y = lax.dot(xs.reshape(xs.shape[0], -1), matrix, precision=p.get("precision"),
                preferred_element_type=p.get("preferred_element_type"))
    y = y.reshape(xs.shape[0], *s_out, co)
    order = [dn.out_spec[0], *dn.out_spec[2:], dn.out_spec[1]]
    return jnp.transpose(y, tuple(np.argsort(order)))


def _dot(eqn, infos, vals, ctx: _Ctx):
    lhs, rhs = infos
    (out_shape,) = _avals(eqn)
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    if not lhs.labelled and not rhs.labelled and not (ctx.dense_sites and lhs.pdep != rhs.pdep):
        out, v = _untouched(eqn, infos, vals, ctx)
        if not ctx.evaluate and not (lhs.pdep and rhs.pdep):
            ctx.macs.append(("dot", (None,) * len(out_shape), out_shape,
                             tuple((None, lhs.shape[a]) for a in lc), 1))
        return out, v
    if not lhs.pdep and not rhs.pdep:
        raise ctx.fail(eqn, infos, "multiplies two activations that carry channel labels "
                                   "(dot_general without a variables operand)")
    for a in list(lb):
        if lhs.lab[a] is not None:
            raise ctx.fail(eqn, infos, f"batches over the channel axis {a}")
    for a in list(rb):
        if rhs.lab[a] is not None:
            raise ctx.fail(eqn, infos, f"batches over the channel axis {a}")
    act_is_lhs = not lhs.pdep
    if lhs.pdep and rhs.pdep:
        for a, b in zip(lc, rc):
            if lhs.lab[a] is not None or rhs.lab[b] is not None:
                raise ctx.fail(eqn, infos, "contracts a labelled axis of two variables")
    masked_axes: list[tuple[int, Layout]] = []
    act, par = (lhs, rhs) if act_is_lhs else (rhs, lhs)
    ac, pc = (lc, rc) if act_is_lhs else (rc, lc)
    if not (lhs.pdep and rhs.pdep):
        for a, b in zip(ac, pc):
            lay = act.lab[a]
            if lay is not None:
                ctx.mark_leaves(par, b, lay, eqn, infos, "Dense kernel")
                masked_axes.append((a, lay))
                if not ctx.evaluate:
                    for leaf, ax in (par.prov[b] if par.prov[b] != OPAQUE else ()):
                        ctx.consumers.append((leaf, ax, lay, "dense"))
            elif par.lab[b] is not None:
                raise ctx.fail(eqn, infos, "reads unlabelled features with a labelled kernel")
    lfree = [a for a in range(len(lhs.shape)) if a not in lc and a not in lb]
    rfree = [a for a in range(len(rhs.shape)) if a not in rc and a not in rb]
    lab = [lhs.lab[a] for a in lb] + [lhs.lab[a] for a in lfree] + [rhs.lab[a] for a in rfree]
    if not (lhs.pdep and rhs.pdep):
        for a in (rfree if act_is_lhs else lfree):
            if par.lab[a] is not None:
                ctx.mark_leaves(par, a, par.lab[a], eqn, infos, "Dense kernel")
    if ctx.dense_sites and not ctx.evaluate and not (lhs.pdep and rhs.pdep):
        pos = len(lb) + (len(lfree) if act_is_lhs else 0)
        for j, a in enumerate(rfree if act_is_lhs else lfree):
            if par.leaf is not None and lab[pos + j] is None:
                ctx.dense_counter += 1
                lay = ("chan", -1 - ctx.dense_counter, par.shape[a])
                lab[pos + j] = lay
                ctx.mark_leaves(par, a, lay, eqn, infos, "Dense kernel")
    out = _Info(out_shape, tuple(lab), lhs.pdep and rhs.pdep, tuple(OPAQUE for _ in out_shape))
    if not ctx.evaluate and not (lhs.pdep and rhs.pdep):
        ctx.macs.append(("dot", tuple(lab), out_shape,
                         tuple((act.lab[a], act.shape[a]) for a in ac), 1))
    if vals is None:
        return [out], None
    v = list(vals)
    k = 0 if act_is_lhs else 1
    if not (ctx.folded and par.leaf is not None):
        for a, lay in masked_axes:
            v[k] = _masked(v[k], lay, a, ctx)
    return [out], _bind(eqn, v, ctx, [out])


# -- the public graph ------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Consumer:
    """A variables leaf axis that reads a site's channels.

    Attributes:
      path: the leaf's full path in `variables` (e.g. `("params", "fc", "kernel")`).
      axis: the leaf axis indexed by the channels (conv kernel input axis, Dense rows).
      kind: `"conv"` or `"dense"`.
      offset: where this site's channels start inside the innermost channel block
        of the layout (the concat offset; 0 without a concat).
      layout: the axis layout, e.g. `"4x4xconv_3[16]"` (a flatten NHWC) or
        `"cat(a[8], b[4])"`.
    """

    path: tuple[str, ...]
    axis: int
    kind: str
    offset: int
    layout: str


@dataclasses.dataclass(frozen=True)
class Site:
    """One conv layer whose output kernels a mask selects.

    Attributes:
      name: the kernel's param path minus the leaf and the collection, joined by "/".
      kernel_path: the kernel leaf's full path in `variables`.
      num_kernels: output channels K.
      in_channels: the kernel's input channels.
      kernel_size: spatial kernel shape, e.g. `(3, 3)`.
      input_hw: spatial shape of the conv input.
      output_hw: spatial shape of the conv output.
      macs: multiply-accumulates per image of this conv (all calls, all kernels).
      carriers: `(path, axis)` of every other leaf indexed by this site's output
        channels (bias, BatchNorm scale/bias/mean/var, depthwise kernels, and the
        tied sites' carriers).
      consumers: the leaf axes that read these channels.
      tie: the representative site of its tie group (itself when untied).
    """

    name: str
    kernel_path: tuple[str, ...]
    num_kernels: int
    in_channels: int
    kernel_size: tuple[int, ...]
    input_hw: tuple[int, ...]
    output_hw: tuple[int, ...]
    macs: int
    carriers: tuple[tuple[tuple[str, ...], int], ...]
    consumers: tuple[Consumer, ...]
    tie: str


@dataclasses.dataclass(frozen=True)
class _Plan:
    """The analysis of one input shape: what evaluation needs."""

    closed: Any
    treedef: Any
    leaf_labels: dict[int, tuple]  # leaf -> per-axis layouts (groups = root kernel leaf)
    excluded: frozenset[int]
    batch: int
    root_of: dict[int, int]  # kernel leaf -> root
    site_order: tuple[int, ...]
    sites: dict[int, dict]
    consumers: tuple
    macs: tuple
    has_class: bool
    out_shape: tuple[int, ...]


@dataclasses.dataclass(frozen=True, eq=False)
class Graph:
    """The kernel sites of a traced model, their ties, carriers and consumers.

    Duck-compatible with `ConvSpec` (`names`, `layers`, `num_kernels`,
    `total_kernels`, `ties`, `representative`, `free_layers`, `layer`), so the
    mask and encoding functions take either.

    Attributes:
      sites: the sites in forward order.
      ties: groups of >= 2 site names whose masks must be equal (residual adds,
        shared carriers); the first name is the representative.
      input_shape: per-example input shape of the traced `example_x`.
      num_outputs: C of the logits `(N, C)`.
    """

    sites: tuple[Site, ...]
    ties: tuple[tuple[str, ...], ...]
    input_shape: tuple[int, ...]
    num_outputs: int
    apply_fn: Callable = dataclasses.field(repr=False)
    leaf_paths: tuple[tuple[str, ...], ...] = dataclasses.field(repr=False)
    leaf_shapes: Any = dataclasses.field(repr=False)  # ShapeDtypeStruct tree of variables
    input_dtype: Any = dataclasses.field(repr=False, default=jnp.float32)
    _plans: dict = dataclasses.field(default_factory=dict, repr=False)
    _modules: dict = dataclasses.field(default_factory=dict, repr=False)  # module_apply cache

    # -- ConvSpec duck API
    @property
    def layers(self) -> tuple[Site, ...]:
        return self.sites

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.sites)

    @property
    def num_kernels(self) -> dict[str, int]:
        return {s.name: s.num_kernels for s in self.sites}

    @property
    def total_kernels(self) -> int:
        return sum(s.num_kernels for s in self.sites)

    @property
    def image_shape(self) -> tuple[int, ...]:
        return self.input_shape

    def layer(self, name: str) -> Site:
        for s in self.sites:
            if s.name == name:
                return s
        raise KeyError(f"no site named {name!r}; sites are {self.names}")

    def representative(self, name: str) -> str:
        return self.layer(name).tie

    @property
    def free_layers(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.sites if s.tie == s.name)

    @property
    def fingerprint(self) -> str:
        """Stable hex digest of the structure (names, shapes, ties, consumers)."""
        rows = [(s.name, s.kernel_path, s.num_kernels, s.in_channels, s.kernel_size, s.input_hw,
                 s.output_hw, s.tie, s.carriers,
                 tuple((c.path, c.axis, c.kind, c.offset, c.layout) for c in s.consumers))
                for s in self.sites]
        blob = repr((rows, self.ties, self.input_shape, self.num_outputs))
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def summary(self) -> str:
        """A readable table: one row per site (kernel shape, MACs, tie, carriers, consumers)."""
        head = f"{'site':<28} {'K':>5} {'in':>5} {'kernel':>8} {'in_hw':>9} {'out_hw':>9} " \
               f"{'MACs':>12} {'tie':<20} carriers / consumers"
        lines = [f"Graph: {len(self.sites)} sites, {self.total_kernels} kernels, "
                 f"{len(self.ties)} tie groups, input {self.input_shape}, "
                 f"{self.num_outputs} outputs", head, "-" * len(head)]
        for s in self.sites:
            ks = "x".join(map(str, s.kernel_size))
            hw_in = "x".join(map(str, s.input_hw))
            hw_out = "x".join(map(str, s.output_hw))
            cons = ", ".join(f"{'/'.join(c.path)}[{c.axis}]:{c.layout}" for c in s.consumers)
            lines.append(f"{s.name:<28} {s.num_kernels:>5} {s.in_channels:>5} {ks:>8} "
                         f"{hw_in:>9} {hw_out:>9} {s.macs:>12} {s.tie:<20} "
                         f"{len(s.carriers)} carriers -> {cons or '(none)'}")
        return "\n".join(lines)

    # -- plans per input shape
    def plan(self, x_shape: tuple[int, ...], x_dtype: Any, apply_fn: Callable | None = None) -> _Plan:
        """The analysis for inputs of `x_shape` (cached; checked to match this graph)."""
        fn = self.apply_fn if apply_fn is None else apply_fn
        key = (fn, tuple(x_shape), jnp.dtype(x_dtype).name)
        if key not in self._plans:
            plan, sites, ties, _ = _analyse(fn, self.leaf_shapes,
                                            jax.ShapeDtypeStruct(tuple(x_shape), x_dtype))
            got = (tuple((s.name, s.num_kernels) for s in sites), ties)
            want = (tuple((s.name, s.num_kernels) for s in self.sites), self.ties)
            if got != want:
                raise GraphError(f"tracing with inputs {tuple(x_shape)} gives sites/ties {got}, "
                                 f"but the graph has {want}")
            self._plans[key] = plan
        return self._plans[key]

    def group_of(self, plan: _Plan) -> dict[str, int]:
        """Site name -> group id (root kernel leaf) in `plan`."""
        by_path = {self.leaf_paths[k]: k for k in plan.site_order}
        return {s.name: plan.root_of[by_path[s.kernel_path]] for s in self.sites}


def _site_name(path: tuple[str, ...]) -> str:
    inner = path[1:-1] if len(path) > 2 else path[:-1]
    return "/".join(inner) if inner else "/".join(path)


def _key_str(k) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def _run(closed, leaf_shapes, x_info, leaf_labels, excluded, batch, leaf_paths,
         dense_sites=False) -> tuple[_Ctx, list[_Info]]:
    ctx = _Ctx(leaf_paths, leaf_labels, excluded, batch, dense_sites=dense_sites)
    infos = [_leaf_info(i, tuple(s.shape), leaf_labels.get(i)) for i, s in enumerate(leaf_shapes)]
    outs, _ = _walk(closed.jaxpr, closed.consts, infos + [x_info], None, ctx)
    return ctx, outs


def _labels_from(found: Mapping[tuple[int, int], Layout], uf: _UnionFind, shapes,
                 drop: set[int]) -> dict[int, tuple]:
    out: dict[int, list] = {}
    for (leaf, ax), lay in found.items():
        if _groups(lay) & drop:
            continue
        lab = out.setdefault(leaf, [None] * len(shapes[leaf].shape))
        lab[ax] = _map_groups(lay, uf.find)
    return {k: tuple(v) for k, v in out.items()}


def _analyse(apply_fn: Callable, leaf_tree, x) -> tuple[_Plan, tuple[Site, ...], tuple, int]:
    """Fixpoint analysis of `apply_fn` for inputs like `x`."""
    leaves_p, treedef = jax.tree_util.tree_flatten_with_path(leaf_tree)
    leaf_paths = tuple(tuple(_key_str(k) for k in p) for p, _ in leaves_p)
    leaf_shapes = [jax.ShapeDtypeStruct(tuple(np.shape(l)), jnp.result_type(l)) for _, l in leaves_p]

    def flat_fn(leaves, xx):
        return apply_fn(jax.tree_util.tree_unflatten(treedef, leaves), xx)

    closed = jax.make_jaxpr(flat_fn)(leaf_shapes, x)
    if len(closed.jaxpr.outvars) != 1 or len(closed.out_avals[0].shape) != 2:
        raise GraphError(f"apply_fn must return one logits array (N, C); it returns "
                         f"{[tuple(a.shape) for a in closed.out_avals]}")
    out_shape = tuple(closed.out_avals[0].shape)
    batch = int(x.shape[0]) if len(x.shape) else 1
    x_info = _Info(tuple(x.shape), (None,) * len(x.shape), False, (OPAQUE,) * len(x.shape))
    labels: dict[int, tuple] = {}
    excluded: frozenset[int] = frozenset()
    for _ in range(8):
        ctx, outs = _run(closed, leaf_shapes, x_info, labels, excluded, batch, leaf_paths)
        terminal = set()
        for lay in outs[0].lab:
            if lay is not None:
                terminal |= {g for g in ctx.sites if ctx.uf.find(g) in
                             {ctx.uf.find(h) for h in _groups(lay)}}
        new_excluded = excluded | frozenset(terminal)
        new_labels = _labels_from(ctx.found, ctx.uf, leaf_shapes, set(new_excluded))
        if new_labels == labels and new_excluded == excluded:
            break
        labels, excluded = new_labels, new_excluded
    else:
        raise GraphError("the channel analysis did not settle after 8 passes")
    uf, site_ctx = ctx.uf, ctx

    # the classifier's columns: a side pass with Dense outputs as pseudo groups
    has_class = False
    mac_terms = site_ctx.macs
    try:
        dctx, douts = _run(closed, leaf_shapes, x_info, labels, excluded, batch, leaf_paths,
                           dense_sites=True)
        lay = douts[0].lab[1]
        if lay is not None and lay[0] == "chan" and lay[1] < 0 and douts[0].lab[0] is None:
            root = dctx.uf.find(lay[1])
            members = {g for g in dctx.uf.parent if dctx.uf.find(g) == root}
            if all(g < 0 for g in members):
                cls = {k: v for k, v in dctx.found.items() if _groups(v) <= members}
                if all(v[0] == "chan" for v in cls.values()):
                    cand = dict(labels)
                    for (leaf, ax), v in cls.items():
                        lab = list(cand.get(leaf, (None,) * len(leaf_shapes[leaf].shape)))
                        if lab[ax] is None:
                            lab[ax] = ("chan", CLASS_GID, v[2])
                            cand[leaf] = tuple(lab)
                    cctx, couts = _run(closed, leaf_shapes, x_info, cand, excluded, batch,
                                       leaf_paths)
                    if couts[0].lab == (None, ("chan", CLASS_GID, out_shape[1])) and \
                            _labels_from(cctx.found, cctx.uf, leaf_shapes, set(excluded)) == cand:
                        labels, has_class = cand, True
                        mac_terms = cctx.macs  # the classifier's output axis labelled too
    except GraphError:
        pass

    # sites, in forward order
    order = tuple(k for k in site_ctx.sites if k not in excluded)
    root_of = {k: uf.find(k) for k in order}
    name_of = {k: _site_name(leaf_paths[k]) for k in order}
    rep_of_root: dict[int, int] = {}
    for k in order:
        rep_of_root.setdefault(root_of[k], k)
    groups: dict[int, list[int]] = {}
    for k in order:
        groups.setdefault(root_of[k], []).append(k)
    ties = tuple(tuple(name_of[k] for k in g) for g in groups.values() if len(g) >= 2)
    gnames = {root_of[k]: name_of[rep_of_root[root_of[k]]] for k in order}
    kernel_axes = {(k, site_ctx.sites[k]["out_axis"]) for k in order}
    sites = []
    consumers_all = []
    for leaf, ax, lay, kind in site_ctx.consumers:
        lay = _map_groups(lay, uf.find)
        consumers_all.append((leaf, ax, lay, kind))
    for k in order:
        info = site_ctx.sites[k]
        root = root_of[k]
        carriers = tuple(sorted(
            (leaf_paths[leaf], ax) for leaf, lab in labels.items() for ax, lay in enumerate(lab)
            if lay is not None and lay[0] == "chan" and lay[1] == root and (leaf, ax) not in
            kernel_axes and not any(c[0] == leaf and c[1] == ax for c in consumers_all)))
        cons = []
        seen = set()
        for leaf, ax, lay, kind in consumers_all:
            if root in _groups(lay) and (leaf, ax) not in seen:
                seen.add((leaf, ax))
                cons.append(Consumer(leaf_paths[leaf], ax, kind, _offset(lay, root),
                                     _describe(lay, gnames)))
        sites.append(Site(
            name=name_of[k], kernel_path=leaf_paths[k], num_kernels=int(info["kernel_shape"][info["out_axis"]]),
            in_channels=int(info["in_channels"]), kernel_size=tuple(info["kernel_size"]),
            input_hw=tuple(info["input_hw"]), output_hw=tuple(info["output_hw"]),
            macs=int(info["macs"]), carriers=carriers, consumers=tuple(cons),
            tie=name_of[rep_of_root[root]]))
    if len({s.name for s in sites}) != len(sites):
        raise GraphError(f"site names are not unique: {[s.name for s in sites]}")
    plan = _Plan(closed=closed, treedef=treedef, leaf_labels=labels, excluded=excluded,
                 batch=batch, root_of=root_of, site_order=order, sites=site_ctx.sites,
                 consumers=tuple(consumers_all),
                 macs=tuple(_map_macs(m, uf.find) for m in mac_terms),
                 has_class=has_class, out_shape=out_shape)
    return plan, tuple(sites), ties, out_shape[1]


def _map_macs(term, find):
    kind, lab, shape, contr, spatial = term
    m = lambda l: None if l is None else _map_groups(l, find)  # noqa: E731
    return (kind, tuple(m(l) for l in lab), shape, tuple((m(l), n) for l, n in contr), spatial)


def trace(apply_fn: Callable, variables: Mapping, example_x: jax.Array) -> Graph:
    """The kernel graph of `apply_fn` (see the module docstring).

    Args:
      apply_fn: `apply_fn(variables, x) -> logits (N, C)`, an inference apply,
        e.g. `functools.partial(model.apply, train=False)`.
      variables: the full variables dict (`{"params": ..., "batch_stats": ...}`).
      example_x: an input batch `(N, ...)` (only its shape and dtype are used).

    Returns:
      the `Graph`; its functions accept any batch size.

    Raises:
      GraphError: naming the primitive, the flax module and the variables of the
        first op that would make kernel removal inexact.
    """
    if not isinstance(variables, Mapping):
        raise GraphError(f"variables must be a dict of collections, got {type(variables).__name__}")
    if not hasattr(example_x, "shape") or len(example_x.shape) < 1:
        raise GraphError(f"example_x must be an array with a batch axis, got {example_x!r}")
    leaf_shapes = jax.tree_util.tree_map(
        lambda l: jax.ShapeDtypeStruct(tuple(np.shape(l)), jnp.result_type(l)), variables)
    x = jax.ShapeDtypeStruct(tuple(example_x.shape), jnp.result_type(example_x))
    plan, sites, ties, num_outputs = _analyse(apply_fn, leaf_shapes, x)
    leaves_p, _ = jax.tree_util.tree_flatten_with_path(leaf_shapes)
    leaf_paths = tuple(tuple(_key_str(k) for k in p) for p, _ in leaves_p)
    if not sites:
        raise GraphError("the model has no conv site (no conv whose output channels reach a "
                         "consumer); nothing to modularise")
    g = Graph(sites=sites, ties=ties, input_shape=tuple(example_x.shape[1:]),
              num_outputs=int(num_outputs), apply_fn=apply_fn, leaf_paths=leaf_paths,
              leaf_shapes=leaf_shapes, input_dtype=x.dtype)
    g._plans[(apply_fn, tuple(x.shape), jnp.dtype(x.dtype).name)] = plan
    return g


# -- evaluation ----------------------------------------------------------------------

def evaluate(graph: Graph, plan: _Plan, leaves: Sequence[jax.Array], x: jax.Array, *,
             sizes: Mapping[int, int] | None = None,
             vectors: Mapping[int, jax.Array] | None = None,
             matmul_max_hw: int = 0) -> jax.Array:
    """Re-evaluate the traced jaxpr on `leaves` (possibly gathered) and `x`.

    Args:
      sizes: group id -> channel count of every labelled axis (default: full).
      vectors: group id -> `(size,)` multiplier of consumer inputs (mask / valid).
      matmul_max_hw: convs whose input spatial sizes are all <= this run as one
        dense matmul (`_conv_as_matmul`); 0 (default): every conv as traced.

    Returns:
      the output `(N, C)` (or `(N, 1)` when the classifier group is sized 1).
    """
    ctx = _Ctx(graph.leaf_paths, plan.leaf_labels, plan.excluded, plan.batch, evaluate=True,
               sizes=sizes, vectors=vectors, matmul_max_hw=matmul_max_hw)
    ctx.root_of = dict(plan.root_of)
    infos = [_leaf_info(i, tuple(s.shape), plan.leaf_labels.get(i))
             for i, s in enumerate(jax.tree_util.tree_leaves(graph.leaf_shapes))]
    x_info = _Info(tuple(plan.closed.in_avals[-1].shape), (None,) * x.ndim, False,
                   (OPAQUE,) * x.ndim)
    _, outs = _walk(plan.closed.jaxpr, plan.closed.consts, infos + [x_info], list(leaves) + [x],
                    ctx)
    return outs[0]


def macs(plan: _Plan, sizes: Mapping[int, int]) -> int:
    """Multiply-accumulates per image of convs and Dense layers with `sizes` channels."""
    total = 0
    for _, lab, shape, contr, spatial in plan.macs:
        out = math.prod(s if l is None else _size(l, sizes) for s, l in zip(shape, lab))
        total += out * spatial * math.prod(s if l is None else _size(l, sizes) for l, s in contr)
    return int(total // max(plan.batch, 1))
