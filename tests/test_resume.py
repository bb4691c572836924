"""Kill -9 at a chosen step, resume with ``--ckpt_path last``: the same final weights as an uninterrupted run.

Each family runs its digits config three times in real ``zoo fit`` subprocesses (one thread each, deterministic):
uninterrupted; killed by SIGKILL at a step inside the second epoch; resumed. The resumed run must end with the
uninterrupted run's weights, bit for bit (the random state travels with the checkpoint: callbacks.resume).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

KILLER = '''
import os, signal
import lightning as L


class KillAt(L.Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)
'''

# config, extra overrides
FAMILIES = {
    "classification": ("configs/classification/digits/kd.yaml", []),
    "segmentation": ("configs/segmentation/digit_scenes/baseline.yaml", ["--data.init_args.batch_size=8"]),
    "mae": ("configs/feature_distillation/digits/mae_baseline.yaml", []),
}
STEPS = 3  # training steps per epoch (limit_train_batches)


def _zoo(tmp_path: Path, args: list[str]) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(tmp_path), "WANDB_MODE": "offline"}
    return subprocess.Popen([sys.executable, "-m", "zoo", "fit", *args], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _config_for(tmp_path: Path, config: str, root: str) -> Path:
    """The config with its own checkpoint folder (feature configs set one) moved under the test's root."""
    text = (ROOT / config).read_text()
    text = text.replace("dirpath: runs/", f"dirpath: {tmp_path / root}/")
    path = tmp_path / f"{root}.yaml"
    path.write_text(text)
    return path


def _last(root: Path) -> Path:
    return next(root.rglob("last.ckpt"))


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_kill_and_resume_equals_uninterrupted(family, tmp_path):
    (tmp_path / "killer.py").write_text(KILLER)
    config, extra = FAMILIES[family]

    def args(root: str) -> list[str]:
        return ["--config", str(_config_for(tmp_path, config, root)), *extra, "--run_name", family,
                "--trainer.max_epochs=2", f"--trainer.limit_train_batches={STEPS}", "--trainer.limit_val_batches=1",
                "--trainer.deterministic=true", "--summary.enabled=false", "--trainer.enable_model_summary=false",
                f"--trainer.default_root_dir={tmp_path / root}"]

    # the uninterrupted run beside the killed one and then its resumption (one thread each)
    whole = _zoo(tmp_path, args("whole"))
    killed = _zoo(tmp_path, [*args("resumed"), "--trainer.callbacks+=killer.KillAt",
                             f"--trainer.callbacks.step={STEPS + 1}"])
    assert killed.wait(timeout=600) == -signal.SIGKILL, killed.stderr.read()
    resumed = _zoo(tmp_path, [*args("resumed"), "--ckpt_path", "last"])
    assert whole.wait(timeout=600) == 0, whole.stderr.read()
    assert resumed.wait(timeout=600) == 0, resumed.stderr.read()

    a = torch.load(_last(tmp_path / "whole"), map_location="cpu", weights_only=True)
    b = torch.load(_last(tmp_path / "resumed"), map_location="cpu", weights_only=True)
    assert a["global_step"] == b["global_step"] == 2 * STEPS
    for key, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][key]), f"{family}: {key} differs after kill -9 and resume"
