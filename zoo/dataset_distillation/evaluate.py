"""The evaluation protocol of trajectory matching: train fresh networks on a (synthetic) set, test on real data.

MTT's ``utils.evaluate_synset``: a fresh, randomly initialised network trains on (S, y) with SGD (momentum 0.9,
weight decay 5e-4) at the *learned* learning rate α, batch 256 shuffled, DSA on every batch. Its loop runs
``epochs + 1`` times (1001 for "1000 epochs"); after pass ``epochs // 2 + 1`` the lr is divided by 10 and the
optimizer is rebuilt, so the momentum restarts (502 passes at α, 499 at α/10). The final network's test accuracy is
reported (no selection on the test set,
unlike AST's code, which returns the best test accuracy seen during training). Soft labels (DATM) are trained with
soft cross-entropy −Σ_k softmax(ℓ)_k log softmax(f(x))_k. The random-real baseline runs the same protocol on random
real images with hard labels and a fixed lr.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from zoo.progress import progress

__all__ = ["EvalResult", "evaluate_synthetic", "soft_cross_entropy", "test_accuracy", "train_on_set"]


def soft_cross_entropy(logits: Tensor, target: Tensor) -> Tensor:
    """CE against hard labels (int64) or against soft labels given as logits (float, softmax taken here)."""
    if target.dtype in (torch.int64, torch.int32):
        return F.cross_entropy(logits, target)
    return -(target.softmax(-1) * logits.log_softmax(-1)).sum(-1).mean()


def train_on_set(
    model: nn.Module,
    images: Tensor,
    labels: Tensor,
    lr: float,
    epochs: int = 300,
    batch_size: int = 256,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    augment: Callable[[Tensor], Tensor] | None = None,
    generator: torch.Generator | None = None,
) -> nn.Module:
    """Trains ``model`` on (images, labels) with MTT's evaluation recipe; returns it in eval mode.

    As ``evaluate_synset``: ``epochs + 1`` passes over the set; after pass ``epochs // 2 + 1`` the lr drops ×0.1 in a
    new optimizer (momentum restarts).
    """
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    decay_after = epochs // 2 + 1
    n = len(images)
    for epoch in range(epochs + 1):
        if epoch == decay_after + 1:
            optimizer = torch.optim.SGD(model.parameters(), lr=lr * 0.1, momentum=momentum, weight_decay=weight_decay)
        order = torch.randperm(n, generator=generator).to(images.device)
        for start in range(0, n, batch_size):
            idx = order[start : start + batch_size]
            x = images[idx]
            if augment is not None:
                x = augment(x)
            loss = soft_cross_entropy(model(x), labels[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return model.eval()


@torch.no_grad()
def test_accuracy(
    model: nn.Module, batches: Iterable[tuple[Tensor, Tensor]], device: torch.device | None = None
) -> float:
    """Top-1 accuracy of ``model`` over (x, y) batches."""
    model.eval()
    correct = total = 0
    for x, y in batches:
        if device is not None:
            x, y = x.to(device), y.to(device)
        correct += int((model(x).argmax(-1) == y).sum())
        total += len(y)
    return correct / max(total, 1)


@dataclass
class EvalResult:
    """Accuracies of the evaluation networks (fractions), with mean and sample std."""

    accuracies: list[float]

    @property
    def mean(self) -> float:
        return statistics.mean(self.accuracies)

    @property
    def std(self) -> float:
        return statistics.stdev(self.accuracies) if len(self.accuracies) > 1 else 0.0


def evaluate_synthetic(
    build: Callable[[], nn.Module],
    images: Tensor,
    labels: Tensor,
    lr: float,
    test_batches: Callable[[], Iterable[tuple[Tensor, Tensor]]],
    num_nets: int = 5,
    seed: int = 0,
    **train_kwargs,
) -> EvalResult:
    """Trains ``num_nets`` fresh networks (``build()`` after seeding ``seed + i``) and tests each on real data.

    The seed fixes each network's initialisation, batch order and augmentation draws; the caller's global RNG state
    is restored afterwards, so evaluating does not change what a distillation run does next.
    """
    images, labels = images.detach(), labels.detach()
    accs = []
    state = torch.random.get_rng_state()
    try:
        for i in progress(range(num_nets), "evaluation networks"):
            torch.manual_seed(seed + i)
            model = build().to(images.device)
            generator = torch.Generator().manual_seed(seed + i)
            train_on_set(model, images, labels, lr, generator=generator, **train_kwargs)
            accs.append(test_accuracy(model, test_batches(), images.device))
    finally:
        torch.random.set_rng_state(state)
    return EvalResult(accs)
