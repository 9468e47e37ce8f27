"""Gene encoding of kernel masks and the heuristic initial population (SPEC §4).

For every class c and FREE layer l (one per residual tie group,
`spec.free_layers`), the kernels are ranked by importance (most important
first) and the ranking is cut into `num_groups_l` contiguous groups with
`numpy.array_split` semantics (the first `K_l % n` groups get one kernel
more). A gene is one bit per group: on = all kernels of that group kept.
`num_groups_l` = `groups_small` (10) for layers with fewer than
`group_threshold` (256) kernels, else `groups_large` (100); when a (narrow)
layer has fewer kernels than that, `min(groups, K_l)` groups are used (one
kernel per group), since an empty group would be a gene without effect.
SimCNN at width 1 has 4·10 + 3·100 + 6·100 = 940 genes.

Group 0 of a layer always holds its most important kernels.

Genome layout: free layers in the order of the LAST member of their tie
group. For chains without ties (SimCNN) that is the layer order; for ResCNN
it is conv_0, conv_2, conv_{1,3}, conv_4, conv_6, conv_{5,7}, ... exactly the
reference's genome (which stores a tie group's genes at the later layer).
Unlike the reference, a tie group's kernels are ranked by the summed
importance of its members and the decoded mask is copied to every member
(`masks.tie`), so both sides of a residual add keep the same channels (the
reference decoded each member with its own ranking, keeping the same NUMBER
but not the same channels).

`decode` is a gather (pure, jit/vmap-able); `encode` is its left inverse on
masks that are unions of whole groups (a group decodes on iff ALL its kernels
are kept, so a partially kept group is dropped).

Empty layers: the reference GA can produce a layer with no gene on (its
extractor then keeps kernel 0 with a warning). `repair` forces the most
important group (group 0) on in such layers (default, a safety deviation);
`decode(..., empty="kernel0")` instead reproduces the reference's kernel-0
fallback at decoding time.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import partial
from typing import Literal

import chex
import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxsplit import masks as masks_lib
from jaxsplit.errors import JaxsplitError
from jaxsplit.importance import rank as rank_importance
from jaxsplit.importance import tied_importance
from jaxsplit.models.convnet import ConvSpec

EmptyLayer = Literal["none", "kernel0"]

# The reference's softmax temperature over importance-ranked groups in the initial population
# (`search.init_temperature`, see `init_population`).
REFERENCE_INIT_TEMPERATURE = 10.0

# Reference initial-population settings per model family (CNNSplitter configures/*_cifar10.py).
# Sensitive layers are 0-based conv indices; a tie group is sensitive if any member is.
REFERENCE_INIT = {
    "simcnn": {"sensitive": tuple(range(7)), "ratios_sensitive": (0.6, 0.7, 0.8),
               "ratios_other": (0.4, 0.5, 0.6, 0.7)},
    "rescnn": {"sensitive": (0, 1, 3, 4, 5, 7), "ratios_sensitive": (0.5, 0.6, 0.7),
               "ratios_other": (0.2, 0.3, 0.4)},
}


class EncodingError(JaxsplitError, ValueError):
    """Genes, masks or settings that do not fit the encoding."""


@struct.dataclass
class Encoding:
    """Where every kernel's bit lives in the genome.

    Attributes:
      groups: `{free_layer: (C, K_l) int32}` group index of each kernel per class.
      spec: the model's `ConvSpec` (static).
      layers: free layers in genome order (static).
      offsets: first gene of each layer in `layers` (static).
      num_groups: genes of each layer in `layers` (static).
      num_genes: G, total genes (static).
      num_classes: C (static).
    """

    groups: dict
    spec: ConvSpec = struct.field(pytree_node=False)
    layers: tuple[str, ...] = struct.field(pytree_node=False)
    offsets: tuple[int, ...] = struct.field(pytree_node=False)
    num_groups: tuple[int, ...] = struct.field(pytree_node=False)
    num_genes: int = struct.field(pytree_node=False)
    num_classes: int = struct.field(pytree_node=False)

    def layer_slice(self, name: str) -> slice:
        """Genes of free layer `name`."""
        i = self.layers.index(name)
        return slice(self.offsets[i], self.offsets[i] + self.num_groups[i])

    def gene_layer(self) -> np.ndarray:
        """`(G,)` int: index into `layers` of each gene."""
        return np.repeat(np.arange(len(self.layers)), self.num_groups)


def groups_for(num_kernels: int, groups_small: int = 10, groups_large: int = 100,
               group_threshold: int = 256) -> int:
    """Genes of a layer: 10 if K < 256 else 100 (reference), capped at K."""
    n = groups_small if num_kernels < group_threshold else groups_large
    return max(1, min(n, num_kernels))


def genome_order(spec: ConvSpec) -> tuple[str, ...]:
    """Free layers sorted by the position of the last member of their tie group."""
    position = {n: i for i, n in enumerate(spec.names)}

    def last(name: str) -> int:
        group = next((g for g in spec.ties if g[0] == name), (name,))
        return max(position[m] for m in group)

    return tuple(sorted(spec.free_layers, key=last))


def encoding_from_ranks(spec: ConvSpec, ranks: Mapping[str, np.ndarray], *, groups_small: int = 10,
                        groups_large: int = 100, group_threshold: int = 256) -> Encoding:
    """Build the encoding from each free layer's kernel order.

    Args:
      spec: the model's conv spec.
      ranks: `{free_layer: (C, K_l) int}`, kernel indices most important first
        (`importance.rank`).
      groups_small, groups_large, group_threshold: see `groups_for`.

    Returns:
      the `Encoding`.
    """
    for name, value in (("groups_small", groups_small), ("groups_large", groups_large),
                        ("group_threshold", group_threshold)):
        if int(value) < 1:
            raise EncodingError(f"{name} must be >= 1, got {value}")
    missing = sorted(set(spec.free_layers) - set(ranks))
    if missing:
        raise EncodingError(f"ranks lack free layers {missing}; expected {list(spec.free_layers)}")
    layers = genome_order(spec)
    groups, offsets, num_groups = {}, [], []
    num_classes = None
    offset = 0
    for name in layers:
        k = spec.layer(name).num_kernels
        order = np.asarray(ranks[name])
        if order.ndim != 2 or order.shape[1] != k:
            raise EncodingError(f"ranks of {name} have shape {order.shape}; expected (C, {k})")
        if num_classes is None:
            num_classes = order.shape[0]
        elif order.shape[0] != num_classes:
            raise EncodingError(f"ranks of {name} have {order.shape[0]} classes; expected {num_classes}")
        if not np.array_equal(np.sort(order, axis=-1), np.broadcast_to(np.arange(k), order.shape)):
            raise EncodingError(f"ranks of {name} must be permutations of 0..{k - 1} per class")
        n = groups_for(k, groups_small, groups_large, group_threshold)
        # group of each rank position, numpy.array_split semantics
        group_of_position = np.concatenate(
            [np.full(len(part), g) for g, part in enumerate(np.array_split(np.arange(k), n))])
        g = np.empty_like(order)
        np.put_along_axis(g, order, group_of_position[None, :].repeat(order.shape[0], 0), axis=-1)
        groups[name] = jnp.asarray(g, jnp.int32)
        offsets.append(offset)
        num_groups.append(n)
        offset += n
    return Encoding(groups=groups, spec=spec, layers=layers, offsets=tuple(offsets),
                    num_groups=tuple(num_groups), num_genes=offset, num_classes=int(num_classes))


def build_encoding(spec: ConvSpec, importance: Mapping[str, np.ndarray], *, groups_small: int = 10,
                   groups_large: int = 100, group_threshold: int = 256) -> Encoding:
    """The encoding of SPEC §4 from per-layer importance `{conv_name: (C, K_l)}`.

    Tie groups are ranked by their members' summed importance (`tied_importance`).
    """
    ranks = rank_importance(tied_importance(importance, spec))
    return encoding_from_ranks(spec, ranks, groups_small=groups_small, groups_large=groups_large,
                               group_threshold=group_threshold)


def encoding_from_config(spec: ConvSpec, importance: Mapping[str, np.ndarray], search_cfg) -> Encoding:
    """`build_encoding` with `SearchConfig.groups_small/groups_large/group_threshold`."""
    return build_encoding(spec, importance, groups_small=search_cfg.groups_small,
                          groups_large=search_cfg.groups_large,
                          group_threshold=search_cfg.group_threshold)


def _check_genes(enc: Encoding, genes: jax.Array) -> None:
    if genes.ndim < 2 or genes.shape[0] != enc.num_classes or genes.shape[-1] != enc.num_genes:
        raise EncodingError(
            f"genes have shape {tuple(genes.shape)}; expected (C={enc.num_classes}, ..., "
            f"G={enc.num_genes})")


def decode(enc: Encoding, genes: jax.Array, *, empty: EmptyLayer = "none") -> masks_lib.Mask:
    """Kernel masks of genomes (a gather).

    Args:
      enc: the encoding.
      genes: `(C, ..., G)` bool (or 0/1 numbers, read as `!= 0`).
      empty: "none" (a layer without genes on decodes empty; use `repair`
        first) or "kernel0" (the reference's fallback: keep kernel 0 of an
        empty layer).

    Returns:
      `{conv_name: bool (C, ..., K_l)}` for every conv layer, tied layers equal.
    """
    _check_genes(enc, genes)
    if empty not in ("none", "kernel0"):
        raise EncodingError(f"empty must be 'none' or 'kernel0', got {empty!r}")
    genes = genes.astype(bool) if genes.dtype != jnp.bool_ else genes
    lead = genes.shape[1:-1]
    flat = genes.reshape(enc.num_classes, -1, enc.num_genes)  # (C, B, G)
    out = {}
    for name in enc.layers:
        g = flat[..., enc.layer_slice(name)]  # (C, B, n)
        idx = enc.groups[name][:, None, :]  # (C, 1, K)
        m = jnp.take_along_axis(g, jnp.broadcast_to(idx, (*g.shape[:2], idx.shape[-1])), axis=-1)
        if empty == "kernel0":
            first = jnp.arange(m.shape[-1]) == 0
            m = m | (~m.any(-1, keepdims=True) & first)
        out[name] = m.reshape(enc.num_classes, *lead, m.shape[-1])
    return masks_lib.tie(out, enc.spec)


def encode(enc: Encoding, mask: Mapping[str, jax.Array]) -> jax.Array:
    """Genomes of masks: a group's gene is on iff ALL its kernels are kept.

    `encode(decode(g)) == g` for every genome; `decode(encode(m)) == m` iff
    every layer of `m` is a union of whole groups (otherwise partially kept
    groups are dropped). Only the free layers are read.

    Args:
      mask: `{conv_name: bool (C, ..., K_l)}`.

    Returns:
      `(C, ..., G)` bool.
    """
    first = mask[enc.layers[0]]
    if first.shape[0] != enc.num_classes:
        raise EncodingError(f"mask of {enc.layers[0]} has shape {tuple(first.shape)}; expected "
                            f"(C={enc.num_classes}, ..., K)")
    lead = first.shape[1:-1]
    parts = []
    for name, n in zip(enc.layers, enc.num_groups):
        m = mask[name]
        k = enc.spec.layer(name).num_kernels
        if m.shape != (enc.num_classes, *lead, k):
            raise EncodingError(f"mask of {name} has shape {tuple(m.shape)}; expected "
                                f"{(enc.num_classes, *lead, k)}")
        onehot = jax.nn.one_hot(enc.groups[name], n, dtype=jnp.int32)  # (C, K, n)
        flat = m.reshape(enc.num_classes, -1, k).astype(jnp.int32)  # (C, B, K)
        kept = jnp.einsum("cbk,ckn->cbn", flat, onehot)
        size = onehot.sum(1)[:, None, :]
        parts.append((kept == size).reshape(enc.num_classes, *lead, n))
    return jnp.concatenate(parts, axis=-1)


def repair(enc: Encoding, genes: jax.Array) -> jax.Array:
    """Force group 0 (the most important kernels) on in every layer without a gene on.

    Args:
      genes: `(..., G)` bool or 0/1 numbers.

    Returns:
      genes of the same shape and dtype; layers that had a gene on are unchanged.
    """
    chex.assert_axis_dimension(genes, -1, enc.num_genes)
    on = genes != 0
    parts = []
    for name, n in zip(enc.layers, enc.num_groups):
        g = on[..., enc.layer_slice(name)]
        fix = ~g.any(-1, keepdims=True) & (jnp.arange(n) == 0)
        parts.append(g | fix)
    fixed = jnp.concatenate(parts, axis=-1)
    return fixed if genes.dtype == jnp.bool_ else fixed.astype(genes.dtype)


def layer_counts(enc: Encoding, genes: jax.Array) -> jax.Array:
    """Genes on per free layer: `(..., num_layers)` int32."""
    on = (genes != 0).astype(jnp.int32)
    return jnp.stack([on[..., enc.layer_slice(n)].sum(-1) for n in enc.layers], axis=-1)


# -- heuristic initial population (SPEC §4) -----------------------------------


def sensitive_free_layers(enc: Encoding, sensitive: Sequence[int | str]) -> tuple[str, ...]:
    """Free layers that are sensitive: any member of their tie group is listed.

    Args:
      sensitive: 0-based conv layer indices or conv names.
    """
    names = set()
    for s in sensitive:
        if isinstance(s, str):
            if s not in enc.spec.names:
                raise EncodingError(f"unknown sensitive layer {s!r}; layers are {enc.spec.names}")
            names.add(s)
        else:
            if not 0 <= int(s) < len(enc.spec.layers):
                raise EncodingError(
                    f"sensitive layer index {s} out of range [0, {len(enc.spec.layers)})")
            names.add(enc.spec.names[int(s)])
    return tuple(n for n in enc.layers
                 if names & set(next((g for g in enc.spec.ties if g[0] == n), (n,))))


def init_population(key: jax.Array, enc: Encoding, population_size: int,
                    sensitive_layers: Sequence[int | str], ratios_sensitive: Sequence[float],
                    ratios_other: Sequence[float],
                    temperature: float = REFERENCE_INIT_TEMPERATURE) -> jax.Array:
    """Heuristic initial genomes of every class (SPEC §4).

    For each class, individual and layer: draw an active ratio r uniformly
    from the layer's list (sensitive or other), then switch on
    `max(1, floor(r * n))` of the layer's n groups, drawn without replacement
    with probabilities `softmax((n - 1 - group) / 10)` (group 0 = the most
    important kernels, most likely). `floor` is the reference's `int()`
    (equal to `round` for its ratio lists); the `max(1, .)` guarantees no
    layer starts empty. Sampling without replacement uses the Gumbel-top-k
    trick (top-k of `log p + Gumbel`), the same construction as
    `jax.random.choice(replace=False, p=...)` but with a per-row k.

    `temperature` replaces the reference's 10 in that softmax (option
    `search.init_temperature`). With 100-group layers, 10 makes the most
    important groups ~e^9.9 times likelier than the least; with 10-group
    layers (all layers of a narrow model) only e^0.9 = 2.5 times, i.e. a
    nearly random pick. A temperature of 1 gives 10-group layers the
    preference 100-group layers have at 10.

    Returns:
      `(C, P, G)` bool.
    """
    if population_size < 1:
        raise EncodingError(f"population_size must be >= 1, got {population_size}")
    for what, ratios in (("ratios_sensitive", ratios_sensitive), ("ratios_other", ratios_other)):
        if len(ratios) == 0 or any(not 0.0 < float(r) <= 1.0 for r in ratios):
            raise EncodingError(f"{what} must be a non-empty list of values in (0, 1], got {ratios}")
    if not float(temperature) > 0:
        raise EncodingError(f"temperature must be > 0, got {temperature}")
    sens = sensitive_free_layers(enc, sensitive_layers)
    return _init_population(key, enc, int(population_size), sens,
                            tuple(float(r) for r in ratios_sensitive),
                            tuple(float(r) for r in ratios_other), float(temperature))


@partial(jax.jit, static_argnums=(2, 3, 4, 5, 6))
def _init_population(key: jax.Array, enc: Encoding, population_size: int, sens: tuple[str, ...],
                     ratios_sensitive: tuple[float, ...], ratios_other: tuple[float, ...],
                     temperature: float) -> jax.Array:
    shape = (enc.num_classes, population_size)
    k_ratio, k_gumbel = jax.random.split(key)
    # One draw for all layers (fewer PRNG kernels to compile): a ratio index per layer and a
    # Gumbel variate per gene.
    u_ratio = jax.random.uniform(k_ratio, (*shape, len(enc.layers)))
    gumbel = jax.random.gumbel(k_gumbel, (*shape, enc.num_genes))
    parts = []
    for i, (name, n) in enumerate(zip(enc.layers, enc.num_groups)):
        ratios = jnp.asarray(ratios_sensitive if name in sens else ratios_other, jnp.float32)
        choice = jnp.minimum((u_ratio[..., i] * len(ratios)).astype(jnp.int32), len(ratios) - 1)
        r = ratios[choice]  # uniform over the list
        # floor(r * n) with a small epsilon so that float32 0.7 * 10 = 6.9999995 gives 7 like
        # Python's int(10 * 0.7) on the reference's float64 lists.
        count = jnp.maximum(1, jnp.floor(r * n + 1e-4)).astype(jnp.int32)  # (C, P)
        logp = jax.nn.log_softmax((n - 1 - jnp.arange(n)) / temperature)
        scores = logp + gumbel[..., enc.offsets[i]:enc.offsets[i] + n]
        position = jnp.argsort(jnp.argsort(-scores, axis=-1), axis=-1)  # rank of each group
        parts.append(position < count[..., None])
    return jnp.concatenate(parts, axis=-1)


def reference_init_settings(model_name: str, search_cfg=None) -> dict:
    """Sensitive layers and ratio lists: the config's when set, else the family's reference.

    Families without a reference list (weak_cnn) use SimCNN's ratios and no
    sensitive layer.
    """
    ref = REFERENCE_INIT.get(model_name, {**REFERENCE_INIT["simcnn"], "sensitive": ()})
    out = {"sensitive": tuple(ref["sensitive"]), "ratios_sensitive": tuple(ref["ratios_sensitive"]),
           "ratios_other": tuple(ref["ratios_other"]), "temperature": REFERENCE_INIT_TEMPERATURE}
    if search_cfg is not None:
        if search_cfg.sensitive_layers is not None:
            out["sensitive"] = tuple(search_cfg.sensitive_layers)
        if search_cfg.init_ratios_sensitive is not None:
            out["ratios_sensitive"] = tuple(search_cfg.init_ratios_sensitive)
        if search_cfg.init_ratios_other is not None:
            out["ratios_other"] = tuple(search_cfg.init_ratios_other)
        out["temperature"] = float(search_cfg.init_temperature)
    return out


def expected_genes(spec: ConvSpec, groups_small: int = 10, groups_large: int = 100,
                   group_threshold: int = 256) -> int:
    """G for a spec (no importance needed)."""
    return int(sum(groups_for(spec.layer(n).num_kernels, groups_small, groups_large, group_threshold)
                   for n in spec.free_layers))


def kept_fraction_of_genes(enc: Encoding, genes: jax.Array) -> jax.Array:
    """Fraction of all conv kernels kept by genomes `(C, ..., G)`: `(C, ...)` float32."""
    return masks_lib.kept_fraction(decode(enc, genes)).astype(jnp.float32)


__all__ = [
    "Encoding", "EncodingError", "REFERENCE_INIT", "REFERENCE_INIT_TEMPERATURE", "build_encoding",
    "decode", "encode",
    "encoding_from_config", "encoding_from_ranks", "expected_genes", "genome_order", "groups_for",
    "init_population", "kept_fraction_of_genes", "layer_counts", "reference_init_settings",
    "repair", "sensitive_free_layers",
]
