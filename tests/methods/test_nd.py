"""KD++ / DKD++: class centres from the frozen teacher at fit start, cached and reloaded; projector; warm-up."""

import lightning as L
import pytest
import torch

from zoo.data import DigitsDataModule
from zoo.methods import DKDND, KDND
from zoo.models import CIFARModel


def fit(model, tmp_path, epochs=1, **kw):
    data = DigitsDataModule(image_size=16, batch_size=64, augment=False)
    trainer = L.Trainer(
        accelerator="cpu", max_epochs=epochs, limit_train_batches=2, limit_val_batches=1, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
        **kw,
    )
    trainer.fit(model, datamodule=data)
    return trainer, data


def test_centres_are_the_teacher_class_means_and_are_cached(tmp_path):
    file = tmp_path / "centres.safetensors"
    model = KDND(CIFARModel("resnet8"), CIFARModel("resnet14"), num_classes=10, in_chans=1, centers_file=str(file))
    teacher_before = {k: v.clone() for k, v in model.teacher.state_dict().items()}
    _, data = fit(model, tmp_path)
    data.setup()
    x = torch.stack([data.train_set[i][0] for i in range(len(data.train_set))])
    y = data.train_set.labels
    with torch.no_grad():
        emb = model.teacher.forward_features(x)[1]["pre_logits"]
    expected = torch.stack([emb[y == c].mean(0) for c in range(10)])
    torch.testing.assert_close(model.nd_loss.centers, expected, rtol=1e-4, atol=1e-5)
    assert file.is_file()
    for k, v in model.teacher.state_dict().items():
        assert torch.equal(v, teacher_before[k])
    # a new run with the same teacher loads the file instead of recomputing
    weights = tmp_path / "teacher.pt"
    torch.save(model.teacher.members[0].state_dict(), weights)
    same_teacher = CIFARModel("resnet14", checkpoint=str(weights))
    again = KDND(CIFARModel("resnet8"), same_teacher, num_classes=10, in_chans=1, centers_file=str(file))
    called = []
    import zoo.methods.nd as nd

    original = nd.compute_class_centers
    nd.compute_class_centers = lambda *a, **k: called.append(1) or original(*a, **k)
    try:
        fit(again, tmp_path)
    finally:
        nd.compute_class_centers = original
    assert not called
    torch.testing.assert_close(again.nd_loss.centers, model.nd_loss.centers)


def test_centres_of_another_teacher_are_refused(tmp_path):
    file = tmp_path / "centres.safetensors"
    fit(KDND(CIFARModel("resnet8"), CIFARModel("resnet14"), num_classes=10, in_chans=1, centers_file=str(file)),
        tmp_path)
    other = KDND(CIFARModel("resnet8"), CIFARModel("resnet20"), num_classes=10, in_chans=1, centers_file=str(file))
    with pytest.raises(ValueError, match="cifar:resnet14"):
        fit(other, tmp_path)


def test_projector_only_when_dims_differ_and_terms_logged(tmp_path):
    same = KDND(CIFARModel("resnet8"), CIFARModel("resnet14"), num_classes=10, in_chans=1)
    assert isinstance(same.projector, torch.nn.Identity)
    wide = DKDND(CIFARModel("resnet8"), CIFARModel("wrn_16_2"), num_classes=10, in_chans=1)
    assert wide.projector[2].in_features == 64 and wide.projector[2].out_features == 128
    trainer, _ = fit(wide, tmp_path, epochs=2, log_every_n_steps=1)
    logged = trainer.logged_metrics
    assert {"train/loss_ce", "train/loss_tckd", "train/loss_nckd", "train/loss_nd"} <= set(logged)
    assert (tmp_path / "nd_class_centers.safetensors").is_file()  # default: next to the run
    # the projector is trained (in the optimizer), the teacher is not
    params = {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}
    assert {id(p) for p in wide.projector.parameters()} <= params
    assert not {id(p) for p in wide.teacher.parameters()} & params


def test_kd_warmup_counts_from_zero_and_nd_is_not_warmed_up(tmp_path):
    model = KDND(CIFARModel("resnet8"), CIFARModel("resnet14"), num_classes=10, in_chans=1, warmup_epochs=2)
    seen = []

    class Spy(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen.append((pl_module.kd_warmup(), float(trainer.callback_metrics["train/loss_kd"]),
                         float(trainer.callback_metrics["train/loss_nd"])))

    fit(model, tmp_path, epochs=3, callbacks=[Spy()], log_every_n_steps=1)
    warm = [s[0] for s in seen]
    assert warm == [0.0, 0.0, 0.5, 0.5, 1.0, 1.0]
    assert seen[0][1] == 0.0 and seen[0][2] > 0.0  # epoch 0: no KD, ND already on
