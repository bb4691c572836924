"""VL2V-ADiP: loss identity, zero-shot equivalence, the two stages' freezing, the teacher-free text head, CutMix,
the digits CLIP trainer, and every VL2V-ADiP config (digits: a couple of steps; DomainBed: parsed)."""

import copy
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
import yaml

from zoo.data.domainbed import DomainBedDataModule
from zoo.losses.vl2v_adip import VL2VADiPLoss
from zoo.methods.vl2v_adip import CLIPContrastive, VL2VADiP, cutmix_box
from zoo.models import CIFARModel, TimmModel
from zoo.models.clip import (
    DIGIT_NAMES,
    DIGITS_CLIP_CFG,
    CLIPSpaceStudent,
    CLIPSpaceStudentModel,
    OpenCLIPModel,
    clip_tokenizer,
)
from zoo.models.sources import load_weights

ROOT = Path(__file__).resolve().parents[2]
TINY_VIT = {"img_size": 16, "patch_size": 4, "embed_dim": 32, "depth": 1, "num_heads": 2}


def _teacher() -> OpenCLIPModel:
    return OpenCLIPModel("ViT-B-16", model_cfg=DIGITS_CLIP_CFG)


def _student(backbone=None) -> CLIPSpaceStudentModel:
    backbone = backbone or TimmModel("vit_tiny_patch16_224", model_kwargs=TINY_VIT, num_classes=10)
    return CLIPSpaceStudentModel(backbone, embed_dim=32)


def _adam(params):
    return torch.optim.Adam(params, lr=1e-2)


def _digit_batches(**kw):
    dm = DomainBedDataModule(batch_size=4, eval_batch_size=64, **kw)
    dm.setup("fit")
    return dm.train_dataloader()


def tiny_vl2v_adip():
    """The contract test's recipe, (method, train loader): a random tiny CLIP teacher, a tiny ViT student, batches
    of the digit domains (class names given: the contract fits without a data module)."""
    method = VL2VADiP(_student(), _teacher(), num_classes=10, in_chans=3, class_names=list(DIGIT_NAMES),
                      optimizer=_adam)
    return method, _digit_batches()


def tiny_clip_contrastive():
    """The contract test's recipe for the teacher trainer (no teacher)."""
    method = CLIPContrastive(_teacher(), num_classes=10, in_chans=3, class_names=list(DIGIT_NAMES), optimizer=_adam)
    return method, _digit_batches(test_domains=[])


def _trainer(tmp_path, steps=2, **kw) -> L.Trainer:
    defaults = dict(
        accelerator="cpu", max_steps=steps, limit_train_batches=steps, limit_val_batches=1, limit_test_batches=2,
        num_sanity_val_steps=0, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=tmp_path,
    )
    return L.Trainer(**{**defaults, **kw})


def _align(tmp_path, backbone=None, **kw):
    method = VL2VADiP(_student(backbone), _teacher(), num_classes=10, in_chans=3, optimizer=_adam, **kw)
    dm = DomainBedDataModule(batch_size=4, eval_batch_size=64)
    trainer = _trainer(tmp_path)
    trainer.fit(method, datamodule=dm)
    path = tmp_path / "align.ckpt"
    trainer.save_checkpoint(path)
    return method, dm, path


def test_loss_is_minus_one_when_student_image_and_text_embeddings_coincide():
    u = F.normalize(torch.randn(6, 32, dtype=torch.float64), dim=-1)
    assert VL2VADiPLoss(0.5)(u, u, u).item() == pytest.approx(-1.0, abs=1e-12)


def test_predictions_equal_zero_shot_clip_when_the_student_embedding_is_the_teachers():
    torch.manual_seed(0)
    clip = _teacher().build()
    # û = e_I: the backbone is the teacher's image tower and P the identity
    student = CLIPSpaceStudent(copy.deepcopy(clip.visual), 32, 32, num_classes=10)
    with torch.no_grad():
        student.projection.weight.copy_(torch.eye(32))
        student.projection.bias.zero_()
    method = VL2VADiP(student, clip, num_classes=10, class_names=list(DIGIT_NAMES))
    method.ensure_text_head()
    x = torch.randn(5, 3, 16, 16)
    with torch.no_grad():  # zero-shot CLIP, written out with open_clip's own calls
        text = F.normalize(clip.encode_text(clip_tokenizer(clip)([f"a photo of a {n}" for n in DIGIT_NAMES])), dim=-1)
        zero_shot = clip.logit_scale.exp() * F.normalize(clip.encode_image(x), dim=-1) @ text.T
        assert torch.allclose(method(x), zero_shot, atol=1e-4)
    assert method.student.logit_scale.item() == pytest.approx(clip.logit_scale.exp().item())


def test_align_trains_only_P_with_the_backbone_frozen_and_batchnorm_statistics_unchanged(tmp_path):
    backbone = CIFARModel("resnet8", num_classes=10)  # has BatchNorm
    method = VL2VADiP(_student(backbone), _teacher(), num_classes=10, in_chans=3, optimizer=_adam)
    before = copy.deepcopy(method.student.state_dict())
    modes = []

    class Spy(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, *args):
            modes.append(pl_module.student.backbone.training)

    trainer = _trainer(tmp_path, callbacks=[Spy()])
    trainer.fit(method, datamodule=DomainBedDataModule(batch_size=4, eval_batch_size=64))
    after = method.student.state_dict()
    backbone_keys = [k for k in before if k.startswith("backbone.")]
    assert any("running_mean" in k for k in backbone_keys)
    for k in backbone_keys:  # weights and BatchNorm running statistics alike
        assert torch.equal(after[k], before[k]), k
    assert not torch.equal(after["projection.weight"], before["projection.weight"])
    assert modes == [False, False]
    optimized = {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}
    assert optimized == {id(p) for p in method.student.projection.parameters()}


def test_distill_trains_the_backbone_through_P_frozen_from_the_align_checkpoint(tmp_path):
    aligned, dm, path = _align(tmp_path)
    method = VL2VADiP(_student(), _teacher(), stage="distill", align_checkpoint=str(path), num_classes=10,
                      in_chans=3, optimizer=_adam)
    method.setup("fit")  # where a fit reads the Align checkpoint
    start = copy.deepcopy(method.student.state_dict())
    for k, v in aligned.student.state_dict().items():  # P, text head and backbone of the Align run
        assert torch.equal(start[k], v), k
    assert not any(p.requires_grad for p in method.student.projection.parameters())
    trainer = _trainer(tmp_path)
    trainer.fit(method, datamodule=dm)
    after = method.student.state_dict()
    for k in ("projection.weight", "projection.bias", "class_embeddings", "logit_scale"):
        assert torch.equal(after[k], start[k]), k
    assert any(not torch.equal(after[k], start[k]) for k in after if k.startswith("backbone."))
    optimized = {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}
    assert optimized == {id(p) for p in method.student.backbone.parameters()}
    trainer.save_checkpoint(tmp_path / "distill.ckpt")
    path.unlink()  # a Distill checkpoint loads for evaluation without the Align file
    loaded = VL2VADiP.load_from_checkpoint(tmp_path / "distill.ckpt", teacher=None)
    assert torch.equal(loaded.student.projection.weight, after["projection.weight"])


def test_distill_keeps_batchnorm_frozen_as_the_official_code_unless_told(tmp_path):
    backbone = CIFARModel("resnet8", num_classes=10)
    _, dm, path = _align(tmp_path, backbone)
    for freeze_bn, changes in ((True, False), (False, True)):
        method = VL2VADiP(_student(backbone), _teacher(), stage="distill", align_checkpoint=str(path),
                          freeze_bn=freeze_bn, num_classes=10, in_chans=3, optimizer=_adam)
        before = method.student.backbone.bn1.running_mean.clone()
        _trainer(tmp_path).fit(method, datamodule=dm)
        assert (not torch.equal(method.student.backbone.bn1.running_mean, before)) == changes


def test_distill_without_align_checkpoint_is_refused_at_fit(tmp_path):
    method = VL2VADiP(_student(), _teacher(), stage="distill", num_classes=10, in_chans=3)
    with pytest.raises(ValueError, match="align_checkpoint"):
        _trainer(tmp_path).fit(method, datamodule=DomainBedDataModule(batch_size=4))


def test_the_text_head_needs_no_teacher_at_test_time(tmp_path):
    method, dm, path = _align(tmp_path)
    state = torch.load(path, weights_only=False)["state_dict"]
    assert state and all(k.startswith("student.") for k in state)  # no teacher weights in the checkpoint
    assert "student.class_embeddings" in state
    with_teacher = _trainer(tmp_path).test(method, datamodule=dm, verbose=False)[0]
    alone = VL2VADiP.load_from_checkpoint(path, teacher=None)
    assert alone.teacher is None and alone.hparams.stage == "align"
    without = _trainer(tmp_path).test(alone, datamodule=dm, verbose=False)[0]
    assert without["test/acc"] == with_teacher["test/acc"] and "test/teacher_acc" not in without
    # the bare student, built from its source and the checkpoint, predicts the same
    student = _student().build(num_classes=10, in_chans=3)
    load_weights(student, path)
    x = next(iter(dm.test_dataloader()))[0]
    method.eval()
    with torch.no_grad():
        assert torch.allclose(student.eval()(x), method(x), atol=1e-5)


def test_without_text_head_or_teacher_evaluation_says_what_is_missing(tmp_path):
    method = VL2VADiP(_student(), None, num_classes=10, in_chans=3)
    with pytest.raises(ValueError, match="no text head yet and there is no teacher"):
        _trainer(tmp_path).test(method, datamodule=DomainBedDataModule(batch_size=4, eval_batch_size=64))


def test_teacher_is_frozen_outside_the_module_and_terms_are_logged(tmp_path):
    method, _ = tiny_vl2v_adip()
    teacher_before = copy.deepcopy(method.teacher.state_dict())
    assert not {id(p) for p in method.teacher.parameters()} & {id(p) for p in method.parameters()}
    trainer = _trainer(tmp_path)
    trainer.fit(method, datamodule=DomainBedDataModule(batch_size=4, eval_batch_size=64))
    for k, v in method.teacher.state_dict().items():
        assert torch.equal(v, teacher_before[k]), k
    assert not method.teacher.training
    logged = trainer.logged_metrics
    assert {"train/loss_image", "train/loss_text", "train/loss"} <= set(logged)
    assert {"val/acc", "val/loss", "val/teacher_acc", "val/agreement", "val/cosine"} <= set(logged)
    assert logged["train/loss"].item() == pytest.approx(
        (logged["train/loss_image"] + logged["train/loss_text"]).item(), abs=1e-6
    )


def test_cutmix_mixes_what_the_teacher_and_student_see():
    torch.manual_seed(0)
    r0, r1, c0, c1 = cutmix_box(16, 16, 0.75)
    assert 0 <= r0 <= r1 <= 16 and 0 <= c0 <= c1 <= 16 and (r1 - r0) <= 8 and (c1 - c0) <= 8
    method = VL2VADiP(_student(), _teacher(), num_classes=10, in_chans=3, cutmix_beta=1.0, cutmix_prob=1.0)
    x, y = torch.randn(6, 3, 16, 16), torch.arange(6)
    torch.manual_seed(1)
    mixed, y_b, mix = method._cutmix(x, y)
    changed = (mixed != x).any(0).any(0)  # pixels taken from the permuted batch
    assert 0 < mix < 1 and mix == pytest.approx(1 - changed.float().mean().item(), abs=1 / 256 + 1e-6)
    assert torch.equal(mixed[:, :, ~changed], x[:, :, ~changed]) and not torch.equal(y_b, y)
    off = VL2VADiP(_student(), _teacher(), num_classes=10, in_chans=3)
    assert off._cutmix(x, y)[1] is None


def test_renormalize_teacher_maps_the_batch_to_the_teachers_normalisation(tmp_path):
    teacher = OpenCLIPModel("ViT-B-16", model_cfg=DIGITS_CLIP_CFG, mean=[0.4, 0.4, 0.4], std=[0.2, 0.2, 0.2])
    method = VL2VADiP(_student(), teacher, num_classes=10, in_chans=3, renormalize_teacher=True)
    seen = []
    method.teacher.encode_image = lambda x: seen.append(x) or torch.randn(x.shape[0], 32)
    trainer = _trainer(tmp_path, steps=1)
    trainer.fit(method, datamodule=DomainBedDataModule(batch_size=2))  # data mean = std = 0.5
    raw = next(iter(trainer.datamodule.train_dataloader()))[0]
    assert seen and seen[0].shape == raw.shape
    x = torch.linspace(-1, 1, 5)
    scale, shift = method._input_map
    assert torch.allclose(x * scale.flatten()[0] + shift.flatten()[0], (x * 0.5 + 0.5 - 0.4) / 0.2)


def test_clip_contrastive_trains_the_clip_and_clamps_its_logit_scale(tmp_path):
    method, _ = tiny_clip_contrastive()
    dm = DomainBedDataModule(test_domains=[], batch_size=4, eval_batch_size=64)
    with torch.no_grad():
        method.student.logit_scale.fill_(6.0)  # above ln 100
    before = copy.deepcopy(method.student.state_dict())
    trainer = _trainer(tmp_path)
    trainer.fit(method, datamodule=dm)
    assert method.student.logit_scale.item() <= torch.log(torch.tensor(100.0)).item() + 1e-6
    changed = [k for k, v in method.student.state_dict().items() if not torch.equal(v, before[k])]
    assert any(k.startswith("visual.") for k in changed) and any(k.startswith("transformer.") for k in changed)
    assert {"train/loss_clip", "val/acc", "val/loss"} <= set(trainer.logged_metrics)
    with pytest.raises(ValueError, match="takes no teacher"):
        CLIPContrastive(_teacher(), _teacher(), num_classes=10)


# ----------------------------------------------------------------------------------------------- configs
DIGITS = ["clip_teacher", "vit_clean", "erm", "vl2v_align", "vl2v_distill"]  # the order they chain in
DOMAINBED = sorted(p.name for p in (ROOT / "configs" / "vlm" / "domainbed").glob("vl2v_*.yaml"))


def test_digit_configs_run_a_couple_of_steps_in_their_chain(tmp_path, monkeypatch):
    """Each digits config runs two steps, in order, with runs/ moved under tmp_path: the teacher and the clean-domain
    ViT feed ERM and Align, and Align's best checkpoint feeds Distill."""
    from zoo.cli import ZooCLI

    monkeypatch.chdir(tmp_path)
    for name in DIGITS:
        raw = (ROOT / "configs" / "vlm" / "digits" / f"{name}.yaml").read_text()
        config = tmp_path / f"{name}.yaml"
        config.write_text(raw)  # relative runs/ paths now resolve under tmp_path
        parsed = yaml.safe_load(raw)
        steps_based = parsed["trainer"].get("check_val_every_n_epoch", 1) is None
        args = ["fit", "--config", str(config), "--trainer.max_steps=2", "--trainer.limit_train_batches=2",
                "--trainer.limit_val_batches=1", "--trainer.num_sanity_val_steps=0", "--summary.enabled=false"]
        if steps_based:
            args.append("--trainer.val_check_interval=1")
        cli = ZooCLI(args=args)
        assert cli.trainer.global_step == 2, name
        assert torch.isfinite(cli.trainer.logged_metrics["train/loss"]), name
    assert (tmp_path / "runs/vlm/digits/vl2v_align/best.ckpt").is_file()
    assert cli.model.hparams.stage == "distill"


@pytest.mark.parametrize("name", DOMAINBED)
def test_domainbed_configs_parse_with_the_papers_hyper_parameters(name, capsys):
    from zoo.cli import ZooCLI

    path = ROOT / "configs" / "vlm" / "domainbed" / name
    with pytest.raises(SystemExit):  # --print_config checks every class and argument without building them
        ZooCLI(args=["fit", "--config", str(path), "--print_config"])
    raw = yaml.safe_load(path.read_text())
    model = raw["model"]["init_args"]
    assert raw["model"]["class_path"] == "zoo.methods.vl2v_adip.VL2VADiP"
    assert model["stage"] == ("align" if "align" in name else "distill") and model["lmd"] == 0.5
    assert model["optimizer"] == {"class_path": "torch.optim.Adam", "init_args": {"lr": 5.0e-5, "weight_decay": 0.0}}
    assert model["teacher"]["init_args"] == {"name": "ViT-B-16-quickgelu", "pretrained": "openai"}
    assert model["student"]["init_args"]["embed_dim"] == 512
    assert raw["trainer"]["max_steps"] == 5000 and raw["trainer"]["val_check_interval"] == 200
    assert raw["data"]["init_args"]["batch_size"] == 32
    swad = [c for c in raw["trainer"]["callbacks"] if c["class_path"] == "callbacks.swad.SWAD"]
    assert swad and {k: swad[0]["init_args"][k] for k in ("n_converge", "n_tolerance", "tolerance_ratio")} == {
        "n_converge": 3, "n_tolerance": 6, "tolerance_ratio": 0.3}
