"""Flax models: one generic `ConvNet` and the SimCNN / ResCNN / weak-CNN families."""

from jaxsplit.models.convnet import (
    ConvLayerDef,
    ConvLayerSpec,
    ConvNet,
    ConvSpec,
    ModelInputError,
    activations,
    build_model,
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

__all__ = [
    "ConvLayerDef", "ConvLayerSpec", "ConvNet", "ConvSpec", "ModelInputError", "activations",
    "build_model", "conv_macs", "convnet_of", "count_params", "head_macs", "init_params", "random_params", "rescnn",
    "simcnn",
    "weak_cnn",
]
