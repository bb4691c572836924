"""MAE model: shared masks, partial execution, the masked loss, checkpoint key mapping, the encoder as a ViT."""

import math

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from zoo.models.mae import (
    MAEEncoderModel,
    MAEModel,
    MaskedAutoencoder,
    create_mae,
    mae_keys_from_official,
    mae_keys_to_official,
    random_masking,
    sincos_pos_embed,
)

TINY = {
    "embed_dim": 32,
    "depth": 3,
    "num_heads": 2,
    "decoder_embed_dim": 16,
    "decoder_depth": 2,
    "decoder_num_heads": 2,
}


def tiny(**kw) -> MaskedAutoencoder:
    return create_mae("mae_vit_tiny_digits", **{**TINY, **kw}).eval()


def images(n: int = 3, size: int = 16, chans: int = 1) -> torch.Tensor:
    return torch.randn(n, chans, size, size)


def test_sincos_pos_embed_matches_mae_layout():
    d, g = 16, 3
    emb = sincos_pos_embed(d, g)
    assert emb.shape == (1 + g * g, d)
    assert torch.all(emb[0] == 0)
    q = d // 4
    for r in range(g):
        for c in range(g):
            row = emb[1 + r * g + c].double()
            for k in range(q):
                w = 1.0 / 10000 ** (k / q)
                # first half: the column index (MAE's meshgrid(w, h)), second half: the row index
                assert row[k] == pytest.approx(math.sin(c * w), abs=1e-6)
                assert row[q + k] == pytest.approx(math.cos(c * w), abs=1e-6)
                assert row[2 * q + k] == pytest.approx(math.sin(r * w), abs=1e-6)
                assert row[3 * q + k] == pytest.approx(math.cos(r * w), abs=1e-6)


def test_random_masking_keeps_floor_n_times_one_minus_r():
    ids_keep, ids_restore, mask = random_masking(4, 16, 0.75, generator=torch.Generator().manual_seed(1))
    assert ids_keep.shape == (4, 4) and ids_restore.shape == (4, 16)
    assert torch.all(mask.sum(1) == 12)
    assert torch.all(torch.gather(mask, 1, ids_keep) == 0)
    # ids_restore inverts the shuffle whose first K entries are ids_keep
    shuffle = ids_restore.argsort(1)
    assert torch.equal(shuffle[:, :4], ids_keep)
    again = random_masking(4, 16, 0.75, generator=torch.Generator().manual_seed(1))
    assert torch.equal(again.ids_keep, ids_keep)


def test_shared_mask_teacher_and_student_see_the_same_patches():
    student, teacher = tiny(), tiny(embed_dim=48, depth=4, num_heads=4)
    x = images()
    noise = torch.rand(3, student.num_patches)
    m_s, m_t = student.mask(x, 0.75, noise=noise), teacher.mask(x, 0.75, noise=noise)
    assert torch.equal(m_s.ids_keep, m_t.ids_keep) and torch.equal(m_s.mask, m_t.mask)
    mask = m_s
    # Changing masked pixels changes neither latent; changing a kept patch changes both.
    hidden = student.unpatchify(mask.mask.unsqueeze(-1).expand(-1, -1, 16))
    x_masked_changed = x + 5.0 * hidden
    kept = 1.0 - hidden
    x_kept_changed = x + 5.0 * kept
    with torch.no_grad():
        for model in (student, teacher):
            ref, _ = model.forward_encoder(x, mask.ids_keep)
            same, _ = model.forward_encoder(x_masked_changed, mask.ids_keep)
            other, _ = model.forward_encoder(x_kept_changed, mask.ids_keep)
            assert ref.shape[1] == 1 + mask.ids_keep.shape[1]
            torch.testing.assert_close(same, ref)
            assert not torch.allclose(other, ref)


def test_encoder_without_mask_equals_timm_forward_features():
    model = tiny()
    x = images()
    with torch.no_grad():
        ours, _ = model.forward_encoder(x)
        torch.testing.assert_close(ours, model.encoder.forward_features(x))


def test_forward_encoder_upto_is_partial_execution():
    model = tiny()
    x = images()
    mask = model.mask(x, 0.5)
    with torch.no_grad():
        full, blocks = model.forward_encoder(x, mask.ids_keep, return_blocks=(0, 1, -1))
        for k in (0, 1):
            part, part_blocks = model.forward_encoder(x, mask.ids_keep, upto=k, return_blocks=(k,))
            assert torch.equal(part, blocks[k])  # raw block output, no final norm after an early stop
            assert torch.equal(part_blocks[k], blocks[k])
        torch.testing.assert_close(model.encoder.norm(blocks[-1]), full)
        raw, _ = model.forward_encoder(x, mask.ids_keep, final_norm=False)
        assert torch.equal(raw, blocks[-1])
    with pytest.raises(ValueError, match="after upto"):
        model.forward_encoder(x, mask.ids_keep, upto=0, return_blocks=(1,))
    with pytest.raises(ValueError, match="out of range"):
        model.forward_encoder(x, mask.ids_keep, upto=3)


def test_forward_decoder_upto_equals_full_hidden_after_that_block():
    model = tiny()
    x = images()
    mask = model.mask(x)
    seen = {}
    handle = model.decoder_blocks[0].register_forward_hook(lambda _m, _a, out: seen.__setitem__("b0", out))
    with torch.no_grad():
        latent, _ = model.forward_encoder(x, mask.ids_keep)
        pred, hidden = model.forward_decoder(latent, mask.ids_restore, return_hidden=True)
        handle.remove()
        part_pred, part = model.forward_decoder(latent, mask.ids_restore, upto=1, return_hidden=True)
        assert part_pred is None
        assert part.shape == (3, 1 + model.num_patches, 16)
        assert torch.equal(part, seen["b0"])
        assert pred.shape == (3, model.num_patches, 16)
        torch.testing.assert_close(model.decoder_pred(model.decoder_norm(hidden))[:, 1:], pred)
        no_norm, _ = model.forward_decoder(latent, mask.ids_restore, return_hidden=True, apply_norm=False)
        torch.testing.assert_close(no_norm, model.decoder_pred(hidden)[:, 1:])
    with pytest.raises(ValueError, match="return_hidden"):
        model.forward_decoder(latent, mask.ids_restore, upto=1)


def test_patchify_matches_official_layout_and_round_trips():
    model = tiny(in_chans=3)
    x = images(chans=3)
    p = 4
    official = torch.einsum("nchpwq->nhwpqc", x.reshape(3, 3, 4, p, 4, p)).reshape(3, 16, p * p * 3)
    assert torch.equal(model.patchify(x), official)
    assert torch.equal(model.unpatchify(model.patchify(x)), x)


@pytest.mark.parametrize("norm_pix", [False, True])
def test_reconstruction_loss_counts_only_masked_patches(norm_pix):
    model = tiny(norm_pix_loss=norm_pix)
    x = images()
    mask = model.mask(x).mask
    pred = torch.randn(3, 16, 16)
    loss = model.reconstruction_loss(x, pred, mask)
    visible = pred + 10.0 * (1 - mask).unsqueeze(-1)
    assert model.reconstruction_loss(x, visible, mask) == pytest.approx(float(loss))
    masked = pred + 10.0 * mask.unsqueeze(-1)
    assert float(model.reconstruction_loss(x, masked, mask)) > float(loss) + 1
    if not norm_pix:  # golden: mean over masked patches of the per-patch mean squared error, in float64
        err = ((pred.double() - model.patchify(x).double()) ** 2).mean(-1)
        expected = (err * mask.double()).sum() / mask.double().sum()
        assert float(loss) == pytest.approx(float(expected), rel=1e-5)


def test_forward_returns_loss_pred_mask():
    model = tiny()
    loss, pred, mask = model(images(), mask_ratio=0.75)
    assert loss.ndim == 0 and pred.shape == (3, 16, 16) and mask.shape == (3, 16)
    assert not model.encoder.pos_embed.requires_grad


def test_official_checkpoint_round_trip(tmp_path):
    source = tiny()
    official = mae_keys_to_official(source.state_dict())
    for key in (
        "cls_token",
        "pos_embed",
        "patch_embed.proj.weight",
        "blocks.0.attn.qkv.weight",
        "norm.weight",
        "mask_token",
        "decoder_embed.weight",
        "decoder_pos_embed",
        "decoder_blocks.1.mlp.fc2.bias",
        "decoder_norm.weight",
        "decoder_pred.weight",
    ):
        assert key in official
    assert not any(k.startswith("encoder.") for k in official)
    assert mae_keys_from_official(official).keys() == source.state_dict().keys()
    path = tmp_path / "mae_pretrain_tiny.pth"
    torch.save({"model": official}, path)
    loaded = MAEModel("mae_vit_tiny_digits", checkpoint=str(path), overrides=TINY).build().eval()
    x = images()
    mask = source.mask(x)
    with torch.no_grad():
        for model_a, model_b in ((source, loaded),):
            la, _ = model_a.forward_encoder(x, mask.ids_keep)
            lb, _ = model_b.forward_encoder(x, mask.ids_keep)
            assert torch.equal(la, lb)
            assert torch.equal(
                model_a.forward_decoder(la, mask.ids_restore), model_b.forward_decoder(lb, mask.ids_restore)
            )


def test_encoder_only_weights_leave_the_decoder_random(tmp_path):
    source = tiny()
    path = tmp_path / "vit_tiny.mae.safetensors"
    save_file({k: v.contiguous() for k, v in source.encoder.state_dict().items()}, str(path))
    with pytest.warns(UserWarning, match="encoder weights only"):
        loaded = MAEModel("mae_vit_tiny_digits", checkpoint=str(path), overrides=TINY).build()
    for k, v in source.encoder.state_dict().items():
        assert torch.equal(loaded.encoder.state_dict()[k], v)


def test_checkpoint_that_does_not_fit_names_the_file(tmp_path):
    path = tmp_path / "other.pth"
    torch.save({"model": mae_keys_to_official(tiny(embed_dim=48).state_dict())}, path)
    with pytest.raises(ValueError, match="other.pth"):
        MAEModel("mae_vit_tiny_digits", checkpoint=str(path), overrides=TINY).build()


def test_unknown_name_or_override_fails_early():
    with pytest.raises(ValueError, match="MAEModel.name"):
        MAEModel("mae_vit_gigantic")
    with pytest.raises(ValueError, match="overrides"):
        MAEModel("mae_vit_tiny_digits", overrides={"emb_dim": 3})


@pytest.mark.parametrize("fmt", ["official", "lightning"])
@pytest.mark.parametrize("pool", ["avg", "token"])
def test_encoder_model_loads_the_pretrained_encoder(tmp_path, fmt, pool):
    mae = tiny()
    if fmt == "official":
        payload = {"model": mae_keys_to_official(mae.state_dict())}
    else:  # a zoo pre-training run's Lightning checkpoint
        payload = {"state_dict": {f"student.{k}": v for k, v in mae.state_dict().items()}}
    path = tmp_path / "pretrained.ckpt"
    torch.save(payload, path)
    source = MAEEncoderModel("mae_vit_tiny_digits", checkpoint=str(path), global_pool=pool, overrides=TINY)
    vit = source.build(num_classes=10, in_chans=1).eval()
    assert vit.head.out_features == 10
    for k, v in mae.encoder.state_dict().items():
        if k.startswith("norm.") and pool == "avg":
            continue
        assert torch.equal(vit.state_dict()[k], v), k
    if pool == "avg":
        assert isinstance(vit.norm, nn.Identity) and isinstance(vit.fc_norm, nn.LayerNorm)
    else:
        x = images()
        with torch.no_grad():
            torch.testing.assert_close(vit.forward_features(x), mae.encoder.forward_features(x))
    assert vit.pos_embed.requires_grad  # learnable when fine-tuning, as MAE


def test_encoder_model_resamples_pos_embed_and_rejects_foreign_blocks(tmp_path):
    path = tmp_path / "mae.pth"
    torch.save({"model": mae_keys_to_official(tiny().state_dict())}, path)
    vit = MAEEncoderModel("mae_vit_tiny_digits", checkpoint=str(path), img_size=24, overrides=TINY).build(3)
    assert vit.pos_embed.shape == (1, 1 + 36, 32)
    other = tmp_path / "deeper.pth"
    torch.save({"model": mae_keys_to_official(tiny(depth=4).state_dict())}, other)
    with pytest.raises(ValueError, match="deeper.pth"):
        MAEEncoderModel("mae_vit_tiny_digits", checkpoint=str(other), overrides=TINY).build(3)


def test_encoder_source_of_an_mae_model(tmp_path):
    path = tmp_path / "mae.pth"
    mae = tiny()
    torch.save({"model": mae_keys_to_official(mae.state_dict())}, path)
    enc = MAEModel("mae_vit_tiny_digits", checkpoint=str(path), overrides={**TINY, "norm_pix_loss": True})
    vit = enc.encoder_source(num_classes=4).build()
    assert torch.equal(vit.blocks[0].attn.qkv.weight, mae.encoder.blocks[0].attn.qkv.weight)
    # only the encoder's hyper-parameters carry over
    assert enc.encoder_source().to_config()["init_args"]["overrides"] == {"embed_dim": 32, "depth": 3, "num_heads": 2}
