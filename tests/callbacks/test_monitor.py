"""DistillationMonitor: names, golden KL, teacher accuracy once, loss shares, throughput, no-teacher runs."""

import csv
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from callbacks import DistillationMonitor, PredictionGallery
from callbacks.gallery import LINE_HEIGHT, PAD
from zoo.data import DigitsDataModule
from zoo.methods import KD, Supervised
from zoo.models import CIFARModel

PERF = ("perf/images_per_sec", "perf/data_time", "perf/step_time", "perf/data_share")
BATCH = 32


def make_trainer(tmp_path: Path, callbacks: list, **kw) -> L.Trainer:
    defaults = dict(
        accelerator="cpu", max_epochs=1, limit_train_batches=3, limit_val_batches=2, log_every_n_steps=1,
        logger=CSVLogger(tmp_path, name="run"), enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=False, default_root_dir=tmp_path,
    )
    return L.Trainer(callbacks=callbacks, **{**defaults, **kw})


def read_rows(trainer: L.Trainer) -> list[dict[str, float]]:
    with open(Path(trainer.logger.log_dir) / "metrics.csv") as f:
        return [{k: float(v) for k, v in row.items() if v != ""} for row in csv.DictReader(f)]


@pytest.fixture(scope="module")
def kd_run(tmp_path_factory):
    """KD resnet14 → resnet8 on 16×16 digits, 2 epochs of 3 steps; validation batches of 256 and 104 images."""
    torch.manual_seed(0)
    tmp_path = tmp_path_factory.mktemp("kd")
    model = KD(CIFARModel("resnet8"), CIFARModel("resnet14"), num_classes=10, in_chans=1)
    data = DigitsDataModule(image_size=16, batch_size=BATCH)
    trainer = make_trainer(tmp_path, [DistillationMonitor()], max_epochs=2)
    trainer.fit(model, datamodule=data)
    return trainer, model, data, read_rows(trainer)


def test_metric_names_are_logged(kd_run):
    trainer, _, _, rows = kd_run
    names = {"val/kl_teacher_student", "val/teacher_acc_once", "train/share_ce", "train/share_kd", *PERF}
    assert names <= set(trainer.logged_metrics)
    assert names <= set().union(*rows)
    # the method logs val/agreement itself; the monitor adds no second copy under that name or another
    assert sum("val/agreement" in row for row in rows) == 2


def test_kl_is_the_sample_weighted_mean_over_the_validation_epoch(kd_run):
    trainer, model, data, rows = kd_run
    logged = [row["val/kl_teacher_student"] for row in rows if "val/kl_teacher_student" in row]
    assert len(logged) == 2  # one per epoch, none from the sanity check
    # the last validation ran after the last step, so the final weights reproduce it
    model.eval()
    total, count, batch_means = 0.0, 0, []
    with torch.no_grad():
        for i, (x, _) in enumerate(data.val_dataloader()):
            if i == 2:
                break
            log_ps = F.log_softmax(model.student(x).double(), -1)
            log_pt = F.log_softmax(model.teacher(x).double(), -1)
            per_sample = (log_pt.exp() * (log_pt - log_ps)).sum(-1)
            total, count = total + float(per_sample.sum()), count + len(x)
            batch_means.append(float(per_sample.mean()))
    assert count == 360  # 256 + 104: unequal batches, so the weighting matters
    assert logged[-1] == pytest.approx(total / count, rel=1e-4)
    assert logged[-1] != pytest.approx(sum(batch_means) / 2, rel=1e-4)


def test_teacher_accuracy_is_logged_exactly_once(kd_run):
    _, _, _, rows = kd_run
    once = [row for row in rows if "val/teacher_acc_once" in row]
    assert len(once) == 1 and once[0]["epoch"] == 0
    # the same batches and a frozen teacher: equal to the method's epoch-0 torchmetrics value
    assert once[0]["val/teacher_acc_once"] == pytest.approx(once[0]["val/teacher_acc"], abs=1e-6)
    assert len([row for row in rows if "val/teacher_acc" in row]) == 2


def test_loss_shares_sum_to_one_at_every_logging_step(kd_run):
    _, _, _, rows = kd_run
    steps = [row for row in rows if "train/share_ce" in row]
    assert len(steps) == 6  # log_every_n_steps=1, 2 epochs × 3 steps
    losses = {row["step"]: row for row in rows if "train/loss" in row}
    assert sorted(row["step"] for row in steps) == sorted(losses)  # the same steps as Lightning's loss rows
    for row in steps:
        assert row["train/share_ce"] + row["train/share_kd"] == pytest.approx(1.0, abs=1e-5)
        loss = losses[row["step"]]
        assert row["train/share_kd"] == pytest.approx(loss["train/loss_kd"] / loss["train/loss"], rel=1e-5)


def test_throughput_is_positive_and_consistent(kd_run):
    _, _, _, rows = kd_run
    steps = [row for row in rows if "perf/images_per_sec" in row]
    assert len(steps) == 6
    for row in steps:
        assert all(row[name] > 0 for name in PERF)
        iteration = row["perf/data_time"] + row["perf/step_time"]
        assert row["perf/images_per_sec"] == pytest.approx(BATCH / iteration, rel=1e-4)
        assert row["perf/data_share"] == pytest.approx(row["perf/data_time"] / iteration, rel=1e-4)
        assert 0 < row["perf/data_share"] < 1


def test_no_teacher_logs_no_kl_nor_teacher_values(tmp_path):
    model = Supervised(CIFARModel("resnet8"), num_classes=10, in_chans=1)
    data = DigitsDataModule(image_size=16, batch_size=BATCH)
    gallery = PredictionGallery(num_images=4)
    trainer = make_trainer(tmp_path, [DistillationMonitor(), gallery], limit_train_batches=2, limit_val_batches=1)
    trainer.fit(model, datamodule=data)
    logged = set(trainer.logged_metrics)
    assert not logged & {"val/kl_teacher_student", "val/teacher_acc_once", "val/agreement"}
    assert float(trainer.logged_metrics["train/share_ce"]) == pytest.approx(1.0)
    assert set(PERF) <= logged
    # the gallery drew its tiles with two caption lines (label, student) and no teacher line
    from PIL import Image

    with Image.open(gallery.last_path) as image:
        assert image.size == (2 * (64 + 2 * PAD), 2 * (64 + 2 * LINE_HEIGHT + 2 * PAD))


class PlainModule(L.LightningModule):
    """Not a DistillationMethod: a linear student and a fixed linear "teacher", returning the outputs dict."""

    def __init__(self) -> None:
        super().__init__()
        self.student = nn.Linear(4, 3)
        self.teacher_net = nn.Linear(4, 3).requires_grad_(False)

    def training_step(self, batch, batch_idx):
        x, y = batch
        ce = F.cross_entropy(self.student(x), y)
        l2 = 0.01 * self.student.weight.square().sum()
        self.log_dict({"train/loss_ce": ce, "train/loss_l2": l2}, on_step=True, on_epoch=True)
        self.log("train/loss", ce + l2)
        return ce + l2

    def validation_step(self, batch, batch_idx):
        x, y = batch
        return {"logits": self.student(x), "teacher_logits": self.teacher_net(x), "target": y}

    def configure_optimizers(self):
        return torch.optim.SGD(self.student.parameters(), lr=0.1)


def tensors(n: int, batch_size: int) -> DataLoader:
    g = torch.Generator().manual_seed(1)
    return DataLoader(TensorDataset(torch.randn(n, 4, generator=g), torch.randint(0, 3, (n,), generator=g)), batch_size)


def test_plain_module_agreement_cadence_and_epoch_suffixed_terms(tmp_path):
    model = PlainModule()
    monitor = DistillationMonitor(log_every_n_steps=2, cuda_sync=True)  # cuda_sync is a no-op on CPU
    trainer = make_trainer(tmp_path, [monitor], limit_train_batches=4, limit_val_batches=None, num_sanity_val_steps=0)
    trainer.fit(model, train_dataloaders=tensors(32, 8), val_dataloaders=tensors(20, 8))  # val batches 8, 8, 4
    rows = read_rows(trainer)
    with torch.no_grad():
        x, _ = tensors(20, 20).dataset.tensors
        agree = float((model.student(x).argmax(-1) == model.teacher_net(x).argmax(-1)).float().mean())
    val = [row for row in rows if "val/agreement" in row]
    assert len(val) == 1 and val[0]["val/agreement"] == pytest.approx(agree, abs=1e-6)
    # every 2nd optimizer step only (Lightning's CSV step is the global step before the optimizer step); the
    # values are written at those steps only, never repeated stale on the trainer's steps in between
    shares = [row for row in rows if "train/share_ce" in row]
    assert [int(row["step"]) for row in shares] == [1, 3]
    for row in shares:
        assert set(row) >= {"train/share_ce", "train/share_l2", *PERF}
        assert not {"train/share_ce_step", "train/share_ce_epoch"} & set(row)
        assert row["train/share_ce"] + row["train/share_l2"] == pytest.approx(1.0, abs=1e-5)
        iteration = row["perf/data_time"] + row["perf/step_time"]
        assert row["perf/images_per_sec"] == pytest.approx(8 / iteration, rel=1e-4)


def test_options_are_validated():
    with pytest.raises(ValueError, match="log_every_n_steps"):
        DistillationMonitor(log_every_n_steps=0)
