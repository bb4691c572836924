"""Bad input, as a hostile new user gives it: every case exits non-zero, reports the root cause in at most three
lines of stderr whose last line names the field or the file, and leaves nothing half-written behind.

Each case runs the ``zoo`` command in-process (``zoo.__main__.main``, the console script's entry point).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from zoo.__main__ import main

ROOT = Path(__file__).resolve().parents[1]
KD = "configs/classification/digits/kd.yaml"
QUICK = ["--trainer.max_epochs=1", "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=1",
         "--summary.enabled=false", "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]


@dataclass
class Case:
    args: Callable[[Path], list[str]]
    names: str  # a regex the last line of stderr must match: the field or the file
    env: dict[str, str] = field(default_factory=dict)
    setup: Callable[[Path], None] | None = None


def fit(*extra: str) -> Callable[[Path], list[str]]:
    return lambda tmp: ["fit", "--config", KD, f"--trainer.default_root_dir={tmp / 'runs'}", *QUICK,
                        *[e.replace("{tmp}", str(tmp)) for e in extra]]


def cmd(*args: str) -> Callable[[Path], list[str]]:
    return lambda tmp: [a.replace("{tmp}", str(tmp)) for a in args]


def teacher(spec: dict) -> str:
    return "--model.init_args.teacher=" + json.dumps(spec)


def _write(path: Path, text: str | bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text) if isinstance(text, bytes) else path.write_text(text)


def _truncated_safetensors(tmp: Path) -> None:
    from safetensors.torch import save_file

    save_file({"w": torch.ones(64)}, str(tmp / "full.safetensors"))
    _write(tmp / "cut.safetensors", (tmp / "full.safetensors").read_bytes()[:40])


def _wrong_weights(tmp: Path) -> None:
    from zoo.models.cifar import create_cifar_model

    torch.save(create_cifar_model("resnet8", num_classes=10, in_chans=1).state_dict(), tmp / "resnet8.pth")


def _ckpts(tmp: Path) -> None:
    _write(tmp / "cut.ckpt", b"PK\x03\x04 not a whole zip")


def _a_finished_run(tmp: Path) -> None:
    """A one-step KD run under tmp/runs (its last.ckpt and config.yaml)."""
    assert_exit(fit()(tmp), expect=0)


def _run_without_checkpoint(tmp: Path) -> None:
    (tmp / "bare" / "checkpoints").mkdir(parents=True)


def _nonfinite_run(tmp: Path) -> None:
    run = tmp / "nan" / "checkpoints"
    run.mkdir(parents=True)
    student = {"class_path": "zoo.models.CIFARModel", "init_args": {"name": "resnet8"}}
    torch.save({"state_dict": {"student.w": torch.tensor([float("nan")])}, "hyper_parameters": {"student": student}},
               run / "x.ckpt")


def _bad_segmentation_labels(tmp: Path) -> None:
    from PIL import Image

    voc = tmp / "voc" / "VOC2012"
    for name in ("a", "b"):
        _write(voc / "JPEGImages" / f"{name}.jpg", b"")
        Image.new("RGB", (40, 40), (10, 20, 30)).save(voc / "JPEGImages" / f"{name}.jpg")
        (voc / "SegmentationClass").mkdir(parents=True, exist_ok=True)
        Image.new("L", (40, 40), 50 if name == "a" else 1).save(voc / "SegmentationClass" / f"{name}.png")
    _write(voc / "ImageSets" / "Segmentation" / "train.txt", "a\nb\n")
    _write(voc / "ImageSets" / "Segmentation" / "val.txt", "a\nb\n")


def _image_folder(tmp: Path, corrupt: bool = False, val: bool = True, classes: bool = True) -> None:
    """A small ImageFolder of 28×28 grayscale digits (train/ and val/), one PNG corrupt when asked."""
    from PIL import Image

    for split in ("train", "val") if val else ("train",):
        (tmp / "folder" / split).mkdir(parents=True, exist_ok=True)
        for c in range(3) if classes else ():
            for i in range(4):
                _write(tmp / "folder" / split / str(c) / f"{i}.png", b"")
                Image.new("L", (28, 28), 40 * c + i).save(tmp / "folder" / split / str(c) / f"{i}.png")
    if corrupt:
        _write(tmp / "folder" / "train" / "1" / "2.png", b"\x89PNG not really")


def _yaml(tmp: Path) -> None:
    _write(tmp / "broken.yaml", "model:\n  class_path: zoo.methods.KD\n  init_args: {student: [\n")
    _write(tmp / "empty.yaml", "")


def _read_only(tmp: Path) -> None:
    """A target folder that cannot be made: its parent is a file (a read-only folder does not stop root)."""
    _a_finished_run(tmp)
    _write(tmp / "ro", "a file, not a folder")


# the digit-scenes baseline (no pretrained weights to fetch) on a two-image VOC folder
SEG = ["fit", "--config", "configs/segmentation/digit_scenes/baseline.yaml"]
VOC_ARGS = ["--data=zoo.data.VOCSegmentationDataModule", "--data.init_args.root={tmp}/voc/VOC2012",
            "--data.init_args.train_split=train", "--data.init_args.batch_size=2", "--data.init_args.crop_size=32",
            "--data.init_args.num_workers=0", "--data.init_args.pin_memory=false"]

FOLDER = ["fit", "--config", "configs/classification/mnist_like/baseline.yaml", "--data.init_args.root={tmp}/folder",
          "--data.init_args.batch_size=4", "--data.init_args.num_workers=0", "--trainer.accelerator=cpu",
          "--trainer.default_root_dir={tmp}/runs", *QUICK]

CASES: dict[str, Case] = {
    # -------------------------------------------------------------------- numbers and names in the config
    "temperature_negative": Case(fit("--model.init_args.temperature=-1"), r"temperature"),
    "temperature_zero": Case(fit("--model.init_args.temperature=0"), r"temperature"),
    "batch_size_zero": Case(fit("--data.init_args.batch_size=0"), r"batch_size"),
    "max_epochs_negative": Case(cmd("fit", "--config", KD, "--trainer.max_epochs=-3"), r"max_epochs"),
    "lr_nan": Case(fit("--model.init_args.optimizer.init_args.lr=nan"), r"\blr\b"),
    "lr_negative": Case(fit("--model.init_args.optimizer.init_args.lr=-0.1"), r"\blr\b"),
    "num_workers_negative": Case(fit("--data.init_args.num_workers=-1"), r"num_workers"),
    "accelerator_missing": Case(fit("--trainer.accelerator=cuda"), r"accelerator"),
    "misspelled_option": Case(fit("--model.init_args.temprature=2"), r"temprature"),
    "unknown_method": Case(fit("--model.class_path=zoo.methods.Nope"), r"Nope"),
    "config_file_missing": Case(cmd("fit", "--config", "{tmp}/nowhere.yaml"), r"nowhere\.yaml"),
    "config_yaml_syntax": Case(cmd("fit", "--config", "{tmp}/broken.yaml"), r"broken\.yaml", setup=_yaml),
    "config_empty": Case(cmd("fit", "--config", "{tmp}/empty.yaml"), r"empty\.yaml|model", setup=_yaml),
    "teacher_ensemble_prob_for_dhkd": Case(
        cmd("fit", "--config", "configs/classification/digits/dhkd.yaml", *QUICK,
            '--model.init_args.teacher=[{"class_path": "zoo.hub.Pretrained", "init_args": {"name": '
            '"digits-resnet32-teacher"}}, {"class_path": "zoo.hub.Pretrained", "init_args": {"name": '
            '"digits-resnet32-teacher-s1"}}]'),
        r"teacher_ensemble"),
    "soft_labels_unsupported": Case(
        cmd("fit", "--config", "configs/classification/digits/dhkd.yaml", *QUICK,
            "--model.init_args.soft_labels={\"path\": \"{tmp}/cache\"}"), r"soft_labels"),
    # -------------------------------------------------------------------- models and weights
    "teacher_unknown_hub_name": Case(fit(teacher({"class_path": "zoo.hub.Pretrained", "init_args": {"name": "nope"}})),
                                     r"'nope'"),
    "teacher_checkpoint_missing": Case(
        fit(teacher({"class_path": "zoo.models.CIFARModel", "init_args": {"name": "resnet32",
                                                                          "checkpoint": "{tmp}/missing.pth"}})),
        r"missing\.pth"),
    "teacher_checkpoint_truncated": Case(
        fit(teacher({"class_path": "zoo.models.CIFARModel", "init_args": {"name": "resnet32",
                                                                          "checkpoint": "{tmp}/cut.safetensors"}})),
        r"cut\.safetensors", setup=_truncated_safetensors),
    "teacher_wrong_architecture": Case(
        fit(teacher({"class_path": "zoo.models.CIFARModel", "init_args": {"name": "resnet32",
                                                                          "checkpoint": "{tmp}/resnet8.pth"}})),
        r"resnet8\.pth", setup=_wrong_weights),
    "teacher_num_classes_mismatch": Case(
        fit(teacher({"class_path": "zoo.models.CIFARModel", "init_args": {"name": "resnet32", "num_classes": 5}})),
        r"num_classes"),
    "teacher_channels_mismatch": Case(fit("--data.init_args.channels=3"), r"in_chans"),
    "student_num_classes_mismatch": Case(
        fit('--model.init_args.student={"class_path": "zoo.models.CIFARModel", "init_args": {"name": "resnet8", '
            '"num_classes": 7}}'), r"num_classes"),
    # -------------------------------------------------------------------- checkpoints and resuming
    "ckpt_path_missing": Case(fit("--ckpt_path={tmp}/none.ckpt"), r"none\.ckpt"),
    "ckpt_path_truncated": Case(fit("--ckpt_path={tmp}/cut.ckpt"), r"cut\.ckpt", setup=_ckpts),
    "ckpt_path_last_without_run": Case(fit("--ckpt_path=last"), r"last\.ckpt"),
    "resume_with_other_settings": Case(fit("--ckpt_path=last", "--model.init_args.temperature=2"), r"temperature",
                                       setup=_a_finished_run),
    "diverging_lr": Case(fit("--model.init_args.optimizer.init_args.lr=1e6", "--trainer.limit_train_batches=8"),
                         r"loss_"),
    # -------------------------------------------------------------------- data
    "segmentation_label_out_of_range": Case(cmd(*SEG, *VOC_ARGS, *QUICK, "--trainer.default_root_dir={tmp}/runs"),
                                            r"a\.png", setup=_bad_segmentation_labels),
    "check_data_finds_bad_labels": Case(cmd("check-data", "--config", SEG[2], *VOC_ARGS),
                                        r"problems found", setup=_bad_segmentation_labels),
    "segmentation_root_missing": Case(cmd(*SEG, "--data=zoo.data.VOCSegmentationDataModule",
                                          "--data.init_args.root={tmp}/novoc", *QUICK), r"novoc"),
    "distilled_set_not_safetensors": Case(
        cmd("fit", "--config", "configs/dataset_distillation/digits/train_on_mtt_ipc1.yaml", *QUICK,
            "--data.init_args.path={tmp}/set.pt"), r"set\.pt", setup=lambda t: _write(t / "set.pt", b"x")),
    "distilled_set_unknown_hub_name": Case(
        cmd("fit", "--config", "configs/dataset_distillation/digits/train_on_mtt_ipc1.yaml", *QUICK,
            "--data.init_args.path=hub:nope"), r"nope"),
    "mtt_without_experts": Case(
        cmd("fit", "--config", "configs/dataset_distillation/digits/mtt.yaml", *QUICK,
            "--model.init_args.buffer_dir={tmp}/no_experts"), r"no_experts"),
    "image_folder_root_missing": Case(cmd(*FOLDER, "--data.init_args.root={tmp}/nothing"), r"nothing"),
    "image_folder_without_val": Case(cmd(*FOLDER), r"val", setup=lambda t: _image_folder(t, val=False)),
    "image_folder_empty": Case(cmd(*FOLDER), r"folder|train", setup=lambda t: _image_folder(t, classes=False)),
    "image_folder_corrupt_png": Case(cmd(*FOLDER, "--trainer.limit_train_batches=3"), r"2\.png",
                                     setup=lambda t: _image_folder(t, corrupt=True)),
    # -------------------------------------------------------------------- checkpoints command
    "offline_flag_invalid": Case(cmd("checkpoints", "download", "digits-resnet32-teacher"), r"ZOO_OFFLINE",
                                 env={"ZOO_OFFLINE": "maybe"}),
    "verify_a_folder": Case(cmd("checkpoints", "verify", "{tmp}"), r"tmp|pytest"),
    "verify_corrupt_file": Case(cmd("checkpoints", "verify", "{tmp}/digits-resnet32-teacher-00000000.safetensors"),
                                r"digits-resnet32-teacher-00000000",
                                setup=lambda t: _write(t / "digits-resnet32-teacher-00000000.safetensors", b"x")),
    "download_unknown_name": Case(cmd("checkpoints", "download", "nope"), r"'nope'"),
    "publish_name_with_slash": Case(cmd("checkpoints", "publish", "{tmp}/runs", "--name", "a/b", "--dir", "{tmp}/pub"),
                                    r"'a/b'"),
    "publish_name_escaping": Case(cmd("checkpoints", "publish", "{tmp}/runs", "--name", "../evil", "--dir",
                                      "{tmp}/pub"), r"\.\./evil"),
    "publish_folder_not_creatable": Case(
        cmd("checkpoints", "publish", "{tmp}/runs/classification/digits/kd/version_0", "--name", "x", "--dir",
            "{tmp}/ro/sub"), r"ro/sub", setup=_read_only),
    "publish_run_without_checkpoint": Case(cmd("checkpoints", "publish", "{tmp}/bare", "--name", "x", "--dir",
                                               "{tmp}/pub"), r"bare", setup=_run_without_checkpoint),
    "publish_nonfinite_weights": Case(cmd("checkpoints", "publish", "{tmp}/nan/checkpoints/x.ckpt", "--name", "x",
                                          "--dir", "{tmp}/pub", "--no-test"), r"not finite|student\.w",
                                      setup=_nonfinite_run),
    "publish_distilled_not_safetensors": Case(cmd("checkpoints", "publish", "{tmp}/s.safetensors", "--name", "x",
                                                  "--dir", "{tmp}/pub"), r"s\.safetensors",
                                              setup=lambda t: _write(t / "s.safetensors", b"not a set")),
}


def assert_exit(args: list[str], expect: int | None = None) -> tuple[int, str]:
    try:
        main(args)
        code = 0
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
    if expect is not None:
        assert code == expect
    return code, ""


def _snapshot(tmp: Path) -> set[str]:
    return {str(p.relative_to(tmp)) for p in tmp.rglob("*")}


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input_fails_in_one_line_naming_the_cause(name, tmp_path, monkeypatch, capfd):
    case = CASES[name]
    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("ZOO_HOME", str(tmp_path / "zoo_home"))
    for key, value in case.env.items():
        monkeypatch.setenv(key, value)
    if case.setup is not None:
        case.setup(tmp_path)
    before = _snapshot(tmp_path)
    capfd.readouterr()
    code, _ = assert_exit(case.args(tmp_path))
    err = capfd.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code != 0, f"{name}: exit code 0\n{err}"
    assert lines, f"{name}: nothing on stderr"
    assert len(lines) <= 3, f"{name}: {len(lines)} lines on stderr:\n{err}"
    assert re.search(case.names, lines[-1]), f"{name}: the last line does not name {case.names!r}: {lines[-1]}"
    # nothing half-written: no checkpoint of a failed run, no partial download, nothing new in a publish folder
    new = _snapshot(tmp_path) - before
    assert not [p for p in new if p.endswith((".ckpt", ".part", ".tmp"))], f"{name}: left {sorted(new)}"
    assert not [p for p in new if p.startswith(("pub/", "ro/"))], f"{name}: wrote into the publish folder: {new}"
