"""Under Lightning's DDP strategy the teacher is not part of the wrapped module."""

import lightning as L
import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, TensorDataset

from zoo.methods import KD
from zoo.models import CIFARModel


def test_ddp_wraps_the_student_only(tmp_path):
    model = KD(CIFARModel("resnet8"), CIFARModel("resnet14"), num_classes=10, in_chans=1)
    x, y = torch.randn(8, 1, 16, 16), torch.randint(0, 10, (8,))
    seen = {}

    class Inspect(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, *args):
            wrapped = trainer.strategy.model
            seen["ddp"] = isinstance(wrapped, DistributedDataParallel)
            names = {n for n, _ in wrapped.named_parameters()}
            seen["teacher_params"] = [n for n in names if "teacher" in n]
            seen["student_params"] = len([n for n in names if ".student." in n])
            seen["teacher_eval"] = not pl_module.teacher.training

    trainer = L.Trainer(
        accelerator="cpu", devices=1, strategy="ddp", max_steps=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[Inspect()], default_root_dir=tmp_path,
    )
    trainer.fit(model, train_dataloaders=DataLoader(TensorDataset(x, y), batch_size=8))
    assert seen["ddp"] and seen["student_params"] > 0
    assert seen["teacher_params"] == [] and seen["teacher_eval"]
