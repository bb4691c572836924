"""MEAL V2 losses: soft CE golden value, discriminator widths and label convention."""

import math

import pytest
import torch

from zoo.losses import LogitDiscriminator, MEALV2DiscriminatorLoss, SoftCrossEntropy


def test_soft_cross_entropy_is_kl_plus_target_entropy():
    g = torch.Generator().manual_seed(0)
    zs = torch.randn(5, 7, generator=g)
    members = [torch.randn(5, 7, generator=g) for _ in range(3)]
    p_bar = torch.stack([m.double().softmax(1) for m in members]).mean(0)
    kl = (p_bar * (p_bar.log() - zs.double().log_softmax(1))).sum(1).mean()
    entropy = -(p_bar * p_bar.log()).sum(1).mean()
    got = SoftCrossEntropy()(zs, p_bar.log().float())
    assert got.item() == pytest.approx((kl + entropy).item(), rel=1e-5)


def test_discriminator_widths_and_final_relu():
    d = LogitDiscriminator(1000)
    assert [m.out_features for m in d if isinstance(m, torch.nn.Linear)] == [125, 15, 2]
    assert isinstance(d[-1], torch.nn.ReLU)
    # the default floor (1) only lifts a width of 0: CIFAR-100 keeps the official 100 → 12 → 1 → 2
    widths = {c: [m.out_features for m in LogitDiscriminator(c) if isinstance(m, torch.nn.Linear)] for c in (100, 10)}
    assert widths == {100: [12, 1, 2], 10: [1, 1, 2]}
    small = LogitDiscriminator(10, min_hidden=5)
    assert [m.out_features for m in small if isinstance(m, torch.nn.Linear)] == [5, 5, 2]
    assert (small(torch.randn(8, 10)) >= 0).all()


def test_discriminator_loss_label_convention():
    """Student rows → target [1, 0], teacher rows → [0, 1], mean over the 2B × 2 entries."""

    class Fixed(torch.nn.Module):
        def forward(self, x):
            return torch.tensor([[2.0, -1.0]]).expand(x.shape[0], 2)

    b = 3
    loss = MEALV2DiscriminatorLoss()(Fixed(), torch.randn(b, 4), torch.randn(b, 4))
    softplus = lambda v: math.log1p(math.exp(v))  # noqa: E731
    student = softplus(-2.0) + softplus(-1.0)  # -log σ(2) for target 1, -log(1 − σ(−1)) for target 0
    teacher = softplus(2.0) + softplus(1.0)
    assert loss.item() == pytest.approx((student + teacher) / 4, rel=1e-6)


def test_discriminator_loss_passes_gradient_to_the_student_not_the_teacher():
    d = LogitDiscriminator(10, min_hidden=5)
    zs = torch.randn(4, 10, requires_grad=True)
    zt = torch.randn(4, 10, requires_grad=True)
    MEALV2DiscriminatorLoss()(d, zs * 3, zt).backward()
    assert zt.grad is None
    assert zs.grad is not None
