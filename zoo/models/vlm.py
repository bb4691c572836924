"""Vision-language models as model sources: the zoo's LLaVA-style model and real Hugging Face VLMs.

Both build a :class:`VisionLanguageModel`: ``forward(input_ids, attention_mask, **images)`` returns a
:class:`VLMOutput` with the logits (B, L, V) and the visual positions (B, L), which are exactly
``input_ids == image_token_id`` (the data expands each image to its visual tokens, see ``zoo.data.vqa``), so losses
read the logits *at* the image tokens without guessing offsets::

    student:
      class_path: zoo.models.vlm.LlavaModel
      init_args:
        vision: {library: timm, name: vit_tiny_patch16_224, img_size: 16, patch_size: 4, embed_dim: 64, depth: 2,
                 num_heads: 2}
        language_model: {model_type: qwen2, vocab_size: 32, hidden_size: 64, intermediate_size: 128,
                         num_hidden_layers: 2, num_attention_heads: 4, num_key_value_heads: 2}
    teacher:
      class_path: zoo.models.vlm.HFVisionLanguageModel
      init_args: {path: /models/Qwen2.5-VL-3B-Instruct, dtype: bfloat16}

transformers is imported inside the builders, so ``import zoo`` stays light.
"""

from __future__ import annotations

import inspect
import os
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from zoo.models.moe import MoEConfig, moe_layers, upcycle
from zoo.models.sources import ModelSource, read_state_dict

__all__ = ["HFVLM", "HFVisionLanguageModel", "LlavaModel", "LlavaStyleVLM", "VLMOutput", "VisionLanguageModel"]

IMAGE_TOKEN_INDEX = -200  # zoo.data.vqa.IMAGE_TOKEN_INDEX (not imported: the data package pulls in more)


@dataclass
class VLMOutput:
    """Logits (B, L, V), visual positions (B, L) bool, and the MoE layers' load-balancing losses of this forward."""

    logits: Tensor
    visual_mask: Tensor
    aux_losses: list[Tensor] = field(default_factory=list)


def _dtype(name: str | None) -> torch.dtype | None:
    if name is None:
        return None
    value = getattr(torch, str(name).replace("torch.", ""), None)
    if not isinstance(value, torch.dtype):
        raise ValueError(f"dtype: {name!r} is not a torch dtype (float32, bfloat16, float16)")
    return value


class VisionLanguageModel(nn.Module, ABC):
    """What every VLM gives the VLM methods.

    Attributes:
        vocab_size: rows of the output logits.
        image_token_id: the id that marks visual positions in ``input_ids``.
        num_visual_tokens: visual tokens per image, or ``None`` when it depends on the image (Qwen2-VL).
        eos_token_id: end of an answer (for generation), when known.
    """

    vocab_size: int
    image_token_id: int
    num_visual_tokens: int | None = None
    eos_token_id: int | None = None
    name: str = "vlm"

    #: (group, parameter-name prefixes) rules; the first match names a parameter's group.
    group_rules: tuple[tuple[str, tuple[str, ...]], ...] = ()

    def group_of(self, name: str) -> str | None:
        """``vision_tower``, ``projector`` or ``language_model`` for a parameter name (``None`` if none applies)."""
        for group, prefixes in self.group_rules:
            if name.startswith(prefixes):
                return group
        return None

    @abstractmethod
    def language_model(self) -> nn.Module:
        """The causal language model whose FFNs MoE upcycling replaces."""

    @abstractmethod
    def generate(self, input_ids: Tensor, attention_mask: Tensor, max_new_tokens: int = 16, **images: Tensor) -> Tensor:
        """Greedy decoding from left-padded prompts; returns the new tokens (B, T), padded after EOS with EOS."""


class LlavaStyleVLM(VisionLanguageModel):
    """Vision tower → projector → causal LM fed ``inputs_embeds`` (LLaVA-1.5's architecture).

    The tower's ``select_layer`` output (patch tokens, CLS and other prefix tokens dropped) goes through the projector;
    the projected features replace the embeddings at the visual positions, in order. The tower runs without gradient
    and stays in eval mode while it is frozen.
    """

    def __init__(
        self,
        vision_tower: nn.Module,
        projector: nn.Module,
        language_model: nn.Module,
        select_layer: int,
        library: str,
        image_token_id: int = IMAGE_TOKEN_INDEX,
        name: str = "llava",
        feature_norm: bool = False,
    ) -> None:
        super().__init__()
        self.vision_tower, self.projector, self.lm = vision_tower, projector, language_model
        self.feature_norm = feature_norm
        self.select_layer, self.library, self.image_token_id, self.name = select_layer, library, image_token_id, name
        config = language_model.config
        self.vocab_size = int(language_model.get_output_embeddings().out_features)
        self.eos_token_id = getattr(config, "eos_token_id", None)
        if library == "timm":
            self.num_visual_tokens = int(vision_tower.patch_embed.num_patches)
        else:
            grid = vision_tower.grid_size
            self.num_visual_tokens = int(grid[0] * grid[1])

    group_rules = (("vision_tower", ("vision_tower.",)), ("projector", ("projector.",)), ("language_model", ("lm.",)))

    def language_model(self) -> nn.Module:
        return self.lm

    @property
    def vision_frozen(self) -> bool:
        return not any(p.requires_grad for p in self.vision_tower.parameters())

    def train(self, mode: bool = True) -> LlavaStyleVLM:
        super().train(mode)
        if self.vision_frozen:
            self.vision_tower.eval()
        return self

    def encode_images(self, pixel_values: Tensor) -> Tensor:
        """(N, C, H, W) → (N, K, d_lm): the selected layer's patch tokens, projected."""
        index = self.select_layer if self.select_layer < 0 else self.select_layer - 1
        dtype = next(self.vision_tower.parameters()).dtype
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.vision_frozen):
            x = pixel_values.to(dtype)
            if self.library == "timm":
                feats = self.vision_tower.forward_intermediates(
                    x, indices=[index], norm=self.feature_norm, output_fmt="NLC", intermediates_only=True,
                    stop_early=True,
                )[0]
            else:
                feats = self.vision_tower.forward_intermediates(
                    x, indices=[index], normalize_intermediates=self.feature_norm, output_fmt="NLC",
                    intermediates_only=True, stop_early=True,
                )["image_intermediates"][0]
        proj_dtype = next(self.projector.parameters()).dtype
        return self.projector(feats.to(proj_dtype))

    def embed(self, input_ids: Tensor, pixel_values: Tensor | None = None) -> tuple[Tensor, Tensor]:
        visual = input_ids == self.image_token_id
        embeds = self.lm.get_input_embeddings()(input_ids.masked_fill(visual, 0))
        n_visual = int(visual.sum())
        if n_visual:
            if pixel_values is None:
                raise ValueError(f"{self.name}: the batch has {n_visual} visual tokens but no pixel_values")
            feats = self.encode_images(pixel_values)
            if feats.shape[0] * feats.shape[1] != n_visual:
                raise ValueError(
                    f"{self.name}: {pixel_values.shape[0]} images give {feats.shape[0]}×{feats.shape[1]} visual "
                    f"features but input_ids hold {n_visual} image tokens; the data's image_tokens must be "
                    f"{self.num_visual_tokens} per image"
                )
            embeds = embeds.masked_scatter(visual[..., None], feats.to(embeds.dtype))
        return embeds, visual

    def forward(
        self, input_ids: Tensor, attention_mask: Tensor | None = None, pixel_values: Tensor | None = None, **_: Any
    ) -> VLMOutput:
        embeds, visual = self.embed(input_ids, pixel_values)
        out = self.lm(inputs_embeds=embeds, attention_mask=attention_mask, use_cache=False)
        return VLMOutput(out.logits, visual, [m.l_aux for m in moe_layers(self.lm)])

    @torch.no_grad()
    def generate(self, input_ids: Tensor, attention_mask: Tensor, max_new_tokens: int = 16,
                 pixel_values: Tensor | None = None, **_: Any) -> Tensor:
        embeds, _ = self.embed(input_ids, pixel_values)
        eos = self.eos_token_id
        out = self.lm.generate(
            inputs_embeds=embeds, attention_mask=attention_mask, max_new_tokens=max_new_tokens, do_sample=False,
            eos_token_id=eos, pad_token_id=eos if eos is not None else 0,
        )
        return out


def _build_vision(spec: Mapping[str, Any], in_chans: int | None) -> tuple[nn.Module, str, int, str]:
    """(tower, library, feature width, short name) from a ``vision`` mapping."""
    spec = dict(spec)
    library = spec.pop("library", "timm")
    if library == "timm":
        import timm

        name = spec.pop("name", None)
        if not name:
            raise ValueError("LlavaModel.vision: a timm tower needs 'name' (e.g. vit_base_patch16_224)")
        pretrained, checkpoint = bool(spec.pop("pretrained", False)), spec.pop("checkpoint", None)
        spec.setdefault("num_classes", 0)
        spec.setdefault("global_pool", "")
        if in_chans is not None:
            spec.setdefault("in_chans", in_chans)
        tower = timm.create_model(name, pretrained=pretrained, **spec)
        if checkpoint:
            tower.load_state_dict(read_state_dict(checkpoint, field="LlavaModel.vision.checkpoint"))
        if not hasattr(tower, "forward_intermediates") or not hasattr(tower, "patch_embed"):
            raise ValueError(f"LlavaModel.vision: timm model {name!r} is not a ViT with forward_intermediates")
        return tower, "timm", int(tower.embed_dim), f"timm:{name}"
    if library == "open_clip":
        import open_clip

        if "config" in spec:
            from open_clip.model import CLIPVisionCfg, _build_vision_tower

            config = dict(spec.pop("config"))
            embed_dim = int(config.pop("embed_dim", 512))
            tower = _build_vision_tower(embed_dim, CLIPVisionCfg(**config))
            name = "open_clip:custom"
        else:
            model_name = spec.pop("name", None)
            if not model_name:
                raise ValueError("LlavaModel.vision: an open_clip tower needs 'name' (e.g. ViT-L-14-336) or 'config'")
            clip = open_clip.create_model(model_name, pretrained=spec.pop("pretrained", None))
            tower, name = clip.visual, f"open_clip:{model_name}"
        if spec:
            raise ValueError(f"LlavaModel.vision: unknown open_clip options {sorted(spec)}")
        return tower, "open_clip", int(tower.transformer.width), name
    raise ValueError(f"LlavaModel.vision.library must be 'timm' or 'open_clip', got {library!r}")


def _build_language_model(spec: Mapping[str, Any] | str, dtype: torch.dtype | None) -> tuple[nn.Module, str]:
    from transformers import AutoConfig, AutoModelForCausalLM

    if isinstance(spec, (str, os.PathLike)):
        folder = Path(spec)
        if not folder.is_dir():
            raise FileNotFoundError(f"LlavaModel.language_model: {spec!r} is not a local model folder")
        model = AutoModelForCausalLM.from_pretrained(str(folder), local_files_only=True, dtype=dtype)
        return model, folder.name
    options = dict(spec)
    model_type = options.pop("model_type", "qwen2")
    config = AutoConfig.for_model(model_type, **options)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model, f"{model_type}(h={config.hidden_size}, L={config.num_hidden_layers})"


def _projector(kind: str, d_in: int, d_out: int) -> nn.Module:
    if kind == "linear":
        return nn.Linear(d_in, d_out)
    if kind == "mlp2x_gelu":
        return nn.Sequential(nn.Linear(d_in, d_out), nn.GELU(), nn.Linear(d_out, d_out))
    raise ValueError(f"LlavaModel.projector must be 'mlp2x_gelu' or 'linear', got {kind!r}")


def _read(path: str, field: str) -> dict[str, Tensor]:
    """``read_state_dict`` that also accepts checkpoints of ``zoo fit``, whose callbacks store numpy RNG states."""
    import numpy as np
    import numpy.dtypes

    allowed = [np._core.multiarray._reconstruct, np.ndarray, np.dtype, numpy.dtypes.UInt32DType]
    with torch.serialization.safe_globals(allowed):
        return read_state_dict(path, field=field)


def _load_state(model: nn.Module, path: str, field: str) -> dict[str, Tensor]:
    state = _read(path, field)
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k}: {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own if k in state
              and state[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        raise ValueError(
            f"{field}: {path} does not fit {type(model).__name__}: {len(missing)} missing keys {missing[:4]}, "
            f"{len(unexpected)} unexpected {unexpected[:4]}, {len(shapes)} shape mismatches {shapes[:2]}"
        )
    model.load_state_dict(state)
    return state


def _has_experts(path: str, field: str) -> bool:
    return any(".experts." in k for k in _read(path, field))


class LlavaModel(ModelSource):
    """A LLaVA-style VLM: a timm or open_clip ViT, a projector, and any transformers causal LM.

    Args:
        vision: the tower. ``{library: timm, name: <timm ViT>, pretrained: false, checkpoint: ..., <create_model
            kwargs>}`` or ``{library: open_clip, name: ViT-L-14-336, pretrained: openai}`` or ``{library: open_clip,
            config: {embed_dim, image_size, patch_size, width, layers, head_width}}`` (a tiny offline CLIP tower).
        language_model: a transformers config as a mapping (``model_type`` defaults to ``qwen2``; built with random
            weights, no download) or a local folder for ``AutoModelForCausalLM.from_pretrained``.
        projector: ``mlp2x_gelu`` (LLaVA-1.5: Linear-GELU-Linear) or ``linear``.
        select_layer: the tower layer whose patch tokens are used, as LLaVA's ``mm_vision_select_layer``: −1 the
            last block, −2 the one before (default, LLaVA-1.5); k > 0 the output of block k. CLS is dropped.
        feature_norm: apply the tower's final norm to the selected tokens (with ``select_layer: -1`` this is timm's
            ``forward_features``, the digits testbed's features); LLaVA reads the raw hidden state (false).
        freeze_vision: the tower gets no gradient (LLaVA, LLaVA-KD and LLaVA-MoD keep it frozen).
        image_token_id: the id marking visual positions (:data:`zoo.data.vqa.IMAGE_TOKEN_INDEX`, never embedded).
        in_chans: image channels of a timm tower (default: the data's).
        dtype: weight dtype of the whole model (``bfloat16`` for a large teacher); default float32.
        checkpoint: weights to load: a Lightning checkpoint of a zoo run (its student), or a state dict file.
        moe: sparse-MoE upcycling of the LM's FFNs (``zoo.models.moe.MoEConfig`` fields, e.g. ``{num_experts: 4,
            top_k: 2}``). A dense ``checkpoint`` is loaded before upcycling (LLaVA-MoD's dense→sparse start), an
            upcycled one after.
    """

    def __init__(
        self,
        vision: dict[str, Any],
        language_model: dict[str, Any] | str,
        projector: Literal["mlp2x_gelu", "linear"] = "mlp2x_gelu",
        select_layer: int = -2,
        feature_norm: bool = False,
        freeze_vision: bool = True,
        image_token_id: int = IMAGE_TOKEN_INDEX,
        in_chans: int | None = None,
        dtype: str | None = None,
        checkpoint: str | None = None,
        moe: dict[str, Any] | None = None,
    ) -> None:
        if select_layer == 0:
            raise ValueError("LlavaModel.select_layer: 0 is the patch embedding, not a block; use −1, −2 or k ≥ 1")
        if projector not in ("mlp2x_gelu", "linear"):
            raise ValueError(f"LlavaModel.projector must be 'mlp2x_gelu' or 'linear', got {projector!r}")
        _dtype(dtype)
        self.vision, self.language_model, self.projector = dict(vision), language_model, projector
        if isinstance(language_model, Mapping):
            self.language_model = dict(language_model)
        self.select_layer, self.feature_norm = select_layer, feature_norm
        self.freeze_vision, self.image_token_id = freeze_vision, image_token_id
        self.in_chans, self.dtype, self.checkpoint = in_chans, dtype, checkpoint
        self.moe = MoEConfig.from_dict(moe).to_dict() if moe is not None else None

    def build(self, num_classes: int | None = None, in_chans: int | None = None) -> LlavaStyleVLM:
        dtype = _dtype(self.dtype)
        tower, library, width, vision_name = _build_vision(self.vision, self.in_chans or in_chans)
        depth = len(tower.blocks) if library == "timm" else len(tower.transformer.resblocks)
        if not (-depth <= self.select_layer <= depth):
            raise ValueError(f"LlavaModel.select_layer {self.select_layer} is outside the tower's {depth} blocks")
        lm, lm_name = _build_language_model(self.language_model, None)
        model = LlavaStyleVLM(
            tower, _projector(self.projector, width, int(lm.config.hidden_size)), lm, self.select_layer, library,
            self.image_token_id, name=f"llava[{vision_name} + {lm_name}]", feature_norm=self.feature_norm,
        )
        field = "LlavaModel.checkpoint"
        if self.moe is not None and self.checkpoint and not _has_experts(self.checkpoint, field):
            _load_state(model, self.checkpoint, field)
            upcycle(model.lm, self.moe)
        else:
            if self.moe is not None:
                upcycle(model.lm, self.moe)
            if self.checkpoint:
                _load_state(model, self.checkpoint, field)
        if self.freeze_vision:
            model.vision_tower.requires_grad_(False)
            model.vision_tower.eval()
        if dtype is not None:
            model.to(dtype)
        return model

    def describe(self) -> str:
        lm = self.language_model
        lm_name = Path(lm).name if isinstance(lm, str) else (
            f"{lm.get('model_type', 'qwen2')}-h{lm.get('hidden_size')}-L{lm.get('num_hidden_layers')}")
        moe = f"+moe{self.moe['num_experts']}x{self.moe['top_k']}" if self.moe else ""
        vision = self.vision.get("name", "custom")
        return f"llava:{vision}+{lm_name}{moe}"


# Parameter-name rules of the Hugging Face VLM classes: (group, prefixes). The first match wins.
_HF_GROUPS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("projector", ("hf.model.multi_modal_projector.", "hf.model.visual.merger.", "hf.multi_modal_projector.")),
    ("vision_tower", ("hf.model.vision_tower.", "hf.model.visual.", "hf.vision_tower.", "hf.visual.")),
    ("language_model", ("hf.model.language_model.", "hf.lm_head.", "hf.language_model.")),
)


class HFVLM(VisionLanguageModel):
    """A Hugging Face image-text-to-text model (``LlavaForConditionalGeneration``, ``Qwen2VLForConditionalGeneration``,
    ``Qwen2_5_VLForConditionalGeneration`` ...) behind the :class:`VisionLanguageModel` interface. Visual positions
    are ``input_ids == config.image_token_id`` (``image_token_index`` for LLaVA); the processor has expanded them."""

    def __init__(self, model: nn.Module, name: str = "hf") -> None:
        super().__init__()
        self.hf, self.name = model, name
        config = model.config
        token = getattr(config, "image_token_id", None)
        self.image_token_id = int(token if token is not None else config.image_token_index)
        self.vocab_size = int(model.get_output_embeddings().out_features)
        text = getattr(config, "text_config", None) or config
        self.eos_token_id = getattr(text, "eos_token_id", None) or getattr(config, "eos_token_id", None)
        self.num_visual_tokens = None
        # Qwen2-VL-style models need the token types (1: image, 2: video) for their multimodal RoPE.
        self._token_types = "mm_token_type_ids" in inspect.signature(model.forward).parameters
        self.video_token_id = getattr(config, "video_token_id", None)

    group_rules = _HF_GROUPS

    def _inputs(self, input_ids: Tensor, images: dict[str, Tensor]) -> dict[str, Tensor]:
        if self._token_types and "mm_token_type_ids" not in images:
            types = (input_ids == self.image_token_id).long()
            if self.video_token_id is not None:
                types = types.masked_fill(input_ids == self.video_token_id, 2)
            images = {**images, "mm_token_type_ids": types}
        return images

    def language_model(self) -> nn.Module:
        inner = getattr(self.hf, "model", self.hf)
        return getattr(inner, "language_model", None) or self.hf.language_model

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, **images: Tensor) -> VLMOutput:
        out = self.hf(input_ids=input_ids, attention_mask=attention_mask, use_cache=False,
                      **self._inputs(input_ids, images))
        return VLMOutput(out.logits, input_ids == self.image_token_id, [m.l_aux for m in moe_layers(self.hf)])

    @torch.no_grad()
    def generate(self, input_ids: Tensor, attention_mask: Tensor, max_new_tokens: int = 16, **images: Tensor) -> Tensor:
        eos = self.eos_token_id
        out = self.hf.generate(
            input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens, do_sample=False,
            eos_token_id=eos, pad_token_id=eos if isinstance(eos, int) else 0, **self._inputs(input_ids, images),
        )
        return out[:, input_ids.shape[1] :]


class HFVisionLanguageModel(ModelSource):
    """A real VLM from a local Hugging Face folder (``save_pretrained`` output or a downloaded snapshot), loaded with
    ``AutoModelForImageTextToText`` (nothing is downloaded). Pair it with ``processor: <the same folder>`` in the data.

    Args:
        path: the model folder.
        dtype: weight dtype (``bfloat16`` for large teachers); default: the checkpoint's.
        freeze_vision: the vision tower gets no gradient.
        attn_implementation: ``sdpa``, ``eager``, ``flash_attention_2`` (default: transformers' choice).
        checkpoint: weights of a zoo run to load over the folder's (a Lightning checkpoint's student).
        moe: upcycle the language model's FFNs (see :class:`LlavaModel`).
    """

    def __init__(
        self,
        path: str,
        dtype: str | None = None,
        freeze_vision: bool = True,
        attn_implementation: str | None = None,
        checkpoint: str | None = None,
        moe: dict[str, Any] | None = None,
    ) -> None:
        _dtype(dtype)
        self.path, self.dtype, self.freeze_vision = path, dtype, freeze_vision
        self.attn_implementation, self.checkpoint = attn_implementation, checkpoint
        self.moe = MoEConfig.from_dict(moe).to_dict() if moe is not None else None

    def build(self, num_classes: int | None = None, in_chans: int | None = None) -> HFVLM:
        from transformers import AutoModelForImageTextToText

        folder = Path(self.path)
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"HFVisionLanguageModel.path: {self.path!r} is not a local model folder")
        kwargs: dict[str, Any] = {"local_files_only": True}
        if self.dtype is not None:
            kwargs["dtype"] = _dtype(self.dtype)
        if self.attn_implementation is not None:
            kwargs["attn_implementation"] = self.attn_implementation
        model = HFVLM(AutoModelForImageTextToText.from_pretrained(str(folder), **kwargs), name=folder.name)
        field = "HFVisionLanguageModel.checkpoint"
        if self.moe is not None and self.checkpoint and not _has_experts(self.checkpoint, field):
            _load_state(model, self.checkpoint, field)
            upcycle(model.language_model(), self.moe)
        else:
            if self.moe is not None:
                upcycle(model.language_model(), self.moe)
            if self.checkpoint:
                _load_state(model, self.checkpoint, field)
        if self.freeze_vision:
            for name, p in model.named_parameters():
                if model.group_of(name) == "vision_tower":
                    p.requires_grad_(False)
        return model

    def describe(self) -> str:
        return f"hf:{Path(self.path).name}"

