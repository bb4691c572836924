"""Golden values and properties of KDLoss and DKDLoss (float64 references written from the formulas)."""

import math

import pytest
import torch

from zoo.losses import DKDLoss, KDLoss


def kd_reference(zs, zt, t):
    total = 0.0
    for s_row, t_row in zip(zs.tolist(), zt.tolist()):
        ps = [math.exp(v / t) for v in s_row]
        pt = [math.exp(v / t) for v in t_row]
        ps = [v / sum(ps) for v in ps]
        pt = [v / sum(pt) for v in pt]
        total += sum(a * (math.log(a) - math.log(b)) for a, b in zip(pt, ps))
    return t * t * total / len(zs)


def dkd_reference(zs, zt, y, t):
    """(TCKD, NCKD) from the definitions: binary target split, and softmax over the non-target classes only."""
    tckd = nckd = 0.0
    for s_row, t_row, g in zip(zs.tolist(), zt.tolist(), y.tolist()):
        def probs(row):
            e = [math.exp(v / t) for v in row]
            return [v / sum(e) for v in e]

        ps, pt = probs(s_row), probs(t_row)
        bs, bt = [ps[g], 1 - ps[g]], [pt[g], 1 - pt[g]]
        tckd += sum(a * math.log(a / b) for a, b in zip(bt, bs))
        others = [c for c in range(len(s_row)) if c != g]
        qs = [ps[c] / (1 - ps[g]) for c in others]
        qt = [pt[c] / (1 - pt[g]) for c in others]
        nckd += sum(a * math.log(a / b) for a, b in zip(qt, qs))
    n = len(zs)
    return t * t * tckd / n, t * t * nckd / n


@pytest.mark.parametrize("t", [1.0, 4.0])
def test_kd_golden(t):
    g = torch.Generator().manual_seed(1)
    zs, zt = torch.randn(6, 7, generator=g) * 3, torch.randn(6, 7, generator=g) * 3
    got = KDLoss(t)(zs, zt)
    assert got.item() == pytest.approx(kd_reference(zs.double(), zt.double(), t), rel=1e-5)


def test_kd_golden_fixed_numbers():
    # Worked by hand: T=1, one sample, teacher p = (0.5, 0.5), student logits (0, log 3) → p = (0.25, 0.75).
    zs = torch.tensor([[0.0, math.log(3.0)]])
    zt = torch.zeros(1, 2)
    expected = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    assert KDLoss(1.0)(zs, zt).item() == pytest.approx(expected, rel=1e-6)


def test_kd_zero_when_equal_and_positive_otherwise():
    z = torch.randn(5, 10)
    assert KDLoss(4.0)(z, z).item() == pytest.approx(0.0, abs=1e-6)
    assert KDLoss(4.0)(z, z + torch.randn(5, 10)).item() > 0


def test_kd_invariant_to_logit_shift():
    zs, zt = torch.randn(4, 6), torch.randn(4, 6)
    base = KDLoss(2.0)(zs, zt)
    assert KDLoss(2.0)(zs + 3.0, zt - 1.5).item() == pytest.approx(base.item(), rel=1e-5)


@pytest.mark.parametrize("t", [1.0, 4.0])
def test_dkd_golden(t):
    g = torch.Generator().manual_seed(2)
    zs, zt = torch.randn(8, 5, generator=g) * 2, torch.randn(8, 5, generator=g) * 2
    y = torch.randint(0, 5, (8,), generator=g)
    tckd, nckd = DKDLoss(temperature=t).parts(zs, zt, y)
    ref_t, ref_n = dkd_reference(zs.double(), zt.double(), y, t)
    assert tckd.item() == pytest.approx(ref_t, rel=1e-4)
    assert nckd.item() == pytest.approx(ref_n, rel=1e-4)
    loss = DKDLoss(alpha=0.5, beta=3.0, temperature=t)(zs, zt, y)
    assert loss.item() == pytest.approx(0.5 * ref_t + 3.0 * ref_n, rel=1e-4)


def test_dkd_identity_kl_equals_tckd_plus_weighted_nckd():
    """Per sample: KL(p^t‖p^s) = TCKD + (1 − p^t_gt)·NCKD (without the T² factor)."""
    g = torch.Generator().manual_seed(3)
    zs, zt = torch.randn(16, 10, generator=g) * 2, torch.randn(16, 10, generator=g) * 2
    y = torch.randint(0, 10, (16,), generator=g)
    loss = DKDLoss(temperature=1.0)
    for i in range(16):
        s, t, yi = zs[i : i + 1], zt[i : i + 1], y[i : i + 1]
        tckd, nckd = loss.parts(s, t, yi)
        p_gt = t.softmax(1)[0, yi].item()
        kl = KDLoss(1.0)(s, t)
        assert kl.item() == pytest.approx(tckd.item() + (1 - p_gt) * nckd.item(), abs=2e-6)


def test_dkd_zero_when_equal_and_alpha_beta_one_is_not_kd():
    z, y = torch.randn(6, 10), torch.randint(0, 10, (6,))
    assert DKDLoss()(z, z, y).item() == pytest.approx(0.0, abs=1e-5)
    zs = torch.randn(6, 10)
    dkd = DKDLoss(alpha=1.0, beta=1.0, temperature=1.0)(zs, z, y)
    assert abs(dkd.item() - KDLoss(1.0)(zs, z).item()) > 1e-3


def test_dkd_gradients_are_finite_for_confident_logits():
    zs = (torch.randn(4, 10) * 30).requires_grad_()
    zt = torch.randn(4, 10) * 30
    y = zt.argmax(1)
    DKDLoss()(zs, zt, y).backward()
    assert torch.isfinite(zs.grad).all()


def test_temperature_must_be_positive():
    with pytest.raises(ValueError, match="temperature"):
        KDLoss(0.0)
    with pytest.raises(ValueError, match="temperature"):
        DKDLoss(temperature=-1.0)


# ----------------------------------------------------------------------------------------------- precision
def _float64_logits(seed, shape=(6, 7)):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(*shape, generator=g, dtype=torch.float64) * 3 for _ in range(2))


def test_kd_keeps_float64_and_computes_bfloat16_in_float32():
    zs, zt = _float64_logits(5)
    got = KDLoss(4.0)(zs, zt)
    assert got.dtype == torch.float64
    assert got.item() == pytest.approx(kd_reference(zs, zt, 4.0), rel=1e-12)
    zs16, zt16 = zs.bfloat16(), zt.bfloat16()
    half = KDLoss(4.0)(zs16, zt16)
    assert half.dtype == torch.float32
    assert torch.equal(half, KDLoss(4.0)(zs16.float(), zt16.float()))


def test_dkd_keeps_float64_and_computes_bfloat16_in_float32():
    zs, zt = _float64_logits(6)
    y = torch.randint(0, 7, (6,), generator=torch.Generator().manual_seed(6))
    tckd, nckd = DKDLoss(temperature=2.0).parts(zs, zt, y)
    ref_t, ref_n = dkd_reference(zs, zt, y, 2.0)
    assert tckd.dtype == nckd.dtype == torch.float64
    assert tckd.item() == pytest.approx(ref_t, rel=1e-10)
    assert nckd.item() == pytest.approx(ref_n, rel=1e-10)
    zs16, zt16 = zs.bfloat16(), zt.bfloat16()
    half = DKDLoss()(zs16, zt16, y)
    assert half.dtype == torch.float32
    assert torch.equal(half, DKDLoss()(zs16.float(), zt16.float(), y))
