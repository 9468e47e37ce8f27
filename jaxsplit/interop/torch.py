"""Convert between PyTorch `state_dict`s (reference layout) and jaxsplit params.

Layouts (SPEC §1):

- Conv: torch `weight` is OIHW `(K, C_in, 3, 3)`; jaxsplit `kernel` is HWIO `(3, 3, C_in, K)`.
- Linear: torch `weight` is `(out, in)`; jaxsplit Dense `kernel` is `(in, out)`.
- First Linear of the head: torch flattens the last map `(C, H, W)` in NCHW order (input index
  `c*H*W + h*W + w`); jaxsplit flattens NHWC (`(h*W + w)*C + c`). Its rows are permuted
  accordingly (a no-op for a 1x1 last map, as in 32x32 SimCNN/ResCNN; not for weak CNNs).

Key naming styles:

- "simcnn" (flat): `conv_{i}.weight/.bias` and `fc_{num_convs + j}.weight/.bias`, i.e.
  jaxsplit's own names. The reference SimCNN's keys (`conv_0` … `conv_12`, `fc_13` … `fc_15`);
  also what generic models (weak CNNs, extracted modules) use.
- "rescnn": `conv_{i}.0.weight/.bias` (the Conv2d inside each block's Sequential) and
  `classifier.{2 + 3j}.weight/.bias` (the reference ResCNN's `classifier.2` for one Linear).

`state_dict_to_params` detects the style from the keys; `params_to_state_dict` takes it as an
option ("auto": "rescnn" for models with residual adds, else "simcnn").

This module imports torch; `jaxsplit.interop` itself does not (install the `torch` extra).
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np
import torch

from jaxsplit.errors import JaxsplitError
from jaxsplit.interop.torch_models import STYLES, default_style
from jaxsplit.models.convnet import ConvNet


class StateDictError(JaxsplitError, ValueError):
    """A state_dict (or params tree) that does not fit the model, or an unreadable file."""


@dataclasses.dataclass(frozen=True)
class _Slot:
    """Where one torch tensor goes in jaxsplit params, and how it is laid out.

    Attributes:
      layer: jaxsplit layer name (`conv_3`, `fc_13`).
      leaf: `kernel` or `bias`.
      torch_shape: the tensor's shape in the state_dict.
      kind: "conv" (OIHW <-> HWIO), "dense" ((out, in) <-> (in, out)), "dense_nchw" (the
        same plus the NCHW -> NHWC row permutation, `chw` = (C, H, W) of the flattened map),
        or "bias".
    """

    layer: str
    leaf: str
    torch_shape: tuple[int, ...]
    kind: str
    chw: tuple[int, int, int] | None = None

    @property
    def jax_shape(self) -> tuple[int, ...]:
        if self.kind == "conv":
            o, i, kh, kw = self.torch_shape
            return (kh, kw, i, o)
        if self.kind in ("dense", "dense_nchw"):
            return self.torch_shape[::-1]
        return self.torch_shape


def _check_model(model: Any) -> None:
    if not isinstance(model, ConvNet):
        raise TypeError(f"model must be a jaxsplit ConvNet, got {type(model).__name__}")


def _resolve_style(style: str, model: ConvNet) -> str:
    if style == "auto":
        return default_style(model)
    if style not in STYLES:
        raise ValueError(f"style {style!r}: expected 'auto' or one of {STYLES}")
    return style


def layout(model: ConvNet, style: str = "auto") -> dict[str, _Slot]:
    """The expected state_dict of `model` in a naming style: `{key: slot}`, in order."""
    _check_model(model)
    style = _resolve_style(style, model)
    spec = model.conv_spec()
    slots: dict[str, _Slot] = {}
    for layer in spec.layers:
        prefix = f"{layer.name}.0" if style == "rescnn" else layer.name
        slots[f"{prefix}.weight"] = _Slot(
            layer.name, "kernel", (layer.num_kernels, layer.in_channels, 3, 3), "conv")
        slots[f"{prefix}.bias"] = _Slot(layer.name, "bias", (layer.num_kernels,), "bias")
    widths = model.head_widths()
    last_c = model.convs[-1].features if model.convs else model.in_channels
    chw = (last_c, *spec.head_in_hw)
    num_convs = len(model.convs)
    for j, (n_in, n_out) in enumerate(zip(widths[:-1], widths[1:])):
        name = f"fc_{num_convs + j}"
        prefix = f"classifier.{2 + 3 * j}" if style == "rescnn" else name
        kind, kchw = ("dense_nchw", chw) if j == 0 else ("dense", None)
        slots[f"{prefix}.weight"] = _Slot(name, "kernel", (n_out, n_in), kind, kchw)
        slots[f"{prefix}.bias"] = _Slot(name, "bias", (n_out,), "bias")
    return slots


_RESCNN_KEY = re.compile(r"^(conv_\d+\.0|classifier\.\d+)\.(weight|bias)$")


def detect_style(keys) -> str:
    """"rescnn" if any key has the ResCNN form (`conv_i.0.*`, `classifier.k.*`), else "simcnn"."""
    return "rescnn" if any(_RESCNN_KEY.match(k) for k in keys) else "simcnn"


def _to_numpy(value: Any, key: str) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", torch.float32).numpy()
    if isinstance(value, np.ndarray):
        return value.astype(np.float32, copy=False)
    raise StateDictError(f"state_dict[{key!r}] is a {type(value).__name__}; expected a tensor")


def _check_keys_and_shapes(found: Mapping[str, tuple[int, ...]], expected: Mapping[str, tuple],
                           what: str, model: ConvNet, style: str) -> None:
    """Raise one error listing every missing, unexpected and mis-shaped entry."""
    problems = []
    for key, shape in expected.items():
        if key not in found:
            problems.append(f"missing {key!r} (expected shape {tuple(shape)})")
        elif tuple(found[key]) != tuple(shape):
            problems.append(f"{key!r} has shape {tuple(found[key])}, expected {tuple(shape)}")
    problems += [f"unexpected {key!r} (shape {tuple(found[key])})"
                 for key in found if key not in expected]
    if problems:
        raise StateDictError(
            f"{what} does not fit the model ({len(model.convs)} convs, {style!r} naming, "
            f"{len(problems)} problem(s)):\n  " + "\n  ".join(problems))


def state_dict_to_params(state_dict: Mapping[str, Any], model: ConvNet,
                         style: str = "auto") -> dict:
    """jaxsplit params of `model` from a PyTorch `state_dict`.

    Args:
      state_dict: `{key: tensor}` in "simcnn" or "rescnn" naming (module docstring); torch
        tensors or numpy arrays, any float dtype (converted to float32).
      model: the jaxsplit `ConvNet` the weights are for.
      style: "auto" (detect from the keys), "simcnn" or "rescnn".

    Returns:
      the inner params dict `{conv_i: {kernel (3, 3, C_in, K), bias (K,)},
      fc_j: {kernel (in, out), bias (out,)}}` of float32 jax arrays.

    Raises:
      StateDictError: naming every missing, unexpected or mis-shaped tensor and the expected
        shape.
    """
    _check_model(model)
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"state_dict must be a mapping, got {type(state_dict).__name__}")
    if style == "auto":
        style = detect_style(state_dict.keys())
    slots = layout(model, style)
    arrays = {str(k): _to_numpy(v, str(k)) for k, v in state_dict.items()}
    _check_keys_and_shapes({k: a.shape for k, a in arrays.items()},
                           {k: s.torch_shape for k, s in slots.items()}, "state_dict", model, style)
    params: dict[str, dict[str, jnp.ndarray]] = {}
    for key, slot in slots.items():
        params.setdefault(slot.layer, {})[slot.leaf] = jnp.asarray(_torch_to_jax(arrays[key], slot))
    return params


def params_to_state_dict(params: Mapping[str, Any], model: ConvNet,
                         style: str = "auto") -> dict[str, torch.Tensor]:
    """A PyTorch `state_dict` of jaxsplit params (the inverse of `state_dict_to_params`).

    Args:
      params: the inner params dict of `model` (as from `init_params` or training).
      model: the jaxsplit `ConvNet`.
      style: "simcnn", "rescnn" or "auto" ("rescnn" if the model has residual adds).

    Returns:
      `{key: float32 CPU tensor}` in the style's key order; loads into
      `torch_model_from_jax(model, style)` (and into `TorchSimCNN` / `TorchResCNN` for the
      matching families) with `strict=True`.
    """
    _check_model(model)
    style = _resolve_style(style, model)
    slots = layout(model, style)
    found: dict[str, tuple[int, ...]] = {}
    leaves: dict[str, np.ndarray] = {}
    for layer, sub in params.items():
        if not isinstance(sub, Mapping):
            raise StateDictError(f"params[{layer!r}] is a {type(sub).__name__}; expected a dict")
        for leaf, value in sub.items():
            found[f"{layer}/{leaf}"] = tuple(np.shape(value))
            leaves[f"{layer}/{leaf}"] = value
    _check_keys_and_shapes(found, {f"{s.layer}/{s.leaf}": s.jax_shape for s in slots.values()},
                           "params", model, style)
    return {
        key: torch.from_numpy(np.array(  # a writable, C-ordered copy
            _jax_to_torch(np.asarray(leaves[f"{slot.layer}/{slot.leaf}"], np.float32), slot),
            order="C", copy=True))
        for key, slot in slots.items()
    }


def _torch_to_jax(a: np.ndarray, slot: _Slot) -> np.ndarray:
    if slot.kind == "conv":
        return a.transpose(2, 3, 1, 0)  # OIHW -> HWIO
    if slot.kind == "dense":
        return a.T
    if slot.kind == "dense_nchw":
        c, h, w = slot.chw
        n_out = a.shape[0]
        # (out, C*H*W) -> (out, C, H, W) -> (H, W, C, out) -> (H*W*C, out)
        return a.reshape(n_out, c, h, w).transpose(2, 3, 1, 0).reshape(h * w * c, n_out)
    return a


def _jax_to_torch(a: np.ndarray, slot: _Slot) -> np.ndarray:
    if slot.kind == "conv":
        return a.transpose(3, 2, 0, 1)  # HWIO -> OIHW
    if slot.kind == "dense":
        return a.T
    if slot.kind == "dense_nchw":
        c, h, w = slot.chw
        n_out = a.shape[1]
        # (H*W*C, out) -> (H, W, C, out) -> (out, C, H, W) -> (out, C*H*W)
        return a.reshape(h, w, c, n_out).transpose(3, 2, 0, 1).reshape(n_out, c * h * w)
    return a


# -- files (the I/O edge) ------------------------------------------------------------------

WRAPPER_KEYS = ("state_dict", "model")


def _unwrap(obj: Any, path: str) -> Mapping[str, Any]:
    """The state_dict inside a loaded checkpoint object.

    Accepted: a bare state_dict; a dict holding it under "state_dict" or "model" (common
    training-checkpoint wrappers); keys all prefixed "module." (nn.DataParallel) are stripped.
    """
    if not isinstance(obj, Mapping):
        raise StateDictError(f"{path}: holds a {type(obj).__name__}; expected a state_dict")
    for key in WRAPPER_KEYS:
        if isinstance(obj.get(key), Mapping):
            obj = obj[key]
            break
    keys = list(obj.keys())
    if keys and all(isinstance(k, str) and k.startswith("module.") for k in keys):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return obj


def load_state_dict(path: str | os.PathLike, model: ConvNet, style: str = "auto") -> dict:
    """jaxsplit params of `model` from a PyTorch `.pth`/`.pt` file.

    Reads with `torch.load(path, map_location="cpu", weights_only=True)` (no pickled code is
    run). The file may hold a bare state_dict, or a dict with it under "state_dict" or
    "model"; a "module." prefix on every key (nn.DataParallel) is dropped.

    Raises:
      FileNotFoundError: no such file.
      StateDictError: the file cannot be read as a torch checkpoint, or its tensors do not
        fit `model` (see `state_dict_to_params`); the message names the path.
    """
    _check_model(model)
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no PyTorch state_dict file at {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types (pickle, zip, RuntimeError) for bad files
        raise StateDictError(f"could not read a PyTorch state_dict from {path}: "
                             f"{type(e).__name__}: {e}") from e
    try:
        return state_dict_to_params(_unwrap(obj, path), model, style)
    except StateDictError as e:
        raise StateDictError(f"{path}: {e}") from e


def save_state_dict(params: Mapping[str, Any], model: ConvNet, path: str | os.PathLike,
                    style: str = "auto") -> None:
    """Write `params_to_state_dict(params, model, style)` to `path` with `torch.save`.

    The parent folder is created if needed.
    """
    state_dict = params_to_state_dict(params, model, style)
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    torch.save(state_dict, path)
