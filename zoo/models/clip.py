"""open_clip models as zoo model sources, class-prompt text embeddings, and students mapped into a CLIP space.

A CLIP teacher is named like any other model::

    teacher: {class_path: zoo.models.clip.OpenCLIPModel, init_args: {name: ViT-B-16, pretrained: openai}}

The tiny CLIP of the digits configs is open_clip's ``CLIP`` class with every field of the architecture given in
``model_cfg`` (open_clip's ``model_configs/*.json`` fields), so it needs nothing but the package itself:
``DIGITS_CLIP_CFG`` holds the same values for Python users.

A VL2V-ADiP student is a backbone from any zoo source, a linear map P into the teacher's embedding space and the
teacher's class text embeddings kept as buffers, so that prediction needs the student's weights only::

    student:
      class_path: zoo.models.clip.CLIPSpaceStudentModel
      init_args:
        embed_dim: 512
        backbone: {class_path: zoo.models.TorchvisionModel, init_args: {name: resnet50, weights: IMAGENET1K_V1}}
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from zoo.models.sources import ModelSource, as_normalization, build_model, load_weights, source_from_config

__all__ = [
    "DIGITS_CLIP_CFG",
    "DIGIT_NAMES",
    "CLIPSpaceStudent",
    "CLIPSpaceStudentModel",
    "OpenCLIPModel",
    "class_text_embeddings",
    "clip_tokenizer",
    "feature_extractor",
]

#: The offline tiny CLIP of the VLM spec (§0): 16×16 RGB images in 4×4 patches, 16-token prompts, 32-d embeddings.
DIGITS_CLIP_CFG: dict[str, Any] = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 16, "patch_size": 4, "width": 64, "layers": 2, "head_width": 32},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}
#: Class names of the digits data, as words a text tower can read.
DIGIT_NAMES: tuple[str, ...] = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


class OpenCLIPModel(ModelSource):
    """An open_clip model (image and text towers), built with ``open_clip.create_model_and_transforms``.

    Args:
        name: an open_clip architecture (``open_clip.list_models()``: ``ViT-B-16``, ``ViT-B-16-quickgelu``,
            ``RN50`` ...) or one of open_clip's ``local-dir:<folder>`` / ``hf-hub:<repo>`` identifiers.
        pretrained: an open_clip pretrained tag (``openai``, ``laion2b_s34b_b88k`` ...; downloaded into
            ``cache_dir`` unless already there) or the path of a local weights file in open_clip's formats.
            ``None`` builds the architecture with random weights (then ``checkpoint`` usually gives them).
        model_cfg: fields of open_clip's model config that replace the architecture's (``embed_dim``,
            ``vision_cfg``, ``text_cfg``, ``quick_gelu`` ...). The digits configs give all of them: ``DIGITS_CLIP_CFG``.
        checkpoint: zoo weights loaded after creation (a safetensors file, or the Lightning checkpoint of a
            ``zoo.methods.CLIPContrastive`` run, whose ``student.`` keys are the CLIP).
        cache_dir: where open_clip keeps downloaded weights (its default cache when ``None``).
        num_classes: accepted so that the CLI can link the data's value; a CLIP has no class count.
        in_chans: must be 3 (or ``None``): CLIP image towers read RGB.
        mean, std: the input normalisation the weights expect. Default: open_clip's values for a ``pretrained``
            tag or file; ``None`` (whatever the data module produces) otherwise.

    ``build`` returns the open_clip model with its tokenizer attached as ``zoo_tokenizer`` (see :func:`clip_tokenizer`);
    the source keeps open_clip's train/eval image transforms in ``transforms`` after building.
    """

    def __init__(
        self,
        name: str,
        pretrained: str | None = None,
        model_cfg: dict[str, Any] | None = None,
        checkpoint: str | None = None,
        cache_dir: str | None = None,
        num_classes: int | None = None,
        in_chans: int | None = None,
        mean: list[float] | None = None,
        std: list[float] | None = None,
    ) -> None:
        self.name = name
        self.pretrained = pretrained
        self.model_cfg = copy.deepcopy(dict(model_cfg)) if model_cfg else None
        self.checkpoint = checkpoint
        self.cache_dir = cache_dir
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.mean = as_normalization(mean, "mean", "OpenCLIPModel")
        self.std = as_normalization(std, "std", "OpenCLIPModel")
        self.transforms: tuple[Any, Any] | None = None

    def build(self, num_classes: int | None = None, in_chans: int | None = None) -> nn.Module:
        import open_clip

        chans = self.in_chans if self.in_chans is not None else in_chans
        if chans not in (None, 3):
            raise ValueError(
                f"OpenCLIPModel({self.name!r}) reads 3-channel images but the data has {chans} channels; use a data "
                "module that yields RGB images (DomainBedDataModule does)"
            )
        # open_clip warns that a model without ``pretrained`` is random; with ``checkpoint`` the weights follow.
        quiet = self.checkpoint is not None and self.pretrained is None
        disabled = logging.root.manager.disable
        if quiet:
            logging.disable(max(disabled, logging.WARNING))
        try:
            model, train_tf, eval_tf = open_clip.create_model_and_transforms(
                self.name, pretrained=self.pretrained, cache_dir=self.cache_dir, **(self.model_cfg or {})
            )
        except RuntimeError as err:
            raise ValueError(f"OpenCLIPModel(name={self.name!r}, pretrained={self.pretrained!r}): {err}") from err
        finally:
            logging.disable(disabled)
        if self.checkpoint:
            load_weights(model, self.checkpoint, field="OpenCLIPModel.checkpoint")
        if self.pretrained and self.mean is None:
            cfg = open_clip.get_model_preprocess_cfg(model)
            if "mean" in cfg and "std" in cfg:
                self.mean, self.std = tuple(cfg["mean"]), tuple(cfg["std"])
        self.transforms = (train_tf, eval_tf)
        model.zoo_tokenizer = open_clip.get_tokenizer(self.name, context_length=model.context_length)
        return model

    def describe(self) -> str:
        suffix = f"@{self.pretrained}" if self.pretrained and "/" not in self.pretrained else ""
        if self.model_cfg:
            width = self.model_cfg.get("vision_cfg", {}).get("width")
            return f"open_clip:{self.name} (model_cfg: embed {self.model_cfg.get('embed_dim')}, width {width})"
        return f"open_clip:{self.name}{suffix}"


def clip_tokenizer(model: nn.Module) -> Callable[[Sequence[str]], Tensor]:
    """The tokenizer of an open_clip model: the one :class:`OpenCLIPModel` attached, else open_clip's BPE tokenizer
    (that of every OpenAI-style CLIP) at the model's context length."""
    tokenizer = getattr(model, "zoo_tokenizer", None)
    if tokenizer is not None:
        return tokenizer
    import open_clip

    return open_clip.get_tokenizer("ViT-B-16", context_length=getattr(model, "context_length", 77))


@torch.no_grad()
def class_text_embeddings(
    model: nn.Module,
    class_names: Sequence[str],
    templates: Sequence[str] = ("a photo of a {}",),
    tokenizer: Callable[[Sequence[str]], Tensor] | None = None,
) -> Tensor:
    """The zero-shot classifier of a CLIP: one unit vector per class, shape (C, D), in float32.

    For class c: e_c = normalize(mean_t normalize(text(template_t(c)))), with ``_`` in class names read as spaces
    (the VL2V-ADiP / CLIP zero-shot recipe). ``templates`` use ``{}`` for the class name.
    """
    if not class_names:
        raise ValueError("class_text_embeddings: class_names is empty")
    if not templates or any("{}" not in t for t in templates):
        raise ValueError(f"class_text_embeddings: every template needs a '{{}}' for the class name, got {templates}")
    tokenizer = tokenizer or clip_tokenizer(model)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    rows = []
    for name in class_names:
        words = str(name).replace("_", " ")
        tokens = tokenizer([t.format(words) for t in templates]).to(device)
        prompts = F.normalize(model.encode_text(tokens).float(), dim=-1)
        rows.append(F.normalize(prompts.mean(0), dim=0))
    model.train(was_training)
    return torch.stack(rows)


def feature_extractor(model: nn.Module) -> tuple[nn.Module, int]:
    """``model`` with its classifier removed, and the width of the features it then returns.

    timm models use ``reset_classifier(0)`` (their pooled pre-logits features); other models (torchvision, the CIFAR
    architectures) have their last ``nn.Linear`` replaced by an identity, so they return that layer's input.
    """
    if hasattr(model, "reset_classifier") and hasattr(model, "num_features"):
        model.reset_classifier(0)
        width = getattr(model, "head_hidden_size", None) or model.num_features
        return model, int(width)
    last = None
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            last = (name, module)
    if last is None:
        raise ValueError(f"feature_extractor: {type(model).__name__} has no nn.Linear classifier to remove")
    name, linear = last
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, nn.Identity())
    return model, linear.in_features


class CLIPSpaceStudent(nn.Module):
    """A backbone, a linear map P into a CLIP embedding space, and the teacher's class text embeddings as a head.

    û = normalize(P·g(x) + b); logits_c = s·⟨û, e_c⟩ with s = ``logit_scale`` (exp of the teacher's learnt logit
    scale: 100 for OpenAI CLIP) and e_c the class text embeddings. Both are buffers, so they travel with the
    student's checkpoint and prediction needs no teacher. They are zero until :meth:`set_text_head` fills them.

    Args:
        backbone: a feature extractor returning (B, feature_dim).
        feature_dim: width of the backbone's features.
        embed_dim: width of the CLIP embedding space.
        num_classes: number of classes of the text head.
        logit_scale: s before the teacher's value is set.
    """

    def __init__(
        self, backbone: nn.Module, feature_dim: int, embed_dim: int, num_classes: int, logit_scale: float = 100.0
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.projection = nn.Linear(feature_dim, embed_dim)
        self.num_classes = num_classes
        self.register_buffer("class_embeddings", torch.zeros(num_classes, embed_dim))
        self.register_buffer("logit_scale", torch.tensor(float(logit_scale)))
        self._head_ready = False

    @property
    def embed_dim(self) -> int:
        return self.projection.out_features

    @property
    def has_text_head(self) -> bool:
        """Whether the class text embeddings have been set (or loaded from a checkpoint)."""
        return self._head_ready

    def set_text_head(self, class_embeddings: Tensor, logit_scale: float | Tensor) -> None:
        """Stores the (C, D) class embeddings (normalised here) and the logit scale s."""
        if tuple(class_embeddings.shape) != tuple(self.class_embeddings.shape):
            raise ValueError(
                f"CLIPSpaceStudent.set_text_head: expected class embeddings of shape "
                f"{tuple(self.class_embeddings.shape)} (classes, embed_dim), got {tuple(class_embeddings.shape)}"
            )
        with torch.no_grad():
            self.class_embeddings.copy_(F.normalize(class_embeddings.float(), dim=-1))
            self.logit_scale.fill_(float(logit_scale))
        self._head_ready = True

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        key = prefix + "class_embeddings"
        if key in state_dict:
            self._head_ready = bool(state_dict[key].abs().sum() > 0)

    def embed(self, x: Tensor) -> Tensor:
        """û: the unit-norm projected features, (B, embed_dim)."""
        return F.normalize(self.projection(self.backbone(x)), dim=-1)

    def classify(self, embedding: Tensor) -> Tensor:
        """s·⟨û, e_c⟩ for unit-norm embeddings û (B, D) -> (B, C)."""
        if not self._head_ready:
            raise RuntimeError(
                "CLIPSpaceStudent: the text head is not set; train it with VL2VADiP (which computes the class text "
                "embeddings from the teacher) or load a checkpoint that holds student.class_embeddings"
            )
        return self.logit_scale * embedding @ self.class_embeddings.to(embedding.dtype).t()

    def forward(self, x: Tensor) -> Tensor:
        return self.classify(self.embed(x))


class CLIPSpaceStudentModel(ModelSource):
    """A :class:`CLIPSpaceStudent` over any zoo backbone source: the student of VL2V-ADiP.

    The backbone is built with its own class count (so its pretrained head loads), then its classifier is removed
    (:func:`feature_extractor`). P is a fresh ``nn.Linear``; the text head is set by the method.

    Args:
        backbone: the backbone's source (``TimmModel``, ``TorchvisionModel``, ``zoo.hub.Pretrained`` ...).
        embed_dim: width of the teacher's embedding space (512 for CLIP ViT-B/16, 32 for the digits CLIP).
        num_classes: classes of the text head; defaults to the data's.
        in_chans: input channels; default the data's.
        logit_scale: s before the teacher's value is set (100, OpenAI CLIP's).
    """

    def __init__(
        self,
        backbone: ModelSource,
        embed_dim: int,
        num_classes: int | None = None,
        in_chans: int | None = None,
        logit_scale: float = 100.0,
    ) -> None:
        if isinstance(backbone, Mapping):
            backbone = source_from_config(backbone)
        if not isinstance(backbone, ModelSource):
            raise TypeError(
                f"CLIPSpaceStudentModel.backbone: expected a zoo.models source, got {type(backbone).__name__}"
            )
        if embed_dim < 1:
            raise ValueError(f"CLIPSpaceStudentModel.embed_dim must be ≥ 1, got {embed_dim}")
        self.backbone = backbone
        self.embed_dim = embed_dim
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.logit_scale = logit_scale

    @property  # type: ignore[override]
    def mean(self) -> tuple[float, ...] | None:
        return self.backbone.mean

    @property  # type: ignore[override]
    def std(self) -> tuple[float, ...] | None:
        return self.backbone.std

    def build(self, num_classes: int | None = None, in_chans: int | None = None) -> nn.Module:
        classes = self.num_classes if self.num_classes is not None else num_classes
        if classes is None:
            raise ValueError("CLIPSpaceStudentModel.num_classes: not given and the data did not give it")
        chans = self.in_chans if self.in_chans is not None else in_chans
        net, width = feature_extractor(build_model(self.backbone, num_classes=None, in_chans=chans))
        return CLIPSpaceStudent(net, width, self.embed_dim, classes, self.logit_scale)

    def describe(self) -> str:
        return f"clip-space({self.backbone.describe()} → {self.embed_dim})"

    def to_config(self) -> dict[str, Any]:
        config = super().to_config()
        config["init_args"]["backbone"] = self.backbone.to_config()
        return config
