"""Tiny VLMs for the VLM tests: the digits testbed's parts at a smaller width, and random-weight Hugging Face LLaVA
and Qwen2-VL folders (with processors) built from their config classes; nothing is downloaded."""

import pytest

from zoo.data.vqa import DIGITS_VOCAB

_VISION = {"library": "timm", "name": "vit_tiny_patch16_224", "img_size": 16, "patch_size": 4, "embed_dim": 32,
          "depth": 1, "num_heads": 2}


def _lm(hidden=32, layers=2, vocab=32):
    return {"model_type": "qwen2", "vocab_size": vocab, "hidden_size": hidden, "intermediate_size": 2 * hidden,
            "num_hidden_layers": layers, "num_attention_heads": 2, "num_key_value_heads": 1,
            "max_position_embeddings": 64, "bos_token_id": 1, "eos_token_id": 2}


@pytest.fixture
def vision():
    """A one-block timm ViT tower for 16×16 grayscale digits (16 visual tokens of width 32)."""
    return dict(_VISION)


@pytest.fixture
def lm():
    """``lm(hidden, layers, vocab)``: a tiny Qwen2 config mapping (the digits vocabulary: 32)."""
    return _lm


def _tokenizer(extra_special=None, extra_words=()):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = list(DIGITS_VOCAB) + list(extra_words)
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", bos_token="[BOS]", eos_token="[EOS]",
                                   unk_token="[UNK]", extra_special_tokens=extra_special or {})


@pytest.fixture(scope="session")
def hf_llava_dir(tmp_path_factory):
    """A random LlavaForConditionalGeneration (CLIP tower 16×16/4, Qwen2 text model) and its LlavaProcessor."""
    import torch
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
        Qwen2Config,
    )

    folder = tmp_path_factory.mktemp("hf_llava")
    tokenizer = _tokenizer({"image_token": "<image>"}, ["<image>"])
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                       image_size=16, patch_size=4),
        text_config=Qwen2Config(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                num_attention_heads=2, num_key_value_heads=1, eos_token_id=2, bos_token_id=1),
        image_token_index=image_id, vision_feature_layer=-2, vision_feature_select_strategy="default",
    )
    torch.manual_seed(0)
    LlavaForConditionalGeneration(config).save_pretrained(folder)
    image_processor = CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16})
    LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=4, image_token="<image>",
                   vision_feature_select_strategy="default", num_additional_image_tokens=1).save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="session")
def hf_qwen2vl_dir(tmp_path_factory):
    """A random Qwen2VLForConditionalGeneration (patch 4, merge 2: 4 visual tokens per 16×16 image) and processor."""
    import torch
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLImageProcessor, Qwen2VLProcessor
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    folder = tmp_path_factory.mktemp("hf_qwen2vl")
    special = {"image_token": "<|image_pad|>", "video_token": "<|video_pad|>",
               "vision_start_token": "<|vision_start|>", "vision_end_token": "<|vision_end|>"}
    tokenizer = _tokenizer(special, list(special.values()))
    ids = {k: tokenizer.convert_tokens_to_ids(v) for k, v in special.items()}
    config = Qwen2VLConfig(
        text_config={"vocab_size": 40, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                     "num_attention_heads": 2, "num_key_value_heads": 1, "eos_token_id": 2, "bos_token_id": 1,
                     "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]}},
        vision_config={"depth": 1, "embed_dim": 32, "hidden_size": 32, "num_heads": 2, "mlp_ratio": 2, "patch_size": 4,
                       "spatial_merge_size": 2, "temporal_patch_size": 2, "in_channels": 3},
        image_token_id=ids["image_token"], video_token_id=ids["video_token"],
        vision_start_token_id=ids["vision_start_token"], vision_end_token_id=ids["vision_end_token"],
    )
    torch.manual_seed(0)
    Qwen2VLForConditionalGeneration(config).save_pretrained(folder)
    pixels = {"min_pixels": 16 * 16, "max_pixels": 16 * 16, "patch_size": 4, "merge_size": 2, "temporal_patch_size": 2}
    Qwen2VLProcessor(image_processor=Qwen2VLImageProcessor(**pixels), tokenizer=tokenizer,
                     video_processor=Qwen2VLVideoProcessor(**pixels)).save_pretrained(folder)
    return str(folder)
