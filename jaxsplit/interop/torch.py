"""Convert between PyTorch `state_dict`s (reference layout) and jaxsplit params.

Layouts (docs/method.md §1):

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

`model_from_state_dict` reads the architecture off the tensors (every layer's width, the input
channels, the head widths and the class count), so a pruned reference module, whose layers
keep fewer kernels than the model's, loads without building its `ConvNet` by hand:
`model, params = load_state_dict("module_3.pth")`.

This module imports torch; `jaxsplit.interop` itself does not (install the `torch` extra).
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np
import torch

from jaxsplit.errors import JaxsplitError
from jaxsplit.interop.torch_models import (
    RESCNN_ADDS,
    RESCNN_LAYOUT,
    SIMCNN_CONV_WIDTHS,
    SIMCNN_POOL_AFTER,
    STYLES,
    default_style,
)
from jaxsplit.models.convnet import ConvLayerDef, ConvNet


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


def load_state_dict(path: str | os.PathLike, model: ConvNet | None = None, style: str = "auto",
                    *, family: str = "auto", image_size: int | None = None):
    """jaxsplit params from a PyTorch `.pth`/`.pt` file.

    Reads with `torch.load(path, map_location="cpu", weights_only=True)` (no pickled code is
    run). The file may hold a bare state_dict, or a dict with it under "state_dict" or
    "model"; a "module." prefix on every key (nn.DataParallel) is dropped.

    Args:
      path: the file.
      model: the `ConvNet` the weights are for; None to infer it from the tensors
        (`model_from_state_dict`), e.g. for a reference module with pruned layers.
      style: key naming, "auto", "simcnn" or "rescnn".
      family, image_size: passed to `model_from_state_dict` when `model` is None.

    Returns:
      `params` when `model` is given; `(model, params)` when it was inferred.

    Raises:
      FileNotFoundError: no such file.
      StateDictError: the file cannot be read as a torch checkpoint, or its tensors do not
        fit `model` (see `state_dict_to_params`) or no model can be inferred from them; the
        message names the path.
    """
    if model is not None:
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
        state_dict = _unwrap(obj, path)
        if model is None:
            inferred = model_from_state_dict(state_dict, family=family, image_size=image_size,
                                             style=style)
            return inferred, state_dict_to_params(state_dict, inferred, style)
        return state_dict_to_params(state_dict, model, style)
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


# -- inferring the architecture from the tensors --------------------------------------------

_FLAT_CONV = re.compile(r"^conv_(\d+)\.(weight|bias)$")
_RES_CONV = re.compile(r"^conv_(\d+)\.0\.(weight|bias)$")
_FLAT_FC = re.compile(r"^fc_(\d+)\.(weight|bias)$")
_RES_FC = re.compile(r"^classifier\.(\d+)\.(weight|bias)$")
FAMILIES = ("auto", "simcnn", "rescnn", "weak_cnn")


def _indexed(shapes: Mapping[str, tuple[int, ...]],
             pattern: re.Pattern) -> tuple[list[tuple[int, ...]], list[int]]:
    """`(weight shapes, indices)` of the `weight` keys matching `pattern`, by ascending index."""
    found = {}
    for key, shape in shapes.items():
        m = pattern.match(key)
        if m and m.group(2) == "weight":
            found[int(m.group(1))] = tuple(shape)
    return [found[i] for i in sorted(found)], sorted(found)


def model_from_state_dict(state_dict: Mapping[str, Any], family: str = "auto",
                          image_size: int | None = None, style: str = "auto") -> ConvNet:
    """The jaxsplit `ConvNet` whose parameters have the shapes of `state_dict`'s tensors.

    Every conv layer's width comes from its `weight` (`(K, C_in, 3, 3)`), the input channels
    from the first conv, the head widths and the class count from the Linear weights. So a
    module of the reference (its layers keep fewer kernels; its last Linear still has all N
    outputs) or one of jaxsplit's extracted modules loads as it is.

    Which convs are followed by a 2x2 pool, and the residual adds, come from the family:
    "simcnn" (13 convs; pools after convs 2, 4, 7, 10, 13), "rescnn" (12 blocks; the
    reference's pools and adds 4 += 2, 8 += 6, 12 += 10) or "weak_cnn" (a pool after every
    conv). "auto" takes "rescnn" for the ResCNN key naming, "simcnn" for 13 flat convs and
    "weak_cnn" otherwise.

    Args:
      state_dict: `{key: tensor or array}` in either naming style (module docstring).
      family: "auto", "simcnn", "rescnn" or "weak_cnn".
      image_size: input height = width; None infers it from the first Linear's input size
        (32 for the reference's models).
      style: "auto" (from the keys), "simcnn" or "rescnn".

    Returns:
      A `ConvNet` (dropout rates of the family; they do not change inference).

    Raises:
      StateDictError: no conv weights, gaps in the layer numbers, widths that do not chain,
        a residual add between layers of different widths, or a first Linear whose input size
        fits no image size; the message names the key and the shapes.
    """
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"state_dict must be a mapping, got {type(state_dict).__name__}")
    if family not in FAMILIES:
        raise ValueError(f"family {family!r}: expected one of {FAMILIES}")
    shapes = {str(k): tuple(np.shape(v)) for k, v in state_dict.items()}
    if style == "auto":
        style = detect_style(shapes)
    elif style not in STYLES:
        raise ValueError(f"style {style!r}: expected 'auto' or one of {STYLES}")
    conv_pat, fc_pat = (_RES_CONV, _RES_FC) if style == "rescnn" else (_FLAT_CONV, _FLAT_FC)
    convs, conv_ids = _indexed(shapes, conv_pat)
    if not convs:
        raise StateDictError(f"no conv weights in the state_dict ({style!r} naming: "
                             f"{'conv_i.0.weight' if style == 'rescnn' else 'conv_i.weight'}); "
                             f"keys are {sorted(shapes)[:8]}")
    if conv_ids != list(range(len(convs))):
        raise StateDictError(f"conv layers are numbered {conv_ids}; expected 0..{len(convs) - 1}")
    for i, s in enumerate(convs):
        if len(s) != 4 or s[2:] != (3, 3):
            raise StateDictError(f"conv_{i} weight has shape {s}; expected (K, C_in, 3, 3)")
        if i and s[1] != convs[i - 1][0]:
            raise StateDictError(f"conv_{i} weight has shape {s}: {s[1]} input channels, but "
                                 f"conv_{i - 1} has {convs[i - 1][0]} kernels")
    fcs, fc_ids = _indexed(shapes, fc_pat)
    if not fcs:
        raise StateDictError(f"no Linear weights in the state_dict "
                             f"({'classifier.k.weight' if style == 'rescnn' else 'fc_j.weight'})")
    expected_fc = ([2 + 3 * j for j in range(len(fcs))] if style == "rescnn"
                   else [len(convs) + j for j in range(len(fcs))])
    if fc_ids != expected_fc:
        raise StateDictError(f"Linear layers are numbered {fc_ids}; expected {expected_fc}")
    for j, s in enumerate(fcs):
        if len(s) != 2 or (j and s[1] != fcs[j - 1][0]):
            raise StateDictError(f"Linear {fc_ids[j]} weight has shape {s}; expected "
                                 f"(out, {fcs[j - 1][0] if j else 'in'})")

    if family == "auto":
        family = ("rescnn" if style == "rescnn" else
                  "simcnn" if len(convs) == len(SIMCNN_CONV_WIDTHS) else "weak_cnn")
    widths = [s[0] for s in convs]
    residual: dict[int, int] = {}
    if family == "simcnn":
        if len(convs) != len(SIMCNN_CONV_WIDTHS):
            raise StateDictError(f"family 'simcnn' has {len(SIMCNN_CONV_WIDTHS)} convs; the "
                                 f"state_dict has {len(convs)}")
        pools = [(i + 1) in SIMCNN_POOL_AFTER for i in range(len(convs))]
        dropout = (0.5, 0.5, 0.0) if len(fcs) == 3 else (0.0,) * len(fcs)
    elif family == "rescnn":
        if len(convs) != len(RESCNN_LAYOUT):
            raise StateDictError(f"family 'rescnn' has {len(RESCNN_LAYOUT)} blocks; the "
                                 f"state_dict has {len(convs)}")
        pools = [pool for _, pool in RESCNN_LAYOUT]
        residual = {dst - 1: src - 1 for dst, src in RESCNN_ADDS.items()}
        for dst, src in residual.items():
            if widths[dst] != widths[src]:
                raise StateDictError(
                    f"conv_{dst} ({widths[dst]} kernels) adds conv_{src} ({widths[src]} kernels): "
                    f"a residual add needs equal widths (tied masks)")
        dropout = (0.4,) + (0.0,) * (len(fcs) - 1)
    else:
        pools = [True] * len(convs)
        dropout = (0.0,) * len(fcs)
    num_pools = sum(pools)
    fc_in, last_c = fcs[0][1], widths[-1]
    if fc_in % last_c:
        raise StateDictError(f"first Linear has {fc_in} inputs, not a multiple of the last conv's "
                             f"{last_c} channels")
    hw = math.isqrt(fc_in // last_c)
    if hw * hw * last_c != fc_in:
        raise StateDictError(f"first Linear has {fc_in} inputs = {last_c} channels x "
                             f"{fc_in // last_c}, not a square map")
    if image_size is None:
        image_size = hw * 2 ** num_pools  # 32 for the reference's models (1x1 after 5 pools)
    if image_size // 2 ** num_pools != hw:
        raise StateDictError(f"first Linear has {fc_in} inputs = {last_c} x {hw}x{hw}; a "
                             f"{image_size}x{image_size} image after {num_pools} pools gives "
                             f"{image_size // 2 ** num_pools}x{image_size // 2 ** num_pools}")
    layers = tuple(ConvLayerDef(w, pool=p, residual_from=residual.get(i))
                   for i, (w, p) in enumerate(zip(widths, pools)))
    return ConvNet(convs=layers, hidden=tuple(s[0] for s in fcs[:-1]), head_dropout=dropout,
                   num_classes=fcs[-1][0], in_channels=convs[0][1], image_size=image_size)

