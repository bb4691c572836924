"""The shipped checkpoint registry: validation, hash-checked loading, export, publish and checkpoints.md."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from zoo import hub, publish
from zoo.hub_cli import main as checkpoints_main

ROOT = Path(__file__).resolve().parents[1]


def test_checkpoints_md_is_generated_from_the_registry():
    assert (ROOT / "checkpoints.md").read_text() == publish.render_markdown()


def test_shipped_teacher_is_a_registry_entry_that_loads_verified():
    entry = hub.get_entry("digits-resnet32-teacher")
    path = hub.download("digits-resnet32-teacher")
    assert path.name == entry["file"] and path.stat().st_size == entry["file_size"]
    assert hub.sha256_file(path) == entry["sha256"]
    model, meta = hub.load("digits-resnet32-teacher")
    assert not model.training and meta["mean"] and meta["std"]
    assert model(torch.randn(2, *meta["input_size"])).shape == (2, 10)
    source = hub.Pretrained("digits-resnet32-teacher")
    assert source.mean == tuple(entry["mean"]) and source.describe() == "hub:digits-resnet32-teacher"
    with pytest.raises(ValueError, match="num_classes=10"):
        source.build(num_classes=100)
    names = [e["name"] for e in hub.list_checkpoints("digits-*")]
    assert "digits-resnet32-teacher" in names and names == sorted(names)
    assert [e["name"] for e in hub.list_checkpoints("*resnet32-teacher")] == ["digits-resnet32-teacher"]
    assert hub.list_checkpoints("nothing-*") == []
    with pytest.raises(KeyError, match="known: .*digits-resnet32-teacher"):
        hub.get_entry("nope")


def test_corrupted_file_fails_with_both_hashes(tmp_path, monkeypatch):
    entry = hub.get_entry("digits-resnet32-teacher")
    shutil.copy(hub.PACKAGE_DIR / entry["file"], tmp_path / entry["file"])
    shutil.copy(hub.REGISTRY_FILE, tmp_path / "registry.json")
    data = bytearray((tmp_path / entry["file"]).read_bytes())
    data[-1] ^= 0xFF
    (tmp_path / entry["file"]).write_bytes(bytes(data))
    monkeypatch.setattr(hub, "PACKAGE_DIR", tmp_path)
    with pytest.raises(ValueError, match=f"expected {entry['sha256']}"):
        hub.download("digits-resnet32-teacher")


def test_registry_validation_names_entry_and_field(tmp_path):
    bad = tmp_path / "registry.json"
    entry = dict(hub.get_entry("digits-resnet32-teacher"))
    del entry["license"]
    bad.write_text(json.dumps([entry]))
    with pytest.raises(ValueError, match=r"digits-resnet32-teacher.*license"):
        hub.registry(bad)
    entry = dict(hub.get_entry("digits-resnet32-teacher"), file="no-hash.safetensors")
    bad.write_text(json.dumps([entry]))
    with pytest.raises(ValueError, match="sha256"):
        hub.registry(bad)


def test_export_student_is_atomic_and_hash_named(tmp_path):
    state = {"state_dict": {"student.w": torch.arange(6.0).view(2, 3), "student.b": torch.zeros(2)}}
    torch.save(state, tmp_path / "run.ckpt")
    path, digest = publish.export_student(tmp_path / "run.ckpt", tmp_path / "out", "toy")
    assert path.name == f"toy-{digest[:8]}.safetensors" and hub.sha256_file(path) == digest
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [path.name]  # no temp file left
    from safetensors.torch import load_file

    assert set(load_file(str(path))) == {"w", "b"}


def test_export_leaves_nothing_when_interrupted(tmp_path, monkeypatch):
    torch.save({"w": torch.ones(3)}, tmp_path / "w.pt")

    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    import zoo.io

    monkeypatch.setattr(zoo.io.os, "fsync", boom)  # the file is written, the rename has not happened
    with pytest.raises(KeyboardInterrupt):
        publish.export_student(tmp_path / "w.pt", tmp_path / "out", "toy")
    assert list((tmp_path / "out").iterdir()) == []


def test_checkpoints_cli(capsys):
    assert checkpoints_main(["list", "digits-*"]) == 0
    assert "digits-resnet32-teacher" in capsys.readouterr().out
    entry = hub.get_entry("digits-resnet32-teacher")
    assert checkpoints_main(["verify", str(hub.PACKAGE_DIR / entry["file"])]) == 0
    assert "OK" in capsys.readouterr().out
    assert checkpoints_main(["markdown"]) == 0
    assert capsys.readouterr().out == publish.render_markdown()


def test_publish_cli_exports_a_finished_run(tmp_path, monkeypatch, capsys):
    from zoo.cli import ZooCLI, test_metrics

    monkeypatch.chdir(ROOT)
    ZooCLI(args=["fit", "--config", "configs/classification/digits/baseline.yaml", "--trainer.max_epochs=1",
                 "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=1", "--summary.enabled=false",
                 f"--trainer.default_root_dir={tmp_path}"])
    run = tmp_path / "classification/digits/baseline" / "version_0"
    capsys.readouterr()
    assert checkpoints_main(["publish", str(run), "--name", "tiny", "--dir", str(tmp_path / "pub"),
                             "--config", "configs/classification/digits/baseline.yaml",
                             "--command", "zoo fit --config X --seed_everything=3"], test_metrics=test_metrics) == 0
    entry = json.loads(capsys.readouterr().out)
    assert entry["command"].startswith("zoo fit --config X --seed_everything=3 && zoo checkpoints publish")
    assert {"val_acc", "test_acc"} <= set(entry["metrics"])
    assert entry["architecture"]["init_args"] == {"name": "resnet8", "num_classes": 10, "in_chans": 1}
    files = sorted(p.suffix for p in (tmp_path / "pub").iterdir())
    assert files == [".json", ".md", ".safetensors"]
