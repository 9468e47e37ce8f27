"""VGG with BatchNorm: one generic `VGG`, the variants as `functools.partial`s.

Each conv is 3x3, stride 1, padding 1, without bias, then BatchNorm and ReLU (torchvision's
`vgg*_bn` feature extractor); each stage ends with a 2x2 max-pool. The classifier is small, as
in CIFAR VGGs: flatten (NHWC) -> Dense(hidden) -> ReLU -> dropout -> Dense(num_classes).

* `vgg11_bn`: stages (64), (128), (256, 256), (512, 512), (512, 512) -- 8 convs, 5 pools, so
  a 32x32 input ends at 1x1; hidden width 512.

`width` multiplies every width; `in_channels` and `image_size` (divisible by 32 for five
pools) set the input.

Parameter paths follow the reference SimCNN's names (docs/method.md §1): `conv_0` .. `conv_7`
(kernel), `bn_0` .. `bn_7` (scale, bias; running mean/var in `batch_stats`), `fc_8`, `fc_9`.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxsplit.models.convnet import ModelInputError, _scale
from jaxsplit.models.resnet import BN_EPSILON, BN_MOMENTUM

__all__ = ["VGG", "vgg11_bn", "VGG11_STAGES"]

VGG11_STAGES = ((64,), (128,), (256, 256), (512, 512), (512, 512))


class VGG(nn.Module):
    """Stages of conv3x3-BN-ReLU layers, each followed by a 2x2 max-pool, and an MLP head.

    Attributes:
      stages: base widths of the convs of each stage.
      hidden: base width of the hidden Dense layer (0: none, a single Dense head).
      num_classes: outputs of the last Dense layer.
      in_channels: channels of the input images (1 or 3).
      image_size: height = width of the input images (divisible by `2 ** len(stages)`).
      width: multiplier of every width (convs and hidden).
      dropout: dropout rate after the hidden layer.

    Example:
      >>> model = vgg11_bn(num_classes=10, in_channels=1, width=0.125, image_size=32)
      >>> variables = model.init(jax.random.key(0), model.dummy_input())
      >>> variables["params"]["conv_7"]["kernel"].shape, variables["params"]["fc_9"]["kernel"].shape
      ((3, 3, 64, 64), (64, 10))
    """

    stages: tuple[tuple[int, ...], ...]
    hidden: int = 512
    num_classes: int = 10
    in_channels: int = 3
    image_size: int = 32
    width: float = 1.0
    dropout: float = 0.0

    def dummy_input(self, batch: int = 1) -> jax.Array:
        """Zeros of the model's input shape, `(batch, H, W, C)`."""
        return jnp.zeros((batch, self.image_size, self.image_size, self.in_channels), jnp.float32)

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        """Logits `(N, num_classes)` of images `(N, H, W, C)`.

        Args:
          train: batch statistics in BatchNorm (apply with `mutable=["batch_stats"]`) and
            dropout (needs a `dropout` rng); `False` uses the running averages.
        """
        if x.ndim != 4 or x.shape[1:] != (self.image_size, self.image_size, self.in_channels):
            raise ModelInputError(
                f"input has shape {tuple(x.shape)}; expected (N, {self.image_size}, "
                f"{self.image_size}, {self.in_channels}) (NHWC)"
            )
        factor = 2 ** len(self.stages)
        if self.image_size % factor:
            raise ModelInputError(
                f"image_size {self.image_size} is not divisible by {factor}, which the "
                f"{len(self.stages)} 2x2 max-pools of this VGG need (pad the images, e.g. to 32)"
            )
        i = 0
        for stage in self.stages:
            for features in stage:
                x = nn.Conv(_scale(features, self.width), (3, 3), padding=((1, 1), (1, 1)),
                            use_bias=False, name=f"conv_{i}")(x)
                x = nn.BatchNorm(use_running_average=not train, momentum=BN_MOMENTUM,
                                 epsilon=BN_EPSILON, name=f"bn_{i}")(x)
                x = nn.relu(x)
                i += 1
            x = nn.max_pool(x, (2, 2), strides=(2, 2))
        x = x.reshape((x.shape[0], -1))
        if self.hidden > 0:
            x = nn.relu(nn.Dense(_scale(self.hidden, self.width), name=f"fc_{i}")(x))
            if self.dropout > 0:
                x = nn.Dropout(self.dropout, deterministic=not train)(x)
            i += 1
        return nn.Dense(self.num_classes, name=f"fc_{i}")(x)


vgg11_bn = functools.partial(VGG, stages=VGG11_STAGES, hidden=512)
vgg11_bn.__doc__ = "VGG-11 with BatchNorm (8 convs, 5 max-pools) and a 512-wide hidden layer."
