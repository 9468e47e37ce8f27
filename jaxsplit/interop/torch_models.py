"""PyTorch modules with the reference (CNNSplitter) layer layout, and a generic builder.

`TorchSimCNN` and `TorchResCNN` are written from docs/method.md §1 on their own (not built from
jaxsplit's layer table), so that converting their weights into a jaxsplit `ConvNet` and
comparing logits is an independent check of both the conversion and jaxsplit's models.
Their `state_dict` keys are exactly the reference's:

- SimCNN: `conv_0` … `conv_12` (`nn.Conv2d`), `fc_13`, `fc_14`, `fc_15` (`nn.Linear`).
- ResCNN: `conv_0.0` … `conv_11.0` (the `nn.Conv2d` inside each block's `nn.Sequential`),
  `classifier.2` (the `nn.Linear` after `nn.Flatten` and `nn.Dropout`).

`torch_model_from_jax` builds a `TorchConvNet` for any jaxsplit `ConvNet`, including weak
CNNs and extracted modules with arbitrary per-layer widths, in either naming style
("simcnn": flat `conv_i` / `fc_j`; "rescnn": `conv_i.0` / `classifier.{2 + 3j}`).

Layout is NCHW; the head flattens the last map in NCHW order (`c*H*W + h*W + w`).
This module imports torch: only `jaxsplit.interop` and `benchmarks` may.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from jaxsplit.models.convnet import ConvNet

# docs/method.md §1, restated here on purpose (see the module docstring).
SIMCNN_CONV_WIDTHS = (64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512)
SIMCNN_POOL_AFTER = frozenset({2, 4, 7, 10, 13})  # 1-based conv numbers
SIMCNN_HIDDEN = 512
# (out, pool) per ResCNN block; residual adds 4 += 2, 8 += 6, 12 += 10 (1-based).
RESCNN_LAYOUT = (
    (64, False), (128, True), (128, False), (128, False), (256, True), (512, True),
    (512, False), (512, False), (512, True), (512, True), (512, False), (512, False),
)
RESCNN_ADDS = {4: 2, 8: 6, 12: 10}

STYLES = ("simcnn", "rescnn")


def scaled_width(width: int, multiplier: float) -> int:
    """`max(1, round(width * multiplier))`, the rule jaxsplit's factories use."""
    if multiplier <= 0:
        raise ValueError(f"width multiplier must be > 0, got {multiplier}")
    return max(1, int(round(width * multiplier)))


def _check_widths(widths: Sequence[int] | None, default: Sequence[int], multiplier: float,
                  what: str) -> tuple[int, ...]:
    if widths is None:
        return tuple(scaled_width(w, multiplier) for w in default)
    widths = tuple(int(w) for w in widths)
    if len(widths) != len(default) or min(widths) < 1:
        raise ValueError(f"{what} widths {widths}: expected {len(default)} positive ints")
    return widths


def _spatial_after_pools(image_size: int, num_pools: int) -> int:
    size = image_size
    for _ in range(num_pools):
        size //= 2
    if size < 1:
        raise ValueError(f"image_size {image_size} is too small for {num_pools} 2x2 pools")
    return size


def _apply_mask(h: torch.Tensor, masks: Mapping[str, torch.Tensor] | None,
                name: str) -> torch.Tensor:
    """Multiply an NCHW activation by a per-channel mask `(K,)` (if one is given)."""
    if masks is None:
        return h
    m = torch.as_tensor(masks[name], device=h.device)
    if m.shape != (h.shape[1],):
        raise ValueError(f"mask {name!r} has shape {tuple(m.shape)}; expected ({h.shape[1]},)")
    return h * m.to(h.dtype).view(1, -1, 1, 1)


class TorchSimCNN(nn.Module):
    """The reference SimCNN (VGG16-like, no BatchNorm), NCHW.

    13 conv 3x3/pad 1 + ReLU, 2x2 max-pool after convs 2, 4, 7, 10, 13 (1-based), then
    dropout → fc_13 → ReLU → dropout → fc_14 → ReLU → fc_15.

    Args:
      num_classes: outputs of fc_15.
      in_channels: image channels (1 or 3).
      width: multiplier on every width (conv and hidden), jaxsplit's rounding.
      image_size: input height = width (32 in the reference; a multiple of 32 keeps the
        last map square and non-empty).
      dropout: rate of both dropouts.
      widths: optional explicit 13 conv widths (overrides `width` for the convs).
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 3, width: float = 1.0,
                 image_size: int = 32, dropout: float = 0.5,
                 widths: Sequence[int] | None = None):
        super().__init__()
        self.widths = _check_widths(widths, SIMCNN_CONV_WIDTHS, width, "SimCNN conv")
        self.pools = tuple((i + 1) in SIMCNN_POOL_AFTER for i in range(13))
        c_in = in_channels
        for i, c_out in enumerate(self.widths):
            setattr(self, f"conv_{i}", nn.Conv2d(c_in, c_out, kernel_size=3, padding=1))
            c_in = c_out
        side = _spatial_after_pools(image_size, len(SIMCNN_POOL_AFTER))
        hidden = scaled_width(SIMCNN_HIDDEN, width)
        self.fc_13 = nn.Linear(c_in * side * side, hidden)
        self.fc_14 = nn.Linear(hidden, hidden)
        self.fc_15 = nn.Linear(hidden, num_classes)
        self.dropout = nn.Dropout(dropout)
        self.pool = nn.MaxPool2d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits `(N, C)` of images `(N, in_channels, H, W)`."""
        h = x
        for i, pool in enumerate(self.pools):
            h = torch.relu(getattr(self, f"conv_{i}")(h))
            if pool:
                h = self.pool(h)
        h = torch.flatten(h, 1)  # NCHW order, as in the reference
        h = torch.relu(self.fc_13(self.dropout(h)))
        h = torch.relu(self.fc_14(self.dropout(h)))
        return self.fc_15(h)


class TorchResCNN(nn.Module):
    """The reference ResCNN (12 conv blocks, 3 residual adds), NCHW.

    Block i is `conv_i = Sequential(Conv2d 3x3 pad 1, ReLU[, MaxPool2d(2)])`; the output
    of block 4 (after its pool, 1-based) gets block 2's output added, 8 gets 6, 12 gets 10.
    `classifier = Sequential(Flatten, Dropout(dropout), Linear)`.

    Args:
      num_classes: outputs of the Linear.
      in_channels: image channels (1 or 3).
      width: multiplier on every conv width, jaxsplit's rounding.
      image_size: input height = width.
      dropout: rate of the classifier's dropout (0.4 in the reference).
      widths: optional explicit 12 block widths; tied blocks (2/4, 6/8, 10/12) must match.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 3, width: float = 1.0,
                 image_size: int = 32, dropout: float = 0.4,
                 widths: Sequence[int] | None = None):
        super().__init__()
        self.widths = _check_widths(widths, [c for c, _ in RESCNN_LAYOUT], width, "ResCNN block")
        for dst, src in RESCNN_ADDS.items():
            if self.widths[dst - 1] != self.widths[src - 1]:
                raise ValueError(f"ResCNN block {dst} adds block {src} but their widths differ "
                                 f"({self.widths[dst - 1]} vs {self.widths[src - 1]})")
        c_in = in_channels
        for i, (c_out, (_, pool)) in enumerate(zip(self.widths, RESCNN_LAYOUT)):
            layers: list[nn.Module] = [nn.Conv2d(c_in, c_out, kernel_size=3, padding=1), nn.ReLU()]
            if pool:
                layers.append(nn.MaxPool2d(2))
            setattr(self, f"conv_{i}", nn.Sequential(*layers))
            c_in = c_out
        side = _spatial_after_pools(image_size, sum(p for _, p in RESCNN_LAYOUT))
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Dropout(dropout), nn.Linear(c_in * side * side, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits `(N, C)` of images `(N, in_channels, H, W)`."""
        outputs: list[torch.Tensor] = []
        h = x
        for i in range(len(RESCNN_LAYOUT)):
            h = getattr(self, f"conv_{i}")(h)
            if (i + 1) in RESCNN_ADDS:
                h = h + outputs[RESCNN_ADDS[i + 1] - 1]
            outputs.append(h)
        return self.classifier(h)


class TorchConvNet(nn.Module):
    """The PyTorch equivalent of a jaxsplit `ConvNet` (any layer table), NCHW.

    Build it with `torch_model_from_jax`. Conv block i: conv 3x3/pad 1 → ReLU →
    (mask) → optional 2x2 max-pool → optional residual add of block `residual_from`'s
    output; then an NCHW flatten and the head (dropout before each Linear when its rate is
    > 0, ReLU between Linears).

    Naming styles:
      "simcnn": `conv_i` is the `nn.Conv2d`, `fc_{num_convs + j}` the head Linears
        (jaxsplit's own parameter names; the reference SimCNN's keys).
      "rescnn": `conv_i = Sequential(Conv2d, ReLU[, MaxPool2d])` and
        `classifier = Sequential(Flatten, Dropout, Linear, ReLU, Dropout, Linear, ...)`,
        so Linear j is `classifier.{2 + 3j}` (the reference ResCNN's keys for one Linear).
    """

    def __init__(self, model: ConvNet, style: str = "simcnn"):
        super().__init__()
        if style not in STYLES:
            raise ValueError(f"style {style!r}: expected one of {STYLES}")
        self.style = style
        self.layers = tuple((d.features, d.pool, d.residual_from) for d in model.convs)
        spec = model.conv_spec()  # also validates residual widths
        c_in = model.in_channels
        for i, (c_out, pool, _) in enumerate(self.layers):
            conv = nn.Conv2d(c_in, c_out, kernel_size=3, padding=1)
            if style == "rescnn":
                conv = nn.Sequential(conv, nn.ReLU(), *([nn.MaxPool2d(2)] if pool else []))
            setattr(self, f"conv_{i}", conv)
            c_in = c_out
        widths = model.head_widths()
        rates = tuple(model.head_dropout)
        if len(rates) != len(widths) - 1:
            raise ValueError(f"head_dropout has {len(rates)} rates; expected {len(widths) - 1}")
        self.num_fc = len(widths) - 1
        self.names = tuple(layer.name for layer in spec.layers)
        linears = [nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:])]
        if style == "rescnn":
            parts: list[nn.Module] = [nn.Flatten()]
            for j, (lin, rate) in enumerate(zip(linears, rates)):
                if j > 0:
                    parts.append(nn.ReLU())
                parts += [nn.Dropout(rate), lin]
            self.classifier = nn.Sequential(*parts)
        else:
            self.dropouts = nn.ModuleList(nn.Dropout(r) for r in rates)
            for j, lin in enumerate(linears):
                setattr(self, f"fc_{len(self.layers) + j}", lin)
        self.pool = nn.MaxPool2d(2)

    def forward(self, x: torch.Tensor,
                masks: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
        """Logits `(N, C)` of images `(N, in_channels, H, W)`.

        `masks` (optional) `{conv_name: (K_l,)}` 0/1 multiplies each block's post-ReLU
        activation, like jaxsplit's activation masking. (In the "rescnn" style the pool
        sits inside the block, so the mask is applied after it; a per-channel 0/1 scale
        commutes with max-pool, so the result is the same.)
        """
        outputs: list[torch.Tensor] = []
        h = x
        for i, (_, pool, src) in enumerate(self.layers):
            block = getattr(self, f"conv_{i}")
            if self.style == "rescnn":
                h = _apply_mask(block(h), masks, self.names[i])
            else:
                h = _apply_mask(torch.relu(block(h)), masks, self.names[i])
                if pool:
                    h = self.pool(h)
            if src is not None:
                h = h + outputs[src]
            outputs.append(h)
        if self.style == "rescnn":
            return self.classifier(h)
        h = torch.flatten(h, 1)
        for j in range(self.num_fc):
            h = getattr(self, f"fc_{len(self.layers) + j}")(self.dropouts[j](h))
            if j < self.num_fc - 1:
                h = torch.relu(h)
        return h


def default_style(model: ConvNet) -> str:
    """"rescnn" naming for a model with residual adds, else "simcnn" (flat) naming."""
    return "rescnn" if any(d.residual_from is not None for d in model.convs) else "simcnn"


def torch_model_from_jax(model: ConvNet, style: str = "auto") -> TorchConvNet:
    """A freshly initialised `TorchConvNet` with `model`'s architecture.

    Load jaxsplit weights into it with
    `net.load_state_dict(params_to_state_dict(params, model, style=net.style))`.

    Args:
      model: any jaxsplit `ConvNet` (SimCNN, ResCNN, weak CNN, an extracted module).
      style: "simcnn", "rescnn" or "auto" (`default_style(model)`).
    """
    if not isinstance(model, ConvNet):
        raise TypeError(f"model must be a jaxsplit ConvNet, got {type(model).__name__}")
    if style == "auto":
        style = default_style(model)
    return TorchConvNet(model, style)
