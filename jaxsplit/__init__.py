"""jaxsplit: modularize trained CNNs into per-class modules and patch weak models with them.

A JAX reimplementation of CNNSplitter (Qi et al., ASE 2022).

`jaxsplit.extract` is both the extraction module and its generic
`extract(graph, variables, mask, target_class=None)` function (a callable module);
likewise `jaxsplit.modularize` is the library entry point
`modularize(apply_fn, variables, (images, labels), search=...)` and its module.
"""

__version__ = "0.1.0"

from jaxsplit import extract, masks, models  # noqa: F401
from jaxsplit.extract import gather, module_stats  # noqa: F401
from jaxsplit.graph import Graph, GraphError, Site, trace  # noqa: F401
from jaxsplit.masks import apply_masks, masked_apply  # noqa: F401
from jaxsplit import modularize  # noqa: F401  (a callable module: jaxsplit.modularize(apply_fn, ...))
from jaxsplit.modularize import (  # noqa: F401
    Modules,
    ModularizeState,
    modularize_init,
    modularize_step,
)
from jaxsplit.search.config import SearchConfig  # noqa: F401

__all__ = ["Graph", "GraphError", "Modules", "ModularizeState", "SearchConfig", "Site",
           "apply_masks", "extract", "gather", "masked_apply", "masks", "models", "modularize",
           "modularize_init", "modularize_step", "module_stats", "trace"]
