"""Masked autoencoders (MAE, arXiv 2111.06377) over a timm ViT encoder, for MIM pre-training and its distillers.

:class:`MaskedAutoencoder` keeps the encoder as a plain ``timm`` ``VisionTransformer`` (``self.encoder``: so
``forward_intermediates``, ``forward_features`` and fine-tuning work as in timm) and adds MAE's light decoder.
Both use fixed 2-D sin-cos position embeddings. The masking is a separate step (:func:`random_masking`) whose
``ids_keep``/``ids_restore`` are passed to :meth:`~MaskedAutoencoder.forward_encoder` and
:meth:`~MaskedAutoencoder.forward_decoder`, so a teacher and a student can see exactly the same patches (DMAE,
G2SD), and a teacher can stop after any encoder block or decoder block (DMAE's "partial execution").

Architectures are data (:data:`MAE_MODELS`); :class:`MAEModel` is the config source of a whole MAE (pre-training,
or a frozen MAE teacher), :class:`MAEEncoderModel` the source of its encoder as a timm classifier (fine-tuning,
linear probing)::

    student: {class_path: zoo.models.mae.MAEModel, init_args: {name: mae_vit_tiny_digits}}
    teacher: {class_path: zoo.models.mae.MAEModel,
              init_args: {name: mae_vit_large_patch16, checkpoint: weights/mae_visualize_vit_large.pth,
                          mean: [0.485, 0.456, 0.406], std: [0.229, 0.224, 0.225]}}
    student: {class_path: zoo.models.mae.MAEEncoderModel,
              init_args: {name: mae_vit_base_patch16, checkpoint: weights/mae_pretrain_vit_base.pth,
                          drop_path_rate: 0.1}}

Checkpoint keys: the official MAE pre-training checkpoints (``{"model": state_dict}``) name the encoder's
tensors at the top level (``cls_token``, ``pos_embed``, ``patch_embed.proj.*``, ``blocks.N.*``, ``norm.*``) and
the decoder's as ``mask_token``, ``decoder_embed.*``, ``decoder_pos_embed``, ``decoder_blocks.N.*``,
``decoder_norm.*``, ``decoder_pred.*``. Here the encoder lives under ``encoder.``, the decoder keys are the same:
:func:`mae_keys_from_official` adds the prefix, :func:`mae_keys_to_official` removes it. The official encoder
blocks are timm ``Block`` s, so the block keys match timm's one to one.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Mapping, Sequence
from functools import partial
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn

from zoo.models.sources import ModelSource, as_normalization, pick_size, read_state_dict

if TYPE_CHECKING:  # timm is imported when a model is built: `zoo --help` and the CLI's parser do without it
    from timm.models.vision_transformer import VisionTransformer

__all__ = [
    "MAE_MODELS",
    "MAEEncoderModel",
    "MAEModel",
    "MaskedAutoencoder",
    "PatchMask",
    "create_mae",
    "list_mae_models",
    "mae_keys_from_official",
    "mae_keys_to_official",
    "random_masking",
    "sincos_pos_embed",
]

# Architectures as data. The standard ones are MAE's (mae_vit_{base,large,huge}: 512-d, 8-block decoder with 16
# heads) and G2SD's small students (models_mae.py in pengzhiliang/G2SD); the tiny ones are for CPU tests and the
# specs' CPU checks (32×32 shapes: teacher d=128 depth 6, student d=64 depth 4; digits: 16×16 grey).
MAE_MODELS: dict[str, dict[str, Any]] = {
    "mae_vit_tiny_digits": {
        "img_size": 16, "patch_size": 4, "in_chans": 1, "embed_dim": 64, "depth": 4, "num_heads": 4,
        "decoder_embed_dim": 32, "decoder_depth": 2, "decoder_num_heads": 4,
    },
    "mae_vit_d64_patch4_dec32d2b": {
        "img_size": 32, "patch_size": 4, "in_chans": 3, "embed_dim": 64, "depth": 4, "num_heads": 4,
        "decoder_embed_dim": 32, "decoder_depth": 2, "decoder_num_heads": 4,
    },
    "mae_vit_d128_patch4_dec64d4b": {
        "img_size": 32, "patch_size": 4, "in_chans": 3, "embed_dim": 128, "depth": 6, "num_heads": 4,
        "decoder_embed_dim": 64, "decoder_depth": 4, "decoder_num_heads": 4,
    },
    "mae_vit_tiny_patch16_dec128d4b": {
        "img_size": 224, "patch_size": 16, "in_chans": 3, "embed_dim": 192, "depth": 12, "num_heads": 3,
        "decoder_embed_dim": 128, "decoder_depth": 4, "decoder_num_heads": 4,
    },
    "mae_vit_small_patch16_dec256d4b": {
        "img_size": 224, "patch_size": 16, "in_chans": 3, "embed_dim": 384, "depth": 12, "num_heads": 6,
        "decoder_embed_dim": 256, "decoder_depth": 4, "decoder_num_heads": 8,
    },
    "mae_vit_base_patch16": {
        "img_size": 224, "patch_size": 16, "in_chans": 3, "embed_dim": 768, "depth": 12, "num_heads": 12,
        "decoder_embed_dim": 512, "decoder_depth": 8, "decoder_num_heads": 16,
    },
    "mae_vit_large_patch16": {
        "img_size": 224, "patch_size": 16, "in_chans": 3, "embed_dim": 1024, "depth": 24, "num_heads": 16,
        "decoder_embed_dim": 512, "decoder_depth": 8, "decoder_num_heads": 16,
    },
    "mae_vit_huge_patch14": {
        "img_size": 224, "patch_size": 14, "in_chans": 3, "embed_dim": 1280, "depth": 32, "num_heads": 16,
        "decoder_embed_dim": 512, "decoder_depth": 8, "decoder_num_heads": 16,
    },
}

# Encoder hyper-parameters (the rest of a preset describes the decoder or the loss).
_ENCODER_ARGS = ("img_size", "patch_size", "in_chans", "embed_dim", "depth", "num_heads", "mlp_ratio")
# Top-level names of the official MAE checkpoint that belong to the decoder; everything else is the encoder's.
_DECODER_KEYS = ("mask_token", "decoder_pos_embed")
_DECODER_PREFIXES = ("decoder_embed.", "decoder_blocks.", "decoder_norm.", "decoder_pred.")
_ENCODER_PREFIX = "encoder."
_POS_KEYS = ("encoder.pos_embed", "decoder_pos_embed")


def _norm_layer() -> Any:
    return partial(nn.LayerNorm, eps=1e-6)  # MAE's and timm ViT's LayerNorm


def list_mae_models() -> list[str]:
    """Names of the MAE architectures :func:`create_mae` knows."""
    return sorted(MAE_MODELS)


# ---------------------------------------------------------------------------------------------- position, masks
def sincos_pos_embed(embed_dim: int, grid_size: int | tuple[int, int], cls_token: bool = True) -> Tensor:
    """MAE's fixed 2-D sin-cos position embedding, ``(1 + H·W, D)`` with a zero row for CLS (or ``(H·W, D)``).

    Tokens are in row-major order. The first D/2 channels encode the column index, the last D/2 the row index
    (MAE builds its grid with ``meshgrid(w, h)``, so its "h" half holds the column); each half is
    ``[sin(p·ω_k), cos(p·ω_k)]`` with ``ω_k = 10000^(−k/(D/4))``, k = 0 … D/4 − 1 (MoCo v3, MAE ``pos_embed.py``).
    """
    gh, gw = (grid_size, grid_size) if isinstance(grid_size, int) else grid_size
    if embed_dim % 4:
        raise ValueError(f"sincos_pos_embed: embed_dim must be divisible by 4, got {embed_dim}")
    quarter = embed_dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    rows, cols = torch.meshgrid(
        torch.arange(gh, dtype=torch.float64), torch.arange(gw, dtype=torch.float64), indexing="ij"
    )

    def encode(pos: Tensor) -> Tensor:
        angles = pos.reshape(-1, 1) * omega
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    emb = torch.cat([encode(cols), encode(rows)], dim=1)
    if cls_token:
        emb = torch.cat([emb.new_zeros(1, embed_dim), emb], dim=0)
    return emb.float()


class PatchMask(NamedTuple):
    """One per-sample random masking, shared by every network that should see the same patches.

    Attributes:
        ids_keep: ``(B, K)`` indices of the kept (visible) patches, K = ⌊N·(1 − r)⌋, in shuffled order.
        ids_restore: ``(B, N)`` the permutation that puts ``[kept; masked]`` tokens back in patch order.
        mask: ``(B, N)`` float, 1 for masked (removed) patches and 0 for visible ones, in patch order.
    """

    ids_keep: Tensor
    ids_restore: Tensor
    mask: Tensor


def random_masking(
    x: Tensor | int,
    num_patches: int | None = None,
    mask_ratio: float = 0.75,
    noise: Tensor | None = None,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> PatchMask:
    """MAE's per-sample random masking: sort uniform noise per sample, keep the K = ⌊N·(1 − r)⌋ lowest.

    Args:
        x: the batch size, or a ``(B, N, …)`` token tensor (gives B, N and the device).
        num_patches: N; read from ``x`` when it is a token tensor.
        mask_ratio: r, the fraction of patches removed (0 ≤ r < 1).
        noise: optional ``(B, N)`` noise (G2SD shares one noise tensor); sampled uniformly otherwise.
        generator: a ``torch.Generator`` for the noise (fixed validation masks); the noise is drawn on the
            generator's device and moved to ``device``.
        device: where the indices live (default: ``x``'s device, else the noise's, else the CPU).
    """
    if isinstance(x, Tensor):
        batch_size = x.shape[0]
        num_patches = x.shape[1] if num_patches is None else num_patches
        device = x.device if device is None else device
    else:
        batch_size = int(x)
    if num_patches is None:
        raise ValueError("random_masking: num_patches is required when x is a batch size")
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"random_masking: mask_ratio must be in [0, 1), got {mask_ratio}")
    keep = int(num_patches * (1 - mask_ratio))
    if keep < 1:
        raise ValueError(f"random_masking: mask_ratio {mask_ratio} keeps no patch of {num_patches}")
    if noise is None:
        gen_device = generator.device if generator is not None else device
        noise = torch.rand(batch_size, num_patches, generator=generator, device=gen_device)
    elif noise.shape != (batch_size, num_patches):
        raise ValueError(f"random_masking: noise must have shape {(batch_size, num_patches)}, got {tuple(noise.shape)}")
    device = noise.device if device is None else device
    noise = noise.to(device)
    ids_shuffle = noise.argsort(dim=1)  # small noise = kept
    ids_restore = ids_shuffle.argsort(dim=1)
    mask = (ids_restore >= keep).to(noise.dtype if noise.is_floating_point() else torch.float32)
    return PatchMask(ids_shuffle[:, :keep], ids_restore, mask)


def _gather_tokens(x: Tensor, ids: Tensor) -> Tensor:
    return torch.gather(x, 1, ids.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


# ---------------------------------------------------------------------------------------------- the model
class MaskedAutoencoder(nn.Module):
    """MAE (arXiv 2111.06377): a ViT encoder on the visible patches and a light decoder that predicts the pixels.

    L_rec = Σ_{b, i∈M} mean_p (ŷ_{b,i,p} − y_{b,i,p})² / |M|: per-patch MSE averaged over the masked patches M
    only, with y the patchified pixels, or each patch standardised by its own mean and variance when
    ``norm_pix_loss`` (MAE's paper setting; DMAE's released script uses raw pixels).

    The encoder is a timm ``VisionTransformer`` (``num_classes=0``, CLS pooling) with a frozen sin-cos
    ``pos_embed``; weights are initialised as MAE does (xavier-uniform linears and patch projection, N(0, 0.02)
    CLS and mask tokens).

    Args:
        img_size, patch_size, in_chans: input geometry (square images).
        embed_dim, depth, num_heads: the encoder.
        decoder_embed_dim, decoder_depth, decoder_num_heads: the decoder (MAE default 512-d, 8 blocks, 16 heads).
        mlp_ratio: MLP width of every block.
        norm_pix_loss: reconstruct per-patch standardised pixels.
    """

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 1024,
        depth: int = 24,
        num_heads: int = 16,
        decoder_embed_dim: int = 512,
        decoder_depth: int = 8,
        decoder_num_heads: int = 16,
        mlp_ratio: float = 4.0,
        norm_pix_loss: bool = False,
    ) -> None:
        super().__init__()
        from timm.models.vision_transformer import Block, VisionTransformer

        if img_size % patch_size:
            raise ValueError(f"MaskedAutoencoder: img_size {img_size} is not a multiple of patch_size {patch_size}")
        self.encoder = VisionTransformer(
            img_size=img_size,
            patch_size=patch_size,
            in_chans=in_chans,
            num_classes=0,
            global_pool="token",
            embed_dim=embed_dim,
            depth=depth,
            num_heads=num_heads,
            mlp_ratio=mlp_ratio,
            qkv_bias=True,
            norm_layer=_norm_layer(),
            weight_init="skip",
        )
        self.img_size, self.patch_size, self.in_chans = img_size, patch_size, in_chans
        self.grid_size = img_size // patch_size
        self.num_patches = self.grid_size**2
        self.embed_dim, self.decoder_embed_dim = embed_dim, decoder_embed_dim
        self.norm_pix_loss = norm_pix_loss

        self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.register_buffer(
            "decoder_pos_embed", sincos_pos_embed(decoder_embed_dim, self.grid_size).unsqueeze(0), persistent=True
        )
        self.decoder_blocks = nn.ModuleList(
            Block(decoder_embed_dim, decoder_num_heads, mlp_ratio, qkv_bias=True, norm_layer=_norm_layer())
            for _ in range(decoder_depth)
        )
        self.decoder_norm = _norm_layer()(decoder_embed_dim)
        self.decoder_pred = nn.Linear(decoder_embed_dim, patch_size**2 * in_chans)
        self._init_weights()

    def _init_weights(self) -> None:
        enc = self.encoder
        with torch.no_grad():
            enc.pos_embed.copy_(sincos_pos_embed(self.embed_dim, self.grid_size).unsqueeze(0))
        enc.pos_embed.requires_grad_(False)  # fixed, as in MAE
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        # The patch projection is a linear map on flattened patches: initialise it like one.
        w = enc.patch_embed.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.normal_(enc.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)

    @property
    def depth(self) -> int:
        return len(self.encoder.blocks)

    @property
    def decoder_depth(self) -> int:
        return len(self.decoder_blocks)

    # ------------------------------------------------------------------------------------------ masks, patches
    def mask(
        self,
        batch: Tensor | int,
        mask_ratio: float = 0.75,
        noise: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> PatchMask:
        """A random mask for ``batch`` (images or a batch size) over this model's patches; pass the same
        ``ids_keep``/``ids_restore`` to every network that should see the same patches."""
        size = batch.shape[0] if isinstance(batch, Tensor) else int(batch)
        device = batch.device if isinstance(batch, Tensor) else self.encoder.cls_token.device
        return random_masking(size, self.num_patches, mask_ratio, noise=noise, generator=generator, device=device)

    def patchify(self, imgs: Tensor) -> Tensor:
        """``(B, C, H, W)`` → ``(B, N, p²·C)``, patches row-major, each flattened as (row, column, channel)."""
        b, c, h, w = imgs.shape
        p = self.patch_size
        if h % p or w % p:
            raise ValueError(f"patchify: image size {(h, w)} is not a multiple of the patch size {p}")
        x = imgs.reshape(b, c, h // p, p, w // p, p)
        return x.permute(0, 2, 4, 3, 5, 1).reshape(b, (h // p) * (w // p), p * p * c)

    def unpatchify(self, x: Tensor) -> Tensor:
        """``(B, N, p²·C)`` → ``(B, C, H, W)`` (square grid), the inverse of :meth:`patchify`."""
        b, n, _ = x.shape
        p, c = self.patch_size, self.in_chans
        g = round(n**0.5)
        if g * g != n:
            raise ValueError(f"unpatchify: {n} patches do not form a square grid")
        x = x.reshape(b, g, g, p, p, c).permute(0, 5, 1, 3, 2, 4)
        return x.reshape(b, c, g * p, g * p)

    # ------------------------------------------------------------------------------------------ encoder
    def forward_encoder(
        self,
        x: Tensor,
        ids_keep: Tensor | None = None,
        upto: int | None = None,
        return_blocks: Sequence[int] = (),
        final_norm: bool = True,
    ) -> tuple[Tensor, dict[int, Tensor]]:
        """Encodes the kept patches: patch embedding + position, gather ``ids_keep``, prepend CLS (+ its
        position), then the blocks.

        Args:
            x: ``(B, C, H, W)`` images.
            ids_keep: ``(B, K)`` kept patch indices (a :class:`PatchMask`'s); ``None`` encodes every patch.
            upto: stop after block ``upto`` (0-based; negative counts from the end): DMAE's partial execution of
                a teacher whose block-k output is all that is needed. ``None`` runs every block.
            return_blocks: block indices (0-based, negative allowed, ≤ ``upto``) whose outputs are returned,
                keyed as given. They are raw residual-stream outputs over ``[CLS; kept]``, before the final norm.
            final_norm: apply the encoder's final LayerNorm to the returned latent. It is applied only when
                every block ran; an early stop returns the raw output of block ``upto``.

        Returns:
            ``(latent, blocks)``: latent ``(B, 1 + K, D)`` and ``{index: (B, 1 + K, D)}``.
        """
        enc = self.encoder
        depth = len(enc.blocks)
        last = depth - 1 if upto is None else self.block_index(upto, depth, "upto")
        wanted: dict[int, list[int]] = {}
        for given in return_blocks:
            index = self.block_index(given, depth, "return_blocks")
            if index > last:
                raise ValueError(f"forward_encoder: return_blocks index {given} lies after upto={upto}")
            wanted.setdefault(index, []).append(given)

        tokens = enc.patch_embed(x) + enc.pos_embed[:, 1:]
        if ids_keep is not None:
            tokens = _gather_tokens(tokens, ids_keep)
        cls = (enc.cls_token + enc.pos_embed[:, :1]).expand(tokens.shape[0], -1, -1)
        h = enc.norm_pre(enc.pos_drop(torch.cat([cls, tokens], dim=1)))
        out: dict[int, Tensor] = {}
        for i in range(last + 1):
            h = enc.blocks[i](h)
            for given in wanted.get(i, ()):
                out[given] = h
        if final_norm and last == depth - 1:
            h = enc.norm(h)
        return h, out

    @staticmethod
    def block_index(index: int, depth: int, field: str) -> int:
        resolved = index + depth if index < 0 else index
        if not 0 <= resolved < depth:
            raise ValueError(f"{field}: block index {index} is out of range for {depth} blocks")
        return resolved

    # ------------------------------------------------------------------------------------------ decoder
    def forward_decoder(
        self,
        latent: Tensor,
        ids_restore: Tensor,
        upto: int | None = None,
        return_hidden: bool = False,
        apply_norm: bool = True,
    ) -> Tensor | tuple[Tensor | None, Tensor]:
        """Decodes: embed the latent, append mask tokens, unshuffle with ``ids_restore``, add the decoder's
        position embedding, run the decoder blocks, predict the pixels of every patch.

        Args:
            latent: ``(B, 1 + K, D)`` encoder output (CLS first).
            ids_restore: ``(B, N)`` from the same :class:`PatchMask` as the encoder's ``ids_keep``.
            upto: run only the **first** ``upto`` decoder blocks (a count, unlike the encoder's index: G2SD's
                teacher runs 4 of its 8 blocks, ``upto=4``); the pixels are then not predicted.
            return_hidden: also return the hidden tokens after the blocks that ran, ``(B, 1 + N, D_dec)`` in
                patch order with CLS first, before ``decoder_norm``.
            apply_norm: apply ``decoder_norm`` before ``decoder_pred`` (MAE does).

        Returns:
            ``pred`` ``(B, N, p²·C)``; with ``return_hidden``, ``(pred, hidden)`` where ``pred`` is ``None`` if
            the decoder stopped early.
        """
        depth = len(self.decoder_blocks)
        runs = depth if upto is None else int(upto)
        if not 0 <= runs <= depth:
            raise ValueError(f"forward_decoder: upto must be in [0, {depth}], got {upto}")
        if runs < depth and not return_hidden:
            raise ValueError("forward_decoder: a decoder stopped early predicts no pixels; pass return_hidden=True")
        h = self.decoder_embed(latent)
        b, n = ids_restore.shape
        fill = self.mask_token.expand(b, n + 1 - h.shape[1], -1)
        patches = _gather_tokens(torch.cat([h[:, 1:], fill], dim=1), ids_restore)
        h = torch.cat([h[:, :1], patches], dim=1) + self.decoder_pos_embed
        for block in self.decoder_blocks[:runs]:
            h = block(h)
        pred = None
        if runs == depth:
            pred = self.decoder_pred(self.decoder_norm(h) if apply_norm else h)[:, 1:]
        return (pred, h) if return_hidden else pred

    # ------------------------------------------------------------------------------------------ loss, forward
    def reconstruction_loss(self, imgs: Tensor, pred: Tensor, mask: Tensor) -> Tensor:
        """Mean over masked patches of the per-patch MSE (see the class docstring); 0 if nothing is masked."""
        target = self.patchify(imgs)
        if self.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1e-6).sqrt()
        per_patch = (pred.float() - target.float()).pow(2).mean(dim=-1)
        mask = mask.to(per_patch.dtype)
        return (per_patch * mask).sum() / mask.sum().clamp_min(1.0)

    def forward(
        self, imgs: Tensor, mask_ratio: float = 0.75, noise: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """One MAE pass: ``(loss, pred (B, N, p²·C), mask (B, N))``, as MAE's ``MaskedAutoencoderViT``."""
        ids_keep, ids_restore, mask = self.mask(imgs, mask_ratio, noise=noise)
        latent, _ = self.forward_encoder(imgs, ids_keep)
        pred = self.forward_decoder(latent, ids_restore)
        return self.reconstruction_loss(imgs, pred, mask), pred, mask


def create_mae(name: str, **overrides: Any) -> MaskedAutoencoder:
    """Builds a registered MAE (:data:`MAE_MODELS`); ``overrides`` replace any constructor argument."""
    return MaskedAutoencoder(**_mae_config(name, overrides, "create_mae"))


def _mae_config(name: str, overrides: Mapping[str, Any] | None, owner: str) -> dict[str, Any]:
    if name not in MAE_MODELS:
        raise ValueError(f"{owner}.name: unknown MAE {name!r}; expected one of {list_mae_models()}")
    allowed = set(inspect.signature(MaskedAutoencoder.__init__).parameters) - {"self"}
    unknown = sorted(set(overrides or {}) - allowed)
    if unknown:
        raise ValueError(f"{owner}.overrides: unknown arguments {unknown}; expected some of {sorted(allowed)}")
    return {**MAE_MODELS[name], **dict(overrides or {})}


# ---------------------------------------------------------------------------------------------- checkpoint keys
def _is_decoder_key(key: str) -> bool:
    return key in _DECODER_KEYS or key.startswith(_DECODER_PREFIXES)


def mae_keys_from_official(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Official MAE / timm key names → this module's: encoder tensors get the ``encoder.`` prefix.

    A state dict already in this module's naming (any key under ``encoder.``) is returned unchanged.
    """
    if any(k.startswith(_ENCODER_PREFIX) for k in state):
        return dict(state)
    return {(k if _is_decoder_key(k) else _ENCODER_PREFIX + k): v for k, v in state.items()}


def mae_keys_to_official(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """This module's key names → the official MAE checkpoint's (the inverse of :func:`mae_keys_from_official`)."""
    return {k.removeprefix(_ENCODER_PREFIX): v for k, v in state.items()}


def load_mae_weights(model: MaskedAutoencoder, path: str | os.PathLike, field: str = "checkpoint") -> None:
    """Loads an official MAE pre-training checkpoint, timm MAE encoder weights, or a zoo checkpoint of an MAE.

    Position embeddings are fixed sin-cos tables: a file's table is used when its shape fits and otherwise
    ignored (this model's own table for its grid stays). An encoder-only file (timm's ``*.mae`` weights, or an
    official checkpoint stripped of its decoder) leaves the decoder randomly initialised, with a warning.
    """
    state = mae_keys_from_official(read_state_dict(path, field=field))
    own = model.state_dict()
    for key in _POS_KEYS:
        if key in state and key in own and state[key].shape != own[key].shape:
            del state[key]
    encoder_only = not any(_is_decoder_key(k) for k in state)
    expected = [k for k in own if k not in _POS_KEYS and not (encoder_only and _is_decoder_key(k))]
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}" for k in state if k in own
             and state[k].shape != own[k].shape]
    if missing or unexpected or wrong:
        raise ValueError(
            f"{field}: {path} does not fit this MaskedAutoencoder (embed_dim {model.embed_dim}, depth {model.depth}, "
            f"decoder {model.decoder_embed_dim}×{model.decoder_depth}): {len(missing)} missing keys {missing[:5]}, "
            f"{len(unexpected)} unexpected keys {unexpected[:5]}, {len(wrong)} shape mismatches {wrong[:3]}"
        )
    model.load_state_dict(state, strict=False)
    if encoder_only:
        rank_zero_warn(f"{field}: {path} holds encoder weights only; the MAE decoder stays randomly initialised")


# ---------------------------------------------------------------------------------------------- sources
class MAEModel(ModelSource):
    """A masked autoencoder by architecture name (:data:`MAE_MODELS`), optionally with local weights.

    Args:
        name: a key of :data:`MAE_MODELS` (``mae_vit_base_patch16``, ``mae_vit_tiny_digits`` ...).
        img_size: input side; defaults to the preset's. Position tables are rebuilt for the new grid.
        in_chans: input channels; defaults to the data set's, then the preset's.
        checkpoint: local weights: an official MAE pre-training checkpoint (``{"model": state_dict}``, e.g.
            ``mae_pretrain_vit_base_full.pth``, ``mae_visualize_vit_large.pth``), timm MAE encoder weights
            (``vit_base_patch16_224.mae``, safetensors: encoder only, the decoder stays random), or the
            checkpoint of a zoo pre-training run. Nothing is downloaded.
        overrides: other :class:`MaskedAutoencoder` arguments (``norm_pix_loss``, ``decoder_depth`` ...).
        mean, std: the normalisation the weights expect. MAE's ImageNet weights use
            mean (0.485, 0.456, 0.406) and std (0.229, 0.224, 0.225); set them when the data differs.
    """

    def __init__(
        self,
        name: str,
        img_size: int | None = None,
        in_chans: int | None = None,
        checkpoint: str | None = None,
        overrides: dict[str, Any] | None = None,
        mean: list[float] | None = None,
        std: list[float] | None = None,
    ) -> None:
        _mae_config(name, overrides, "MAEModel")
        self.name = name
        self.img_size = img_size
        self.in_chans = in_chans
        self.checkpoint = checkpoint
        self.overrides = dict(overrides or {})
        self.mean = as_normalization(mean, "mean", "MAEModel")
        self.std = as_normalization(std, "std", "MAEModel")

    def config(self, in_chans: int | None = None) -> dict[str, Any]:
        """The :class:`MaskedAutoencoder` arguments this source builds with."""
        cfg = _mae_config(self.name, self.overrides, "MAEModel")
        if self.img_size is not None:
            cfg["img_size"] = self.img_size
        cfg["in_chans"] = pick_size(self.in_chans, in_chans, cfg["in_chans"])
        return cfg

    def build(self, num_classes: int | None = None, in_chans: int | None = None) -> nn.Module:
        """The MAE (``num_classes`` is ignored: the encoder has no classifier)."""
        model = MaskedAutoencoder(**self.config(in_chans))
        if self.checkpoint:
            load_mae_weights(model, self.checkpoint, field="MAEModel.checkpoint")
        return model

    def describe(self) -> str:
        return f"mae:{self.name}"

    def encoder_source(self, checkpoint: str | None = None, **kwargs: Any) -> MAEEncoderModel:
        """The matching :class:`MAEEncoderModel` (same architecture, normalisation and, by default, weights)."""
        enc_overrides = {k: v for k, v in self.overrides.items() if k in _ENCODER_ARGS}
        return MAEEncoderModel(
            self.name,
            checkpoint=checkpoint if checkpoint is not None else self.checkpoint,
            img_size=self.img_size,
            in_chans=self.in_chans,
            overrides=enc_overrides or None,
            mean=list(self.mean) if self.mean else None,
            std=list(self.std) if self.std else None,
            **kwargs,
        )


class MAEEncoderModel(ModelSource):
    """The encoder of an MAE as a timm ``VisionTransformer`` classifier, for fine-tuning and linear probing.

    The ViT has the preset's encoder hyper-parameters and a learnable position embedding initialised from the
    checkpoint (bicubically resampled when the grid differs, as MAE's ``interpolate_pos_embed``), or from the
    sin-cos table without one. ``global_pool="avg"`` is MAE's fine-tuning head: mean of the patch tokens, then
    ``fc_norm`` (the encoder's final ``norm`` is dropped); ``"token"`` keeps the CLS token and ``norm``. The head
    is new, initialised N(0, ``head_init_std``) (MAE: 2e-5 for fine-tuning, 0.01 for linear probing).

    Args:
        name: a key of :data:`MAE_MODELS`.
        checkpoint: an official MAE checkpoint, timm MAE weights, a zoo pre-training checkpoint (keys
            ``student.encoder.*``) or a zoo fine-tuning checkpoint; every encoder block must load (strict), the
            classifier is always new.
        num_classes: classifier size; defaults to the data set's.
        global_pool: ``avg`` (MAE fine-tuning) or ``token``.
        drop_path_rate: stochastic depth (MAE fine-tuning: 0.1 for ViT-B, 0.2 for ViT-L; DMAE 0.15).
        img_size, in_chans: default to the preset's (``in_chans``: the data set's first).
        overrides: other encoder hyper-parameters of the preset (``embed_dim``, ``depth`` ...).
        head_init_std: std of the classifier weights.
        load_head: also load the classifier from the checkpoint (a fine-tuned ViT used as a teacher).
        mean, std: the normalisation the weights expect.
    """

    def __init__(
        self,
        name: str,
        checkpoint: str | None = None,
        num_classes: int | None = None,
        global_pool: str = "avg",
        drop_path_rate: float = 0.0,
        img_size: int | None = None,
        in_chans: int | None = None,
        overrides: dict[str, Any] | None = None,
        head_init_std: float = 2e-5,
        load_head: bool = False,
        mean: list[float] | None = None,
        std: list[float] | None = None,
    ) -> None:
        _mae_config(name, overrides, "MAEEncoderModel")
        if global_pool not in ("avg", "token"):
            raise ValueError(f"MAEEncoderModel.global_pool must be 'avg' or 'token', got {global_pool!r}")
        self.name = name
        self.checkpoint = checkpoint
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.drop_path_rate = drop_path_rate
        self.img_size = img_size
        self.in_chans = in_chans
        self.overrides = dict(overrides or {})
        self.head_init_std = head_init_std
        self.load_head = load_head
        self.mean = as_normalization(mean, "mean", "MAEEncoderModel")
        self.std = as_normalization(std, "std", "MAEEncoderModel")

    def build(self, num_classes: int | None = None, in_chans: int | None = None) -> nn.Module:
        cfg = _mae_config(self.name, self.overrides, "MAEEncoderModel")
        enc = {k: cfg[k] for k in _ENCODER_ARGS if k in cfg}
        if self.img_size is not None:
            enc["img_size"] = self.img_size
        enc["in_chans"] = pick_size(self.in_chans, in_chans, cfg["in_chans"])
        from timm.models.vision_transformer import VisionTransformer

        model = VisionTransformer(
            **enc,
            num_classes=pick_size(self.num_classes, num_classes, 1000),
            global_pool=self.global_pool,
            drop_path_rate=self.drop_path_rate,
            qkv_bias=True,
            norm_layer=_norm_layer(),
        )
        grid = model.patch_embed.grid_size
        with torch.no_grad():
            model.pos_embed.copy_(sincos_pos_embed(model.embed_dim, tuple(grid)).unsqueeze(0))
        if self.checkpoint:
            self._load(model, self.checkpoint, load_head=self.load_head)
        if isinstance(model.head, nn.Linear) and not (self.load_head and self.checkpoint):
            nn.init.trunc_normal_(model.head.weight, std=self.head_init_std)
            nn.init.zeros_(model.head.bias)
        return model

    @staticmethod
    def _load(
        model: VisionTransformer, path: str, field: str = "MAEEncoderModel.checkpoint", load_head: bool = False
    ) -> None:
        from timm.layers import resample_abs_pos_embed

        state = read_state_dict(path, field=field)
        if any(k.startswith(_ENCODER_PREFIX) for k in state):
            state = {k[len(_ENCODER_PREFIX) :]: v for k, v in state.items() if k.startswith(_ENCODER_PREFIX)}
        else:
            state = {k: v for k, v in state.items() if not _is_decoder_key(k)}
        own = model.state_dict()
        # The classifier is new; the pooling decides whether the final norm or fc_norm is used (MAE fine-tuning
        # drops the pre-trained norm and trains a fresh fc_norm).
        if not load_head:
            state = {k: v for k, v in state.items() if not k.startswith("head.")}
        for prefix in ("norm.", "fc_norm."):
            if not any(k.startswith(prefix) for k in own):
                state = {k: v for k, v in state.items() if not k.startswith(prefix)}
        pos = state.get("pos_embed")
        if pos is not None and pos.shape != own["pos_embed"].shape:
            old = round((pos.shape[1] - 1) ** 0.5)
            state["pos_embed"] = resample_abs_pos_embed(
                pos, new_size=list(model.patch_embed.grid_size), old_size=[old, old], num_prefix_tokens=1
            )
        optional = ("pos_embed", "fc_norm.") if load_head else ("pos_embed", "fc_norm.", "head.")
        missing = [k for k in own if k not in state and not k.startswith(optional)]
        unexpected = [k for k in state if k not in own]
        wrong = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}" for k in state if k in own
                 and state[k].shape != own[k].shape]
        if missing or unexpected or wrong:
            raise ValueError(
                f"{field}: {path} does not fit the ViT encoder (embed_dim {model.embed_dim}, depth "
                f"{len(model.blocks)}): {len(missing)} missing keys {missing[:5]}, {len(unexpected)} unexpected keys "
                f"{unexpected[:5]}, {len(wrong)} shape mismatches {wrong[:3]}"
            )
        model.load_state_dict(state, strict=False)

    def describe(self) -> str:
        return f"mae-encoder:{self.name}"
