"""ImageFolder (and CIFAR) augmentation options by timm's names, the eval resize, grayscale, cache replay, errors,
the test split and the DataLoader defaults."""

from __future__ import annotations

import random
import warnings

import numpy as np
import pytest
import torch

from zoo.data import CIFAR100DataModule, ImageFolderDataModule
from zoo.data.base import default_num_workers, default_pin_memory
from zoo.data.transforms import ClassificationAugmentation, PadCropFlip, ResizedCropFlip


def write_folder(root, splits=("train", "val"), classes=("a", "b", "c"), n=2, size=(28, 28), mode="RGB", seed=0):
    from PIL import Image

    rng = np.random.default_rng(seed)
    shape = (*size, 3) if mode == "RGB" else size
    for split in splits:
        for c in classes:
            (root / split / c).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8), mode).save(root / split / c / f"{i}.png")
    return root


def column_image(x: int = 2, size: int = 28):
    """A black 28×28 grayscale image with one white column at ``x``: where it lands tells whether a view flipped."""
    from PIL import Image

    pixels = np.zeros((size, size), dtype=np.uint8)
    pixels[:, x] = 255
    return Image.fromarray(pixels, "L")


def ops(transform) -> list[str]:
    return [repr(t) for t in transform.transforms]


# ----------------------------------------------------------------------------------------------- the pipeline
def test_defaults_are_the_imagenet_recipe_of_before():
    """RandomResizedCrop(224, 0.08–1, 3/4–4/3, bilinear) + hflip 0.5 for training; Resize(256) + CenterCrop(224)."""
    dm = ImageFolderDataModule()
    crop, flip, to_tensor, norm = dm.transforms(train=True).transforms
    assert type(crop).__name__ == "RandomResizedCropAndInterpolation"
    assert crop.size == (224, 224) and crop.scale == (0.08, 1.0) and crop.ratio == (3 / 4, 4 / 3)
    assert type(flip).__name__ == "RandomHorizontalFlip" and flip.p == 0.5
    assert norm.mean.tolist() == pytest.approx([0.485, 0.456, 0.406])
    resize, centre = dm.transforms(train=False).transforms[:2]
    assert resize.size == 256 and centre.size == (224, 224)
    assert dm.resize_size == 256 and dm.crop_pct == 0.875 and dm.in_chans == 3


@pytest.mark.parametrize(
    "option",
    [
        {"scale": (0.35, 1.0)},
        {"ratio": (0.9, 1.1)},
        {"hflip": 0.0},
        {"hflip": 0.2},
        {"vflip": 0.5},
        {"color_jitter": 0.4},
        {"color_jitter": [0.1, 0.2, 0.3, 0.05]},
        {"auto_augment": "rand-m9-mstd0.5-inc1"},
        {"auto_augment": "augmix-m5-w3"},
        {"re_prob": 0.25},
        {"interpolation": "bicubic"},
    ],
    ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()),
)
def test_each_option_gives_the_pipeline_timm_builds(option):
    from timm.data import create_transform

    dm = ImageFolderDataModule(image_size=64, **option)
    timm_option = {k: tuple(v) if isinstance(v, list) else v for k, v in option.items()}
    expected = create_transform(64, is_training=True, **{"color_jitter": None, **timm_option})
    assert ops(dm.transforms(train=True)) == ops(expected)
    assert ops(dm.transforms(train=True)) != ops(ImageFolderDataModule(image_size=64).transforms(train=True))


def test_simple_preset_pads_crops_and_never_flips_unless_asked():
    dm = ImageFolderDataModule(image_size=28, augmentation="simple")
    names = [type(t).__name__ for t in dm.transforms(train=True).transforms]
    assert names == ["Resize", "CenterCrop", "RandomCrop", "MaybeToTensor", "Normalize"]
    assert dm.transforms(train=True).transforms[2].padding == 4  # image_size / 8
    torch.manual_seed(0)
    random.seed(0)  # timm's RandomResizedCrop draws from Python's generator
    image = column_image(x=2)
    simple, flipping, imagenet = (
        ImageFolderDataModule(image_size=28, in_chans=1, **kw).transforms(train=True)
        for kw in ({"augmentation": "simple"}, {"augmentation": "simple", "hflip": 0.5}, {})
    )

    def column(t) -> int:
        x = t(image)[0]
        return int(x.max(0).values.argmax())

    simple_cols = {column(simple) for _ in range(60)}
    assert max(simple_cols) <= 6 and len(simple_cols) > 3  # shifted by up to 4 px, never mirrored to x ≈ 25
    assert max(column(flipping) for _ in range(60)) >= 21
    assert max(column(imagenet) for _ in range(60)) >= 14  # the stock recipe mirrors digits


def test_simple_preset_takes_timm_colour_and_erasing_options_and_pad():
    dm = ImageFolderDataModule(image_size=32, augmentation="simple", pad=2, color_jitter=0.3, re_prob=0.5, vflip=0.5)
    names = [type(t).__name__ for t in dm.transforms(train=True).transforms]
    assert names == ["Resize", "CenterCrop", "RandomCrop", "RandomVerticalFlip", "ColorJitter", "MaybeToTensor",
                     "Normalize", "RandomErasing"]
    assert dm.transforms(train=True).transforms[2].padding == 2


def test_none_preset_is_timm_no_aug():
    from timm.data.transforms_factory import transforms_noaug_train

    dm = ImageFolderDataModule(image_size=40, augmentation="none")
    assert ops(dm.transforms(train=True)) == ops(transforms_noaug_train(40))
    assert dm.crop_pct == 1.0 and dm.resize_size == 40


# ----------------------------------------------------------------------------------------------- eval resize
@pytest.mark.parametrize(
    ("kwargs", "resize"),
    [
        ({"image_size": 224}, 256),
        ({"image_size": 28}, 32),  # the trap of issue 21: image_size alone used to keep resize 256
        ({"image_size": 28, "augmentation": "simple"}, 28),
        ({"image_size": 32, "crop_pct": 0.9}, 35),
        ({"image_size": 288, "crop_pct": 1.0}, 288),
        ({"image_size": 28, "resize_size": 33}, 33),
    ],
)
def test_eval_resize_follows_crop_pct_as_timm(kwargs, resize):
    from timm.data.transforms_factory import transforms_imagenet_eval

    dm = ImageFolderDataModule(**kwargs)
    built = dm.transforms(train=False).transforms[0]
    assert dm.resize_size == resize and built.size == resize
    expected = transforms_imagenet_eval(dm.image_size, crop_pct=dm.crop_pct).transforms[0].size
    assert expected == resize


def test_an_explicit_resize_size_is_kept_exactly():
    for image_size in range(8, 300, 13):
        for resize in (image_size, image_size + 1, 2 * image_size + 3, 7 * image_size // 3):
            dm = ImageFolderDataModule(image_size=image_size, resize_size=resize)
            assert dm.transforms(train=False).transforms[0].size == resize


def test_small_images_are_evaluated_whole(tmp_path):
    """A 28-px image at image_size 28: simple evaluates all of it; imagenet the central 28 of a 32-px resize."""
    whole = ImageFolderDataModule(image_size=28, in_chans=1, augmentation="simple").transforms(train=False)
    assert int(whole(column_image(x=1))[0].max(0).values.argmax()) == 1
    stock = ImageFolderDataModule(image_size=28, in_chans=1).transforms(train=False)(column_image(x=6))
    # the column, resized to x ≈ 7 of 32 and cropped by 2, is still in view (a 28-px patch of a 256-px upscale
    # showed only the blank middle)
    assert stock.shape == (1, 28, 28) and int(stock[0].max(0).values.argmax()) in (4, 5, 6)


# ----------------------------------------------------------------------------------------------- grayscale
def test_grayscale_gives_one_channel_tensors_from_rgb_files(tmp_path):
    from PIL import Image

    write_folder(tmp_path, mode="RGB")
    dm = ImageFolderDataModule(root=str(tmp_path), image_size=28, in_chans=1, augmentation="simple", batch_size=4,
                               num_workers=0)
    assert dm.in_chans == 1 and dm.mean == pytest.approx((0.449,)) and dm.std == pytest.approx((0.226,))
    dm.setup("fit")
    x, _ = next(iter(dm.train_dataloader()))
    assert x.shape == (4, 1, 28, 28)
    path, _ = dm.val_set.samples[0]
    expected = (np.asarray(Image.open(path).convert("L"), dtype=np.float32) / 255 - 0.449) / 0.226
    np.testing.assert_allclose(dm.val_set[0][0][0].numpy(), expected, atol=1e-5)
    rgb = ImageFolderDataModule(root=str(tmp_path), image_size=28, num_workers=0)
    rgb.setup("fit")
    assert rgb.val_set[0][0].shape == (3, 28, 28)


def test_grayscale_files_read_as_rgb_and_one_value_statistics_repeat(tmp_path):
    write_folder(tmp_path, mode="L")
    dm = ImageFolderDataModule(root=str(tmp_path), image_size=28, mean=[0.5], std=[0.25], num_workers=0)
    assert dm.mean == (0.5, 0.5, 0.5) and dm.std == (0.25, 0.25, 0.25)
    dm.setup("fit")
    assert dm.val_set[0][0].shape == (3, 28, 28)


def test_grayscale_with_timm_auto_augment_runs():
    random.seed(0)
    t = ImageFolderDataModule(image_size=28, in_chans=1, augmentation="simple",
                              auto_augment="rand-m9-mstd0.5").transforms(train=True)
    image = column_image()
    assert all(t(image).shape == (1, 28, 28) for _ in range(50))


# ----------------------------------------------------------------------------------------------- cache replay
def test_simple_preset_replays_as_pad_crop_on_the_fitted_tensor(tmp_path):
    import torchvision.transforms.functional as TF

    write_folder(tmp_path, mode="L", size=(30, 36))
    dm = ImageFolderDataModule(root=str(tmp_path), image_size=28, in_chans=1, augmentation="simple", num_workers=0)
    source, augment, to_tensor = dm.replay_source()
    assert isinstance(augment, PadCropFlip) and to_tensor is None
    assert augment.spec() == {"name": "pad_crop_flip", "pad": 4, "flip": False, "fill": [round(-0.449 / 0.226, 6)]}
    # a stored draw rebuilds what the online pipeline makes with the same offsets: pad the fitted image with black
    raw = TF.center_crop(TF.resize(source.loader(source.samples[0][0]), 28), 28)
    for params in augment.sample(10, torch.Generator().manual_seed(0)):
        dy, dx, _ = (int(v) for v in params)
        online = TF.crop(TF.pad(raw, [4], fill=0), dy, dx, 28, 28)
        expected = (TF.to_tensor(online) - 0.449) / 0.226
        torch.testing.assert_close(augment.apply(source[0][0], params), expected, atol=1e-5, rtol=0)
    flipping = ImageFolderDataModule(root=str(tmp_path), image_size=28, augmentation="simple", hflip=0.5)
    assert flipping.replay_source()[1].flip is True


def test_imagenet_preset_replays_as_resized_crop_with_its_options(tmp_path):
    write_folder(tmp_path)
    dm = ImageFolderDataModule(root=str(tmp_path), image_size=16, scale=(0.3, 1.0), num_workers=0)
    source, augment, to_tensor = dm.replay_source()
    assert isinstance(augment, ResizedCropFlip) and augment.scale == (0.3, 1.0) and augment.flip
    assert to_tensor(augment.apply(source[0][0], augment.sample(1, torch.Generator())[0])).shape == (3, 16, 16)
    unflipped = ImageFolderDataModule(root=str(tmp_path), image_size=16, hflip=0.0, interpolation="bicubic")
    augment = unflipped.replay_source()[1]
    assert (augment.sample(50, torch.Generator().manual_seed(0))[:, 4] == 0).all()
    assert augment.spec()["flip"] is False and augment.spec()["interpolation"] == "bicubic"


def test_resized_crop_flip_keeps_its_earlier_fingerprint_and_draws():
    """Caches built before the flip/interpolation options existed stay valid: same spec, same parameter stream."""
    aug = ResizedCropFlip(16)
    assert aug.spec() == {"name": "resized_crop_flip", "size": 16, "scale": [0.08, 1.0], "ratio": [3 / 4, 4 / 3]}
    g = torch.Generator().manual_seed(3)
    rows = aug.sample(4, g)
    g = torch.Generator().manual_seed(3)
    for row in rows:  # the earlier sampler: a box, then one randint for the flip, per row
        box = aug._box(g)
        assert row.tolist() == pytest.approx([*box, float(torch.randint(0, 2, (1,), generator=g))])


@pytest.mark.parametrize(
    ("option", "named"),
    [
        ({"color_jitter": 0.4}, "color_jitter=0.4"),
        ({"auto_augment": "rand-m9-mstd0.5"}, "auto_augment='rand-m9-mstd0.5'"),
        ({"re_prob": 0.25}, "re_prob=0.25"),
        ({"vflip": 0.5}, "vflip=0.5"),
        ({"hflip": 0.3}, "hflip=0.3"),
    ],
)
def test_the_cache_is_refused_naming_the_option_it_cannot_replay(option, named, tmp_path):
    for preset in ("imagenet", "simple"):
        dm = ImageFolderDataModule(root=str(tmp_path / "absent"), image_size=28, augmentation=preset, **option)
        with pytest.raises(ValueError, match=f"cannot replay {named}") as err:
            dm.replay_source()
        assert "\n" not in str(err.value)
    cifar = CIFAR100DataModule(root=str(tmp_path / "absent"), **option)
    with pytest.raises(ValueError, match=f"CIFAR100DataModule: cached soft labels cannot replay {named}"):
        cifar.replay_source()


def test_cached_soft_labels_through_the_method_refuse_by_name(tmp_path):
    from zoo.soft_labels import SoftLabels, prepare_soft_labels

    write_folder(tmp_path)
    dm = ImageFolderDataModule(root=str(tmp_path), image_size=16, color_jitter=0.2, num_workers=0)
    teacher = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.LazyLinear(3))
    with pytest.raises(ValueError, match="cannot replay color_jitter=0.2"):
        prepare_soft_labels(SoftLabels(path=str(tmp_path / "cache")), teacher, dm, None, num_classes=3,
                            temperature=4.0, owner="KD")


# ----------------------------------------------------------------------------------------------- CIFAR
def test_cifar_default_pipeline_is_unchanged_and_takes_timm_options():
    dm = CIFAR100DataModule()
    crop, flip, _, norm = dm.transforms(train=True).transforms
    assert type(crop).__name__ == "RandomCrop" and crop.size == (32, 32) and crop.padding == 4
    assert type(flip).__name__ == "RandomHorizontalFlip" and flip.p == 0.5
    assert norm.mean.tolist() == pytest.approx([0.5071, 0.4867, 0.4408])
    assert dm.val_split == "test" and dm.test_split == "test"
    replay = dm.augmentation.replay_augment(32, fill=[0.0, 0.0, 0.0])
    assert replay.spec() == PadCropFlip(4, flip=True, fill=[0.0, 0.0, 0.0]).spec()
    names = [type(t).__name__ for t in CIFAR100DataModule(auto_augment="rand-m9-mstd0.5", re_prob=0.25,
                                                          hflip=0.0).transforms(train=True).transforms]
    assert names == ["RandomCrop", "RandAugment", "MaybeToTensor", "Normalize", "RandomErasing"]
    raw = CIFAR100DataModule(augment=False, normalize=False).transforms(train=True)
    assert [type(t).__name__ for t in raw.transforms] == ["MaybeToTensor"]
    with pytest.raises(ValueError, match=r"CIFAR100DataModule.color_jitter=0.4 is training augmentation; it needs "
                                         "augment: true"):
        CIFAR100DataModule(augment=False, color_jitter=0.4)


# ----------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"image_size": 28, "resize_size": 24}, r"resize_size \(24\) is smaller than image_size \(28\)"),
        ({"resize_size": 256, "crop_pct": 0.9}, "give resize_size .256. or crop_pct .0.9., not both"),
        ({"crop_pct": 1.5}, r"crop_pct must be in \(0, 1\]"),
        ({"augmentation": "simple", "scale": (0.5, 1.0)}, "scale applies to augmentation: imagenet only"),
        ({"ratio": (0.5, 2.0), "augmentation": "none"}, "ratio applies to augmentation: imagenet only"),
        ({"pad": 2}, "pad applies to augmentation: simple only"),
        ({"augmentation": "none", "color_jitter": 0.4}, "color_jitter=0.4 asks for random augmentation"),
        ({"augmentation": "cifar"}, "augmentation must be one of imagenet, simple, none"),
        ({"hflip": 1.5}, r"hflip is a probability in \[0, 1\]"),
        ({"scale": (0.5, 0.2)}, "scale must be"),
        ({"auto_augment": "rand-x9"}, "auto_augment='rand-x9' is not a timm policy"),
        ({"in_chans": 4}, "in_chans must be 1 .grayscale. or 3"),
        ({"in_chans": 1, "mean": [0.1, 0.2, 0.3]}, "mean has 3 values but in_chans is 1"),
        ({"interpolation": "cubic"}, "interpolation must be one of"),
    ],
)
def test_bad_options_fail_at_once_in_one_line(kwargs, message):
    with pytest.raises(ValueError, match=message) as err:
        ImageFolderDataModule(**kwargs)
    assert str(err.value).startswith("ImageFolderDataModule") and "\n" not in str(err.value)


def test_a_missing_root_names_it(tmp_path):
    dm = ImageFolderDataModule(root=str(tmp_path / "nothere"))
    with pytest.raises(FileNotFoundError, match=r"the data root .*nothere does not exist \(data.init_args.root="):
        dm.num_classes


def test_a_missing_split_names_the_split_where_it_looked_and_what_is_there(tmp_path):
    (tmp_path / "training" / "a").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=r"no train split: looked for .*/train \(data.init_args.train_dir="
                                                r"'train'\); it holds the folders \['training'\]"):
        ImageFolderDataModule(root=str(tmp_path)).num_classes
    write_folder(tmp_path, splits=("train",))
    with pytest.raises(FileNotFoundError, match=r"no val split: looked for .*/val \(data.init_args.val_dir='val'\)"):
        ImageFolderDataModule(root=str(tmp_path), num_workers=0).setup("fit")
    write_folder(tmp_path, splits=("val",))
    with pytest.raises(FileNotFoundError, match=r"no test split: looked for .*/holdout"):
        ImageFolderDataModule(root=str(tmp_path), test_dir="holdout", num_workers=0).setup("fit")


def test_images_without_class_folders_are_refused(tmp_path):
    from PIL import Image

    (tmp_path / "train").mkdir()
    (tmp_path / "train" / ".ipynb_checkpoints").mkdir()
    Image.new("L", (8, 8)).save(tmp_path / "train" / "0.png")
    with pytest.raises(FileNotFoundError, match=r"no class folders in .*train \(1 files directly inside\)"):
        ImageFolderDataModule(root=str(tmp_path)).num_classes


def test_a_class_folder_without_images_is_named(tmp_path):
    write_folder(tmp_path)
    (tmp_path / "train" / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="Found no valid file for the classes empty"):
        ImageFolderDataModule(root=str(tmp_path), num_workers=0).setup("fit")


def test_val_uses_the_training_class_indices(tmp_path):
    write_folder(tmp_path, splits=("train",), classes=("a", "b", "c"))
    write_folder(tmp_path, splits=("val",), classes=("b", "c"))  # no "a": torchvision alone would call "b" 0
    dm = ImageFolderDataModule(root=str(tmp_path), image_size=16, num_workers=0)
    dm.setup("fit")
    assert sorted(set(dm.val_set.targets)) == [1, 2] and dm.val_set.class_to_idx == dm.train_set.class_to_idx
    write_folder(tmp_path, splits=("val",), classes=("zebra",))
    with pytest.raises(ValueError, match=r"holds class folders that 'train' does not: \['zebra'\]"):
        ImageFolderDataModule(root=str(tmp_path), image_size=16, num_workers=0).setup("fit")


def test_the_test_split_is_visible(tmp_path):
    write_folder(tmp_path, splits=("train", "val", "test"), n=1)
    write_folder(tmp_path, splits=("test",), n=3, seed=1)
    default = ImageFolderDataModule(root=str(tmp_path), image_size=16, num_workers=0)
    default.setup("fit")
    assert default.test_split == "val" and default.val_split == "val" and default.test_set is default.val_set
    separate = ImageFolderDataModule(root=str(tmp_path), image_size=16, test_dir="test", num_workers=0)
    separate.setup("fit")
    assert separate.test_split == "test" and len(separate.test_set) == 9 and len(separate.val_set) == 3


# ----------------------------------------------------------------------------------------------- loader defaults
@pytest.mark.parametrize(("cpus", "workers"), [(1, 0), (2, 0), (3, 2), (4, 3), (9, 8), (64, 8)])
def test_num_workers_default_follows_the_machine_without_lightning_warnings(cpus, workers, monkeypatch):
    import lightning.fabric.utilities.data as fabric_data
    from lightning.pytorch.trainer.connectors.data_connector import _worker_check
    from torch.utils.data import DataLoader

    monkeypatch.setattr(fabric_data, "_num_cpus_available", lambda: cpus)
    assert default_num_workers() == workers
    assert ImageFolderDataModule().num_workers == workers and CIFAR100DataModule().num_workers == workers
    assert ImageFolderDataModule(num_workers=5).num_workers == 5

    class OneDevice:
        num_devices, reload_dataloaders_every_n_epochs = 1, 0

    with warnings.catch_warnings():  # torch's own check compares with this machine's cores, not the patched count
        warnings.simplefilter("ignore")
        loader = DataLoader(list(range(4)), num_workers=workers, persistent_workers=workers > 0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _worker_check(OneDevice(), loader, "train_dataloader")


@pytest.mark.parametrize("cuda", [True, False])
def test_pin_memory_default_follows_cuda(cuda, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    assert default_pin_memory() is cuda
    assert ImageFolderDataModule().pin_memory is cuda and CIFAR100DataModule().pin_memory is cuda
    assert ImageFolderDataModule(pin_memory=False).pin_memory is False


def test_augmentation_repr_names_its_options():
    assert "pad=None" in repr(ClassificationAugmentation("simple"))
    assert "scale=(0.08, 1.0)" in repr(ClassificationAugmentation("imagenet"))
