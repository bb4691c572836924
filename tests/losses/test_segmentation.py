"""Segmentation distillation: PixelKD, CWD, LabelNoiser, MGD semantic/content losses, CutMix box masks.

References are written from the formulas in float64 (loops over pixels or channels, einsum for similarities).
"""

import math

import pytest
import torch
import torch.nn.functional as F

from zoo.data.mixing import BoxMaskGenerator, cutmix
from zoo.data.transforms import LabelNoiser
from zoo.losses.segmentation import CWDLoss, MGDContentLoss, MGDSemanticLoss, OhemCrossEntropy, PixelKDLoss


def _kl(p, q):
    return sum(a * (math.log(a) - math.log(b)) for a, b in zip(p, q))


def _softmax(values, t):
    e = [math.exp(v / t) for v in values]
    return [v / sum(e) for v in e]


# ----------------------------------------------------------------------------------------------- pixel KD
def pixel_kd_reference(zs, zt, t, keep=None):
    n, _, h, w = zt.shape
    total, count = 0.0, 0
    for b in range(n):
        for i in range(h):
            for j in range(w):
                if keep is not None and not keep[b, i, j]:
                    continue
                pt = _softmax(zt[b, :, i, j].tolist(), t)
                ps = _softmax(zs[b, :, i, j].tolist(), t)
                total += _kl(pt, ps)
                count += 1
    return t * t * total / max(count, 1)


@pytest.mark.parametrize("t", [1.0, 4.0])
def test_pixel_kd_golden(t):
    g = torch.Generator().manual_seed(0)
    zs, zt = torch.randn(2, 4, 3, 5, generator=g) * 3, torch.randn(2, 4, 3, 5, generator=g) * 3
    got = PixelKDLoss(temperature=t)(zs, zt)
    assert got.item() == pytest.approx(pixel_kd_reference(zs.double(), zt.double(), t), rel=1e-5)


def test_pixel_kd_zero_when_equal_and_positive_otherwise():
    z = torch.randn(2, 5, 6, 6)
    assert PixelKDLoss()(z, z).item() == pytest.approx(0.0, abs=1e-6)
    assert PixelKDLoss()(z + torch.randn_like(z), z).item() > 0


def test_pixel_kd_ignore_mask_excludes_pixels():
    g = torch.Generator().manual_seed(1)
    zs, zt = torch.randn(2, 4, 6, 6, generator=g), torch.randn(2, 4, 6, 6, generator=g)
    y = torch.randint(0, 4, (2, 6, 6), generator=g)
    y[0, :2] = 255
    y[1, :, 4:] = 255
    loss = PixelKDLoss(temperature=2.0)
    base = loss(zs, zt, y)
    assert base.item() == pytest.approx(pixel_kd_reference(zs.double(), zt.double(), 2.0, keep=y != 255), rel=1e-5)
    ignored = (y == 255)[:, None].expand_as(zs)
    zs2 = torch.where(ignored, torch.randn_like(zs) * 10, zs)
    zt2 = torch.where(ignored, torch.randn_like(zt) * 10, zt)
    assert loss(zs2, zt2, y).item() == pytest.approx(base.item(), rel=1e-6)
    assert loss(zs2, zt2).item() != pytest.approx(base.item(), rel=1e-3)  # unmasked, the same pixels do count
    assert loss(zs, zt, torch.full_like(y, 255)).item() == 0.0


def test_pixel_kd_resizes_student_and_target_to_teacher():
    zs, zt = torch.randn(2, 3, 4, 4, requires_grad=True), torch.randn(2, 3, 8, 8)
    y = torch.randint(0, 3, (2, 16, 16))
    y[:, :8] = 255  # top half, nearest-resized to the top half of the teacher's grid
    loss = PixelKDLoss()
    up = F.interpolate(zs.detach(), size=(8, 8), mode="bilinear", align_corners=False)
    assert loss(zs, zt).item() == pytest.approx(loss(up, zt).item(), rel=1e-6)
    keep = torch.ones(2, 8, 8, dtype=torch.bool)
    keep[:, :4] = False
    got = loss(zs, zt, y)
    assert got.item() == pytest.approx(pixel_kd_reference(up.double(), zt.double(), 1.0, keep=keep), rel=1e-5)
    got.backward()
    assert zs.grad is not None and torch.isfinite(zs.grad).all()


def test_pixel_kd_half_inputs_computed_in_float32():
    zs, zt = torch.randn(1, 4, 4, 4), torch.randn(1, 4, 4, 4)
    got = PixelKDLoss()(zs.half(), zt.half())
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(PixelKDLoss()(zs.half().float(), zt.half().float()).item(), rel=1e-6)


# ----------------------------------------------------------------------------------------------- CWD
def cwd_reference(zs, zt, t):
    """mmrazor ChannelWiseDivergence written as loops: per (n, c), softmax over the spatial positions."""
    n, c = zt.shape[:2]
    total = 0.0
    for b in range(n):
        for k in range(c):
            pt = _softmax(zt[b, k].flatten().tolist(), t)
            ps = _softmax(zs[b, k].flatten().tolist(), t)
            total += _kl(pt, ps)
    return t * t * total / (n * c)


@pytest.mark.parametrize("t", [1.0, 4.0])
def test_cwd_matches_loop_reference(t):
    g = torch.Generator().manual_seed(2)
    zs, zt = torch.randn(2, 3, 4, 5, generator=g) * 4, torch.randn(2, 3, 4, 5, generator=g) * 4
    got = CWDLoss(temperature=t)(zs, zt)
    assert got.item() == pytest.approx(cwd_reference(zs.double(), zt.double(), t), rel=1e-5)


def test_cwd_zero_when_equal_and_non_negative():
    z = torch.randn(3, 6, 8, 8)
    assert CWDLoss()(z, z).item() == pytest.approx(0.0, abs=1e-6)
    for _ in range(5):
        assert CWDLoss()(torch.randn(2, 4, 5, 5) * 5, torch.randn(2, 4, 5, 5) * 5).item() >= 0


def test_cwd_invariant_to_per_channel_constants():
    zs, zt = torch.randn(2, 5, 6, 6), torch.randn(2, 5, 6, 6)
    base = CWDLoss(temperature=2.0)(zs, zt).item()
    shifted = CWDLoss(temperature=2.0)(zs + torch.randn(2, 5, 1, 1) * 5, zt + torch.randn(2, 5, 1, 1) * 5)
    assert shifted.item() == pytest.approx(base, rel=1e-5)


def test_cwd_tau_squared_factor():
    """At τ, the loss is τ² times the plain KL of the τ-softened maps: CWD_τ(S, T) = τ² · CWD_1(S/τ, T/τ)."""
    zs, zt = torch.randn(2, 4, 5, 5), torch.randn(2, 4, 5, 5)
    for t in (2.0, 4.0):
        assert CWDLoss(t)(zs, zt).item() == pytest.approx(t * t * CWDLoss(1.0)(zs / t, zt / t).item(), rel=1e-5)


def test_cwd_resizes_student_and_detaches_teacher():
    zs, zt = torch.randn(1, 3, 4, 4, requires_grad=True), torch.randn(1, 3, 8, 8, requires_grad=True)
    loss = CWDLoss()(zs, zt)
    up = F.interpolate(zs.detach(), size=(8, 8), mode="bilinear", align_corners=False)
    assert loss.item() == pytest.approx(CWDLoss()(up, zt.detach()).item(), rel=1e-6)
    loss.backward()
    assert zs.grad is not None and zt.grad is None


# ----------------------------------------------------------------------------------------------- LabelNoiser
def _two_region_target():
    y = torch.zeros(3, 8, 8, dtype=torch.long)
    y[:, :, 4:] = 5
    y[:, 6:] = 255
    return y


def test_label_noiser_fixed_codes_are_constant_per_class():
    y = _two_region_target()
    noiser = LabelNoiser(num_classes=21, fixed_noise_std=0.0)
    out = noiser(y, fixed=True)
    assert out.shape == (3, 1, 8, 8) and out.dtype == torch.float32
    for k, code in ((0, (0 - 11) / 10), (5, (5 - 11) / 10), (255, (21 - 11) / 10)):  # ignore → extra class K = 21
        values = out[:, 0][y == k]
        assert torch.allclose(values, torch.full_like(values, code * 100.0))
    torch.testing.assert_close(noiser.fixed_codes(), (torch.arange(22.0) - 11) / 10)


def test_label_noiser_random_codes_per_image_and_class():
    y = _two_region_target()
    noiser = LabelNoiser(num_classes=21, noise_std=0.0)
    out = noiser(y, generator=torch.Generator().manual_seed(0))[:, 0]
    codes = []
    for b in range(3):
        per_class = []
        for k in (0, 5, 255):
            values = out[b][y[b] == k]
            assert torch.all(values == values[0])  # constant within a class of one image
            per_class.append(values[0].item())
        assert len(set(per_class)) == 3
        codes.append(per_class)
    assert len({c[0] for c in codes}) == 3  # class 0 gets a different code in every image
    again = noiser(y, generator=torch.Generator().manual_seed(0))[:, 0]
    assert torch.equal(out, again)


def test_label_noiser_ignore_gets_extra_class_code():
    y = torch.full((1, 4, 4), 255, dtype=torch.long)
    y[0, 0, 0] = 2
    noiser = LabelNoiser(num_classes=3, noise_std=0.0)
    g = torch.Generator().manual_seed(5)
    codes = torch.randn(1, 4, generator=g)  # the table the noiser draws first: classes 0..2 and K = 3
    out = noiser(y, generator=torch.Generator().manual_seed(5))[0, 0]
    assert out[0, 0].item() == pytest.approx(codes[0, 2].item() * 100, rel=1e-6)
    assert torch.allclose(out[1:], torch.full_like(out[1:], codes[0, 3].item() * 100))
    custom = LabelNoiser(num_classes=3, ignore_index=-1, fixed_noise_std=0.0)
    assert custom(torch.full((1, 2, 2), -1), fixed=True).unique().item() == pytest.approx((3 - 11) / 10 * 100)


def test_label_noiser_noise_std():
    y = torch.full((2, 128, 128), 3, dtype=torch.long)
    g = torch.Generator().manual_seed(3)
    random_mode = LabelNoiser(num_classes=21)(y, generator=g)
    fixed_mode = LabelNoiser(num_classes=21)(y, fixed=True, generator=g)
    for out, std in ((random_mode, 0.03), (fixed_mode, 0.02)):
        per_image = out.flatten(1)
        assert per_image.std(dim=1).tolist() == pytest.approx([std * 100] * 2, rel=0.02)
    assert fixed_mode.mean().item() == pytest.approx((3 - 11) / 10 * 100, abs=0.05)


def test_label_noiser_rejects_out_of_range_labels():
    with pytest.raises(ValueError, match="labels must lie"):
        LabelNoiser(num_classes=4)(torch.full((1, 2, 2), 7))
    with pytest.raises(ValueError, match="integer"):
        LabelNoiser(num_classes=4)(torch.zeros(1, 2, 2))


# ----------------------------------------------------------------------------------------------- MGD
def test_mgd_semantic_golden_and_zero():
    g = torch.Generator().manual_seed(4)
    zs, zt = torch.randn(2, 3, 4, 6, generator=g), torch.randn(2, 3, 4, 6, generator=g)
    s, t = zs.double(), zt.double()
    expected = 0.0
    for b in range(2):
        for c in range(3):
            expected += abs(sum(s[b, c].flatten().tolist()) / 24 - sum(t[b, c].flatten().tolist()) / 24)
    assert MGDSemanticLoss()(zs, zt).item() == pytest.approx(expected, rel=1e-5)
    assert MGDSemanticLoss("mean")(zs, zt).item() == pytest.approx(expected / 6, rel=1e-5)
    assert MGDSemanticLoss()(zs, zs).item() == 0.0
    with pytest.raises(ValueError, match="reduction"):
        MGDSemanticLoss("none")


def content_reference(fs, ft, p=7):
    def sim(f):
        q = F.adaptive_avg_pool2d(f.double(), p).flatten(2)  # (N, C, P²)
        norms = torch.einsum("nci,nci->ni", q, q).sqrt()
        return torch.einsum("nci,ncj->nij", q, q) / (norms[:, :, None] * norms[:, None, :])

    return ((sim(fs) - sim(ft)) ** 2).mean().item()


def test_mgd_content_golden():
    g = torch.Generator().manual_seed(5)
    fs, ft = torch.randn(2, 8, 14, 21, generator=g), torch.randn(2, 16, 28, 28, generator=g)
    assert MGDContentLoss()(fs, ft).item() == pytest.approx(content_reference(fs, ft), rel=1e-5)
    assert MGDContentLoss(pool_size=3)(fs, ft).item() == pytest.approx(content_reference(fs, ft, 3), rel=1e-5)


def test_mgd_content_zero_and_channel_count_and_scale_invariance():
    f = torch.randn(2, 6, 14, 14)
    loss = MGDContentLoss()
    assert loss(f, f).item() == pytest.approx(0.0, abs=1e-10)
    assert loss(f, f.repeat(1, 3, 1, 1)).item() == pytest.approx(0.0, abs=1e-10)
    assert loss(f, 7.5 * f).item() == pytest.approx(0.0, abs=1e-10)
    per_position = torch.rand(2, 1, 7, 7) + 0.5  # positive scale of each pooled region leaves cosines unchanged
    pooled = F.adaptive_avg_pool2d(f, 7)
    assert loss(pooled, pooled * per_position).item() == pytest.approx(0.0, abs=1e-10)
    sim = loss.similarity(f)
    assert sim.shape == (2, 49, 49)
    torch.testing.assert_close(sim.diagonal(dim1=1, dim2=2), torch.ones(2, 49))
    assert loss(f, torch.randn(2, 3, 9, 9)).item() > 0


def test_mgd_content_zero_region_is_finite():
    f = torch.zeros(1, 4, 7, 7)
    f[..., 3:] = torch.rand(1, 4, 7, 4)
    assert torch.isfinite(MGDContentLoss()(f, torch.randn(1, 5, 7, 7)))


# ----------------------------------------------------------------------------------------------- box masks
def test_box_masks_binary_and_area_in_range():
    gen = BoxMaskGenerator()
    g = torch.Generator().manual_seed(6)
    masks = gen.generate(64, (64, 96), generator=g)
    assert masks.shape == (64, 1, 64, 96) and masks.dtype == torch.float32
    assert set(masks.unique().tolist()) <= {0.0, 1.0}
    # Each box covers a/3 of the image with a ~ U(0.25, 0.5), so the union (XOR at overlaps) is at most 0.5 of it.
    frac = masks.mean(dim=(1, 2, 3))
    assert frac.max().item() <= 0.5 + 0.03 and frac.min().item() > 0
    boxes = gen.boxes(2000, (64, 96), generator=g)
    area = (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1]) / (64 * 96)
    assert area.min().item() >= 0.25 / 3 - 0.02 and area.max().item() <= 0.5 / 3 + 0.02
    assert boxes[..., :2].min().item() >= 0
    assert (boxes[..., 2] <= 64).all() and (boxes[..., 3] <= 96).all()


def test_box_mask_single_box_exact_area_and_invert():
    gen = BoxMaskGenerator(n_boxes=1, prop_range=0.25, random_aspect_ratio=False, invert=True)
    m = gen.generate(3, (40, 40), generator=torch.Generator().manual_seed(0))
    assert m.sum(dim=(1, 2, 3)).tolist() == [400.0] * 3  # a 20×20 box of ones in a zero mask
    flipped = BoxMaskGenerator(n_boxes=1, prop_range=0.25, random_aspect_ratio=False, invert=False)
    m2 = flipped.generate(3, (40, 40), generator=torch.Generator().manual_seed(0))
    assert torch.equal(m2, 1 - m)


def test_box_masks_deterministic_with_generator():
    gen = BoxMaskGenerator()
    a = gen.generate(4, (32, 32), generator=torch.Generator().manual_seed(7))
    b = gen.generate(4, (32, 32), generator=torch.Generator().manual_seed(7))
    c = gen.generate(4, (32, 32), generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_box_masks_outside_bounds_are_clipped():
    gen = BoxMaskGenerator(within_bounds=False, prop_range=(0.4, 0.5))
    masks = gen.generate(32, (16, 16), generator=torch.Generator().manual_seed(9))
    assert set(masks.unique().tolist()) <= {0.0, 1.0}


def test_cutmix_pseudo_labels_equal_cutmix_of_labels_for_perfect_teachers():
    g = torch.Generator().manual_seed(10)
    y0, y1 = torch.randint(0, 5, (4, 24, 24), generator=g), torch.randint(0, 5, (4, 24, 24), generator=g)
    m = BoxMaskGenerator().generate(4, (24, 24), generator=g)

    def onehot(y):  # a perfect teacher's logits
        return F.one_hot(y, 5).permute(0, 3, 1, 2).float() * 10

    pseudo = cutmix(onehot(y0), onehot(y1), m).argmax(1)
    mixed = cutmix(y0, y1, m)
    assert mixed.dtype == torch.long and torch.equal(pseudo, mixed)
    # Boxes (m = 1) come from the second batch, the rest from the first.
    box = m[:, 0].bool()
    assert torch.equal(mixed[box], y1[box]) and torch.equal(mixed[~box], y0[~box])
    images = cutmix(torch.zeros(4, 3, 24, 24), torch.ones(4, 3, 24, 24), m)
    assert torch.equal(images, m.expand(4, 3, 24, 24))


def ohem_reference(logits, target, thresh, min_kept, ignore=255):
    """Float64 loop: sort the label probabilities (ignored = 1), threshold max(thresh, k-th smallest), mean −log p."""
    z, y = logits.double(), target
    n, _, h, w = z.shape
    pixels = []
    for b in range(n):
        for i in range(h):
            for j in range(w):
                label = int(y[b, i, j])
                row = [float(v) for v in z[b, :, i, j]]
                m = max(row)
                log_p = row[label] - m - math.log(sum(math.exp(v - m) for v in row)) if label != ignore else 0.0
                pixels.append((label != ignore, math.exp(log_p), log_p))
    valid = [p for p in pixels if p[0]]
    if 0 < min_kept <= len(valid):
        kth = sorted(p[1] for p in pixels)[min_kept - 1]  # ignored pixels count with probability 1
        t = max(thresh, kth)
        valid = [p for p in valid if p[1] <= t]
    return -sum(p[2] for p in valid) / len(valid)


@pytest.mark.parametrize("thresh,min_kept", [(0.7, 5), (0.3, 40), (0.05, 0), (0.7, 10_000)])
def test_ohem_cross_entropy_golden(thresh, min_kept):
    g = torch.Generator().manual_seed(0)
    logits = 2 * torch.randn(2, 4, 6, 5, generator=g)
    target = torch.randint(0, 4, (2, 6, 5), generator=g)
    target[0, :2] = 255
    got = OhemCrossEntropy(thresh, min_kept)(logits, target)
    assert got.item() == pytest.approx(ohem_reference(logits, target, thresh, min_kept), rel=1e-5)


def test_ohem_cross_entropy_properties():
    g = torch.Generator().manual_seed(1)
    logits = 3 * torch.randn(2, 5, 8, 8, generator=g)
    target = torch.randint(0, 5, (2, 8, 8), generator=g)
    target[1, 0] = 255
    plain = F.cross_entropy(logits, target, ignore_index=255)
    # threshold 1 keeps every labelled pixel; so does a min_kept above the labelled count (no mining)
    assert OhemCrossEntropy(1.0, 10)(logits, target).item() == pytest.approx(plain.item(), rel=1e-6)
    assert OhemCrossEntropy(0.1, 10_000)(logits, target).item() == pytest.approx(plain.item(), rel=1e-6)
    # a tiny threshold keeps exactly the min_kept hardest pixels (distinct probabilities)
    loss_each = F.cross_entropy(logits, target, ignore_index=255, reduction="none").flatten()
    hardest = loss_each[target.flatten() != 255].topk(17).values.mean()
    assert OhemCrossEntropy(1e-6, 17)(logits, target).item() == pytest.approx(hardest.item(), rel=1e-5)
    # mining only drops easy pixels, so the loss never falls below plain CE's
    assert OhemCrossEntropy(0.7, 17)(logits, target) >= plain - 1e-6
    # logits at a lower resolution are resized to the labels; gradients flow; no labelled pixel gives 0
    small = logits[:, :, ::2, ::2].clone().requires_grad_()
    OhemCrossEntropy(0.7, 17)(small, target).backward()
    assert small.grad.abs().sum() > 0
    assert OhemCrossEntropy()(logits, torch.full_like(target, 255)).item() == 0.0
    with pytest.raises(ValueError, match="thresh"):
        OhemCrossEntropy(0.0)


# ----------------------------------------------------------------------------------------------- precision
def _mgd_semantic_reference(zs, zt):
    n, c = zs.shape[:2]
    area = zs.shape[2] * zs.shape[3]
    return sum(
        abs(sum(zs[b, k].flatten().tolist()) / area - sum(zt[b, k].flatten().tolist()) / area)
        for b in range(n)
        for k in range(c)
    )


def test_float64_inputs_give_the_float64_golden_values():
    g = torch.Generator().manual_seed(11)
    zs = torch.randn(2, 4, 3, 5, generator=g, dtype=torch.float64) * 3
    zt = torch.randn(2, 4, 3, 5, generator=g, dtype=torch.float64) * 3
    target = torch.randint(0, 4, (2, 3, 5), generator=g)
    target[0, 0] = 255
    fs = torch.randn(2, 8, 14, 21, generator=g, dtype=torch.float64)
    ft = torch.randn(2, 16, 28, 28, generator=g, dtype=torch.float64)
    cases = [
        (PixelKDLoss(2.0)(zs, zt), pixel_kd_reference(zs, zt, 2.0)),
        (CWDLoss(4.0)(zs, zt), cwd_reference(zs, zt, 4.0)),
        (MGDSemanticLoss()(zs, zt), _mgd_semantic_reference(zs, zt)),
        (MGDContentLoss()(fs, ft), content_reference(fs, ft)),
        (OhemCrossEntropy(0.7, 5)(zs, target), ohem_reference(zs, target, 0.7, 5)),
    ]
    for got, expected in cases:
        assert got.dtype == torch.float64
        assert got.item() == pytest.approx(expected, rel=1e-12)


def test_bfloat16_inputs_are_computed_in_float32():
    g = torch.Generator().manual_seed(12)
    zs, zt = torch.randn(2, 4, 6, 6, generator=g).bfloat16(), torch.randn(2, 4, 6, 6, generator=g).bfloat16()
    target = torch.randint(0, 4, (2, 6, 6), generator=g)
    cases = [
        (PixelKDLoss(), (zs, zt)),
        (CWDLoss(), (zs, zt)),
        (MGDSemanticLoss(), (zs, zt)),
        (MGDContentLoss(pool_size=3), (zs, zt)),
        (OhemCrossEntropy(0.7, 10), (zs, target)),
    ]
    for loss, args in cases:
        half = loss(*args)
        assert half.dtype == torch.float32
        assert torch.equal(half, loss(*(a.float() if a.is_floating_point() else a for a in args)))
