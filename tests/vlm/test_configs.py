"""Every VLM config parses; the digits configs run, each stage from the previous stage's checkpoint (one step each)."""

import json
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DIGITS = ROOT / "configs" / "vlm" / "digits"
# Each digits config of this family, with the stage whose checkpoint its student starts from.
CHAINS = {
    "teacher": None, "baseline": None,
    "llava_kd_dpt": None, "llava_kd_sft": "llava_kd_dpt", "llava_kd_dft": "llava_kd_sft",
    "llava_mod_d2d": None, "llava_mod_d2s": "llava_mod_d2d", "llava_mod_pref": "llava_mod_d2s",
}
REAL = sorted((ROOT / "configs" / "vlm" / "llava").glob("llava_*.yaml"))


def _fit(name: str, tmp: Path) -> dict:
    from zoo.cli import ZooCLI

    checkpoint = {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                  "init_args": {"dirpath": str(tmp / name), "filename": "final", "enable_version_counter": False}}
    args = ["--config", str(DIGITS / f"{name}.yaml"), "--trainer.max_steps=1", "--trainer.limit_train_batches=1",
            "--trainer.limit_val_batches=1", "--trainer.val_check_interval=1.0",
            "--trainer.check_val_every_n_epoch=1", "--trainer.num_sanity_val_steps=0",
            f"--trainer.logger.init_args.save_dir={tmp}", f"--trainer.callbacks={json.dumps([checkpoint])}",
            "--trainer.enable_model_summary=false", "--summary.enabled=false",
            "--data.init_args.num_test=10", "--data.init_args.eval_batch_size=8"]
    model = yaml.safe_load((DIGITS / f"{name}.yaml").read_text())["model"]["init_args"]
    for role, stage in (("teacher", "teacher"), ("student", CHAINS[name])):
        if role in model and stage is not None:  # the checkpoints of this test's own earlier stages
            init = {**model[role]["init_args"], "checkpoint": str(tmp / stage / "final.ckpt")}
            source = {**model[role], "init_args": init}
            args.append(f"--model.init_args.{role}={json.dumps(source)}")
    cli = ZooCLI(args=args, run=False)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    return {k: float(v) for k, v in cli.trainer.logged_metrics.items()}


def test_digits_configs_run_as_a_chain_of_stages(tmp_path):
    logged = {name: _fit(name, tmp_path) for name in CHAINS}
    for name, metrics in logged.items():
        assert (tmp_path / name / "final.ckpt").is_file(), name
        assert "train/loss" in metrics and "val/acc" in metrics, name
    assert {"train/loss_reg", "train/loss_res", "train/loss_vis", "train/loss_rel"} <= set(logged["llava_kd_dpt"])
    assert set(k for k in logged["llava_kd_sft"] if k.startswith("train/loss_")) == {"train/loss_reg"}
    assert {"train/loss_kd", "train/loss_lm", "train/loss_aux", "train/l_aux_layer0"} <= set(logged["llava_mod_d2s"])
    assert {"train/loss_dpo", "train/reward_acc"} <= set(logged["llava_mod_pref"])


@pytest.mark.parametrize("config", REAL, ids=lambda p: p.stem)
def test_real_scale_recipes_parse(config, capsys):
    from zoo.cli import ZooCLI

    with pytest.raises(SystemExit) as stop:
        ZooCLI(args=["fit", "--config", str(config), "--print_config"])
    assert stop.value.code == 0
    printed = capsys.readouterr().out
    assert "/models/" in printed and "precision: bf16-mixed" in printed
    if "stage: sft" not in printed and "VLMSupervised" not in printed:  # the stages with a teacher
        assert "shard_teacher: true" in printed and "dtype: bfloat16" in printed
