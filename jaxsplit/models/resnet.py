"""ResNets with BatchNorm: one generic `ResNet`, the variants as `functools.partial`s.

The layout follows He et al. (2016) and torchvision's BasicBlock: each block is
conv3x3(stride s) -> BN -> ReLU -> conv3x3 -> BN, plus a shortcut (identity, or a 1x1
conv(stride s) -> BN projection where the shape changes), then ReLU. Convolutions have no
bias (BatchNorm follows every one) and use symmetric padding 1, as PyTorch's `padding=1`, so
stride-2 outputs line up with the reference implementations.

Variants (docs/method.md §1 asks for configurable width and input shape):

* `resnet18`: 4 stages of 2 BasicBlocks, base widths 64-128-256-512.
* `resnet20`: the CIFAR ResNet-20, 3 stages of 3 BasicBlocks, widths 16-32-64 (with
  projection shortcuts where the width changes, instead of the paper's zero padding).

`width` multiplies every width; `in_channels` (1 or 3) and `image_size` set the input. Small
images (`image_size <= 64`, `stem="auto"`) get the CIFAR stem, a 3x3 stride-1 conv; larger
ones the ImageNet stem, a 7x7 stride-2 conv and a 3x3 stride-2 max-pool.

Parameter paths (`params` and `batch_stats` have the same tree):

    stem_conv/kernel, stem_bn/{scale,bias}
    stage1/block0/{conv1,bn1,conv2,bn2}/...
    stage2/block0/{shortcut_conv,shortcut_bn}/...  (where the shape changes)
    head/{kernel,bias}

Stages count from 1 (`stage1` .. `stage4`, as torchvision's `layer1` ..), blocks from 0.
Layout is NHWC; conv kernels are HWIO.
"""

from __future__ import annotations

import functools
from typing import Literal

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxsplit.models.convnet import ModelInputError, _scale

__all__ = ["BasicBlock", "ResNetStage", "ResNet", "resnet18", "resnet20", "BN_MOMENTUM",
           "BN_EPSILON", "SMALL_IMAGE_MAX"]

# PyTorch's BatchNorm2d(momentum=0.1, eps=1e-5): flax's momentum is the kept fraction.
BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5
SMALL_IMAGE_MAX = 64  # `stem="auto"`: the CIFAR stem up to this image size


def _batch_norm(train: bool, name: str) -> nn.BatchNorm:
    return nn.BatchNorm(use_running_average=not train, momentum=BN_MOMENTUM, epsilon=BN_EPSILON,
                        name=name)


def _conv(features: int, size: int, strides: int, name: str) -> nn.Conv:
    pad = (size - 1) // 2
    return nn.Conv(features, (size, size), strides=(strides, strides),
                   padding=((pad, pad), (pad, pad)), use_bias=False, name=name)


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers and a shortcut (He et al. 2016, BasicBlock).

    Attributes:
      features: output channels of both convs.
      strides: stride of the first conv (and of the projection shortcut).

    Input `(N, H, W, C_in)`, output `(N, H // strides, W // strides, features)`. The shortcut is
    a 1x1 conv + BN (`shortcut_conv`, `shortcut_bn`) when `strides != 1` or `C_in != features`,
    otherwise the identity.
    """

    features: int
    strides: int = 1

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        y = _conv(self.features, 3, self.strides, "conv1")(x)
        y = nn.relu(_batch_norm(train, "bn1")(y))
        y = _conv(self.features, 3, 1, "conv2")(y)
        y = _batch_norm(train, "bn2")(y)
        shortcut = x
        if self.strides != 1 or x.shape[-1] != self.features:
            shortcut = _conv(self.features, 1, self.strides, "shortcut_conv")(x)
            shortcut = _batch_norm(train, "shortcut_bn")(shortcut)
        return nn.relu(y + shortcut)


class ResNetStage(nn.Module):
    """`num_blocks` blocks (`block0`, `block1`, ...); the first one has stride `strides`."""

    features: int
    num_blocks: int
    strides: int = 1
    block_cls: type[nn.Module] = BasicBlock

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        for i in range(self.num_blocks):
            x = self.block_cls(self.features, self.strides if i == 0 else 1, name=f"block{i}")(
                x, train=train)
        return x


class ResNet(nn.Module):
    """A generic ResNet: stem, stages of residual blocks, global average pool, Dense head.

    Attributes:
      stage_sizes: blocks per stage, e.g. `(2, 2, 2, 2)`.
      stage_widths: base output channels per stage (before `width`).
      stem_width: base output channels of the stem conv.
      block_cls: the block (`BasicBlock`).
      num_classes: outputs of the head.
      in_channels: channels of the input images (1 or 3).
      image_size: height = width of the input images.
      width: multiplier of every width (rounded, at least 1 channel).
      dropout: dropout rate before the head (0: none; needs a `dropout` rng when training).
      stem: `"cifar"` (3x3 stride-1 conv), `"imagenet"` (7x7 stride-2 conv + 3x3 stride-2
        max-pool) or `"auto"` (cifar for `image_size <= 64`).

    Every stage after the first halves the spatial size (stride-2 first block).

    Example:
      >>> model = resnet20(num_classes=10, in_channels=1, width=0.25, image_size=32)
      >>> variables = model.init(jax.random.key(0), model.dummy_input())
      >>> variables["params"]["stage2"]["block0"]["shortcut_conv"]["kernel"].shape
      (1, 1, 4, 8)
      >>> variables["batch_stats"]["stem_bn"]["mean"].shape
      (4,)
    """

    stage_sizes: tuple[int, ...]
    stage_widths: tuple[int, ...]
    stem_width: int
    block_cls: type[nn.Module] = BasicBlock
    num_classes: int = 10
    in_channels: int = 3
    image_size: int = 32
    width: float = 1.0
    dropout: float = 0.0
    stem: Literal["auto", "cifar", "imagenet"] = "auto"

    def dummy_input(self, batch: int = 1) -> jax.Array:
        """Zeros of the model's input shape, `(batch, H, W, C)`."""
        return jnp.zeros((batch, self.image_size, self.image_size, self.in_channels), jnp.float32)

    def stem_kind(self) -> str:
        """`"cifar"` or `"imagenet"` (`stem="auto"` resolved from `image_size`)."""
        if self.stem == "auto":
            return "cifar" if self.image_size <= SMALL_IMAGE_MAX else "imagenet"
        if self.stem not in ("cifar", "imagenet"):
            raise ModelInputError(f"stem must be 'auto', 'cifar' or 'imagenet', got {self.stem!r}")
        return self.stem

    def widths(self) -> tuple[int, tuple[int, ...]]:
        """`(stem channels, per-stage channels)` after the width multiplier."""
        return (_scale(self.stem_width, self.width),
                tuple(_scale(w, self.width) for w in self.stage_widths))

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        """Logits `(N, num_classes)` of images `(N, H, W, C)`.

        Args:
          x: images `(N, image_size, image_size, in_channels)`.
          train: batch statistics in BatchNorm (call `apply` with
            `mutable=["batch_stats"]` to get the updated running averages) and dropout;
            `False` uses the running averages.
        """
        if x.ndim != 4 or x.shape[1:] != (self.image_size, self.image_size, self.in_channels):
            raise ModelInputError(
                f"input has shape {tuple(x.shape)}; expected (N, {self.image_size}, "
                f"{self.image_size}, {self.in_channels}) (NHWC)"
            )
        if len(self.stage_sizes) != len(self.stage_widths) or not self.stage_sizes:
            raise ModelInputError(
                f"stage_sizes {self.stage_sizes} and stage_widths {self.stage_widths} must be "
                f"non-empty and of equal length"
            )
        stem_features, stage_features = self.widths()
        if self.stem_kind() == "cifar":
            x = _conv(stem_features, 3, 1, "stem_conv")(x)
            x = nn.relu(_batch_norm(train, "stem_bn")(x))
        else:
            x = _conv(stem_features, 7, 2, "stem_conv")(x)
            x = nn.relu(_batch_norm(train, "stem_bn")(x))
            x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        for i, (num_blocks, features) in enumerate(zip(self.stage_sizes, stage_features)):
            x = ResNetStage(features, num_blocks, 1 if i == 0 else 2, self.block_cls,
                            name=f"stage{i + 1}")(x, train=train)
        x = jnp.mean(x, axis=(1, 2))
        if self.dropout > 0:
            x = nn.Dropout(self.dropout, deterministic=not train)(x)
        return nn.Dense(self.num_classes, name="head")(x)


resnet18 = functools.partial(ResNet, stage_sizes=(2, 2, 2, 2), stage_widths=(64, 128, 256, 512),
                             stem_width=64, block_cls=BasicBlock)
resnet18.__doc__ = "ResNet-18 (BasicBlock, stages 2-2-2-2, widths 64-128-256-512)."

resnet20 = functools.partial(ResNet, stage_sizes=(3, 3, 3), stage_widths=(16, 32, 64),
                             stem_width=16, block_cls=BasicBlock)
resnet20.__doc__ = "CIFAR ResNet-20 (3 stages of 3 BasicBlocks, widths 16-32-64, projection shortcuts)."
