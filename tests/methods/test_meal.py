"""MEAL V2: ensemble teacher, no hard labels, one optimizer over student and discriminator."""

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from zoo.methods import MEALV2
from zoo.models import CIFARModel


def make(teachers: int = 2, **kw):
    teachers = [CIFARModel("resnet14"), CIFARModel("resnet8")][:teachers]
    return MEALV2(CIFARModel("resnet8"), teachers, num_classes=10, in_chans=1, discriminator_min_hidden=5, **kw)


@pytest.mark.parametrize("teachers", [1, 2])
def test_loss_uses_no_labels_and_ensemble_average_of_probabilities(teachers):
    """The target is log p̄ for one teacher as for an ensemble (one teacher once got its raw logits)."""
    model = make(teachers)
    x = torch.randn(6, 1, 16, 16)
    s, t = model.forward_student(x), model.forward_teacher(x)
    members = model.teacher.member_logits(x)
    p_bar = torch.stack([m.softmax(1) for m in members]).mean(0)
    torch.testing.assert_close(t.logits.exp(), p_bar, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(t.features["mean_logits"], torch.stack(members).mean(0))
    y1, y2 = torch.zeros(6, dtype=torch.long), torch.arange(6) % 10
    a, b = model.loss_terms(s, t, y1), model.loss_terms(s, t, y2)
    assert set(a) == {"sim", "disc"}
    assert all(torch.equal(a[k], b[k]) for k in a)
    soft_ce = -(p_bar * s.logits.log_softmax(1)).sum(1).mean()
    assert a["sim"].item() == pytest.approx(soft_ce.item(), rel=1e-5)


def test_one_optimizer_over_student_and_discriminator(tmp_path):
    model = make()
    x, y = torch.randn(16, 1, 16, 16), torch.randint(0, 10, (16,))
    d_before = [p.clone() for p in model.discriminator.parameters()]
    trainer = L.Trainer(accelerator="cpu", max_steps=2, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(model, train_dataloaders=DataLoader(TensorDataset(x, y), batch_size=8))
    (optimizer,) = trainer.optimizers
    params = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert {id(p) for p in model.discriminator.parameters()} <= params
    assert {id(p) for p in model.student.parameters()} <= params
    assert not {id(p) for p in model.teacher.parameters()} & params
    assert any(not torch.equal(a, b) for a, b in zip(d_before, model.discriminator.parameters()))


def test_discriminator_lr_group_and_logit_ensemble_refused():
    from functools import partial

    model = make(discriminator_lr=1e-4, optimizer=partial(torch.optim.SGD, lr=0.01, weight_decay=0.0))
    optimizer = model.configure_optimizers()
    assert [g["lr"] for g in optimizer.param_groups] == [0.01, 1e-4]
    with pytest.raises(ValueError, match="probabilities"):
        make(teacher_ensemble="logit")
