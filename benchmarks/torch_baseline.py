"""The reference's way of computing the logit table L, in PyTorch (the performance baseline).

CNNSplitter evaluates a population one individual at a time: for each (class c, mask) it
physically extracts the module (docs/method.md §7) — a smaller network with only the kept kernels —
and runs the valid images through it, keeping the class-c logit. This file does the same,
written from docs/method.md (not from the reference's code), on the *same* weights as jaxsplit
(exported with `jaxsplit.interop.torch.params_to_state_dict`) and the same masks, so its
`L (C, P, N)` can be compared with jaxsplit's evaluators value for value and in speed.

Extraction of one module (generic over jaxsplit's layer table, SimCNN / ResCNN / weak CNNs):

- conv l keeps output kernels `k_l = flatnonzero(mask_l)` (weights and bias rows), and the
  input channels the previous layer kept (`k_{l-1}`; all image channels for conv 0);
- a residual add (`residual_from`) needs the same kept set on both sides (tied masks, docs/method.md §1);
- the first Linear keeps the input columns of the kept channels of the last map in the NCHW
  flatten order (`c*H*W + h*W + w`); the other Linears are kept whole except the last, which
  keeps only row `class c` (the module's single output);
- layers are `nn.Conv2d` / `nn.Linear` built without random init (`torch.nn.utils.skip_init`)
  and given the sliced weights; the forward pass runs under `torch.no_grad()` in eval mode
  (no dropout).

    sys.path.insert(0, "benchmarks")          # benchmarks/ is a folder of scripts, not a package
    from torch_baseline import torch_logit_table
    state_dict = params_to_state_dict(params, model)
    L = torch_logit_table(model, state_dict, masks, images, classes)   # numpy (C, P, N)

Needs the `torch` extra (only `benchmarks/` and `jaxsplit/interop/` import torch).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from jaxsplit.interop.torch import layout, params_to_state_dict
from jaxsplit.models.convnet import ConvNet

DEFAULT_BATCH_SIZE = 256


class ExtractionError(ValueError):
    """A mask that cannot be extracted (empty layer, untied residual masks, bad shape)."""


def _layer_tensors(model: ConvNet, state_dict: Mapping[str, torch.Tensor],
                   style: str) -> dict[str, dict[str, torch.Tensor]]:
    """`{layer: {"kernel": torch weight, "bias": bias}}` from a state_dict in either naming."""
    slots = layout(model, style)
    missing = [k for k in slots if k not in state_dict]
    if missing:
        raise KeyError(f"state_dict lacks {missing[:4]} (expected {style!r} naming of this model)")
    out: dict[str, dict[str, torch.Tensor]] = {}
    for key, slot in slots.items():
        out.setdefault(slot.layer, {})[slot.leaf] = state_dict[key].detach().to(torch.float32)
    return out


class ExtractedModule(nn.Module):
    """A physically extracted module: smaller convs, the sliced head, one output.

    Attributes:
      convs: `nn.ModuleList` of `nn.Conv2d` (3x3, padding 1) with the kept kernels.
      pools: per conv, whether a 2x2 max-pool follows.
      residual_from: per conv, the index of the block whose output is added, or None.
      fcs: `nn.ModuleList` of `nn.Linear`; ReLU between them; the last has one output.
    """

    def __init__(self, convs: Sequence[nn.Conv2d], pools: Sequence[bool],
                 residual_from: Sequence[int | None], fcs: Sequence[nn.Linear]):
        super().__init__()
        self.convs = nn.ModuleList(convs)
        self.pools = tuple(bool(p) for p in pools)
        self.residual_from = tuple(residual_from)
        self.fcs = nn.ModuleList(fcs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The module's logit `(N,)` for images `(N, C_in, H, W)`."""
        outputs: list[torch.Tensor] = []
        h = x
        for conv, pool, src in zip(self.convs, self.pools, self.residual_from):
            h = torch.relu(conv(h))
            if pool:
                h = nn.functional.max_pool2d(h, 2)
            if src is not None:
                h = h + outputs[src]
            outputs.append(h)
        h = torch.flatten(h, 1)  # NCHW order, as the reference
        for j, fc in enumerate(self.fcs):
            h = fc(h)
            if j < len(self.fcs) - 1:
                h = torch.relu(h)
        return h[:, 0]


def _conv(weight: torch.Tensor, bias: torch.Tensor) -> nn.Conv2d:
    conv = nn.utils.skip_init(nn.Conv2d, weight.shape[1], weight.shape[0], 3, padding=1,
                              device=weight.device)
    conv.weight = nn.Parameter(weight.contiguous(), requires_grad=False)
    conv.bias = nn.Parameter(bias.contiguous(), requires_grad=False)
    return conv


def _linear(weight: torch.Tensor, bias: torch.Tensor) -> nn.Linear:
    fc = nn.utils.skip_init(nn.Linear, weight.shape[1], weight.shape[0], device=weight.device)
    fc.weight = nn.Parameter(weight.contiguous(), requires_grad=False)
    fc.bias = nn.Parameter(bias.contiguous(), requires_grad=False)
    return fc


def kept_indices(model: ConvNet, mask: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """`{conv_name: sorted kept kernel indices}` of one mask `{conv_name: bool (K_l,)}`.

    Raises:
      ExtractionError: a missing layer, a wrong length, an empty layer, or a residual add
        whose two sides keep different kernels.
    """
    spec = model.conv_spec()
    out = {}
    for layer in spec.layers:
        if layer.name not in mask:
            raise ExtractionError(f"mask has no entry {layer.name!r}; expected {spec.names}")
        m = np.asarray(mask[layer.name]).astype(bool)
        if m.shape != (layer.num_kernels,):
            raise ExtractionError(f"mask {layer.name!r} has shape {m.shape}; expected "
                                  f"({layer.num_kernels},)")
        idx = np.flatnonzero(m)
        if idx.size == 0:
            raise ExtractionError(f"mask {layer.name!r} keeps no kernel; a module needs >= 1 "
                                  f"per layer")
        if layer.residual_from is not None and not np.array_equal(idx, out[layer.residual_from]):
            raise ExtractionError(
                f"{layer.name} adds {layer.residual_from}'s output but their masks differ; "
                f"tie them (jaxsplit.masks.tie)")
        out[layer.name] = idx
    return out


def extract_module(model: ConvNet, tensors: Mapping[str, Mapping[str, torch.Tensor]],
                   mask: Mapping[str, Any], class_id: int) -> ExtractedModule:
    """The physically extracted module of class `class_id` for one mask (docs/method.md §7).

    Args:
      model: the jaxsplit `ConvNet` (its layer table drives the extraction).
      tensors: `{layer: {"kernel": torch weight (OIHW / (out, in)), "bias": ...}}`
        (`layer_tensors(model, state_dict)`).
      mask: `{conv_name: bool (K_l,)}`.
      class_id: the output row kept in the last Linear.
    """
    spec = model.conv_spec()
    kept = kept_indices(model, mask)
    convs, prev = [], None
    for layer in spec.layers:
        w, b = tensors[layer.name]["kernel"], tensors[layer.name]["bias"]
        idx = torch.from_numpy(kept[layer.name]).to(w.device)
        w = w.index_select(0, idx)
        if prev is not None:
            w = w.index_select(1, prev)
        convs.append(_conv(w, b.index_select(0, idx)))
        prev = idx
    num_convs = len(spec.layers)
    widths = model.head_widths()
    h, w_ = spec.head_in_hw
    fcs = []
    for j in range(len(widths) - 1):
        name = f"fc_{num_convs + j}"
        weight, bias = tensors[name]["kernel"], tensors[name]["bias"]
        if j == 0:  # input columns of the kept channels, NCHW flatten order
            n_out = weight.shape[0]
            weight = weight.reshape(n_out, -1, h, w_).index_select(1, prev).reshape(n_out, -1)
        if j == len(widths) - 2:  # the module's single output
            row = torch.tensor([int(class_id)], device=weight.device)
            weight, bias = weight.index_select(0, row), bias.index_select(0, row)
        fcs.append(_linear(weight, bias))
    module = ExtractedModule(convs, [l.pool for l in spec.layers],
                             [None if l.residual_from is None else spec.names.index(l.residual_from)
                              for l in spec.layers], fcs)
    return module.eval()


def layer_tensors(model: ConvNet, state_dict: Mapping[str, torch.Tensor], style: str = "auto",
                  device: torch.device | str | None = None) -> dict[str, dict[str, torch.Tensor]]:
    """Group a state_dict (from `params_to_state_dict`, "simcnn" or "rescnn" naming) by layer,
    on `device` (default: where the tensors are)."""
    from jaxsplit.interop.torch import detect_style

    if style == "auto":
        style = detect_style(state_dict.keys())
    tensors = _layer_tensors(model, state_dict, style)
    if device is not None:
        tensors = {k: {leaf: t.to(device) for leaf, t in v.items()} for k, v in tensors.items()}
    return tensors


def default_device() -> torch.device:
    """CUDA when torch sees a GPU, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def to_nchw(images: Any) -> torch.Tensor:
    """Float32 NCHW tensor of NHWC images `(N, H, W, C)` (numpy or jax)."""
    x = np.asarray(images, np.float32)
    if x.ndim != 4:
        raise ValueError(f"images have shape {x.shape}; expected (N, H, W, C)")
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def torch_logit_table(model: ConvNet, state_dict: Mapping[str, torch.Tensor],
                      masks: Mapping[str, Any], images: Any, classes: Sequence[int], *,
                      batch_size: int = DEFAULT_BATCH_SIZE,
                      timings: dict[str, float] | None = None,
                      device: torch.device | str | None = None) -> np.ndarray:
    """L by the reference's loop: extract each module, forward the images in batches.

    Args:
      model: the jaxsplit `ConvNet` the weights belong to.
      state_dict: `params_to_state_dict(params, model)` (either naming style).
      masks: `{conv_name: bool[C, P, K_l]}` (numpy or jax), tied residual masks.
      images: `(N, H, W, C_in)` float32 NHWC, or an NCHW `torch.Tensor` (already converted).
      classes: `(C,)` the class id of each mask row.
      batch_size: images per forward pass.
      timings: optional dict; receives "extract_s" and "forward_s" (summed over modules).
      device: where to run (default `default_device()`: CUDA if available). Weights and
        images are moved there once per call; each module's logits come back to the host
        after its last batch (which also synchronises a GPU).

    Returns:
      `L (C, P, N)` float32 numpy: `L[c, i, n]` = logit `classes[c]` of module (c, i) on image n.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = default_device() if device is None else torch.device(device)
    tensors = layer_tensors(model, state_dict, device=device)
    x = (images if isinstance(images, torch.Tensor) else to_nchw(images)).to(device)
    np_masks = {k: np.asarray(v).astype(bool) for k, v in masks.items()}
    first = np_masks[model.conv_spec().names[0]]
    if first.ndim != 3:
        raise ValueError(f"masks need shape (C, P, K_l), got {first.shape} for the first layer")
    num_rows, num_individuals = first.shape[:2]
    classes = [int(c) for c in np.asarray(classes).reshape(-1)]
    if len(classes) != num_rows:
        raise ValueError(f"classes has {len(classes)} entries; expected C = {num_rows}")
    num_images = int(x.shape[0])
    out = np.empty((num_rows, num_individuals, num_images), np.float32)
    t_extract = t_forward = 0.0
    with torch.no_grad():
        for c in range(num_rows):
            for i in range(num_individuals):
                t0 = time.perf_counter()
                module = extract_module(model, tensors, {k: v[c, i] for k, v in np_masks.items()},
                                        classes[c])
                t1 = time.perf_counter()
                logits = torch.cat([module(x[start:start + batch_size])
                                    for start in range(0, num_images, batch_size)])
                out[c, i] = logits.cpu().numpy()
                t_extract += t1 - t0
                t_forward += time.perf_counter() - t1
    if timings is not None:
        timings["extract_s"] = timings.get("extract_s", 0.0) + t_extract
        timings["forward_s"] = timings.get("forward_s", 0.0) + t_forward
    return out


class TorchLoopEvaluator:
    """The PyTorch loop behind jaxsplit's evaluator contract (for side-by-side use).

    `evaluate_fn(variables, masks, images, classes) -> L (C, P, N)` numpy (`variables`:
    `{"params": params}`, or the inner params); the params are exported once per params object
    (`params_to_state_dict`) and cached.
    """

    def __init__(self, model: ConvNet, *, batch_size: int = DEFAULT_BATCH_SIZE):
        self.model = model
        self.batch_size = batch_size
        self._cache: tuple[Any, Mapping[str, torch.Tensor]] | None = None

    def __call__(self, params, masks, images, classes) -> np.ndarray:
        if isinstance(params, Mapping) and set(params) == {"params"}:
            params = params["params"]
        if self._cache is None or self._cache[0] is not params:
            self._cache = (params, params_to_state_dict(params, self.model))
        return torch_logit_table(self.model, self._cache[1], masks, images, classes,
                                 batch_size=self.batch_size)
