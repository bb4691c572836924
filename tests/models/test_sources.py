"""Model sources: timm, torchvision and CIFAR models by name, and checkpoint reading."""

import pytest
import torch

from zoo.models import CIFARModel, TimmModel, TorchvisionModel, load_weights, read_state_dict


def test_sources_build_with_the_data_classes_and_channels():
    x1 = torch.randn(2, 1, 16, 16)
    assert CIFARModel("wrn_16_1").build(num_classes=10, in_chans=1)(x1).shape == (2, 10)
    assert TimmModel("resnet18").build(num_classes=10, in_chans=1)(x1).shape == (2, 10)
    assert TimmModel("resnet18", num_classes=7).build(num_classes=10, in_chans=1)(x1).shape == (2, 7)
    tv = TorchvisionModel("resnet18").build(num_classes=10, in_chans=3)
    assert tv(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    with pytest.raises(ValueError, match="3-channel"):
        TorchvisionModel("resnet18").build(num_classes=10, in_chans=1)


def test_unknown_names_fail_with_the_field():
    with pytest.raises(ValueError, match="CIFARModel.name"):
        CIFARModel("resnet9000")
    with pytest.raises(ValueError, match="TimmModel.name"):
        TimmModel("not_a_model").build()
    with pytest.raises(ValueError, match="TorchvisionModel.name"):
        TorchvisionModel("not_a_model").build()
    with pytest.raises(ValueError, match="std must be positive"):
        CIFARModel("resnet8", mean=[0.5], std=[0.0])


def test_checkpoints_in_the_usual_wrappings_load(tmp_path):
    from safetensors.torch import save_file

    net = CIFARModel("resnet8").build(num_classes=10, in_chans=1)
    sd = net.state_dict()
    files = {
        "plain.pt": sd,
        "mdistiller.pth": {"model": sd, "epoch": 240},
        "ddp.pth": {"state_dict": {f"module.{k}": v for k, v in sd.items()}},
        "lightning.ckpt": {"state_dict": {**{f"student.{k}": v for k, v in sd.items()}, "aux.w": torch.ones(1)}},
    }
    for name, obj in files.items():
        torch.save(obj, tmp_path / name)
    save_file(sd, str(tmp_path / "w.safetensors"))
    for name in [*files, "w.safetensors"]:
        fresh = CIFARModel("resnet8", checkpoint=str(tmp_path / name)).build(num_classes=10, in_chans=1)
        for k, v in fresh.state_dict().items():
            assert torch.equal(v, sd[k]), (name, k)
    assert set(read_state_dict(tmp_path / "lightning.ckpt")) == set(sd)


def test_mismatched_or_missing_checkpoint_fails_naming_the_file(tmp_path):
    net = CIFARModel("resnet8").build(num_classes=10, in_chans=1)
    torch.save(net.state_dict(), tmp_path / "r8.pt")
    other = CIFARModel("resnet14").build(num_classes=10, in_chans=1)
    with pytest.raises(ValueError, match="r8.pt") as err:
        load_weights(other, tmp_path / "r8.pt")
    assert "missing keys" in str(err.value)
    wrong_classes = CIFARModel("resnet8").build(num_classes=100, in_chans=1)
    with pytest.raises(ValueError, match="shape mismatches"):
        load_weights(wrong_classes, tmp_path / "r8.pt")
    with pytest.raises(FileNotFoundError, match="CIFARModel.checkpoint: file not found"):
        CIFARModel("resnet8", checkpoint=str(tmp_path / "absent.pt")).build()
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="junk.pt"):
        read_state_dict(tmp_path / "junk.pt")
