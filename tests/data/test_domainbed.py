"""DomainBedDataModule: the digit domains, leave-one-domain-out splits, per-domain batches, image folders."""

import numpy as np
import pytest
import torch

from zoo.data.domainbed import DIGIT_DOMAINS, DomainBatchSampler, DomainBedDataModule, digit_domain_images


def test_digit_domains_are_transforms_of_the_same_digits():
    images, labels = digit_domain_images(image_size=16, noise_std=0.3)
    clean = images["clean"]
    assert clean.shape == (1797, 1, 16, 16) and labels.shape == (1797,)
    assert torch.equal(images["inverted"], 1 - clean)
    assert torch.equal(images["rotated"], torch.rot90(clean, 1, dims=(2, 3)))
    assert (images["noise"] - clean).std().item() == pytest.approx(0.3, rel=0.01)
    assert not torch.equal(images["rotated"], clean)


def test_default_is_leave_rotated_out_with_disjoint_shared_splits():
    dm = DomainBedDataModule()
    assert dm.train_domains == ["clean", "noise", "inverted"] and dm.test_domains == ["rotated"]
    assert dm.num_classes == 10 and dm.in_chans == 3 and dm.class_names[7] == "seven"
    splits = dm.splits()
    for d in DIGIT_DOMAINS:  # one split of the digits, shared by every domain
        assert all(np.array_equal(splits[d][k], splits["clean"][k]) for k in ("train", "val", "test"))
    train, val, test = (set(splits["clean"][k].tolist()) for k in ("train", "val", "test"))
    assert not (train & val or train & test or val & test) and len(train | val | test) == 1797
    dm.setup("fit")
    assert len(dm.val_set) == 3 * len(val)
    x, y, d = dm.test_set[0]
    assert x.shape == (3, 16, 16) and d == DIGIT_DOMAINS.index("rotated")
    assert len(dm.test_set) == len(test)  # the held-out domain is tested on digits never trained on


def test_training_batches_hold_batch_size_images_of_each_source_domain_in_order():
    dm = DomainBedDataModule(batch_size=8)
    dm.setup("fit")
    loader = dm.train_dataloader()
    assert len(loader) == dm.steps_per_epoch == len(dm.splits()["clean"]["train"]) // 8
    x, y, d = next(iter(loader))
    assert x.shape == (24, 3, 16, 16)
    assert d.tolist() == [0] * 8 + [1] * 8 + [2] * 8


def test_training_images_are_normalised_and_translated_with_the_domain_background():
    dm = DomainBedDataModule(shift=2)
    plain = torch.stack([dm.domain_dataset("clean", "train")[i][0] for i in range(20)])
    assert plain.min() >= -1 and plain.max() <= 1  # mean = std = 0.5
    for domain, background in (("clean", -1.0), ("inverted", 1.0)):
        augment = dm.domain_dataset(domain, "train", train=True).dataset.augment
        image = dm.domain_dataset(domain, "train")[0][0]
        moved = augment.apply(image, torch.tensor([0.0, 0.0, 0.0]))  # shifted down-right by 2 pixels
        assert torch.equal(moved[:, 2:, 2:], image[:, :-2, :-2])
        assert (moved[:, :2] == background).all() and (moved[:, :, :2] == background).all()
    assert dm.domain_dataset("clean", "train", train=False).dataset.augment is None


def test_domain_streams_continue_across_epochs():
    sampler = DomainBatchSampler([6, 10], batch_size=2)
    assert len(sampler) == 3
    torch.manual_seed(0)
    batches = [b for _ in range(5) for b in sampler]  # 15 steps: 30 draws of the second domain
    second = [i - 6 for b in batches for i in b[2:]]
    # an endless stream of permutations: every block of 10 draws covers the 10 images once
    assert all(sorted(second[k : k + 10]) == list(range(10)) for k in (0, 10, 20))
    first = [i for b in batches for i in b[:2]]
    assert all(sorted(first[k : k + 6]) == list(range(6)) for k in range(0, 30, 6))


def test_domain_sampler_is_repeatable_under_a_seed():
    def draw():
        torch.manual_seed(3)
        sampler = DomainBatchSampler([5, 7], batch_size=2)
        return [b for _ in range(2) for b in sampler]

    assert draw() == draw()


def test_errors_name_the_field():
    with pytest.raises(ValueError, match="test_domains"):
        DomainBedDataModule(test_domains=["sketch"])
    with pytest.raises(ValueError, match="nothing is left"):
        DomainBedDataModule(test_domains=list(DIGIT_DOMAINS))
    with pytest.raises(ValueError, match="holdout_fraction"):
        DomainBedDataModule(holdout_fraction=0.9, test_fraction=0.2)
    with pytest.raises(ValueError, match="fewer than batch_size"):
        DomainBatchSampler([3, 10], batch_size=4)


def _fake_domainbed(root, domains=("art", "photo", "sketch"), classes=("dog", "ice_cream"), n=5):
    from PIL import Image

    for di, domain in enumerate(domains):
        for ci, name in enumerate(classes):
            folder = root / domain / name
            folder.mkdir(parents=True)
            for i in range(n):
                Image.new("RGB", (12, 10), color=(40 * di, 100 * ci, 10 * i)).save(folder / f"{i}.png")


def test_image_folders_in_domainbed_layout(tmp_path):
    _fake_domainbed(tmp_path / "TOY")
    with pytest.raises(ValueError, match="test_domains: name the held-out"):
        DomainBedDataModule(root=str(tmp_path / "TOY"))
    dm = DomainBedDataModule(root=str(tmp_path / "TOY"), test_domains=["sketch"], image_size=8, batch_size=2)
    assert dm.name == "toy" and dm.domains == ["art", "photo", "sketch"] and dm.class_names == ["dog", "ice_cream"]
    assert dm.num_classes == 2 and dm.mean == (0.485, 0.456, 0.406)
    dm.setup("fit")
    assert len(dm.val_set) == 2 * 2 and len(dm.test_set) == 10  # val: int(10 × 0.2) per source; test: all
    x, y, d = next(iter(dm.train_dataloader()))
    assert x.shape == (4, 3, 8, 8) and d.tolist() == [0, 0, 1, 1]
    with pytest.raises(ValueError, match="test_fraction is 0"):
        dm.eval_dataloader(dm.train_domains, "test")


def test_image_folders_must_share_classes(tmp_path):
    _fake_domainbed(tmp_path / "A", domains=("one",), classes=("cat", "dog"))
    _fake_domainbed(tmp_path / "B", domains=("two",), classes=("cat", "cow"))
    (tmp_path / "A" / "two").symlink_to(tmp_path / "B" / "two")
    dm = DomainBedDataModule(root=str(tmp_path / "A"), test_domains=["two"], image_size=8, batch_size=1)
    with pytest.raises(ValueError, match="same class folders"):
        dm.setup("fit")
