"""Segmentation data modules on tiny fake trees: layouts, joint transforms, label mappings, lists, error messages."""

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from lightning import seed_everything
from PIL import Image

from zoo.data.segmentation import (
    CITYSCAPES_LABEL_TO_TRAIN_ID,
    ADE20KDataModule,
    CityscapesDataModule,
    SegmentationEvalTransform,
    SegmentationTrainTransform,
    VOCSegmentationDataModule,
)

H, W, CROP = 40, 56, 32
SMALL = {"batch_size": 2, "num_workers": 0, "pin_memory": False, "crop_size": CROP}


def write_image(path: Path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (H, W, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


def write_mask(path: Path, values: list[int], palette: bool = False) -> np.ndarray:
    """A mask of vertical stripes cycling through ``values``; saved as a palette or a greyscale PNG."""
    path.parent.mkdir(parents=True, exist_ok=True)
    mask = np.array(values, np.uint8)[(np.arange(W) // 4) % len(values)][None].repeat(H, 0)
    image = Image.fromarray(mask, mode="L")
    if palette:
        image = image.convert("P")
        image.putpalette(list(np.random.default_rng(0).integers(0, 256, 768)))
    image.save(path)
    return mask


# ----------------------------------------------------------------------------------------------- transforms
def striped(classes: int = 7) -> tuple[torch.Tensor, torch.Tensor]:
    """An image whose red channel is 30 × the class of its column block: the mask is a function of the image."""
    mask = (torch.arange(W) // 8 % classes).repeat(H, 1).to(torch.uint8)
    image = torch.stack([mask * 30, torch.full_like(mask, 7), torch.full_like(mask, 9)])
    return image, mask


def test_train_transform_crops_and_flips_image_and_mask_together():
    image, mask = striped()
    transform = SegmentationTrainTransform(CROP, scale_range=(1.0, 1.0), mean=(0, 0, 0), std=(1, 1, 1))
    flipped = set()
    for _ in range(24):
        x, y = transform(image, mask)
        assert x.shape == (3, CROP, CROP) and x.dtype == torch.float32
        assert y.shape == (CROP, CROP) and y.dtype == torch.int64
        assert torch.equal((x[0] * 255 / 30).round().long(), y)  # still the same function of the image
        flipped.add(bool(y[0, 0] > y[0, -1]))  # classes grow to the right unless flipped
    assert flipped == {True, False}


def test_train_transform_pads_the_mask_with_255_and_the_image_with_the_mean():
    image, mask = striped()
    transform = SegmentationTrainTransform(64, scale_range=(1.0, 1.0), flip_prob=0.0)
    x, y = transform(image, mask)
    assert x.shape == (3, 64, 64) and y.shape == (64, 64)
    assert (y[H:] == 255).all() and (y[:, W:] == 255).all() and (y[:H, :W] != 255).all()
    assert (x[:, H:] == 0).all() and (x[:, :, W:] == 0).all()  # 0 after normalisation: the mean colour
    # scaled by one half the 40×56 image becomes 20×28, smaller than a 32 crop
    x, y = SegmentationTrainTransform(CROP, scale_range=(0.5, 0.5), flip_prob=0.0)(image, mask)
    assert (y[20:] == 255).all() and (y[:, 28:] == 255).all() and (y[:20, :28] != 255).all()


def test_train_transform_scales_masks_without_new_values_and_follows_the_seed():
    image, mask = striped()
    transform = SegmentationTrainTransform(CROP, scale_range=(0.5, 2.0))
    seed_everything(5)
    first = [transform(image, mask) for _ in range(6)]
    assert all(set(y.unique().tolist()) <= set(range(7)) | {255} for _, y in first)
    seed_everything(5)
    again = [transform(image, mask) for _ in range(6)]
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(first, again))


def test_eval_transform_keeps_full_size():
    image, mask = striped()
    x, y = SegmentationEvalTransform()(image, mask)
    assert x.shape == (3, H, W) and y.dtype == torch.int64 and torch.equal(y, mask.long())


# ------------------------------------------------------------------------------------------------------- VOC
VOC_IDS = [f"2007_00000{i}" for i in range(1, 7)]  # 1–2 train, 3–4 val, 1, 2, 5, 6 train_aug


def make_voc(root: Path, nested: bool = True) -> Path:
    voc = root / "VOCdevkit" / "VOC2012" if nested else root
    for n, name in enumerate(VOC_IDS):
        write_image(voc / "JPEGImages" / f"{name}.jpg", n)
        write_mask(voc / "SegmentationClass" / f"{name}.png", [0, n + 1, 255], palette=True)
        write_mask(voc / "SegmentationClassAug" / f"{name}.png", [0, n + 10])
    lists = voc / "ImageSets" / "Segmentation"
    lists.mkdir(parents=True)
    (lists / "train.txt").write_text("\n".join(VOC_IDS[:2]) + "\n")
    (lists / "val.txt").write_text("\n".join(VOC_IDS[2:4]) + "\n")
    # DeepLab's train_aug.txt: image/label pairs with a leading slash
    pairs = [f"/JPEGImages/{i}.jpg /SegmentationClassAug/{i}.png" for i in (VOC_IDS[:2] + VOC_IDS[4:])]
    (lists / "train_aug.txt").write_text("\n".join(pairs) + "\n")
    return voc


def test_voc_finds_files_and_yields_batches(tmp_path):
    make_voc(tmp_path)
    dm = VOCSegmentationDataModule(root=str(tmp_path), **SMALL)
    dm.setup()
    assert (dm.num_classes, dm.in_chans, dm.ignore_index, dm.name) == (21, 3, 255, "voc")
    assert len(dm.class_names) == 21 and len(dm.mean) == len(dm.std) == 3
    assert len(dm.train_set) == 4 and len(dm.val_set) == 2 and dm.test_set is dm.val_set
    assert all("SegmentationClassAug" in s.mask for s in dm.train_set.samples)
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (2, 3, CROP, CROP) and x.dtype == torch.float32
    assert y.shape == (2, CROP, CROP) and y.dtype == torch.int64
    assert set(y.unique().tolist()) <= set(range(21)) | {255}
    x, y = next(iter(dm.val_dataloader()))
    assert x.shape == (1, 3, H, W) and y.shape == (1, H, W)  # full size, one image per batch
    # the palette PNG is read as its indices (class ids), from SegmentationClass whatever the train split
    assert set(y.unique().tolist()) == {0, 3, 255}


def test_voc_train_split_and_root_at_voc2012(tmp_path):
    voc = make_voc(tmp_path)
    dm = VOCSegmentationDataModule(root=str(voc), train_split="train", **SMALL)
    dm.setup()
    assert len(dm.train_set) == 2 and all("SegmentationClass/" in s.mask for s in dm.train_set.samples)
    _, y = dm.train_set[0]
    assert set(y.unique().tolist()) <= {0, 1, 255}
    with pytest.raises(ValueError, match="train_split"):
        VOCSegmentationDataModule(root=str(voc), train_split="aug")


def test_voc_train_aug_list_at_voc2012_root_with_bare_ids(tmp_path):
    voc = make_voc(tmp_path, nested=False)
    (voc / "ImageSets" / "Segmentation" / "train_aug.txt").unlink()
    (voc / "train_aug.txt").write_text("\n".join(VOC_IDS[:3]) + "\n")
    dm = VOCSegmentationDataModule(root=str(tmp_path), **SMALL)
    dm.setup()
    assert len(dm.train_set) == 3 and dm.train_set.samples[2].mask.endswith("SegmentationClassAug/2007_000003.png")


def test_voc_labelled_and_unlabelled_lists_in_both_line_formats(tmp_path):
    make_voc(tmp_path)
    labelled = tmp_path / "labelled.txt"
    labelled.write_text(f"{VOC_IDS[0]}\nJPEGImages/{VOC_IDS[1]}.jpg SegmentationClassAug/{VOC_IDS[1]}.png\n")
    unlabelled = tmp_path / "unlabelled.txt"
    unlabelled.write_text(f"JPEGImages/{VOC_IDS[4]}.jpg SegmentationClassAug/{VOC_IDS[4]}.png\n\n{VOC_IDS[5]}\n")
    dm = VOCSegmentationDataModule(
        root=str(tmp_path), labelled_list=str(labelled), unlabelled_list=str(unlabelled), **SMALL
    )
    dm.setup()
    assert len(dm.train_set) == 2 and len(dm.unlabelled_set) == 2
    _, y = dm.unlabelled_set[0]
    assert y.shape == (CROP, CROP) and (y == 255).all()
    assert isinstance(dm.train_dataloader(), torch.utils.data.DataLoader)  # supervised: labelled images only

    dm = VOCSegmentationDataModule(
        root=str(tmp_path), labelled_list=str(labelled), unlabelled_list=str(unlabelled), semi_supervised=True,
        **SMALL,
    )
    dm.setup("fit")
    assert dm.semi_supervised
    item = next(iter(dm.train_dataloader()))
    batch = item[0] if isinstance(item, tuple) else item
    assert set(batch) == {"labelled", "unlabelled", "unlabelled_mix"}
    assert batch["labelled"][0].shape == (2, 3, CROP, CROP) and (batch["labelled"][1] != 255).any()
    assert batch["unlabelled"][0].shape == (2, 3, CROP, CROP) and (batch["unlabelled"][1] == 255).all()


def test_voc_missing_root_and_missing_list_entry_fail_clearly(tmp_path):
    missing = tmp_path / "nothing"
    with pytest.raises(FileNotFoundError) as error:
        VOCSegmentationDataModule(root=str(missing), **SMALL).setup()
    message = str(error.value)
    assert "VOCSegmentationDataModule.root" in message
    assert str(missing / "VOCdevkit" / "VOC2012" / "JPEGImages") in message and str(missing / "JPEGImages") in message
    assert "SegmentationClassAug" in message  # says how to get the data

    make_voc(tmp_path)
    bad = tmp_path / "labelled.txt"
    bad.write_text(f"{VOC_IDS[0]}\n2007_999999\n")
    with pytest.raises(FileNotFoundError, match=r"labelled_list: .*labelled\.txt line 2 .*2007_999999"):
        VOCSegmentationDataModule(root=str(tmp_path), labelled_list=str(bad), **SMALL).setup()


# ------------------------------------------------------------------------------------------------ Cityscapes
def make_cityscapes(root: Path) -> None:
    frames = {"train": ["aachen_000000_000019", "aachen_000001_000019", "bochum_000000_000313"],
              "val": ["frankfurt_000000_000294"]}  # fmt: skip
    for split, names in frames.items():
        for n, name in enumerate(names):
            city = name.split("_")[0]
            write_image(root / "leftImg8bit" / split / city / f"{name}_leftImg8bit.png", n)
            write_mask(root / "gtFine" / split / city / f"{name}_gtFine_labelIds.png", [0, 7, 26, 8, 33, 9])


def test_cityscapes_maps_label_ids_to_train_ids_and_yields_batches(tmp_path):
    make_cityscapes(tmp_path)
    assert (CITYSCAPES_LABEL_TO_TRAIN_ID[7], CITYSCAPES_LABEL_TO_TRAIN_ID[26]) == (0, 13)
    dm = CityscapesDataModule(root=str(tmp_path), **SMALL)
    assert CityscapesDataModule(root=str(tmp_path)).crop_size == (800, 800)
    dm.setup()
    assert (dm.num_classes, dm.name, len(dm.class_names)) == (19, "cityscapes", 19)
    assert len(dm.train_set) == 3 and len(dm.val_set) == 1
    x, y = dm.val_set[0]
    assert x.shape == (3, H, W)
    # labelIds 0 (unlabeled), 7 (road), 26 (car), 8 (sidewalk), 33 (bicycle), 9 (parking: not a train class)
    assert y[0, ::4][:6].tolist() == [255, 0, 13, 1, 18, 255]
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (2, 3, CROP, CROP) and y.shape == (2, CROP, CROP)
    assert set(y.unique().tolist()) <= {0, 1, 13, 18, 255}


def test_cityscapes_prefers_label_train_ids(tmp_path):
    make_cityscapes(tmp_path)
    folder = tmp_path / "gtFine" / "val" / "frankfurt"
    expected = write_mask(folder / "frankfurt_000000_000294_gtFine_labelTrainIds.png", [4, 5, 255])
    dm = CityscapesDataModule(root=str(tmp_path), **SMALL)
    dm.setup("validate")
    assert torch.equal(dm.val_set[0][1], torch.from_numpy(expected).long())


def test_cityscapes_lists_accept_frame_ids_and_paths(tmp_path):
    make_cityscapes(tmp_path / "cityscapes")  # root may be the folder holding cityscapes/
    labelled = tmp_path / "labelled.txt"
    labelled.write_text(
        "aachen_000000_000019\n"
        "leftImg8bit/train/aachen/aachen_000001_000019_leftImg8bit.png "
        "gtFine/train/aachen/aachen_000001_000019_gtFine_labelIds.png\n"
    )
    unlabelled = tmp_path / "unlabelled.txt"
    unlabelled.write_text("train/bochum/bochum_000000_000313_leftImg8bit.png\n")
    dm = CityscapesDataModule(
        root=str(tmp_path), labelled_list=str(labelled), unlabelled_list=str(unlabelled), **SMALL
    )
    dm.setup()
    assert len(dm.train_set) == 2 and len(dm.unlabelled_set) == 1
    assert all(s.label_table is not None for s in dm.train_set.samples)  # labelIds files are mapped
    assert (dm.unlabelled_set[0][1] == 255).all()

    labelled.write_text("aachen_000000_000019\naachen_000099_000019\n")
    with pytest.raises(FileNotFoundError, match=r"labelled\.txt line 2"):
        CityscapesDataModule(root=str(tmp_path), labelled_list=str(labelled), **SMALL).setup()


def test_cityscapes_missing_root_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "leftImg8bit" / "train"))):
        CityscapesDataModule(root=str(tmp_path), **SMALL).setup()


# ---------------------------------------------------------------------------------------------------- ADE20K
def make_ade(root: Path) -> Path:
    base = root / "ADEChallengeData2016"
    for split, prefix, count in (("training", "ADE_train", 3), ("validation", "ADE_val", 2)):
        for n in range(1, count + 1):
            write_image(base / "images" / split / f"{prefix}_{n:08d}.jpg", n)
            write_mask(base / "annotations" / split / f"{prefix}_{n:08d}.png", [0, 1, 150, 5])
    return base


@pytest.mark.parametrize("at_base", [False, True])
def test_ade20k_reduces_the_zero_label_and_yields_batches(tmp_path, at_base):
    base = make_ade(tmp_path)
    dm = ADE20KDataModule(root=str(base if at_base else tmp_path), **SMALL)
    dm.setup()
    assert (dm.num_classes, dm.name, len(dm.class_names)) == (150, "ade20k", 150)
    assert len(dm.train_set) == 3 and len(dm.val_set) == 2
    _, y = dm.val_set[0]
    assert y[0, ::4][:4].tolist() == [255, 0, 149, 4]  # 0 → ignored, k → k − 1
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (2, 3, CROP, CROP) and set(y.unique().tolist()) <= {0, 4, 149, 255}


def test_ade20k_pads_small_images_with_ignored_pixels(tmp_path):
    make_ade(tmp_path)
    dm = ADE20KDataModule(root=str(tmp_path), **{**SMALL, "crop_size": 64}, scale_range=(1.0, 1.0))
    dm.setup()
    _, y = dm.train_set[0]
    assert y.shape == (64, 64) and (y[H:] == 255).all()
    assert (y[:, W:] == 255).all() or (y[:, : 64 - W] == 255).all()  # padded on the right, or flipped


def test_ade20k_missing_root_names_both_places_looked(tmp_path):
    with pytest.raises(FileNotFoundError) as error:
        ADE20KDataModule(root=str(tmp_path), **SMALL).setup()
    assert str(tmp_path / "ADEChallengeData2016" / "images" / "training") in str(error.value)
    assert str(tmp_path / "images" / "training") in str(error.value)
