"""The YAML-only path for small grayscale data: configs/classification/mnist_like/*.yaml on a generated ImageFolder of
28×28 digit PNGs, with the data root (and the teacher checkpoint) given on the command line, no Python."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from zoo.cli import ZooCLI

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "configs" / "classification" / "mnist_like"


@pytest.fixture(scope="module")
def digits_folder(tmp_path_factory) -> Path:
    """Four 28×28 grayscale PNGs per digit for train, two for val: real digits, upsampled, in the ImageFolder layout."""
    from PIL import Image

    from zoo.data.digits import load_digits_tensors

    images, labels = load_digits_tensors(28)
    root = tmp_path_factory.mktemp("digits_png")
    for digit in range(10):
        members = (labels == digit).nonzero().flatten().tolist()
        for split, chosen in (("train", members[:4]), ("val", members[4:6])):
            (root / split / str(digit)).mkdir(parents=True)
            for i in chosen:
                pixels = (images[i, 0] * 255).round().to(torch.uint8).numpy()
                Image.fromarray(pixels, mode="L").save(root / split / str(digit) / f"{i}.png")
    return root


def run(config: str, root: Path, tmp_path: Path, *extra: str) -> ZooCLI:
    return ZooCLI(
        args=[
            "fit", "--config", str(CONFIGS / f"{config}.yaml"), f"--data.init_args.root={root}",
            "--data.init_args.batch_size=8", "--data.init_args.num_workers=0", "--trainer.accelerator=cpu",
            "--trainer.max_steps=2", "--trainer.limit_val_batches=1", "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false", f"--trainer.default_root_dir={tmp_path}", *extra,
        ]
    )


def test_the_templates_read_grayscale_with_the_simple_preset():
    import yaml

    for name in ("teacher", "baseline", "kd"):
        data = yaml.safe_load((CONFIGS / f"{name}.yaml").read_text())["data"]
        assert data["class_path"] == "zoo.data.ImageFolderDataModule"
        args = data["init_args"]
        assert args["augmentation"] == "simple" and args["in_chans"] == 1 and args["image_size"] == 28


@pytest.mark.parametrize("config", ["baseline", "teacher"])
def test_a_template_trains_on_a_folder_given_on_the_command_line(config, digits_folder, tmp_path):
    cli = run(config, digits_folder, tmp_path)
    dm, model = cli.datamodule, cli.model
    assert cli.trainer.state.finished and cli.trainer.global_step == 2
    assert dm.num_classes == 10 and dm.in_chans == 1 and dm.test_split == "val"
    assert model.student.conv1.in_channels == 1 and model.num_classes == 10
    names = [type(t).__name__ for t in dm.train_set.transform.transforms]
    assert names == ["Resize", "CenterCrop", "RandomCrop", "MaybeToTensor", "Normalize"]  # no flip
    assert dm.transforms(train=False).transforms[0].size == 28  # evaluated on the whole image
    assert torch.isfinite(cli.trainer.logged_metrics["train/loss"])
    x, _ = next(iter(dm.val_dataloader()))
    assert x.shape[1:] == (1, 28, 28)


def test_kd_from_a_teacher_checkpoint_with_cached_soft_labels(digits_folder, tmp_path):
    from safetensors.torch import save_file

    from zoo.models.cifar import create_cifar_model

    teacher = create_cifar_model("resnet32", num_classes=10, in_chans=1)
    path = tmp_path / "teacher.safetensors"
    save_file(teacher.state_dict(), str(path))
    cli = run(
        "kd", digits_folder, tmp_path / "runs", f"--model.init_args.teacher.init_args.checkpoint={path}",
        f"--model.init_args.soft_labels.path={tmp_path / 'cache'}", "--model.init_args.soft_labels.repeats=2",
    )
    assert cli.trainer.state.finished and cli.trainer.global_step == 2
    loaded = cli.model.teacher.members[0].state_dict()
    assert all(torch.equal(loaded[k].cpu(), v) for k, v in teacher.state_dict().items())  # the file's weights
    manifest = (tmp_path / "cache" / "cache.json").read_text()
    assert '"pad_crop_flip"' in manifest and '"flip": false' in manifest and '"pad": 4' in manifest
    assert np.isfinite(float(cli.trainer.logged_metrics["train/loss"]))
