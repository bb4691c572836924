"""Golden values and properties of BinaryKLNormLoss and BinaryKLLoss (float64 references from the definitions)."""

import math

import pytest
import torch

from zoo.losses import BinaryKLLoss, BinaryKLNormLoss


def bern_kl(p, q):
    """KL(Bern(p) ‖ Bern(q)), from the definition."""
    return p * math.log(p / q) + (1 - p) * math.log((1 - p) / (1 - q))


def sigmoid(x):
    return 1 / (1 + math.exp(-x))


def bkln_reference(zs, zt, t):
    """(T²/B)·Σ_i Σ_c KL(Bern(½) ‖ Bern(σ((z^s − z^t)/T))), in Python floats."""
    total = sum(bern_kl(0.5, sigmoid((a - b) / t)) for rs, rt in zip(zs.tolist(), zt.tolist()) for a, b in zip(rs, rt))
    return t * t * total / len(zs)


def bkl_reference(zs, zt, t):
    """(T²/B)·Σ_i Σ_c KL(Bern(σ(z^t/T)) ‖ Bern(σ(z^s/T)))."""
    total = sum(
        bern_kl(sigmoid(b / t), sigmoid(a / t)) for rs, rt in zip(zs.tolist(), zt.tolist()) for a, b in zip(rs, rt)
    )
    return t * t * total / len(zs)


def official_sigmoid_form(zs, zt, t, eps=1e-8):
    """The sigmoid/log form with σ clamped to [eps, 1 − eps], as spec §4(b) describes the official code (float64)."""
    s = torch.sigmoid((zs - zt) / t).clamp(eps, 1 - eps)
    per = 0.5 * (math.log(0.5) - torch.log(s)) + 0.5 * (math.log(0.5) - torch.log(1 - s))
    return t * t * per.sum() / zs.shape[0]


@pytest.mark.parametrize("t", [1.0, 2.0, 4.0])
def test_binary_kl_norm_golden(t):
    g = torch.Generator().manual_seed(1)
    zs, zt = torch.randn(6, 7, generator=g) * 3, torch.randn(6, 7, generator=g) * 3
    got = BinaryKLNormLoss(t)(zs, zt)
    assert got.item() == pytest.approx(bkln_reference(zs.double(), zt.double(), t), rel=1e-5)


def test_binary_kl_norm_fixed_numbers():
    # By hand: T = 2, B = 1, C = 1, z^s − z^t = 2 → u = 1: T²·[½·softplus(1) + ½·softplus(−1) − ln 2].
    expected = 4 * (0.5 * math.log1p(math.e) + 0.5 * math.log1p(1 / math.e) - math.log(2))
    got = BinaryKLNormLoss(2.0)(torch.tensor([[3.0]]), torch.tensor([[1.0]]))
    assert got.item() == pytest.approx(expected, rel=1e-6)


def test_binary_kl_norm_zero_iff_equal():
    z = torch.randn(5, 10) * 4
    zs = z.clone().requires_grad_()
    loss = BinaryKLNormLoss()(zs, z)
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(zs.grad, torch.zeros_like(z))
    for i, j in [(0, 0), (3, 7)]:
        other = z.clone()
        other[i, j] += 1e-2
        assert BinaryKLNormLoss()(other, z).item() > 0
        assert BinaryKLNormLoss()(z, other).item() > 0


def test_binary_kl_norm_depends_on_the_difference_only():
    zs, zt, shift = torch.randn(4, 6), torch.randn(4, 6), torch.randn(4, 6) * 5
    a, b = BinaryKLNormLoss()(zs, zt), BinaryKLNormLoss()(zs + shift, zt + shift)
    assert a.item() == pytest.approx(b.item(), rel=1e-5)


@pytest.mark.parametrize("t", [1.0, 2.0])
def test_binary_kl_norm_is_quadratic_near_agreement(t):
    zt = torch.randn(3, 5, dtype=torch.float64)
    d = torch.randn(3, 5, dtype=torch.float64) * 1e-3
    u = d / t
    quadratic = (t * t / 3) * (u * u / 8).sum()
    assert BinaryKLNormLoss(t)(zt + d, zt).item() == pytest.approx(quadratic.item(), rel=1e-4)


@pytest.mark.parametrize("t", [1.0, 2.0, 4.0])
def test_binary_kl_norm_gradient(t):
    g = torch.Generator().manual_seed(2)
    zs = (torch.randn(4, 9, generator=g, dtype=torch.float64) * 5).requires_grad_()
    zt = torch.randn(4, 9, generator=g, dtype=torch.float64) * 5
    BinaryKLNormLoss(t)(zs, zt).backward()
    u = (zs.detach() - zt) / t
    torch.testing.assert_close(zs.grad, (t / 4) * (torch.sigmoid(u) - 0.5), rtol=1e-6, atol=1e-9)


def test_sum_over_classes_divided_by_batch_not_element_mean():
    zs, zt = torch.randn(4, 5), torch.randn(4, 5)
    base = BinaryKLNormLoss()(zs, zt).item()
    # twice the classes (same values): twice the loss; twice the samples (same rows): the same loss
    twice_classes = BinaryKLNormLoss()(torch.cat([zs, zs], 1), torch.cat([zt, zt], 1))
    assert twice_classes.item() == pytest.approx(2 * base, rel=1e-5)
    assert BinaryKLNormLoss()(torch.cat([zs, zs], 0), torch.cat([zt, zt], 0)).item() == pytest.approx(base, rel=1e-5)


def test_binary_kl_norm_agrees_with_the_clamped_sigmoid_form():
    """Value and gradient equal the code's sigmoid form with σ clamped to [1e-8, 1 − 1e-8], far beyond the clamp too."""
    zt = torch.zeros(2, 6, dtype=torch.float64)
    zs = torch.tensor(
        [[-80.0, -40.0, -3.0, 0.5, 30.0, 80.0], [-36.0, -37.5, 1.0, 12.0, 36.0, 37.5]], dtype=torch.float64
    )
    a, b = zs.clone().requires_grad_(), zs.clone().requires_grad_()
    ours, official = BinaryKLNormLoss(2.0)(a, zt), official_sigmoid_form(b, zt, 2.0)
    assert ours.item() == pytest.approx(official.item(), rel=1e-7)
    ours.backward()
    official.backward()
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=1e-12)
    assert a.grad[0, 0] == 0 and a.grad[0, 5] == 0  # |u| = 40 > 18.42: flattened by the clamp, as in the code


def test_binary_kl_norm_is_finite_in_float32_for_large_differences():
    zs = torch.tensor([[60.0, -60.0]], requires_grad=True)
    loss = BinaryKLNormLoss(2.0)(zs, torch.zeros(1, 2))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(zs.grad).all()
    official = official_sigmoid_form(zs.detach().double(), torch.zeros(1, 2).double(), 2.0)
    assert loss.item() == pytest.approx(official.item(), rel=1e-5)


@pytest.mark.parametrize("t", [1.0, 2.0])
def test_binary_kl_golden_and_zero_when_equal(t):
    g = torch.Generator().manual_seed(3)
    zs, zt = torch.randn(5, 8, generator=g) * 3, torch.randn(5, 8, generator=g) * 3
    assert BinaryKLLoss(t)(zs, zt).item() == pytest.approx(bkl_reference(zs.double(), zt.double(), t), rel=1e-5)
    assert BinaryKLLoss(t)(zt, zt).item() == pytest.approx(0.0, abs=1e-6)


def test_binary_kl_is_not_binary_kl_norm():
    # BinaryKL compares σ(z^s/T) with σ(z^t/T); BinaryKL-Norm compares σ((z^s − z^t)/T) with ½.
    zs, zt = torch.randn(4, 6) * 3, torch.randn(4, 6) * 3
    assert abs(BinaryKLLoss()(zs, zt).item() - BinaryKLNormLoss()(zs, zt).item()) > 1e-3


def test_temperature_and_eps_are_checked():
    with pytest.raises(ValueError, match="temperature"):
        BinaryKLNormLoss(0.0)
    with pytest.raises(ValueError, match="temperature"):
        BinaryKLLoss(-1.0)
    with pytest.raises(ValueError, match="eps"):
        BinaryKLNormLoss(eps=0.5)


@pytest.mark.parametrize(("cls", "reference"), [(BinaryKLNormLoss, bkln_reference), (BinaryKLLoss, bkl_reference)])
def test_float64_inputs_give_the_float64_golden_value_and_bfloat16_computes_in_float32(cls, reference):
    g = torch.Generator().manual_seed(7)
    zs = torch.randn(5, 8, generator=g, dtype=torch.float64) * 3
    zt = torch.randn(5, 8, generator=g, dtype=torch.float64) * 3
    got = cls(2.0)(zs, zt)
    assert got.dtype == torch.float64
    assert got.item() == pytest.approx(reference(zs, zt, 2.0), rel=1e-10)
    zs16, zt16 = zs.bfloat16(), zt.bfloat16()
    half = cls(2.0)(zs16, zt16)
    assert half.dtype == torch.float32
    assert torch.equal(half, cls(2.0)(zs16.float(), zt16.float()))
