"""Segmentation configs: digit-scenes configs train with fast_dev_run; VOC/Cityscapes configs build and step."""

from pathlib import Path

import pytest
import torch
import yaml
from torch.utils.data import DataLoader, TensorDataset

from zoo.cli import ZooCLI

ROOT = Path(__file__).resolve().parents[2]
SEG = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "configs" / "segmentation").rglob("*.yaml"))
DIGIT_SCENES = [c for c in SEG if "/digit_scenes/" in c]
STANDARD = [c for c in SEG if "/digit_scenes/" not in c]
SOURCES = ("student", "teacher", "wide_teacher")


def _empty_data_root(tmp_path: Path) -> Path:
    """A folder with the top-level layout of VOC, Cityscapes and ADE20K and no images: enough for the data modules to
    be built (they check their root at construction); the steps below run on tensors."""
    root = tmp_path / "data_root"
    for folder in ("JPEGImages", "leftImg8bit/train", "images/training"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    return root


def _offline_copy(config: str, tmp_path: Path, **data_args) -> str:
    """The config with the same architectures but no weights to read (no teacher file or download in CI)."""
    raw = yaml.safe_load((ROOT / config).read_text())
    for key in SOURCES:
        source = raw["model"]["init_args"].get(key)
        if source:
            source["init_args"].pop("checkpoint", None)
            if source["init_args"].get("encoder_weights"):
                source["init_args"]["encoder_weights"] = None
    raw["data"]["init_args"].update(data_args)
    out = tmp_path / Path(config).name
    out.write_text(yaml.safe_dump(raw))
    return str(out)


def test_segmentation_configs_were_found():
    names = {Path(c).stem for c in DIGIT_SCENES}
    assert {"teacher", "baseline", "pixel_kd", "cwd", "lad_teacher", "lad", "mgd"} <= names
    assert any("/voc/" in c for c in STANDARD) and any("/cityscapes/" in c for c in STANDARD)


@pytest.mark.parametrize("config", DIGIT_SCENES)
def test_digit_scenes_config_runs_fast_dev_run(config, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    small = dict(num_train=64, num_val=16, num_test=16, batch_size=4)
    cli = ZooCLI(
        args=[
            "fit", "--config", _offline_copy(config, tmp_path, **small), "--trainer.fast_dev_run=true",
            f"--trainer.default_root_dir={tmp_path}",
        ]
    )
    assert cli.trainer.state.finished
    logged = cli.trainer.logged_metrics
    assert torch.isfinite(logged["train/loss"])
    assert 0 <= float(logged["val/miou"]) <= 1
    method = cli.config.fit.model.class_path.rsplit(".", 1)[-1]
    expected = {
        "PixelKD": {"ce", "kd"}, "CWD": {"ce", "cwd"}, "LAD": {"ce", "cwd"}, "LADTeacher": {"ce", "consistency"},
        "MGD": {"sup", "pixel_l", "pixel_u", "semantic", "content"}, "SupervisedSegmentation": {"ce"},
    }[method]
    assert {k[len("train/loss_"):] for k in logged if k.startswith("train/loss_")} == expected
    if cli.model.teacher is not None:
        assert "val/teacher_miou" in logged and "val/agreement" in logged


@pytest.mark.parametrize("config", STANDARD)
def test_standard_config_builds_and_steps_on_shaped_tensors(config, tmp_path, monkeypatch):
    """Full architectures and recipe; the batch is 2 random 3×128×128 images (a 512 crop is too slow on a CPU)."""
    monkeypatch.chdir(ROOT)
    raw = yaml.safe_load((ROOT / config).read_text())
    cli = ZooCLI(
        args=[
            "--config", _offline_copy(config, tmp_path, labelled_list=None, unlabelled_list=None,
                                      root=str(_empty_data_root(tmp_path))),
            "--trainer.accelerator=cpu", "--trainer.devices=1", "--trainer.strategy=auto", "--trainer.precision=32",
            "--trainer.sync_batchnorm=false", "--trainer.logger=false", "--trainer.max_steps=1",
            "--trainer.limit_val_batches=0", "--trainer.enable_checkpointing=false",
            "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
            f"--trainer.default_root_dir={tmp_path}", "--summary.enabled=false",
        ],
        run=False,
    )
    data, model = cli.datamodule, cli.model
    assert model.num_classes == data.num_classes and data.ignore_index == 255
    x = torch.randn(2, 3, 128, 128)
    y = torch.randint(0, data.num_classes, (2, 128, 128))
    y[:, :8] = 255
    if raw["data"]["init_args"].get("semi_supervised"):
        u = TensorDataset(torch.randn(2, 3, 128, 128), torch.full((2, 128, 128), 255))
        loaders = {
            "labelled": DataLoader(TensorDataset(x, y), batch_size=2),
            "unlabelled": DataLoader(u, batch_size=2),
            "unlabelled_mix": DataLoader(u, batch_size=2),
        }
        from lightning.pytorch.utilities import CombinedLoader

        train = CombinedLoader(loaders, mode="max_size_cycle")
    else:
        train = DataLoader(TensorDataset(x, y), batch_size=2)
    before = {k: v.clone() for k, v in model.student.state_dict().items()}
    cli.trainer.fit(model, train_dataloaders=train)
    assert cli.trainer.global_step == 1
    assert any(not torch.equal(v, before[k]) for k, v in model.student.state_dict().items())
    optimizer = cli.trainer.optimizers[0]
    expected = raw["model"]["init_args"]["optimizer"]
    assert type(optimizer).__name__ == expected["class_path"].rsplit(".", 1)[-1]
    assert optimizer.param_groups[0]["initial_lr"] == expected["init_args"]["lr"]
    assert cli.trainer.lr_scheduler_configs[0].interval == "step"
