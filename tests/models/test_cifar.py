"""Tests of the CIFAR KD architectures (zoo.models.cifar) against the mdistiller reference definitions.

The golden parameter counts and the state-dict fixture (every key and shape, per model) were produced by running
mdistiller's ``mdistiller/models/cifar/*.py`` (commit a08d46f) with ``num_classes=100``; equal keys and shapes
are what lets its released teacher checkpoints load with ``strict=True``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

from zoo.models.cifar import CIFAR_MODELS, create_cifar_model, list_cifar_models

FIXTURE = Path(__file__).parent / "fixtures" / "cifar_state_dict_keys.json"

# sum(p.numel() for p in model.parameters()) of the mdistiller definitions, num_classes=100.
GOLDEN_PARAMS = {
    "resnet8": 83_892,
    "resnet14": 181_108,
    "resnet20": 278_324,
    "resnet32": 472_756,
    "resnet44": 667_188,
    "resnet56": 861_620,
    "resnet110": 1_736_564,
    "resnet8x4": 1_233_540,
    "resnet32x4": 7_433_860,
    "resnet50": 23_705_252,
    "wrn_16_1": 180_916,
    "wrn_16_2": 703_284,
    "wrn_40_1": 569_780,
    "wrn_40_2": 2_255_156,
    "vgg8": 3_965_028,
    "vgg11": 9_277_284,
    "vgg13": 9_462_180,
    "vgg16": 14_774_436,
    "vgg19": 20_086_692,
    "mobilenetv2": 812_836,
    "shufflenetv1": 949_258,
    "shufflenetv2": 1_355_528,
}
NAMES = sorted(GOLDEN_PARAMS)


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    """These batch-2 forwards gain nothing from intra-op threads, which slow down badly when the 2 CPU cores are
    shared with another process (OpenMP oversubscription); restore the setting afterwards."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def official_keys() -> dict[str, dict[str, list[int]]]:
    return json.loads(FIXTURE.read_text())


def _build(name: str, **kwargs: int) -> nn.Module:
    torch.manual_seed(0)
    return create_cifar_model(name, **kwargs).eval()


@pytest.fixture(scope="module", params=NAMES)
def model(request: pytest.FixtureRequest) -> nn.Module:
    """The default (num_classes=100, in_chans=3) model, built once per name; tests using it must not mutate it."""
    return _build(request.param)


def test_registry() -> None:
    assert list_cifar_models() == NAMES
    assert sorted(CIFAR_MODELS) == NAMES


def test_unknown_name_lists_valid_names() -> None:
    with pytest.raises(ValueError, match="resnet9000") as err:
        create_cifar_model("resnet9000")
    assert all(name in str(err.value) for name in NAMES)


def test_fixture_covers_all_models(official_keys: dict[str, dict[str, list[int]]]) -> None:
    assert sorted(official_keys) == NAMES


@pytest.mark.parametrize("name", NAMES)
def test_matches_official(name: str, official_keys: dict[str, dict[str, list[int]]]) -> None:
    model = _build(name)
    assert sum(p.numel() for p in model.parameters()) == GOLDEN_PARAMS[name]
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert ours == official_keys[name]
    # A checkpoint laid out like mdistiller's ({"model": state_dict}) with the official keys/shapes loads strictly.
    checkpoint = {"model": {k: torch.ones(shape) for k, shape in official_keys[name].items()}}
    model.load_state_dict(checkpoint["model"], strict=True)


def test_forward_head_api(model: nn.Module) -> None:
    x = torch.randn(2, 3, 32, 32)
    captured: list[torch.Tensor] = []
    classifier = model.get_classifier()
    assert isinstance(classifier, nn.Linear)
    assert (classifier.in_features, classifier.out_features) == (model.num_features, 100)
    assert model.num_classes == 100
    handle = classifier.register_forward_hook(lambda m, inp, out: captured.append(inp[0]))
    try:
        with torch.no_grad():
            logits = model(x)
            features = model.forward_features(x)
            pooled = model.forward_head(features, pre_logits=True)
            head_logits = model.forward_head(features)
    finally:
        handle.remove()
    assert logits.shape == (2, 100)
    assert features.ndim == 4 and features.shape[:2] == (2, model.num_features)
    assert pooled.shape == (2, model.num_features)
    torch.testing.assert_close(head_logits, logits, rtol=0, atol=0)
    # The pre-logits embedding is exactly what the classifier receives.
    torch.testing.assert_close(captured[0], pooled, rtol=0, atol=0)


def test_no_inplace_ops(model: nn.Module) -> None:
    assert not [n for n, m in model.named_modules() if getattr(m, "inplace", False)]
    # Every module output recorded by a forward hook must be left untouched by the rest of the forward pass.
    recorded: list[tuple[str, torch.Tensor, torch.Tensor]] = []

    def make_hook(path: str):
        def hook(module: nn.Module, inp: tuple[torch.Tensor, ...], out: object) -> None:
            if isinstance(out, torch.Tensor):
                recorded.append((path, out, out.clone()))

        return hook

    handles = [m.register_forward_hook(make_hook(path)) for path, m in model.named_modules()]
    try:
        with torch.no_grad():
            model(torch.randn(1, 3, 16, 16))
    finally:
        for h in handles:
            h.remove()
    assert recorded
    changed = [path for path, out, copy in recorded if not torch.equal(out, copy)]
    assert not changed, f"outputs modified in place after being recorded: {changed}"


@pytest.mark.parametrize("name", NAMES)
def test_small_single_channel_input_and_reset_classifier(name: str) -> None:
    model = _build(name, num_classes=10, in_chans=1)
    with torch.no_grad():
        for size in (16, 8):
            logits = model(torch.randn(2, 1, size, size))
            assert logits.shape == (2, 10)
            assert torch.isfinite(logits).all()
    x = torch.randn(2, 1, 16, 16)
    model.reset_classifier(7)
    head = model.get_classifier()
    assert isinstance(head, nn.Linear) and (head.in_features, head.out_features) == (model.num_features, 7)
    assert model.num_classes == 7
    with torch.no_grad():
        assert model(x).shape == (2, 7)
    model.reset_classifier(0)
    with torch.no_grad():
        assert model(x).shape == (2, model.num_features)
