"""Resuming trajectory matching from a checkpoint equals the uninterrupted run (issue 19: "resume exactly").

Every random draw of an iteration (expert, start epoch, synthetic batches, DSA parameters, AST's perturbation) comes
from the module's generator, whose state the checkpoint carries; the global RNG (which the ignored real loader also
draws from at each epoch) plays no part. A run stopped after iteration k and resumed in a fresh Trainer and a fresh
module must end with the same images, learned lr and label logits as a run that was never interrupted.
"""

from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from zoo.cli import ZooCLI
from zoo.data import DigitsDataModule
from zoo.dataset_distillation import AST, DATM, DIGITS_DSA_STRATEGY, MTT, load_distilled
from zoo.models import ConvNetModel

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "configs" / "dataset_distillation" / "digits"
TOTAL, STOP = 12, 5  # the digits loader has 8 batches per epoch: the checkpoint is mid-epoch, the resume crosses one

VARIANTS = {
    "mtt": (MTT, "experts", {}),
    "mtt_tesla": (MTT, "experts", {"gradient": "tesla"}),
    "datm": (DATM, "experts", {"max_start_epoch": 3, "current_max_start_epoch": 1, "expansion_end_iteration": 8}),
    "ast": (AST, "experts_smooth", {}),
}


def _method(cls, buffer: Path, out: Path, **kwargs):
    args = {"ipc": 2, "syn_steps": 3, "expert_epochs": 2, "max_start_epoch": 2, "batch_syn": 7, "lr_teacher": 0.02,
            "dsa_strategy": DIGITS_DSA_STRATEGY, "eval_nets": 1, "eval_epochs": 0, "output": str(out), "seed": 3,
            **kwargs}
    return cls(ConvNetModel(depth=2, width=32, image_size=8), str(buffer), num_classes=10, in_chans=1, **args)


def _fit(module, root: Path, max_steps: int, ckpt_path: Path | None = None, callbacks=()) -> L.Trainer:
    L.seed_everything(0)  # as the CLI does in every process, the resumed one included
    trainer = L.Trainer(
        max_steps=max_steps, accelerator="cpu", devices=1, deterministic=True, logger=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
        default_root_dir=root, callbacks=list(callbacks),
    )
    data = DigitsDataModule(image_size=8, channels=1, augment=False, batch_size=128)
    trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
    return trainer


def _learned(module) -> dict[str, torch.Tensor]:
    state = {"images": module.images, "syn_lr": module.syn_lr}
    if module.label_logits is not None:
        state["label_logits"] = module.label_logits
    return {k: v.detach().clone() for k, v in state.items()}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_resumed_run_equals_the_uninterrupted_one(variant, buffers, tmp_path):
    cls, buffer, kwargs = VARIANTS[variant]
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=STOP, save_top_k=-1)
    whole = _method(cls, buffers[buffer], tmp_path / "whole.safetensors", **kwargs)
    _fit(whole, tmp_path / "whole", TOTAL, callbacks=[checkpoints])
    (ckpt,) = (tmp_path / "ckpt").glob(f"*step={STOP}.ckpt")

    resumed = _method(cls, buffers[buffer], tmp_path / "resumed.safetensors", **kwargs)
    trainer = _fit(resumed, tmp_path / "resumed", TOTAL, ckpt_path=ckpt)
    assert trainer.global_step == TOTAL
    expected, got = _learned(whole), _learned(resumed)
    at_stop = torch.load(ckpt, weights_only=False)["state_dict"]["images"]
    assert not torch.allclose(at_stop, expected["images"], atol=1e-3)  # the images did move after the checkpoint
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=1e-6, msg=name)
    # and the artifacts written at the end agree
    a, b = load_distilled(tmp_path / "whole.safetensors"), load_distilled(tmp_path / "resumed.safetensors")
    torch.testing.assert_close(b["images"], a["images"], rtol=0, atol=1e-6)
    assert b["lr"] == pytest.approx(a["lr"], abs=1e-9) and b["metadata"]["iteration"] == TOTAL


def test_a_checkpoint_without_the_generator_resumes_with_a_warning(buffers, tmp_path):
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=2, save_top_k=-1)
    _fit(_method(MTT, buffers["experts"], tmp_path / "a.safetensors"), tmp_path / "a", 2, callbacks=[checkpoints])
    (ckpt,) = (tmp_path / "ckpt").glob("*step=2.ckpt")
    state = torch.load(ckpt, weights_only=False)
    del state["trajectory_matching"]  # as written before checkpoints carried it
    torch.save(state, ckpt)
    with pytest.warns(UserWarning, match="MTT: the checkpoint has no generator state.*will not equal an uninterrupted"):
        _fit(_method(MTT, buffers["experts"], tmp_path / "b.safetensors"), tmp_path / "b", 3, ckpt_path=ckpt)


@pytest.mark.parametrize("config", ["mtt.yaml", "datm.yaml", "ast.yaml"])
def test_zoo_fit_resumes_from_ckpt_path_exactly(config, buffers, tmp_path, monkeypatch):
    """The command shape: the interrupted command again, with ``--ckpt_path <run>/checkpoints/X.ckpt`` (here the
    checkpoint Lightning's default ModelCheckpoint writes at an epoch end: 8 iterations on digits) and
    ``trainer.deterministic: true``; the resumed run's distilled set equals that of a run never stopped."""
    monkeypatch.chdir(ROOT)
    buffer = buffers["experts_smooth" if config.startswith("ast") else "experts"]

    def fit(name: str, steps: int, *extra: str):
        return ZooCLI(args=[
            "fit", "--config", str(CONFIGS / config), f"--model.init_args.buffer_dir={buffer}",
            "--model.init_args.max_start_epoch=2", "--model.init_args.syn_steps=4", "--model.init_args.eval_nets=1",
            "--model.init_args.eval_epochs=0", f"--model.init_args.output={tmp_path / name}.safetensors",
            f"--trainer.max_steps={steps}", "--trainer.deterministic=true",
            f"--trainer.default_root_dir={tmp_path / name}",
            "--summary.enabled=false", *extra,
        ])

    stopped = fit("run", 8)  # stands for a run killed after the checkpoint of its first epoch
    (ckpt,) = Path(stopped.trainer.log_dir, "checkpoints").glob("*step=8.ckpt")
    fit("run", 12, f"--ckpt_path={ckpt}")  # the same command, resumed
    fit("whole", 12)
    whole, resumed = load_distilled(tmp_path / "whole.safetensors"), load_distilled(tmp_path / "run.safetensors")
    assert resumed["metadata"]["iteration"] == 12
    at_stop = torch.load(ckpt, weights_only=False)["state_dict"]["images"]
    assert not torch.allclose(at_stop, whole["images"], atol=1e-3)  # the images did move after the checkpoint
    torch.testing.assert_close(resumed["images"], whole["images"], rtol=0, atol=1e-6)
    torch.testing.assert_close(resumed["labels"], whole["labels"], rtol=0, atol=1e-6)  # DATM: learned logits
    assert resumed["lr"] == pytest.approx(whole["lr"], abs=1e-9)
