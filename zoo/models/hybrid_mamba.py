"""Attention → Mamba-2 conversion of a causal LM's decoder layers (MaTVLM, Li et al., arXiv 2503.13440).

:func:`convert_to_mamba` replaces chosen decoder layers of a transformers causal LM (Qwen2/Llama-style sequential
blocks, Phi-style parallel blocks) by :class:`MambaDecoderLayer`: the layer's norms and MLP are kept, and the
attention becomes transformers' ``Mamba2Mixer`` (its pure-PyTorch chunked-SSD path on CPU; the ``mamba_ssm`` CUDA
kernels when that package is installed), named ``mamba`` so that MaTVLM's freezing rule ("only parameters whose name
contains ``mamba``") finds it::

    sequential (Qwen2):  h' = h + Mamba2(RMSNorm₁ h);   h'' = h' + MLP(RMSNorm₂ h')
    parallel (Phi):      h' = h + Dropout(Mamba2(LN h)) + Dropout(MLP(LN h))

Mamba-2 geometry, from the attention it replaces (MaTVLM's ``PhiMambaConfig``): one head and one B/C group per
attention head (``num_heads = n_groups = H``), ``head_dim = state_size = d_h`` (the attention head width),
inner width H·d_h (``expand = H·d_h / d``), depthwise causal conv of kernel 4 over [x | B | C], gated RMSNorm
(ε 1e-5), no bias on the projections (``copy_bias`` adds them).

Initialisation (``init="attention"``; the SSD / linear-attention duality C ↔ Q, B ↔ K, x ↔ V), with ``in_proj``
rows laid out [z | x | B | C | dt]:

    x ← W_V,  B ← W_K  (each key/value head tiled over the H / H_kv query heads of its group, as GQA shares it)
    C ← W_Q,  out_proj ← W_O

z, dt, the conv, the norm weight and D keep their fresh initialisation (nn.Linear / nn.Conv1d defaults, D = 1,
dt_bias = softplus⁻¹(dt), dt log-uniform in [1e-3, 0.1]), and A_log = log U(1, 16), all as the official ``Mamba2``.
``init="random"`` skips the copy (the norms and the MLP are kept in both cases).

Notes:
    The official layer keeps x and B at the key/value width H_kv·d_h and repeats them per group in its forward, so
    the tiled copies stay tied; ``Mamba2Mixer`` has no such width, so here they are tiled once at initialisation
    and train independently afterwards (equal at initialisation; the conv over the tiled channels is fresh per
    channel instead of shared per key/value head).

The hybrid runs in transformers' ``generate`` with the model's own ``DynamicCache``: a Mamba layer swaps its
cache slot for a linear-attention (conv + recurrent state) layer on first use, so it stores O(1) state per layer
instead of a growing KV cache. A forward pre-hook on the decoder passes the 2-D padding mask to the Mamba layers
(padded positions are zeroed before the projection and the conv, so left-padded prompts decode exactly).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal, NamedTuple

import torch
from torch import Tensor, nn

from zoo.models.sources import ModelSource, build_model, source_from_config

__all__ = [
    "AttentionGeometry",
    "HybridMambaVLM",
    "MambaDecoderLayer",
    "attention_geometry",
    "convert_to_mamba",
    "decoder_stack",
    "final_norm",
    "mamba2_config",
    "mamba_layer_indices",
]

#: MaTVLM's ``Mamba2`` defaults (``mamba2/hybrid_mamba_layer.py``); the chunk size is the SSD block length.
MAMBA2_DEFAULTS = {"conv_kernel": 4, "time_step_min": 1e-3, "time_step_max": 0.1, "time_step_floor": 1e-4,
                   "layer_norm_epsilon": 1e-5, "A_init_range": (1.0, 16.0), "chunk_size": 256}


# ------------------------------------------------------------------------------------------------- the decoder
def decoder_stack(lm: nn.Module) -> tuple[nn.Module, nn.ModuleList]:
    """(the decoder module, its ``layers``) of a causal LM (``Qwen2ForCausalLM`` → ``model``) or of a base
    decoder model (``Qwen2Model``)."""
    for candidate in (lm, getattr(lm, "model", None), getattr(lm, "get_decoder", lambda: None)()):
        layers = getattr(candidate, "layers", None)
        if isinstance(layers, nn.ModuleList) and len(layers):
            return candidate, layers
    raise ValueError(f"hybrid_mamba: {type(lm).__name__} has no decoder with a 'layers' list (a transformers "
                     "causal LM such as Qwen2ForCausalLM or PhiForCausalLM is expected)")


def final_norm(lm: nn.Module) -> nn.Module:
    """The decoder's final norm (``norm`` in Qwen2/Llama, ``final_layernorm`` in Phi)."""
    decoder, _ = decoder_stack(lm)
    for name in ("norm", "final_layernorm", "ln_f"):
        module = getattr(decoder, name, None)
        if isinstance(module, nn.Module):
            return module
    raise ValueError(f"hybrid_mamba: {type(decoder).__name__} has no final norm (norm / final_layernorm)")


def _text_config(lm: nn.Module) -> Any:
    config = getattr(lm, "config", None)
    if config is None:
        raise ValueError(f"hybrid_mamba: {type(lm).__name__} has no transformers config")
    return getattr(config, "text_config", None) or config


class AttentionGeometry(NamedTuple):
    """Hidden size d, query heads H, key/value heads H_kv and head width d_h of a decoder's attention."""

    hidden: int
    heads: int
    kv_heads: int
    head_dim: int


def attention_geometry(lm: nn.Module) -> AttentionGeometry:
    """The attention shape of ``lm`` from its config (``head_dim`` defaults to d / H)."""
    config = _text_config(lm)
    hidden, heads = int(config.hidden_size), int(config.num_attention_heads)
    kv = int(getattr(config, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(config, "head_dim", None) or hidden // heads)
    if heads % kv:
        raise ValueError(f"hybrid_mamba: {heads} attention heads are not a multiple of {kv} key/value heads")
    return AttentionGeometry(hidden, heads, kv, head_dim)


def mamba2_config(lm: nn.Module, chunk_size: int = 256, copy_bias: bool = False) -> Any:
    """The ``Mamba2Config`` of a layer replacing ``lm``'s attention (MaTVLM's geometry; see the module docstring)."""
    from transformers import Mamba2Config

    g = attention_geometry(lm)
    inner = g.heads * g.head_dim
    if inner % g.hidden:
        raise ValueError(f"hybrid_mamba: the attention's width H·d_h = {inner} is not a multiple of the hidden size "
                         f"{g.hidden} (Mamba2Config's expand is an integer)")
    d = MAMBA2_DEFAULTS
    return Mamba2Config(
        hidden_size=g.hidden, num_heads=g.heads, head_dim=g.head_dim, state_size=g.head_dim, n_groups=g.heads,
        expand=inner // g.hidden, chunk_size=chunk_size, conv_kernel=d["conv_kernel"], use_bias=copy_bias,
        use_conv_bias=True, layer_norm_epsilon=d["layer_norm_epsilon"], time_step_min=d["time_step_min"],
        time_step_max=d["time_step_max"], time_step_floor=d["time_step_floor"], hidden_act="silu",
        num_hidden_layers=len(decoder_stack(lm)[1]), vocab_size=int(getattr(_text_config(lm), "vocab_size", 1)),
    )


# ------------------------------------------------------------------------------------------------- the layer
class _PaddingMask:
    """The decoder's 2-D attention mask of the current forward, read by its Mamba layers (a forward pre-hook).

    Not part of any state: copies and pickles start empty."""

    def __init__(self) -> None:
        self.value: Tensor | None = None

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        mask = kwargs.get("attention_mask")
        self.value = mask if isinstance(mask, Tensor) and mask.dim() == 2 else None

    def __getstate__(self) -> dict[str, Any]:
        return {"value": None}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.value = None


class MambaDecoderLayer(nn.Module):
    """A decoder layer whose attention is a ``Mamba2Mixer`` (``self.mamba``); norms and MLP are the replaced layer's.

    Called like the transformers decoder layer it replaces (``hidden_states, attention_mask=...,
    position_embeddings=..., cache=...``): the causal mask and rotary embeddings are ignored (Mamba has neither);
    the 2-D padding mask comes from the decoder's hook or from ``padding_mask`` (teacher-forced calls). Returns the
    hidden states.

    Args:
        mamba: the mixer.
        input_layernorm: the norm before the mixer (and, in a parallel block, before the MLP).
        mlp: the feed-forward block.
        post_attention_layernorm: the norm before the MLP of a sequential block; ``None`` for a parallel block.
        resid_dropout: the parallel block's dropout on both branches (Phi's ``resid_dropout``).
        layer_idx: the layer's index in the decoder (its cache slot).
    """

    def __init__(
        self,
        mamba: nn.Module,
        input_layernorm: nn.Module,
        mlp: nn.Module,
        post_attention_layernorm: nn.Module | None,
        resid_dropout: nn.Module | None,
        layer_idx: int,
    ) -> None:
        super().__init__()
        self.mamba, self.input_layernorm, self.mlp = mamba, input_layernorm, mlp
        self.parallel = post_attention_layernorm is None
        if not self.parallel:
            self.post_attention_layernorm = post_attention_layernorm
        else:
            self.resid_dropout = resid_dropout if resid_dropout is not None else nn.Identity()
        self.layer_idx = layer_idx
        self.padding = _PaddingMask()

    def _mask(self, padding_mask: Tensor | None, length: int, dtype: torch.dtype) -> Tensor | None:
        mask = padding_mask if padding_mask is not None else self.padding.value
        if mask is None or mask.dim() != 2 or mask.shape[1] < length:
            return None
        return mask[:, -length:].to(dtype)

    def _cache(self, cache: Any) -> Any:
        """The cache, its slot of this layer made a linear-attention (conv + recurrent state) layer."""
        if cache is None:
            return None
        from transformers.cache_utils import LinearAttentionCacheLayerMixin, LinearAttentionLayer

        layers = getattr(cache, "layers", None)
        if layers is None:
            raise TypeError(f"MambaDecoderLayer {self.layer_idx}: {type(cache).__name__} is not a transformers Cache")
        if len(layers) == self.layer_idx:
            layers.append(LinearAttentionLayer())
        elif len(layers) < self.layer_idx:
            raise ValueError(f"MambaDecoderLayer {self.layer_idx}: the cache has only {len(layers)} layers")
        elif not isinstance(layers[self.layer_idx], LinearAttentionCacheLayerMixin):
            layers[self.layer_idx] = LinearAttentionLayer()
        return cache

    def forward(
        self,
        hidden_states: Tensor,
        attention_mask: Any = None,
        position_ids: Tensor | None = None,
        cache: Any = None,
        use_cache: bool | None = False,
        position_embeddings: Any = None,
        padding_mask: Tensor | None = None,
        **kwargs: Any,
    ) -> Tensor:
        cache = self._cache(cache if cache is not None else kwargs.get("past_key_values"))
        residual = hidden_states
        normed = self.input_layernorm(hidden_states)
        mask = self._mask(padding_mask, hidden_states.shape[1], normed.dtype)
        mixed = self.mamba(normed, cache=cache, attention_mask=mask)
        if self.parallel:
            return residual + self.resid_dropout(mixed) + self.resid_dropout(self.mlp(normed))
        hidden_states = residual + mixed
        return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))


def mamba_layer_indices(model: nn.Module) -> list[int]:
    """Indices of the decoder layers of ``model`` (a causal LM, or a VLM with ``language_model()``) that are Mamba."""
    lm = model.language_model() if hasattr(model, "language_model") and callable(model.language_model) else model
    _, layers = decoder_stack(lm)
    return [i for i, layer in enumerate(layers) if isinstance(layer, MambaDecoderLayer)]


# ------------------------------------------------------------------------------------------------- conversion
def _projections(attn: nn.Module) -> tuple[nn.Linear, nn.Linear, nn.Linear, nn.Linear]:
    out = getattr(attn, "o_proj", None) or getattr(attn, "dense", None)
    parts = [getattr(attn, n, None) for n in ("q_proj", "k_proj", "v_proj")] + [out]
    if not all(isinstance(p, nn.Linear) for p in parts):
        raise ValueError(f"hybrid_mamba: {type(attn).__name__} has no q_proj/k_proj/v_proj and o_proj (or dense) "
                         "Linear layers to initialise Mamba-2 from")
    return parts[0], parts[1], parts[2], parts[3]


def _tile(weight: Tensor, g: AttentionGeometry) -> Tensor:
    """(H_kv·d_h, ...) → (H·d_h, ...): each key/value head's rows repeated for the H / H_kv query heads it serves."""
    rep = g.heads // g.kv_heads
    blocks = weight.reshape(g.kv_heads, g.head_dim, *weight.shape[1:])
    return blocks.repeat_interleave(rep, dim=0).reshape(g.heads * g.head_dim, *weight.shape[1:])


@torch.no_grad()
def init_from_attention(mixer: nn.Module, attn: nn.Module, g: AttentionGeometry, copy_bias: bool = False) -> None:
    """x ← W_V, B ← W_K (GQA-tiled), C ← W_Q, out_proj ← W_O in a ``Mamba2Mixer`` laid out [z | x | B | C | dt]."""
    q, k, v, o = _projections(attn)
    inner = g.heads * g.head_dim
    rows = {"x": slice(inner, 2 * inner), "B": slice(2 * inner, 3 * inner), "C": slice(3 * inner, 4 * inner)}
    weight = mixer.in_proj.weight
    weight[rows["x"]] = _tile(v.weight, g).to(weight.dtype)
    weight[rows["B"]] = _tile(k.weight, g).to(weight.dtype)
    weight[rows["C"]] = q.weight.to(weight.dtype)
    mixer.out_proj.weight.copy_(o.weight)
    if copy_bias:
        bias = mixer.in_proj.bias
        for name, proj, tiled in (("x", v, True), ("B", k, True), ("C", q, False)):
            src = proj.bias if proj.bias is not None else torch.zeros(proj.out_features, dtype=bias.dtype)
            bias[rows[name]] = (_tile(src, g) if tiled else src).to(bias.dtype)
        mixer.out_proj.bias.copy_(o.bias if o.bias is not None else torch.zeros_like(mixer.out_proj.bias))


def _fresh_mixer(config: Any, layer_idx: int, like: Tensor) -> nn.Module:
    from transformers.models.mamba2.modeling_mamba2 import Mamba2Mixer

    mixer = Mamba2Mixer(config, layer_idx=layer_idx)
    low, high = MAMBA2_DEFAULTS["A_init_range"]
    with torch.no_grad():  # the official A init, log U(1, 16) (transformers' own: log 1..H)
        mixer.A_log.copy_(torch.empty(mixer.num_heads).uniform_(low, high).log())
    return mixer.to(device=like.device, dtype=like.dtype)


def convert_to_mamba(
    lm: nn.Module,
    layers: Sequence[int],
    init: Literal["attention", "random"] = "attention",
    chunk_size: int = 256,
    copy_bias: bool = False,
) -> list[int]:
    """Replaces decoder layers ``layers`` of ``lm`` (a causal LM) by :class:`MambaDecoderLayer`; returns their indices.

    Args:
        lm: a transformers causal LM with Qwen2/Llama-style (``post_attention_layernorm``) or Phi-style parallel
            decoder layers.
        layers: decoder layer indices to convert; at least one attention layer must remain (the cache reads the
            sequence position from one).
        init: ``attention`` (x ← W_V, B ← W_K, C ← W_Q, out ← W_O) or ``random`` (the mixer's fresh initialisation).
        chunk_size: the SSD chunk length (MaTVLM 256; 16–64 on CPU).
        copy_bias: give the projections biases and copy the attention's (MaTVLM's ``is_bias``; off by default).
    """
    if init not in ("attention", "random"):
        raise ValueError(f"convert_to_mamba.init must be 'attention' or 'random', got {init!r}")
    if chunk_size < 1:
        raise ValueError(f"convert_to_mamba.chunk_size must be ≥ 1, got {chunk_size}")
    decoder, stack = decoder_stack(lm)
    indices = sorted(set(int(i) for i in layers))
    bad = [i for i in indices if not 0 <= i < len(stack)]
    if bad or not indices:
        raise ValueError(f"ssm_layers: {list(layers)} must be non-empty indices in [0, {len(stack)}) (the LM has "
                         f"{len(stack)} decoder layers)")
    done = [i for i in indices if isinstance(stack[i], MambaDecoderLayer)]
    if done:
        raise ValueError(f"ssm_layers: layers {done} are already Mamba layers")
    if len(set(indices) | set(mamba_layer_indices(lm))) == len(stack):
        raise ValueError(f"ssm_layers: {indices} would convert all {len(stack)} layers; keep at least one attention "
                         "layer (MaTVLM keeps half or more)")
    config, g = mamba2_config(lm, chunk_size, copy_bias), attention_geometry(lm)
    holder = getattr(decoder, "_mamba_padding", None)
    if holder is None:
        holder = _PaddingMask()
        decoder._mamba_padding = holder
        decoder.register_forward_pre_hook(holder, with_kwargs=True)
    for i in indices:
        layer = stack[i]
        attn = getattr(layer, "self_attn", None)
        if attn is None or not hasattr(layer, "mlp") or not hasattr(layer, "input_layernorm"):
            raise ValueError(f"convert_to_mamba: layer {i} ({type(layer).__name__}) is not a decoder layer with "
                             "self_attn, mlp and input_layernorm")
        q = _projections(attn)[0]
        mixer = _fresh_mixer(config, i, q.weight)
        if init == "attention":
            init_from_attention(mixer, attn, g, copy_bias)
        post = getattr(layer, "post_attention_layernorm", None)
        dropout = getattr(layer, "resid_dropout", None) if post is None else None
        new = MambaDecoderLayer(mixer, layer.input_layernorm, layer.mlp, post, dropout, i)
        new.padding = holder
        new.train(layer.training)
        stack[i] = new
    return indices


# ------------------------------------------------------------------------------------------------- model source
class HybridMambaVLM(ModelSource):
    """A VLM whose language model has chosen decoder layers converted to Mamba-2 (MaTVLM's student).

    Builds ``source`` (normally the teacher's own source, so its ``checkpoint`` gives the attention weights the
    Mamba layers start from), converts ``ssm_layers`` of its language model (:func:`convert_to_mamba`), then loads
    ``checkpoint`` (a hybrid's weights: a zoo run of MaTVLM, or a state dict) into the converted model::

        student:
          class_path: zoo.models.hybrid_mamba.HybridMambaVLM
          init_args:
            source: {class_path: zoo.models.vlm.LlavaModel, init_args: {..., checkpoint: <teacher run>}}
            ssm_layers: [0, 2]

    Args:
        source: the VLM to convert (``zoo.models.vlm.LlavaModel``, ``HFVisionLanguageModel``, ...).
        ssm_layers: the decoder layers that become Mamba-2 (MaTVLM 25 %: every fourth from 0; 50 %: every other).
        init: ``attention`` (MaTVLM's ``init_with_kqvo``) or ``random``.
        chunk_size: the SSD chunk length (MaTVLM 256; 16–64 is faster on CPU).
        copy_bias: projections with biases copied from the attention (MaTVLM's ``is_bias``, off).
        checkpoint: weights of a converted model to load after conversion.
    """

    def __init__(
        self,
        source: ModelSource,
        ssm_layers: list[int],
        init: Literal["attention", "random"] = "attention",
        chunk_size: int = 256,
        copy_bias: bool = False,
        checkpoint: str | None = None,
    ) -> None:
        if isinstance(source, Mapping):
            source = source_from_config(source)
        if not isinstance(source, ModelSource):
            raise TypeError(f"HybridMambaVLM.source: expected a zoo.models source, got {type(source).__name__}")
        if init not in ("attention", "random"):
            raise ValueError(f"HybridMambaVLM.init must be 'attention' or 'random', got {init!r}")
        if not ssm_layers:
            raise ValueError("HybridMambaVLM.ssm_layers: give at least one decoder layer index")
        self.source, self.ssm_layers, self.init = source, [int(i) for i in ssm_layers], init
        self.chunk_size, self.copy_bias, self.checkpoint = chunk_size, copy_bias, checkpoint

    def build(self, num_classes: int | None = None, in_chans: int | None = None) -> nn.Module:
        model = build_model(self.source, num_classes=num_classes, in_chans=in_chans)
        if not callable(getattr(model, "language_model", None)):
            raise ValueError(f"HybridMambaVLM.source: {self.source.describe()} is not a vision-language model "
                             "(zoo.models.vlm.LlavaModel or HFVisionLanguageModel)")
        convert_to_mamba(model.language_model(), self.ssm_layers, self.init, self.chunk_size, self.copy_bias)
        model.name = f"{getattr(model, 'name', 'vlm')}+mamba2{self.ssm_layers}"
        if self.checkpoint:
            from zoo.models.vlm import _load_state

            _load_state(model, self.checkpoint, "HybridMambaVLM.checkpoint")
        return model

    def describe(self) -> str:
        init = "" if self.init == "attention" else ",random-init"
        return f"{self.source.describe()}+mamba2{self.ssm_layers}{init}"

    def to_config(self) -> dict[str, Any]:
        config = super().to_config()
        config["init_args"]["source"] = self.source.to_config()
        return config
