"""Methods: one step changes the student and never the teacher; terms logged; checkpoints hold no teacher."""

import copy

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from zoo.methods import DKD, KD, Supervised
from zoo.models import CIFARModel


def loader(n: int = 32, classes: int = 10) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 1, 16, 16, generator=g)
    y = torch.randint(0, classes, (n,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=16)


def make(method, **kw):
    teacher = kw.pop("teacher", CIFARModel("resnet14"))
    if method is Supervised:
        return Supervised(CIFARModel("resnet8"), num_classes=10, in_chans=1, **kw)
    return method(CIFARModel("resnet8"), teacher, num_classes=10, in_chans=1, **kw)


def trainer(tmp_path, **kw) -> L.Trainer:
    defaults = dict(
        accelerator="cpu", max_epochs=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=False, default_root_dir=tmp_path, limit_val_batches=1,
    )
    return L.Trainer(**{**defaults, **kw})


@pytest.mark.parametrize("method,terms", [(Supervised, ["ce"]), (KD, ["ce", "kd"]), (DKD, ["ce", "tckd", "nckd"])])
def test_one_step_updates_student_not_teacher_and_logs_terms(tmp_path, method, terms):
    model = make(method)
    student_before = copy.deepcopy(model.student.state_dict())
    teacher_before = copy.deepcopy(model.teacher.state_dict()) if model.teacher is not None else None
    t = trainer(tmp_path, max_steps=1, limit_train_batches=1)
    t.fit(model, train_dataloaders=loader(), val_dataloaders=loader())
    changed = [k for k, v in model.student.state_dict().items() if not torch.equal(v, student_before[k])]
    assert changed, "the student did not change"
    if teacher_before is not None:
        for k, v in model.teacher.state_dict().items():
            assert torch.equal(v, teacher_before[k]), f"teacher {k} changed"
        assert not model.teacher.training
    logged = t.logged_metrics
    for name in terms:
        assert f"train/loss_{name}" in logged
    assert "train/loss" in logged  # the sum of the terms by construction; their weights: test_loss_terms_golden
    assert {"val/acc", "val/acc5"} <= set(logged)
    if method is not Supervised:
        assert {"val/agreement", "val/teacher_acc"} <= set(logged)


def _kl(p, q):
    return (p * (p.log() - q.log())).sum(1).mean()


@pytest.mark.parametrize("method", [KD, DKD])
def test_loss_terms_golden(method):
    """Each logged term with its weight, against float64 formulas written here (defaults: mdistiller's CIFAR-100)."""
    g = torch.Generator().manual_seed(3)
    zs, zt = 3 * torch.randn(6, 10, generator=g), 3 * torch.randn(6, 10, generator=g)
    y = torch.randint(0, 10, (6,), generator=g)
    from zoo.methods.base import Outputs

    terms = make(method).loss_terms(Outputs(zs), Outputs(zt), y)
    s64, t64 = zs.double(), zt.double()
    ce = -s64.log_softmax(1).gather(1, y[:, None]).mean()
    ps, pt = (s64 / 4).softmax(1), (t64 / 4).softmax(1)
    if method is KD:  # 0.1·CE + 0.9·T²·KL(p_t ‖ p_s), T = 4
        expected = {"ce": 0.1 * ce, "kd": 0.9 * 16 * _kl(pt, ps)}
    else:  # CE + min(e/20, 1)·(1·TCKD + 8·NCKD), T = 4, epoch e = 1 before training
        hot = torch.nn.functional.one_hot(y, 10).bool()
        pst, ptt = ps[hot], pt[hot]
        binary_s, binary_t = torch.stack([pst, 1 - pst], 1), torch.stack([ptt, 1 - ptt], 1)
        rest_s, rest_t = ps[~hot].view(6, 9), pt[~hot].view(6, 9)
        rest_s, rest_t = rest_s / rest_s.sum(1, keepdim=True), rest_t / rest_t.sum(1, keepdim=True)
        w = 1 / 20
        expected = {"ce": ce, "tckd": w * 16 * _kl(binary_t, binary_s), "nckd": w * 8 * 16 * _kl(rest_t, rest_s)}
    assert set(terms) == set(expected)
    for name, value in expected.items():
        assert terms[name].item() == pytest.approx(value.item(), rel=1e-4), name  # float32 vs float64


def test_teacher_is_outside_parameters_optimizer_and_state_dict():
    model = make(KD)
    teacher_params = {id(p) for p in model.teacher.parameters()}
    assert not teacher_params & {id(p) for p in model.parameters()}
    optimizer = model.configure_optimizers()
    opt_params = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert opt_params == {id(p) for p in model.student.parameters()}
    assert all(k.startswith("student.") for k in model.state_dict())
    assert "teacher" not in dict(model.named_modules())
    model.train()
    assert not model.teacher.training


def test_teacher_follows_device_and_dtype_moves():
    model = make(KD).double()
    assert next(model.teacher.parameters()).dtype == torch.float64
    model.float()
    assert next(model.teacher.parameters()).dtype == torch.float32


def test_checkpoint_holds_no_teacher_and_resume_restores_it(tmp_path):
    teacher_file = tmp_path / "teacher.pt"
    net = CIFARModel("resnet14").build(num_classes=10, in_chans=1)
    torch.save({"model": net.state_dict()}, teacher_file)
    source = CIFARModel("resnet14", checkpoint=str(teacher_file))
    model = make(KD, teacher=source)
    t = trainer(tmp_path, max_epochs=1, limit_train_batches=2, enable_checkpointing=True)
    t.fit(model, train_dataloaders=loader(), val_dataloaders=loader())
    ckpt_path = t.checkpoint_callback.best_model_path
    ckpt = torch.load(ckpt_path, weights_only=False)
    assert ckpt["state_dict"] and all(k.startswith("student.") for k in ckpt["state_dict"])
    restored = KD.load_from_checkpoint(ckpt_path)
    for k, v in restored.teacher.members[0].state_dict().items():
        assert torch.equal(v, net.state_dict()[k]), k
    for k, v in restored.student.state_dict().items():
        assert torch.equal(v, model.student.state_dict()[k]), k
    # resume: training continues from the checkpoint with the teacher rebuilt from its source
    resumed = make(KD, teacher=source)
    t2 = trainer(tmp_path, max_epochs=2, limit_train_batches=2, enable_checkpointing=True)
    t2.fit(resumed, train_dataloaders=loader(), val_dataloaders=loader(), ckpt_path=ckpt_path)
    assert t2.current_epoch == 2 and t2.global_step == 4
    for k, v in resumed.teacher.members[0].state_dict().items():
        assert torch.equal(v, net.state_dict()[k]), k


def test_dkd_rejects_non_positive_warmup():
    with pytest.raises(ValueError, match="warmup_epochs"):
        make(DKD, warmup_epochs=0)


def test_dkd_warmup_factor_follows_trainer_epoch(tmp_path):
    model = make(DKD, warmup_epochs=4)
    t = trainer(tmp_path, max_epochs=3, limit_train_batches=1, limit_val_batches=0)
    seen = []

    class Spy(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, *args):
            seen.append(pl_module.warmup_factor())

    t.callbacks.append(Spy())
    t.fit(model, train_dataloaders=loader())
    assert seen == [0.25, 0.5, 0.75]


def test_kd_requires_a_teacher_and_num_classes_is_inferred():
    with pytest.raises(ValueError, match="teacher is required"):
        KD(CIFARModel("resnet8"), None, num_classes=10)
    model = Supervised(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 3)))
    assert model.num_classes == 3


def test_optimizer_and_scheduler_factories():
    from functools import partial

    model = make(
        KD,
        optimizer=partial(torch.optim.AdamW, lr=1e-3, weight_decay=0.05),
        lr_scheduler=partial(torch.optim.lr_scheduler.MultiStepLR, milestones=[2, 4], gamma=0.1),
    )
    out = model.configure_optimizers()
    assert isinstance(out["optimizer"], torch.optim.AdamW)
    assert out["lr_scheduler"]["scheduler"].milestones == {2: 1, 4: 1}
    assert out["lr_scheduler"]["interval"] == "epoch"


def test_a_method_that_defines_no_loss_is_refused_at_construction():
    from zoo.methods import ClassificationMethod

    class NoLoss(ClassificationMethod):
        requires_teacher = False

    with pytest.raises(TypeError, match="NoLoss defines no loss: override loss_terms"):
        NoLoss(CIFARModel(name="resnet8"), num_classes=10, in_chans=1)


def test_epoch_train_accuracy_covers_every_step_of_the_epoch(tmp_path):
    """train/acc is logged per epoch from ``update()`` calls: it must equal the accuracy of all the epoch's logits."""
    model = make(KD)
    seen = []
    forward = model.forward_student

    def spy(x):
        out = forward(x)
        seen.append(out.logits.detach().argmax(1))
        return out

    model.forward_student = spy
    data = loader(n=48)  # three batches of 16
    t = trainer(tmp_path, limit_val_batches=0)
    t.fit(model, train_dataloaders=data)
    labels = torch.cat([y for _, y in data])
    expected = (torch.cat(seen) == labels).float().mean()
    assert len(seen) == 3
    assert float(t.logged_metrics["train/acc"]) == pytest.approx(float(expected))
