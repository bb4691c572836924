"""Data modules: digits splits and normalisation, CIFAR/ImageFolder layouts and their error messages."""

import numpy as np
import pytest
import torch

from zoo.data import CIFAR100DataModule, DigitsDataModule, ImageFolderDataModule


def test_digits_split_is_stratified_disjoint_and_seeded():
    dm = DigitsDataModule(image_size=8, val_fraction=0.2, test_fraction=0.2, split_seed=3)
    splits = dm._split()
    sizes = {k: len(v[1]) for k, v in splits.items()}
    assert sum(sizes.values()) == 1797 and sizes["test"] == 360 and sizes["val"] == 360
    for _, labels in splits.values():
        counts = np.bincount(labels.numpy(), minlength=10)
        share = counts / counts.sum()
        assert share.min() > 0.08 and share.max() < 0.12  # every class, in about its share (~10%)
    # same seed, same split; another seed, another split
    again = DigitsDataModule(image_size=8, split_seed=3)._split()
    assert torch.equal(again["test"][0], splits["test"][0])
    other = DigitsDataModule(image_size=8, split_seed=4)._split()
    assert not torch.equal(other["test"][0], splits["test"][0])
    # no image is in two splits
    flat = {k: {tuple(img.flatten().tolist()) for img in v[0]} for k, v in splits.items()}
    assert len(flat["train"] & flat["test"]) < 15  # sklearn's digits hold a few exact duplicates


def test_digits_normalisation_shapes_and_augmentation():
    dm = DigitsDataModule(image_size=16, channels=3, shift=2)
    dm.setup()
    assert dm.num_classes == 10 and dm.in_chans == 3 and len(dm.mean) == 3
    x = dm.train_set.images
    assert x.shape[1:] == (3, 16, 16)
    assert abs(float(x.mean())) < 1e-4 and abs(float(x.std()) - 1) < 1e-3
    torch.manual_seed(0)
    shifted = [dm.train_set[0][0] for _ in range(8)]
    assert any(not torch.equal(shifted[0], s) for s in shifted[1:])  # train images move
    assert torch.equal(dm.val_set[0][0], dm.val_set[0][0])  # evaluation images do not
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (64, 3, 16, 16) and y.dtype == torch.int64


def test_digits_rejects_bad_options():
    with pytest.raises(ValueError, match="image_size"):
        DigitsDataModule(image_size=4)
    with pytest.raises(ValueError, match="val_fraction"):
        DigitsDataModule(val_fraction=0.6, test_fraction=0.5)


def test_missing_cifar_names_where_it_looked(tmp_path):
    dm = CIFAR100DataModule(root=str(tmp_path / "nowhere"))
    assert dm.num_classes == 100 and dm.in_chans == 3 and len(dm.mean) == 3
    with pytest.raises(FileNotFoundError, match="cifar-100-python") as err:
        dm.setup("fit")
    assert "download: true" in str(err.value)


def test_imagefolder_reads_the_imagenet_layout(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for cls in ("cat", "dog", "fox"):
            folder = tmp_path / split / cls
            folder.mkdir(parents=True)
            for i in range(2):
                Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    dm = ImageFolderDataModule(root=str(tmp_path), image_size=32, resize_size=36, batch_size=4, num_workers=0)
    assert dm.num_classes == 3
    dm.setup("fit")
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (4, 3, 32, 32)
    xv, _ = next(iter(dm.val_dataloader()))
    assert xv.shape[1:] == (3, 32, 32)
    wrong = ImageFolderDataModule(root=str(tmp_path), num_classes=1000)
    with pytest.raises(ValueError, match="num_classes is 1000"):
        wrong.setup("fit")


def test_missing_imagefolder_fails_with_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothere"):
        ImageFolderDataModule(root=str(tmp_path / "nothere")).num_classes


def test_digits_train_fraction_keeps_val_and_test():
    full = DigitsDataModule(image_size=8)._split()
    part = DigitsDataModule(image_size=8, train_fraction=0.25)._split()
    assert len(part["train"][1]) == round(0.25 * len(full["train"][1]))
    assert torch.equal(part["val"][0], full["val"][0]) and torch.equal(part["test"][0], full["test"][0])
    assert set(part["train"][1].tolist()) == set(range(10))
    with pytest.raises(ValueError, match="train_fraction"):
        DigitsDataModule(train_fraction=0.0)


def test_digits_long_tailed_training_split():
    part = DigitsDataModule(image_size=8, imbalance_ratio=10)._split()
    counts = np.bincount(part["train"][1].numpy(), minlength=10)
    assert counts[0] / counts[9] == pytest.approx(10, rel=0.15)
    assert all(counts[i] >= counts[i + 1] for i in range(9))
    assert np.bincount(part["test"][1].numpy(), minlength=10).min() >= 35  # test stays balanced
    with pytest.raises(ValueError, match="imbalance_ratio"):
        DigitsDataModule(imbalance_ratio=0.5)


def test_drop_last_option_of_the_training_loader():
    from zoo.data import DigitsDataModule

    for drop_last, steps in ((True, 8), (False, 9)):
        dm = DigitsDataModule(image_size=8, augment=False, batch_size=128, drop_last=drop_last)
        dm.setup("fit")
        assert len(dm.train_set) == 1077 and len(dm.train_dataloader()) == steps
        assert dm.drops_partial_batch is drop_last  # 1077 = 8 × 128 + 53
        assert len(dm.val_dataloader()) == 2  # evaluation never drops: 360 images at eval batch 256
