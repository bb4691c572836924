"""Shared fixtures of the dataset-distillation tests: tiny digits experts (trained once per session) and the real
digits training images."""

from pathlib import Path

import pytest
import torch

from zoo.data import DigitsDataModule

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "configs" / "dataset_distillation" / "digits"


def _train_experts(config: str, buffer: Path, root: Path) -> Path:
    from zoo.cli import ZooCLI

    ZooCLI(
        args=[
            "fit", "--config", str(CONFIGS / config), "--model.init_args.num_experts=2",
            "--model.init_args.train_epochs=4", "--trainer.max_epochs=8", f"--model.init_args.buffer_dir={buffer}",
            *(["--model.init_args.lr_decay_epoch=2"] if "smooth" in config else []),
            f"--trainer.default_root_dir={root}", "--trainer.logger=false", "--summary.enabled=false",
        ]
    )
    return buffer


@pytest.fixture(scope="session")
def buffers(tmp_path_factory):
    """Two experts × 4 epochs of each digits experts config: ``{"experts": path, "experts_smooth": path}``."""
    root = tmp_path_factory.mktemp("experts")
    return {
        "experts": _train_experts("experts.yaml", root / "experts", root),
        "experts_smooth": _train_experts("experts_smooth.yaml", root / "experts_smooth", root),
    }


@pytest.fixture(scope="session")
def real():
    """The real digits training images (8×8, one channel, normalised) and labels."""
    dm = DigitsDataModule(image_size=8, channels=1, augment=False)
    dm.setup()
    images = torch.stack([dm.train_set[i][0] for i in range(len(dm.train_set))])
    labels = torch.tensor([int(dm.train_set[i][1]) for i in range(len(dm.train_set))])
    return images, labels
