"""TRG losses: tokens and sampler, inner (contextual), local (k-NN graph) and global (InfoNCE) terms."""

import math

import pytest
import torch
import torch.nn.functional as F

from zoo.losses import (
    TokenSampler,
    TRGGlobalLoss,
    TRGInnerLoss,
    TRGLocalLoss,
    feature_tokens,
    knn_graph,
    sample_token_positions,
)


# ----------------------------------------------------------------------------------------------- tokens
def test_feature_tokens_cnn_map_vit_prefix_and_grid_pooling():
    x = torch.randn(2, 5, 4, 6)
    tokens = feature_tokens(x)
    assert tokens.shape == (2, 24, 5)
    torch.testing.assert_close(tokens[1, 6 + 3], x[1, :, 1, 3])  # row-major locations
    pooled = feature_tokens(x, grid=2)
    torch.testing.assert_close(pooled, F.adaptive_avg_pool2d(x, 2).flatten(2).transpose(1, 2))
    vit = torch.randn(2, 1 + 16, 7)
    assert torch.equal(feature_tokens(vit, prefix_tokens=1), vit[:, 1:])
    as_map = vit[:, 1:].transpose(1, 2).reshape(2, 7, 4, 4)
    torch.testing.assert_close(feature_tokens(vit, prefix_tokens=1, grid=2), feature_tokens(as_map, grid=2))
    with pytest.raises(ValueError, match="square"):
        feature_tokens(torch.randn(2, 15, 7), grid=2)


def test_sampler_takes_the_same_m_distinct_positions_for_teacher_and_student():
    b, length, m = 3, 10, 4
    # token value = its (image, position), so a node reveals where it came from
    ids = torch.stack(torch.meshgrid(torch.arange(b), torch.arange(length), indexing="ij"), -1).float()
    student, teacher = ids, torch.cat([ids, -ids], -1)
    (s, t), positions = TokenSampler(m)(student, teacher)
    assert s.shape == (b * m, 2) and t.shape == (b * m, 4) and positions.shape == (b, m)
    assert torch.equal(t[:, :2], s)  # same positions on both sides
    assert torch.equal(s[:, 0].long(), torch.arange(b).repeat_interleave(m))  # exactly m per image, image-major
    assert torch.equal(s[:, 1].long().view(b, m), positions)
    for row in positions:
        assert len(set(row.tolist())) == m
    torch.manual_seed(1)
    first = sample_token_positions(b, length, m)
    torch.manual_seed(1)
    assert torch.equal(first, sample_token_positions(b, length, m))  # seeded by the torch RNG
    with pytest.raises(ValueError, match="same"):
        TokenSampler(m)(student, teacher[:, :5])
    with pytest.raises(ValueError, match="m must be"):
        TokenSampler(11)(student)


# ----------------------------------------------------------------------------------------------- inner
def test_inner_is_zero_for_equal_tokens_positive_otherwise_and_rows_sum_to_one():
    loss = TRGInnerLoss()
    t = torch.randn(2, 6, 8)
    cs = loss.contextual_similarity(t)
    torch.testing.assert_close(cs.sum(-1), torch.ones(2, 6))
    assert float(loss(t, t)) == 0.0
    s = torch.randn(2, 6, 3)  # another width: each side scales by its own √D
    value = loss(s, t)
    assert float(value) > 0
    d = s.double()
    cs_s = torch.softmax(d @ d.transpose(1, 2) / math.sqrt(3), -1)
    d = t.double()
    cs_t = torch.softmax(d @ d.transpose(1, 2) / math.sqrt(8), -1)
    expected = ((cs_t - cs_s) ** 2).sum(-1).mean()
    assert float(value) == pytest.approx(float(expected), rel=1e-5)


# ----------------------------------------------------------------------------------------------- local
def _local_reference(s, t, k, sigma=None, direction="ts"):
    """Float64 loops: the teacher's k nearest (self excluded), kernel on both sides, KL of row softmaxes."""
    s, t = F.normalize(s.double(), dim=-1), F.normalize(t.double(), dim=-1)
    n = t.shape[0]
    neighbours = []
    for i in range(n):
        d = [((t[i] - t[j]) ** 2).sum().item() if j != i else math.inf for j in range(n)]
        neighbours.append(sorted(range(n), key=lambda j: d[j])[:k])
    if sigma is None:
        sigma = sum(((t[i] - t[j]) ** 2).sum().item() for i in range(n) for j in neighbours[i]) / (n * k)
    total = 0.0
    for i in range(n):
        a_t = torch.stack([torch.exp(-((t[i] - t[j]) ** 2).sum() / (2 * sigma)) for j in neighbours[i]])
        a_s = torch.stack([torch.exp(-((s[i] - s[j]) ** 2).sum() / (2 * sigma)) for j in neighbours[i]])
        p, q = torch.softmax(a_t, 0), torch.softmax(a_s, 0)
        total += float((p * (p / q).log()).sum() if direction == "ts" else (q * (q / p).log()).sum())
    return total / n, sigma


def test_local_is_zero_for_equal_tokens_and_matches_a_float64_reference():
    t = torch.randn(12, 5)
    assert float(TRGLocalLoss(k=3)(t, t)) == 0.0
    s = torch.randn(12, 4)
    expected, _ = _local_reference(s, t, k=3)
    assert float(TRGLocalLoss(k=3)(s, t)) == pytest.approx(expected, rel=1e-4)
    flipped, _ = _local_reference(s, t, k=3, direction="st")
    assert float(TRGLocalLoss(k=3, direction="student_teacher")(s, t)) == pytest.approx(flipped, rel=1e-4)
    fixed, _ = _local_reference(s, t, k=3, sigma=0.25)
    assert float(TRGLocalLoss(k=3, sigma=0.25)(s, t)) == pytest.approx(fixed, rel=1e-4)


def test_sigma_from_data_is_the_mean_squared_knn_distance_of_the_teacher():
    t = torch.randn(10, 3)
    idx, d2, sigma = TRGLocalLoss(k=4, normalize=False).teacher_graph(t)
    n = t.shape[0]
    brute = torch.cdist(t.double(), t.double()) ** 2
    brute.fill_diagonal_(math.inf)
    nearest = brute.topk(4, dim=1, largest=False)
    assert torch.equal(idx.sort(1).values, nearest.indices.sort(1).values)
    assert float(sigma) == pytest.approx(float(nearest.values.mean()), rel=1e-5)
    assert idx.shape == (n, 4) and d2.shape == (n, n)


def test_local_uses_the_teacher_knn_set():
    # teacher nodes on a line: each node's 2 nearest are its neighbours on the line
    t = torch.tensor([[0.0], [1.0], [2.1], [3.3], [4.6], [6.0], [7.5], [9.1]])
    loss = TRGLocalLoss(k=2, normalize=False)
    s = torch.randn(8, 3)
    idx, _ = knn_graph(t, 2)
    assert torch.equal(idx[3].sort().values, torch.tensor([2, 4]))
    assert not torch.equal(knn_graph(s, 2)[0].sort(1).values, idx.sort(1).values)  # the student's own k-NN differ
    value = loss(s, t)
    assert float(value) == pytest.approx(_local_reference_unnormalised(s, t, idx), rel=1e-4)
    # with each graph's own neighbour sets the value changes
    own = TRGLocalLoss(k=2, normalize=False, knn_source="own", support="all")(s, t)
    teachers = TRGLocalLoss(k=2, normalize=False, support="all")(s, t)
    assert float(own) != pytest.approx(float(teachers))
    with pytest.raises(ValueError, match="support='all'"):
        TRGLocalLoss(knn_source="own")


def _local_reference_unnormalised(s, t, idx):
    s, t = s.double(), t.double()
    d_t = torch.cdist(t, t) ** 2
    sigma = d_t.gather(1, idx).mean()
    d_s = torch.cdist(s, s) ** 2
    p = torch.softmax(torch.exp(-d_t.gather(1, idx) / (2 * sigma)), 1)
    q = torch.softmax(torch.exp(-d_s.gather(1, idx) / (2 * sigma)), 1)
    return float((p * (p / q).log()).sum(1).mean())


def test_local_and_inner_give_the_teacher_no_gradient():
    t = torch.randn(16, 6, requires_grad=True)
    s = torch.randn(16, 6, requires_grad=True)
    (TRGLocalLoss(k=3)(s, t) + TRGLocalLoss(k=3, support="all")(s, t)).backward()
    tt = torch.randn(2, 8, 6, requires_grad=True)
    ss = torch.randn(2, 8, 6, requires_grad=True)
    TRGInnerLoss()(ss, tt).backward()
    assert t.grad is None and tt.grad is None
    assert s.grad is not None and ss.grad is not None and torch.isfinite(s.grad).all()


# ----------------------------------------------------------------------------------------------- global
def test_global_matches_a_float64_infonce_reference():
    s, t = torch.randn(5, 4), torch.randn(5, 4)
    loss = TRGGlobalLoss(tau_start=0.5, tau_end=0.1)
    tau = loss.temperature(0.25)
    assert tau == pytest.approx(0.4)
    sd, td = F.normalize(s.double(), dim=1), F.normalize(t.double(), dim=1)
    expected = 0.0
    for i in range(5):
        sims = torch.stack([sd[i] @ td[j] for j in range(5)]) / tau
        expected -= float(sims[i] - torch.logsumexp(sims, 0))
    expected /= 5
    assert float(loss(s, t, progress=0.25)) == pytest.approx(expected, rel=1e-5)


def test_global_vanishes_for_aligned_separated_tokens_at_low_temperature():
    loss = TRGGlobalLoss(tau_start=0.5, tau_end=0.01)
    x = torch.eye(16) * 3.0  # orthogonal nodes, student = teacher
    assert float(loss(x, x, progress=1.0)) < 1e-6
    assert float(loss(x, x, progress=0.0)) > float(loss(x, x, progress=1.0))
    assert float(loss(x, x.roll(1, 0), progress=1.0)) > 10  # misaligned: the positive is the wrong node


def test_temperature_schedule_endpoints_and_clamping():
    loss = TRGGlobalLoss()
    assert loss.temperature(0.0) == 0.5 and loss.temperature(1.0) == 0.1
    assert loss.temperature(0.5) == pytest.approx(0.3)
    assert loss.temperature(-1.0) == 0.5 and loss.temperature(2.0) == 0.1
    with pytest.raises(ValueError, match="positive"):
        TRGGlobalLoss(tau_end=0.0)


# ----------------------------------------------------------------------------------------------- precision
def _global_reference(s, t, tau):
    sd, td = F.normalize(s.double(), dim=1), F.normalize(t.double(), dim=1)
    total = 0.0
    for i in range(s.shape[0]):
        sims = [float(sd[i] @ td[j]) / tau for j in range(t.shape[0])]
        total -= sims[i] - math.log(sum(math.exp(v) for v in sims))
    return total / s.shape[0]


def _inner_reference(s, t):
    def cs(x):
        x = x.double()
        return torch.softmax(x @ x.transpose(1, 2) / math.sqrt(x.shape[-1]), -1)

    return float(((cs(t) - cs(s)) ** 2).sum(-1).mean())


def test_float64_tokens_give_the_float64_golden_values():
    g = torch.Generator().manual_seed(3)
    s, t = torch.randn(12, 4, generator=g, dtype=torch.float64), torch.randn(12, 5, generator=g, dtype=torch.float64)
    local = TRGLocalLoss(k=3)(s, t)
    assert local.dtype == torch.float64
    assert float(local) == pytest.approx(_local_reference(s, t, k=3)[0], rel=1e-10)
    s_proj = torch.randn(12, 5, generator=g, dtype=torch.float64)
    glob = TRGGlobalLoss()(s_proj, t, progress=0.5)
    assert glob.dtype == torch.float64
    assert float(glob) == pytest.approx(_global_reference(s_proj, t, 0.3), rel=1e-12)
    s3, t3 = s.view(2, 6, 4), t.view(2, 6, 5)
    inner = TRGInnerLoss()(s3, t3)
    assert inner.dtype == torch.float64
    assert float(inner) == pytest.approx(_inner_reference(s3, t3), rel=1e-12)


def test_bfloat16_tokens_are_computed_in_float32():
    g = torch.Generator().manual_seed(4)
    s, t = torch.randn(12, 5, generator=g).bfloat16(), torch.randn(12, 5, generator=g).bfloat16()
    cases = [
        (TRGLocalLoss(k=3), (s, t)),
        (TRGGlobalLoss(), (s, t)),
        (TRGInnerLoss(), (s.view(2, 6, 5), t.view(2, 6, 5))),
    ]
    for loss, args in cases:
        half = loss(*args)
        assert half.dtype == torch.float32
        assert torch.equal(half, loss(*(a.float() for a in args)))
