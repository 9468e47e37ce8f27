"""jaxsplit: modularize trained CNNs into per-class modules and patch weak models with them.

A JAX reimplementation of CNNSplitter (Qi et al., ASE 2022).
"""

__version__ = "0.1.0"

from jaxsplit import masks, models  # noqa: F401
from jaxsplit import modularize  # noqa: F401  (a callable module: jaxsplit.modularize(apply_fn, ...))
from jaxsplit.modularize import (  # noqa: F401
    Modules,
    ModularizeState,
    modularize_init,
    modularize_step,
)
from jaxsplit.search.config import SearchConfig  # noqa: F401
