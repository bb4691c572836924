"""SegmentationMetrics: IoU from the confusion matrix, ignore index, absent classes, torchmetrics agreement."""

import math

import pytest
import torch
from torchmetrics.classification import MulticlassJaccardIndex

from zoo.metrics import SegmentationMetrics


def test_hand_computed_iou_pixel_accuracy_and_ignore():
    target = torch.tensor([[[0, 0, 1, 1], [2, 2, 255, 255]]])
    preds = torch.tensor([[[0, 1, 1, 1], [2, 0, 0, 1]]])  # the two ignored pixels are wrong on purpose
    metric = SegmentationMetrics(4, ignore_index=255)
    metric.update(preds, target)
    out = metric.compute()
    # class 0: TP 1, FP 1 (a 2 predicted 0), FN 1 -> 1/3; class 1: TP 2, FP 1 -> 2/3; class 2: TP 1, FN 1 -> 1/2
    assert torch.allclose(out["iou"][:3], torch.tensor([1 / 3, 2 / 3, 1 / 2]))
    assert math.isnan(out["iou"][3])  # class 3 never occurs: left out of the mean
    assert math.isclose(float(out["miou"]), (1 / 3 + 2 / 3 + 1 / 2) / 3, rel_tol=1e-6)
    assert math.isclose(float(out["pixel_acc"]), 4 / 6, rel_tol=1e-6)


def test_logits_accepted_and_accumulation_equals_one_update():
    torch.manual_seed(0)
    logits = torch.randn(4, 5, 8, 8)
    target = torch.randint(0, 5, (4, 8, 8))
    target[:, 0] = 255
    a, b = SegmentationMetrics(5), SegmentationMetrics(5)
    a.update(logits, target)
    b.update(logits[:2], target[:2])
    b.update(logits[2:], target[2:])
    assert torch.equal(a.confmat, b.confmat)
    reference = MulticlassJaccardIndex(5, average=None, ignore_index=255)(logits.argmax(1), target)
    assert torch.allclose(a.compute()["iou"], reference)


def test_label_outside_the_classes_fails_clearly():
    metric = SegmentationMetrics(3)
    with pytest.raises(ValueError, match="label 7"):
        metric.update(torch.zeros(1, 2, 2, dtype=torch.long), torch.full((1, 2, 2), 7))
