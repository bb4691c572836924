"""MaTVLM: attention → Mamba-2 conversion (copied rows, GQA tiling, Phi's parallel block), teacher forcing, the loss
terms against float64 formulas, save/reload of a hybrid, cached generation, freezing, and the shipped configs."""

from __future__ import annotations

import atexit
import copy
import functools
import json
import math
import shutil
import tempfile
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml

from zoo.data.vqa import DigitsVQADataModule
from zoo.losses.matvlm import LayerAlignmentLoss, SequenceKLLoss
from zoo.methods.matvlm import MaTVLM, WarmupStableDecayLR, record_layers
from zoo.models.hybrid_mamba import (
    HybridMambaVLM,
    MambaDecoderLayer,
    convert_to_mamba,
    decoder_stack,
    mamba_layer_indices,
)
from zoo.models.vlm import LlavaModel

ROOT = Path(__file__).resolve().parents[2]
VISION = {"library": "timm", "name": "vit_tiny_patch16_224", "img_size": 16, "patch_size": 4, "embed_dim": 32,
          "depth": 1, "num_heads": 2}
#: 4 query heads sharing 2 key/value heads (GQA, as the digits Qwen2), head width 8.
LM = {"model_type": "qwen2", "vocab_size": 32, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 4,
      "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64, "bos_token_id": 1,
      "eos_token_id": 2}
SSM = [0, 2]


def _causal_lm(model_type: str = "qwen2", **overrides):
    from transformers import AutoConfig, AutoModelForCausalLM

    options = {**LM, **overrides}
    options.pop("model_type")
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **options)).eval()


def _teacher_source(checkpoint: str | None) -> LlavaModel:
    return LlavaModel(VISION, dict(LM), select_layer=-1, feature_norm=True, checkpoint=checkpoint)


@functools.lru_cache(maxsize=None)
def _teacher_file() -> str:
    """A random tiny teacher saved once per session: student and teacher sources both load it."""
    folder = Path(tempfile.mkdtemp(prefix="zoo-matvlm-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = _teacher_source(None).build(in_chans=1)
    torch.save(model.state_dict(), folder / "teacher.pt")
    return str(folder / "teacher.pt")


def _opt(lr: float = 1e-3):
    return functools.partial(torch.optim.AdamW, lr=lr, betas=(0.9, 0.95), weight_decay=0.01)


def _data() -> DigitsVQADataModule:
    return DigitsVQADataModule(train_samples=20, num_test=16, batch_size=4, eval_batch_size=8)


def _method(**kw) -> MaTVLM:
    teacher = _teacher_source(_teacher_file())
    student = HybridMambaVLM(teacher, ssm_layers=kw.pop("ssm_layers", SSM), init=kw.pop("init", "attention"),
                             chunk_size=8)
    return MaTVLM(student, teacher, in_chans=1, optimizer=_opt(), **kw)


def tiny_matvlm():
    """The contract test's recipe: a 4-layer GQA teacher, layers 0 and 2 converted, digits VQA."""
    return _method(), _data()


def _batch(n: int = 4) -> dict:
    dm = _data()
    dm.setup("fit")
    return dm.collate([dm.train_set[i] for i in range(n)])


# ------------------------------------------------------------------------------------------------- conversion
@pytest.mark.parametrize("model_type,kv,bias", [("qwen2", 2, False), ("phi", 4, True)])
def test_copied_rows_equal_the_source_weights_with_gqa_tiling(model_type, kv, bias):
    """in_proj rows [z | x | B | C | dt]: x = W_V and B = W_K of the head's key/value group, C = W_Q, out = W_O."""
    torch.manual_seed(0)
    lm = _causal_lm(model_type, num_key_value_heads=kv)
    source = copy.deepcopy(lm)
    convert_to_mamba(lm, SSM, copy_bias=bias)
    heads, hd, d = 4, 8, 32
    inner, rep = heads * hd, heads // kv
    for i, layer in enumerate(decoder_stack(lm)[1]):
        old = decoder_stack(source)[1][i]
        if i not in SSM:
            assert not isinstance(layer, MambaDecoderLayer)
            continue
        attn, mixer = old.self_attn, layer.mamba
        w = mixer.in_proj.weight
        assert w.shape == (inner + 3 * inner + heads, d) and mixer.conv1d.in_channels == 3 * inner
        for h in range(heads):
            rows, group = slice(h * hd, (h + 1) * hd), slice((h // rep) * hd, (h // rep + 1) * hd)
            assert torch.equal(w[inner:][rows], attn.v_proj.weight[group]), (i, h, "x")
            assert torch.equal(w[2 * inner:][rows], attn.k_proj.weight[group]), (i, h, "B")
            assert torch.equal(w[3 * inner:][rows], attn.q_proj.weight[rows]), (i, h, "C")
        out = attn.dense if model_type == "phi" else attn.o_proj
        assert torch.equal(mixer.out_proj.weight, out.weight)
        if bias:  # MaTVLM's is_bias: the attention biases, tiled as the weights
            for h in range(heads):
                rows, group = slice(h * hd, (h + 1) * hd), slice((h // rep) * hd, (h // rep + 1) * hd)
                assert torch.equal(mixer.in_proj.bias[inner:][rows], attn.v_proj.bias[group])
                assert torch.equal(mixer.in_proj.bias[3 * inner:][rows], attn.q_proj.bias[rows])
            assert torch.equal(mixer.out_proj.bias, out.bias)
        else:
            assert mixer.in_proj.bias is None and mixer.out_proj.bias is None
        # the rest is the replaced layer's (norms, MLP) or fresh as the official Mamba2
        assert torch.equal(layer.mlp.state_dict()[next(iter(layer.mlp.state_dict()))],
                           old.mlp.state_dict()[next(iter(old.mlp.state_dict()))])
        assert torch.equal(layer.input_layernorm.weight, old.input_layernorm.weight)
        assert layer.parallel == (model_type == "phi")
        a = mixer.A_log.exp()
        assert ((a >= 1) & (a <= 16)).all() and torch.equal(mixer.D, torch.ones(heads))
        dt = torch.nn.functional.softplus(mixer.dt_bias)
        assert ((dt > 1e-4 * 0.99) & (dt < 0.1 * 1.01)).all()
        assert mixer.num_heads == mixer.n_groups == heads and mixer.head_dim == mixer.ssm_state_size == hd


def test_random_init_copies_nothing_into_the_mixer_and_refusals():
    torch.manual_seed(0)
    lm = _causal_lm()
    v = decoder_stack(lm)[1][0].self_attn.v_proj.weight.clone()
    convert_to_mamba(lm, [0], init="random")
    assert not torch.equal(decoder_stack(lm)[1][0].mamba.in_proj.weight[32:40], v[:8])
    with pytest.raises(ValueError, match="already Mamba"):
        convert_to_mamba(lm, [0])
    with pytest.raises(ValueError, match="keep at least one attention layer"):
        convert_to_mamba(lm, [1, 2, 3])
    with pytest.raises(ValueError, match=r"indices in \[0, 4\)"):
        convert_to_mamba(lm, [4])
    with pytest.raises(ValueError, match="no Mamba layer"):
        MaTVLM(_teacher_source(_teacher_file()), _teacher_source(_teacher_file()), in_chans=1)
    with pytest.raises(ValueError, match="not all 0"):
        MaTVLM(HybridMambaVLM(_teacher_source(_teacher_file()), [0]), _teacher_source(_teacher_file()),
               kl_weight=0.0, layer_weight=0.0, in_chans=1)


def test_cached_generation_matches_the_full_forward_and_left_padding():
    """Greedy decoding through the cache (conv + SSM state per Mamba layer) picks the argmax of the full forward;
    a left-padded prompt decodes as the unpadded one."""
    torch.manual_seed(0)
    lm = _causal_lm()
    convert_to_mamba(lm, SSM, chunk_size=8)
    prompt = torch.randint(3, 32, (2, 11))
    args = dict(max_new_tokens=6, do_sample=False, eos_token_id=None, pad_token_id=0)
    with torch.no_grad():
        out = lm.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), **args)
        full = lm(input_ids=out, attention_mask=torch.ones_like(out)).logits
        assert torch.equal(full[:, 10:-1].argmax(-1), out[:, 11:])
        padded = torch.cat([torch.zeros(2, 3, dtype=torch.long), prompt], 1)
        mask = (padded != 0).long()
        mask[:, 3:] = 1
        out_padded = lm.generate(input_ids=padded, attention_mask=mask, **args)
        assert torch.equal(out_padded[:, 14:], out[:, 11:])
        copied = copy.deepcopy(lm)  # the copy's Mamba layers read the copy's padding mask
        assert torch.equal(copied.generate(input_ids=padded, attention_mask=mask, **args), out_padded)
        result = lm(input_ids=prompt, attention_mask=torch.ones_like(prompt), use_cache=True)
    cache = getattr(result, "past_key_values", None) or result.cache
    kinds = [type(layer).__name__ for layer in cache.layers]
    assert kinds == ["LinearAttentionLayer", "DynamicLayer", "LinearAttentionLayer", "DynamicLayer"]


def test_converted_model_saves_and_reloads(tmp_path):
    """A trained hybrid's checkpoint (state dict or Lightning checkpoint) loads into a freshly converted model."""
    teacher = _teacher_source(_teacher_file())
    model = HybridMambaVLM(teacher, SSM, chunk_size=8).build(in_chans=1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "mamba" in name:
                p.add_(0.01 * torch.randn_like(p))
    torch.save(model.state_dict(), tmp_path / "hybrid.pt")
    source = HybridMambaVLM(teacher, SSM, chunk_size=8, checkpoint=str(tmp_path / "hybrid.pt"))
    reloaded = source.build(in_chans=1)
    assert mamba_layer_indices(reloaded) == SSM
    state = reloaded.state_dict()
    assert set(state) == set(model.state_dict()) and all(torch.equal(v, state[k]) for k, v in
                                                           model.state_dict().items())
    batch = _batch()
    model.eval(), reloaded.eval()
    with torch.no_grad():
        assert torch.equal(model(batch["input_ids"], batch["attention_mask"], **batch["images"]).logits,
                           reloaded(batch["input_ids"], batch["attention_mask"], **batch["images"]).logits)
    # the source is config data (it nests the teacher's) and rebuilds from it
    from zoo.models.sources import source_from_config

    config = json.loads(json.dumps(source.to_config()))
    assert config["init_args"]["source"]["class_path"] == "zoo.models.vlm.LlavaModel"
    assert source_from_config(config).describe() == source.describe()
    with pytest.raises(ValueError, match="does not fit"):
        HybridMambaVLM(teacher, [0], checkpoint=str(tmp_path / "hybrid.pt")).build(in_chans=1)


# ------------------------------------------------------------------------------------------------- teacher forcing
def test_layer_term_is_nonzero_only_on_converted_layers_and_unconverted_layers_reproduce_the_teacher():
    method = _method()
    method.student.eval()
    batch = _batch()
    lm = method.teacher.language_model()
    with torch.no_grad(), record_layers(lm, range(4)) as trace:
        method.run(method.teacher, batch)
        outs, targets = method.teacher_forced(trace, batch, layers=range(4))
    for i, (out, target) in enumerate(zip(outs, targets)):
        if i in SSM:
            assert float((out - target).norm()) > 1e-3, i
        else:  # the student's frozen attention layer on the teacher's input: the teacher's output, bit for bit
            assert torch.equal(out, target), i
    teacher = method.teacher_outputs(batch)
    assert sorted(teacher.trace.inputs) == SSM
    terms = method.loss_terms(method.run(method.student, batch), teacher, batch)
    expected = sum(float((outs[i] - targets[i]).double().norm()) for i in SSM)
    assert set(terms) == {"kl", "layer"} and terms["layer"].item() == pytest.approx(expected, rel=1e-5)
    assert terms["kl"].item() > 0


def test_one_step_trains_the_mamba_mixers_and_projector_only(tmp_path):
    method, dm = tiny_matvlm()
    before = copy.deepcopy(method.student.state_dict())
    teacher = copy.deepcopy(method.teacher.state_dict())
    trainable = {n for n, p in method.student.named_parameters() if p.requires_grad}
    assert trainable and all(".mamba." in n or n.startswith("projector.") for n in trainable)
    assert any(n.startswith("projector.") for n in trainable)
    trainer = L.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=1,
                        num_sanity_val_steps=0, default_root_dir=tmp_path)
    trainer.fit(method, datamodule=dm)
    changed = {k for k, v in method.student.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all(".mamba." in k or k.startswith("projector.") for k in changed)
    assert all(torch.equal(v, teacher[k]) for k, v in method.teacher.state_dict().items())
    logged = trainer.logged_metrics
    assert {"train/loss_kl", "train/loss_layer", "train/layer0", "train/layer2", "train/loss"} <= set(logged)
    # zoo predict decodes through the cache from the embedded prompt: the first answer token is the greedy one
    predicted = trainer.predict(method, datamodule=dm)[0]
    batch = next(iter(dm.predict_dataloader()))
    with torch.no_grad():
        logits = method.run(method.student.eval(), batch).logits
    first = (batch["labels"] != -100).float().argmax(1) - 1
    greedy = logits[torch.arange(len(first)), first].argmax(-1)
    assert [p["tokens"][0] for p in predicted] == greedy.tolist()
    # weight decay on matrices only (the official parameter groups)
    groups = method.param_groups()
    assert all(p.ndim >= 2 for p in groups[0]["params"]) and groups[1]["weight_decay"] == 0.0
    assert all(p.ndim <= 1 for p in groups[1]["params"])


# ------------------------------------------------------------------------------------------------- losses
def _logits(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return 3 * torch.randn(*shape, generator=g, dtype=torch.float64)


def test_sequence_kl_golden():
    zs, zt = _logits(2, 5, 7), _logits(2, 5, 7, seed=1)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    for tau in (1.0, 2.0):
        total, rows = 0.0, 0
        for b in range(2):
            for i in range(5):
                p = [math.exp(v / tau) for v in zt[b, i].tolist()]
                q = [math.exp(v / tau) for v in zs[b, i].tolist()]
                p, q = [x / sum(p) for x in p], [x / sum(q) for x in q]
                kl = sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))
                if mask[b, i]:
                    total, rows = total + kl, rows + 1
                if b == 0 and i == 0:
                    first = kl
        full = sum(SequenceKLLoss(tau)(zs[b:b + 1, i:i + 1], zt[b:b + 1, i:i + 1]).item()
                   for b in range(2) for i in range(5)) / tau**2 / 2
        assert SequenceKLLoss(tau)(zs, zt).item() == pytest.approx(tau**2 * full, rel=1e-12)
        assert SequenceKLLoss(tau)(zs[:1, :1], zt[:1, :1]).item() == pytest.approx(tau**2 * first, rel=1e-10)
        assert SequenceKLLoss(tau, "mean")(zs, zt, mask).item() == pytest.approx(tau**2 * total / rows, rel=1e-10)
        assert SequenceKLLoss(tau)(zs, zt, mask).item() == pytest.approx(tau**2 * total / 2, rel=1e-10)
    # batchmean divides by B only: twice the positions, twice the value
    assert SequenceKLLoss()(zs.repeat(1, 2, 1), zt.repeat(1, 2, 1)).item() == pytest.approx(
        2 * SequenceKLLoss()(zs, zt).item(), rel=1e-12)
    assert SequenceKLLoss()(zt, zt).item() == 0.0
    assert SequenceKLLoss()(zs + 5.0, zt - 2.0).item() == pytest.approx(SequenceKLLoss()(zs, zt).item(), rel=1e-10)
    assert SequenceKLLoss()(zs, zt).dtype == torch.float64
    assert SequenceKLLoss()(zs.half(), zt.half()).dtype == torch.float32


def test_layer_alignment_golden():
    g = torch.Generator().manual_seed(0)
    s = [torch.randn(2, 3, 4, generator=g, dtype=torch.float64) for _ in range(2)]
    t = [torch.randn(2, 3, 4, generator=g, dtype=torch.float64) for _ in range(2)]
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    norms = [math.sqrt(sum((a - b) ** 2 for a, b in zip(x.flatten().tolist(), y.flatten().tolist())))
             for x, y in zip(s, t)]
    assert LayerAlignmentLoss()(s, t).item() == pytest.approx(sum(norms), rel=1e-12)  # unsquared, unaveraged
    rms = []
    for x, y in zip(s, t):
        sq = sum(float((x[b, i] - y[b, i]).pow(2).sum()) for b in range(2) for i in range(3) if mask[b, i])
        rms.append(math.sqrt(sq / (3 * 4)))
    assert LayerAlignmentLoss("mean")(s, t, mask).item() == pytest.approx(sum(rms) / 2, rel=1e-12)
    assert LayerAlignmentLoss()(t, t).item() == 0.0
    # the code's norm grows with the batch (√2 for a doubled batch); the mean variant does not
    doubled = ([x.repeat(2, 1, 1) for x in s], [y.repeat(2, 1, 1) for y in t])
    assert LayerAlignmentLoss()(*doubled).item() == pytest.approx(math.sqrt(2) * sum(norms), rel=1e-12)
    assert LayerAlignmentLoss("mean")(*doubled).item() == pytest.approx(LayerAlignmentLoss("mean")(s, t).item())
    x = s[0].clone().requires_grad_()
    LayerAlignmentLoss()([x], [x.detach()]).backward()  # zero error: a finite (zero) gradient
    assert torch.equal(x.grad, torch.zeros_like(x))


def test_warmup_stable_decay_schedule():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2.0)
    schedule = WarmupStableDecayLR(opt, total_steps=10, warmup_steps=2, decay_steps=4)
    lrs = []
    for _ in range(11):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        schedule.step()
    assert lrs[:7] == [0.0, 1.0, 2.0, 2.0, 2.0, 2.0, 2.0]  # linear warm-up over 2 steps, stable to step 6
    assert lrs[8] == pytest.approx(1.0) and lrs[10] == pytest.approx(0.0, abs=1e-12)  # cosine over the last 4
    with pytest.raises(ValueError, match="warmup_steps"):
        WarmupStableDecayLR(opt, total_steps=5, warmup_steps=4, decay_steps=4)


# ------------------------------------------------------------------------------------------------- configs
@pytest.mark.parametrize("name", ["matvlm_25", "matvlm_50"])
def test_digits_configs_run_two_steps(name, tmp_path):
    """The shipped config on a random digits-sized teacher saved here (its own run is not in a fresh clone)."""
    from zoo.cli import ZooCLI
    from zoo.models.sources import source_from_config

    raw = yaml.safe_load((ROOT / "configs" / "vlm" / "digits" / f"{name}.yaml").read_text())
    teacher = raw["model"]["init_args"]["teacher"]
    torch.manual_seed(0)
    spec = {**teacher, "init_args": {**teacher["init_args"], "checkpoint": None}}
    torch.save(source_from_config(spec).build(in_chans=1).state_dict(), tmp_path / "teacher.pt")
    teacher = {**teacher, "init_args": {**teacher["init_args"], "checkpoint": str(tmp_path / "teacher.pt")}}
    student = raw["model"]["init_args"]["student"]
    student = {**student, "init_args": {**student["init_args"], "source": teacher}}
    args = ["--config", str(ROOT / "configs" / "vlm" / "digits" / f"{name}.yaml"), "--trainer.max_steps=2",
            "--trainer.limit_val_batches=0", "--trainer.logger=false", "--trainer.callbacks=[]",
            "--trainer.enable_checkpointing=false", "--trainer.enable_model_summary=false",
            f"--trainer.default_root_dir={tmp_path}", "--summary.enabled=false", "--data.init_args.num_test=10",
            f"--model.init_args.teacher={json.dumps(teacher)}", f"--model.init_args.student={json.dumps(student)}"]
    cli = ZooCLI(args=args, run=False)
    assert mamba_layer_indices(cli.model.student) == raw["model"]["init_args"]["student"]["init_args"]["ssm_layers"]
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert cli.trainer.global_step == 2
    assert {"train/loss_kl", "train/loss_layer"} <= set(cli.trainer.logged_metrics)


@pytest.mark.parametrize("share,layers", [("25", list(range(0, 32, 4))), ("50", list(range(0, 32, 2)))])
def test_tinyllava_recipes_parse(share, layers, capsys):
    from zoo.cli import ZooCLI

    config = ROOT / "configs" / "vlm" / "tinyllava" / f"matvlm_phi2_{share}.yaml"
    with pytest.raises(SystemExit) as stop:
        ZooCLI(args=["fit", "--config", str(config), "--print_config"])
    assert stop.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    model, trainer = printed["model"]["init_args"], printed["trainer"]
    assert model["student"]["init_args"]["ssm_layers"] == layers
    assert (model["kl_weight"], model["layer_weight"], model["ce_weight"]) == (1.0, 1.0, 0.0)
    assert model["trainable"] == ["mamba", "projector"]
    optimizer = model["optimizer"]["init_args"]
    assert optimizer["lr"] == 2e-4 and list(optimizer["betas"]) == [0.9, 0.95] and optimizer["weight_decay"] == 0.01
    schedule = model["lr_scheduler"]
    assert schedule["class_path"] == "zoo.methods.matvlm.WarmupStableDecayLR"
    assert (schedule["init_args"]["warmup_steps"], schedule["init_args"]["decay_steps"]) == (4000, 4000)
    assert trainer["gradient_clip_val"] == 0.1 and trainer["precision"] == "bf16-mixed"
    assert trainer["accumulate_grad_batches"] * trainer["devices"] * printed["data"]["init_args"]["batch_size"] == 64
    assert "/models/" in json.dumps(model["teacher"]) and "/data/" in json.dumps(printed["data"])
