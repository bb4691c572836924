"""Publishing the student at the end of fit: weights, model card, registry entry, W&B artifact, HF upload."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import lightning as L
import torch
import yaml
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_only

from zoo import hub
from zoo.publish import architecture_from_hparams, describe_source, publish_distilled, write_publication

__all__ = ["CheckpointPublisher"]


class CheckpointPublisher(L.Callback):
    """Publishes the best checkpoint's student when fit ends (or when :meth:`publish` is called).

    Writes into ``out_dir`` (default ``<log_dir>/published``):

    - ``<name>-<sha256[:8]>.safetensors``: the student's weights only (no teacher, no optimizer state);
    - ``<file>.json``: the model card as data (method, teacher, student, data set, metrics, the resolved config,
      library versions, git commit) with the registry entry under ``"entry"``, ready to add to
      ``zoo/checkpoints/registry.json``;
    - ``<file>.md``: the model card for people.

    A trajectory-matching run (dataset distillation) publishes its distilled set instead: the artifact the run wrote
    at the end of training, as it is (``zoo.publish.publish_distilled``: task ``dataset-distillation``, the run's
    final evaluation as metrics), logged to W&B as an artifact of type ``dataset``.

    Every file is written under a temporary name and renamed, so a crash never leaves a half-published checkpoint.
    With a ``WandbLogger`` the three files are logged as a W&B artifact of type ``model`` (``dataset`` for a
    distilled set); with ``hf_repo_id`` set
    and a token in ``$<hf_token_env>`` they are uploaded to that Hugging Face Hub repo and the entry's ``urls``
    name them (``hf://<repo>/<file>``).

    Metrics: the last validation epoch's ``val/*`` values when the published checkpoint is from the last epoch;
    otherwise only the checkpoint callback's monitored best score, because the last epoch's numbers would not
    describe that checkpoint.

    Args:
        name: the checkpoint's registry name (e.g. ``digits-resnet8-kd``).
        out_dir: folder for the published files (default ``<trainer.log_dir>/published``).
        config_path: the project config to name in the entry (default: the run's saved ``config.yaml``).
        license: the license recorded in the entry.
        urls: base URLs the file will be served from; the entry records ``<base>/<file>`` for each.
        wandb_artifact: log the files as a W&B artifact when a WandbLogger is active.
        hf_repo_id: Hugging Face Hub repo to upload to (``org/name``), or ``None``.
        hf_token_env: environment variable holding the Hugging Face token.
        on_fit_end: publish automatically at the end of fit.
    """

    def __init__(
        self,
        name: str,
        out_dir: str | None = None,
        config_path: str | None = None,
        license: str = "Apache-2.0",
        urls: list[str] | None = None,
        wandb_artifact: bool = True,
        hf_repo_id: str | None = None,
        hf_token_env: str = "HF_TOKEN",
        on_fit_end: bool = True,
    ) -> None:
        if not name or "/" in name:
            raise ValueError(f"CheckpointPublisher.name must be a plain name, got {name!r}")
        self.name = name
        self.out_dir = out_dir
        self.config_path = config_path
        self.license = license
        self.urls = list(urls or [])
        self.wandb_artifact = wandb_artifact
        self.hf_repo_id = hf_repo_id
        self.hf_token_env = hf_token_env
        self.publish_on_fit_end = on_fit_end
        self.published: dict[str, Any] | None = None

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.publish_on_fit_end:
            self.publish(trainer, pl_module)

    @rank_zero_only
    def publish(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        """Publishes now; returns the registry entry (also kept as ``self.published``)."""
        from zoo.dataset_distillation.methods import TrajectoryMatching

        out_dir = Path(self.out_dir or Path(trainer.log_dir or trainer.default_root_dir) / "published")
        out_dir.mkdir(parents=True, exist_ok=True)
        bases = self.urls + ([f"hf://{self.hf_repo_id}"] if self.hf_repo_id else [])
        if isinstance(pl_module, TrajectoryMatching):
            from zoo.dataset_distillation import load_distilled

            artifact = pl_module.output_path()
            written = load_distilled(artifact)["metadata"].get("iteration") if artifact.is_file() else None
            if written != trainer.global_step:
                raise RuntimeError(
                    f"CheckpointPublisher: the distilled set {artifact} "
                    + ("does not exist yet" if written is None else f"is from iteration {written}, not this run's "
                       f"{trainer.global_step}")
                    + "; the run writes it when training ends (publish then, or with on_fit_end)"
                )
            run_config = Path(trainer.log_dir or "") / "config.yaml"
            entry = publish_distilled(
                artifact, self.name, out_dir,
                config_path=self.config_path or (str(run_config) if run_config.is_file() else None),
                url_bases=bases, license=self.license, publish_command=False,
            )
            file = out_dir / entry["file"]
        else:
            with tempfile.TemporaryDirectory(dir=out_dir, prefix=".publishing-") as tmp:
                ckpt, metrics = self._checkpoint(trainer, Path(tmp))
                entry, card = self._describe(trainer, pl_module, metrics)
                file, entry = write_publication(ckpt, out_dir, entry, card, url_bases=bases)
        files = [file, file.with_suffix(".json"), file.with_suffix(".md")]
        if self.hf_repo_id:
            self._upload_hf(files)
        if self.wandb_artifact:
            self._log_wandb(trainer, files, entry)
        self.published = {**entry, "path": str(file)}
        return self.published

    def _checkpoint(self, trainer: L.Trainer, tmp: Path) -> tuple[Path, dict[str, float]]:
        val = {
            k.replace("/", "_"): round(float(v), 4)
            for k, v in trainer.callback_metrics.items()
            if k.startswith("val/") and v.numel() == 1
        }
        callback = trainer.checkpoint_callback
        path = getattr(callback, "best_model_path", "") or getattr(callback, "last_model_path", "")
        if not path or not Path(path).is_file():
            path = tmp / "current.ckpt"
            trainer.save_checkpoint(path, weights_only=True)
            return path, val
        epoch = torch.load(path, map_location="cpu", weights_only=False).get("epoch")
        if epoch == trainer.current_epoch - 1:
            return Path(path), val
        monitor = getattr(callback, "monitor", None)
        best = getattr(callback, "best_model_score", None)
        return Path(path), ({monitor.replace("/", "_"): round(float(best), 4)} if monitor and best is not None else {})

    def _describe(
        self, trainer: L.Trainer, pl_module: L.LightningModule, metrics: dict[str, float]
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        data = trainer.datamodule
        names = pl_module.describe() if hasattr(pl_module, "describe") else {"method": type(pl_module).__name__}
        run_config = Path(trainer.log_dir or "") / "config.yaml"
        config = yaml.safe_load(run_config.read_text()) if run_config.is_file() else {}
        config_path = self.config_path or (str(run_config) if run_config.is_file() else None)
        size = getattr(data, "image_size", None)
        entry = {
            "name": self.name,
            "task": "classification",
            "method": names["method"],
            "architecture": architecture_from_hparams(dict(pl_module.hparams)),
            "dataset": getattr(data, "name", type(data).__name__ if data is not None else ""),
            "metrics": metrics,
            "input_size": [getattr(data, "in_chans", None), size, size],
            "mean": list(getattr(data, "mean", []) or []) or None,
            "std": list(getattr(data, "std", []) or []) or None,
            "urls": [],
            "license": self.license,
            "config": config_path,
            "command": f"zoo fit --config {config_path}" if config_path else None,
        }
        card = {
            "method": names["method"],
            "student": names.get("student") or describe_source(pl_module.hparams.get("student")),
            "teacher": names.get("teacher"),
            "dataset": entry["dataset"],
            "epochs": trainer.current_epoch,
            "config": config,
        }
        return entry, card

    def _upload_hf(self, files: list[Path]) -> None:
        token = os.environ.get(self.hf_token_env)
        if not token:
            raise RuntimeError(
                f"CheckpointPublisher.hf_repo_id is {self.hf_repo_id!r} but ${self.hf_token_env} is empty: set the "
                f"token or remove hf_repo_id (the files are published locally in {files[0].parent})"
            )
        from huggingface_hub import HfApi

        api = HfApi(token=token)
        api.create_repo(self.hf_repo_id, exist_ok=True)
        for f in files:
            api.upload_file(path_or_fileobj=str(f), path_in_repo=f.name, repo_id=self.hf_repo_id)

    def _log_wandb(self, trainer: L.Trainer, files: list[Path], entry: dict[str, Any]) -> None:
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                import wandb

                kind = "dataset" if entry["task"] == hub.TASK_DISTILLED else "model"
                artifact = wandb.Artifact(self.name, type=kind, metadata=entry)
                for f in files:
                    artifact.add_file(str(f))
                logger.experiment.log_artifact(artifact)
