"""The BatchNorm zoo: ResNet (resnet18, resnet20) and VGG (vgg11_bn) shapes, paths, BatchNorm."""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.traverse_util import flatten_dict

from jaxsplit import config as jconfig
from jaxsplit import pipeline
from jaxsplit.models import (
    MODEL_FACTORIES,
    ModelInputError,
    ResNet,
    VGG,
    as_variables,
    build_model,
    has_state,
    inference_apply,
    init_variables,
    is_variables,
    resnet18,
    resnet20,
    vgg11_bn,
)


CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def _shapes(model) -> dict[str, dict[str, tuple[int, ...]]]:
    """`{collection: {"a/b/leaf": shape}}` of a model's variables (nothing computed)."""
    tree = jax.eval_shape(lambda: init_variables(model, jax.random.key(0)))
    return {c: {k: v.shape for k, v in flatten_dict(t, sep="/").items()} for c, t in tree.items()}


def _kernels(shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    return {k[: -len("/kernel")]: v for k, v in shapes.items() if k.endswith("/kernel")}


# jit + rbg: one compilation (eager init compiles every op separately: a minute on 2 cores)
_init = jax.jit(init_variables, static_argnums=0)
_apply = jax.jit(lambda model, variables, x, train: model.apply(
    variables, x, train=train, mutable=["batch_stats"] if train else False),
    static_argnums=(0, 3))


def _out_shape(model, batch: int = 2) -> tuple[int, ...]:
    variables = jax.eval_shape(lambda: init_variables(model, jax.random.key(0)))
    return jax.eval_shape(inference_apply(model), variables, model.dummy_input(batch)).shape


# -- shapes and parameter paths -------------------------------------------------------------------


def test_resnet20_paths_and_shapes():
    model = resnet20(num_classes=10, in_channels=1, width=0.25, image_size=32)
    shapes = _shapes(model)
    assert sorted(shapes) == ["batch_stats", "params"]
    kernels = _kernels(shapes["params"])
    expected = {"stem_conv": (3, 3, 1, 4), "head": (16, 10)}
    for s, (c_in, c) in enumerate(((4, 4), (4, 8), (8, 16)), start=1):
        for b in range(3):
            expected[f"stage{s}/block{b}/conv1"] = (3, 3, c_in if b == 0 else c, c)
            expected[f"stage{s}/block{b}/conv2"] = (3, 3, c, c)
        if c_in != c:
            expected[f"stage{s}/block0/shortcut_conv"] = (1, 1, c_in, c)
    assert kernels == expected
    assert "stage1/block0/shortcut_conv" not in kernels  # identity where the shape is kept
    # every BatchNorm has scale/bias in params and mean/var in batch_stats, same names
    bn = {k.rsplit("/", 1)[0] for k in shapes["batch_stats"]}
    assert bn == {k.rsplit("/", 1)[0] for k in shapes["params"] if k.endswith("/scale")}
    assert shapes["batch_stats"]["stage3/block0/shortcut_bn/mean"] == (16,)
    assert shapes["params"]["stage2/block1/bn2/scale"] == (8,)
    assert len(bn) == 1 + 9 * 2 + 2
    assert not any(k.endswith("/bias") and k.split("/")[-2].startswith(("conv", "stem_conv"))
                   for k in shapes["params"])  # convs have no bias (BatchNorm follows)
    assert _out_shape(model) == (2, 10)


def test_resnet18_stages_widths_and_stems():
    model = resnet18(num_classes=7, in_channels=3, width=0.125, image_size=32)
    kernels = _kernels(_shapes(model)["params"])
    assert kernels["stem_conv"] == (3, 3, 3, 8)  # CIFAR stem for small images
    assert [kernels[f"stage{s}/block1/conv2"][-1] for s in range(1, 5)] == [8, 16, 32, 64]
    assert sorted(k for k in kernels if "shortcut" in k) == [
        f"stage{s}/block0/shortcut_conv" for s in (2, 3, 4)]
    assert sum(k.endswith(("conv1", "conv2")) for k in kernels) == 4 * 2 * 2
    assert kernels["head"] == (64, 7)
    assert _out_shape(model) == (2, 7)
    big = resnet18(num_classes=5, in_channels=3, width=0.125, image_size=96)
    assert big.stem_kind() == "imagenet" and _kernels(_shapes(big)["params"])["stem_conv"] == (7, 7, 3, 8)
    assert _out_shape(big) == (2, 5)
    assert resnet18(image_size=96, stem="cifar").stem_kind() == "cifar"


def test_vgg11_bn_paths_and_shapes():
    model = vgg11_bn(num_classes=10, in_channels=1, width=0.125, image_size=32)
    shapes = _shapes(model)
    kernels = _kernels(shapes["params"])
    widths = [8, 16, 32, 32, 64, 64, 64, 64]
    assert [kernels[f"conv_{i}"][-1] for i in range(8)] == widths
    assert kernels["conv_0"] == (3, 3, 1, 8) and kernels["conv_3"] == (3, 3, 32, 32)
    assert kernels["fc_8"] == (64, 64) and kernels["fc_9"] == (64, 10)  # 32 / 2**5 = 1x1x64
    assert sorted(shapes["batch_stats"]) == sorted(f"bn_{i}/{s}" for i in range(8) for s in ("mean", "var"))
    assert _out_shape(model) == (2, 10)
    assert _kernels(_shapes(vgg11_bn(in_channels=3, width=0.125, image_size=64))["params"])["fc_8"] == (4 * 64, 64)
    with pytest.raises(ModelInputError, match="not divisible by 32"):
        _out_shape(vgg11_bn(width=0.125, image_size=28))


def test_width_multiplier_scales_every_layer():
    for width in (0.25, 0.5, 1.0):
        kernels = _kernels(_shapes(resnet20(width=width, in_channels=3))["params"])
        assert kernels["stem_conv"][-1] == round(16 * width)
        assert kernels["stage3/block2/conv2"][-1] == round(64 * width)
    assert _kernels(_shapes(resnet20(width=1e-3))["params"])["stage3/block0/conv1"][-1] == 1
    with pytest.raises(ValueError, match="width multiplier must be > 0"):
        _shapes(resnet20(width=0.0))


def test_factory_and_config_names():
    for name in ("resnet18", "resnet20", "vgg11_bn"):
        assert name in MODEL_FACTORIES
        model = pipeline.build_model(jconfig.ModelConfig(name=name, width=0.125), 10, 1, 32)
        assert (model.num_classes, model.in_channels, model.image_size, model.width) == (10, 1, 32, 0.125)
        assert has_state(model)
        assert model.dummy_input(3).shape == (3, 32, 32, 1)
    assert isinstance(build_model("resnet20", num_classes=3), ResNet)
    assert isinstance(build_model("vgg11_bn", num_classes=3), VGG)
    assert pipeline.build_model(jconfig.ModelConfig(name="resnet20", dropout=0.2), 10, 1, 32).dropout == 0.2
    assert not has_state(build_model("weak_cnn", width=0.25))
    with pytest.raises(jconfig.ConfigError, match="model.name"):
        jconfig.from_dict(jconfig.Config, {"model": {"name": "resnet21"}})
    cfg = jconfig.load(CONFIGS / "fashion_mnist_resnet20_cpu.yaml")
    assert cfg.model.name == "resnet20" and cfg.data.image_size == 32
    assert jconfig.load(CONFIGS / "fashion_mnist_vgg11bn_cpu.yaml").model.name == "vgg11_bn"
    assert jconfig.load(CONFIGS / "fashion_mnist_resnet18_cpu.yaml").model.name == "resnet18"


def test_wrong_input_shape_is_named():
    model = resnet20(num_classes=10, in_channels=1, width=0.25, image_size=16)
    variables = jax.eval_shape(lambda: init_variables(model, jax.random.key(0)))
    with pytest.raises(ModelInputError, match=r"expected \(N, 16, 16, 1\)"):
        jax.eval_shape(inference_apply(model), variables, jnp.zeros((2, 16, 16, 3)))


def test_variables_helpers():
    model = resnet20(num_classes=10, in_channels=1, width=0.25, image_size=16)
    assert inference_apply(model) is inference_apply(resnet20(num_classes=10, in_channels=1,
                                                             width=0.25, image_size=16))
    inner = {"conv_0": {"kernel": jnp.zeros(1)}}
    assert as_variables(inner) == {"params": inner}
    full = {"params": inner, "batch_stats": {}}
    assert is_variables(full) and not is_variables(inner) and as_variables(full) == full


# -- BatchNorm behaviour ---------------------------------------------------------------------------


def test_batchnorm_train_updates_stats_and_eval_uses_them():
    # a tiny ResNet (one block per stage, 8x8 inputs) compiles fast; same code as resnet20
    model = ResNet(stage_sizes=(1, 1), stage_widths=(4, 8), stem_width=4, num_classes=10,
                   in_channels=1, image_size=8)
    variables = _init(model, jax.random.key(0, impl="rbg"))
    x = jnp.asarray(np.random.default_rng(0).normal(1.0, 2.0, (4, 8, 8, 1)), jnp.float32)

    logits, updates = _apply(model, variables, x, True)
    old = flatten_dict(variables["batch_stats"], sep="/")
    new = flatten_dict(updates["batch_stats"], sep="/")
    assert old.keys() == new.keys()
    assert all(not np.allclose(old[k], new[k]) for k in new if k.endswith("/mean"))
    # train mode normalises with the batch's statistics: the running averages play no part
    again = _apply(model, {**variables, "batch_stats": updates["batch_stats"]}, x, True)[0]
    np.testing.assert_allclose(again, logits, rtol=1e-5, atol=1e-5)

    # eval mode uses the running averages: an image's logits do not depend on its batch ...
    apply_fn = jax.jit(inference_apply(model))
    trained = {**variables, "batch_stats": updates["batch_stats"]}
    np.testing.assert_allclose(apply_fn(trained, x)[:1], apply_fn(trained, x[:1]), rtol=1e-5, atol=1e-5)
    train_one = _apply(model, variables, x[:2], True)[0]
    assert not np.allclose(train_one[:1], logits[:1], atol=1e-4)  # ... while in train mode they do
    # ... and they do depend on the running averages
    assert not np.allclose(apply_fn(trained, x), apply_fn(variables, x), atol=1e-4)
