"""jaxsplit: modularize trained CNNs into per-class modules and patch weak models with them.

A JAX reimplementation of CNNSplitter (Qi et al., ASE 2022).

`jaxsplit.extract` is both the extraction module and its generic
`extract(graph, variables, mask, target_class=None)` function (a callable module).
"""

__version__ = "0.1.0"

from jaxsplit import extract, masks, models  # noqa: F401
from jaxsplit.extract import gather, module_stats  # noqa: F401
from jaxsplit.graph import Graph, GraphError, Site, trace  # noqa: F401
from jaxsplit.masks import apply_masks, masked_apply  # noqa: F401

__all__ = ["Graph", "GraphError", "Site", "apply_masks", "extract", "gather", "masked_apply",
           "masks", "models", "module_stats", "trace"]
