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
from jaxsplit.search.config import SearchConfig  # noqa: F401

# The search API imports evosax, whose import already starts JAX's backend; that must wait until
# a multi-process program has called `jax.distributed.initialize` (jaxsplit.search.multihost),
# so these names are loaded on first use (PEP 562).
_LAZY = {"modularize": None, "Modules": "Modules", "ModularizeState": "ModularizeState",
         "modularize_init": "modularize_init", "modularize_step": "modularize_step"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        module = importlib.import_module("jaxsplit.modularize")  # a callable module
        value = module if _LAZY[name] is None else getattr(module, _LAZY[name])
        globals()[name] = value
        return value
    raise AttributeError(f"module 'jaxsplit' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))

__all__ = ["Graph", "GraphError", "Modules", "ModularizeState", "SearchConfig", "Site",
           "apply_masks", "extract", "gather", "masked_apply", "masks", "models", "modularize",
           "modularize_init", "modularize_step", "module_stats", "trace"]
