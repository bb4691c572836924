"""Teacher hygiene (frozen, eval, no grad, ensembles, re-normalisation) and feature taps by module path."""

import pytest
import timm
import torch
import torchvision
from torch import nn

from zoo.models import CIFARModel
from zoo.teacher import FeatureTaps, Teacher


def small_cnn(classes: int = 5) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Dropout(0.5),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, classes),
    )


def test_teacher_is_frozen_and_stays_in_eval():
    teacher = Teacher(small_cnn())
    assert all(not p.requires_grad for p in teacher.parameters())
    teacher.train()
    assert not teacher.training and not any(m.training for m in teacher.modules())
    x = torch.randn(4, 3, 8, 8, requires_grad=True)
    out = teacher(x)
    assert out.grad_fn is None and not out.requires_grad
    # eval mode: BatchNorm running stats untouched, dropout off (two calls agree)
    before = teacher.members[0][1].running_mean.clone()
    assert torch.equal(teacher(x), out)
    assert torch.equal(teacher.members[0][1].running_mean, before)


def test_ensemble_averages_probabilities_not_logits():
    members = [small_cnn(), small_cnn(), small_cnn()]
    teacher = Teacher(members, ensemble="prob")
    x = torch.randn(6, 3, 8, 8)
    with torch.no_grad():
        probs = torch.stack([m.eval()(x).softmax(-1) for m in members]).mean(0)
        mean_logits = torch.stack([m(x) for m in members]).mean(0)
    out = teacher(x)
    torch.testing.assert_close(out.softmax(-1), probs, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.exp().sum(-1), torch.ones(6), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(Teacher(members, ensemble="logit")(x), mean_logits)
    assert len(teacher.member_logits(x)) == 3


def test_renormalisation_equals_normalising_with_the_teacher_statistics():
    net = small_cnn()
    m_t, s_t = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    m_s, s_s = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    teacher = Teacher(net, expected_norm=[(m_t, s_t)])
    teacher.set_input_normalization(m_s, s_s)
    raw = torch.rand(4, 3, 8, 8)
    as_student = (raw - torch.tensor(m_s).view(1, 3, 1, 1)) / torch.tensor(s_s).view(1, 3, 1, 1)
    as_teacher = (raw - torch.tensor(m_t).view(1, 3, 1, 1)) / torch.tensor(s_t).view(1, 3, 1, 1)
    with torch.no_grad():
        expected = net.eval()(as_teacher)
    torch.testing.assert_close(teacher(as_student), expected, rtol=1e-4, atol=1e-5)
    # identical statistics: no map at all
    same = Teacher(net, expected_norm=[(m_s, s_s)])
    same.set_input_normalization(m_s, s_s)
    assert same._affine == [None]


def test_from_sources_builds_members_with_data_classes():
    teacher = Teacher.from_sources([CIFARModel("resnet8"), CIFARModel("resnet14")], num_classes=10, in_chans=1)
    assert teacher(torch.randn(2, 1, 16, 16)).shape == (2, 10)
    assert teacher.describe() == "ensemble[cifar:resnet8, cifar:resnet14] (prob)"


def test_taps_by_module_path_timm_fast_path_and_hooks():
    model = timm.create_model("resnet18", num_classes=7).eval()
    x = torch.randn(2, 3, 64, 64)
    taps = FeatureTaps(model, ["pre_logits", "layer4", "fc:input", "intermediates.3", "layer1.0.bn1"])
    logits, feats = taps(x)
    with torch.no_grad():
        ref_features = model.forward_features(x)
        ref_pre = model.forward_head(ref_features, pre_logits=True)
        torch.testing.assert_close(logits, model(x))
        torch.testing.assert_close(feats["layer4"], ref_features)
        torch.testing.assert_close(feats["pre_logits"], ref_pre)
        torch.testing.assert_close(feats["fc:input"], ref_pre)
        ref_l3 = model.layer3(model.layer2(model.layer1(model.maxpool(model.act1(model.bn1(model.conv1(x)))))))
        torch.testing.assert_close(feats["intermediates.3"], ref_l3)
    # A BatchNorm output followed by timm's in-place ReLU: the tap must hold the pre-activation values.
    assert (feats["layer1.0.bn1"] < 0).any()


def test_taps_on_torchvision_model_hook_the_classifier_input():
    model = torchvision.models.resnet18(num_classes=4).eval()
    x = torch.randn(2, 3, 32, 32)
    logits, feats = FeatureTaps(model, ["pre_logits", "layer2"])(x)
    with torch.no_grad():
        h = model.maxpool(model.relu(model.bn1(model.conv1(x))))
        l2 = model.layer2(model.layer1(h))
        pooled = torch.flatten(model.avgpool(model.layer4(model.layer3(l2))), 1)
    torch.testing.assert_close(feats["layer2"], l2)
    torch.testing.assert_close(feats["pre_logits"], pooled)
    torch.testing.assert_close(logits, model.fc(pooled))


def test_taps_on_cifar_models_and_teacher():
    teacher = Teacher.from_sources(CIFARModel("resnet8"), num_classes=10, in_chans=1, taps=["pre_logits", "layer3"])
    x = torch.randn(3, 1, 16, 16)
    logits, feats = teacher.forward_features(x)
    net = teacher.members[0]
    with torch.no_grad():
        torch.testing.assert_close(feats["layer3"], net.forward_features(x))
        torch.testing.assert_close(feats["pre_logits"], net.forward_head(net.forward_features(x), pre_logits=True))
        torch.testing.assert_close(logits, net(x))
    assert not feats["pre_logits"].requires_grad


def test_bad_tap_names_fail_with_the_path():
    with pytest.raises(ValueError, match="layer9"):
        FeatureTaps(small_cnn(), ["layer9"])
    with pytest.raises(ValueError, match="':input' or ':output'"):
        FeatureTaps(small_cnn(), ["0:middle"])
    with pytest.raises(ValueError, match="forward_intermediates"):
        FeatureTaps(small_cnn(), ["intermediates.1"])
