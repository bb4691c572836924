"""distill-zoo: knowledge distillation for vision and multimodal models, on PyTorch Lightning.

Import what you need from the subpackages: ``zoo.methods`` (LightningModules), ``zoo.losses`` (loss modules),
``zoo.data`` (LightningDataModules), ``zoo.models`` (model sources), ``zoo.teacher`` (the frozen teacher) and
``zoo.hub`` (published checkpoints).
"""

__version__ = "0.1.0"
