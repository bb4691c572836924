"""Loss terms are logged only on the steps whose values Lightning keeps, and the files say the same as logging every
step would (zoo.step_logging)."""

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader, TensorDataset

import zoo.step_logging
from zoo.methods import KD
from zoo.models import CIFARModel


def _fit(tmp_path, name: str, max_steps: int = -1) -> tuple[str, dict[str, float]]:
    L.seed_everything(0)
    method = KD(CIFARModel("resnet8"), CIFARModel("resnet8"), num_classes=10, in_chans=1)
    data = TensorDataset(torch.randn(20, 1, 16, 16), torch.randint(0, 10, (20,)))
    trainer = L.Trainer(accelerator="cpu", max_epochs=2, max_steps=max_steps, log_every_n_steps=3,
                        logger=CSVLogger(tmp_path, name=name), enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, default_root_dir=tmp_path)
    trainer.fit(method, DataLoader(data, batch_size=4))  # 5 steps an epoch: the epoch ends off the 3-step grid
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    return (tmp_path / name / "version_0" / "metrics.csv").read_text(), metrics


@pytest.mark.parametrize("max_steps", [-1, 7])
def test_metrics_file_equals_logging_every_step(tmp_path, monkeypatch, max_steps):
    kept_csv, kept_metrics = _fit(tmp_path, "kept", max_steps)
    monkeypatch.setattr(zoo.step_logging, "keeps_step_values", lambda trainer: True)
    every_csv, every_metrics = _fit(tmp_path, "every", max_steps)
    assert kept_csv == every_csv
    assert kept_metrics == every_metrics
    assert "train/loss_kd" in kept_csv.splitlines()[0]
    rows = [line.split(",") for line in kept_csv.splitlines()[1:]]
    assert len(rows) >= 3  # steps 3, 6 and the epoch ends
