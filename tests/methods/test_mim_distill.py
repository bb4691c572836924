"""DMAE, G2SD and Hybrid Distill: one mask shared with the teachers, partial teacher runs, frozen teachers."""

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from zoo.methods import DMAE, G2SDGeneric, G2SDSpecific, HybridDistill
from zoo.models import MAEEncoderModel, MAEModel

STUDENT = MAEModel("mae_vit_tiny_digits")
TEACHER = MAEModel("mae_vit_d128_patch4_dec64d4b", img_size=16, in_chans=1)
VIT = MAEEncoderModel("mae_vit_d128_patch4_dec64d4b", img_size=16, in_chans=1, global_pool="token")


def data(n=4):
    torch.manual_seed(0)
    return DataLoader(TensorDataset(torch.randn(n, 1, 16, 16), torch.randint(0, 10, (n,))), batch_size=n)


def fit(method, steps=1):
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    trainer.fit(method, data())
    return trainer


@pytest.mark.parametrize("cls", [DMAE, G2SDGeneric])
def test_teacher_sees_the_students_mask_and_stays_frozen(cls, monkeypatch):
    kwargs = {"student_block": 2, "teacher_block": 3} if cls is DMAE else {"teacher_decoder_blocks": 2}
    method = cls(STUDENT, TEACHER, num_classes=10, in_chans=1, **kwargs)
    teacher = method.teacher.members[0]
    seen = {}
    original = teacher.forward_encoder

    def spy(x, ids_keep=None, upto=None, **kw):
        seen["ids_keep"], seen["upto"] = ids_keep, upto
        return original(x, ids_keep, upto=upto, **kw)

    monkeypatch.setattr(teacher, "forward_encoder", spy)
    masks = []
    original_pass = method.student_pass
    monkeypatch.setattr(method, "student_pass", lambda x, mask: masks.append(mask) or original_pass(x, mask))
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    trainer = fit(method)
    assert torch.equal(seen["ids_keep"], masks[-1].ids_keep)  # one mask for both
    if cls is DMAE:
        assert seen["upto"] == 3  # the teacher stops at block k_T (partial execution)
    assert all(torch.equal(v, before[k]) for k, v in teacher.state_dict().items())
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    key = "train/loss_feat" if cls is DMAE else "train/loss_gd"
    assert torch.isfinite(trainer.logged_metrics[key])


def test_g2sd_specific_predicts_the_mean_of_its_two_heads():
    method = G2SDSpecific(MAEEncoderModel("mae_vit_tiny_digits", global_pool="token"), VIT, num_classes=10, in_chans=1)
    x = torch.randn(2, 1, 16, 16)
    method.eval()
    z_cls, z_dist = method.two_heads(x)
    torch.testing.assert_close(method(x), (z_cls + z_dist) / 2)
    trainer = fit(method)
    assert {"train/loss_ce", "train/loss_dist"} <= set(trainer.logged_metrics)

    before = method.dist_token.detach().clone()
    fit(method)
    assert not torch.equal(method.dist_token.detach(), before)  # the distillation token is trained


def test_hybrid_keeps_the_most_attended_patches_and_both_teachers_frozen():
    method = HybridDistill(
        STUDENT, VIT, TEACHER, num_classes=10, in_chans=1, milestones=[0.0], drop_ratios=[0.5]
    )
    x = torch.randn(2, 1, 16, 16)
    method.train()
    method.drop_ratio = lambda: 0.5
    mask = method.mask_for(x)
    assert mask.ids_keep.shape == (2, 8)  # (1 − 0.5)·16 patches reach the student
    assert torch.equal(mask.mask.sum(1), torch.full((2,), 8.0))
    passed = method.student_pass(x, mask)
    assert passed.latent.shape[1] == 1 + 8
    terms = method.pretrain_terms(x, mask, passed)
    assert set(terms) == {"feat", "rel"} and all(torch.isfinite(v) for v in terms.values())
    method.drop_ratio = lambda: 0.0
    assert method.mask_for(x).ids_keep.shape == (2, 16)
    sum(terms.values()).backward()
    for teacher in method.teachers.values():
        assert all(p.grad is None for p in teacher.parameters())


def test_hybrid_ranks_patches_by_the_teachers_real_cls_attention():
    """Kept = top patches of the last block's CLS row, softmax over all tokens (CLS column included), head mean."""
    method = HybridDistill(STUDENT, VIT, TEACHER, num_classes=10, in_chans=1)
    method.train()
    method.drop_ratio = lambda: 0.5
    block = method.teacher.members[0].blocks[-1].attn
    seen = {}
    handle = block.qkv.register_forward_hook(lambda m, a, out: seen.update(qkv=out))
    torch.manual_seed(1)
    x = torch.randn(3, 1, 16, 16)
    mask = method.mask_for(x)
    handle.remove()
    b, t, _ = seen["qkv"].shape
    q, k, _v = seen["qkv"].reshape(b, t, 3, block.num_heads, -1).permute(2, 0, 3, 1, 4)
    attention = (q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5).softmax(-1)  # (B, H, T, T), rows sum to 1
    expected = attention[:, :, 0, 1:].mean(1).topk(8, dim=1).indices.sort(dim=1).values
    assert torch.equal(mask.ids_keep, expected)


def test_hybrid_relation_term_sums_over_layers():
    """D_r is summed over I (the paper's Σ); ``relation_reduction='mean'`` divides by |I|."""
    terms = {}
    for reduction in ("sum", "mean"):
        torch.manual_seed(0)
        method = HybridDistill(STUDENT, VIT, TEACHER, num_classes=10, in_chans=1, relation_reduction=reduction)
        method.train()
        method.drop_ratio = lambda: 0.25
        x = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(2))
        mask = method.mask_for(x)
        terms[reduction] = method.pretrain_terms(x, mask, method.student_pass(x, mask))["rel"]
    assert len(method.relation_layers) == 3
    assert terms["sum"].item() == pytest.approx(3 * terms["mean"].item(), rel=1e-5)
    # the sum is the three single-layer terms added up (each from its own method, same mask and weights)
    single = []
    for layer in range(3):
        torch.manual_seed(0)
        one = HybridDistill(STUDENT, VIT, TEACHER, num_classes=10, in_chans=1, relation_layers=[layer])
        one.train()
        one.drop_ratio = lambda: 0.25
        x = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(2))
        mask = one.mask_for(x)
        single.append(one.pretrain_terms(x, mask, one.student_pass(x, mask))["rel"].item())
    assert len(set(single)) == 3 and terms["sum"].item() == pytest.approx(sum(single), rel=1e-5)
    with pytest.raises(ValueError, match="relation_reduction"):
        HybridDistill(STUDENT, VIT, TEACHER, num_classes=10, in_chans=1, relation_reduction="max")
