"""CONTRIBUTING.md's worked example works as written: its loss passes its doctest and a golden check, its method
keeps the contract every method keeps, and its digits config builds and steps."""

from __future__ import annotations

import doctest
import re
import sys
import types
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]


def _blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", (ROOT / "CONTRIBUTING.md").read_text(), flags=re.S)


def _module(name: str, source: str, monkeypatch) -> types.ModuleType:
    module = types.ModuleType(name)
    monkeypatch.setitem(sys.modules, name, module)
    exec(compile(source, f"<CONTRIBUTING.md {name}>", "exec"), module.__dict__)
    return module


def test_the_guides_example_method_works(tmp_path, monkeypatch):
    loss_src, method_src = _blocks()[:2]
    losses = _module("zoo.losses.lskd", loss_src, monkeypatch)
    methods = _module("zoo.methods.lskd", method_src, monkeypatch)

    finder, runner = doctest.DocTestFinder(), doctest.DocTestRunner()
    for test in finder.find(losses.LSKDLoss, "LSKDLoss", globs=dict(losses.__dict__)):
        runner.run(test)
    assert runner.summarize().failed == 0

    # golden value against the formula in float64
    s, t = torch.randn(3, 5, dtype=torch.float64), torch.randn(3, 5, dtype=torch.float64)
    z = lambda v: (v - v.mean(-1, keepdim=True)) / v.std(-1, keepdim=True)  # noqa: E731
    p_t, p_s = (z(t) / 2).softmax(-1), (z(s) / 2).softmax(-1)
    expected = 4 * (p_t * (p_t.log() - p_s.log())).sum(-1).mean()
    torch.testing.assert_close(losses.LSKDLoss(2.0)(s, t), expected, rtol=1e-5, atol=1e-9)

    from tests.methods.test_contract import check_contract, images
    from zoo.models import CIFARModel

    monkeypatch.setattr("zoo.methods.LSKD", methods.LSKD, raising=False)
    method = methods.LSKD(CIFARModel("resnet8"), CIFARModel("resnet14"), num_classes=10, in_chans=1)
    check_contract(method, images(), tmp_path)

    # the digits config the guide describes: kd.yaml with the new class path
    config = yaml.safe_load((ROOT / "configs/classification/digits/kd.yaml").read_text())
    config["model"]["class_path"] = "zoo.methods.lskd.LSKD"
    for key in ("temperature", "ce_weight", "kd_weight"):
        config["model"]["init_args"].pop(key, None)
    path = tmp_path / "lskd.yaml"
    path.write_text(yaml.safe_dump(config))
    from zoo.cli import ZooCLI

    monkeypatch.chdir(ROOT)
    cli = ZooCLI(args=["fit", "--config", str(path), "--trainer.fast_dev_run=1", "--summary.enabled=false",
                       f"--trainer.default_root_dir={tmp_path}"])
    assert isinstance(cli.model, methods.LSKD)
    assert "train/loss_kd" in cli.trainer.logged_metrics
