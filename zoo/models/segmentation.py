"""Segmentation model sources: segmentation_models_pytorch, torchvision, and an optional mmsegmentation adapter.

Every source builds a network whose ``forward(x)`` returns logits (N, classes, H, W) at the input's size. The
losses read the rest by module path (:func:`segmentation_taps`):

- ``logits``: the output of the final classifier conv, before upsampling (stride 4 or 8), which CWD and pixel KD
  compare (mmrazor taps ``decode_head.conv_seg`` the same way);
- ``features``: the decoder feature that conv reads (MGD's content loss);
- ``aux``: the auxiliary head's logits, where the model has one.

A different ``in_chans`` resizes the stem (LAD's label channel): segmentation_models_pytorch adapts its first conv
itself, torchvision models go through :func:`expand_input_channels`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from zoo.models.sources import ModelSource, as_normalization, load_weights, pick_size

__all__ = [
    "MMSegModel",
    "SMPModel",
    "TorchvisionSegmentationModel",
    "expand_input_channels",
    "segmentation_taps",
]

_SMP_ARCHS = (
    "Unet",
    "UnetPlusPlus",
    "FPN",
    "PSPNet",
    "DeepLabV3",
    "DeepLabV3Plus",
    "Linknet",
    "MAnet",
    "PAN",
    "UPerNet",
    "Segformer",
    "DPT",
)
_IMAGENET_MEAN, _IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class SMPModel(ModelSource):
    """A segmentation_models_pytorch model: ``arch`` over any encoder (``resnet18``, ``tu-resnet18d`` for timm).

    Args:
        arch: a segmentation_models_pytorch class name (``DeepLabV3Plus``, ``PSPNet``, ``FPN``, ``UPerNet``,
            ``Segformer``, ``Unet`` ...).
        encoder: encoder name; ``tu-<timm name>`` takes any timm model with ``features_only``.
        encoder_weights: ``imagenet`` (or another tag smp knows) downloads weights unless cached; ``None`` in CI.
        num_classes, in_chans: default to the data set's.
        checkpoint: local weights file loaded after creation (safetensors, torch file or a zoo Lightning ckpt).
        model_kwargs: extra arguments for the smp class (``encoder_depth``, ``decoder_channels``,
            ``encoder_output_stride`` ...).
        mean, std: the normalisation the weights expect; ImageNet's when ``encoder_weights`` is set.
    """

    def __init__(
        self,
        arch: str,
        encoder: str = "resnet18",
        encoder_weights: str | None = None,
        num_classes: int | None = None,
        in_chans: int | None = None,
        checkpoint: str | None = None,
        model_kwargs: dict[str, Any] | None = None,
        mean: list[float] | None = None,
        std: list[float] | None = None,
    ) -> None:
        if arch not in _SMP_ARCHS:
            raise ValueError(f"SMPModel.arch: unknown architecture {arch!r}; expected one of {list(_SMP_ARCHS)}")
        self.arch = arch
        self.encoder = encoder
        self.encoder_weights = encoder_weights
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.checkpoint = checkpoint
        self.model_kwargs = dict(model_kwargs or {})
        self.mean = as_normalization(mean, "mean", "SMPModel")
        self.std = as_normalization(std, "std", "SMPModel")
        if encoder_weights and self.mean is None:
            self.mean, self.std = _IMAGENET_MEAN, _IMAGENET_STD

    def build(self, num_classes: int | None = None, in_chans: int | None = None) -> nn.Module:
        import segmentation_models_pytorch as smp

        cls = getattr(smp, self.arch)
        try:
            model = cls(
                encoder_name=self.encoder,
                encoder_weights=self.encoder_weights,
                in_channels=pick_size(self.in_chans, in_chans, 3),
                classes=pick_size(self.num_classes, num_classes, 21),
                **self.model_kwargs,
            )
        except (KeyError, ValueError, RuntimeError) as err:
            raise ValueError(f"SMPModel({self.arch}, encoder={self.encoder!r}): cannot build: {err}") from err
        if self.checkpoint:
            load_weights(model, self.checkpoint, field="SMPModel.checkpoint")
        return model

    def describe(self) -> str:
        return f"smp:{self.arch}-{self.encoder}"


class TorchvisionSegmentation(nn.Module):
    """A torchvision segmentation model whose ``forward`` returns the ``out`` logits (its ``aux`` is a tap)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)["out"]


class TorchvisionSegmentationModel(ModelSource):
    """A torchvision segmentation model (``fcn_resnet50``, ``deeplabv3_resnet101``, ``lraspp_mobilenet_v3_large``...).

    torchvision has no dilated ResNet-18 (its BasicBlock rejects dilation); use :class:`SMPModel` with
    ``tu-resnet18d`` and ``encoder_output_stride: 8`` for the R18 students of the segmentation KD tables.

    Args:
        name: a torchvision segmentation model name.
        weights: torchvision weights of the whole model (e.g. ``COCO_WITH_VOC_LABELS_V1``) or ``None``.
        weights_backbone: ImageNet weights of the backbone (e.g. ``IMAGENET1K_V1``) or ``None``.
        aux_loss: build the auxiliary FCN head (its logits are the ``aux`` tap).
        num_classes, in_chans: default to the data set's; ``in_chans`` ≠ 3 widens the stem
            (:func:`expand_input_channels`).
        checkpoint: local weights file loaded after creation.
        mean, std: normalisation the weights expect (ImageNet's when weights are set).
    """

    def __init__(
        self,
        name: str,
        weights: str | None = None,
        weights_backbone: str | None = None,
        aux_loss: bool = False,
        num_classes: int | None = None,
        in_chans: int | None = None,
        checkpoint: str | None = None,
        mean: list[float] | None = None,
        std: list[float] | None = None,
    ) -> None:
        self.name = name
        self.weights = weights
        self.weights_backbone = weights_backbone
        self.aux_loss = aux_loss
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.checkpoint = checkpoint
        self.mean = as_normalization(mean, "mean", "TorchvisionSegmentationModel")
        self.std = as_normalization(std, "std", "TorchvisionSegmentationModel")
        if (weights or weights_backbone) and self.mean is None:
            self.mean, self.std = _IMAGENET_MEAN, _IMAGENET_STD

    def build(self, num_classes: int | None = None, in_chans: int | None = None) -> nn.Module:
        import torchvision

        names = torchvision.models.list_models(module=torchvision.models.segmentation)
        if self.name not in names:
            raise ValueError(f"TorchvisionSegmentationModel.name: unknown model {self.name!r}; expected one of {names}")
        kwargs: dict[str, Any] = {"weights": self.weights, "weights_backbone": self.weights_backbone}
        if not self.name.startswith("lraspp"):
            kwargs["aux_loss"] = self.aux_loss
        elif self.aux_loss:
            raise ValueError("TorchvisionSegmentationModel.aux_loss: LRASPP has no auxiliary head")
        classes = self.num_classes if self.num_classes is not None else num_classes
        if classes is not None:
            kwargs["num_classes"] = classes
        model = torchvision.models.get_model(self.name, **kwargs)
        chans = pick_size(self.in_chans, in_chans, 3)
        if chans != 3:
            expand_input_channels(model, chans)
        wrapped = TorchvisionSegmentation(model)
        if self.checkpoint:
            load_weights(wrapped, self.checkpoint, field="TorchvisionSegmentationModel.checkpoint")
        return wrapped

    def describe(self) -> str:
        return f"torchvision:{self.name}"


class MMSegSegmentation(nn.Module):
    """An mmsegmentation ``EncoderDecoder`` whose ``forward`` returns logits at the input size."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        h, w = x.shape[-2:]
        metas = [dict(img_shape=(h, w), ori_shape=(h, w), pad_shape=(h, w))] * x.shape[0]
        return self.model.encode_decode(x, metas)


class MMSegModel(ModelSource):
    """An mmsegmentation model from its config file (optional: ``pip install distill-zoo[mmseg]``).

    Built with ``mmseg.apis.init_model``; its taps are ``model.decode_head.conv_seg`` (pre-upsampling logits) and
    ``model.auxiliary_head.conv_seg``. mmsegmentation is never required: mmseg 1.2 needs mmcv < 2.2, which has no
    wheels for current torch, and ``mmcv-lite`` lacks the compiled ops that ``mmseg.models`` imports.

    Args:
        config: path to an mmseg config file.
        checkpoint: an mmseg checkpoint (loaded by mmseg) or ``None``.
        num_classes: overrides the config's decode/auxiliary head classes when given (the data's otherwise).
        mean, std: normalisation the weights expect (mmseg configs usually use ImageNet's on 0–255 pixels).
    """

    def __init__(
        self,
        config: str,
        checkpoint: str | None = None,
        num_classes: int | None = None,
        mean: list[float] | None = None,
        std: list[float] | None = None,
    ) -> None:
        self.config = config
        self.checkpoint = checkpoint
        self.num_classes = num_classes
        self.mean = as_normalization(mean, "mean", "MMSegModel")
        self.std = as_normalization(std, "std", "MMSegModel")

    def build(self, num_classes: int | None = None, in_chans: int | None = None) -> nn.Module:
        try:
            from mmengine import Config
            from mmseg.apis import init_model
        except ImportError as err:
            raise ImportError(
                "MMSegModel needs mmsegmentation (pip install 'distill-zoo[mmseg]'), which does not install on "
                f"current torch in every environment; use SMPModel or TorchvisionSegmentationModel instead ({err})"
            ) from err
        cfg = Config.fromfile(self.config)
        classes = self.num_classes if self.num_classes is not None else num_classes
        if classes is not None:
            for head in ("decode_head", "auxiliary_head"):
                sub = cfg.model.get(head)
                for item in sub if isinstance(sub, list) else [sub] if sub else []:
                    item["num_classes"] = classes
        cfg.model.pop("data_preprocessor", None)
        model = init_model(cfg, self.checkpoint, device="cpu")
        return MMSegSegmentation(model)

    def describe(self) -> str:
        return f"mmseg:{self.config}"


def expand_input_channels(model: nn.Module, in_chans: int) -> nn.Conv2d:
    """Replaces the first ``Conv2d`` of ``model`` by one with ``in_chans`` inputs; returns the new conv.

    The first min(old, new) input filters are kept and added channels get zero weights, so a widened network
    computes what the original did until training moves them (LAD's label channel).

    Example:
        >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU())
        >>> expand_input_channels(net, 4).weight.shape
        torch.Size([8, 4, 3, 3])
    """
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            break
    else:
        raise ValueError(f"expand_input_channels: {type(model).__name__} has no Conv2d")
    if module.in_channels == in_chans:
        return module
    if module.groups != 1:
        raise ValueError(f"expand_input_channels: the first conv {name!r} is grouped")
    new = nn.Conv2d(
        in_chans,
        module.out_channels,
        module.kernel_size,
        module.stride,
        module.padding,
        module.dilation,
        bias=module.bias is not None,
        padding_mode=module.padding_mode,
    )
    with torch.no_grad():
        new.weight.zero_()
        keep = min(in_chans, module.in_channels)
        new.weight[:, :keep] = module.weight[:, :keep]
        if module.bias is not None:
            new.bias.copy_(module.bias)
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)
    return new


def segmentation_taps(model: nn.Module) -> dict[str, str | None]:
    """Module paths of a segmentation network's ``logits`` (pre-upsampling), ``features`` and ``aux`` taps.

    Knows segmentation_models_pytorch (``segmentation_head.0``), torchvision (``model.classifier``) and mmseg
    (``model.decode_head.conv_seg``); other networks need the paths given explicitly.
    """
    if isinstance(getattr(model, "segmentation_head", None), nn.Sequential):
        return {"logits": "segmentation_head.0", "features": "segmentation_head.0:input", "aux": None}
    if isinstance(model, TorchvisionSegmentation):
        classifier = model.model.classifier
        aux = "model.aux_classifier" if getattr(model.model, "aux_classifier", None) is not None else None
        if isinstance(classifier, nn.Sequential) and isinstance(classifier[-1], nn.Conv2d):
            last = f"model.classifier.{len(classifier) - 1}"
            return {"logits": last, "features": f"{last}:input", "aux": aux}
        return {"logits": "model.classifier", "features": None, "aux": aux}
    if isinstance(model, MMSegSegmentation):
        aux = "model.auxiliary_head.conv_seg" if getattr(model.model, "auxiliary_head", None) is not None else None
        return {"logits": "model.decode_head.conv_seg", "features": "model.decode_head.conv_seg:input", "aux": aux}
    raise ValueError(
        f"cannot find the segmentation taps of {type(model).__name__}: give the module paths explicitly "
        "(logits_tap / features_tap / aux_tap)"
    )
