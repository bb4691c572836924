"""MIM methods: MAE pre-training (and its extension hooks), fine-tuning with layer decay, linear probing."""

import copy

import lightning as L
import pytest
import torch
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

from zoo.methods.mim import FineTune, LinearProbe, MAEPass, MAEPretrain
from zoo.models.mae import MAEEncoderModel, MAEModel, PatchMask

TINY = {
    "embed_dim": 32,
    "depth": 3,
    "num_heads": 2,
    "decoder_embed_dim": 16,
    "decoder_depth": 2,
    "decoder_num_heads": 2,
}


def loader(n: int = 16, classes: int = 10) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 1, 16, 16, generator=g)
    y = torch.randint(0, classes, (n,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=8)


def trainer(tmp_path, **kw) -> L.Trainer:
    defaults = {
        "accelerator": "cpu",
        "max_steps": 2,
        "logger": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "enable_checkpointing": False,
        "default_root_dir": tmp_path,
        "limit_val_batches": 1,
        "num_sanity_val_steps": 0,
    }
    return L.Trainer(**{**defaults, **kw})


def adamw(params):
    return torch.optim.AdamW(params, lr=1e-3, betas=(0.9, 0.95), weight_decay=0.05)


def test_mae_pretrain_two_steps_logs_reconstruction(tmp_path):
    model = MAEPretrain(MAEModel("mae_vit_tiny_digits", overrides=TINY), in_chans=1, optimizer=adamw)
    before = copy.deepcopy(model.student.state_dict())
    t = trainer(tmp_path)
    t.fit(model, train_dataloaders=loader(), val_dataloaders=loader())
    changed = {k for k, v in model.student.state_dict().items() if not torch.equal(v, before[k])}
    assert any(k.startswith("encoder.blocks.") for k in changed) and "decoder_pred.weight" in changed
    assert "encoder.pos_embed" not in changed and "decoder_pos_embed" not in changed  # fixed sin-cos
    logged = t.logged_metrics
    assert {"train/loss_rec", "train/loss", "val/loss_rec"} <= set(logged)
    assert not any(k.startswith("val/acc") for k in logged)
    # validation masks come from a fixed seed: the same loss twice
    first = t.validate(model, loader(), verbose=False)[0]["val/loss_rec"]
    assert t.validate(model, loader(), verbose=False)[0]["val/loss_rec"] == first
    assert model(torch.randn(2, 1, 16, 16)).shape == (2, 32)


class _WithBlockTerm(MAEPretrain):
    """A subclass as DMAE/G2SD would write one: a raw encoder block and the decoder hidden of the same pass."""

    student_blocks = (1,)

    def pretrain_terms(self, x: Tensor, mask: PatchMask, student: MAEPass) -> dict[str, Tensor]:
        terms = super().pretrain_terms(x, mask, student)
        self.seen = (mask, student)
        terms["extra"] = 0.1 * student.blocks[1].pow(2).mean() + 0.0 * student.hidden.sum()
        return terms


def test_pretrain_hooks_share_one_mask_per_step(tmp_path):
    model = _WithBlockTerm(MAEModel("mae_vit_tiny_digits", overrides=TINY), in_chans=1, mask_ratio=0.5)
    t = trainer(tmp_path)  # 2 steps = one epoch, then validation
    t.fit(model, train_dataloaders=loader(), val_dataloaders=loader())
    mask, student = model.seen
    assert student.mask is mask
    assert student.blocks[1].shape == (8, 1 + 8, 32) and student.hidden.shape == (8, 1 + 16, 16)
    logged = t.logged_metrics
    assert {"train/loss_extra", "val/loss_extra", "val/loss"} <= set(logged)
    total = float(logged["train/loss_rec"]) + float(logged["train/loss_extra"])
    assert float(logged["train/loss"]) == pytest.approx(total, rel=1e-5)


def test_pretrain_rejects_a_student_that_is_not_an_mae():
    with pytest.raises(TypeError, match="MaskedAutoencoder"):
        MAEPretrain(MAEEncoderModel("mae_vit_tiny_digits", overrides=TINY), num_classes=10, in_chans=1)


def test_fine_tune_two_steps_with_layer_decay(tmp_path):
    student = MAEEncoderModel("mae_vit_tiny_digits", num_classes=10, overrides=TINY, drop_path_rate=0.1)
    model = FineTune(student, num_classes=10, in_chans=1, layer_decay=0.5, label_smoothing=0.1, optimizer=adamw)
    optimizer = model.configure_optimizers()
    scales = {}
    for group in optimizer.param_groups:
        names = {n for n, p in model.named_parameters() if any(p is q for q in group["params"])}
        for n in names:
            scales[n] = (group["lr"], group.get("weight_decay"))
    depth = 3
    assert scales["student.head.weight"] == pytest.approx((1e-3, 0.05))
    assert scales["student.blocks.2.attn.qkv.weight"] == pytest.approx((1e-3 * 0.5, 0.05))
    assert scales["student.blocks.0.attn.qkv.weight"] == pytest.approx((1e-3 * 0.5**depth, 0.05))
    assert scales["student.patch_embed.proj.weight"] == pytest.approx((1e-3 * 0.5 ** (depth + 1), 0.05))
    assert scales["student.blocks.0.norm1.weight"][1] == 0.0 and scales["student.cls_token"][1] == 0.0
    assert len(scales) == len(list(model.parameters()))
    before = copy.deepcopy(model.student.state_dict())
    t = trainer(tmp_path)
    t.fit(model, train_dataloaders=loader(), val_dataloaders=loader())
    assert not torch.equal(model.student.blocks[0].attn.qkv.weight, before["blocks.0.attn.qkv.weight"])
    assert {"train/loss_ce", "val/acc"} <= set(t.logged_metrics)


class _ModeCheck(L.Callback):
    def __init__(self) -> None:
        self.modes: list[tuple[bool, bool, bool]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        s = pl_module.student
        self.modes.append((s.blocks.training, s.patch_embed.training, pl_module.probe.training))


def test_linear_probe_trains_only_the_head_and_keeps_the_encoder_in_eval(tmp_path):
    student = MAEEncoderModel(
        "mae_vit_tiny_digits", num_classes=10, overrides=TINY, global_pool="token", head_init_std=0.01
    )
    model = LinearProbe(student, num_classes=10, in_chans=1, optimizer=adamw)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"student.head.1.weight", "student.head.1.bias"}
    before = copy.deepcopy(model.student.state_dict())
    check = _ModeCheck()
    t = trainer(tmp_path, callbacks=[check])
    t.fit(model, train_dataloaders=loader(), val_dataloaders=loader())
    assert check.modes == [(False, False, True)] * 2
    changed = {k for k, v in model.student.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == {
        "head.1.weight",
        "head.1.bias",
        "head.0.running_mean",
        "head.0.running_var",
        "head.0.num_batches_tracked",
    }
    assert {"val/acc", "train/loss_ce"} <= set(t.logged_metrics)
    model.eval()
    with torch.no_grad():
        x = torch.randn(4, 1, 16, 16)
        pre = model.student.forward_head(model.student.forward_features(x), pre_logits=True)
        torch.testing.assert_close(model.folded_head()(pre), model(x), rtol=1e-4, atol=1e-5)
