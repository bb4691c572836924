"""Every shipped config parses; digits configs train with fast_dev_run; CIFAR/ImageNet configs build and step."""

from pathlib import Path

import pytest
import torch
import yaml
from torch.utils.data import DataLoader, TensorDataset

from zoo.cli import ZooCLI

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "configs").rglob("*.yaml"))
# Dataset-distillation configs need an expert buffer first (tests/dataset_distillation runs them); the feature
# distillation configs chain checkpoints (tests/configs/test_feature_configs.py runs them without).
# families whose digits configs run in their own tests (chained stages, expert buffers)
OWN_TESTS = ("/dataset_distillation/", "/feature_distillation/", "/vlm/")
DIGITS = [
    c for c in CONFIGS if ("/digits/" in c and not any(k in c for k in OWN_TESTS)) or c.endswith("quickstart.yaml")
]
FULL_SIZE = {"cifar100": (3, 32, 32), "imagenet": (3, 224, 224)}
LARGE = [c for c in CONFIGS if any(f"/{k}/" in c for k in FULL_SIZE) and not any(k in c for k in OWN_TESTS)]


class ParseOnlyCLI(ZooCLI):
    def instantiate_classes(self) -> None:  # parse and validate, build nothing
        pass


def test_configs_were_found():
    assert len(CONFIGS) >= 9 and DIGITS and LARGE


@pytest.mark.parametrize("config", CONFIGS)
def test_config_parses(config, monkeypatch):
    monkeypatch.chdir(ROOT)
    cli = ParseOnlyCLI(args=["--config", config], run=False)
    assert cli.config.model.class_path.startswith("zoo.")
    assert cli.config.data.class_path.startswith(("zoo.data.", "zoo.dataset_distillation.DistilledDataModule"))


@pytest.mark.parametrize("config", DIGITS)
def test_digits_config_runs_fast_dev_run(config, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    raw = yaml.safe_load((ROOT / config).read_text())
    cache = ["--model.init_args.soft_labels.repeats=2", f"--model.init_args.soft_labels.path={tmp_path}/cache"]
    cli = ZooCLI(
        args=["fit", "--config", config, "--trainer.fast_dev_run=true", f"--trainer.default_root_dir={tmp_path}",
              *(cache if "soft_labels" in raw["model"]["init_args"] else [])]
    )
    assert cli.trainer.state.finished
    assert torch.isfinite(cli.trainer.logged_metrics["train/loss"])


def _offline_copy(config: str, tmp_path: Path) -> str:
    """The config with the teacher's architecture but no weights to load (no download, no file in CI)."""
    raw = yaml.safe_load((ROOT / config).read_text())
    args = raw["model"]["init_args"]
    teachers = args["teacher"] if isinstance(args["teacher"], list) else [args["teacher"]]
    for source in [args["student"], *teachers]:
        spec = source["init_args"]
        spec.pop("checkpoint", None)
        if spec.get("pretrained"):
            spec["pretrained"] = False
    # cached soft labels need the real data module (tests/test_soft_labels.py); this test steps the recipe alone
    args.pop("soft_labels", None)
    if "ImageFolder" in raw["data"]["class_path"]:  # the module checks its folders at construction: empty splits
        for split in ("train", "val"):
            (tmp_path / "imagenet" / split).mkdir(parents=True, exist_ok=True)
        raw["data"]["init_args"]["root"] = str(tmp_path / "imagenet")
    if raw["model"]["class_path"] in ("zoo.methods.KDND", "zoo.methods.DKDND"):
        # random data cannot give every class a centre: hand ND a centres file, as a user reusing one would
        raw["model"]["init_args"]["centers_file"] = _centres_file(raw, tmp_path)
    out = tmp_path / Path(config).name
    out.write_text(yaml.safe_dump(raw))
    return str(out)


def _centres_file(raw: dict, tmp_path: Path) -> str:
    from safetensors.torch import save_file

    from zoo.methods.nd import embedding_dim
    from zoo.models.sources import source_from_config

    teacher = source_from_config(raw["model"]["init_args"]["teacher"])  # ND configs have one teacher
    classes = raw["data"]["init_args"].get("num_classes", 100)
    dim = embedding_dim(teacher.build(num_classes=classes, in_chans=3), 3)
    path = tmp_path / "centres.safetensors"
    save_file({"centers": torch.randn(classes, dim)}, str(path),
              metadata={"teacher": teacher.describe(), "num_classes": str(classes)})
    return str(path)


@pytest.mark.parametrize("config", LARGE)
def test_large_config_builds_and_steps_on_shaped_tensors(config, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    raw = yaml.safe_load((ROOT / config).read_text())
    cli = ZooCLI(
        args=[
            "--config", _offline_copy(config, tmp_path),
            "--trainer.accelerator=cpu", "--trainer.devices=1", "--trainer.strategy=auto", "--trainer.logger=false",
            "--trainer.max_steps=1", "--trainer.limit_val_batches=0", "--trainer.enable_checkpointing=false",
            "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
            f"--trainer.default_root_dir={tmp_path}", "--summary.enabled=false",
        ],
        run=False,
    )
    data, model = cli.datamodule, cli.model
    shape = next(v for k, v in FULL_SIZE.items() if f"/{k}/" in config)
    assert model.num_classes == data.num_classes and data.in_chans == shape[0]
    batch = 2 if shape[-1] > 64 else 8
    x = torch.randn(batch, *shape)
    y = torch.randint(0, data.num_classes, (batch,))
    before = {k: v.clone() for k, v in model.student.state_dict().items()}
    cli.trainer.fit(model, train_dataloaders=DataLoader(TensorDataset(x, y), batch_size=batch))
    assert cli.trainer.global_step == 1
    assert any(not torch.equal(v, before[k]) for k, v in model.student.state_dict().items())
    # the optimizer and schedule are the config's
    optimizer = cli.trainer.optimizers[0]
    expected_opt = raw["model"]["init_args"]["optimizer"]
    assert type(optimizer).__name__ == expected_opt["class_path"].rsplit(".", 1)[-1]
    assert optimizer.param_groups[0]["initial_lr"] == expected_opt["init_args"]["lr"]
    scheduler = cli.trainer.lr_scheduler_configs[0].scheduler
    assert sorted(scheduler.milestones) == raw["model"]["init_args"]["lr_scheduler"]["init_args"]["milestones"]
