"""Helpers for working next to the PyTorch reference (CNNSplitter), without importing torch.

* `nchw_to_nhwc(x)` / `nhwc_to_nchw(x)`: image batches between PyTorch's channel-first layout
  and jaxsplit's channel-last one. numpy arrays, jax arrays and torch tensors are accepted and
  returned as the same kind (a torch tensor is permuted with its own `permute`, so torch need not
  be imported here).
* `genome_to_mask(enc, genome, class_id)`: one class's kernel mask from a reference genome vector.
  jaxsplit's genome layout is the reference's (docs/method.md §4): free layers in the order of the
  last member of their tie group, one bit per importance-ranked group, so a genome saved by the
  reference's GA (one row of its per-class population) decodes with the jaxsplit encoding built
  from the same importance.

    >>> import numpy as np
    >>> nchw_to_nhwc(np.zeros((2, 3, 32, 32))).shape
    (2, 32, 32, 3)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

__all__ = ["nchw_to_nhwc", "nhwc_to_nchw", "genome_to_mask"]


def _permute(x: Any, order: tuple[int, int, int, int], what: str, expected: str) -> Any:
    ndim = getattr(x, "ndim", None)
    if ndim is None:
        x = np.asarray(x)
        ndim = x.ndim
    if ndim != 4:
        raise ValueError(f"{what}: expected a 4-d batch {expected}, got shape {tuple(np.shape(x))}")
    if type(x).__module__.startswith("torch"):
        return x.permute(*order)
    if hasattr(x, "transpose"):
        return x.transpose(order)
    return np.transpose(x, order)


def nchw_to_nhwc(x: Any) -> Any:
    """A batch `(N, C, H, W)` (PyTorch) as `(N, H, W, C)` (jaxsplit), same array kind."""
    return _permute(x, (0, 2, 3, 1), "nchw_to_nhwc", "(N, C, H, W)")


def nhwc_to_nchw(x: Any) -> Any:
    """A batch `(N, H, W, C)` (jaxsplit) as `(N, C, H, W)` (PyTorch), same array kind."""
    return _permute(x, (0, 3, 1, 2), "nhwc_to_nchw", "(N, H, W, C)")


def genome_to_mask(enc: Any, genome: Any, class_id: int, *, empty: str = "none") -> Mapping[str, np.ndarray]:
    """The kernel mask of class `class_id` encoded by one genome.

    Args:
      enc: the `jaxsplit.search.encoding.Encoding` (built from the same per-class importance
        as the genome's GA, e.g. `encoding.build_encoding(spec, importance)`).
      genome: `(G,)` 0/1 (or bool) genes of that class, in the reference's gene order.
      class_id: which class's kernel ranking to decode with (genes are per-class groups).
      empty: "none" (a layer with no gene on keeps nothing) or "kernel0" (the reference's
        fallback: keep kernel 0 of such a layer).

    Returns:
      `{conv_name: bool (K_l,)}` for every conv layer (tied layers equal), numpy.

    Raises:
      ValueError: a genome of the wrong length or with values other than 0/1, or a class id
        out of range; the message gives the expected values.
    """
    from jaxsplit.search import encoding as enc_lib

    g = np.asarray(genome)
    if g.ndim != 1 or g.shape[0] != enc.num_genes:
        raise ValueError(f"genome has shape {g.shape}; expected ({enc.num_genes},) genes for this encoding")
    if g.dtype != bool and not np.isin(g, (0, 1)).all():
        bad = np.unique(g[~np.isin(g, (0, 1))])[:5]
        raise ValueError(f"genome has values {bad.tolist()}; expected only 0 and 1")
    if isinstance(class_id, bool) or int(class_id) != class_id or not 0 <= int(class_id) < enc.num_classes:
        raise ValueError(f"class_id {class_id!r} is out of range: expected 0..{enc.num_classes - 1}")
    genes = np.zeros((enc.num_classes, 1, enc.num_genes), bool)
    genes[int(class_id), 0] = g.astype(bool)
    masks = enc_lib.decode(enc, genes, empty=empty)
    return {name: np.asarray(m[int(class_id), 0]) for name, m in masks.items()}
