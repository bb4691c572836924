"""ConvNet-D of dataset distillation: shapes, padding, parameter counts, the config source."""

import pytest
import torch
from torch import nn

from zoo.models.convnet import ConvNet, ConvNetModel, has_batchnorm


@pytest.mark.parametrize(
    ("in_chans", "size", "depth", "width", "features"),
    [(1, 8, 2, 32, 32 * 2 * 2), (3, 32, 3, 16, 16 * 4 * 4), (1, 28, 3, 8, 8 * 4 * 4)],
)
def test_output_and_feature_shapes(in_chans, size, depth, width, features):
    net = ConvNet(num_classes=7, in_chans=in_chans, width=width, depth=depth, image_size=size)
    assert net.feature_dim == features and net.classifier.in_features == features
    assert net(torch.randn(2, in_chans, size, size)).shape == (2, 7)


def test_one_channel_28_pixels_pads_the_first_conv_by_3_only():
    mnist = ConvNet(in_chans=1, width=8, image_size=28)
    assert mnist.features[0].padding == (3, 3) and mnist.features[4].padding == (1, 1)
    assert ConvNet(in_chans=1, width=8, depth=2, image_size=8).features[0].padding == (1, 1)
    assert ConvNet(in_chans=3, width=8, image_size=28).features[0].padding == (1, 1)


def test_parameter_counts_match_mtt():
    count = lambda net: sum(p.numel() for p in net.parameters())
    assert count(ConvNet(num_classes=10)) == 320_010  # CIFAR-10 ConvNet-3, width 128
    assert count(ConvNet(num_classes=100)) == 504_420
    assert count(ConvNet(num_classes=10, in_chans=1, width=32, depth=2, image_size=8)) == 10_986  # spec (g)


def test_instance_norm_is_buffer_free_and_relu_not_inplace():
    net = ConvNet(width=8)
    assert isinstance(net.features[1], nn.GroupNorm) and net.features[1].num_groups == 8
    assert not list(net.buffers()) and not has_batchnorm(net)
    assert all(not m.inplace for m in net.modules() if isinstance(m, nn.ReLU))
    assert has_batchnorm(ConvNet(width=8, norm="batchnorm"))
    assert not any(isinstance(m, (nn.GroupNorm, nn.BatchNorm2d)) for m in ConvNet(width=8, norm="none").modules())


def test_bad_arguments_name_the_field():
    with pytest.raises(ValueError, match="norm"):
        ConvNet(norm="layernorm")
    with pytest.raises(ValueError, match="too small"):
        ConvNet(depth=4, image_size=8)


def test_source_builds_describes_and_defaults_to_the_data(tmp_path):
    source = ConvNetModel(depth=2, width=16, image_size=8)
    assert source.describe() == "convnet:D2-w16-instancenorm"
    assert ConvNetModel().describe() == "convnet:D3-w128-instancenorm"
    net = source.build(num_classes=5, in_chans=1)
    assert net(torch.randn(1, 1, 8, 8)).shape == (1, 5)
    assert (
        ConvNetModel(num_classes=3, in_chans=3, image_size=8, depth=2, width=4).build(5, 1).classifier.out_features == 3
    )
    config = source.to_config()
    assert config["class_path"] == "zoo.models.convnet.ConvNetModel" and config["init_args"]["width"] == 16
    from safetensors.torch import save_file

    save_file(net.state_dict(), str(tmp_path / "w.safetensors"))
    again = ConvNetModel(depth=2, width=16, image_size=8, checkpoint=str(tmp_path / "w.safetensors")).build(5, 1)
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), again.state_dict().values()))
