"""ND loss: golden values from the official per-sample formula, and its properties."""

import math

import pytest
import torch

from zoo.losses import NDLoss, NDProjector


def nd_reference(g, f_t, y, centers):
    """The per-sample loop of the official code, in float64."""
    total = 0.0
    for gi, fi, yi in zip(g.tolist(), f_t.tolist(), y.tolist()):
        c = centers[yi].tolist()
        c_norm = math.sqrt(sum(v * v for v in c))
        e = [v / c_norm for v in c]
        g_norm = math.sqrt(sum(v * v for v in gi))
        f_norm = math.sqrt(sum(v * v for v in fi))
        total += 1 - sum(a * b for a, b in zip(gi, e)) / max(g_norm, f_norm)
    return total / len(y)


def make(classes=5, dim=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    loss = NDLoss(classes, dim)
    loss.set_centers(torch.randn(classes, dim, generator=g) * 3)
    return loss, g


def test_golden_against_the_official_loop():
    loss, g = make()
    s, t = torch.randn(16, 6, generator=g) * 2, torch.randn(16, 6, generator=g) * 2
    y = torch.randint(0, 5, (16,), generator=g)
    expected = nd_reference(s.double(), t.double(), y, loss.centers.double())
    assert loss(s, t, y).item() == pytest.approx(expected, rel=1e-5)


def test_zero_when_g_is_a_long_enough_multiple_of_the_centre():
    loss, g = make()
    y = torch.tensor([0, 3, 4])
    e = torch.nn.functional.normalize(loss.centers[y], dim=1)
    f_t = torch.randn(3, 6, generator=g)
    scale = f_t.norm(dim=1, keepdim=True) * torch.tensor([[1.0], [1.5], [4.0]])
    assert loss(scale * e, f_t, y).item() == pytest.approx(0.0, abs=1e-6)


def test_short_g_is_pushed_to_the_teacher_norm():
    loss, _ = make()
    y = torch.tensor([1])
    e = torch.nn.functional.normalize(loss.centers[y], dim=1)
    f_t = e * 10.0
    # aligned but half the teacher's norm: 1 − ‖g‖/‖f_t‖ = 0.5
    assert loss(5.0 * e, f_t, y).item() == pytest.approx(0.5, abs=1e-6)
    g_short = (5.0 * e).requires_grad_()
    loss(g_short, f_t, y).backward()
    assert (g_short.grad * e).sum() < 0  # the gradient step lengthens g along e
    # opposite direction, long: 1 − (−1) = 2
    assert loss(-20.0 * e, f_t, y).item() == pytest.approx(2.0, abs=1e-6)


def test_teacher_embedding_gets_no_gradient_and_unset_centres_fail():
    loss, _ = make()
    t = torch.randn(4, 6, requires_grad=True)
    loss(torch.randn(4, 6, requires_grad=True), t, torch.zeros(4, dtype=torch.long)).backward()
    assert t.grad is None
    with pytest.raises(RuntimeError, match="centres are not set"):
        NDLoss(3, 2)(torch.randn(1, 2), torch.randn(1, 2), torch.zeros(1, dtype=torch.long))
    with pytest.raises(ValueError, match="shape"):
        NDLoss(3, 2).set_centers(torch.zeros(2, 2))


def test_projector_structure_and_init():
    p = NDProjector(8, 64)
    assert [type(m).__name__ for m in p] == ["BatchNorm1d", "Dropout", "Linear"]
    assert torch.count_nonzero(p[2].bias) == 0 and p[1].p == 0.5
    q = NDProjector(8, 64, init="imagenet")
    assert q[2].weight.std().item() == pytest.approx(0.01, rel=0.2)
    with pytest.raises(ValueError, match="init"):
        NDProjector(8, 64, init="other")


def test_float64_inputs_give_the_float64_golden_value_and_bfloat16_computes_in_float32():
    loss, g = make(seed=4)
    s = torch.randn(16, 6, generator=g, dtype=torch.float64) * 2
    t = torch.randn(16, 6, generator=g, dtype=torch.float64) * 2
    y = torch.randint(0, 5, (16,), generator=g)
    got = loss(s, t, y)
    assert got.dtype == torch.float64
    assert got.item() == pytest.approx(nd_reference(s, t, y, loss.centers.double()), rel=1e-12)
    s16, t16 = s.bfloat16(), t.bfloat16()
    half = loss(s16, t16, y)
    assert half.dtype == torch.float32
    assert torch.equal(half, loss(s16.float(), t16.float(), y))
