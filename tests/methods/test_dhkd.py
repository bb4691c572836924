"""DHKD: each head gets only its own loss, main-head inference and checkpoints, kd_stop_epoch, gradient alignment."""

import copy

import lightning as L
import pytest
import torch
from safetensors.torch import load_file
from torch.utils.data import DataLoader, TensorDataset

from zoo.methods import DHKD
from zoo.methods.dhkd import pcgrad_project
from zoo.models import CIFARModel
from zoo.publish import export_student


def make(seed=0, **kw):
    torch.manual_seed(seed)
    return DHKD(CIFARModel("resnet8"), CIFARModel("resnet14"), num_classes=10, in_chans=1, **kw)


def batch(n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 16, 16, generator=g), torch.randint(0, 10, (n,), generator=g)


def trainer(tmp_path, **kw):
    return L.Trainer(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        **kw,
    )


def flat(grads, params):
    return torch.cat([(g if g is not None else torch.zeros_like(p)).flatten() for g, p in zip(grads, params)])


def touched(params):
    return any(p.grad is not None and p.grad.abs().sum() > 0 for p in params)


@pytest.mark.parametrize("aux_head", ["linear", "nonlinear"])
def test_ce_reaches_only_the_main_head_and_binary_kl_only_the_aux_head(aux_head):
    model = make(aux_head=aux_head)
    model.train()
    x, y = batch()
    classifier = list(model.student.get_classifier().parameters())
    backbone = [p for p in model.student.parameters() if all(p is not c for c in classifier)]
    aux = list(model.aux_head.parameters())
    for name, own, other in (("ce", classifier, aux), ("bkl", aux, classifier)):
        model.zero_grad(set_to_none=True)
        terms = model.loss_terms(model.forward_student(x), model.forward_teacher(x), y)
        terms[name].backward()
        assert touched(own) and touched(backbone), name
        assert not touched(other), f"{name} reached the other head"
        assert all(p.grad is None and not p.requires_grad for p in model.teacher.parameters())


def test_forward_is_the_main_head_and_the_checkpoint_holds_no_aux_head(tmp_path):
    model = make(aux_head="nonlinear")
    model.eval()
    x, _ = batch()
    torch.testing.assert_close(model(x), model.student(x), rtol=0, atol=0)
    assert not torch.allclose(model(x), model.forward_student(x).features["aux_logits"])
    student_keys = {k for k in model.state_dict() if k.startswith("student.")}
    assert student_keys == {f"student.{k}" for k in model.student.state_dict()}
    assert any(k.startswith("aux_head.") for k in model.state_dict())
    # what zoo.publish / CheckpointPublisher export: the student's keys only, loadable into the bare architecture
    model.train()
    t = trainer(tmp_path, max_steps=1, limit_val_batches=0)
    t.fit(model, DataLoader(TensorDataset(*batch()), batch_size=8))
    t.save_checkpoint(tmp_path / "run.ckpt")
    file, _ = export_student(tmp_path / "run.ckpt", tmp_path, "dhkd-student")
    state = load_file(str(file))
    bare = CIFARModel("resnet8").build(num_classes=10, in_chans=1)
    bare.load_state_dict(state, strict=True)
    model.eval()
    bare.eval()
    torch.testing.assert_close(bare(x), model(x))


@pytest.mark.parametrize("ga", [False, True])
def test_kd_stop_epoch_and_schedule_and_logging(tmp_path, ga):
    """kd_stop_epoch=2 (counted from 1): BinaryKL on in epoch 1 only; the lr schedule steps once per epoch."""
    model = make(
        gradient_alignment=ga,
        kd_stop_epoch=2,
        optimizer=lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
        lr_scheduler=lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=1, gamma=0.5),
    )
    assert model.automatic_optimization is not ga
    seen, lrs = [], []

    class Spy(L.Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            lrs.append(trainer.optimizers[0].param_groups[0]["lr"])

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen.append((pl_module.current_kd_weight(), float(trainer.callback_metrics["train/loss_bkl"])))

    x, y = batch(16)
    loader = DataLoader(TensorDataset(x, y), batch_size=8)
    t = trainer(tmp_path, max_epochs=3, log_every_n_steps=1, callbacks=[Spy()])
    t.fit(model, loader, DataLoader(TensorDataset(x[:8], y[:8]), batch_size=8))
    assert [w for w, _ in seen] == [1.0, 1.0, 0.0, 0.0, 0.0, 0.0]
    assert all(v > 0 for _, v in seen[:2]) and all(v == 0 for _, v in seen[2:])
    assert t.global_step == 6
    assert lrs == pytest.approx([0.1, 0.05, 0.025]) and t.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.0125)
    assert {"train/loss", "train/loss_ce", "train/loss_bkl", "train/acc", "val/acc", "val/acc_aux"} <= set(
        t.logged_metrics
    )
    # the aux head is trained; val/acc is the main head's accuracy, val/acc_aux the aux head's
    params = {id(p) for g in t.optimizers[0].param_groups for p in g["params"]}
    assert {id(p) for p in model.aux_head.parameters()} <= params
    assert not {id(p) for p in model.teacher.parameters()} & params
    model.eval()
    with torch.no_grad():
        out = model.forward_student(x[:8])
    main = (out.logits.argmax(1) == y[:8]).float().mean()
    aux = (out.features["aux_logits"].argmax(1) == y[:8]).float().mean()
    assert float(t.logged_metrics["val/acc"]) == pytest.approx(float(main))
    assert float(t.logged_metrics["val/acc_aux"]) == pytest.approx(float(aux))


def test_pcgrad_projection_golden():
    g_ce = torch.tensor([1.0, 0.0])
    # conflicting: ⟨(−1, 1), (1, 0)⟩ = −1 < 0 → (−1, 1) − (−1/1)·(1, 0) = (0, 1)
    torch.testing.assert_close(pcgrad_project(torch.tensor([-1.0, 1.0]), g_ce), torch.tensor([0.0, 1.0]))
    # conflicting, non-unit reference: ⟨(−2, 1), (2, 2)⟩ = −2, ‖g_ce‖² = 8 → (−2, 1) + ¼·(2, 2) = (−1.5, 1.5)
    projected = pcgrad_project(torch.tensor([-2.0, 1.0]), torch.tensor([2.0, 2.0]))
    torch.testing.assert_close(projected, torch.tensor([-1.5, 1.5]))
    assert projected.dot(torch.tensor([2.0, 2.0])).item() == pytest.approx(0.0)
    # not conflicting (acute or orthogonal): unchanged
    torch.testing.assert_close(pcgrad_project(torch.tensor([1.0, 1.0]), g_ce), torch.tensor([1.0, 1.0]))
    torch.testing.assert_close(pcgrad_project(torch.tensor([0.0, 3.0]), g_ce), torch.tensor([0.0, 3.0]))
    # a zero reference is never a conflict
    torch.testing.assert_close(pcgrad_project(torch.tensor([-1.0, 2.0]), torch.zeros(2)), torch.tensor([-1.0, 2.0]))


def test_gradient_alignment_step_applies_ce_plus_projected_kd(tmp_path):
    lr = 0.1
    model = make(gradient_alignment=True, optimizer=lambda p: torch.optim.SGD(p, lr=lr))
    x, y = batch(seed=1)
    # expected gradient, from our own computation on a copy at the same weights and batch
    ref = copy.deepcopy(model)
    ref.train()
    params = ref.trainable_parameters()
    terms = ref.loss_terms(ref.forward_student(x), ref.forward_teacher(x), y)
    g_ce = flat(torch.autograd.grad(terms["ce"], params, retain_graph=True, allow_unused=True), params)
    g_kd = flat(torch.autograd.grad(terms["bkl"], params, allow_unused=True), params)
    assert g_kd.dot(g_ce) < 0  # this batch conflicts, so the projection is exercised
    expected = g_ce + pcgrad_project(g_kd, g_ce)
    assert not torch.allclose(expected, g_ce + g_kd)

    before = [p.detach().clone() for p in model.trainable_parameters()]
    student_before = {k: v.clone() for k, v in model.student.state_dict().items()}
    teacher_before = {k: v.clone() for k, v in model.teacher.state_dict().items()}
    t = trainer(tmp_path, max_steps=1, limit_val_batches=0)
    t.fit(model, DataLoader(TensorDataset(x, y), batch_size=8))
    assert not model.automatic_optimization and t.global_step == 1
    applied = torch.cat([(b - p.detach()).flatten() for b, p in zip(before, model.trainable_parameters())]) / lr
    torch.testing.assert_close(applied, expected, rtol=1e-4, atol=1e-6)
    assert any(not torch.equal(v, student_before[k]) for k, v in model.student.state_dict().items())
    for k, v in model.teacher.state_dict().items():
        assert torch.equal(v, teacher_before[k])


def test_invalid_arguments_are_refused():
    with pytest.raises(ValueError, match="aux_head"):
        make(aux_head="mlp")
    with pytest.raises(ValueError, match="kd_stop_epoch"):
        make(kd_stop_epoch=0)


def test_a_teacher_ensemble_must_average_logits():
    """BinaryKL-Norm is not shift-invariant: a ``prob`` ensemble (log p̄) is refused, a ``logit`` one is accepted."""
    teachers = [CIFARModel("resnet14"), CIFARModel("resnet8")]
    with pytest.raises(ValueError, match="teacher_ensemble must be 'logit'"):
        DHKD(CIFARModel("resnet8"), teachers, num_classes=10, in_chans=1)
    model = DHKD(CIFARModel("resnet8"), teachers, num_classes=10, in_chans=1, teacher_ensemble="logit")
    x, _ = batch()
    torch.testing.assert_close(model.forward_teacher(x).logits, torch.stack(model.teacher.member_logits(x)).mean(0))
