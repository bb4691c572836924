"""Model sources: where a student or teacher network comes from, as data that a YAML config can name.

A source is a small object with type-hinted arguments (so LightningCLI can build it from ``class_path`` /
``init_args``) whose :meth:`~zoo.models.sources.ModelSource.build` returns an ``nn.Module``. Methods call
``build(num_classes, in_chans)`` with the values of the data set; a value given to the source itself wins.
"""

from zoo.models.cifar import CIFAR_MODELS, create_cifar_model, list_cifar_models
from zoo.models.convnet import ConvNet, ConvNetModel, has_batchnorm
from zoo.models.mae import MAEEncoderModel, MAEModel, MaskedAutoencoder, create_mae
from zoo.models.segmentation import (
    MMSegModel,
    SMPModel,
    TorchvisionSegmentationModel,
    expand_input_channels,
    segmentation_taps,
)
from zoo.models.sources import (
    CIFARModel,
    ModelSource,
    TimmModel,
    TorchvisionModel,
    build_model,
    load_weights,
    read_state_dict,
)

__all__ = [
    "CIFAR_MODELS",
    "CIFARModel",
    "ConvNet",
    "ConvNetModel",
    "MAEEncoderModel",
    "MAEModel",
    "MMSegModel",
    "MaskedAutoencoder",
    "SMPModel",
    "TorchvisionSegmentationModel",
    "ModelSource",
    "TimmModel",
    "TorchvisionModel",
    "build_model",
    "create_cifar_model",
    "create_mae",
    "expand_input_channels",
    "has_batchnorm",
    "list_cifar_models",
    "load_weights",
    "read_state_dict",
    "segmentation_taps",
]
