"""Metrics that torchmetrics does not offer in the form the tables report."""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric

__all__ = ["SegmentationMetrics"]


class SegmentationMetrics(Metric):
    """mIoU, per-class IoU and pixel accuracy from one confusion matrix, ignoring ``ignore_index`` pixels.

    IoU_k = TP_k / (TP_k + FP_k + FN_k); mIoU is the mean over classes that occur in the predictions or the
    labels of the whole evaluation (a class absent from both is NaN and left out, as mmseg and the VOC/Cityscapes
    scripts do). Pixel accuracy is Σ TP / #labelled pixels. The confusion matrix is a torchmetrics state summed
    across processes, so DDP evaluation gives the global numbers.

    Args:
        num_classes: number of classes.
        ignore_index: label value excluded from every count.
    """

    full_state_update = False
    higher_is_better = True

    def __init__(self, num_classes: int, ignore_index: int | None = 255) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.add_state("confmat", torch.zeros(num_classes, num_classes, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, preds: Tensor, target: Tensor) -> None:
        """``preds``: logits (N, C, H, W) or labels (N, H, W); ``target``: labels (N, H, W)."""
        if preds.ndim == target.ndim + 1:
            preds = preds.argmax(1)
        if preds.shape != target.shape:
            raise ValueError(f"SegmentationMetrics: predictions {tuple(preds.shape)} vs target {tuple(target.shape)}")
        keep = (
            target != self.ignore_index if self.ignore_index is not None else torch.ones_like(target, dtype=torch.bool)
        )
        t, p = target[keep].long(), preds[keep].long()
        if t.numel() and (int(t.max()) >= self.num_classes or int(t.min()) < 0):
            raise ValueError(
                f"SegmentationMetrics: label {int(t.max())} outside [0, {self.num_classes}) and not ignored"
            )
        idx = t * self.num_classes + p
        self.confmat += torch.bincount(idx, minlength=self.num_classes**2).view(self.num_classes, self.num_classes)

    def compute(self) -> dict[str, Tensor]:
        cm = self.confmat.double()
        tp = cm.diagonal()
        union = cm.sum(0) + cm.sum(1) - tp
        iou = torch.where(union > 0, tp / union.clamp_min(1), torch.full_like(tp, float("nan")))
        total = cm.sum()
        return {
            "miou": iou.nanmean().float() if (union > 0).any() else torch.tensor(0.0),
            "pixel_acc": (tp.sum() / total.clamp_min(1)).float(),
            "iou": iou.float(),
        }
