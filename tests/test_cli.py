"""The `zoo` CLI: print_config, interpolation after overrides, default loggers, errors that name the field."""

from pathlib import Path

import pytest
import yaml
from lightning.pytorch.loggers import CSVLogger, WandbLogger

from zoo.cli import ZooCLI, main

ROOT = Path(__file__).resolve().parents[1]


def test_print_config_resolves_interpolation_after_overrides(monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", "configs/classification/digits/kd.yaml", "--trainer.max_epochs=7", "--print_config"])
    assert exit_info.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["init_args"]["lr_scheduler"]["init_args"]["T_max"] == 7
    assert printed["seed_everything"] == 0
    assert printed["model"]["init_args"]["teacher"]["class_path"] == "zoo.hub.Pretrained"


def test_csv_is_always_logged_next_to_a_configured_wandb_logger(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    config = tmp_path / "wandb.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "trainer": {
                    "logger": {
                        "class_path": "lightning.pytorch.loggers.WandbLogger",
                        "init_args": {"project": "zoo-tests", "save_dir": str(tmp_path), "offline": True},
                    }
                }
            }
        )
    )
    cli = ZooCLI(
        args=[
            "--config",
            "configs/classification/digits/baseline.yaml",
            "--config",
            str(config),
            f"--trainer.default_root_dir={tmp_path}",
            "--trainer.max_steps=2",
            "--trainer.limit_val_batches=1",
            "--trainer.log_every_n_steps=1",
            "--trainer.enable_progress_bar=false",
            "--summary.enabled=false",
        ],
        run=False,
    )
    kinds = [type(lg) for lg in cli.trainer.loggers]
    assert kinds == [CSVLogger, WandbLogger]
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    cli.trainer.loggers[1].experiment.finish()
    run = tmp_path / "classification/digits/baseline" / "version_0"
    assert "train/loss_ce" in (run / "metrics.csv").read_text()


def test_default_logger_is_csv_under_runs(monkeypatch, tmp_path):
    monkeypatch.chdir(ROOT)
    cli = ZooCLI(args=["--config", "configs/classification/digits/dkd.yaml"], run=False)
    assert [type(lg) for lg in cli.trainer.loggers] == [CSVLogger]
    assert cli.trainer.loggers[0].name == "classification/digits/dkd" and cli.trainer.loggers[0].save_dir == "runs"


def test_bad_config_fails_naming_the_field(monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    with pytest.raises(SystemExit):
        main(["fit", "--config", "configs/quickstart.yaml", "--model.init_args.temperatur=3"])
    assert "temperatur" in capsys.readouterr().err
    with pytest.raises(ValueError, match="CIFARModel.name"):
        ZooCLI(
            args=["--config", "configs/quickstart.yaml", "--model.init_args.student.init_args.name=resnet9"], run=False
        )
