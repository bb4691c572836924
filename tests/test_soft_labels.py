"""Cached soft labels: replayable augmentations, the cache's refusal checks, replay determinism, the KD identity."""

from __future__ import annotations

import json

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from zoo.data import DigitsDataModule
from zoo.data.transforms import PadCropFlip, ResizedCropFlip
from zoo.losses import DKDLoss, KDLoss
from zoo.methods import DKD, KD, KDND
from zoo.soft_labels import (
    CachedSoftLabelDataset,
    SoftLabelCache,
    SoftLabels,
    build_soft_label_cache,
    soft_labels_to_logits,
    teacher_fingerprint,
)
from zoo.teacher import Teacher


def tiny_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(16, 10)
    )


def digits_source(**kwargs):
    dm = DigitsDataModule(image_size=8, channels=1, **kwargs)
    dm.setup()
    return dm, *dm.replay_source()


def build(tmp_path, teacher: nn.Module, dm, source, augment, temperature: float = 4.0, **opts):
    options = SoftLabels(path=str(tmp_path), **{"repeats": 3, "shard_size": 400, **opts})
    fp = {"teacher": teacher_fingerprint(teacher), "data": "digits", "augmentation": augment.spec()}
    build_soft_label_cache(
        tmp_path, teacher, source, augment, fp, num_classes=10, temperature=temperature, options=options
    )
    k = min(options.top_k or 10, 10)
    expected = {**fp, "temperature": temperature, "num_classes": 10, "top_k": k, "repeats": options.repeats, "seed": 0}
    return expected


# ----------------------------------------------------------------------------------------------- augmentations
def test_pad_crop_flip_equals_torchvision_crop_and_flip_on_the_raw_image() -> None:
    import torchvision.transforms.functional as TF

    g = torch.Generator().manual_seed(0)
    raw = torch.rand(3, 32, 32, generator=g)
    mean, std = torch.tensor([0.5, 0.4, 0.3]), torch.tensor([0.2, 0.25, 0.3])
    aug = PadCropFlip(4, flip=True, fill=(-mean / std).tolist())
    for params in aug.sample(20, g):
        dy, dx, flip = (int(v) for v in params)
        expected = TF.crop(TF.pad(raw, [4]), dy, dx, 32, 32)  # pad the raw image with black, crop, flip, normalise
        expected = TF.hflip(expected) if flip else expected
        expected = (expected - mean.view(3, 1, 1)) / std.view(3, 1, 1)
        got = aug.apply((raw - mean.view(3, 1, 1)) / std.view(3, 1, 1), params)
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


def test_pad_crop_flip_params_cover_the_range_and_the_digits_preset_never_flips() -> None:
    g = torch.Generator().manual_seed(0)
    p = PadCropFlip(2, flip=False).sample(500, g)
    assert p[:, :2].min() == 0 and p[:, :2].max() == 4 and (p[:, 2] == 0).all()
    assert set(PadCropFlip(2, flip=True).sample(500, g)[:, 2].tolist()) == {0.0, 1.0}


def test_resized_crop_flip_replays_the_same_view_and_boxes_stay_inside() -> None:
    from PIL import Image

    aug = ResizedCropFlip(16)
    params = aug.sample(50, torch.Generator().manual_seed(0))
    top, left, h, w = params[:, 0], params[:, 1], params[:, 2], params[:, 3]
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= 1 + 1e-6).all() and (left + w <= 1 + 1e-6).all()
    area = h * w
    assert (area >= 0.08 - 1e-6).all()
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 60, 3), dtype=np.uint8))
    a, b = aug.apply(image, params[0]), aug.apply(image, params[0])
    assert a.size == (16, 16) and np.array_equal(np.asarray(a), np.asarray(b))


# ----------------------------------------------------------------------------------------------- pseudo-logits
def test_pseudo_logits_give_back_the_stored_distribution_and_the_same_kd_loss() -> None:
    g = torch.Generator().manual_seed(0)
    teacher, student, y = (
        torch.randn(8, 10, generator=g) * 3,
        torch.randn(8, 10, generator=g),
        torch.randint(0, 10, (8,)),
    )
    t = 4.0
    top = (teacher / t).softmax(-1).topk(10)
    pseudo = soft_labels_to_logits(top.indices, top.values, 10, t)
    torch.testing.assert_close((pseudo / t).softmax(-1), (teacher / t).softmax(-1))
    torch.testing.assert_close(KDLoss(t)(student, pseudo), KDLoss(t)(student, teacher))
    torch.testing.assert_close(DKDLoss(1.0, 8.0, t)(student, pseudo, y), DKDLoss(1.0, 8.0, t)(student, teacher, y))


def test_top_k_spreads_the_rest_of_the_mass_evenly() -> None:
    probs = torch.tensor([[0.5, 0.3, 0.1, 0.05, 0.05]])
    top = probs.topk(2)
    p = (soft_labels_to_logits(top.indices, top.values, 5, 2.0) / 2.0).softmax(-1)
    torch.testing.assert_close(p, torch.tensor([[0.5, 0.3, 0.2 / 3, 0.2 / 3, 0.2 / 3]]))


# ----------------------------------------------------------------------------------------------- the cache
def test_replay_rebuilds_exactly_the_view_the_teacher_labelled(tmp_path) -> None:
    dm, source, augment, _ = digits_source()
    teacher = tiny_net().eval()
    expected = build(tmp_path, teacher, dm, source, augment)
    cache = SoftLabelCache(tmp_path, expected)
    assert len(cache) == len(source) and cache.num_shards == 3
    for i in (0, 399, 400, len(source) - 1):
        for r in range(3):
            index, prob, params = cache.view(i, r)
            with torch.no_grad():
                p = (teacher(augment.apply(source[i][0], params)[None]) / 4.0).softmax(-1)[0]
            torch.testing.assert_close(prob, p[index], rtol=0, atol=2e-3)  # float16 storage
    torch.manual_seed(0)
    dataset = CachedSoftLabelDataset(source, cache, augment)
    item = dataset[5]
    assert set(item) == {"image", "label", "soft_index", "soft_prob"} and item["image"].shape == (1, 8, 8)


def test_a_second_build_with_the_same_seed_is_identical(tmp_path) -> None:
    dm, source, augment, _ = digits_source()
    teacher = tiny_net().eval()
    build(tmp_path / "a", teacher, dm, source, augment)
    build(tmp_path / "b", teacher, dm, source, augment)
    for name in ("shard_00001.params.npy", "shard_00001.prob.npy", "shard_00001.index.npy"):
        assert np.array_equal(np.load(tmp_path / "a" / name), np.load(tmp_path / "b" / name))


@pytest.mark.parametrize(
    ("field", "change"),
    [
        ("teacher", lambda e: {**e, "teacher": teacher_fingerprint(tiny_net(seed=1))}),
        ("temperature", lambda e: {**e, "temperature": 1.0}),
        ("augmentation", lambda e: {**e, "augmentation": PadCropFlip(1, flip=False).spec()}),
        ("data", lambda e: {**e, "data": "cifar100"}),
        ("repeats", lambda e: {**e, "repeats": 5}),
    ],
)
def test_a_cache_built_for_something_else_is_refused_naming_the_field(tmp_path, field, change) -> None:
    dm, source, augment, _ = digits_source()
    expected = build(tmp_path, tiny_net().eval(), dm, source, augment)
    with pytest.raises(ValueError, match=f"built for {field}="):
        SoftLabelCache(tmp_path, change(expected))


def digits_cache_args(tmp_path, repeats: int):
    """Source, augmentation, teacher, fingerprint and build options of a 3-shard digits cache."""
    _, source, augment, _ = digits_source()
    teacher = tiny_net().eval()
    fp = {"teacher": teacher_fingerprint(teacher), "data": "digits", "augmentation": augment.spec()}
    options = SoftLabels(path=str(tmp_path), repeats=repeats, shard_size=400)
    return source, augment, teacher, fp, {"num_classes": 10, "temperature": 4.0, "options": options}


def test_an_interrupted_build_is_refused_then_finished_keeping_its_shards(tmp_path) -> None:
    source, augment, teacher, fp, kwargs = digits_cache_args(tmp_path, repeats=2)
    build_soft_label_cache(tmp_path, teacher, source, augment, fp, shards=[0], **kwargs)
    assert not json.loads((tmp_path / "cache.json").read_text())["complete"]
    assert not list(tmp_path.glob("*.tmp"))
    with pytest.raises(ValueError, match="incomplete"):
        SoftLabelCache(tmp_path)
    first = (tmp_path / "shard_00000.prob.npy").stat().st_mtime_ns
    build_soft_label_cache(tmp_path, teacher, source, augment, fp, **kwargs)
    assert (tmp_path / "shard_00000.prob.npy").stat().st_mtime_ns == first  # kept, not recomputed
    assert SoftLabelCache(tmp_path).manifest["complete"]
    (tmp_path / "shard_00002.index.npy").unlink()
    with pytest.raises(FileNotFoundError, match="shard_00002.index.npy"):
        SoftLabelCache(tmp_path)


# ----------------------------------------------------------------------------------------------- methods
def _kd(tmp_path, cls=KD, **kwargs):
    return cls(
        tiny_net(seed=2),
        tiny_net(),
        num_classes=10,
        in_chans=1,
        soft_labels=SoftLabels(path=str(tmp_path / "cache"), repeats=2),
        **kwargs,
    )


def _trainer(**kwargs) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        **kwargs,
    )


def test_cached_kd_never_runs_the_teacher_in_training_and_matches_online_loss(tmp_path) -> None:
    method = _kd(tmp_path)
    dm = DigitsDataModule(image_size=8, channels=1, batch_size=32)
    calls = {"n": 0}
    original = method.teacher.forward_features

    def counting(x):
        calls["n"] += 1
        return original(x)

    method.teacher.forward_features = counting
    trainer = _trainer(max_steps=4, limit_val_batches=0)
    trainer.fit(method, datamodule=dm)
    # the build's teacher batches and nothing else: the 4 training steps read the cache, not the teacher
    assert calls["n"] == -(-len(dm.replay_source()[0]) * 2 // 256)
    assert (tmp_path / "cache" / "cache.json").is_file() and isinstance(dm.train_set, CachedSoftLabelDataset)
    batch = next(iter(dm.train_dataloader()))
    with torch.no_grad():  # the cached term equals the online term on the replayed views
        cached = method.cached_teacher_outputs(batch).logits
        online = method.teacher(batch["image"])
        s = method.student(batch["image"])
    torch.testing.assert_close(method.kd_loss(s, cached), method.kd_loss(s, online), rtol=2e-3, atol=2e-3)


def test_methods_that_need_more_than_logits_refuse_soft_labels(tmp_path) -> None:
    with pytest.raises(ValueError, match="KDND.soft_labels"):
        KDND(tiny_net(seed=2), tiny_net(), num_classes=10, in_chans=1, soft_labels=SoftLabels(path=str(tmp_path)))
    DKD(tiny_net(seed=2), tiny_net(), num_classes=10, in_chans=1, soft_labels=SoftLabels(path=str(tmp_path)))


def test_a_cache_for_another_temperature_stops_the_fit_naming_the_field(tmp_path) -> None:
    _trainer(max_steps=1, limit_val_batches=0).fit(_kd(tmp_path), datamodule=DigitsDataModule(image_size=8, channels=1))
    method = _kd(tmp_path, temperature=2.0)
    with pytest.raises(ValueError, match="built for temperature=4.0, this run has temperature=2.0"):
        _trainer(max_steps=1, limit_val_batches=0).fit(method, datamodule=DigitsDataModule(image_size=8, channels=1))


def test_data_without_a_replayable_augmentation_is_refused(tmp_path) -> None:
    from zoo.data.digit_scenes import DigitScenesDataModule

    with pytest.raises(ValueError, match="DigitScenesDataModule cannot replay"):
        DigitScenesDataModule().replay_source()


# ----------------------------------------------------------------------------------------------- fast path
def test_channels_last_teacher_gives_the_same_logits() -> None:
    net = tiny_net()
    x = torch.randn(4, 1, 8, 8)
    reference = net(x)
    teacher = Teacher(net)
    teacher.set_fast_path(channels_last=True)
    assert net[0].weight.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(teacher(x), reference)
    teacher.set_fast_path(channels_last=False)
    assert net[0].weight.is_contiguous()


def test_compiled_teacher_gives_the_same_logits() -> None:
    net = tiny_net()
    x = torch.randn(4, 1, 8, 8)
    reference = net(x)
    teacher = Teacher(net)
    teacher.set_fast_path(compile={"backend": "eager"})  # no C++ toolchain needed; inductor on real runs
    torch.testing.assert_close(teacher(x), reference)


def test_teacher_runs_in_the_students_autocast_dtype_without_a_graph() -> None:
    seen = {}

    class Probe(KD):
        def loss_terms(self, student, teacher, target):
            seen["teacher"], seen["student"] = teacher.logits.dtype, student.logits.dtype
            seen["grad"] = teacher.logits.requires_grad
            return super().loss_terms(student, teacher, target)

    method = Probe(tiny_net(seed=2), tiny_net(), num_classes=10, in_chans=1, channels_last=True)
    _trainer(max_steps=1, limit_val_batches=0, precision="bf16-mixed").fit(
        method, datamodule=DigitsDataModule(image_size=8, channels=1, batch_size=16)
    )
    assert seen == {"teacher": torch.bfloat16, "student": torch.bfloat16, "grad": False}
    assert method.student[0].weight.is_contiguous(memory_format=torch.channels_last)


def test_kd_from_pseudo_logits_backpropagates_only_to_the_student() -> None:
    s = torch.randn(4, 10, requires_grad=True)
    top = torch.randn(4, 10).softmax(-1).topk(3)
    loss = KDLoss(4.0)(s, soft_labels_to_logits(top.indices, top.values, 10, 4.0))
    loss.backward()
    assert s.grad is not None and torch.isfinite(s.grad).all()
    assert F.softmax(soft_labels_to_logits(top.indices, top.values, 10, 4.0) / 4.0, -1).sum(-1).allclose(torch.ones(4))


def test_a_cached_kd_config_runs_through_the_zoo_command(tmp_path, monkeypatch) -> None:
    from pathlib import Path

    from zoo.cli import main

    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    cache = tmp_path / "cache"
    main(
        [
            "fit",
            "--config",
            "configs/quickstart.yaml",
            "--trainer.max_epochs=1",
            "--trainer.limit_train_batches=3",
            "--trainer.limit_val_batches=1",
            f"--trainer.default_root_dir={tmp_path}",
            "--summary.enabled=false",
            f"--model.init_args.soft_labels.path={cache}",
            "--model.init_args.soft_labels.repeats=2",
        ]
    )
    manifest = json.loads((cache / "cache.json").read_text())
    assert manifest["complete"] and manifest["temperature"] == 4.0 and manifest["repeats"] == 2
    assert manifest["augmentation"] == {
        "name": "pad_crop_flip",
        "pad": 4,
        "flip": False,
        "fill": manifest["augmentation"]["fill"],
    }


def test_an_image_folder_cache_replays_random_resized_crops(tmp_path) -> None:
    from PIL import Image

    from zoo.data import ImageFolderDataModule

    rng = np.random.default_rng(0)
    for c in ("cat", "dog"):
        (tmp_path / "data" / "train" / c).mkdir(parents=True)
        for i in range(3):
            pixels = rng.integers(0, 255, (30 + 5 * i, 40, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / "data" / "train" / c / f"{i}.png")
    dm = ImageFolderDataModule(root=str(tmp_path / "data"), image_size=16, num_workers=0)
    source, augment, to_tensor = dm.replay_source()
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2)).eval()
    options = SoftLabels(path=str(tmp_path / "cache"), repeats=3, shard_size=4)
    fp = {"teacher": teacher_fingerprint(teacher), "data": "fake", "augmentation": augment.spec()}
    build_soft_label_cache(
        tmp_path / "cache",
        teacher,
        source,
        augment,
        fp,
        num_classes=2,
        temperature=1.0,
        options=options,
        to_tensor=to_tensor,
        num_workers=1,
    )
    cache = SoftLabelCache(tmp_path / "cache", {"augmentation": augment.spec(), "top_k": 2})
    assert cache.num_shards == 2 and len(cache) == 6
    index, prob, params = cache.view(5, 2)
    with torch.no_grad():
        p = teacher(to_tensor(augment.apply(source[5][0], params))[None]).softmax(-1)[0]
    torch.testing.assert_close(prob, p[index], rtol=0, atol=2e-3)
    item = CachedSoftLabelDataset(source, cache, augment, to_tensor)[0]
    assert item["image"].shape == (3, 16, 16)


def test_ranks_build_their_own_shards_and_rank_zero_completes_the_cache(tmp_path) -> None:
    source, augment, teacher, fp, kwargs = digits_cache_args(tmp_path, repeats=1)
    build_soft_label_cache(tmp_path, teacher, source, augment, fp, shards=[], **kwargs)  # rank 0: header
    build_soft_label_cache(tmp_path, teacher, source, augment, fp, shards=range(0, 3, 2), **kwargs)  # rank 0 of 2
    assert not json.loads((tmp_path / "cache.json").read_text())["complete"]
    build_soft_label_cache(tmp_path, teacher, source, augment, fp, shards=range(1, 3, 2), **kwargs)  # rank 1 of 2
    build_soft_label_cache(tmp_path, teacher, source, augment, fp, shards=[], **kwargs)  # rank 0: completes
    assert SoftLabelCache(tmp_path).manifest["complete"]
    single = tmp_path / "single"
    build_soft_label_cache(single, teacher, source, augment, fp, **kwargs)
    for s in range(3):
        assert np.array_equal(
            np.load(tmp_path / f"shard_{s:05d}.prob.npy"), np.load(single / f"shard_{s:05d}.prob.npy")
        )


def test_a_run_that_builds_the_cache_trains_as_one_that_reuses_it(tmp_path, monkeypatch) -> None:
    """The build runs under a forked random state, so building the cache does not change the training draws."""
    from pathlib import Path

    from zoo.cli import ZooCLI

    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    cache = tmp_path / "cache"

    def student(run: str) -> dict:
        cli = ZooCLI(args=["--config", "configs/quickstart.yaml", "--trainer.max_epochs=1",
                           "--trainer.limit_train_batches=3", "--trainer.limit_val_batches=0",
                           "--trainer.enable_checkpointing=false", "--trainer.logger=false",
                           f"--trainer.default_root_dir={tmp_path / run}", "--summary.enabled=false",
                           f"--model.init_args.soft_labels.path={cache}", "--model.init_args.soft_labels.repeats=2"],
                     run=False)
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
        return {k: v.clone() for k, v in cli.model.student.state_dict().items()}

    built = student("build")
    assert json.loads((cache / "cache.json").read_text())["complete"]
    reused = student("reuse")
    for key, value in built.items():
        assert torch.equal(value, reused[key]), key
