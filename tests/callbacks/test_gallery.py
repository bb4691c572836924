"""PredictionGallery: captions and colours per tile, grid size, de-normalised pixels, PNG, W&B and TensorBoard."""

from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger, WandbLogger
from PIL import Image

from callbacks import PredictionGallery
from callbacks.gallery import LINE_HEIGHT, NEUTRAL, PAD, RIGHT, WRONG, render_gallery, tile_captions
from zoo.data import DigitsDataModule
from zoo.methods import KD
from zoo.models import CIFARModel


def test_captions_name_the_right_classes_and_colours():
    student = torch.tensor([[0.1, 2.0, 0.0], [3.0, 0.0, 0.0], [0.0, 0.0, 1.0]])  # top-1: 1, 0, 2
    teacher = torch.tensor([1, 1, 2])
    target = torch.tensor([1, 2, 2])
    caps = tile_captions(student, target, teacher, class_names=["cat", "dog", "eel"])
    assert [c.lines for c in caps] == [
        ("label dog", "student dog", "teacher dog"),
        ("label eel", "student cat", "teacher dog"),
        ("label eel", "student eel", "teacher eel"),
    ]
    assert [c.colour for c in caps] == [RIGHT, WRONG, RIGHT]
    # no teacher, no label, no names: one line with the index, grey
    (only,) = tile_captions(torch.tensor([7]))
    assert only.lines == ("student 7",) and only.colour == NEUTRAL


def test_grid_size_frames_and_denormalised_pixels():
    # 5 grayscale 8×8 images, constant per image so a tile's centre pixel is known; mean 0.5, std 0.25
    raw = torch.linspace(0.1, 0.9, 5).view(5, 1, 1, 1).expand(5, 1, 8, 8)
    normalised = (raw - 0.5) / 0.25
    caps = tile_captions(torch.tensor([0, 1, 2, 3, 4]), torch.tensor([0, 0, 2, 0, 4]), torch.tensor([0, 1, 2, 3, 4]))
    image = render_gallery(normalised, caps, mean=[0.5], std=[0.25])
    # auto upscale 8 → 64 px; 3 columns × 2 rows; 3 caption lines
    tile_w, tile_h = 64 + 2 * PAD, 64 + 3 * LINE_HEIGHT + 2 * PAD
    assert image.size == (3 * tile_w, 2 * tile_h)
    pixels = np.asarray(image)
    for i, caption in enumerate(caps):
        x0, y0 = (i % 3) * tile_w, (i // 3) * tile_h
        assert tuple(pixels[y0, x0]) == caption.colour  # the frame
        centre = pixels[y0 + PAD + 32, x0 + PAD + 32].astype(int)
        assert centre[0] == centre[1] == centre[2]  # grayscale shown as gray RGB
        assert abs(centre[0] - float(raw[i, 0, 0, 0]) * 255) <= 1  # de-normalised (±1 for float rounding)
    assert [c.colour for c in caps] == [RIGHT, WRONG, RIGHT, WRONG, RIGHT]


def test_rgb_images_keep_their_channels_and_upscale_is_honoured():
    rgb = torch.zeros(2, 3, 4, 4)
    rgb[:, 0] = 1.0  # pure red after de-normalisation with mean 0, std 1
    image = render_gallery(rgb, tile_captions(torch.tensor([0, 1])), mean=[0, 0, 0], std=[1, 1, 1], upscale=3)
    assert image.size == (2 * (12 + 2 * PAD), 12 + LINE_HEIGHT + 2 * PAD)
    assert tuple(np.asarray(image)[PAD + 5, PAD + 5]) == (255, 0, 0)


def test_options_are_validated():
    for field in ("num_images", "every_n_epochs", "upscale"):
        with pytest.raises(ValueError, match=field):
            PredictionGallery(**{field: 0})


def test_every_n_epochs_follows_lightning_counting():
    gallery = PredictionGallery(every_n_epochs=3)
    due = [gallery._due(SimpleNamespace(sanity_checking=False, current_epoch=e)) for e in range(6)]
    assert due == [False, False, True, False, False, True]
    assert not gallery._due(SimpleNamespace(sanity_checking=True, current_epoch=2))


def test_tensorboard_gets_an_hwc_image(tmp_path):
    tb = mock.MagicMock(spec=TensorBoardLogger)  # tensorboard itself need not be installed
    trainer = SimpleNamespace(loggers=[tb], current_epoch=4, global_step=40)
    gallery = PredictionGallery()
    image = Image.new("RGB", (10, 6))
    gallery._publish(trainer, image, str(tmp_path))
    assert Path(gallery.last_path) == tmp_path / "gallery" / "epoch_4.png"
    (args, kwargs), = tb.experiment.add_image.call_args_list
    assert args[0] == "val/gallery" and args[1].shape == (6, 10, 3) and args[1].dtype == np.uint8
    assert kwargs == {"global_step": 40, "dataformats": "HWC"}


def test_a_failing_logger_warns_and_training_goes_on(tmp_path):
    broken = mock.MagicMock(spec=WandbLogger)
    broken.log_image.side_effect = RuntimeError("offline")
    gallery = PredictionGallery()
    trainer = SimpleNamespace(loggers=[broken], current_epoch=0, global_step=0)
    with pytest.warns(UserWarning, match="did not take the image"):
        gallery._publish(trainer, Image.new("RGB", (4, 4)), str(tmp_path))
    assert Path(gallery.last_path).is_file()


def test_trainer_run_writes_the_png_and_the_wandb_media(tmp_path, monkeypatch):
    import wandb

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    model = KD(CIFARModel("resnet8"), CIFARModel("resnet14"), num_classes=10, in_chans=1)
    data = DigitsDataModule(image_size=16, batch_size=32)
    gallery = PredictionGallery(num_images=16)
    loggers = [CSVLogger(tmp_path, name="run"), WandbLogger(offline=True, save_dir=str(tmp_path), project="zoo-test")]
    trainer = L.Trainer(
        accelerator="cpu", max_epochs=1, limit_train_batches=1, limit_val_batches=1, num_sanity_val_steps=0,
        logger=loggers, callbacks=[gallery], enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=False, default_root_dir=tmp_path,
    )
    try:
        trainer.fit(model, datamodule=data)
    finally:
        wandb.finish()
    png = Path(trainer.log_dir) / "gallery" / "epoch_0.png"
    assert Path(gallery.last_path) == png
    with Image.open(png) as image:  # 16 tiles: 4 × 4 of 16×16 digits upscaled 4× with three caption lines
        assert image.size == (4 * (64 + 2 * PAD), 4 * (64 + 3 * LINE_HEIGHT + 2 * PAD))
        # the first tile's frame says whether the student got the first validation image right
        x, y = next(iter(data.val_dataloader()))
        model.eval()
        with torch.no_grad():
            right = int(model.student(x[:1]).argmax()) == int(y[0])
        assert image.getpixel((0, 0)) == (RIGHT if right else WRONG)
    media = list(tmp_path.glob("wandb/offline-run-*/files/media/images/val/gallery_*.png"))
    assert len(media) == 1
