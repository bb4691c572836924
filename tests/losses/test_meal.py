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
    softplus = lambda v: math.log1p(math.exp(v))
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


def test_soft_cross_entropy_keeps_float64_and_computes_bfloat16_in_float32():
    g = torch.Generator().manual_seed(1)
    zs = torch.randn(5, 7, generator=g, dtype=torch.float64)
    log_p_bar = torch.randn(5, 7, generator=g, dtype=torch.float64).log_softmax(1)
    got = SoftCrossEntropy()(zs, log_p_bar)
    expected = 0.0
    for row_s, row_t in zip(zs.tolist(), log_p_bar.tolist()):
        lse = math.log(sum(math.exp(v) for v in row_s))
        expected -= sum(math.exp(lt) * (v - lse) for v, lt in zip(row_s, row_t))
    assert got.dtype == torch.float64
    assert got.item() == pytest.approx(expected / 5, rel=1e-12)
    zs16, t16 = zs.bfloat16(), log_p_bar.bfloat16()
    half = SoftCrossEntropy()(zs16, t16)
    assert half.dtype == torch.float32
    assert torch.equal(half, SoftCrossEntropy()(zs16.float(), t16.float()))


class _Fixed(torch.nn.Module):
    """A discriminator whose scores are [2, −1] for every row, in the input's dtype."""

    def forward(self, x):
        return torch.tensor([[2.0, -1.0]], dtype=x.dtype).expand(x.shape[0], 2)


def test_discriminator_loss_keeps_float64_and_computes_bfloat16_in_float32():
    softplus = lambda v: math.log1p(math.exp(v))
    expected = (softplus(-2.0) + softplus(-1.0) + softplus(2.0) + softplus(1.0)) / 4
    got = MEALV2DiscriminatorLoss()(_Fixed(), torch.randn(3, 4, dtype=torch.float64), torch.randn(3, 4))
    assert got.dtype == torch.float64
    assert got.item() == pytest.approx(expected, rel=1e-14)
    half = MEALV2DiscriminatorLoss()(_Fixed(), torch.randn(3, 4).bfloat16(), torch.randn(3, 4).bfloat16())
    assert half.dtype == torch.float32
    assert half.item() == pytest.approx(expected, rel=1e-6)
