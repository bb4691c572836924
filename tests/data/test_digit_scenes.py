"""Digit scenes: deterministic, disjoint source digits, consistent labels, labelled fraction, ignore index."""

import numpy as np
import pytest
import torch

from zoo.data import DigitScenesDataModule
from zoo.data.digit_scenes import IGNORE_INDEX, make_digit_scenes


def small(**kw):
    args = dict(num_train=32, num_val=8, num_test=8, batch_size=8)
    return DigitScenesDataModule(**{**args, **kw})


def test_deterministic_given_the_seed_and_disjoint_sources():
    a, b, c = small(seed=1), small(seed=1), small(seed=2)
    for dm in (a, b, c):
        dm.setup()
    assert torch.equal(a.train_set.images, b.train_set.images) and torch.equal(a.val_set.masks, b.val_set.masks)
    assert not torch.equal(a.train_set.images, c.train_set.images)
    pools = a.source_indices
    assert not set(pools["train"]) & set(pools["val"]) and not set(pools["train"]) & set(pools["test"])
    assert not set(pools["val"]) & set(pools["test"])


def test_shapes_classes_and_normalisation():
    dm = small()
    dm.setup()
    assert dm.num_classes == 11 and dm.in_chans == 3 and len(dm.mean) == 3
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (8, 3, 64, 64) and y.shape == (8, 64, 64) and y.dtype == torch.int64
    masks = dm.train_set.masks
    assert set(masks.unique().tolist()) <= set(range(11))
    assert ((masks > 0).flatten(1).sum(1) > 0).all()  # every scene shows at least one digit
    images = dm.train_set.images
    assert abs(float(images.mean())) < 1e-4 and abs(float(images.std()) - 1) < 1e-3


def test_labels_follow_the_source_digit_class():
    glyph = np.zeros((1, 8, 8), np.float32)
    glyph[0, 2:6, 3:5] = 1.0
    images, masks = make_digit_scenes(glyph, np.array([3]), 4, np.random.default_rng(0), size=32, ignore_border=True)
    assert set(masks.unique().tolist()) <= {0, 4, IGNORE_INDEX} and (masks == 4).any()
    assert (images[masks.unsqueeze(1) == 4] > 0.25).all()  # labelled pixels are the bright digit pixels
    assert (masks == IGNORE_INDEX).any()  # the bilinear rim is ignored


def test_labelled_fraction_splits_labelled_and_unlabelled_scenes():
    dm = small(labelled_fraction=0.125)
    dm.setup()
    assert int(dm.labelled.sum()) == 4
    assert len(dm.train_set) == 4 and len(dm.unlabelled_set) == 28
    assert (dm.unlabelled_set.masks == IGNORE_INDEX).all() and (dm.train_set.masks != IGNORE_INDEX).any()
    assert (dm.val_set.masks != IGNORE_INDEX).all()  # evaluation keeps all labels
    assert isinstance(dm.train_dataloader(), torch.utils.data.DataLoader)  # supervised: labelled scenes only


def test_semi_supervised_loader_cycles_the_labelled_scenes():
    dm = small(labelled_fraction=0.25, semi_supervised=True, batch_size=4)
    dm.setup()
    loader = dm.train_dataloader()
    batches = list(iter(loader))
    assert len(batches) == 24 // 4  # max(#labelled, #unlabelled) / batch
    batch = batches[0][0] if isinstance(batches[0], tuple) else batches[0]
    assert set(batch) == {"labelled", "unlabelled", "unlabelled_mix"}
    assert (batch["labelled"][1] != IGNORE_INDEX).any() and (batch["unlabelled"][1] == IGNORE_INDEX).all()


def test_semi_supervised_without_unlabelled_images_fails_clearly():
    dm = small(semi_supervised=True)
    dm.setup()
    with pytest.raises(ValueError, match="semi_supervised"):
        dm.train_dataloader()
