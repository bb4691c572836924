"""LLaVA-KD / LLaVA-MoD loss terms against float64 formulas written here, and their properties."""

import copy

import pytest
import torch
import torch.nn.functional as F

from zoo.losses.llava_kd import DIVERGENCES, MDistLoss, RDistLoss, response_mask, token_divergence
from zoo.losses.llava_mod import MimicLoss, PreferenceLoss, sequence_logprobs
from zoo.models.moe import load_balancing_loss


def _logits(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return 3 * torch.randn(*shape, generator=g, dtype=torch.float64)


def _kl(p, q):
    return (p * (p.log() - q.log())).sum(-1)


def _reference(kind, zs, zt, lam):
    p, q = zt.softmax(-1), zs.softmax(-1)
    if kind == "forward_kl":
        return _kl(p, q)
    if kind == "reverse_kl":
        return _kl(q, p)
    if kind == "symmetric_kl":
        return (1 - lam) * _kl(p, q) + lam * _kl(q, p)
    if kind == "js":
        m = (1 - lam) * p + lam * q
        return lam * _kl(q, m) + (1 - lam) * _kl(p, m)
    if kind == "tv":
        return 0.5 * (p - q).abs().sum(-1)
    if kind == "skewed_forward_kl":
        return _kl(p, lam * p + (1 - lam) * q)
    return _kl(q, (1 - lam) * p + lam * q)


@pytest.mark.parametrize("kind", sorted(DIVERGENCES))
def test_divergences_golden_and_zero_when_equal(kind):
    zs, zt = _logits(7, 13), _logits(7, 13, seed=1)
    lam = DIVERGENCES[kind]
    got = token_divergence(zs, zt, kind)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, _reference(kind, zs, zt, lam), rtol=1e-10, atol=1e-12)
    assert token_divergence(zt, zt, kind).abs().max() < 1e-12


def test_response_and_visual_terms_golden():
    """L_res: mean over shifted response rows; L_vis: mean over visual rows, unshifted (KLDivLoss batchmean)."""
    zs, zt = _logits(2, 6, 11), _logits(2, 6, 11, seed=1)
    labels = torch.tensor([[-100, -100, -100, -100, 4, 2], [-100, -100, -100, 7, 9, 2]])
    visual = torch.zeros(2, 6, dtype=torch.bool)
    visual[:, 1:3] = True
    loss = MDistLoss()
    rows = [(0, 3), (0, 4), (1, 2), (1, 3), (1, 4)]  # positions i whose logits predict labels[i + 1]
    expected = torch.stack([_kl(zt[b, i].softmax(-1), zs[b, i].softmax(-1)) for b, i in rows]).mean()
    torch.testing.assert_close(loss(zs, zt, response_mask(labels)), expected)
    vis_rows = [(b, i) for b in range(2) for i in (1, 2)]
    expected_vis = torch.stack([_kl(zt[b, i].softmax(-1), zs[b, i].softmax(-1)) for b, i in vis_rows]).mean()
    torch.testing.assert_close(loss(zs, zt, visual), expected_vis)
    assert float(loss(zs, zt, torch.zeros_like(visual))) == 0.0


@pytest.mark.parametrize("reduction", ["batch", "sample"])
@pytest.mark.parametrize("chunk", [None, 1, 4, 100])
def test_relation_golden(reduction, chunk):
    """L_rel = 1 − cos(vec Rel_S, vec Rel_T), Rel = Z Zᵀ of the raw visual logits; batch- or sample-flattened."""
    zs, zt = _logits(3, 8, 10), _logits(3, 8, 10, seed=1)
    visual = torch.zeros(3, 8, dtype=torch.bool)
    visual[:, 2:6] = True
    z_s, z_t = zs[:, 2:6], zt[:, 2:6]
    rel_s, rel_t = z_s @ z_s.transpose(1, 2), z_t @ z_t.transpose(1, 2)
    if reduction == "batch":
        expected = 1 - F.cosine_similarity(rel_s.reshape(1, -1), rel_t.reshape(1, -1))[0]
    else:
        expected = (1 - F.cosine_similarity(rel_s.reshape(3, -1), rel_t.reshape(3, -1))).mean()
    got = RDistLoss(reduction, chunk)(zs, zt, visual)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
    assert abs(float(RDistLoss(reduction, chunk)(zt, zt, visual))) < 1e-12


def test_chunked_relation_gradient_equals_plain_autograd():
    zs, zt = _logits(2, 7, 23).requires_grad_(), _logits(2, 7, 23, seed=1)
    visual = torch.zeros(2, 7, dtype=torch.bool)
    visual[:, 1:6] = True
    plain = torch.autograd.grad(RDistLoss(chunk_size=None)(zs, zt, visual), zs)[0]
    chunked = torch.autograd.grad(RDistLoss(chunk_size=5)(zs, zt, visual), zs)[0]
    torch.testing.assert_close(chunked, plain, rtol=1e-10, atol=1e-12)
    assert torch.autograd.gradcheck(lambda z: RDistLoss(chunk_size=3)(z, zt, visual), (zs,))


def test_relation_refuses_two_images_in_a_sample():
    visual = torch.tensor([[False, True, False, True]])
    with pytest.raises(ValueError, match="more than one run"):
        RDistLoss()(_logits(1, 4, 5), _logits(1, 4, 5), visual)


def test_mimic_loss_golden_unshifted_and_sliced():
    """L_KD = mean over {labels ≠ −100} (unshifted) of KL(p_T ‖ p_S) on the first V' logits."""
    zs, zt = _logits(2, 5, 12), _logits(2, 5, 14, seed=1)  # the teacher's vocabulary is padded
    labels = torch.tensor([[-100, -100, 3, 4, 2], [-100, 5, 6, 2, -100]])
    got = MimicLoss(vocab_slice=10)(zs, zt, labels)
    rows = [(0, 2), (0, 3), (0, 4), (1, 1), (1, 2), (1, 3)]
    expected = torch.stack([_kl(zt[b, i, :10].softmax(-1), zs[b, i, :10].softmax(-1)) for b, i in rows]).mean()
    torch.testing.assert_close(got, expected)
    with pytest.raises(ValueError, match="vocab_slice"):
        MimicLoss()(zs, zt, labels)
    all_rows = MimicLoss(vocab_slice=10, all_tokens=True)(zs, zt, labels)
    torch.testing.assert_close(all_rows, _kl(zt[..., :10].softmax(-1), zs[..., :10].softmax(-1)).mean())
    assert float(MimicLoss()(zs, copy.deepcopy(zs), labels)) == 0.0


def test_sequence_logprobs_golden():
    z = _logits(2, 4, 6)
    labels = torch.tensor([[-100, -100, 3, 2], [-100, 1, 5, 2]])
    logp = z.log_softmax(-1)
    expected = torch.stack([logp[0, 1, 3] + logp[0, 2, 2], logp[1, 0, 1] + logp[1, 1, 5] + logp[1, 2, 2]])
    torch.testing.assert_close(sequence_logprobs(z, labels), expected)
    counts = torch.tensor([2.0, 3.0], dtype=z.dtype)
    torch.testing.assert_close(sequence_logprobs(z, labels, average=True), expected / counts)


def test_preference_losses_golden():
    pw, pl = torch.tensor([-1.0, -4.0], dtype=torch.float64), torch.tensor([-3.0, -2.0], dtype=torch.float64)
    rw, rl = torch.tensor([-2.0, -3.0], dtype=torch.float64), torch.tensor([-2.5, -2.5], dtype=torch.float64)
    beta = 0.1
    loss, reward_w, reward_l = PreferenceLoss(beta)(pw, pl, rw, rl)
    h = (pw - rw) - (pl - rl)
    torch.testing.assert_close(loss, -F.logsigmoid(beta * h).mean())
    torch.testing.assert_close(reward_w, beta * (pw - rw))
    torch.testing.assert_close(reward_l, beta * (pl - rl))
    kto, _, _ = PreferenceLoss(beta, "kto_pair")(pw, pl, rw, rl)
    r_w, r_l = pw - rw, pl - rl
    kl_w, kl_l = r_w.mean().clamp(min=0), r_l.mean().clamp(min=0)
    expected = torch.cat([1 - torch.sigmoid(beta * (r_w - kl_l)), 1 - torch.sigmoid(beta * (kl_w - r_l))]).mean()
    torch.testing.assert_close(kto, expected)
    smooth, _, _ = PreferenceLoss(beta, label_smoothing=0.2)(pw, pl, rw, rl)
    torch.testing.assert_close(smooth, (-0.8 * F.logsigmoid(beta * h) - 0.2 * F.logsigmoid(-beta * h)).mean())


def test_load_balancing_loss_golden_and_uniform():
    g = torch.Generator().manual_seed(0)
    gates = torch.rand(9, 4, generator=g, dtype=torch.float64).softmax(-1)
    top1 = gates.argmax(-1)
    me, ce = gates.mean(0), torch.stack([(top1 == e).double().mean() for e in range(4)])
    torch.testing.assert_close(load_balancing_loss(gates, top1), 4 * (me * ce).sum())
    uniform = torch.full((9, 4), 0.25, dtype=torch.float64)
    for assignment in (torch.zeros(9, dtype=torch.long), torch.arange(9) % 4):
        torch.testing.assert_close(load_balancing_loss(uniform, assignment), torch.tensor(1.0, dtype=torch.float64))
