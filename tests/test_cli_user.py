"""What a user meets around a run: the command's help and tables, run folders, W&B files, one's own registry,
partial downloads, what a published card calls each metric, threads under multi-process CPU runs."""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

import pytest
import torch

from zoo import hub
from zoo.__main__ import main as zoo_main

ROOT = Path(__file__).resolve().parents[1]
QUICK = [
    "--trainer.max_epochs=1",
    "--trainer.limit_train_batches=2",
    "--trainer.limit_val_batches=1",
    "--summary.enabled=false",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
]


def run(args: list[str]) -> int:
    try:
        zoo_main(args)
    except SystemExit as stop:
        return stop.code if isinstance(stop.code, int) else 1
    return 0


def test_zoo_help_lists_every_command(capsys):
    assert run(["--help"]) == 0
    out = capsys.readouterr().out
    for command in ("fit", "validate", "test", "predict", "check-data", "checkpoints"):
        assert f"  {command} " in out


def test_checkpoints_list_prints_a_table_with_a_header(capsys):
    assert run(["checkpoints", "list", "digits-resnet32-teacher"]) == 0
    header, row = capsys.readouterr().out.splitlines()
    assert header.split() == ["name", "task", "method", "data", "metrics", "file"]
    assert row.startswith("digits-resnet32-teacher ")


def _reorder(row: str, header: str, new_header: list[str]) -> str:
    """A CSV row of ``header``'s columns written under ``new_header`` (Lightning rewrites the file when keys appear)."""
    values = dict(zip(header.split(","), row.split(",")))
    return ",".join(values.get(k, "") for k in new_header)


def test_runs_are_named_after_their_config_and_validate_writes_into_the_run(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    assert (
        run(
            [
                "fit",
                "--config",
                "configs/classification/digits/baseline.yaml",
                *QUICK,
                f"--trainer.default_root_dir={tmp_path}",
            ]
        )
        == 0
    )
    runs = tmp_path / "classification" / "digits" / "baseline"
    assert [p.name for p in runs.iterdir()] == ["version_0"]
    assert (runs / "version_0" / "checkpoints" / "last.ckpt").is_file()
    config = (runs / "version_0" / "config.yaml").read_text()
    trained = (runs / "version_0" / "metrics.csv").read_text().splitlines()
    assert len(trained) > 1  # the fit's rows
    assert (
        run(
            [
                "validate",
                "--config",
                "configs/classification/digits/baseline.yaml",
                "--ckpt_path",
                "last",
                f"--trainer.default_root_dir={tmp_path}",
                "--trainer.enable_progress_bar=false",
            ]
        )
        == 0
    )
    assert [p.name for p in runs.iterdir()] == ["version_0"]  # no new version folder
    assert (runs / "version_0" / "config.yaml").read_text() == config  # the run's own config is kept
    after = (runs / "version_0" / "metrics.csv").read_text().splitlines()
    header = after[0].split(",")
    assert after[1:len(trained)] == [_reorder(row, trained[0], header) for row in trained[1:]]  # training rows kept
    assert len(after) > len(trained) and "val/acc" in header  # and the validation appended
    assert (
        run(
            [
                "fit",
                "--config",
                "configs/classification/digits/baseline.yaml",
                *QUICK,
                "--run_name",
                "mine",
                f"--trainer.default_root_dir={tmp_path}",
            ]
        )
        == 0
    )
    assert (tmp_path / "mine" / "version_0").is_dir()


def test_the_summary_calls_a_model_trained_without_teacher_a_model(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    args = [
        "fit",
        "--config",
        "configs/classification/digits/baseline.yaml",
        *QUICK[:3], *QUICK[-2:],
        f"--trainer.default_root_dir={tmp_path}",
    ]
    assert run(args) == 0
    out = capsys.readouterr().out
    assert re.search(r"│ model +│ cifar:resnet8", out) and "│ student " not in out


def test_wandb_writes_into_the_run_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_MODE", "offline")
    logger = '{"class_path": "lightning.pytorch.loggers.WandbLogger", "init_args": {"project": "zoo-tests"}}'
    assert (
        run(
            [
                "fit",
                "--config",
                str(ROOT / "configs/classification/digits/baseline.yaml"),
                *QUICK,
                f"--trainer.logger={logger}",
                "--trainer.default_root_dir=runs",
            ]
        )
        == 0
    )
    assert not (tmp_path / "wandb").exists()
    assert list((tmp_path / "runs" / "classification/digits/baseline").glob("wandb/offline-run-*"))


def _published_dir(tmp_path: Path) -> Path:
    """A one-step baseline run published into tmp_path/pub (weights, .json and .md cards)."""
    assert (
        run(
            [
                "fit",
                "--config",
                str(ROOT / "configs/classification/digits/baseline.yaml"),
                *QUICK,
                f"--trainer.default_root_dir={tmp_path}",
            ]
        )
        == 0
    )
    pub = tmp_path / "pub"
    assert (
        run(
            [
                "checkpoints",
                "publish",
                str(tmp_path / "classification/digits/baseline/version_0"),
                "--name",
                "my-net",
                "--dir",
                str(pub),
                "--no-test",
            ]
        )
        == 0
    )
    return pub


def test_ones_own_registry_works_with_verify_download_load_and_pretrained(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    pub = _published_dir(tmp_path)
    file = next(pub.glob("my-net-*.safetensors"))
    assert run(["checkpoints", "verify", str(file)]) == 1  # not in any registry yet
    monkeypatch.setenv("ZOO_REGISTRY", str(pub))
    monkeypatch.setenv("ZOO_HOME", str(tmp_path / "home"))
    capsys.readouterr()
    assert run(["checkpoints", "verify", str(file)]) == 0
    assert "OK, my-net" in capsys.readouterr().out
    assert hub.download("my-net") == file
    model, entry = hub.load("my-net")
    assert entry["name"] == "my-net" and not model.training
    teacher = hub.Pretrained("my-net").build(num_classes=10, in_chans=1)
    assert sum(p.numel() for p in teacher.parameters()) == sum(p.numel() for p in model.parameters())


def test_published_files_are_readable_by_others_and_the_card_names_each_metrics_split(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    old = os.umask(0o022)
    try:
        pub = _published_dir(tmp_path)
    finally:
        os.umask(old)
    for file in pub.iterdir():
        assert file.stat().st_mode & 0o777 == 0o644, file
    card = json.loads(next(pub.glob("*.json")).read_text())
    assert card["entry"]["metric_splits"] == {k: "val" for k in card["entry"]["metrics"]}
    assert "validation split" in next(pub.glob("*.md")).read_text()


def test_a_test_evaluation_of_the_validation_split_is_not_called_test(tmp_path, monkeypatch):
    """ImageFolder data without a test/ folder tests on val/: publishing keeps the validation metrics only."""
    from zoo import publish

    monkeypatch.setattr(publish, "_data_facts", lambda config: {"test_split": "val", "dataset": "x"})
    monkeypatch.chdir(ROOT)
    assert (
        run(
            [
                "fit",
                "--config",
                "configs/classification/digits/baseline.yaml",
                *QUICK,
                f"--trainer.default_root_dir={tmp_path}",
            ]
        )
        == 0
    )
    entry = publish.publish(
        tmp_path / "classification/digits/baseline/version_0", "x", tmp_path / "pub", test_metrics={"test/acc": 0.5}
    )
    assert "test_acc" not in entry["metrics"] and "val_acc" in entry["metrics"]


def test_a_killed_downloads_part_file_is_removed_by_the_next_download(tmp_path):
    source = tmp_path / "src.bin"
    source.write_bytes(b"weights")
    dst = tmp_path / "cache" / "w-12345678.safetensors"
    dst.parent.mkdir()
    stale = dst.parent / f".{dst.name}-dead{hub.PART_SUFFIX}"
    live = dst.parent / f".{dst.name}-live{hub.PART_SUFFIX}"
    stale.write_bytes(b"half")
    live.write_bytes(b"half")
    past = time.time() - hub.STALE_PART_SECONDS - 60
    os.utime(stale, (past, past))
    hub.download_url_to_file(source.as_uri(), dst, hub.sha256_file(source), 7)
    assert dst.read_bytes() == b"weights"
    assert not stale.exists() and live.exists()  # a recent one may belong to a download still running


def test_multi_process_cpu_runs_share_the_cores(monkeypatch):
    from lightning.pytorch.accelerators import CPUAccelerator

    from zoo.cli import _threads_per_process

    class FakeTrainer:
        accelerator = CPUAccelerator()
        strategy = type("S", (), {"num_processes": 2})()

    threads = torch.get_num_threads()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    try:
        _threads_per_process(FakeTrainer())
        assert torch.get_num_threads() == 8 and os.environ["OMP_NUM_THREADS"] == "8"
        monkeypatch.setenv("OMP_NUM_THREADS", "3")  # a user's setting wins
        torch.set_num_threads(5)
        _threads_per_process(FakeTrainer())
        assert torch.get_num_threads() == 5
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("command", [["checkpoints", "list"], ["--help"]])
def test_light_commands_do_not_import_torch(command):
    import subprocess
    import sys

    code = (
        f"import sys, zoo.__main__ as m\ntry:\n    m.main({command!r})\nexcept SystemExit:\n    pass\n"
        "assert 'torch' not in sys.modules, 'torch was imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, capture_output=True)
