"""VL2V-ADiP loss and the class-prompt CLIP loss: float64 golden values from the formulas, and properties."""

import math

import pytest
import torch

from zoo.losses.vl2v_adip import ClassPromptCLIPLoss, VL2VADiPLoss


def _cos(a, b):
    return (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))


@pytest.mark.parametrize("lmd", [0.5, 0.1, 1.0, 0.0])
def test_vl2v_adip_loss_golden_float64(lmd):
    g = torch.Generator().manual_seed(0)
    u, e_img, e_txt = (torch.randn(5, 7, generator=g, dtype=torch.float64) for _ in range(3))
    image_term, text_term = VL2VADiPLoss(lmd).parts(u, e_img, e_txt)
    assert image_term.dtype == torch.float64
    expected_image = -lmd * _cos(u, e_img).mean()
    expected_text = -(1 - lmd) * _cos(u, e_txt).mean()
    assert image_term.item() == pytest.approx(expected_image.item(), abs=1e-12)
    assert text_term.item() == pytest.approx(expected_text.item(), abs=1e-12)
    total = VL2VADiPLoss(lmd)(u, e_img, e_txt).item()
    assert total == pytest.approx((expected_image + expected_text).item(), abs=1e-12)


def test_vl2v_adip_loss_hand_value():
    # u1 ∥ e_I1, u1 ⊥ e_y1; u2 at 45° to e_I2 and ∥ e_y2: L = −0.5·(1 + √½)/2 − 0.5·(0 + 1)/2
    u = torch.tensor([[1.0, 0.0], [0.0, 2.0]], dtype=torch.float64)
    e_img = torch.tensor([[3.0, 0.0], [1.0, 1.0]], dtype=torch.float64)
    e_txt = torch.tensor([[0.0, 1.0], [0.0, 5.0]], dtype=torch.float64)
    expected = -0.5 * (1 + math.sqrt(0.5)) / 2 - 0.5 * 0.5
    assert VL2VADiPLoss()(u, e_img, e_txt).item() == pytest.approx(expected, abs=1e-12)


def test_loss_is_minus_one_when_student_image_and_text_embeddings_agree():
    u = torch.randn(8, 16, dtype=torch.float64)
    loss = VL2VADiPLoss(0.5)
    assert loss(u, u, u).item() == pytest.approx(-1.0, abs=1e-12)
    # a cosine: the scales of the three embeddings do not matter (the official text targets are ×100)
    assert loss(3 * u, u / 7, 100 * u).item() == pytest.approx(-1.0, abs=1e-12)


def test_loss_half_precision_computes_in_float32():
    u = torch.randn(4, 8).bfloat16()
    assert VL2VADiPLoss()(u, u, u).dtype == torch.float32


def test_cutmix_text_target_is_mixed_and_image_term_is_not():
    g = torch.Generator().manual_seed(1)
    u, e_img, e_a, e_b = (torch.randn(6, 5, generator=g, dtype=torch.float64) for _ in range(4))
    loss, mix = VL2VADiPLoss(0.5), 0.3
    image_term, text_term = loss.parts(u, e_img, e_a, e_b, mix)
    # the official code: mix·dfc(img, txt_a) + (1 − mix)·dfc(img, txt_b)
    expected = mix * loss(u, e_img, e_a) + (1 - mix) * loss(u, e_img, e_b)
    assert (image_term + text_term).item() == pytest.approx(expected.item(), abs=1e-12)
    assert image_term.item() == pytest.approx(loss.parts(u, e_img, e_a)[0].item(), abs=1e-12)


def test_loss_rejects_bad_arguments():
    with pytest.raises(ValueError, match="lmd"):
        VL2VADiPLoss(1.5)
    with pytest.raises(ValueError, match="same"):
        VL2VADiPLoss()(torch.randn(2, 3), torch.randn(2, 4), torch.randn(2, 3))


def test_class_prompt_clip_loss_golden_float64():
    g = torch.Generator().manual_seed(2)
    v = torch.nn.functional.normalize(torch.randn(6, 4, generator=g, dtype=torch.float64), dim=-1)
    t = torch.nn.functional.normalize(torch.randn(3, 4, generator=g, dtype=torch.float64), dim=-1)
    k = torch.tensor([0, 2, 2, 1, 0, 2])
    s = 7.0
    logits = s * v @ t.T
    image_to_text = -(logits.log_softmax(1)[torch.arange(6), k]).mean()
    text_to_image = 0.0
    for c in range(3):
        members = (k == c).nonzero().flatten()
        text_to_image += -logits.T[c].log_softmax(0)[members].mean() / 3
    expected = 0.5 * (image_to_text + text_to_image)
    assert ClassPromptCLIPLoss()(v, t, k, s).item() == pytest.approx(expected.item(), abs=1e-12)


def test_class_prompt_clip_loss_is_low_when_images_sit_on_their_prompts():
    t = torch.eye(3, dtype=torch.float64)
    k = torch.tensor([0, 1, 2, 0])
    aligned = ClassPromptCLIPLoss()(t[k], t, k, 100.0)
    shuffled = ClassPromptCLIPLoss()(t[k.roll(1)], t, k, 100.0)
    # text→image spreads its target over the 2 images of class 0: its floor is ln 2 / 3 per prompt on average
    assert aligned.item() == pytest.approx(0.5 * math.log(2) / 3, abs=1e-6)
    assert shuffled > 10
