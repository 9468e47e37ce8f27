"""Flax models: the generic `ConvNet` (SimCNN / ResCNN / weak CNNs) and the BatchNorm zoo
(`ResNet`: resnet18, resnet20; `VGG`: vgg11_bn), and one factory over all of them."""

from jaxsplit.models import convnet as _convnet
from jaxsplit.models.convnet import (
    ConvLayerDef,
    ConvLayerSpec,
    ConvNet,
    ConvSpec,
    ModelInputError,
    activations,
    conv_macs,
    convnet_of,
    count_params,
    head_macs,
    init_params,
    random_params,
    rescnn,
    simcnn,
    weak_cnn,
)
from jaxsplit.models.resnet import BasicBlock, ResNet, ResNetStage, resnet18, resnet20
from jaxsplit.models.variables import (
    as_variables,
    has_state,
    inference_apply,
    init_variables,
    is_variables,
    variable_collections,
)
from jaxsplit.models.vgg import VGG, vgg11_bn

# Family name (config `model.name`) -> factory(num_classes=, in_channels=, width=,
# image_size=, dropout=, ...).
MODEL_FACTORIES = {
    **_convnet.MODEL_FACTORIES,
    "resnet18": resnet18,
    "resnet20": resnet20,
    "vgg11_bn": vgg11_bn,
}


def build_model(name: str, **kwargs):
    """A model by family name (`simcnn`, `rescnn`, `weak_cnn`, `resnet18`, `resnet20`,
    `vgg11_bn`); `kwargs` go to the family's factory."""
    if name not in MODEL_FACTORIES:
        raise ValueError(f"unknown model {name!r}; expected one of {sorted(MODEL_FACTORIES)}")
    return MODEL_FACTORIES[name](**kwargs)


__all__ = [
    "BasicBlock", "ConvLayerDef", "ConvLayerSpec", "ConvNet", "ConvSpec", "MODEL_FACTORIES",
    "ModelInputError", "ResNet", "ResNetStage", "VGG", "activations", "as_variables",
    "build_model", "conv_macs", "convnet_of", "count_params", "has_state", "head_macs", "inference_apply",
    "init_params", "init_variables", "is_variables", "random_params", "rescnn", "resnet18",
    "resnet20", "simcnn", "variable_collections", "vgg11_bn", "weak_cnn",
]
