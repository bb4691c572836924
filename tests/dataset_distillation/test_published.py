"""Distilled sets as published registry entries: `zoo checkpoints publish` on an artifact, `hub:<name>` loading
(shipped, or downloaded from 127.0.0.1 and verified), the shipped digits sets, and the config that trains on one."""

import json
from pathlib import Path

import pytest
import torch

from zoo import hub
from zoo.cli import ZooCLI
from zoo.dataset_distillation import DistilledDataModule, load_distilled, save_distilled
from zoo.hub_cli import main as checkpoints_main

ROOT = Path(__file__).resolve().parents[2]
NETWORK = {"class_path": "zoo.models.convnet.ConvNetModel",
           "init_args": {"depth": 2, "width": 32, "image_size": 8, "num_classes": None}}


def _artifact(path: Path, evaluation: bool = True) -> Path:
    meta = {"method": "MTT", "dataset": "digits", "num_classes": 10, "ipc": 1, "iteration": 7,
            "hparams": {"network": NETWORK, "ipc": 1}, "mean": [0.3], "std": [0.4],
            "evaluation": {"eval/acc_mean": 0.91234, "eval/acc_std": 0.0123, "accuracies": [0.9, 0.92]} if evaluation
            else {}}
    return save_distilled(path, torch.randn(10, 1, 8, 8), torch.arange(10), 0.0123456, meta)


def _use_registry(monkeypatch, tmp_path: Path, entries: list[dict], package: Path) -> None:
    registry = tmp_path / "registry.json"
    registry.write_text(json.dumps(hub.registry() + entries))
    monkeypatch.setattr(hub, "REGISTRY_FILE", registry)
    monkeypatch.setattr(hub, "PACKAGE_DIR", package)
    monkeypatch.setenv("ZOO_HOME", str(tmp_path / "home"))


def test_publish_a_distilled_set_and_load_it_by_name(tmp_path, monkeypatch, capsys):
    art = _artifact(tmp_path / "run" / "distilled.safetensors")
    assert checkpoints_main(["publish", str(art), "--name", "toy-set", "--dir", str(tmp_path / "pub"),
                             "--config", "configs/x.yaml", "--command", "zoo fit --config e.yaml && zoo fit"]) == 0
    entry = json.loads(capsys.readouterr().out)
    assert entry["task"] == "dataset-distillation" and entry["method"] == "MTT" and entry["dataset"] == "digits"
    assert entry["metrics"] == {"eval_acc_mean": 0.9123, "eval_acc_std": 0.0123, "syn_lr": 0.012346}
    assert (entry["ipc"], entry["iteration"], entry["eval_nets"]) == (1, 7, 2)
    assert entry["architecture"] == {"class_path": NETWORK["class_path"],
                                     "init_args": {"depth": 2, "width": 32, "image_size": 8}}
    assert entry["input_size"] == [1, 8, 8] and (entry["mean"], entry["std"]) == ([0.3], [0.4])
    assert entry["command"].startswith("zoo fit --config e.yaml && zoo fit && zoo checkpoints publish")
    published = tmp_path / "pub" / entry["file"]
    assert published.read_bytes() == art.read_bytes()  # the artifact as it is, under its hash name
    assert sorted(p.suffix for p in (tmp_path / "pub").iterdir()) == [".json", ".md", ".safetensors"]
    assert "DistilledDataModule(path='hub:toy-set'" in published.with_suffix(".md").read_text()

    _use_registry(monkeypatch, tmp_path, [entry], tmp_path / "pub")
    loaded, original = load_distilled("hub:toy-set"), load_distilled(art)
    assert torch.equal(loaded["images"], original["images"]) and loaded["lr"] == original["lr"]
    dm = DistilledDataModule(path="hub:toy-set")
    dm.setup("fit")
    assert len(dm.train_set) == 10 and dm.num_classes == 10
    with pytest.raises(ValueError, match="'toy-set' is a distilled set, not a model.*hub:toy-set"):
        hub.load("toy-set")
    with pytest.raises(ValueError, match="classification checkpoint, not a distilled set"):
        load_distilled("hub:digits-resnet32-teacher")
    with pytest.raises(KeyError, match="no published checkpoint named 'nope'"):
        DistilledDataModule(path="hub:nope")

    data = bytearray(published.read_bytes())
    data[-1] ^= 0xFF
    published.write_bytes(bytes(data))
    with pytest.raises(hub.ChecksumError, match=f"expected {entry['sha256']}"):
        load_distilled("hub:toy-set")


def test_a_published_set_downloads_from_a_mirror_verified(tmp_path, monkeypatch, capsys, serve_folder):
    art = _artifact(tmp_path / "distilled.safetensors")
    assert checkpoints_main(["publish", str(art), "--name", "served-set", "--dir", str(tmp_path / "served")]) == 0
    entry = json.loads(capsys.readouterr().out)
    assert entry["config"] is None  # no --config and no run config beside the artifact: none is claimed
    assert entry["command"] == f"zoo checkpoints publish {art} --name served-set --dir {tmp_path / 'served'}"
    (tmp_path / "empty").mkdir()
    _use_registry(monkeypatch, tmp_path, [entry], tmp_path / "empty")
    monkeypatch.setenv("ZOO_CHECKPOINT_MIRROR", serve_folder(tmp_path / "served"))
    dm = DistilledDataModule(path="hub:served-set")
    cached = tmp_path / "home" / "checkpoints" / entry["file"]
    assert cached.read_bytes() == art.read_bytes()
    assert torch.equal(dm.artifact["images"], load_distilled(art)["images"])


def test_the_run_config_beside_the_artifact_is_recorded(tmp_path):
    from zoo.publish import publish_distilled

    art = _artifact(tmp_path / "run" / "distilled.safetensors")
    (tmp_path / "run" / "config.yaml").write_text("seed_everything: 0\n")
    entry = publish_distilled(art, "with-config", tmp_path / "pub", publish_command=False)
    assert entry["config"] == str(tmp_path / "run" / "config.yaml")
    assert entry["command"] == f"zoo fit --config {tmp_path / 'run' / 'config.yaml'}"


@pytest.mark.parametrize("name", ["a/b", "../x", "", ".hidden", "spaced name"])
def test_a_name_that_is_not_a_plain_file_stem_is_refused(tmp_path, name, capsys):
    art = _artifact(tmp_path / "distilled.safetensors")
    assert checkpoints_main(["publish", str(art), "--name", name, "--dir", str(tmp_path / "pub")]) == 1
    assert f"name {name!r} must be a plain name" in capsys.readouterr().err
    assert not (tmp_path / "pub").exists() and not list(tmp_path.glob("x-*"))  # nothing written, inside or out


def test_offline_without_a_cached_copy_names_the_variable(tmp_path, monkeypatch, capsys):
    art = _artifact(tmp_path / "distilled.safetensors")
    assert checkpoints_main(["publish", str(art), "--name", "remote-set", "--dir", str(tmp_path / "served")]) == 0
    (tmp_path / "empty").mkdir()
    _use_registry(monkeypatch, tmp_path, [json.loads(capsys.readouterr().out)], tmp_path / "empty")
    monkeypatch.setenv("ZOO_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="'remote-set': ZOO_OFFLINE=1 and the file is not in the cache"):
        DistilledDataModule(path="hub:remote-set")


def test_a_distilled_entry_is_data_not_a_model_source(tmp_path):
    with pytest.raises(ValueError, match="Pretrained.name: 'digits-mtt-ipc1' is a distilled set, not a model"):
        hub.Pretrained("digits-mtt-ipc1")
    entry = {k: v for k, v in hub.get_entry("digits-mtt-ipc1").items() if k != "eval_nets"}
    (tmp_path / "registry.json").write_text(json.dumps([entry]))
    with pytest.raises(ValueError, match=r"distilled set 'digits-mtt-ipc1' lacks \['eval_nets'\]"):
        hub.registry(tmp_path / "registry.json")


def test_publishing_refuses_what_is_not_a_finished_distilled_set(tmp_path):
    from zoo.publish import publish_distilled

    unfinished = _artifact(tmp_path / "unfinished.safetensors", evaluation=False)
    with pytest.raises(ValueError, match="unfinished.safetensors: the distilled set carries no final evaluation"):
        publish_distilled(unfinished, "x", tmp_path / "pub")
    teacher = hub.PACKAGE_DIR / hub.get_entry("digits-resnet32-teacher")["file"]
    with pytest.raises(ValueError, match="not a distilled set"):
        publish_distilled(teacher, "x", tmp_path / "pub")
    with pytest.raises(FileNotFoundError, match="no distilled set at"):
        publish_distilled(tmp_path / "missing.safetensors", "x", tmp_path / "pub")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="junk.safetensors: not a distilled set .unreadable as safetensors"):
        publish_distilled(tmp_path / "junk.safetensors", "x", tmp_path / "pub")
    assert not (tmp_path / "pub").exists()


def test_publish_cli_reports_a_bad_artifact_in_one_line(tmp_path, capsys):
    assert checkpoints_main(["publish", str(tmp_path / "nothing.safetensors"), "--name", "x"]) == 1
    err = capsys.readouterr().err.strip()
    assert err == f"zoo checkpoints publish: no distilled set at {tmp_path / 'nothing.safetensors'}"
    with pytest.raises(FileNotFoundError, match="^DistilledDataModule.path: no distilled set at"):
        DistilledDataModule(path=str(tmp_path / "nothing.safetensors"))


SHIPPED = [e for e in hub.registry() if e["task"] == hub.TASK_DISTILLED]


def test_digits_distilled_sets_are_published():
    assert {(e["method"], e["ipc"]) for e in SHIPPED if e["dataset"] == "digits"} >= {
        (m, ipc) for m in ("MTT", "DATM", "AST") for ipc in (1, 10)
    }


@pytest.mark.parametrize("entry", SHIPPED, ids=[e["name"] for e in SHIPPED])
def test_shipped_distilled_set_matches_its_entry(entry):
    art = load_distilled(f"hub:{entry['name']}")  # shipped in the package, verified against the sha256
    meta, evaluation = art["metadata"], art["metadata"]["evaluation"]
    assert art["images"].shape == (entry["ipc"] * meta["num_classes"], *entry["input_size"])
    assert meta["method"] == entry["method"] and meta["iteration"] == entry["iteration"]
    assert (meta["dataset"], meta["mean"], meta["std"]) == (entry["dataset"], entry["mean"], entry["std"])
    network = meta["hparams"]["network"]
    assert entry["architecture"]["class_path"] == network["class_path"]
    assert entry["architecture"]["init_args"].items() <= network["init_args"].items()
    assert entry["metrics"]["eval_acc_mean"] == round(evaluation["eval/acc_mean"], 4)
    assert entry["metrics"]["eval_acc_std"] == round(evaluation["eval/acc_std"], 4)
    assert entry["metrics"]["syn_lr"] == round(art["lr"], 6) and len(evaluation["accuracies"]) == entry["eval_nets"]
    assert (ROOT / entry["config"]).is_file() and entry["config"] in entry["command"]


def test_train_on_a_published_set_config_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    cli = ZooCLI(args=["fit", "--config", "configs/dataset_distillation/digits/train_on_mtt_ipc1.yaml",
                       "--trainer.fast_dev_run=true", f"--trainer.default_root_dir={tmp_path}",
                       "--summary.enabled=false"])
    assert cli.trainer.state.finished and torch.isfinite(cli.trainer.logged_metrics["train/loss"])
    assert isinstance(cli.datamodule, DistilledDataModule) and len(cli.datamodule.train_set) == 10
