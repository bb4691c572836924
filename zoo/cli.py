"""The ``zoo`` command: LightningCLI (``zoo fit|validate|test|predict --config ...``) and ``zoo checkpoints``."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import lightning as L
from jsonargparse import set_parsing_settings
from lightning.pytorch import Trainer
from lightning.pytorch.cli import ArgsType, LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import CSVLogger, WandbLogger

from callbacks.monitor import DistillationMonitor
from callbacks.summary import FitSummary
from zoo.data.base import ZooDataModule

__all__ = ["ZooCLI", "main"]

DEFAULT_ROOT = "runs"


def _parser_mode() -> str:
    """``omegaconf+`` where jsonargparse supports it (resolve after merging), else ``omegaconf``."""
    try:
        # Configs write ${trainer.max_epochs}; under a subcommand the root is "fit.", so make such paths relative.
        set_parsing_settings(omegaconf_absolute_to_relative_paths=True)
    except TypeError:  # jsonargparse older than the setting: interpolation resolves per config file
        return "omegaconf"
    return "omegaconf+"


class ZooSaveConfig(SaveConfigCallback):
    """Saves the resolved config in the run folder and stores it in the W&B run's config when W&B logs the run."""

    def save_config(self, trainer: Trainer, pl_module: Any, stage: str) -> None:
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.experiment.config.update(self.config.as_dict(), allow_val_change=True)


class ZooCLI(LightningCLI):
    """LightningCLI in subclass mode for methods and data modules, with OmegaConf interpolation.

    - ``model`` is any ``LightningModule`` subclass (``zoo.methods.*``, the dataset-distillation modules);
      ``data`` any ``ZooDataModule``.
    - ``data.num_classes`` and ``data.in_chans`` are linked into the method when the data module is built.
    - Parser mode ``omegaconf+`` (a superset of the ``omegaconf`` mode): ``${...}`` interpolation is resolved after
      every source (config files and command line) is merged, so ``--trainer.max_epochs=2`` also reaches a
      ``T_max: ${trainer.max_epochs}``. With plain ``omegaconf`` each file would be resolved on its own and the
      override would silently miss the scheduler. Older jsonargparse releases fall back to ``omegaconf``.
    - Every run logs to CSV under ``runs/<method>-<data>/version_N`` (also when W&B or other loggers are
      configured), where the resolved ``config.yaml`` and the checkpoints are saved too.
    - A configured ``WandbLogger`` gets the resolved config in its run config and, unless the config names one,
      the group ``<method>-<data>``.
    - ``seed_everything`` defaults to 0; a ``FitSummary`` prints teacher, student and agreement after fit.
    - Throughput is logged during training (``perf/images_per_sec``, ``perf/step_time``, ``perf/data_time``,
      ``perf/data_share``): unless the config lists a ``DistillationMonitor`` of its own, one with only its
      throughput log is added.
    """

    def __init__(self, args: ArgsType = None, run: bool = True, **kwargs: Any) -> None:
        kwargs.setdefault("parser_kwargs", {"parser_mode": _parser_mode()})
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("save_config_callback", ZooSaveConfig)
        kwargs.setdefault("seed_everything_default", 0)
        kwargs.setdefault("auto_configure_optimizers", False)
        # Any LightningModule: distillation methods (zoo.methods) and the dataset-distillation modules alike.
        super().__init__(
            L.LightningModule,
            ZooDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            args=args,
            run=run,
            **kwargs,
        )

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("data.num_classes", "model.init_args.num_classes", apply_on="instantiate")
        parser.link_arguments("data.in_chans", "model.init_args.in_chans", apply_on="instantiate")
        parser.add_lightning_class_args(FitSummary, "summary")

    def _run_name(self) -> str:
        method = type(self.model).__name__.lower()
        data = getattr(self.datamodule, "name", type(self.datamodule).__name__.lower())
        return f"{method}-{data}"

    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list) -> Trainer:
        logger = config.get("logger")
        root = config.get("default_root_dir") or DEFAULT_ROOT
        if logger is None or logger is True:
            config["logger"] = CSVLogger(save_dir=root, name=self._run_name())
        elif logger is not False:
            loggers = list(logger) if isinstance(logger, (list, tuple)) else [logger]
            if not any(isinstance(lg, CSVLogger) for lg in loggers):
                loggers.insert(0, CSVLogger(save_dir=root, name=self._run_name()))
            for lg in loggers:
                # W&B runs are grouped by method and data set unless the config names a group.
                if isinstance(lg, WandbLogger) and not lg._wandb_init.get("group"):
                    lg._wandb_init["group"] = self._run_name()
            config["logger"] = loggers
        config["default_root_dir"] = root
        configured = list(config.get("callbacks") or []) + list(callbacks)
        if not any(isinstance(cb, DistillationMonitor) for cb in configured):
            callbacks = [
                *callbacks,
                DistillationMonitor(teacher_acc=False, agreement=False, kl=False, loss_shares=False),
            ]
        return super()._instantiate_trainer(config, callbacks)


def test_metrics(config_file: Path, ckpt: Path) -> dict[str, float]:
    """Runs ``zoo test`` on a run's own config and checkpoint; returns the test split's metrics."""
    cli = ZooCLI(
        args=[
            "test",
            "--config",
            str(config_file),
            "--ckpt_path",
            str(ckpt),
            "--trainer.logger=false",
            "--trainer.enable_progress_bar=false",
            "--verbose=false",
        ],
        save_config_callback=None,
    )
    return {k: round(float(v), 4) for k, v in cli.trainer.callback_metrics.items() if k.startswith("test/")}


def main(args: ArgsType = None) -> None:
    """Entry point of the ``zoo`` console script."""
    argv = list(sys.argv[1:] if args is None else args)
    if argv and argv[0] == "checkpoints":
        from zoo.hub_cli import main as checkpoints_main

        raise SystemExit(checkpoints_main(argv[1:], test_metrics=test_metrics))
    ZooCLI(args=argv)


if __name__ == "__main__":
    main()
