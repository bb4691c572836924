"""VLM methods: one step trains the student only, KD terms vanish for a copy of the teacher, DPT trains the projector,
stages chain by checkpoint path, mismatched pairs are refused, DPO separates digits pairs, predict answers."""

import copy
import logging

import lightning as L
import pytest
import torch
from torch import nn

from zoo.data.vqa import DigitsVQADataModule
from zoo.methods.llava_kd import LLaVAKD
from zoo.methods.llava_mod import LLaVAMoD
from zoo.methods.vlm import VLMSupervised
from zoo.models.vlm import LlavaModel

VISION = {"library": "timm", "name": "vit_tiny_patch16_224", "img_size": 16, "patch_size": 4, "embed_dim": 32,
          "depth": 1, "num_heads": 2}
MOE = {"num_experts": 4, "top_k": 2}


def _lm(hidden=32, layers=2, vocab=32):
    return {"model_type": "qwen2", "vocab_size": vocab, "hidden_size": hidden, "intermediate_size": 2 * hidden,
            "num_hidden_layers": layers, "num_attention_heads": 2, "num_key_value_heads": 1,
            "max_position_embeddings": 64, "bos_token_id": 1, "eos_token_id": 2}


def _model(hidden=32, vision=VISION, **kw):
    return LlavaModel(vision, _lm(hidden, **{k: kw.pop(k) for k in ("layers", "vocab") if k in kw}), select_layer=-1,
                      feature_norm=True, freeze_vision=False, **kw)


def _data(task="vqa", **kw):
    return DigitsVQADataModule(task=task, train_samples=20, num_test=16, batch_size=4, eval_batch_size=8, **kw)


def _opt(lr=1e-3):
    from functools import partial

    return partial(torch.optim.AdamW, lr=lr)


def tiny_vlmsupervised():
    return VLMSupervised(_model(), in_chans=1, optimizer=_opt()), _data()


def tiny_llavakd():
    return LLaVAKD(_model(), _model(48), stage="dft", in_chans=1, optimizer=_opt()), _data()


def tiny_llavamod():
    return LLaVAMoD(_model(moe=MOE), _model(48), stage="d2s", in_chans=1, optimizer=_opt()), _data()


def _trainer(tmp_path, **kw):
    options = dict(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                   enable_model_summary=False, limit_val_batches=1, num_sanity_val_steps=0, default_root_dir=tmp_path)
    return L.Trainer(**{**options, **kw})


def _batch(dm):
    dm.setup("fit")
    return dm.collate([dm.train_set[i] for i in range(4)])


@pytest.mark.parametrize("recipe,terms", [
    (tiny_vlmsupervised, ["ce"]),
    (tiny_llavakd, ["reg", "res", "vis", "rel"]),
    (tiny_llavamod, ["kd", "lm", "aux"]),
])
def test_one_step_trains_the_student_only_and_logs_every_term(tmp_path, recipe, terms):
    method, dm = recipe()
    student = copy.deepcopy(method.student.state_dict())
    teacher = copy.deepcopy(method.teacher.state_dict()) if method.teacher is not None else {}
    trainer = _trainer(tmp_path, max_steps=1, limit_train_batches=1)
    trainer.fit(method, datamodule=dm)
    assert any(not torch.equal(v, student[k]) for k, v in method.student.state_dict().items())
    for k, v in (method.teacher.state_dict().items() if teacher else ()):
        assert torch.equal(v, teacher[k]), k
    logged = trainer.logged_metrics
    assert {f"train/loss_{t}" for t in terms} | {"train/loss", "val/acc"} <= set(logged)
    if method.teacher is not None:
        assert not method.teacher.training and {"val/agreement", "val/teacher_acc"} <= set(logged)
        assert all(not k.startswith("teacher") for k in method.state_dict())
    if isinstance(method, LLaVAMoD):
        assert {"train/l_aux_layer0", "train/expert_entropy"} <= set(logged)


def test_kd_terms_vanish_when_the_student_is_a_copy_of_the_teacher():
    teacher = _model().build(in_chans=1).eval()
    batch = _batch(_data())
    kd = LLaVAKD(copy.deepcopy(teacher), teacher, in_chans=1)
    kd.student.eval()
    out = kd.run(kd.student, batch)
    terms = kd.loss_terms(out, kd.teacher_outputs(batch), batch)
    assert {"reg", "res", "vis", "rel"} == set(terms)
    for name in ("res", "vis", "rel"):
        assert abs(terms[name].item()) < 1e-6, name
    mod = LLaVAMoD(copy.deepcopy(teacher), teacher, stage="d2d", in_chans=1)
    mod.student.eval()
    assert abs(mod.loss_terms(mod.run(mod.student, batch), mod.teacher_outputs(batch), batch)["kd"].item()) < 1e-6


def test_dpt_trains_the_projector_only_with_gradients_through_the_frozen_llm():
    method = LLaVAKD(_model(), _model(48), stage="dpt", in_chans=1)
    batch = _batch(_data("caption"))
    loss = sum(method.loss_terms(method.run(method.student, batch), method.teacher_outputs(batch), batch).values())
    loss.backward()
    with_grad = {n for n, p in method.student.named_parameters() if p.grad is not None}
    assert with_grad == {n for n, _ in method.student.named_parameters() if n.startswith("projector.")}
    assert all(p.grad.abs().sum() > 0 for n, p in method.student.named_parameters() if n.startswith("projector."))
    trainable = {id(p) for p in method.trainable_parameters()}
    assert trainable == {id(p) for n, p in method.student.named_parameters() if n.startswith("projector.")}


def test_stages_chain_by_checkpoint_path_and_hyperparameters_round_trip(tmp_path):
    method = LLaVAKD(_model(), _model(48), stage="dpt", in_chans=1, optimizer=_opt())
    trainer = _trainer(tmp_path, enable_checkpointing=True, limit_train_batches=1, max_epochs=1, max_steps=-1)
    trainer.fit(method, datamodule=_data("caption"))
    ckpt = trainer.checkpoint_callback.best_model_path
    assert all(k.startswith("student.") for k in torch.load(ckpt, weights_only=True)["state_dict"])
    restored = LLaVAKD.load_from_checkpoint(ckpt)
    assert restored.hparams.stage == "dpt" and restored.teacher is not None
    sft = LLaVAKD(_model(checkpoint=ckpt), stage="sft", in_chans=1)  # stage 2 starts from stage 1, no teacher
    for k, v in sft.student.state_dict().items():
        assert torch.equal(v, method.student.state_dict()[k]), k
    assert not sft.uses_teacher


def test_mismatched_pairs_and_data_are_refused(tmp_path):
    with pytest.raises(ValueError, match=r"teacher vocabulary 40 .* student vocabulary 32"):
        LLaVAKD(_model(), _model(48, vocab=40), in_chans=1)
    LLaVAKD(_model(), _model(48, vocab=40), vocab_slice=32, in_chans=1)  # an explicit slice is accepted
    coarse = {**VISION, "patch_size": 8}
    with pytest.raises(ValueError, match=r"teacher visual tokens per image 4 .* student 16"):
        LLaVAKD(_model(), _model(48, vision=coarse), in_chans=1)
    LLaVAKD(_model(), _model(48, vision=coarse), beta=0.0, gamma=0.0, in_chans=1)  # L_res alone needs no alignment
    with pytest.raises(ValueError, match="teacher image token id"):
        LLaVAKD(_model(), _model(48, image_token_id=-300), in_chans=1)
    with pytest.raises(ValueError, match="sparse student"):
        LLaVAMoD(_model(), _model(48), stage="d2s", in_chans=1)
    with pytest.raises(ValueError, match="match no parameter"):
        LLaVAKD(_model(), _model(48), trainable=["projectr"], in_chans=1)
    with pytest.raises(ValueError, match="teacher is required"):
        LLaVAKD(_model(), stage="dft", in_chans=1)
    method, _ = tiny_llavakd()
    with pytest.raises(ValueError, match=r"data gives 9 visual tokens per image but the student makes 16"):
        _trainer(tmp_path).fit(method, datamodule=_data(image_tokens=9))


def test_preference_distillation_separates_digits_pairs():
    """Sigmoid DPO with the teacher as reference: reward accuracy [β(r_w − r_l) > 0] reaches 1 on the pairs."""
    torch.manual_seed(0)
    method = LLaVAMoD(_model(moe=MOE), _model(48), stage="preference", in_chans=1,
                      trainable=["vision_tower", "projector", "language_model"])
    dm = _data("preference")
    dm.setup("fit")
    first_of_each_digit = {dm.train_set[i]["answer"]: i for i in reversed(range(len(dm.train_set)))}
    batch = dm.collate([dm.train_set[i] for i in sorted(first_of_each_digit.values())[:8]])

    def reward_accuracy():
        from zoo.losses.llava_mod import sequence_logprobs

        method.student.eval()
        with torch.no_grad():
            r = {k: sequence_logprobs(method.run(method.student, batch, batch[k]).logits, batch[k]["labels"])
                 - sequence_logprobs(method.teacher_outputs(batch, batch[k]).logits, batch[k]["labels"])
                 for k in ("chosen", "rejected")}
        return float((r["chosen"] > r["rejected"]).float().mean())

    before = reward_accuracy()
    optimizer = torch.optim.Adam(method.trainable_parameters(), lr=1e-2)
    method.log = lambda *a, **k: None  # no trainer attached: the step's logging is a no-op here
    method.log_dict = lambda *a, **k: None
    method.student.train()
    for _ in range(40):
        optimizer.zero_grad()
        method.preference_step(batch).backward()
        optimizer.step()
    assert reward_accuracy() == 1.0 > before


def test_teacher_accuracy_is_computed_once_and_predict_prints_answers(tmp_path, caplog):
    method, dm = tiny_llavakd()
    trainer = _trainer(tmp_path, max_steps=-1, max_epochs=2, limit_train_batches=1, limit_val_batches=1)
    trainer.fit(method, datamodule=dm)
    assert "val" in method._teacher_acc and method.val_teacher_acc.update_count == 0
    assert trainer.logged_metrics["val/teacher_acc"] == pytest.approx(method._teacher_acc["val"])
    with caplog.at_level(logging.INFO):
        out = trainer.predict(method, datamodule=dm)
    first = out[0][0]
    assert first["question"] == "what digit is this ?" and first["reference"].split()[0] in "0123456789"
    assert "what digit is this ? →" in caplog.text
    assert len(first["tokens"]) >= 1


def test_modules_can_be_passed_directly():
    teacher = _model(48).build(in_chans=1)
    method = LLaVAKD(_model().build(in_chans=1), teacher, in_chans=1)
    assert method.teacher is teacher and "teacher" not in dict(method.named_children())
    assert isinstance(method.student, nn.Module) and "student" not in method.hparams
