"""Sparse-MoE upcycling (LLaVA-MoD): equal to the dense FFN when nothing is dropped, DeepSpeed routing rules."""

import pytest
import torch
from torch import nn

from zoo.models.moe import MoEConfig, SparseMoE, expert_load_entropy, moe_layers, upcycle


def _ffn(d=8, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d, 16), nn.GELU(), nn.Linear(16, d)).double()


def _moe(**kw):
    dense = _ffn()
    return dense, SparseMoE(dense, 8, MoEConfig(**kw)).double()


@pytest.mark.parametrize("training", [True, False])
def test_no_dropped_tokens_equals_dense_at_upcycling(training):
    dense, moe = _moe(num_experts=4, top_k=2, drop_tokens=False)
    moe.train(training)
    x = torch.randn(3, 11, 8, dtype=torch.float64)
    torch.testing.assert_close(moe(x), dense(x), rtol=0, atol=1e-6)
    assert float(moe.dropped) == 0.0


def test_capacity_drops_late_tokens_to_zero_output():
    """Capacity ceil(k·cf·S/E) with first choices before second; a token with every choice dropped outputs 0."""
    dense, moe = _moe(num_experts=2, top_k=1, capacity_factor=0.5, eval_capacity_factor=0.5)
    with torch.no_grad():
        moe.router.weight.zero_()
        moe.router.weight[0, 0] = 1.0  # every token with x[0] > 0 prefers expert 0
    x = torch.randn(8, 8, dtype=torch.float64)
    x[:, 0] = 5.0  # all to expert 0; capacity = ceil(1·0.5·8/2) = 2
    out = moe.eval()(x)
    gate = torch.softmax(x.double() @ moe.router.weight.double().T, -1)[:, 0]
    torch.testing.assert_close(out[:2], dense(x[:2]) * gate[:2, None])  # top-1: scaled by its gate (DeepSpeed)
    assert torch.equal(out[2:], torch.zeros_like(out[2:]))
    assert moe.expert_counts.tolist() == [8, 0]


def test_gumbel_noise_only_in_training_and_router_gets_gradients():
    _, moe = _moe(num_experts=4, top_k=2)
    x = torch.randn(64, 8, dtype=torch.float64)
    moe.eval()
    a, b = moe(x), moe(x)
    assert torch.equal(a, b)  # no noise at evaluation
    moe.train()
    torch.manual_seed(1)
    idx1, _, _ = moe.route(x)
    torch.manual_seed(2)
    idx2, _, _ = moe.route(x)
    assert torch.equal(idx1[:, 0], idx2[:, 0]) and not torch.equal(idx1[:, 1], idx2[:, 1])
    (moe(x).sum() + moe.l_aux).backward()
    assert moe.router.weight.grad is not None and moe.router.weight.grad.abs().sum() > 0


def test_upcycle_every_other_layer_of_a_qwen2():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    lm = Qwen2ForCausalLM(Qwen2Config(vocab_size=16, hidden_size=16, intermediate_size=32, num_hidden_layers=4,
                                      num_attention_heads=2, num_key_value_heads=1)).eval()
    ids = torch.randint(0, 16, (2, 5))
    before = lm(ids).logits
    layers = upcycle(lm, {"num_experts": 4, "top_k": 2, "drop_tokens": False})
    assert layers == [0, 2] and len(moe_layers(lm)) == 2
    assert not isinstance(lm.model.layers[1].mlp, SparseMoE)
    expert = lm.model.layers[0].mlp.experts[3]
    assert torch.equal(expert.gate_proj.weight, lm.model.layers[0].mlp.experts[0].gate_proj.weight)
    torch.testing.assert_close(lm(ids).logits, before, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="already"):
        upcycle(lm, {"layers": [0]})


def test_config_refusals_and_entropy():
    with pytest.raises(ValueError, match="top_k"):
        MoEConfig(top_k=3)
    with pytest.raises(ValueError, match="unknown options"):
        MoEConfig.from_dict({"experts": 4})
    assert MoEConfig(layers="first_half").layer_indices(4) == [0, 1]
    assert float(expert_load_entropy(torch.tensor([5, 5, 5, 5]))) == pytest.approx(float(torch.log(torch.tensor(4.0))))
    assert float(expert_load_entropy(torch.tensor([7, 0, 0, 0]))) == 0.0
