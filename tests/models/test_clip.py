"""The open_clip model source, class-prompt text embeddings and the CLIP-space student (all offline)."""

import open_clip
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from zoo.models import CIFARModel, TimmModel
from zoo.models.clip import (
    DIGITS_CLIP_CFG,
    CLIPSpaceStudent,
    CLIPSpaceStudentModel,
    OpenCLIPModel,
    class_text_embeddings,
    clip_tokenizer,
    feature_extractor,
)
from zoo.models.sources import source_from_config

TINY_VIT = {"img_size": 16, "patch_size": 4, "embed_dim": 32, "depth": 1, "num_heads": 2}


def tiny_clip(**kw):
    return OpenCLIPModel("ViT-B-16", model_cfg=DIGITS_CLIP_CFG, **kw)


def test_tiny_clip_builds_from_open_clip_configs_and_encodes():
    model = tiny_clip().build(num_classes=10, in_chans=3)
    assert isinstance(model, open_clip.CLIP)
    tokens = clip_tokenizer(model)(["a photo of a seven"])
    assert tokens.shape == (1, 16)  # the model's context length
    assert model.encode_text(tokens).shape == (1, 32)
    assert model.encode_image(torch.randn(2, 3, 16, 16)).shape == (2, 32)


def test_checkpoint_of_a_lightning_run_loads_and_mean_std_default_to_the_data(tmp_path):
    reference = tiny_clip().build()
    state = {f"student.{k}": v for k, v in reference.state_dict().items()}
    torch.save({"state_dict": state}, tmp_path / "run.ckpt")
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, tmp_path / "clip.safetensors")
    for path in ("run.ckpt", "clip.safetensors"):
        source = tiny_clip(checkpoint=str(tmp_path / path))
        model = source.build()
        for k, v in model.state_dict().items():
            assert torch.equal(v, reference.state_dict()[k]), k
        assert source.mean is None and source.std is None


def test_source_round_trips_through_its_config():
    source = tiny_clip(cache_dir="/nowhere")
    config = source.to_config()
    assert config["init_args"]["model_cfg"] == DIGITS_CLIP_CFG
    again = source_from_config(config)
    assert again.to_config() == config
    assert "open_clip:ViT-B-16" in again.describe()


def test_errors_name_the_field():
    with pytest.raises(ValueError, match="3-channel"):
        tiny_clip().build(in_chans=1)
    with pytest.raises(ValueError, match="not-a-tag"):  # an unknown tag fails before any download
        tiny_clip(pretrained="not-a-tag").build()


def test_class_text_embeddings_are_the_normalised_mean_of_normalised_prompts():
    torch.manual_seed(0)
    model = tiny_clip().build()
    templates = ["a photo of a {}", "a drawing of the {}"]
    got = class_text_embeddings(model, ["ice_cream", "dog"], templates)
    tokenizer = clip_tokenizer(model)
    with torch.no_grad():
        for row, name in zip(got, ["ice cream", "dog"]):  # "_" is read as a space
            prompts = F.normalize(model.encode_text(tokenizer([t.format(name) for t in templates])), dim=-1)
            expected = F.normalize(prompts.mean(0), dim=0)
            assert torch.allclose(row, expected, atol=1e-6)
    assert torch.allclose(got.norm(dim=-1), torch.ones(2))
    with pytest.raises(ValueError, match="template"):
        class_text_embeddings(model, ["dog"], ["no placeholder"])


def test_feature_extractor_removes_the_classifier_of_timm_torchvision_and_cifar_models():
    vit = TimmModel("vit_tiny_patch16_224", model_kwargs=TINY_VIT).build(num_classes=10, in_chans=3)
    net, width = feature_extractor(vit)
    assert width == 32 and net(torch.randn(2, 3, 16, 16)).shape == (2, 32)
    import torchvision

    net, width = feature_extractor(torchvision.models.resnet18(num_classes=7).eval())
    assert width == 512 and net(torch.randn(1, 3, 32, 32)).shape == (1, 512)
    net, width = feature_extractor(CIFARModel("resnet8").build(num_classes=10, in_chans=3))
    assert net(torch.randn(2, 3, 16, 16)).shape == (2, width)


def test_clip_space_student_predicts_with_its_text_head_and_keeps_it_in_the_state_dict():
    source = CLIPSpaceStudentModel(TimmModel("vit_tiny_patch16_224", model_kwargs=TINY_VIT), embed_dim=8)
    student = source.build(num_classes=3, in_chans=3)
    x = torch.randn(4, 3, 16, 16)
    with pytest.raises(RuntimeError, match="text head is not set"):
        student(x)
    heads = torch.randn(3, 8)
    student.set_text_head(heads, 50.0)
    u = F.normalize(student.projection(student.backbone(x)), dim=-1)
    assert torch.allclose(student(x), 50.0 * u @ F.normalize(heads, dim=-1).T, atol=1e-5)
    fresh = source_from_config(source.to_config()).build(num_classes=3, in_chans=3)
    assert not fresh.has_text_head
    fresh.load_state_dict(student.state_dict())
    assert fresh.has_text_head and torch.allclose(fresh(x), student(x))
    assert source.to_config()["init_args"]["backbone"]["class_path"].endswith("TimmModel")
    with pytest.raises(ValueError, match="shape"):
        student.set_text_head(torch.randn(4, 8), 1.0)


def test_clip_space_student_builds_the_backbone_with_its_own_head_so_pretrained_weights_load(tmp_path):
    vit = TimmModel("vit_tiny_patch16_224", model_kwargs=TINY_VIT, num_classes=10).build(in_chans=3)
    torch.save({"state_dict": {f"student.{k}": v for k, v in vit.state_dict().items()}}, tmp_path / "vit.ckpt")
    backbone = TimmModel("vit_tiny_patch16_224", model_kwargs=TINY_VIT, num_classes=10,
                         checkpoint=str(tmp_path / "vit.ckpt"))
    student = CLIPSpaceStudentModel(backbone, embed_dim=8).build(num_classes=3, in_chans=3)
    assert torch.equal(student.backbone.patch_embed.proj.weight, vit.patch_embed.proj.weight)
    assert isinstance(student, CLIPSpaceStudent) and student.num_classes == 3
