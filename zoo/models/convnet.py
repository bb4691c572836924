"""ConvNet-D: the small convolutional network of dataset distillation (DC, DSA, DM, MTT, DATM, AST).

depth × [Conv3×3(width, pad 1) → norm → ReLU → AvgPool 2×2] → flatten → Linear(num_classes), with no hidden fully
connected layer (mtt-distillation ``networks.ConvNet`` with ``utils.get_default_convnet_setting``: width 128, depth 3,
ReLU, instance norm, average pooling). CIFAR-10's ConvNet-3 has 320,010 parameters, CIFAR-100's 504,420.
"""

from __future__ import annotations

from typing import Literal

from torch import Tensor, nn

from zoo.models.sources import ModelSource, load_weights, pick_size

__all__ = ["ConvNet", "ConvNetModel", "has_batchnorm"]

Norm = Literal["instancenorm", "none", "batchnorm"]


def has_batchnorm(model: nn.Module) -> bool:
    """Whether ``model`` holds a BatchNorm layer (whose running statistics rule out trajectory matching)."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


class ConvNet(nn.Module):
    """ConvNet-D of the dataset-distillation literature (Gidaris & Komodakis 2018, as used by arXiv 2203.11932).

    ``features`` is depth × [Conv2d(3×3, pad 1) → norm → ReLU → AvgPool2d(2)], ``classifier`` one Linear layer on the
    flattened ``width × (image_size / 2^depth)²`` features. Parameter names are ``features.<i>.weight`` ... and
    ``classifier.weight``/``.bias``, in that ``named_parameters()`` order (the order of an expert trajectory).

    - ``norm="instancenorm"`` is ``GroupNorm(width, width, affine=True)`` as in the official code: no running
      buffers, so training and evaluation behave the same and ``torch.func.functional_call`` needs the parameters
      only. ``"none"`` drops the norm layer. ``"batchnorm"`` builds but cannot be used for trajectory matching (its
      running statistics are buffers that a functional forward would have to carry and mutate).
    - One-channel 28×28 input (MNIST-like) uses padding 3 in the first convolution, so it is treated as 32×32, as the
      official code does. (The official code pads every one-channel input by 3; here other sizes, e.g. the 8×8
      scikit-learn digits, keep padding 1.)
    - ReLU is not in place, so a functional forward with a non-leaf parameter vector stays differentiable.

    Args:
        num_classes: classifier outputs.
        in_chans: input channels.
        width: channels of every convolution (128 in MTT).
        depth: number of conv blocks (3 for 32×32, 4 for Tiny ImageNet, 5 for 128-pixel ImageNet subsets).
        norm: ``instancenorm`` (default), ``none`` or ``batchnorm``.
        image_size: side of the square input; fixes the classifier's input size.
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_chans: int = 3,
        width: int = 128,
        depth: int = 3,
        norm: Norm = "instancenorm",
        image_size: int = 32,
    ) -> None:
        super().__init__()
        if norm not in ("instancenorm", "none", "batchnorm"):
            raise ValueError(f"ConvNet.norm must be 'instancenorm', 'none' or 'batchnorm', got {norm!r}")
        if depth < 1 or width < 1 or num_classes < 1 or in_chans < 1:
            raise ValueError(
                f"ConvNet: depth ({depth}), width ({width}), num_classes ({num_classes}) and in_chans ({in_chans}) "
                "must be positive"
            )
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.width = width
        self.depth = depth
        self.norm = norm
        self.image_size = image_size
        first_pad = 3 if (in_chans == 1 and image_size == 28) else 1
        layers: list[nn.Module] = []
        side = image_size
        channels = in_chans
        for d in range(depth):
            pad = first_pad if d == 0 else 1
            layers.append(nn.Conv2d(channels, width, kernel_size=3, padding=pad))
            side = side + 2 * pad - 2
            if norm == "instancenorm":
                layers.append(nn.GroupNorm(width, width, affine=True))
            elif norm == "batchnorm":
                layers.append(nn.BatchNorm2d(width))
            layers += [nn.ReLU(inplace=False), nn.AvgPool2d(kernel_size=2, stride=2)]
            side //= 2
            channels = width
            if side < 1:
                raise ValueError(
                    f"ConvNet: image_size {image_size} is too small for depth {depth} (block {d + 1} leaves no pixels)"
                )
        self.features = nn.Sequential(*layers)
        self.feature_dim = width * side * side
        self.classifier = nn.Linear(self.feature_dim, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x).flatten(1))


class ConvNetModel(ModelSource):
    """Config source for :class:`ConvNet` (``class_path: zoo.models.convnet.ConvNetModel``).

    Args:
        depth, width, norm, image_size: see :class:`ConvNet` (defaults: MTT's ConvNet-3 for 32×32 images).
        num_classes, in_chans: default to the data set's.
        checkpoint: optional weights file (safetensors or a torch state dict).
    """

    def __init__(
        self,
        depth: int = 3,
        width: int = 128,
        norm: Norm = "instancenorm",
        image_size: int = 32,
        num_classes: int | None = None,
        in_chans: int | None = None,
        checkpoint: str | None = None,
    ) -> None:
        if norm not in ("instancenorm", "none", "batchnorm"):
            raise ValueError(f"ConvNetModel.norm must be 'instancenorm', 'none' or 'batchnorm', got {norm!r}")
        self.depth = depth
        self.width = width
        self.norm = norm
        self.image_size = image_size
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.checkpoint = checkpoint

    def build(self, num_classes: int | None = None, in_chans: int | None = None) -> nn.Module:
        model = ConvNet(
            num_classes=pick_size(self.num_classes, num_classes, 10),
            in_chans=pick_size(self.in_chans, in_chans, 3),
            width=self.width,
            depth=self.depth,
            norm=self.norm,
            image_size=self.image_size,
        )
        if self.checkpoint:
            load_weights(model, self.checkpoint, field="ConvNetModel.checkpoint")
        return model

    def describe(self) -> str:
        return f"convnet:D{self.depth}-w{self.width}-{self.norm}"
