"""Flat parameters and functional forward, the trajectory files and buffer, and expert training on tiny digits."""

import re
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from zoo.data import DigitsDataModule
from zoo.dataset_distillation import buffer as buffer_module
from zoo.dataset_distillation.buffer import (
    Trajectory,
    TrajectoryBuffer,
    expert_file,
    load_trajectory,
    read_header,
    save_trajectory,
)
from zoo.dataset_distillation.experts import (
    ExpertTraining,
    input_gradient_penalty,
    loss_decay_weight,
)
from zoo.dataset_distillation.functional import (
    ParamLayout,
    check_functional,
    functional_forward,
)
from zoo.models.convnet import ConvNet, ConvNetModel

ROOT = Path(__file__).resolve().parents[2]
DIGITS_EXPERTS = "configs/dataset_distillation/digits/experts.yaml"


def tiny_net(**kwargs) -> ConvNet:
    return ConvNet(**{"num_classes": 10, "in_chans": 1, "width": 4, "depth": 2, "image_size": 8, **kwargs})


# ------------------------------------------------------------------------------------------------ functional
def test_functional_forward_equals_the_module_and_reaches_params_and_input():
    net = tiny_net()
    layout = ParamLayout.from_module(net)
    assert layout.names[0] == "features.0.weight" and layout.names[-1] == "classifier.bias"
    assert layout.num_params == sum(p.numel() for p in net.parameters())
    flat = layout.flatten(net).requires_grad_()
    x = torch.randn(3, 1, 8, 8, requires_grad=True)
    out = functional_forward(net, layout, flat, x)
    torch.testing.assert_close(out, net(x))
    g_flat, g_x = torch.autograd.grad(out.square().sum(), (flat, x), create_graph=True)
    assert g_flat.shape == flat.shape and g_flat.abs().sum() > 0 and g_x.abs().sum() > 0
    # one unrolled step stays differentiable in x (second order), and flat was never modified in place
    w1 = flat - 0.1 * g_flat
    (g2,) = torch.autograd.grad(functional_forward(net, layout, w1, x).sum(), x)
    assert torch.isfinite(g2).all() and g2.abs().sum() > 0


def test_flatten_unflatten_load_into_and_metadata_round_trip():
    net, other = tiny_net(), tiny_net()
    layout = ParamLayout.from_module(net)
    flat = layout.flatten(net)
    flat.add_(1.0)  # a copy: the network is untouched
    assert not torch.equal(layout.flatten(net), flat)
    views = layout.unflatten(flat)
    assert list(views) == list(layout.names) and views["classifier.weight"].shape == (10, 4 * 2 * 2)
    layout.load_into(other, flat)
    torch.testing.assert_close(layout.flatten(other), flat)
    again = ParamLayout.from_metadata(layout.to_metadata())
    assert again == layout and hash(again) == hash(layout)
    assert layout != ParamLayout.from_module(tiny_net(width=6))
    assert "features.0.weight" in layout.difference(ParamLayout.from_module(tiny_net(width=6)))
    with pytest.raises(ValueError, match="layout"):
        layout.flatten(tiny_net(width=6))
    with pytest.raises(ValueError, match="expected a vector"):
        layout.unflatten(flat[:-1])


def test_check_functional_refuses_batchnorm_and_buffers():
    check_functional(tiny_net())
    with pytest.raises(ValueError, match="BatchNorm.*instancenorm"):
        check_functional(tiny_net(norm="batchnorm"))
    with_buffer = nn.Linear(2, 2)
    with_buffer.register_buffer("scale", torch.ones(2))
    with pytest.raises(ValueError, match="buffers"):
        check_functional(with_buffer)


# ------------------------------------------------------------------------------------------------ buffer
def _write(path: Path, net: nn.Module, epochs: int = 3, **meta) -> torch.Tensor:
    layout = ParamLayout.from_module(net)
    trajectory = torch.randn(epochs + 1, layout.num_params)
    save_trajectory(path, trajectory, layout, {"network": "convnet:test", "dataset": "digits", "zca": False, **meta})
    return trajectory


def test_trajectory_file_round_trip_is_atomic(tmp_path):
    net = tiny_net()
    path = tmp_path / "buf" / "expert_0000.safetensors"
    trajectory = _write(path, net, epochs=3, lr=0.02)
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left behind
    loaded = load_trajectory(path)
    assert isinstance(loaded, Trajectory) and loaded.num_epochs == 3
    torch.testing.assert_close(loaded.params, trajectory)
    assert loaded.layout == ParamLayout.from_module(net)
    assert loaded.metadata == {"network": "convnet:test", "dataset": "digits", "zca": False, "lr": 0.02}
    assert read_header(path).shape == (4, loaded.layout.num_params)
    with pytest.raises(ValueError, match="shape"):
        save_trajectory(path, torch.zeros(4, 3), loaded.layout)


def test_lazy_trajectory_reads_single_snapshots_from_the_file(tmp_path):
    """Distillation's experts: rows come from the memory-mapped file on demand, equal to the eager load."""
    import pickle

    from zoo.dataset_distillation.buffer import LazyParams, TrajectoryBuffer

    net = tiny_net()
    trajectory = _write(tmp_path / "buf" / "expert_0000.safetensors", net, epochs=3, lr=0.02)
    lazy = TrajectoryBuffer(tmp_path / "buf").load(0, lazy=True)
    assert isinstance(lazy.params, LazyParams)
    assert lazy.num_epochs == 3 and lazy.params.shape == trajectory.shape and lazy.metadata["lr"] == 0.02
    for e in (0, 2, 3, -1):
        torch.testing.assert_close(lazy.params[e], trajectory[e])
    with pytest.raises(IndexError, match="out of range"):
        lazy.params[4]
    with pytest.raises(TypeError, match="int"):
        lazy.params[0:2]
    again = pickle.loads(pickle.dumps(lazy.params))  # no open handle travels (spawned workers, deep copies)
    torch.testing.assert_close(again[1], trajectory[1])


def test_a_failed_write_leaves_no_file(tmp_path, monkeypatch):
    def broken(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(buffer_module, "save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        _write(tmp_path / "expert_0000.safetensors", tiny_net())
    assert list(tmp_path.iterdir()) == []


def test_buffer_errors_name_the_folder_the_file_and_the_field(tmp_path):
    with pytest.raises(FileNotFoundError,
                       match=r"missing.*does not exist.*zoo fit --config configs/dataset_distillation/"):
        TrajectoryBuffer(tmp_path / "missing")
    empty = tmp_path / "runs" / "dataset_distillation" / "cifar10" / "experts"
    empty.mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="is empty.*configs/dataset_distillation/cifar10/experts.yaml"):
        TrajectoryBuffer(empty)
    net = tiny_net()
    _write(expert_file(tmp_path / "b", 0), net, epochs=3)
    _write(expert_file(tmp_path / "b", 1), net, epochs=2)
    buf = TrajectoryBuffer(tmp_path / "b")
    assert len(buf) == 2 and buf.num_epochs == 2 and buf.zca() is None
    assert buf.sample(torch.Generator().manual_seed(0)).layout == ParamLayout.from_module(net)
    layout = ParamLayout.from_module(net)
    buf.check(layout, dataset="digits", zca=False)
    # files written before experts recorded the input normalisation: a message of their own
    with pytest.raises(ValueError, match=r"expert_0000\.safetensors: was written before expert files recorded the "
                                         r"input normalisation \(field 'mean'\), so it cannot be checked against this "
                                         r"run's mean \[0\.3\] and std \[0\.4\]"):
        buf.check(layout, mean=(0.3,), std=(0.4,))
    with pytest.raises(ValueError, match=r"expert_0000\.safetensors: field 'dsa_strategy' is not recorded"):
        buf.check(layout, dsa_strategy="color_crop")
    with pytest.raises(ValueError, match=r"expert_0000\.safetensors.*'layout'"):
        buf.check(ParamLayout.from_module(tiny_net(width=6)))
    with pytest.raises(ValueError, match=r"expert_0000\.safetensors.*'dataset' is 'digits'.*'cifar10'"):
        buf.check(ParamLayout.from_module(net), dataset="cifar10")
    with pytest.raises(ValueError, match="'zca'"):
        buf.check(ParamLayout.from_module(net), zca=True)
    # DSA strategy and input normalisation (MTT: the experts must have seen the images the student sees): one line
    # naming the file, the field and both values
    _write(expert_file(tmp_path / "n", 0), net, dsa_strategy="color_crop", mean=[0.3], std=[0.4])
    recorded = TrajectoryBuffer(tmp_path / "n")
    recorded.check(layout, dsa_strategy="color_crop", mean=(0.3,), std=(0.4 + 1e-9,))  # tuples, float round-off
    with pytest.raises(ValueError, match=r"^\S*expert_0000\.safetensors: field 'dsa_strategy' is 'color_crop' in the "
                                         r"expert file but 'color_crop_cutout' in this run; [^\n]*$"):
        recorded.check(layout, dsa_strategy="color_crop_cutout")
    with pytest.raises(ValueError, match=r"expert_0000\.safetensors: field 'mean' is \[0\.3\] in the expert file but "
                                         r"\[0\.25\] in this run"):
        recorded.check(layout, mean=[0.25], std=[0.4])
    with pytest.raises(ValueError, match=r"field 'std' is \[0\.4\] in the expert file but \[0\.4, 0\.4\] in this run"):
        recorded.check(layout, mean=[0.3], std=[0.4, 0.4])
    _write(expert_file(tmp_path / "plain", 0), net, dsa_strategy="none", mean=[0.3], std=[0.4])
    TrajectoryBuffer(tmp_path / "plain").check(layout, dsa_strategy="")  # "none" and "" are both no augmentation
    with pytest.raises(ValueError, match="'dsa_strategy' is 'none' in the expert file but 'color' in this run"):
        TrajectoryBuffer(tmp_path / "plain").check(layout, dsa_strategy="color")
    (tmp_path / "b" / "expert_0002.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ValueError, match="expert_0002"):
        _ = TrajectoryBuffer(tmp_path / "b").num_epochs


# ------------------------------------------------------------------------------------------------ AST terms
def test_gradient_penalty_is_finite_and_differentiable():
    net = tiny_net()
    x = torch.randn(4, 1, 8, 8)
    gp = input_gradient_penalty(net, x)
    assert gp.ndim == 0 and torch.isfinite(gp) and gp > 0
    grads = torch.autograd.grad(gp, list(net.parameters()), allow_unused=True)
    assert any(g is not None and g.abs().sum() > 0 for g in grads)
    # by hand: 2 · mean over (b, h, w) of (‖∂Σlogits/∂x‖₂ over channels − 1)²
    xr = x.clone().requires_grad_()
    (g,) = torch.autograd.grad(net(xr).sum(), xr)
    torch.testing.assert_close(gp, 2 * ((g.norm(dim=1) - 1) ** 2).mean())


def test_loss_decay_and_lr_decay_schedules():
    assert [round(loss_decay_weight(e), 2) for e in (0, 1, 9, 10, 40)] == [0.5, 0.55, 0.95, 1.0, 1.0]
    model = ExpertTraining(ConvNetModel(depth=2, width=4, image_size=8), 10, 1, train_epochs=50, lr=0.01,
                           lr_decay_epoch=26, lr_decay_factor=0.1)
    assert model.lr_at(26) == 0.01 and model.lr_at(27) == pytest.approx(0.001)
    with pytest.raises(ValueError, match="lr_decay_epoch"):
        ExpertTraining(ConvNetModel(depth=2, width=4, image_size=8), train_epochs=5, lr_decay_epoch=5)
    with pytest.raises(ValueError, match="BatchNorm"):
        ExpertTraining(ConvNetModel(depth=2, width=4, image_size=8, norm="batchnorm"))


# ------------------------------------------------------------------------------------------------ training
def _fit(buffer_dir: Path, tmp_path: Path, *extra: str):
    from zoo.cli import ZooCLI

    return ZooCLI(
        args=[
            "fit", "--config", DIGITS_EXPERTS,
            "--model.init_args.network.init_args.width=4",
            "--model.init_args.num_experts=2", "--model.init_args.train_epochs=2", "--trainer.max_epochs=4",
            f"--model.init_args.buffer_dir={buffer_dir}", f"--trainer.default_root_dir={tmp_path / 'logs'}",
            "--trainer.limit_train_batches=3", "--trainer.limit_val_batches=1", "--trainer.logger=false",
            "--summary.enabled=false", *extra,
        ]
    )


def test_experts_train_save_and_resume(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    buffer_dir = tmp_path / "experts"
    cli = _fit(buffer_dir, tmp_path)
    model = cli.model
    assert isinstance(model, ExpertTraining) and cli.trainer.current_epoch == 4
    files = sorted(p.name for p in buffer_dir.iterdir())
    assert files == ["expert_0000.safetensors", "expert_0001.safetensors"]
    buf = TrajectoryBuffer(buffer_dir)
    layout = ParamLayout.from_module(model.net)
    buf.check(layout, dataset="digits", zca=False, dsa_strategy="color_crop_cutout_scale_rotate")
    experts = [buf.load(i) for i in range(2)]
    for k, t in enumerate(experts):
        assert t.params.shape == (3, layout.num_params) and torch.isfinite(t.params).all()
        torch.manual_seed(k)  # seed 0 + k, independently of the module's own helper
        fresh = ConvNet(num_classes=10, in_chans=1, width=4, depth=2, image_size=8)
        torch.testing.assert_close(t.params[0], layout.flatten(fresh))
        assert not torch.equal(t.params[0], t.params[1]) and not torch.equal(t.params[1], t.params[2])
        assert t.metadata["expert"] == k and t.metadata["network"] == "convnet:D2-w4-instancenorm"
        assert t.metadata["lr"] == 0.02 and t.metadata["train_epochs"] == 2 and t.metadata["zca"] is False
        # the input normalisation the experts saw, which distillation checks against its own
        assert t.metadata["mean"] == list(cli.datamodule.mean) and t.metadata["std"] == list(cli.datamodule.std)
    assert not torch.equal(experts[0].params[0], experts[1].params[0])
    assert not torch.equal(experts[0].params[-1], experts[1].params[-1])

    # resume: a finished expert is skipped, a missing one is retrained
    kept = (buffer_dir / "expert_0000.safetensors").read_bytes()
    (buffer_dir / "expert_0001.safetensors").unlink()
    cli = _fit(buffer_dir, tmp_path)
    assert cli.model._plan == [1] and cli.trainer.current_epoch == 2
    assert (buffer_dir / "expert_0000.safetensors").read_bytes() == kept
    assert torch.equal(load_trajectory(buffer_dir / "expert_0001.safetensors").params[0], experts[1].params[0])
    # everything done: nothing is trained
    cli = _fit(buffer_dir, tmp_path)
    assert cli.model._plan == [] and cli.trainer.global_step == 0

    # files of another configuration are refused, naming the file and the field
    with pytest.raises(ValueError, match=r"expert_0000\.safetensors: exists with lr = 0\.02, this run has 0\.05"):
        _fit(buffer_dir, tmp_path, "--model.init_args.lr=0.05")
    assert experts[0].metadata["drop_last"] is False and experts[0].metadata["batch_size"] == 128
    with pytest.raises(ValueError, match=r"expert_0000\.safetensors: exists with drop_last = False, this run has True"):
        _fit(buffer_dir, tmp_path, "--data.init_args.drop_last=true")
    with pytest.raises(ValueError, match=r"expert_0000\.safetensors: exists with batch_size = 128, this run has 64"):
        _fit(buffer_dir, tmp_path, "--data.init_args.batch_size=64")
    other = DigitsDataModule(image_size=8, channels=1, split_seed=1)  # another split: another normalisation
    with pytest.raises(ValueError, match=re.escape(
        f"expert_0000.safetensors: exists with mean = {experts[0].metadata['mean']!r}, "
        f"this run has {list(other.mean)!r}"
    )):
        _fit(buffer_dir, tmp_path, "--data.init_args.split_seed=1")
    # a file written before mean/std were recorded is refused by name, as one without drop_last
    old = load_trajectory(buffer_dir / "expert_0000.safetensors")
    save_trajectory(buffer_dir / "expert_0000.safetensors", old.params, old.layout,
                    {k: v for k, v in old.metadata.items() if k not in ("mean", "std")})
    with pytest.raises(ValueError, match=r"expert_0000\.safetensors: was trained before expert files recorded mean "
                                         r"\(field 'mean'\), so its input normalisation cannot be compared"):
        _fit(buffer_dir, tmp_path)
    # a file written before drop_last was recorded (the loader then dropped the last batch) is refused by name
    metadata = {k: v for k, v in old.metadata.items() if k != "drop_last"}
    save_trajectory(buffer_dir / "expert_0000.safetensors", old.params, old.layout, metadata)
    with pytest.raises(ValueError,
                       match=r"expert_0000\.safetensors: was trained before expert files recorded drop_last"):
        _fit(buffer_dir, tmp_path)


def test_experts_keep_the_last_partial_batch_as_the_official_buffer_does(tmp_path, monkeypatch):
    """1077 digits training images at batch 128: 9 steps per epoch (buffer.py's loader), not 8."""
    monkeypatch.chdir(ROOT)
    args = ["--model.init_args.num_experts=1", "--model.init_args.train_epochs=1", "--trainer.max_epochs=1",
            "--trainer.limit_train_batches=1.0"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cli = _fit(tmp_path / "keep", tmp_path, *args)
    assert len(cli.datamodule.train_set) == 1077 and cli.trainer.global_step == 9
    assert not [w for w in caught if "drop_last" in str(w.message)]
    with pytest.warns(UserWarning, match="drop_last: false to match"):
        cli = _fit(tmp_path / "drop", tmp_path, *args, "--data.init_args.drop_last=true")
    assert cli.trainer.global_step == 8


def test_max_epochs_must_match_and_smooth_zca_experts_are_saved(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    with pytest.raises(ValueError, match="trainer.max_epochs: 4"):
        _fit(tmp_path / "a", tmp_path, "--trainer.max_epochs=3")
    buffer_dir = tmp_path / "zca"
    cli = _fit(buffer_dir, tmp_path, "--model.init_args.zca=true", "--model.init_args.num_experts=1",
               "--trainer.max_epochs=2", "--model.init_args.loss_decay=true",
               "--model.init_args.gradient_penalty=true", "--model.init_args.momentum=0.9")
    assert torch.isfinite(cli.trainer.callback_metrics["train/loss_gp"])
    buf = TrajectoryBuffer(buffer_dir)
    buf.check(ParamLayout.from_module(cli.model.net), dataset="digits", zca=True)
    header = buf.headers[0]
    assert header.num_epochs == 2 and header.metadata["gradient_penalty"] and header.metadata["momentum"] == 0.9
    zca = buf.zca()
    assert zca is not None and zca.fitted
    torch.testing.assert_close(zca.matrix, cli.model.zca_transform.matrix)


def test_fast_dev_run_writes_no_expert(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    cli = _fit(tmp_path / "none", tmp_path, "--trainer.fast_dev_run=true")
    assert cli.trainer.state.finished and torch.isfinite(cli.trainer.logged_metrics["train/loss"])
    assert not (tmp_path / "none").exists()
