"""Feature-distillation (MAE family) configs: digits configs run fast_dev_run; ImageNet configs build and step."""

from pathlib import Path

import pytest
import torch
import yaml
from torch.utils.data import DataLoader, TensorDataset

from zoo.cli import ZooCLI

ROOT = Path(__file__).resolve().parents[2]
FEATURE = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "configs" / "feature_distillation").rglob("*.yaml"))
DIGITS = [c for c in FEATURE if "/digits/" in c]
IMAGENET = [c for c in FEATURE if "/imagenet/" in c]
SOURCES = ("student", "teacher", "mim_teacher")


def _offline_copy(config: str, tmp_path: Path) -> str:
    """Same architectures, no weights to read: the chained checkpoints of the digits flow and no download."""
    raw = yaml.safe_load((ROOT / config).read_text())
    for key in SOURCES:
        source = raw["model"]["init_args"].get(key)
        if source:
            source["init_args"].pop("checkpoint", None)
            if source["init_args"].get("pretrained"):
                source["init_args"]["pretrained"] = False
    if "ImageFolder" in raw["data"]["class_path"]:  # the module checks its folders at construction: empty splits
        for split in ("train", "val"):
            (tmp_path / "imagenet" / split).mkdir(parents=True, exist_ok=True)
        raw["data"]["init_args"]["root"] = str(tmp_path / "imagenet")
    out = tmp_path / Path(config).name
    out.write_text(yaml.safe_dump(raw))
    return str(out)


def test_feature_configs_were_found():
    names = {Path(c).stem for c in DIGITS}
    assert {"mae_teacher", "mae_baseline", "dmae", "g2sd_generic", "g2sd_specific", "hybrid"} <= names
    assert len(IMAGENET) >= 3


@pytest.mark.parametrize("config", DIGITS)
def test_digits_feature_config_runs_fast_dev_run(config, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    cli = ZooCLI(
        args=["fit", "--config", _offline_copy(config, tmp_path), "--trainer.fast_dev_run=true",
              f"--trainer.default_root_dir={tmp_path}"]
    )
    assert cli.trainer.state.finished
    assert torch.isfinite(cli.trainer.logged_metrics["train/loss"])
    expected = {"DMAE": {"rec", "feat"}, "G2SDGeneric": {"gd"}, "HybridDistill": {"feat", "rel"},
                "MAEPretrain": {"rec"}, "G2SDSpecific": {"ce", "dist"}}.get(type(cli.model).__name__)
    if expected:
        logged = {k[len("train/loss_"):] for k in cli.trainer.logged_metrics if k.startswith("train/loss_")}
        assert logged == expected


@pytest.mark.parametrize("config", IMAGENET)
def test_imagenet_feature_config_builds_and_steps_on_shaped_tensors(config, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    raw = yaml.safe_load((ROOT / config).read_text())
    # Built and stepped in bf16 (bf16-true): ViT-L teachers with their students fit the test suite's memory budget.
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        cli = ZooCLI(
            args=[
                "--config", _offline_copy(config, tmp_path), "--data.init_args.num_classes=1000",
                "--trainer.accelerator=cpu", "--trainer.devices=1", "--trainer.strategy=auto",
                "--trainer.precision=bf16-true", "--trainer.accumulate_grad_batches=1", "--trainer.logger=false",
                "--trainer.max_steps=1", "--trainer.limit_val_batches=0", "--trainer.enable_checkpointing=false",
                "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
                f"--trainer.default_root_dir={tmp_path}", "--summary.enabled=false",
            ],
            run=False,
        )
    finally:
        torch.set_default_dtype(default)
    model = cli.model
    x, y = torch.randn(2, 3, 224, 224), torch.randint(0, 1000, (2,))
    before = {k: float(v.double().sum()) for k, v in model.student.state_dict().items()}
    cli.trainer.fit(model, train_dataloaders=DataLoader(TensorDataset(x, y), batch_size=2))
    assert cli.trainer.global_step == 1
    assert any(float(v.double().sum()) != before[k] for k, v in model.student.state_dict().items())
    optimizer = cli.trainer.optimizers[0]
    assert optimizer.param_groups[0]["initial_lr"] == raw["model"]["init_args"]["optimizer"]["init_args"]["lr"]
    for teacher in model.teachers.values():
        assert all(not p.requires_grad for p in teacher.parameters())
