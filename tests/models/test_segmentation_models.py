"""Segmentation model sources: smp and torchvision build, taps by path, widened stems, checkpoints, mmseg."""

import pytest
import torch
from torch import nn

from zoo.models import (
    SMPModel,
    TorchvisionSegmentationModel,
    expand_input_channels,
    segmentation_taps,
)
from zoo.teacher import FeatureTaps


def test_smp_model_outputs_full_size_logits_and_taps_pre_upsampling():
    model = SMPModel("DeepLabV3Plus", encoder="tu-resnet10t").build(num_classes=7, in_chans=3)
    paths = segmentation_taps(model)
    taps = FeatureTaps(model, [paths["logits"], paths["features"]])
    logits, feats = taps(torch.randn(2, 3, 64, 64))
    assert logits.shape == (2, 7, 64, 64)
    assert feats[paths["logits"]].shape == (2, 7, 16, 16)  # stride 4, before the head's upsampling
    assert feats[paths["features"]].shape[:2] == (2, 256)  # the decoder feature that conv reads
    assert paths["aux"] is None


def test_smp_stem_takes_an_extra_channel():
    model = SMPModel("FPN", encoder="tu-resnet10t").build(num_classes=3, in_chans=4)
    assert model.eval()(torch.randn(1, 4, 32, 32)).shape == (1, 3, 32, 32)


def test_torchvision_model_returns_out_and_exposes_aux():
    model = TorchvisionSegmentationModel("fcn_resnet50", aux_loss=True).build(num_classes=5)
    paths = segmentation_taps(model)
    assert paths["logits"] == "model.classifier.4" and paths["aux"] == "model.aux_classifier"
    model.eval()
    taps = FeatureTaps(model, [paths["logits"], paths["aux"]])
    logits, feats = taps(torch.randn(1, 3, 64, 64))
    assert logits.shape == (1, 5, 64, 64) and feats["model.classifier.4"].shape == (1, 5, 8, 8)
    assert feats["model.aux_classifier"].shape == (1, 5, 8, 8)  # methods resize it to the labels


def test_expand_input_channels_keeps_the_rgb_function():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 2, 1))
    x = torch.randn(2, 3, 8, 8)
    before = model(x)
    conv = expand_input_channels(model, 4)
    assert conv.in_channels == 4 and model[0] is conv
    after = model(torch.cat([x, torch.randn(2, 1, 8, 8)], 1))  # the new channel has zero weights
    assert torch.allclose(before, after, atol=1e-6)


def test_torchvision_widened_stem_builds():
    model = TorchvisionSegmentationModel("lraspp_mobilenet_v3_large").build(num_classes=4, in_chans=4)
    model.eval()
    assert model(torch.randn(1, 4, 64, 64)).shape == (1, 4, 64, 64)


def test_unknown_architecture_and_model_fail_clearly():
    with pytest.raises(ValueError, match="SMPModel.arch"):
        SMPModel("NoSuchNet")
    with pytest.raises(ValueError, match="TorchvisionSegmentationModel.name"):
        TorchvisionSegmentationModel("no_such_model").build(num_classes=3)


def test_checkpoint_round_trip(tmp_path):
    from safetensors.torch import save_file

    source = SMPModel("FPN", encoder="tu-resnet10t")
    model = source.build(num_classes=3, in_chans=3).eval()
    save_file(model.state_dict(), str(tmp_path / "w.safetensors"))
    loaded = SMPModel("FPN", encoder="tu-resnet10t", checkpoint=str(tmp_path / "w.safetensors")).build(3, 3).eval()
    x = torch.randn(1, 3, 32, 32)
    assert torch.equal(model(x), loaded(x))


def test_mmseg_adapter():
    pytest.importorskip(
        "mmseg.models",
        reason="mmsegmentation is optional and does not install on current torch (mmcv has no wheels); "
        "MMSegModel is tested only where it imports",
    )
    from zoo.models import MMSegModel

    assert MMSegModel(config="missing.py").describe() == "mmseg:missing.py"


def test_mmseg_missing_fails_with_the_way_out(monkeypatch):
    import sys

    from zoo.models import MMSegModel

    # Whether or not mmseg is installed here, make its import fail as it does where it is missing.
    for name in ("mmseg", "mmseg.apis", "mmengine"):
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(ImportError, match="SMPModel"):
        MMSegModel(config="x.py").build(num_classes=3)
