"""VLM model sources: the LLaVA-style model (timm / open_clip towers, any causal LM) and Hugging Face VLM folders."""

import pytest
import torch

from zoo.data.vqa import IMAGE_TOKEN_INDEX, DigitsVQADataModule
from zoo.models.moe import SparseMoE
from zoo.models.vlm import HFVisionLanguageModel, LlavaModel


def _batch(dm, n=3):
    dm.setup("fit")
    return dm.collate([dm.train_set[i] for i in range(n)])


def test_llava_model_places_projected_features_at_the_visual_positions(vision, lm):
    model = LlavaModel(vision, lm(), select_layer=-1).build(in_chans=1)
    assert model.num_visual_tokens == 16 and model.vocab_size == 32
    batch = _batch(DigitsVQADataModule())
    embeds, visual = model.embed(batch["input_ids"], batch["images"]["pixel_values"])
    assert torch.equal(visual, batch["input_ids"] == IMAGE_TOKEN_INDEX)
    assert visual.sum(1).tolist() == [16, 16, 16] and visual[:, 1:17].all()  # [BOS] then the 16 image tokens
    feats = model.vision_tower.forward_intermediates(batch["images"]["pixel_values"], indices=[-1], norm=False,
                                                     output_fmt="NLC", intermediates_only=True)[0]
    assert feats.shape == (3, 16, 32)  # CLS dropped
    torch.testing.assert_close(embeds[:, 1:17], model.projector(feats))
    out = model(batch["input_ids"], batch["attention_mask"], **batch["images"])
    assert out.logits.shape == (*batch["input_ids"].shape, 32) and torch.equal(out.visual_mask, visual)
    assert not any(p.requires_grad for p in model.vision_tower.parameters())
    model.train()
    assert not model.vision_tower.training


def test_select_layer_follows_llava(vision, lm):
    vision = {**vision, "depth": 3}
    model = LlavaModel(vision, lm(), select_layer=-2).build(in_chans=1)
    x = torch.randn(2, 1, 16, 16)
    tower = model.vision_tower
    tokens = tower._pos_embed(tower.patch_embed(x))
    tokens = tower.blocks[1](tower.blocks[0](tower.norm_pre(tokens)))  # output of the penultimate block
    torch.testing.assert_close(model.encode_images(x), model.projector(tokens[:, tower.num_prefix_tokens:]))
    with pytest.raises(ValueError, match="select_layer"):
        LlavaModel(vision, lm(), select_layer=0)
    with pytest.raises(ValueError, match="outside the tower's 3 blocks"):
        LlavaModel(vision, lm(), select_layer=-4).build(in_chans=1)


def test_open_clip_tower_and_language_model_folder(tmp_path, lm):
    from transformers import AutoConfig, AutoModelForCausalLM

    options = dict(lm())
    config = AutoConfig.for_model(options.pop("model_type"), **options)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "lm")
    vision = {"library": "open_clip", "config": {"embed_dim": 16, "image_size": 16, "patch_size": 4, "width": 32,
                                                 "layers": 2, "head_width": 16}}
    model = LlavaModel(vision, str(tmp_path / "lm"), select_layer=-1).build()
    assert model.num_visual_tokens == 16
    batch = _batch(DigitsVQADataModule(channels=3))
    out = model(batch["input_ids"], batch["attention_mask"], **batch["images"])
    assert out.logits.shape[-1] == 32 and out.visual_mask.sum() == 48


def test_wrong_visual_token_count_is_refused(vision, lm):
    model = LlavaModel(vision, lm(), select_layer=-1).build(in_chans=1)
    batch = _batch(DigitsVQADataModule(image_tokens=9))
    with pytest.raises(ValueError, match="image_tokens must be 16"):
        model(batch["input_ids"], batch["attention_mask"], **batch["images"])


def test_dense_checkpoint_is_loaded_before_upcycling(tmp_path, vision, lm):
    dense = LlavaModel(vision, lm(), select_layer=-1).build(in_chans=1)
    torch.save({"state_dict": {f"student.{k}": v for k, v in dense.state_dict().items()}}, tmp_path / "d2d.ckpt")
    moe = {"num_experts": 4, "top_k": 2, "drop_tokens": False}
    sparse = LlavaModel(vision, lm(), select_layer=-1, checkpoint=str(tmp_path / "d2d.ckpt"), moe=moe).build(in_chans=1)
    assert isinstance(sparse.lm.model.layers[0].mlp, SparseMoE)
    batch = _batch(DigitsVQADataModule())
    args = (batch["input_ids"], batch["attention_mask"])
    dense.eval(), sparse.eval()
    torch.testing.assert_close(sparse(*args, **batch["images"]).logits, dense(*args, **batch["images"]).logits,
                               rtol=0, atol=1e-5)
    torch.save(sparse.state_dict(), tmp_path / "d2s.pt")  # an upcycled checkpoint loads after upcycling
    again = LlavaModel(vision, lm(), select_layer=-1, checkpoint=str(tmp_path / "d2s.pt"), moe=moe).build(in_chans=1)
    assert torch.equal(again.lm.model.layers[0].mlp.router.weight, sparse.lm.model.layers[0].mlp.router.weight)


@pytest.mark.parametrize("kind", ["llava", "qwen2vl"])
def test_hf_vlm_folder_visual_positions_from_the_image_token(kind, hf_llava_dir, hf_qwen2vl_dir):
    folder = hf_llava_dir if kind == "llava" else hf_qwen2vl_dir
    model = HFVisionLanguageModel(folder).build()
    dm = DigitsVQADataModule(processor=folder, image_tokens=None)
    assert dm.image_token_id == model.image_token_id and dm.image_tokens is None
    batch = _batch(dm, 2)
    per_image = {"llava": 16, "qwen2vl": 4}[kind]  # 4×4 CLIP patches (CLS dropped); 4×4 patches merged 2×2
    assert (batch["input_ids"] == model.image_token_id).sum(1).tolist() == [per_image, per_image]
    out = model(batch["input_ids"], batch["attention_mask"], **batch["images"])
    assert torch.equal(out.visual_mask, batch["input_ids"] == model.image_token_id)
    assert out.logits.shape == (*batch["input_ids"].shape, model.vocab_size)
    vision = [n for n, p in model.named_parameters() if model.group_of(n) == "vision_tower"]
    projector = [n for n, p in model.named_parameters() if model.group_of(n) == "projector"]
    assert vision and projector
    assert not any(p.requires_grad for n, p in model.named_parameters() if n in vision)
    assert all(p.requires_grad for n, p in model.named_parameters() if n in projector)


@pytest.mark.parametrize("kind", ["llava", "qwen2vl"])
def test_hf_vlm_greedy_generation(kind, hf_llava_dir, hf_qwen2vl_dir):
    from zoo.methods.vlm import prompts_from_batch

    folder = hf_llava_dir if kind == "llava" else hf_qwen2vl_dir
    model = HFVisionLanguageModel(folder).build().eval()
    dm = DigitsVQADataModule(processor=folder, image_tokens=None)
    batch = _batch(dm, 2)
    prompt, mask = prompts_from_batch(batch, dm.tokenizer.pad_token_id)
    new = model.generate(prompt, mask, max_new_tokens=3, **batch["images"])
    assert new.shape[0] == 2 and 1 <= new.shape[1] <= 3
    # greedy: the first new token is the argmax of the full-prompt forward
    first = model(prompt, mask, **batch["images"]).logits[:, -1].argmax(-1)
    assert torch.equal(new[:, 0], first)


@pytest.mark.parametrize("kind", ["llava", "qwen2vl"])
def test_save_pretrained_folder_loads_back_as_a_teacher(kind, hf_llava_dir, hf_qwen2vl_dir, tmp_path):
    """A ``save_pretrained`` folder is the teacher (and, here, the student) of LLaVA-KD; the KD terms vanish at the
    start (same weights) and one step trains the student's projector and LLM only."""
    import copy

    import lightning as L

    from zoo.methods.llava_kd import LLaVAKD

    folder = hf_llava_dir if kind == "llava" else hf_qwen2vl_dir
    method = LLaVAKD(HFVisionLanguageModel(folder), HFVisionLanguageModel(folder))
    dm = DigitsVQADataModule(processor=folder, image_tokens=None, train_samples=10, num_test=10, batch_size=2)
    batch = _batch(dm, 2)
    method.student.eval()
    terms = method.loss_terms(method.run(method.student, batch), method.teacher_outputs(batch), batch)
    assert all(abs(terms[k].item()) < 1e-5 for k in ("res", "vis", "rel"))
    before = copy.deepcopy(method.student.state_dict())
    L.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, limit_val_batches=0, default_root_dir=tmp_path).fit(method, datamodule=dm)
    state = method.student.state_dict()
    changed = {method.student.group_of(k) for k, v in state.items() if not torch.equal(v, before[k])}
    assert changed == {"projector", "language_model"}
