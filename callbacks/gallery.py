"""A picture of what the student gets right and wrong: validation images with label, student and teacher guesses."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger
from lightning.pytorch.utilities import rank_zero_warn
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

__all__ = ["PredictionGallery", "TileCaption", "tile_captions", "render_gallery", "gallery_size"]

RIGHT = (40, 200, 70)  # green: the student's top-1 is the label
WRONG = (230, 50, 50)  # red: it is not
NEUTRAL = (200, 200, 200)  # no label to compare with
BACKGROUND = (24, 24, 24)
PAD = 2  # pixels around each tile, drawn in the tile's colour
LINE_HEIGHT = 12  # one caption line of Pillow's default font (10 px type)
MIN_SIDE = 64  # the automatic upscale makes images at least this wide, so "student 9" fits under them
_EPS = 1e-12


@dataclass(frozen=True)
class TileCaption:
    """The text under one tile and its colour."""

    lines: tuple[str, ...]
    colour: tuple[int, int, int]


def tile_captions(
    student: Tensor,
    target: Tensor | None = None,
    teacher: Tensor | None = None,
    class_names: Sequence[str] | None = None,
) -> list[TileCaption]:
    """Captions for a row of tiles: ``label <y>``, ``student <ŷ_s>``, ``teacher <ŷ_t>`` (lines left out when absent).

    ``student``/``teacher`` are logits ``(N, C)`` or class indices ``(N,)``; colours are green when the student's
    class equals the label, red when not, grey without labels.
    """

    def classes(t: Tensor | None) -> list[int] | None:
        if t is None:
            return None
        t = t.detach()
        return (t.argmax(-1) if t.ndim == 2 else t).flatten().tolist()

    def name(i: int) -> str:
        return class_names[i] if class_names is not None and 0 <= i < len(class_names) else str(i)

    s, y, t = classes(student), classes(target), classes(teacher)
    out = []
    for i, pred in enumerate(s):
        lines = []
        if y is not None:
            lines.append(f"label {name(y[i])}")
        lines.append(f"student {name(pred)}")
        if t is not None:
            lines.append(f"teacher {name(t[i])}")
        colour = NEUTRAL if y is None else (RIGHT if pred == y[i] else WRONG)
        out.append(TileCaption(tuple(lines), colour))
    return out


def auto_upscale(height: int, width: int) -> int:
    """The smallest integer factor that makes the image at least ``MIN_SIDE`` pixels wide and high."""
    return max(1, math.ceil(MIN_SIDE / max(1, min(height, width))))


def gallery_size(n: int, height: int, width: int, upscale: int, lines: int) -> tuple[int, int]:
    """(width, height) in pixels of the grid of ``n`` tiles: ⌈√n⌉ columns, each tile padded by ``PAD``."""
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    tile_w = width * upscale + 2 * PAD
    tile_h = height * upscale + lines * LINE_HEIGHT + 2 * PAD
    return cols * tile_w, rows * tile_h


def _to_uint8(images: Tensor, mean: Sequence[float] | None, std: Sequence[float] | None) -> np.ndarray:
    """(N, C, H, W) normalised images → (N, H, W, 3) uint8: de-normalised with mean/std, else min–max per image."""
    x = images.detach().float().cpu()
    c = x.shape[1]
    if mean is not None and std is not None:
        m = torch.as_tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1)
        s = torch.as_tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1)
        if m.shape[1] in (1, c) and s.shape[1] in (1, c):
            x = x * s + m
        else:
            mean = None
    if mean is None or std is None:
        lo = x.amin(dim=(1, 2, 3), keepdim=True)
        hi = x.amax(dim=(1, 2, 3), keepdim=True)
        x = (x - lo) / (hi - lo).clamp_min(_EPS)
    # Grayscale is repeated to RGB (coloured captions need an RGB canvas); other channel counts show channel 0.
    x = x[:, :3] if c == 3 else x[:, :1].expand(-1, 3, -1, -1)
    x = (x.clamp(0, 1) * 255).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).contiguous().numpy()


def _fit(draw: ImageDraw.ImageDraw, text: str, font: Any, width: int) -> str:
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "…", font=font) > width:
        text = text[:-1]
    return text + "…"


def render_gallery(
    images: Tensor,
    captions: Sequence[TileCaption],
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    upscale: int | None = None,
) -> Image.Image:
    """Draws the tiles (image, coloured frame, caption lines under it) on one RGB canvas; size: ``gallery_size``."""
    n, _, h, w = images.shape
    if n != len(captions):
        raise ValueError(f"render_gallery: {n} images but {len(captions)} captions")
    up = upscale or auto_upscale(h, w)
    lines = max((len(c.lines) for c in captions), default=0)
    width, height = gallery_size(n, h, w, up, lines)
    cols = math.ceil(math.sqrt(n))
    tile_w, tile_h = w * up + 2 * PAD, h * up + lines * LINE_HEIGHT + 2 * PAD
    canvas = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    pixels = _to_uint8(images, mean, std)
    for i, caption in enumerate(captions):
        x0, y0 = (i % cols) * tile_w, (i // cols) * tile_h
        draw.rectangle([x0, y0, x0 + tile_w - 1, y0 + h * up + 2 * PAD - 1], fill=caption.colour)
        tile = Image.fromarray(pixels[i]).resize((w * up, h * up), Image.NEAREST)
        canvas.paste(tile, (x0 + PAD, y0 + PAD))
        for j, line in enumerate(caption.lines):
            text = _fit(draw, line, font, tile_w - 2)
            draw.text((x0 + 1, y0 + h * up + 2 * PAD + j * LINE_HEIGHT), text, fill=caption.colour, font=font)
    return canvas


class PredictionGallery(L.Callback):
    """Logs a grid of validation images, each captioned with its label and the student's and teacher's top-1.

    Takes the first ``num_images`` images of the first validation batch (the same images every epoch, as the
    validation loader does not shuffle), de-normalises them with the data module's ``mean``/``std`` (min–max per
    image when the trainer has no data module with them), and captions each tile ``label y`` / ``student ŷ_s`` /
    ``teacher ŷ_t``, in green when the student is right and red when wrong. Predictions come from the
    ``validation_step`` outputs (``logits``, ``teacher_logits``, ``target``); no model is run again. Without a
    teacher the teacher line is left out.

    Written each due validation epoch (after the sanity check), on global rank 0:
        - ``<trainer.log_dir>/gallery/epoch_<E>.png`` always (``default_root_dir`` when there is no log dir);
        - ``val/gallery`` through ``WandbLogger.log_image`` when a W&B logger is attached;
        - ``val/gallery`` through ``SummaryWriter.add_image`` when a TensorBoard logger is attached.
    Other loggers get the PNG only. A logger that fails to take the image is warned about, not raised from.

    Args:
        num_images: tiles in the grid (⌈√N⌉ columns).
        every_n_epochs: draw after epochs E with (E + 1) % every_n_epochs == 0 (Lightning's counting, as
            ``check_val_every_n_epoch``).
        upscale: integer factor for each image (nearest neighbour); ``None``: the smallest that makes an image
            at least 64 px on a side, so that an 8×8 or 16×16 digit has room for its caption.
        class_names: names to write instead of class indices (index ``i`` → ``class_names[i]``); long names are
            cut to the tile's width.
    """

    def __init__(
        self,
        num_images: int = 16,
        every_n_epochs: int = 1,
        upscale: int | None = None,
        class_names: list[str] | None = None,
    ) -> None:
        for field, value in (("num_images", num_images), ("every_n_epochs", every_n_epochs), ("upscale", upscale)):
            if value is not None and value < 1:
                raise ValueError(f"PredictionGallery.{field} must be ≥ 1, got {value}")
        self.num_images = num_images
        self.every_n_epochs = every_n_epochs
        self.upscale = upscale
        self.class_names = list(class_names) if class_names is not None else None
        self.last_path: str | None = None
        self._warned: set[str] = set()

    def _due(self, trainer: L.Trainer) -> bool:
        return not trainer.sanity_checking and (trainer.current_epoch + 1) % self.every_n_epochs == 0

    def on_validation_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if batch_idx != 0 or dataloader_idx != 0 or not self._due(trainer):
            return
        # trainer.log_dir broadcasts from rank 0, so every process asks for it before rank 0 goes on alone.
        root = trainer.log_dir or trainer.default_root_dir
        if not trainer.is_global_zero:
            return
        if not isinstance(outputs, dict) or not isinstance(outputs.get("logits"), Tensor):
            return
        images = _images_of(batch)
        if images is None or images.ndim != 4:
            return
        n = min(self.num_images, images.shape[0])
        teacher, target = outputs.get("teacher_logits"), outputs.get("target")
        captions = tile_captions(
            outputs["logits"][:n],
            target[:n] if isinstance(target, Tensor) else None,
            teacher[:n] if isinstance(teacher, Tensor) else None,
            self.class_names,
        )
        datamodule = getattr(trainer, "datamodule", None)
        mean, std = getattr(datamodule, "mean", None), getattr(datamodule, "std", None)
        image = render_gallery(images[:n], captions, mean, std, self.upscale)
        self._publish(trainer, image, root)

    def _publish(self, trainer: L.Trainer, image: Image.Image, root: str) -> None:
        folder = os.path.join(root, "gallery")
        os.makedirs(folder, exist_ok=True)
        self.last_path = os.path.join(folder, f"epoch_{trainer.current_epoch}.png")
        image.save(self.last_path)
        for logger in trainer.loggers:
            try:
                if isinstance(logger, WandbLogger):
                    logger.log_image(key="val/gallery", images=[image], step=trainer.global_step)
                elif isinstance(logger, TensorBoardLogger):
                    logger.experiment.add_image(
                        "val/gallery", np.asarray(image), global_step=trainer.global_step, dataformats="HWC"
                    )
            except Exception as err:  # a broken logger must not end a training run over a picture
                kind = type(logger).__name__
                if kind not in self._warned:
                    self._warned.add(kind)
                    rank_zero_warn(f"PredictionGallery: {kind} did not take the image ({err!r}); the PNG is saved")


def _images_of(batch: Any) -> Tensor | None:
    if isinstance(batch, Tensor):
        return batch
    if isinstance(batch, dict):
        image = batch.get("image")
        return image if isinstance(image, Tensor) else None
    if isinstance(batch, (list, tuple)) and batch and isinstance(batch[0], Tensor):
        return batch[0]
    return None
