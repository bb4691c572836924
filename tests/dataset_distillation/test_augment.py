import math

import pytest
import torch

from zoo.dataset_distillation.augment import (
    DIGITS_DSA_STRATEGY,
    DSA_FAMILIES,
    DSA_STRATEGY,
    DiffAugment,
    DSAParams,
    ZCAWhitening,
    brightness,
    contrast,
    cutout,
    rotate,
    saturation,
    scale,
    translate,
)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _shift(x: torch.Tensor, dh: int, dw: int) -> torch.Tensor:
    """Reference: out[i, j] = x[i + dh, j + dw], zero outside, by slicing."""
    out = torch.zeros_like(x)
    h, w = x.shape[-2:]
    out[..., max(0, -dh) : h - max(0, dh), max(0, -dw) : w - max(0, dw)] = x[
        ..., max(0, dh) : h - max(0, -dh), max(0, dw) : w - max(0, -dw)
    ]
    return out


def test_defaults_match_official_param_diff_aug():
    p = DSAParams()
    assert (p.brightness, p.saturation, p.contrast) == (1.0, 2.0, 0.5)
    assert (p.crop, p.cutout, p.flip, p.scale, p.rotate) == (0.125, 0.5, 0.5, 1.2, 15.0)
    assert p.align_corners is True
    assert DSA_STRATEGY.split("_") == list(DSA_FAMILIES)
    assert "flip" not in DIGITS_DSA_STRATEGY.split("_")


@pytest.mark.parametrize("strategy", [*DSA_FAMILIES, DSA_STRATEGY])
@pytest.mark.parametrize("mode", ["S", "M"])
def test_every_family_is_differentiable(strategy, mode):
    x = torch.randn(4, 3, 12, 12, requires_grad=True)
    out = DiffAugment(strategy, mode=mode)(x, generator=_gen(1))
    assert out.shape == x.shape
    (out * torch.randn_like(out)).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_none_strategy_is_identity_and_unknown_family_is_rejected():
    x = torch.randn(2, 3, 8, 8)
    assert DiffAugment("")(x) is x
    assert DiffAugment("none")(x) is x
    with pytest.raises(ValueError, match="blur.*color.*rotate"):
        DiffAugment("color_blur")
    with pytest.raises(ValueError, match="mode"):
        DiffAugment(mode="X")  # type: ignore[arg-type]


def test_flip_alone_flips_each_sample_or_keeps_it():
    x = torch.randn(32, 3, 8, 8)
    out = DiffAugment("flip")(x, generator=_gen(2))
    same = (out == x).flatten(1).all(1)
    flipped = (out == x.flip(-1)).flatten(1).all(1)
    assert (same | flipped).all()
    assert same.any() and flipped.any()


def test_crop_alone_shifts_by_at_most_round_ratio_h_with_zero_fill():
    x = torch.rand(16, 2, 16, 16) + 1.0  # positive, so the zero fill is visible
    out = DiffAugment("crop")(x, generator=_gen(3))
    assert out.shape == x.shape
    k = 2  # int(0.125·16 + 0.5)
    shifts = set()
    for i in range(len(x)):
        rng = range(-k, k + 1)
        match = [(dh, dw) for dh in rng for dw in rng if torch.equal(out[i], _shift(x[i], dh, dw))]
        assert len(match) == 1
        shifts.add(match[0])
    assert len(shifts) > 1


def test_translate_with_explicit_shifts():
    x = torch.randn(2, 3, 6, 7)
    out = translate(x, torch.tensor([1, -3]), torch.tensor([-2, 0]))
    torch.testing.assert_close(out[0], _shift(x[0], 1, -2))
    torch.testing.assert_close(out[1], _shift(x[1], -3, 0))


def test_mode_s_applies_exactly_one_family_and_mode_m_all():
    x = torch.rand(6, 3, 8, 8) + 1.0
    aug = DiffAugment("flip_cutout", mode="S")
    seen = set()
    for seed in range(12):
        out = aug(x, generator=_gen(seed))
        zeroed = (out == 0).flatten(1).any(1)
        if zeroed.any():  # cutout: every sample has a hole, and nothing is flipped
            assert zeroed.all()
            assert torch.equal(out, x * (out != 0))
            seen.add("cutout")
        else:  # flip: each sample is x or its mirror
            ok = (out == x).flatten(1).all(1) | (out == x.flip(-1)).flatten(1).all(1)
            assert ok.all()
            seen.add("flip")
    assert seen == {"flip", "cutout"}
    out = DiffAugment("flip_cutout", mode="M")(x, generator=_gen(0))
    assert (out == 0).flatten(1).any(1).all()


def test_digits_preset_never_flips_an_asymmetric_image():
    h = 8
    img = torch.arange(h * h, dtype=torch.float32).view(1, 1, h, h) / (h * h) + 0.5
    x = img.expand(8, 3, h, h).contiguous()
    mirror = x.flip(-1)
    aug = DiffAugment(DIGITS_DSA_STRATEGY)
    for seed in range(60):
        out = aug(x, generator=_gen(seed))
        assert not any(torch.allclose(out[i], mirror[i], atol=1e-4) for i in range(len(x)))


def test_seeded_generator_is_deterministic():
    x = torch.randn(5, 3, 10, 10)
    aug = DiffAugment(DSA_STRATEGY, mode="M")
    a, b = aug(x, generator=_gen(7)), aug(x, generator=_gen(7))
    assert torch.equal(a, b)
    assert not torch.equal(a, aug(x, generator=_gen(8)))
    torch.manual_seed(0)
    c = aug(x)
    torch.manual_seed(0)
    assert torch.equal(c, aug(x))


def test_seed_is_siamese_one_parameter_set_for_any_batch_size():
    img = torch.randn(1, 3, 10, 10)
    aug = DiffAugment(DSA_STRATEGY)
    for seed in range(6):
        real = aug(img.expand(5, -1, -1, -1), seed=seed)
        syn = aug(img.expand(2, -1, -1, -1), seed=seed)
        torch.testing.assert_close(real, real[:1].expand_as(real))
        torch.testing.assert_close(syn, real[:2])
    with pytest.raises(ValueError, match="either"):
        aug(img, generator=_gen(0), seed=0)


def test_color_formulas_against_hand_computation():
    x = torch.randn(2, 3, 4, 5, dtype=torch.float64)
    u = torch.tensor([0.2, 0.9], dtype=torch.float64)
    for i in range(2):
        ref_b = x[i] + (u[i] - 0.5) * 1.0
        torch.testing.assert_close(brightness(x, u, 1.0)[i], ref_b)
        mc = x[i].mean(0, keepdim=True)
        torch.testing.assert_close(saturation(x, u, 2.0)[i], (x[i] - mc) * (u[i] * 2.0) + mc)
        m = x[i].mean()
        torch.testing.assert_close(contrast(x, u, 0.5)[i], (x[i] - m) * (u[i] + 0.5) + m)


def test_color_family_is_brightness_then_saturation_then_contrast_with_fresh_u():
    x = torch.randn(3, 3, 6, 6)
    out = DiffAugment("color")(x, generator=_gen(5))
    g = _gen(5)
    torch.randint(1, (1,), generator=g)  # the family draw
    u1, u2, u3 = (torch.rand(3, generator=g) for _ in range(3))
    torch.testing.assert_close(out, contrast(saturation(brightness(x, u1), u2), u3))


def test_cutout_zeros_a_square_of_side_round_half_h():
    x = torch.ones(2, 3, 16, 16)
    out = cutout(x, torch.tensor([8, 0]), torch.tensor([8, 0]), (8, 8))
    hole = torch.zeros(16, 16)
    hole[4:12, 4:12] = 1
    assert torch.equal(out[0, 1] == 0, hole.bool())
    assert (out[1, 0] == 0).sum() == 16  # clipped at the corner: rows and cols 0..3
    rand = DiffAugment("cutout")(torch.ones(64, 1, 15, 15), generator=_gen(4))
    for img in rand[:, 0]:
        rows, cols = (img == 0).any(1), (img == 0).any(0)
        assert rows.sum() <= 8 and cols.sum() <= 8  # int(0.5·15 + 0.5) = 8
        assert (img == 0).sum() == rows.sum() * cols.sum()  # a (clipped) rectangle
    assert max(int((img == 0).sum()) for img in rand[:, 0]) == 64


def test_unit_scale_and_zero_rotation_are_identity():
    x = torch.randn(3, 2, 9, 9)
    one, zero = torch.ones(3), torch.zeros(3)
    for ac in (True, False):
        torch.testing.assert_close(scale(x, one, one, ac), x, atol=1e-5, rtol=0)
        torch.testing.assert_close(rotate(x, zero, ac), x, atol=1e-5, rtol=0)
    # a quarter turn with align_corners=True lands exactly on the pixel grid: rot90 in the (H, W) plane
    quarter = torch.full((3,), math.pi / 2)
    torch.testing.assert_close(rotate(x, quarter), torch.rot90(x, 1, (2, 3)), atol=1e-5, rtol=0)
    # scale > 1 samples a wider field: the content shrinks and zeros enter at the border
    out = scale(torch.ones(1, 1, 9, 9), torch.tensor([1.2]), torch.tensor([1.2]))
    assert out[0, 0, 4, 4] == pytest.approx(1.0) and out[0, 0, 0, 0] < 1.0


def test_rotate_angle_is_the_official_float32_arithmetic_bit_for_bit():
    """rand_rotate of mtt-distillation computes (u − ½)·2·15/180·π one float32 operation at a time; the zoo does
    the same, so the same draw gives the same angle and image bit for bit (an equal formula that rounds differently,
    e.g. (u − ½)·radians(30), differs by an ulp in some angles, which 50 MTT iterations amplify into visibly
    different images: benchmarks/peers/mtt_official.py)."""
    x = torch.randn(512, 3, 8, 8)
    out = DiffAugment("rotate")(x, generator=_gen(5))
    g = _gen(5)
    torch.randint(1, (1,), generator=g)  # mode S: the family draw (one family here)
    u = torch.rand(512, generator=g)
    angle = (u - 0.5) * 2 * 15.0 / 180 * math.pi
    assert torch.equal(out, rotate(x, angle))
    assert not torch.equal(angle, (u - 0.5) * (2 * math.radians(15.0)))  # the other formula does round differently


def _correlated(n: int, seed: int = 0) -> torch.Tensor:
    g = _gen(seed)
    a = torch.randn(12, 12, generator=g)
    return (torch.randn(n, 12, generator=g) @ a + 3.0).view(n, 3, 2, 2)


def test_zca_whitens_training_data_and_inverts():
    x = _correlated(500)
    zca = ZCAWhitening(eps=1e-9).fit(x)
    z = zca(x)
    assert z.shape == x.shape
    flat = z.reshape(500, -1).double()
    cov = torch.cov(flat.T)  # unbiased, as the fit
    torch.testing.assert_close(cov, torch.eye(12, dtype=torch.float64), atol=1e-3, rtol=0)
    torch.testing.assert_close(flat.mean(0), torch.zeros(12, dtype=torch.float64), atol=1e-4, rtol=0)
    torch.testing.assert_close(zca.inverse(z), x, atol=1e-3, rtol=1e-4)
    torch.testing.assert_close(zca.matrix, zca.matrix.T)


def test_zca_matrix_matches_svd_reference_with_default_eps():
    x = _correlated(200, seed=1)
    zca = ZCAWhitening().fit(x)
    assert zca.eps == 0.1 and zca.unbiased
    flat = x.reshape(200, -1).double()
    cov = torch.cov(flat.T)
    u, s, _ = torch.linalg.svd(cov)
    ref = u @ torch.diag((s + 0.1).rsqrt()) @ u.T
    torch.testing.assert_close(zca.matrix.double(), ref, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(zca.inverse_matrix.double(), torch.linalg.inv(ref), atol=1e-4, rtol=1e-4)


def test_zca_save_load_round_trip(tmp_path):
    x = _correlated(100)
    zca = ZCAWhitening(eps=0.05).fit(x)
    path = zca.save(tmp_path / "sub" / "zca.safetensors")
    assert sorted(p.name for p in path.parent.iterdir()) == ["zca.safetensors"]  # no temp file left
    loaded = ZCAWhitening.load(path)
    assert loaded.eps == 0.05
    for name in ("mean", "matrix", "inverse_matrix"):
        assert torch.equal(getattr(loaded, name), getattr(zca, name))
    assert torch.equal(loaded(x), zca(x))
    fresh = ZCAWhitening(eps=0.05)
    fresh.load_state_dict(zca.state_dict())
    assert torch.equal(fresh(x), zca(x))


def test_zca_before_fit_raises_clear_error(tmp_path):
    zca = ZCAWhitening()
    x = torch.randn(2, 3, 2, 2)
    for call in (lambda: zca(x), lambda: zca.inverse(x), lambda: zca.save(tmp_path / "z.safetensors")):
        with pytest.raises(RuntimeError, match="before fit"):
            call()
    zca.fit(_correlated(20))
    with pytest.raises(ValueError, match="12 values"):
        zca(torch.randn(2, 3, 4, 4))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_zca_on_the_gpu_whitens_images_from_the_cpu():
    """A Lightning run moves the fitted module to the GPU; test images and grids arrive on the CPU."""
    x = torch.rand(20, 1, 4, 4)
    zca = ZCAWhitening().fit(x)
    expected = zca(x)
    zca.cuda()
    torch.testing.assert_close(zca(x), expected)
    torch.testing.assert_close(zca.inverse(zca(x)), x, atol=1e-4, rtol=1e-4)
    assert zca(x.cuda()).is_cuda
