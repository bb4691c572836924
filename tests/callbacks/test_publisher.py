"""CheckpointPublisher: student-only safetensors, model card, registry entry, W&B artifact, HF upload; atomic."""

import json
import time
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from lightning.pytorch.loggers import CSVLogger
from safetensors.torch import load_file

from callbacks.publisher import CheckpointPublisher
from zoo import hub
from zoo.cli import ZooCLI
from zoo.data import DigitsDataModule
from zoo.methods import KD
from zoo.models import CIFARModel

ROOT = Path(__file__).resolve().parents[2]


def fit_small(tmp_path, publisher, **trainer_kw):
    model = KD(CIFARModel("resnet8"), CIFARModel("resnet14"), num_classes=10, in_chans=1)
    data = DigitsDataModule(image_size=16, batch_size=32)
    trainer = L.Trainer(
        accelerator="cpu", max_epochs=1, limit_train_batches=3, limit_val_batches=2, enable_progress_bar=False,
        enable_model_summary=False, logger=CSVLogger(tmp_path, name="run"), callbacks=[publisher], **trainer_kw,
    )
    trainer.fit(model, datamodule=data)
    return trainer, model, data


def test_publishes_student_only_with_card_and_valid_entry(tmp_path):
    publisher = CheckpointPublisher("toy-kd", out_dir=str(tmp_path / "pub"), urls=["https://example.invalid/zoo"])
    trainer, model, data = fit_small(tmp_path, publisher)
    entry = publisher.published
    path = Path(entry["path"])
    assert path.name == f"toy-kd-{entry['sha256'][:8]}.safetensors" and hub.sha256_file(path) == entry["sha256"]
    assert sorted(p.name for p in path.parent.iterdir()) == sorted([path.name, path.stem + ".json", path.stem + ".md"])
    weights = load_file(str(path))
    assert set(weights) == set(model.student.state_dict())  # student only: no teacher, no metrics, no optimizer
    card = json.loads(path.with_suffix(".json").read_text())
    assert card["teacher"] == "cifar:resnet14" and card["student"] == "cifar:resnet8"
    assert card["versions"]["torch"] == torch.__version__ and "git_commit" in card
    assert entry["urls"] == [f"https://example.invalid/zoo/{path.name}"]
    assert {"val_acc", "val_agreement"} <= set(entry["metrics"])  # last epoch = published checkpoint
    # the entry is a valid registry entry and loads into the same predictions
    registry = tmp_path / "registry.json"
    registry.write_text(json.dumps([card["entry"]]))
    assert hub.registry(registry)[0]["name"] == "toy-kd"
    net = CIFARModel(**card["entry"]["architecture"]["init_args"]).build()
    net.load_state_dict(weights)
    x = torch.randn(4, 1, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(net.eval()(x), model.student.eval()(x))
    assert "# toy-kd" in path.with_suffix(".md").read_text()


def test_a_crash_while_publishing_leaves_no_files(tmp_path, monkeypatch):
    import zoo.publish

    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(zoo.publish, "model_card", broken)
    publisher = CheckpointPublisher("toy-kd", out_dir=str(tmp_path / "pub"))
    with pytest.raises(RuntimeError, match="disk full"):
        fit_small(tmp_path, publisher)
    assert list((tmp_path / "pub").iterdir()) == []


def test_hf_upload_names_the_files_in_the_entry(tmp_path, monkeypatch):
    calls = []

    class FakeApi:
        def __init__(self, token):
            calls.append(("token", token))

        def create_repo(self, repo_id, exist_ok):
            calls.append(("repo", repo_id))

        def upload_file(self, path_or_fileobj, path_in_repo, repo_id):
            assert Path(path_or_fileobj).is_file()
            calls.append(("upload", path_in_repo))

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    monkeypatch.setenv("HF_TOKEN", "secret")
    publisher = CheckpointPublisher("toy-kd", out_dir=str(tmp_path / "pub"), hf_repo_id="org/zoo")
    fit_small(tmp_path, publisher)
    file = Path(publisher.published["path"]).name
    assert publisher.published["urls"] == [f"hf://org/zoo/{file}"]
    assert ("token", "secret") in calls and sorted(c[1] for c in calls if c[0] == "upload") == sorted(
        [file, file.replace(".safetensors", ".json"), file.replace(".safetensors", ".md")]
    )
    monkeypatch.delenv("HF_TOKEN")
    with pytest.raises(RuntimeError, match=r"\$HF_TOKEN is empty"):
        fit_small(tmp_path / "again", CheckpointPublisher("toy-kd", out_dir=str(tmp_path / "p2"), hf_repo_id="o/z"))


def test_wandb_offline_run_holds_metrics_config_and_artifact(tmp_path, monkeypatch):
    """The resolved config goes to the W&B run config, runs are grouped by method-data, the student is an artifact."""
    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("WANDB_MODE", "offline")
    extra = tmp_path / "wandb.yaml"
    extra.write_text(yaml.safe_dump({
        "trainer": {
            "logger": {"class_path": "lightning.pytorch.loggers.WandbLogger",
                       "init_args": {"project": "zoo-tests", "save_dir": str(tmp_path), "offline": True}},
            "callbacks": [{"class_path": "callbacks.publisher.CheckpointPublisher",
                           "init_args": {"name": "quickstart-kd", "out_dir": str(tmp_path / "pub")}}],
        }
    }))
    cli = ZooCLI(args=[
        "--config", "configs/quickstart.yaml", "--config", str(extra), "--trainer.max_epochs=1",
        "--trainer.limit_train_batches=3", "--trainer.limit_val_batches=2", "--trainer.log_every_n_steps=1",
        f"--trainer.default_root_dir={tmp_path}", "--summary.enabled=false",
    ], run=False)
    wandb_logger = cli.trainer.loggers[1]
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    run = wandb_logger.experiment
    assert run.group == "quickstart"
    assert run.config["model"]["class_path"] == "zoo.methods.KD"
    run.finish()
    # wandb's offline run keeps config, history and artifacts in its binary run log (protobuf records, strings
    # stored verbatim); wandb ships no reader for it, so look for the values themselves.
    publisher = next(c for c in cli.trainer.callbacks if isinstance(c, CheckpointPublisher))
    needles = (b"zoo.methods.KD", b"digits-resnet32-teacher", b"val/acc", b"train/loss_kd",
               publisher.published["sha256"].encode())  # the last: the artifact's metadata (the registry entry)
    # wandb's service process writes the log after finish() returns: wait for it (at most a minute), then check
    deadline, log = time.monotonic() + 60, b""
    while time.monotonic() < deadline:
        run_dir = next((tmp_path / "wandb").glob("offline-run-*"), None)
        logs = list(run_dir.glob("*.wandb")) if run_dir is not None else []
        log = _record_bytes(logs[0].read_bytes()) if logs else b""
        if all(n in log for n in needles):
            break
        time.sleep(0.5)
    for needle in needles:
        assert needle in log, needle
    published = list((tmp_path / "pub").glob("quickstart-kd-*.safetensors"))
    assert len(published) == 1


def _record_bytes(data: bytes, block: int = 32768, header: int = 7) -> bytes:
    """The run log's payload with the 7-byte fragment header dropped from the start of every 32 KB block (the
    LevelDB log format wandb writes), so a string that a record split across two blocks reads whole again."""
    return data[:block] + b"".join(data[i + header : i + block] for i in range(block, len(data), block))
