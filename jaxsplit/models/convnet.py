"""One generic conv-net family that covers SimCNN, ResCNN and the weak CNNs.

Every architecture jaxsplit modularises is a chain of 3x3 conv blocks
(conv -> ReLU -> optional kernel mask -> optional 2x2 max-pool -> optional
residual add of an earlier block's output) followed by an MLP head. Describing
all of them with one declarative layer table (`ConvNet.convs`) is what lets
masking, importance, extraction and MAC counting be written once, from the
table, instead of once per architecture (the reference's
`_extract_module_for_simcnn` / `_rescnn` copy-paste).

Layout is NHWC (the reference is NCHW); conv kernels are HWIO.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxsplit.errors import JaxsplitError


class ModelInputError(JaxsplitError, ValueError):
    """An input or mask that does not fit the model."""


@dataclasses.dataclass(frozen=True)
class ConvLayerDef:
    """One conv block of a `ConvNet`.

    Attributes:
      features: number of output kernels (channels) of the 3x3 conv.
      pool: whether a 2x2/stride-2 max-pool follows the (masked) ReLU.
      residual_from: index of an earlier block whose *output* is added to this
        block's output (after this block's pool). The two blocks' kernel masks
        are then tied: a kept channel must exist on both sides of the add.
    """

    features: int
    pool: bool = False
    residual_from: int | None = None


@dataclasses.dataclass(frozen=True)
class ConvLayerSpec:
    """What the mask, importance and extraction code needs to know of one conv.

    Attributes:
      name: the layer's parameter name (`conv_{i}`), also its mask key.
      index: position in the conv chain.
      num_kernels: output channels K_l.
      in_channels: input channels (the previous layer's K, or image channels).
      input_hw: spatial size (H, W) of the layer's input (= its conv output).
      output_hw: spatial size after the optional pool.
      pool: whether a pool follows.
      residual_from: name of the tied source layer, or None.
    """

    name: str
    index: int
    num_kernels: int
    in_channels: int
    input_hw: tuple[int, int]
    output_hw: tuple[int, int]
    pool: bool
    residual_from: str | None


@dataclasses.dataclass(frozen=True)
class ConvSpec:
    """The ordered conv layers of a model and their residual ties.

    Attributes:
      layers: one `ConvLayerSpec` per conv layer, in forward order.
      ties: groups of layer names whose masks must be equal, e.g.
        `(("conv_1", "conv_3"), ...)` for ResCNN. The first name of a group is
        its *representative* (the layer whose genes encode the group).
      image_shape: (H, W, C) of the model input.
      head_in_hw: spatial size of the last feature map, flattened into the head.
    """

    layers: tuple[ConvLayerSpec, ...]
    ties: tuple[tuple[str, ...], ...]
    image_shape: tuple[int, int, int]
    head_in_hw: tuple[int, int]

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(layer.name for layer in self.layers)

    @property
    def num_kernels(self) -> dict[str, int]:
        return {layer.name: layer.num_kernels for layer in self.layers}

    @property
    def total_kernels(self) -> int:
        return sum(layer.num_kernels for layer in self.layers)

    def layer(self, name: str) -> ConvLayerSpec:
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(f"no conv layer named {name!r}; layers are {self.names}")

    def representative(self, name: str) -> str:
        """The first layer of `name`'s tie group (itself when untied)."""
        for group in self.ties:
            if name in group:
                return group[0]
        return name

    @property
    def free_layers(self) -> tuple[str, ...]:
        """Layers whose masks are free parameters (one per tie group)."""
        return tuple(n for n in self.names if self.representative(n) == n)


ACT_SUFFIX = "_relu"


def conv_name(index: int) -> str:
    return f"conv_{index}"


class ConvNet(nn.Module):
    """A chain of 3x3 conv blocks and an MLP head (SimCNN, ResCNN, weak CNNs).

    Attributes:
      convs: the conv blocks (see `ConvLayerDef`).
      hidden: widths of the hidden Dense layers of the head (ReLU after each).
      head_dropout: dropout rate before each Dense layer of the head
        (length `len(hidden) + 1`; 0 disables).
      num_classes: outputs of the last Dense layer.
      in_channels: channels of the input images (1 or 3).
      image_size: height = width of the input images.

    Parameters are named `conv_{i}` ({kernel: (3, 3, C_in, K), bias: (K,)})
    and `fc_{len(convs) + j}` for the head, which matches the reference's
    SimCNN `state_dict` names.

    Example:
      >>> model = ConvNet(convs=(ConvLayerDef(4, pool=True),), hidden=(),
      ...                 head_dropout=(0.0,), num_classes=3, in_channels=1,
      ...                 image_size=8)
      >>> variables = model.init(jax.random.key(0), model.dummy_input())
      >>> variables["params"]["fc_1"]["kernel"].shape
      (64, 3)
    """

    convs: tuple[ConvLayerDef, ...]
    hidden: tuple[int, ...] = ()
    head_dropout: tuple[float, ...] = (0.0,)
    num_classes: int = 10
    in_channels: int = 3
    image_size: int = 32

    def dummy_input(self, batch: int = 1) -> jax.Array:
        """Zeros of the model's input shape, `(batch, H, W, C)`."""
        return jnp.zeros((batch, self.image_size, self.image_size, self.in_channels), jnp.float32)

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        *,
        train: bool = False,
        masks: Mapping[str, jax.Array] | None = None,
    ) -> jax.Array:
        """Logits of a batch.

        Args:
          x: images `(N, H, W, C)`.
          train: enables dropout (needs a `dropout` rng).
          masks: optional kernel masks `{conv_name: (K_l,)}` (bool or 0/1
            float). Each conv's post-ReLU activation is multiplied by its mask
            ("activation masking"); exact equal to zeroing the masked
            kernels' weights and biases.

        Returns:
          logits `(N, num_classes)`.

        Every conv's post-ReLU, post-mask, pre-pool activation `(N, H, W, K)`
        is sown into the `intermediates` collection as `{conv_name}_relu`
        (read with `activations`, used for kernel importance).
        """
        if x.ndim != 4 or x.shape[1:] != (self.image_size, self.image_size, self.in_channels):
            raise ModelInputError(
                f"input has shape {tuple(x.shape)}; expected (N, {self.image_size}, "
                f"{self.image_size}, {self.in_channels}) (NHWC)"
            )
        if len(self.head_dropout) != len(self.hidden) + 1:
            raise ModelInputError(
                f"head_dropout has {len(self.head_dropout)} rates; expected "
                f"len(hidden) + 1 = {len(self.hidden) + 1}"
            )
        outputs: list[jax.Array] = []
        h = x
        for i, layer in enumerate(self.convs):
            name = conv_name(i)
            h = nn.Conv(layer.features, (3, 3), padding=1, name=name)(h)
            h = nn.relu(h)
            if masks is not None:
                if name not in masks:
                    raise ModelInputError(
                        f"masks have no entry for {name}; expected one per conv layer"
                    )
                m = masks[name]
                if tuple(m.shape) != (layer.features,):
                    raise ModelInputError(
                        f"mask of {name} has shape {tuple(m.shape)}; expected "
                        f"({layer.features},) for its {layer.features} kernels"
                    )
                h = h * m.astype(h.dtype)
            self.sow("intermediates", name + ACT_SUFFIX, h)
            if layer.pool:
                h = nn.max_pool(h, (2, 2), strides=(2, 2))
            if layer.residual_from is not None:
                h = h + outputs[layer.residual_from]
            outputs.append(h)
        # Flatten in NHWC order; interop/ permutes to the reference's NCHW order.
        h = h.reshape((h.shape[0], -1))
        num_convs = len(self.convs)
        widths = (*self.hidden, self.num_classes)
        for j, (width, rate) in enumerate(zip(widths, self.head_dropout)):
            if rate > 0:
                h = nn.Dropout(rate, deterministic=not train)(h)
            h = nn.Dense(width, name=f"fc_{num_convs + j}")(h)
            if j < len(widths) - 1:
                h = nn.relu(h)
        return h

    # -- static descriptions (no parameters needed) -------------------------

    def conv_spec(self) -> ConvSpec:
        """The model's conv layers, their shapes and residual ties."""
        layers = []
        ties: list[list[str]] = []
        hw = (self.image_size, self.image_size)
        c_in = self.in_channels
        for i, layer in enumerate(self.convs):
            out_hw = (hw[0] // 2, hw[1] // 2) if layer.pool else hw
            src = None
            if layer.residual_from is not None:
                src_def = self.convs[layer.residual_from]
                src = conv_name(layer.residual_from)
                if src_def.features != layer.features:
                    raise ModelInputError(
                        f"{conv_name(i)} adds {src} but their widths differ "
                        f"({layer.features} vs {src_def.features})"
                    )
                group = next((g for g in ties if src in g), None)
                if group is None:
                    ties.append([src, conv_name(i)])
                else:
                    group.append(conv_name(i))
            layers.append(
                ConvLayerSpec(conv_name(i), i, layer.features, c_in, hw, out_hw, layer.pool, src)
            )
            hw, c_in = out_hw, layer.features
        return ConvSpec(tuple(layers), tuple(tuple(g) for g in ties),
                        (self.image_size, self.image_size, self.in_channels), hw)

    def head_widths(self) -> tuple[int, ...]:
        """Input width of each head Dense layer, then the number of classes."""
        spec = self.conv_spec()
        flat = spec.head_in_hw[0] * spec.head_in_hw[1] * self.convs[-1].features
        return (flat, *self.hidden, self.num_classes)


def conv_macs(model: ConvNet, kept: Mapping[str, int] | None = None) -> int:
    """Multiply-accumulates of the conv layers for one image.

    Args:
      model: the model.
      kept: optional number of kept kernels per conv layer (a module); the
        next layer's input channels follow the kept count of its input layer.
    """
    spec = model.conv_spec()
    kept = dict(spec.num_kernels if kept is None else kept)
    total = 0
    prev = spec.image_shape[2]
    for layer in spec.layers:
        k = int(kept[layer.name])
        total += layer.input_hw[0] * layer.input_hw[1] * 9 * prev * k
        prev = k
    return total


def head_macs(model: ConvNet, last_kept: int | None = None, num_outputs: int | None = None) -> int:
    """Multiply-accumulates of the Dense head for one image."""
    widths = list(model.head_widths())
    if last_kept is not None:
        hw = model.conv_spec().head_in_hw
        widths[0] = hw[0] * hw[1] * last_kept
    if num_outputs is not None:
        widths[-1] = num_outputs
    return sum(a * b for a, b in zip(widths[:-1], widths[1:]))


def count_params(tree) -> int:
    """Number of scalars in a parameter pytree."""
    return int(sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(tree)))


# -- the families ------------------------------------------------------------

SIMCNN_WIDTHS = (64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512)
SIMCNN_POOLS = (2, 4, 7, 10, 13)  # 1-based conv indices followed by a pool

# (out, pool) of ResCNN's 12 blocks; residual adds 4 += 2, 8 += 6, 12 += 10 (1-based).
RESCNN_BLOCKS = (
    (64, False), (128, True), (128, False), (128, False), (256, True), (512, True),
    (512, False), (512, False), (512, True), (512, True), (512, False), (512, False),
)
RESCNN_RESIDUALS = {4: 2, 8: 6, 12: 10}

WEAK_WIDTHS = (32, 64, 128)


def _scale(width: int, multiplier: float) -> int:
    if multiplier <= 0:
        raise ValueError(f"width multiplier must be > 0, got {multiplier}")
    return max(1, int(round(width * multiplier)))


def simcnn(num_classes: int = 10, in_channels: int = 3, width: float = 1.0,
           image_size: int = 32, dropout: float = 0.5) -> ConvNet:
    """SimCNN (VGG16-like, no BatchNorm), docs/method.md §1; `width` scales every layer."""
    convs = tuple(
        ConvLayerDef(_scale(c, width), pool=(i + 1) in SIMCNN_POOLS)
        for i, c in enumerate(SIMCNN_WIDTHS)
    )
    hidden = (_scale(512, width), _scale(512, width))
    return ConvNet(convs, hidden, (dropout, dropout, 0.0), num_classes, in_channels, image_size)


def rescnn(num_classes: int = 10, in_channels: int = 3, width: float = 1.0,
           image_size: int = 32, dropout: float = 0.4) -> ConvNet:
    """ResCNN (12 conv blocks, 3 residual adds), docs/method.md §1; masks of 2/6/10 tie to 4/8/12."""
    convs = tuple(
        ConvLayerDef(
            _scale(c, width), pool=pool,
            residual_from=(RESCNN_RESIDUALS[i + 1] - 1) if (i + 1) in RESCNN_RESIDUALS else None,
        )
        for i, (c, pool) in enumerate(RESCNN_BLOCKS)
    )
    return ConvNet(convs, (), (dropout,), num_classes, in_channels, image_size)


def weak_cnn(num_classes: int = 10, in_channels: int = 3, width: float = 1.0,
             image_size: int = 32, widths: Sequence[int] = WEAK_WIDTHS,
             hidden: Sequence[int] = (), dropout: float = 0.0) -> ConvNet:
    """A small CNN (a few conv+pool blocks and a Linear head) for the patching tasks."""
    convs = tuple(ConvLayerDef(_scale(c, width), pool=True) for c in widths)
    hidden = tuple(_scale(h, width) for h in hidden)
    return ConvNet(convs, hidden, (dropout,) * (len(hidden) + 1), num_classes, in_channels,
                   image_size)


MODEL_FACTORIES = {"simcnn": simcnn, "rescnn": rescnn, "weak_cnn": weak_cnn}


def build_model(name: str, **kwargs) -> ConvNet:
    """A model by family name (`simcnn`, `rescnn`, `weak_cnn`)."""
    if name not in MODEL_FACTORIES:
        raise ValueError(f"unknown model {name!r}; expected one of {sorted(MODEL_FACTORIES)}")
    return MODEL_FACTORIES[name](**kwargs)


def init_params(model: ConvNet, key: jax.Array) -> dict:
    """Initial `params` pytree of `model` (the inner dict, not `{"params": ...}`)."""
    return model.init(key, model.dummy_input())["params"]


def random_params(model: ConvNet, seed: int) -> dict:
    """He-normal weights and N(0, 0.1) biases of `model`'s shapes, drawn with NumPy.

    Nothing is compiled (shapes come from `jax.eval_shape`): `init_params` compiles jax's RNG per
    parameter shape, which takes seconds on a 2-core CPU for a 13-layer net. Logits stay O(1).
    Not flax's initializers; for tests, benchmarks and examples that need any sensible weights.
    """
    import numpy as np  # local: the models need numpy nowhere else

    shapes = jax.eval_shape(lambda: init_params(model, jax.random.key(0)))
    rng = np.random.default_rng(seed)

    def draw(leaf):
        std = math.sqrt(2.0 / math.prod(leaf.shape[:-1])) if len(leaf.shape) > 1 else 0.1
        return jnp.asarray(rng.normal(0.0, std, leaf.shape).astype(np.float32))

    return jax.tree_util.tree_map(draw, shapes)


def convnet_of(apply_fn) -> ConvNet | None:
    """The `ConvNet` behind `apply_fn` (its bound `apply`, or a `functools.partial` of it), else
    None. Lets generic code pick ConvNet-only fast paths (e.g. the "fast" evaluator)."""
    import functools  # local: needed nowhere else here

    fn = apply_fn
    while isinstance(fn, functools.partial):
        fn = fn.func
    owner = getattr(fn, "__self__", None)
    return owner if isinstance(owner, ConvNet) else None


def activations(model: ConvNet, params, x: jax.Array,
                masks: Mapping[str, jax.Array] | None = None) -> tuple[jax.Array, dict]:
    """Logits and every conv layer's post-ReLU activation in one forward pass.

    Returns:
      `(logits (N, num_classes), {conv_name: (N, H_l, W_l, K_l)})`.
    """
    logits, state = model.apply({"params": params}, x, masks=masks, mutable=["intermediates"])
    acts = {name[: -len(ACT_SUFFIX)]: vals[0] for name, vals in state["intermediates"].items()}
    return logits, acts
