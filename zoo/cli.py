"""The ``zoo`` command: LightningCLI (``zoo fit|validate|test|predict --config ...``) and ``zoo checkpoints``."""

from __future__ import annotations

import csv
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning as L
import torch
import yaml
from jsonargparse import set_parsing_settings
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import ArgsType, LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import CSVLogger, WandbLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment

from callbacks.monitor import DistillationMonitor
from callbacks.resume import ExactResume
from callbacks.summary import FitSummary
from zoo.data.base import ZooDataModule
from zoo.errors import run_reporting_errors

__all__ = ["ZooCLI", "find_last_checkpoint", "main", "run_name_of", "test_metrics"]

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
    """Saves the resolved config in the run folder and stores it in the W&B run's config when W&B logs the run.

    Only ``fit`` writes it: ``validate``/``test``/``predict`` of a finished run log into that run's folder and leave
    the config it was trained with in place (resuming compares against it).
    """

    def setup(self, trainer: Trainer, pl_module: Any, stage: str) -> None:
        if stage == "fit":
            super().setup(trainer, pl_module, stage)

    def save_config(self, trainer: Trainer, pl_module: Any, stage: str) -> None:
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.experiment.config.update(self.config.as_dict(), allow_val_change=True)


def run_name_of(config_files: list[str]) -> str | None:
    """The run name a config file gives: its path under ``configs/`` without the extension
    (``configs/classification/digits/kd.yaml`` → ``classification/digits/kd``), or its stem elsewhere."""
    if not config_files:
        return None
    path = Path(config_files[0]).resolve()
    parts = path.with_suffix("").parts
    if "configs" in parts:
        return "/".join(parts[len(parts) - parts[::-1].index("configs"):])
    return path.stem


class _KeepingWriter(ExperimentWriter):
    """Lightning's CSV writer, appending to a run's ``metrics.csv`` where Lightning's deletes it."""

    def _check_log_dir_exists(self) -> None:
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as file:
                self.metrics_keys = next(csv.reader(file), [])


class RunCSVLogger(CSVLogger):
    """``CSVLogger`` that keeps the rows already in the run folder's ``metrics.csv``: a resumed fit and a
    ``validate``/``test`` of a finished run log into the run's own folder and append to its file."""

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _KeepingWriter(log_dir=self.log_dir)
        return self._experiment


def find_last_checkpoint(root: str | os.PathLike, run_name: str, dirpaths: list[str] = ()) -> Path | None:
    """The newest ``last.ckpt`` of a run, by modification time: ``<root>/<run_name>/version_*/checkpoints/`` or the
    ``dirpaths`` of checkpoint callbacks the config sets."""
    found = list((Path(root) / run_name).glob("version_*/checkpoints/last.ckpt"))
    found += [Path(d) / "last.ckpt" for d in dirpaths if (Path(d) / "last.ckpt").is_file()]
    return max(found, key=lambda p: p.stat().st_mtime) if found else None


def _checked_num_classes(datamodule: Any) -> int | None:
    check = getattr(datamodule, "check_paths", None)
    if callable(check):
        check()
    return getattr(datamodule, "num_classes", None)


def _config_files(argv: list[str]) -> list[str]:
    """The ``--config``/``-c`` files of a command line, in order."""
    files = []
    for i, arg in enumerate(argv):
        if arg in ("--config", "-c") and i + 1 < len(argv):
            files.append(argv[i + 1])
        elif arg.startswith("--config="):
            files.append(arg.split("=", 1)[1])
    return files


def _check_config_file(file: str) -> None:
    """Refuses a config file that is missing, empty or not YAML, naming it (the parser would say "<string>")."""
    path = Path(file)
    if not path.is_file():
        raise FileNotFoundError(f"--config: no such file: {path}")
    text = path.read_text()
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise ValueError(f"--config {path}: not valid YAML{where}: {getattr(err, 'problem', err)}") from None
    if not isinstance(data, dict) or not data:
        raise ValueError(f"--config {path}: the file holds no settings (expected a mapping with model, data, ...)")


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: list(value) if isinstance(value, tuple) else value}


class ZooCLI(LightningCLI):
    """LightningCLI in subclass mode for methods and data modules, with OmegaConf interpolation.

    - ``model`` is any ``LightningModule`` subclass (``zoo.methods.*``, the dataset-distillation modules);
      ``data`` any ``ZooDataModule``. ``data.num_classes`` and ``data.in_chans`` are linked into the method.
    - Parser mode ``omegaconf+``: ``${...}`` interpolation is resolved after every source (config files and command
      line) is merged, so ``--trainer.max_epochs=2`` also reaches a ``T_max: ${trainer.max_epochs}``.
    - Runs are named after their config (``configs/classification/digits/kd.yaml`` → ``classification/digits/kd``;
      ``--run_name`` sets another) and log to CSV under ``runs/<run name>/version_N`` (also when W&B or other
      loggers are configured), where the resolved ``config.yaml`` and the checkpoints are saved too; a W&B run is
      grouped under the run name unless the config names a group.
    - Every fit saves ``checkpoints/last.ckpt`` (unless the config configures its own checkpointing) and the random
      state with it (:class:`callbacks.resume.ExactResume`). ``--ckpt_path last`` resumes the newest ``last.ckpt``
      of the run name, in its own version folder; resuming with a model or data config that differs from the one
      the run was started with is refused, naming the keys that differ.
    - On a CPU with several processes per machine (DDP), each process gets cpu_count / processes threads unless
      ``OMP_NUM_THREADS`` is set.
    - ``seed_everything`` defaults to 0; a ``FitSummary`` prints teacher, student and agreement after fit; a
      ``DistillationMonitor`` logs throughput (``perf/*``) unless the config lists one of its own.
    """

    def __init__(self, args: ArgsType = None, run: bool = True, **kwargs: Any) -> None:
        kwargs.setdefault("parser_kwargs", {"parser_mode": _parser_mode(), "exit_on_error": False})
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("save_config_callback", ZooSaveConfig)
        kwargs.setdefault("seed_everything_default", 0)
        kwargs.setdefault("auto_configure_optimizers", False)
        self._resume_run: Path | None = None
        self._config_files = _config_files(list(sys.argv[1:] if args is None else args))
        for file in self._config_files:
            _check_config_file(file)
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
        # the data module is built first; its folders are checked then, before any model (or teacher) is built
        parser.link_arguments("data", "model.init_args.num_classes", compute_fn=_checked_num_classes,
                              apply_on="instantiate")
        parser.link_arguments("data.in_chans", "model.init_args.in_chans", apply_on="instantiate")
        parser.add_lightning_class_args(FitSummary, "summary")
        parser.add_argument(
            "--run_name", type=str | None, default=None,
            help="the run folder's name under the root dir (default: the config's path under configs/)",
        )

    # ------------------------------------------------------------------------------------------- config
    def _config(self) -> Any:
        sub = self.config.get("subcommand")
        return self.config[sub] if sub else self.config

    def _run_name(self) -> str:
        config = self._config()
        if config.get("run_name"):
            return str(config["run_name"])
        named = run_name_of(self._config_files)
        if named:
            return named
        method = type(self.model).__name__.lower()
        data = getattr(self.datamodule, "name", type(self.datamodule).__name__.lower())
        return f"{method}-{data}"

    def _root(self) -> str:
        return self._config().get("trainer", {}).get("default_root_dir") or DEFAULT_ROOT

    def _parse_ckpt_path(self) -> None:
        """Resolves ``--ckpt_path last``, refuses a missing or unreadable checkpoint, and refuses to resume a run
        with a model or data config that differs from the run's own, before Lightning reads the checkpoint."""
        sub = self.config.get("subcommand")
        if not sub or not self.config[sub].get("ckpt_path"):
            return super()._parse_ckpt_path()
        config = self.config[sub]
        ckpt = str(config["ckpt_path"])
        if ckpt == "last":
            name = self._run_name_from_config(config)
            callbacks = (config.get("trainer") or {}).get("callbacks") or []
            dirpaths = [str(cb["init_args"]["dirpath"]) for cb in callbacks
                        if hasattr(cb, "get") and str(cb.get("class_path", "")).endswith("ModelCheckpoint")
                        and (cb.get("init_args") or {}).get("dirpath")]
            found = find_last_checkpoint(self._root(), name, dirpaths)
            if found is None:
                raise FileNotFoundError(
                    f"--ckpt_path last: no {Path(self._root()) / name}/version_*/checkpoints/last.ckpt to resume "
                    "(a run saves last.ckpt at the end of every epoch; start it without --ckpt_path)"
                )
            config["ckpt_path"] = ckpt = str(found)
        path = Path(ckpt)
        if not path.is_file():
            raise FileNotFoundError(f"--ckpt_path: no such checkpoint file: {path}")
        try:
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:
            reason = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise ValueError(
                f"--ckpt_path: {path} is not a readable checkpoint (truncated or corrupt: {reason})"
            ) from None
        if "state_dict" not in checkpoint:
            raise ValueError(f"--ckpt_path: {path} is not a Lightning checkpoint (it has no state_dict)")
        run = path.parent.parent if path.parent.name == "checkpoints" else None
        if run is not None:
            if sub == "fit":
                self._check_resume_config(run / "config.yaml", config)
            # the run's own folder: a resumed fit, or a validate/test of the run, logs where the run does
            if run.name.startswith("version_") and run.name[len("version_"):].isdigit():
                self._resume_run = run
        return super()._parse_ckpt_path()

    def _run_name_from_config(self, config: Any) -> str:
        if config.get("run_name"):
            return str(config["run_name"])
        named = run_name_of(self._config_files)
        if named:
            return named
        raise ValueError("--ckpt_path last needs the run's config (--config) or --run_name to find the run")

    def _check_resume_config(self, saved: Path, config: Any) -> None:
        if not saved.is_file():
            return
        before = yaml.safe_load(saved.read_text()) or {}
        now = config.clone().as_dict()
        differ = []
        for section in ("model", "data"):
            a, b = _flatten(before.get(section) or {}, section), _flatten(now.get(section) or {}, section)
            differ += [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
        if differ:
            shown = ", ".join(differ[:8]) + (f" (+{len(differ) - 8} more)" if len(differ) > 8 else "")
            raise ValueError(
                f"--ckpt_path: resuming {saved.parent} with a config that differs from the run's in {shown}; "
                "resume with the run's own config (its config.yaml), or start a new run without --ckpt_path"
            )

    def before_instantiate_classes(self) -> None:
        """Checks what can be checked on the config alone, before any model (or teacher) is built."""
        config = self._config()
        trainer = config.get("trainer") or {}
        accelerator = str(trainer.get("accelerator") or "auto")
        running = bool(self.config.get("subcommand"))  # not when a config is only built (tests, benchmarks)
        if running and accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
            raise ValueError(f"trainer.accelerator: {accelerator!r} asked for, but this machine has no CUDA device "
                             "(use accelerator: cpu or auto)")
        if running and accelerator == "mps" and not torch.backends.mps.is_available():
            raise ValueError("trainer.accelerator: 'mps' asked for, but this machine has no MPS device")
        max_epochs = trainer.get("max_epochs")
        if max_epochs is not None and max_epochs < -1:
            raise ValueError(f"trainer.max_epochs must be ≥ 0 (or -1 for no limit), got {max_epochs}")
        dumped = _flatten(config.clone().as_dict())
        for key, value in dumped.items():
            leaf = key.rsplit(".", 1)[-1]
            if leaf == "lr" and isinstance(value, (int, float)) and not (value >= 0 and value != float("inf")):
                raise ValueError(f"{key} must be a finite number ≥ 0, got {value}")
            if leaf == "num_workers" and isinstance(value, int) and value < 0:
                raise ValueError(f"{key} must be ≥ 0, got {value}")

    # ------------------------------------------------------------------------------------------- trainer
    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list) -> Trainer:
        logger = config.get("logger")
        root = config.get("default_root_dir") or DEFAULT_ROOT
        name = self._run_name()

        def csv() -> CSVLogger:
            # rows reach the file every 10 steps, so a killed run keeps what it logged
            if self._resume_run is not None:  # the checkpoint's own run folder
                run = self._resume_run
                return RunCSVLogger(save_dir=run.parent, name="", version=int(run.name[len("version_"):]),
                                    flush_logs_every_n_steps=10)
            return CSVLogger(save_dir=root, name=name, flush_logs_every_n_steps=10)

        if logger is None or logger is True:
            config["logger"] = csv()
        elif logger is not False:
            loggers = list(logger) if isinstance(logger, (list, tuple)) else [logger]
            if not any(isinstance(lg, CSVLogger) for lg in loggers):
                loggers.insert(0, csv())
            for lg in loggers:
                if isinstance(lg, WandbLogger):
                    _place_wandb(lg, Path(root) / name, name)
            config["logger"] = loggers
        config["default_root_dir"] = root
        configured = list(config.get("callbacks") or []) + list(callbacks)
        extra: list = []
        if not any(isinstance(cb, DistillationMonitor) for cb in configured):
            extra.append(DistillationMonitor(teacher_acc=False, agreement=False, kl=False, loss_shares=False))
        fitting = self.config.get("subcommand") in (None, "fit")  # None: built to be fitted from Python
        if fitting and config.get("enable_checkpointing", True) is not False and not any(
            isinstance(cb, ModelCheckpoint) for cb in configured
        ):
            extra.append(ModelCheckpoint(save_last=True))
        if fitting and not any(isinstance(cb, ExactResume) for cb in configured):
            extra.append(ExactResume())
        trainer = super()._instantiate_trainer(config, [*callbacks, *extra])
        _threads_per_process(trainer)
        return trainer


def _place_wandb(logger: WandbLogger, run_dir: Path, group: str) -> None:
    """A W&B run writes its files into the run folder (not ./wandb) unless the config gives a folder, is grouped
    under the run name unless the config names a group, and does not pass wandb the unused ``anonymous`` setting."""
    init = logger._wandb_init
    if init.get("dir") in (None, "."):
        run_dir.mkdir(parents=True, exist_ok=True)
        init["dir"] = str(run_dir)
        logger._save_dir = str(run_dir)
    if not init.get("group"):
        init["group"] = group
    if init.get("anonymous") is None:
        init.pop("anonymous", None)


def _threads_per_process(trainer: Trainer) -> None:
    """cpu_count / processes torch threads per process of a multi-process CPU run (Lightning's Trainer does not
    do it; with the default every process takes every core: 10x slower seen on 2 cores)."""
    from lightning.pytorch.accelerators import CPUAccelerator

    procs = int(getattr(trainer.strategy, "num_processes", 1) or 1)
    if procs > 1 and isinstance(trainer.accelerator, CPUAccelerator) and "OMP_NUM_THREADS" not in os.environ:
        threads = max(1, (os.cpu_count() or 1) // procs)
        torch.set_num_threads(threads)
        os.environ["OMP_NUM_THREADS"] = str(threads)  # the processes the launcher starts read it


def test_metrics(config_file: Path, ckpt: Path) -> dict[str, float]:
    """Runs ``zoo test`` on a run's own config and checkpoint; returns the test split's metrics."""
    import warnings

    _route_lightning_output()
    saved, sys.argv = sys.argv, sys.argv[:1]  # LightningCLI warns when given `args` while sys.argv holds a command
    try:
        with warnings.catch_warnings():  # no logger here, so the checkpoint callbacks' folder differs: nothing to keep
            warnings.filterwarnings("ignore", message=r"The dirpath has changed from .* won't be reloaded")
            cli = ZooCLI(
                args=["test", "--config", str(config_file), "--ckpt_path", str(ckpt), "--trainer.logger=false",
                      "--trainer.enable_progress_bar=false", "--verbose=false"],
                save_config_callback=None,
            )
    finally:
        sys.argv = saved
    return {k: round(float(v), 4) for k, v in cli.trainer.callback_metrics.items() if k.startswith("test/")}


def main(args: ArgsType = None) -> None:
    """``zoo fit|validate|test|predict`` (LightningCLI) and ``zoo check-data``; a failure is reported in one line
    (``--debug`` or ``ZOO_DEBUG=1``: the full traceback)."""
    argv = list(sys.argv[1:] if args is None else args)
    cli_args = [a for a in argv if a != "--debug"]
    if argv and argv[0] == "checkpoints":
        from zoo.hub_cli import main as checkpoints_main

        def checkpoints() -> None:
            raise SystemExit(checkpoints_main(cli_args[1:], test_metrics=test_metrics))

        return run_reporting_errors(checkpoints, argv, prog="zoo checkpoints")
    if argv and argv[0] == "check-data":
        from zoo.check_data import main as check_data

        return run_reporting_errors(lambda: check_data(cli_args[1:], _parser_mode()), argv, prog="zoo check-data")
    run_reporting_errors(lambda: _run_cli(cli_args), argv)


class _FdStdout:
    """Writes straight to file descriptor 1: whatever objects stand in for ``sys.stdout`` (captures, wrappers that
    other libraries install and later close), the process's standard output receives the text."""

    def write(self, text: str) -> int:
        return os.write(1, text.encode())

    def flush(self) -> None:
        sys.stdout.flush() if not sys.stdout.closed else None


def _route_lightning_output() -> None:
    """Lightning's info messages (seed, devices, tips) go to stdout, so stderr carries warnings and errors only; its
    known internal deprecation warning about pytree LeafSpec is not the user's to act on."""
    import logging
    import warnings

    names = [n for n in logging.Logger.manager.loggerDict if n == "lightning" or n.startswith("lightning.")]
    for name in names:
        for handler in logging.getLogger(name).handlers:
            if type(handler) is logging.StreamHandler and not isinstance(handler.stream, _FdStdout):
                handler.setStream(_FdStdout())
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")
    # validating or testing a run's checkpoint: ExactResume carries a fit's random state, which only a resume needs
    warnings.filterwarnings("ignore", message=r"Be aware that when using `ckpt_path`.* callbacks: \['ExactResume'\]\.$")


def _run_cli(cli_args: list[str]) -> None:
    # LightningCLI reads sys.argv itself; passing the same arguments again as `args` makes it warn.
    _route_lightning_output()
    saved = sys.argv
    sys.argv = [saved[0] if saved else "zoo", *cli_args]
    try:
        ZooCLI()
    finally:
        sys.argv = saved


if __name__ == "__main__":
    main()
