"""jaxsplit: modularize trained CNNs into per-class modules and patch weak models with them.

A JAX reimplementation of CNNSplitter (Qi et al., ASE 2022).
"""

__version__ = "0.1.0"

from jaxsplit import masks, models  # noqa: F401
