"""TRG method: CNN and ViT tokens, one step changes the student and never the teacher, terms, τ_g progress."""

import copy

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from zoo.methods import TRG, ClassificationMethod
from zoo.models import CIFARModel, TimmModel

TERMS = ["ce", "kd", "inner", "local", "global"]


def tiny_vit() -> TimmModel:
    # 8×8 patch tokens at 32×32, like a CIFAR resnet's layer3; two blocks keep the test fast
    return TimmModel("vit_tiny_patch16_224", model_kwargs={"img_size": 32, "patch_size": 4, "depth": 2})


def loader(n: int = 16, chans: int = 1, side: int = 16, classes: int = 10) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, chans, side, side, generator=g)
    return DataLoader(TensorDataset(x, torch.randint(0, classes, (n,), generator=g)), batch_size=8)


def fit(model, tmp_path, data, **kw) -> L.Trainer:
    defaults = dict(
        accelerator="cpu", max_steps=1, limit_train_batches=1, limit_val_batches=0, logger=False,
        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False, default_root_dir=tmp_path,
        log_every_n_steps=1,
    )
    trainer = L.Trainer(**{**defaults, **kw})
    trainer.fit(model, train_dataloaders=data)
    return trainer


def step_and_check(model, tmp_path, data) -> L.Trainer:
    student_before = copy.deepcopy(model.student.state_dict())
    teacher_before = copy.deepcopy(model.teacher.state_dict())
    trainer = fit(model, tmp_path, data)
    assert any(not torch.equal(v, student_before[k]) for k, v in model.student.state_dict().items())
    for k, v in model.teacher.state_dict().items():
        assert torch.equal(v, teacher_before[k]), f"teacher {k} changed"
    assert all(p.grad is None for p in model.teacher.parameters())
    assert not model.teacher.training
    logged = trainer.logged_metrics
    for name in TERMS:
        assert torch.isfinite(logged[f"train/loss_{name}"]), name
    assert "train/loss" in logged
    return trainer


def test_cnn_pair_step_updates_student_not_teacher_and_logs_terms(tmp_path):
    model = TRG(CIFARModel("resnet8"), CIFARModel("wrn_16_2"), num_classes=10, in_chans=1,
                student_layer="layer3", teacher_layer="relu", tokens=4, k=4)
    assert (model.projector.in_features, model.projector.out_features) == (64, 128)
    trainer = step_and_check(model, tmp_path, loader())
    # the projector is trained with the student; the teacher is in no optimizer and no checkpoint
    params = {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}
    assert {id(p) for p in model.projector.parameters()} <= params
    assert not {id(p) for p in model.teacher.parameters()} & params
    # the checkpoint holds the student and the projector, and rebuilds the method with its taps
    path = tmp_path / "trg.ckpt"
    trainer.save_checkpoint(path)
    saved = torch.load(path, weights_only=True)["state_dict"]
    assert {k.split(".")[0] for k in saved} == {"student", "projector"}
    restored = TRG.load_from_checkpoint(path)
    assert restored.hparams.teacher_layer == "relu" and restored.teacher.taps.paths == ["relu"]
    assert all(torch.equal(v, restored.state_dict()[k]) for k, v in model.state_dict().items())


def test_vit_student_with_cnn_teacher_step(tmp_path):
    model = TRG(tiny_vit(), CIFARModel("resnet8x4"), num_classes=10, in_chans=3,
                student_layer="blocks.1", teacher_layer="layer3", tokens=8, k=4)
    assert model._student_prefix == 1  # the class token is dropped
    step_and_check(model, tmp_path, loader(chans=3, side=32))


def test_cnn_student_with_vit_teacher_through_forward_intermediates(tmp_path):
    model = TRG(CIFARModel("resnet8x4"), tiny_vit(), num_classes=10, in_chans=3,
                student_layer="layer3", teacher_layer="intermediates.1", tokens=8, k=4, projector_dim=32)
    assert model.teacher_projector.out_features == 32 and model.projector.out_features == 32
    step_and_check(model, tmp_path, loader(chans=3, side=32))


def test_taps_are_per_instance_and_token_counts_must_match():
    model = TRG(CIFARModel("resnet8"), CIFARModel("resnet14"), num_classes=10, in_chans=1,
                student_layer="layer2", teacher_layer="layer2")
    assert model.student_taps == ("layer2",) and ClassificationMethod.student_taps == ()
    assert model.teacher.taps.paths == ["layer2"]
    with pytest.raises(ValueError, match="token_grid"):
        TRG(CIFARModel("resnet8"), CIFARModel("resnet14"), num_classes=10, in_chans=1,
            student_layer="layer2", teacher_layer="layer3")
    pooled = TRG(CIFARModel("resnet8"), CIFARModel("resnet14"), num_classes=10, in_chans=1,
                 student_layer="layer2", teacher_layer="layer3", token_grid=4, tokens=4)
    x, y = torch.randn(4, 1, 16, 16), torch.randint(0, 10, (4,))
    terms = pooled.loss_terms(pooled.forward_student(x), pooled.forward_teacher(x), y)
    assert set(terms) == set(TERMS)
    with pytest.raises(ValueError, match="TRG.tokens=32"):
        big = TRG(CIFARModel("resnet8"), CIFARModel("resnet14"), num_classes=10, in_chans=1, tokens=32)
        big.loss_terms(big.forward_student(x), big.forward_teacher(x), y)  # 16×16 input: 4×4 = 16 tokens


def test_global_temperature_follows_training_progress(tmp_path):
    model = TRG(CIFARModel("resnet8"), CIFARModel("resnet14"), num_classes=10, in_chans=1, tokens=4, k=4)
    seen = []

    class Spy(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.append(pl_module.progress())

    fit(model, tmp_path, loader(), max_steps=-1, max_epochs=2, limit_train_batches=2, callbacks=[Spy()])
    assert seen == [0.0, 0.25, 0.5, 0.75]  # global_step / estimated_stepping_batches (4)
    assert model.global_loss.temperature(seen[-1]) == pytest.approx(0.5 - 0.75 * 0.4)
