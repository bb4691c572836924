"""Segmentation methods: frozen teachers, LAD's label channel and dual path, MGD's batches and teacher BN."""

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from zoo.methods import CWD, LAD, MGD, LADTeacher, PixelKD, SupervisedSegmentation
from zoo.models import SMPModel, TorchvisionSegmentationModel

TINY = SMPModel("FPN", encoder="tu-resnet10t")
WIDE = SMPModel("Unet", encoder="tu-resnet10t", model_kwargs={"encoder_depth": 3, "decoder_channels": [32, 16, 8]})
C = 4


def batch(n=2, size=32):
    torch.manual_seed(0)
    y = torch.randint(0, C, (n, size, size))
    y[:, :2] = 255
    return torch.randn(n, 3, size, size), y


def trainer():
    return L.Trainer(
        max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=0,
    )


@pytest.mark.parametrize("cls", [PixelKD, CWD])
def test_teacher_is_frozen_outside_the_optimizer_and_the_checkpoint(cls):
    method = cls(TINY, TINY, num_classes=C, in_chans=3)
    x, y = batch()
    teacher_before = {k: v.clone() for k, v in method.teacher.state_dict().items()}
    trainer().fit(method, DataLoader(TensorDataset(x, y), batch_size=2))
    optimized = {id(p) for group in trainer_opt(method) for p in group["params"]}
    assert not any(id(p) in optimized for p in method.teacher.parameters())
    assert all(not p.requires_grad and p.grad is None for p in method.teacher.parameters())
    assert not method.teacher.training
    assert all(torch.equal(v, teacher_before[k]) for k, v in method.teacher.state_dict().items())
    assert not any(k.startswith(("teacher", "_teacher")) for k in method.state_dict())


def trainer_opt(method):
    return method.trainer.optimizers[0].param_groups


def test_cwd_term_is_zero_when_the_student_is_the_teacher():
    student = TINY.build(C, 3).eval()
    method = CWD(student, student, num_classes=C, in_chans=3).eval()
    x, y = batch()
    terms = method.loss_terms(method.forward_student(x), method.forward_teacher(x), y)
    assert float(terms["cwd"]) == pytest.approx(0.0, abs=1e-6)


def test_aux_weight_without_an_aux_head_fails_with_the_way_out():
    with pytest.raises(ValueError, match="aux_weight: 0"):
        SupervisedSegmentation(TINY, num_classes=C, in_chans=3, aux_weight=0.4)


def test_aux_head_of_torchvision_adds_a_term():
    method = SupervisedSegmentation(
        TorchvisionSegmentationModel("fcn_resnet50", aux_loss=True), num_classes=C, in_chans=3, aux_weight=0.4
    )
    x, y = batch(size=64)
    terms = method.loss_terms(method.forward_student(x), None, y)
    assert set(terms) == {"ce", "aux"} and torch.isfinite(terms["aux"])


def test_lad_teacher_stage_widens_the_stem_and_trains_two_paths():
    method = LADTeacher(TINY, num_classes=C, in_chans=3, aux_weight=0.0, label_scale=1.0)
    assert method.student.encoder.model.conv1[0].in_channels == 4
    x, y = batch()
    method.noiser.fixed_noise_std = 0.0
    channel = method.student_input(x, y, train=False)[:, 3]  # evaluation: fixed codes
    for k in range(C):
        values = channel[y == k]
        assert torch.allclose(values, values[0].expand_as(values))  # constant within a class
    assert torch.allclose(channel[y == 1][0], torch.tensor((1 - 11) / 10))
    zero = LADTeacher(TINY, num_classes=C, in_chans=3, aux_weight=0.0, eval_label="zero")
    assert (zero.student_input(x, y, train=False)[:, 3] == 0).all()
    trainer().fit(method, DataLoader(TensorDataset(x, y), batch_size=2))
    logged = method.trainer.logged_metrics
    assert {"train/loss_ce", "train/loss_consistency"} <= set(logged)
    single = LADTeacher(TINY, num_classes=C, in_chans=3, aux_weight=0.0, dual_path=False)
    trainer().fit(single, DataLoader(TensorDataset(x, y), batch_size=2))
    assert "train/loss_consistency" not in single.trainer.logged_metrics


def test_lad_feeds_the_teacher_fixed_codes_and_the_student_rgb():
    method = LAD(TINY, TINY, num_classes=C, in_chans=3, aux_weight=0.0, label_scale=1.0)
    assert method.teacher.members[0].encoder.model.conv1[0].in_channels == 4
    assert method.student.encoder.model.conv1[0].in_channels == 3
    x, y = batch()
    trainer().fit(method, DataLoader(TensorDataset(x, y), batch_size=2))
    assert torch.isfinite(method.trainer.logged_metrics["train/loss_cwd"])


def semi_loader(x, y):
    from lightning.pytorch.utilities import CombinedLoader

    u = TensorDataset(torch.randn(2, 3, 32, 32), torch.full((2, 32, 32), 255))
    return CombinedLoader(
        {
            "labelled": DataLoader(TensorDataset(x, y), batch_size=2),
            "unlabelled": DataLoader(u, batch_size=2),
            "unlabelled_mix": DataLoader(u, batch_size=2),
        },
        mode="max_size_cycle",
    )


@pytest.mark.parametrize("teacher_bn", ["eval", "train"])
def test_mgd_step_trains_the_student_and_leaves_bn_as_asked(teacher_bn):
    method = MGD(TINY, TINY, WIDE, num_classes=C, in_chans=3, teacher_bn=teacher_bn)
    x, y = batch()
    stats = [b.running_mean.clone() for b in method.wide_teacher.modules() if isinstance(b, torch.nn.BatchNorm2d)]
    trainer().fit(method, semi_loader(x, y))
    logged = method.trainer.logged_metrics
    assert {f"train/loss_{k}" for k in ("sup", "pixel_l", "pixel_u", "semantic", "content")} <= set(logged)
    after = [b.running_mean for b in method.wide_teacher.modules() if isinstance(b, torch.nn.BatchNorm2d)]
    changed = any(not torch.equal(a, b) for a, b in zip(stats, after))
    assert changed == (teacher_bn == "train")  # the official code's train-mode BN drifts the statistics
    assert all(not p.requires_grad for t in (method.teacher, method.wide_teacher) for p in t.parameters())
    assert "wide_teacher" in method.hparams and method.hparams["wide_teacher"]["init_args"]["arch"] == "Unet"


def test_mgd_ohem_supervised_term():
    """``sup_loss="ohem"`` (the Cityscapes scripts) swaps only the supervised term for OHEM cross-entropy."""
    method = MGD(TINY, TINY, WIDE, num_classes=C, in_chans=3, sup_loss="ohem", ohem_thresh=0.7, ohem_min_kept=50)
    assert (method.ohem.thresh, method.ohem.min_kept, method.ohem.ignore_index) == (0.7, 50, 255)
    seen = []
    forward = method.ohem.forward
    method.ohem.forward = lambda logits, target: seen.append(forward(logits, target)) or seen[-1]
    x, y = batch()
    trainer().fit(method, semi_loader(x, y))
    assert len(seen) == 1
    assert float(method.trainer.logged_metrics["train/loss_sup"]) == pytest.approx(float(seen[0]))
    assert MGD(TINY, TINY, WIDE, num_classes=C, in_chans=3).ohem is None
    with pytest.raises(ValueError, match="sup_loss"):
        MGD(TINY, TINY, WIDE, num_classes=C, in_chans=3, sup_loss="focal")


def test_mgd_without_unlabelled_batches_says_how_to_get_them():
    method = MGD(TINY, TINY, WIDE, num_classes=C, in_chans=3)
    x, y = batch()
    with pytest.raises(ValueError, match="semi_supervised: true"):
        trainer().fit(method, DataLoader(TensorDataset(x, y), batch_size=2))


def test_monitor_and_summary_read_segmentation_outputs():
    from callbacks import DistillationMonitor, FitSummary

    method = CWD(TINY, TINY, num_classes=C, in_chans=3)
    x, y = batch()
    summary = FitSummary(enabled=False)
    trainer = L.Trainer(
        max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, callbacks=[DistillationMonitor(), summary],
    )
    loader = DataLoader(TensorDataset(x, y), batch_size=2)
    trainer.fit(method, loader, loader)
    logged = trainer.logged_metrics
    assert float(logged["val/kl_teacher_student"]) >= 0 and 0 <= float(logged["val/teacher_acc_once"]) <= 1
    assert {"val/miou", "val/teacher_miou", "val/agreement", "val/pixel_acc"} <= set(logged)
    assert summary.summary["val/miou"] == pytest.approx(float(logged["val/miou"]))
