"""Interoperability with the PyTorch reference (CNNSplitter) models.

Importing this package does not import torch (torch is the optional `torch` extra). The
PyTorch code lives in two submodules, imported on first use:

- `jaxsplit.interop.torch`: `state_dict_to_params`, `params_to_state_dict`,
  `load_state_dict`, `save_state_dict`, `model_from_state_dict` (the architecture read off the
  tensors, for pruned modules), `StateDictError`.
- `jaxsplit.interop.torch_models`: `TorchSimCNN`, `TorchResCNN` (the reference layer layout
  and state_dict keys), `TorchConvNet` and `torch_model_from_jax(model)`.

Without torch: `jaxsplit.interop.reference` has `nchw_to_nhwc` / `nhwc_to_nchw` (image batches
between the two layouts) and `genome_to_mask` (one class's mask from a reference genome).

The names above are also reachable as attributes of this package (lazily, PEP 562), e.g.
`jaxsplit.interop.load_state_dict`; without torch installed that access raises ImportError.
"""

from __future__ import annotations

import importlib

_LAZY = {
    "StateDictError": "torch",
    "state_dict_to_params": "torch",
    "params_to_state_dict": "torch",
    "load_state_dict": "torch",
    "save_state_dict": "torch",
    "model_from_state_dict": "torch",
    "nchw_to_nhwc": "reference",
    "nhwc_to_nchw": "reference",
    "genome_to_mask": "reference",
    "TorchSimCNN": "torch_models",
    "TorchResCNN": "torch_models",
    "TorchConvNet": "torch_models",
    "torch_model_from_jax": "torch_models",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in ("torch", "torch_models", "reference"):
        return importlib.import_module(f"{__name__}.{name}")
    if name in _LAZY:
        module = importlib.import_module(f"{__name__}.{_LAZY[name]}")
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
