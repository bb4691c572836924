"""The contract every public method keeps, one parametrised test over all of them (torchgeo's trainer test shape).

One optimisation step changes the student and never a teacher; every loss term is logged; the checkpoint holds no
teacher tensor; teachers stay in eval mode after ``train()``; hyper-parameters round-trip through a checkpoint.
Every method class of the ``zoo.methods`` package is found and run (family bases, named ``...Method``, are not);
a classification method runs as ``Method(resnet8, resnet14)`` on 16×16 digits-shaped tensors unless it has a recipe
below (its class name → (method, train loader), tiny and download-free).
"""

from __future__ import annotations

import copy
import importlib
import inspect
import pkgutil
from collections.abc import Callable

import lightning as L
import pytest
import torch
from lightning.pytorch.utilities import CombinedLoader
from torch.utils.data import DataLoader, TensorDataset

import zoo.methods
import zoo.models.clip as clip
from zoo.methods import ClassificationMethod, DistillationMethod
from zoo.models import CIFARModel, MAEEncoderModel, MAEModel, SMPModel, TimmModel

C = 4
TINY_MAE = {"embed_dim": 32, "depth": 3, "num_heads": 2, "decoder_embed_dim": 16, "decoder_depth": 2,
            "decoder_num_heads": 2}
SEG = SMPModel("FPN", encoder="tu-resnet10t")
WIDE = SMPModel("Unet", encoder="tu-resnet10t", model_kwargs={"encoder_depth": 3, "decoder_channels": [32, 16, 8]})


def images(n: int = 10, chans: int = 1, size: int = 16, classes: int = 10) -> DataLoader:
    """Every class once (ND computes a centre per class), two batches."""
    x = torch.randn(n, chans, size, size, generator=torch.Generator().manual_seed(0))
    return DataLoader(TensorDataset(x, torch.arange(n) % classes), batch_size=n // 2)


def scenes(semi: bool = False) -> DataLoader | CombinedLoader:
    g = torch.Generator().manual_seed(0)
    labelled = DataLoader(TensorDataset(torch.randn(4, 3, 32, 32, generator=g),
                                        torch.randint(0, C, (4, 32, 32), generator=g)), batch_size=2)
    if not semi:
        return labelled
    u = DataLoader(TensorDataset(torch.randn(4, 3, 32, 32, generator=g), torch.full((4, 32, 32), 255)), batch_size=2)
    return CombinedLoader({"labelled": labelled, "unlabelled": u, "unlabelled_mix": u}, mode="max_size_cycle")


def classifier(cls_name: str, **kw):
    cls = METHODS[cls_name]
    return cls(CIFARModel("resnet8"), CIFARModel("resnet14"), num_classes=10, in_chans=1, **kw), images()


def vit(**kw) -> TimmModel:
    return TimmModel("vit_tiny_patch16_224", model_kwargs={"img_size": 32, "patch_size": 4, "depth": 2, **kw})


def digit_domains(**kw) -> DataLoader:
    from zoo.data.domainbed import DomainBedDataModule

    dm = DomainBedDataModule(batch_size=4, **kw)
    dm.setup("fit")
    return dm.train_dataloader()


def tiny_clip() -> clip.OpenCLIPModel:
    return clip.OpenCLIPModel("ViT-B-16", model_cfg=clip.DIGITS_CLIP_CFG)


def vlm(recipe: str, module: str = "test_methods") -> tuple[L.LightningModule, DataLoader]:
    """A VLM method from the tiny recipes of tests/vlm/<module>.py, with its digits-VQA training loader."""
    recipes = importlib.import_module(f"tests.vlm.{module}")
    method, datamodule = getattr(recipes, recipe)()
    datamodule.setup("fit")
    return method, datamodule.train_dataloader()


def segmenter(cls_name: str, **kw):
    cls = METHODS[cls_name]
    teacher = None if cls.requires_teacher is False else SEG
    args = (SEG,) if teacher is None else (SEG, teacher)
    return cls(*args, num_classes=C, in_chans=3, **kw), scenes()


RECIPES: dict[str, Callable[[], tuple[L.LightningModule, object]]] = {
    "Supervised": lambda: (zoo.methods.Supervised(CIFARModel("resnet8"), num_classes=10, in_chans=1), images()),
    "MEALV2": lambda: (zoo.methods.MEALV2(CIFARModel("resnet8"), [CIFARModel("resnet14"), CIFARModel("resnet8")],
                                          num_classes=10, in_chans=1), images()),
    "TRG": lambda: (zoo.methods.TRG(vit(), vit(), num_classes=10, in_chans=1, student_layer="blocks.1",
                                    teacher_layer="blocks.1", tokens=8, k=4), images(chans=1, size=32)),
    "SupervisedSegmentation": lambda: segmenter("SupervisedSegmentation"),
    "PixelKD": lambda: segmenter("PixelKD"),
    "CWD": lambda: segmenter("CWD"),
    "LADTeacher": lambda: segmenter("LADTeacher", aux_weight=0.0),
    "LAD": lambda: (zoo.methods.LAD(SEG, SEG, num_classes=C, in_chans=3, aux_weight=0.0), scenes()),
    "MGD": lambda: (zoo.methods.MGD(SEG, SEG, WIDE, num_classes=C, in_chans=3), scenes(semi=True)),
    "MAEPretrain": lambda: (zoo.methods.MAEPretrain(MAEModel("mae_vit_tiny_digits", overrides=TINY_MAE), in_chans=1),
                            images()),
    "DMAE": lambda: (zoo.methods.DMAE(MAEModel("mae_vit_tiny_digits", overrides=TINY_MAE),
                                      MAEModel("mae_vit_tiny_digits"), in_chans=1, student_block=1, teacher_block=2),
                     images()),
    "G2SDGeneric": lambda: (zoo.methods.G2SDGeneric(MAEModel("mae_vit_tiny_digits", overrides=TINY_MAE),
                                                    MAEModel("mae_vit_tiny_digits"), in_chans=1,
                                                    teacher_decoder_blocks=1), images()),
    "G2SDSpecific": lambda: (zoo.methods.G2SDSpecific(
        MAEEncoderModel("mae_vit_tiny_digits", global_pool="token", overrides=TINY_MAE),
        CIFARModel("resnet8"), num_classes=10, in_chans=1), images()),
    "HybridDistill": lambda: (zoo.methods.HybridDistill(
        MAEModel("mae_vit_tiny_digits"), MAEEncoderModel("mae_vit_d128_patch4_dec64d4b", img_size=16, in_chans=1,
                                                         global_pool="token"),
        MAEModel("mae_vit_d128_patch4_dec64d4b", img_size=16, in_chans=1), num_classes=10, in_chans=1), images()),
    "VL2VADiP": lambda: (zoo.methods.VL2VADiP(
        clip.CLIPSpaceStudentModel(vit(img_size=16), embed_dim=32), tiny_clip(),
        num_classes=10, in_chans=3, class_names=list(clip.DIGIT_NAMES)),
        digit_domains()),
    "CLIPContrastive": lambda: (zoo.methods.CLIPContrastive(
        tiny_clip(), num_classes=10, in_chans=3, class_names=list(clip.DIGIT_NAMES)),
        digit_domains(test_domains=[])),
    "VLMSupervised": lambda: vlm("tiny_vlmsupervised"),
    "LLaVAKD": lambda: vlm("tiny_llavakd"),
    "LLaVAMoD": lambda: vlm("tiny_llavamod"),
    "MaTVLM": lambda: vlm("tiny_matvlm", "test_matvlm"),
    "FineTune": lambda: (zoo.methods.FineTune(MAEEncoderModel("mae_vit_tiny_digits", num_classes=10,
                                                              overrides=TINY_MAE), num_classes=10, in_chans=1,
                                              layer_decay=0.75), images()),
    "LinearProbe": lambda: (zoo.methods.LinearProbe(MAEEncoderModel("mae_vit_tiny_digits", num_classes=10,
                                                                    overrides=TINY_MAE), num_classes=10, in_chans=1),
                            images()),
}


def method_classes() -> dict[str, type]:
    """Every method class defined in a module of the zoo.methods package, by name."""
    found = {}
    for info in pkgutil.iter_modules(zoo.methods.__path__, "zoo.methods."):
        module = importlib.import_module(info.name)
        for name, cls in inspect.getmembers(module, inspect.isclass):
            if (cls.__module__ == info.name and issubclass(cls, DistillationMethod) and not name.startswith("_")
                    and not name.endswith("Method")):
                found[name] = cls
    return found


METHODS = method_classes()


def recipe(name: str) -> tuple[L.LightningModule, object]:
    if name in RECIPES:
        return RECIPES[name]()
    if issubclass(METHODS[name], ClassificationMethod):
        return classifier(name)
    raise AssertionError(f"{name}: add a recipe to tests/methods/test_contract.py (not a classification method)")


def test_every_method_is_exported():
    missing = sorted(set(METHODS) - set(zoo.methods.__all__))
    assert not missing, f"export {missing} from zoo/methods/__init__.py"


def _trainer(tmp_path) -> L.Trainer:
    return L.Trainer(accelerator="cpu", max_steps=1, limit_train_batches=1, limit_val_batches=0, logger=False,
                     enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                     default_root_dir=tmp_path, num_sanity_val_steps=0)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_method_contract(name, tmp_path):
    torch.manual_seed(0)
    check_contract(*recipe(name), tmp_path)


def check_contract(method: L.LightningModule, loader: object, tmp_path) -> None:
    """The contract; also run by tests/test_contributing.py on the guide's example method."""
    teachers = method.teachers
    student_before = copy.deepcopy(method.student.state_dict())
    teacher_before = {n: copy.deepcopy(t.state_dict()) for n, t in teachers.items()}
    teacher_params = {id(p) for t in teachers.values() for p in t.parameters()}
    assert not any(id(p) in teacher_params for p in method.parameters()), "a teacher is a registered submodule"

    logged_terms: list[str] = []
    log_terms = method.log_loss_terms

    def recording(terms, batch_size):
        logged_terms.extend(terms)
        return log_terms(terms, batch_size)

    method.log_loss_terms = recording
    trainer = _trainer(tmp_path)
    trainer.fit(method, train_dataloaders=loader)

    changed = [k for k, v in method.student.state_dict().items() if not torch.equal(v, student_before[k])]
    assert changed, "one step did not change the student"
    for tname, teacher in teachers.items():
        for k, v in teacher.state_dict().items():
            if k.endswith("num_batches_tracked") or "running_" in k:
                continue  # MGD's teacher_bn="train" updates statistics on purpose; it is off here
            assert torch.equal(v, teacher_before[tname][k]), f"{tname} {k} changed"
    assert logged_terms, "no loss term went through log_loss_terms"
    for term in logged_terms:
        assert f"train/loss_{term}" in trainer.callback_metrics, f"train/loss_{term} is not logged"
    assert "train/loss" in trainer.callback_metrics

    method.train()
    for teacher in teachers.values():
        assert not any(m.training for m in teacher.modules()), "a teacher left eval mode after train()"

    path = tmp_path / "step.ckpt"
    trainer.save_checkpoint(path)
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    own = set(method.state_dict())
    assert set(checkpoint["state_dict"]) == own
    assert not any(k.startswith(("teacher", "_teachers", "wide_teacher", "mim_teacher")) for k in own)

    restored = type(method).load_from_checkpoint(path, map_location="cpu")
    assert dict(restored.hparams) == dict(method.hparams)
    for k, v in restored.student.state_dict().items():
        assert torch.equal(v, method.student.state_dict()[k]), f"student {k} did not round-trip"
    assert set(restored.teachers) == set(teachers)
