"""Golden values and properties of the token-feature losses: DMAE, G2SD (generic decoder) and Hybrid Distill.

References are written from the formulas in plain Python floats (float64), not with the code under test.
"""

import doctest
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import zoo.losses.feature as feature_module
from zoo.losses.feature import (
    DMAEFeatLoss,
    G2SDDecoderLoss,
    HybridFeatureLoss,
    HybridRelationLoss,
    ProgressiveMaskSchedule,
    attention_logits,
    keep_with_cls,
    ln0,
    masked_relations,
    redundant_token_keep,
)


def l2_normalise(v):
    n = math.sqrt(sum(x * x for x in v))
    return [x / n for x in v]


def layer_norm0(v, eps=1e-6):
    m = sum(v) / len(v)
    var = sum((x - m) ** 2 for x in v) / len(v)
    return [(x - m) / math.sqrt(var + eps) for x in v]


def smooth_l1(d, beta):
    return 0.5 * d * d / beta if abs(d) < beta else abs(d) - 0.5 * beta


def softmax(row):
    m = max(row)
    e = [math.exp(x - m) for x in row]
    return [x / sum(e) for x in e]


def kl(p, q):
    return sum(a * math.log(a / b) for a, b in zip(p, q) if a > 0)


def rand(*shape, seed=0, scale=1.0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


# --------------------------------------------------------------------------------------------- DMAE


def test_dmae_zero_when_projection_is_proportional_to_teacher_per_token():
    loss = DMAEFeatLoss(6, 6)
    with torch.no_grad():
        loss.projection.weight.copy_(torch.eye(6))
        loss.projection.bias.zero_()
    h_s = rand(2, 5, 6)
    per_token_scale = rand(2, 5, 1, seed=1).abs() + 0.5
    assert loss(h_s, h_s * per_token_scale).item() == pytest.approx(0.0, abs=1e-7)
    loss.distance = "l2"
    assert loss(h_s, h_s * per_token_scale).item() == pytest.approx(0.0, abs=1e-12)
    assert loss(h_s, rand(2, 5, 6, seed=2)).item() > 0


def dmae_reference(loss, h_s, h_t, distance):
    w, b = loss.projection.weight.tolist(), loss.projection.bias.tolist()
    total, count = 0.0, 0
    for s_seq, t_seq in zip(h_s.tolist(), h_t.tolist()):
        for s, t in zip(s_seq, t_seq):
            g = l2_normalise([sum(wi * x for wi, x in zip(row, s)) + bi for row, bi in zip(w, b)])
            n_t = l2_normalise(t)
            for a, c in zip(n_t, g):
                total += abs(a - c) if distance == "l1" else (a - c) ** 2
                count += 1
    return total / count


@pytest.mark.parametrize("distance", ["l1", "l2"])
def test_dmae_golden(distance):
    loss = DMAEFeatLoss(4, 5, distance=distance)
    h_s, h_t = rand(2, 3, 4, seed=3), rand(2, 3, 5, seed=4)
    assert loss(h_s, h_t).item() == pytest.approx(dmae_reference(loss, h_s, h_t, distance), rel=1e-5)


def test_dmae_projection_shapes_follow_official_heads():
    linears = lambda m: [tuple(x.weight.shape) for x in m.modules() if isinstance(x, nn.Linear)]
    gelus = lambda m: sum(isinstance(x, nn.GELU) for x in m.modules())
    fc = DMAEFeatLoss(768, 1024).projection
    assert linears(fc) == [(1024, 768)] and gelus(fc) == 0
    mlp1 = DMAEFeatLoss(8, 16, projection="mlp-1layer").projection
    assert linears(mlp1) == [(16, 8), (16, 16)] and gelus(mlp1) == 1
    mlp2 = DMAEFeatLoss(8, 16, projection="mlp-2layer").projection
    assert linears(mlp2) == [(16, 8), (16, 16), (16, 16), (16, 16)] and gelus(mlp2) == 2
    assert DMAEFeatLoss(8, 16, projection="mlp-2layer")(rand(2, 3, 8), rand(2, 3, 16)).isfinite()


def test_dmae_teacher_gets_no_grad_and_student_does():
    loss = DMAEFeatLoss(4, 6)
    h_s = rand(2, 3, 4).requires_grad_()
    h_t = rand(2, 3, 6, seed=1).requires_grad_()
    loss(h_s, h_t).backward()
    assert h_t.grad is None
    assert h_s.grad.abs().sum() > 0 and loss.projection.weight.grad.abs().sum() > 0


def test_dmae_rejects_bad_options_and_shapes():
    with pytest.raises(ValueError, match="projection"):
        DMAEFeatLoss(4, 4, projection="mlp-3layer")
    with pytest.raises(ValueError, match="distance"):
        DMAEFeatLoss(4, 4, distance="cos")
    with pytest.raises(ValueError, match="tokens"):
        DMAEFeatLoss(4, 4)(rand(2, 3, 4), rand(2, 4, 4))


# --------------------------------------------------------------------------------------------- G2SD


def test_ln0_targets_have_zero_mean_and_unit_variance_per_token():
    x = rand(3, 7, 16, scale=5.0) + 3.0
    y = ln0(x)
    assert torch.allclose(y.mean(-1), torch.zeros(3, 7), atol=1e-5)
    assert torch.allclose(y.var(-1, unbiased=False), torch.ones(3, 7), atol=1e-4)
    ref = nn.LayerNorm(16, eps=1e-6, elementwise_affine=False)(x)
    assert torch.allclose(y, ref, atol=1e-6)


def g2sd_reference(pred, target, selected, beta=2.0):
    total, count = 0.0, 0
    for b, (p_seq, t_seq) in enumerate(zip(pred.tolist(), target.tolist())):
        for i, (p, t) in enumerate(zip(p_seq, t_seq)):
            if not selected[b][i]:
                continue
            for a, c in zip(p, layer_norm0(t)):
                total += smooth_l1(a - c, beta)
                count += 1
    return total / count


def test_g2sd_golden_smooth_l1_beta_2_over_all_tokens():
    loss = G2SDDecoderLoss(4, 6)
    h_s, h_t = rand(2, 5, 4, scale=3.0), rand(2, 5, 6, seed=1, scale=4.0)
    pred = loss.head(h_s).detach()
    # Both branches of SL1_2 are exercised.
    diff = (pred - ln0(h_t)).abs()
    assert (diff < 2).any() and (diff >= 2).any()
    expected = g2sd_reference(pred, h_t, [[True] * 5] * 2)
    assert loss(h_s, h_t).item() == pytest.approx(expected, rel=1e-5)
    assert loss(h_s, h_t, mask=torch.zeros(2, 4)).item() == pytest.approx(expected, rel=1e-5)


def test_g2sd_head_defaults_and_official_init():
    loss = G2SDDecoderLoss(256, 512)
    shapes = [tuple(m.weight.shape) for m in loss.head.modules() if isinstance(m, nn.Linear)]
    assert shapes == [(512, 256), (512, 512)]
    assert all(m.bias.abs().sum() == 0 for m in loss.head.modules() if isinstance(m, nn.Linear))
    bound = math.sqrt(6 / (256 + 512))  # xavier-uniform bound of the first layer
    # xavier-uniform, not PyTorch's default (kaiming-uniform a=√5, whose bound is 1/√fan_in = 1/16)
    assert 1 / 16 < loss.head[0].weight.abs().max() <= bound
    assert [tuple(m.weight.shape) for m in G2SDDecoderLoss(4, 6, hidden=9).head if isinstance(m, nn.Linear)] == [
        (9, 4),
        (6, 9),
    ]


def test_g2sd_masked_only_variant_ignores_visible_tokens_and_cls():
    loss = G2SDDecoderLoss(4, 6, supervise_all=False)
    h_s, h_t = rand(2, 5, 4, scale=3.0), rand(2, 5, 6, seed=1, scale=4.0)
    patch_mask = torch.tensor([[1, 0, 1, 0], [0, 0, 1, 1]])
    selected = [[False] + [bool(v) for v in row] for row in patch_mask.tolist()]
    got = loss(h_s, h_t, patch_mask)
    assert got.item() == pytest.approx(g2sd_reference(loss.head(h_s).detach(), h_t, selected), rel=1e-5)
    # The same mask over the full sequence, CLS column 0, gives the same value.
    full_mask = torch.cat([torch.zeros(2, 1, dtype=torch.bool), patch_mask.bool()], dim=1)
    assert loss(h_s, h_t, full_mask).item() == pytest.approx(got.item(), rel=1e-6)
    # Changing CLS and visible tokens on either side leaves the loss unchanged.
    visible = ~full_mask
    h_s2 = torch.where(visible[..., None], rand(2, 5, 4, seed=7), h_s)
    h_t2 = torch.where(visible[..., None], rand(2, 5, 6, seed=8), h_t)
    assert loss(h_s2, h_t2, patch_mask).item() == pytest.approx(got.item(), rel=1e-6)
    # ... while supervising every token (the default), with the same head, sees the change
    every = G2SDDecoderLoss(4, 6)
    every.head.load_state_dict(loss.head.state_dict())
    assert every(h_s2, h_t2).item() != pytest.approx(every(h_s, h_t).item())


def test_g2sd_masked_only_needs_a_mask_and_handles_an_empty_one():
    loss = G2SDDecoderLoss(4, 6, supervise_all=False)
    h_s, h_t = rand(2, 5, 4).requires_grad_(), rand(2, 5, 6, seed=1)
    with pytest.raises(ValueError, match="mask"):
        loss(h_s, h_t)
    with pytest.raises(ValueError, match="mask"):
        loss(h_s, h_t, torch.ones(2, 3))
    out = loss(h_s, h_t, torch.zeros(2, 4))
    assert out.item() == 0.0
    out.backward()


def test_g2sd_teacher_gets_no_grad():
    loss = G2SDDecoderLoss(4, 6)
    h_s, h_t = rand(2, 5, 4).requires_grad_(), rand(2, 5, 6, seed=1).requires_grad_()
    loss(h_s, h_t).backward()
    assert h_t.grad is None and h_s.grad.abs().sum() > 0


# --------------------------------------------------------------------------------------------- Hybrid Distill


def test_attention_logits_is_scaled_dot_product():
    q, k = rand(2, 3, 5, 8), rand(2, 3, 5, 8, seed=1)
    assert torch.allclose(attention_logits(q, k), q @ k.transpose(-2, -1) / math.sqrt(8), atol=1e-6)
    assert torch.allclose(attention_logits(q, k, scale=0.5), 0.5 * q @ k.transpose(-2, -1), atol=1e-6)


def test_keep_with_cls_prepends_cls_and_shifts_patches():
    keep = keep_with_cls(torch.tensor([[0, 2, 5], [1, 3, 4]]))
    assert keep.tolist() == [[0, 1, 3, 6], [0, 2, 4, 5]]
    assert keep_with_cls(torch.tensor([[0, 2]]), num_prefix_tokens=2).tolist() == [[0, 1, 2, 4]]


def test_masked_relations_rows_sum_to_one_and_equal_the_submatrix_softmax():
    logits = rand(2, 3, 6, 6, scale=2.0)
    keep = torch.tensor([[0, 2, 3, 5], [0, 1, 4, 5]])
    rel = masked_relations(logits, keep)
    assert rel.shape == (2, 3, 4, 4)
    assert torch.allclose(rel.sum(-1), torch.ones(2, 3, 4), atol=1e-6)
    for b in range(2):
        idx = keep[b].tolist()
        for h in range(3):
            for r, i in enumerate(idx):
                expected = softmax([logits[b, h, i, j].item() for j in idx])
                assert rel[b, h, r].tolist() == pytest.approx(expected, rel=1e-5)


def test_masked_relations_with_every_token_kept_is_the_plain_softmax():
    logits = rand(2, 3, 6, 6, scale=2.0)
    keep = torch.arange(6).expand(2, -1)
    assert torch.allclose(masked_relations(logits, keep), logits.softmax(-1), atol=1e-6)


def gathered_logits(logits, keep):
    return torch.stack([logits[b][:, keep[b]][:, :, keep[b]] for b in range(len(keep))])


def test_hybrid_relation_zero_when_student_equals_gathered_teacher_relations():
    t = rand(2, 4, 7, 7, scale=2.0)
    keep = torch.tensor([[0, 1, 4, 6], [0, 2, 3, 5]])
    s = gathered_logits(t, keep)
    loss = HybridRelationLoss()
    assert loss(s, t, keep).item() == pytest.approx(0.0, abs=1e-6)
    # Relations, not logits, are matched: a per-row shift of the student logits changes nothing.
    assert loss(s + rand(2, 4, 4, 1, seed=3), t, keep).item() == pytest.approx(0.0, abs=1e-6)
    assert loss(rand(2, 4, 4, 4, seed=4), t, keep).item() > 0


def relation_reference(s, t, keep):
    """Batch 1, equal head counts: mean over heads and kept rows of KL(masked teacher softmax ‖ student softmax)."""
    total, rows = 0.0, 0
    for h in range(s.shape[1]):
        for r, i in enumerate(keep[0].tolist()):
            p_t = softmax([t[0, h, i, j].item() for j in keep[0].tolist()])
            p_s = softmax(s[0, h, r].tolist())
            total += kl(p_t, p_s)
            rows += 1
    return total / rows


def test_hybrid_relation_golden():
    t, s = rand(1, 2, 5, 5, scale=2.0), rand(1, 2, 3, 3, seed=1, scale=2.0)
    keep = torch.tensor([[0, 2, 3]])
    assert HybridRelationLoss()(s, t, keep).item() == pytest.approx(relation_reference(s, t, keep), rel=1e-5)


def test_hybrid_relation_head_reduction_when_head_counts_differ():
    t = rand(2, 4, 6, 6, scale=2.0)
    keep = torch.tensor([[0, 1, 3, 4], [0, 2, 3, 5]])
    rel_t = masked_relations(t, keep)
    # 'mean': one student head equal to the teacher's head-averaged relations → 0.
    s_mean = rel_t.mean(1, keepdim=True).log()
    assert HybridRelationLoss("mean")(s_mean, t, keep).item() == pytest.approx(0.0, abs=1e-6)
    # 'match': 2 student heads equal to the teacher's contiguous head pairs (0,1) and (2,3) → 0.
    s_match = rel_t.reshape(2, 2, 2, 4, 4).mean(2).log()
    assert HybridRelationLoss("match")(s_match, t, keep).item() == pytest.approx(0.0, abs=1e-6)
    # 'mean' ignores which student head is which; 'match' pairs them in order.
    swapped = s_match.flip(1)
    assert HybridRelationLoss("mean")(swapped, t, keep).item() == pytest.approx(0.0, abs=1e-6)
    assert HybridRelationLoss("match")(swapped, t, keep).item() > 1e-4
    # 'match' also groups the student side when it has more heads.
    s_more = s_match.repeat_interleave(2, dim=1)
    assert HybridRelationLoss("match")(s_more, t[:, :2], keep).item() > 0
    with pytest.raises(ValueError, match="divide"):
        HybridRelationLoss("match")(rand(2, 3, 4, 4), t[:, :2], keep)
    with pytest.raises(ValueError, match="head_reduction"):
        HybridRelationLoss("max")


def test_hybrid_relation_teacher_gets_no_grad():
    t = rand(2, 2, 5, 5).requires_grad_()
    s = rand(2, 2, 3, 3, seed=1).requires_grad_()
    keep = torch.tensor([[0, 1, 2], [0, 3, 4]])
    HybridRelationLoss()(s, t, keep).backward()
    assert t.grad is None and s.grad.abs().sum() > 0


def hybrid_feature_reference(pred, t_full, keep, beta=2.0):
    pred = pred.tolist()
    total, count = 0.0, 0
    for b in range(len(pred)):
        for r, i in enumerate(keep[b].tolist()):
            for a, c in zip(pred[b][r], layer_norm0(t_full[b, i].tolist())):
                total += smooth_l1(a - c, beta)
                count += 1
    return total / count


def test_hybrid_feature_golden_and_teacher_gets_no_grad():
    loss = HybridFeatureLoss(4, 6)
    s = rand(2, 3, 4, scale=3.0).requires_grad_()
    t_full = rand(2, 5, 6, seed=1, scale=4.0).requires_grad_()
    keep = torch.tensor([[0, 2, 4], [0, 1, 3]])
    out = loss(s, t_full, keep)
    assert out.item() == pytest.approx(hybrid_feature_reference(loss.head(s).detach(), t_full, keep), rel=1e-5)
    out.backward()
    assert t_full.grad is None and s.grad.abs().sum() > 0
    mse = HybridFeatureLoss(4, 6, distance="mse")
    mse.load_state_dict(loss.state_dict())
    target = ln0(torch.stack([t_full[b, keep[b]] for b in range(2)]))
    assert mse(s, t_full, keep).item() == pytest.approx(((loss.head(s) - target) ** 2).mean().item(), rel=1e-5)


def test_hybrid_losses_at_drop_ratio_zero_equal_the_unmasked_losses():
    b, heads, n, c = 2, 3, 8, 6
    cls_attention = rand(b, heads, n, seed=5).softmax(-1)
    keep = keep_with_cls(redundant_token_keep(cls_attention, 0.0))
    assert keep.tolist() == [list(range(n + 1))] * b
    s_logits, t_logits = rand(b, heads, n + 1, n + 1, seed=1), rand(b, heads, n + 1, n + 1, seed=2)
    unmasked = F.kl_div(s_logits.log_softmax(-1), t_logits.log_softmax(-1), log_target=True, reduction="none")
    rel = HybridRelationLoss()(s_logits, t_logits, keep)
    assert rel.item() == pytest.approx(unmasked.sum(-1).mean().item(), rel=1e-5)
    feat_loss = HybridFeatureLoss(4, c)
    s, t = rand(b, n + 1, 4, seed=3), rand(b, n + 1, c, seed=4)
    expected = F.smooth_l1_loss(feat_loss.head(s), ln0(t), beta=2.0)
    assert feat_loss(s, t, keep).item() == pytest.approx(expected.item(), rel=1e-6)


@pytest.mark.parametrize("ratio, kept", [(0.0, 10), (0.25, 7), (0.3, 7), (0.5, 5), (0.9, 1)])
def test_redundant_token_keep_keeps_the_most_attended(ratio, kept):
    attn = rand(3, 4, 10, seed=6).softmax(-1)
    keep = redundant_token_keep(attn, ratio)
    assert keep.shape == (3, kept) and keep.dtype == torch.long
    assert kept == 10 - math.floor(ratio * 10 + 0.5)
    score = attn.mean(1)
    for row, k in zip(score, keep):
        assert k.tolist() == sorted(k.tolist())
        dropped = [i for i in range(10) if i not in k.tolist()]
        if dropped:
            assert row[k].min() > row[dropped].max()
    assert torch.equal(redundant_token_keep(score, ratio), keep)


def test_redundant_token_keep_known_order_and_errors():
    attn = torch.tensor([[0.05, 0.4, 0.1, 0.3, 0.15]])
    assert redundant_token_keep(attn, 0.4).tolist() == [[1, 3, 4]]
    with pytest.raises(ValueError, match="drop_ratio"):
        redundant_token_keep(attn, 1.0)
    with pytest.raises(ValueError, match="leaves no patch"):
        redundant_token_keep(attn, 0.95)
    with pytest.raises(ValueError, match="attention"):
        redundant_token_keep(torch.rand(5), 0.2)


def test_progressive_mask_schedule_steps():
    s = ProgressiveMaskSchedule()
    got = [s(p) for p in (0.0, 0.2, 0.329, 0.33, 0.5, 0.659, 0.66, 0.9, 1.0)]
    assert got == [0.0, 0.0, 0.0, 0.15, 0.15, 0.15, 0.3, 0.3, 0.3]
    two = ProgressiveMaskSchedule(milestones=[0.5, 0.75], ratios=[0.2, 0.4])
    assert [two(0.1), two(0.5), two(0.8)] == [0.0, 0.2, 0.4]
    with pytest.raises(ValueError, match="progress"):
        s(1.5)
    with pytest.raises(ValueError, match="milestones"):
        ProgressiveMaskSchedule(milestones=[0.0, 0.5, 0.5], ratios=[0.0, 0.1, 0.2])
    with pytest.raises(ValueError, match="equal length"):
        ProgressiveMaskSchedule(milestones=[0.0], ratios=[0.0, 0.1])
    with pytest.raises(ValueError, match="ratios"):
        ProgressiveMaskSchedule(milestones=[0.0, 0.5], ratios=[0.0, 1.0])


def test_half_precision_inputs_reduce_in_float32():
    loss = DMAEFeatLoss(4, 6).half()
    assert loss(rand(2, 3, 4).half(), rand(2, 3, 6, seed=1).half()).dtype == torch.float32
    t = rand(1, 2, 5, 5).half()
    assert masked_relations(t, torch.tensor([[0, 1, 2]])).dtype == torch.float32


def test_docstring_examples():
    failures, tried = doctest.testmod(feature_module, extraglobs={"torch": torch}, verbose=False)[:2]
    assert tried > 0 and failures == 0


# --------------------------------------------------------------------------------------------- precision


def test_float64_inputs_give_the_float64_golden_values():
    dmae = DMAEFeatLoss(4, 5).double()
    h_s, h_t = rand(2, 3, 4, seed=3).double(), rand(2, 3, 5, seed=4).double()
    got = dmae(h_s, h_t)
    assert got.dtype == torch.float64
    assert got.item() == pytest.approx(dmae_reference(dmae, h_s, h_t, "l1"), rel=1e-12)

    g2sd = G2SDDecoderLoss(4, 6).double()
    h_s, h_t = rand(2, 5, 4, scale=3.0).double(), rand(2, 5, 6, seed=1, scale=4.0).double()
    got = g2sd(h_s, h_t)
    assert got.dtype == torch.float64
    assert got.item() == pytest.approx(g2sd_reference(g2sd.head(h_s).detach(), h_t, [[True] * 5] * 2), rel=1e-12)

    t, s = rand(1, 2, 5, 5, scale=2.0).double(), rand(1, 2, 3, 3, seed=1, scale=2.0).double()
    keep = torch.tensor([[0, 2, 3]])
    got = HybridRelationLoss()(s, t, keep)
    assert got.dtype == torch.float64
    assert got.item() == pytest.approx(relation_reference(s, t, keep), rel=1e-12)

    feat = HybridFeatureLoss(4, 6).double()
    s, t_full = rand(2, 3, 4, scale=3.0).double(), rand(2, 5, 6, seed=1, scale=4.0).double()
    keep = torch.tensor([[0, 2, 4], [0, 1, 3]])
    got = feat(s, t_full, keep)
    assert got.dtype == torch.float64
    assert got.item() == pytest.approx(hybrid_feature_reference(feat.head(s).detach(), t_full, keep), rel=1e-12)


def test_bfloat16_inputs_are_computed_in_float32():
    t, s = rand(2, 2, 5, 5, scale=2.0).bfloat16(), rand(2, 2, 3, 3, seed=1, scale=2.0).bfloat16()
    keep = torch.tensor([[0, 2, 3], [0, 1, 4]])
    half = HybridRelationLoss()(s, t, keep)
    assert half.dtype == torch.float32
    assert torch.equal(half, HybridRelationLoss()(s.float(), t.float(), keep))
    assert masked_relations(t, keep).dtype == torch.float32
    # The heads run in bfloat16 (their weights' dtype); the losses normalise and reduce their outputs in float32.
    cases = [
        (DMAEFeatLoss(4, 6), (rand(2, 3, 4), rand(2, 3, 6, seed=1))),
        (G2SDDecoderLoss(4, 6), (rand(2, 3, 4), rand(2, 3, 6, seed=1))),
        (HybridFeatureLoss(4, 6), (rand(2, 3, 4), rand(2, 5, 6, seed=1), keep)),
    ]
    for loss, args in cases:
        full = loss(*args)
        args16 = [a.bfloat16() if a.is_floating_point() else a for a in args]
        half = loss.bfloat16()(*args16)
        assert half.dtype == torch.float32
        assert half.item() == pytest.approx(full.item(), rel=0.05)
