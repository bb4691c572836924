"""Start-up of the zoo command: the registry commands stay torch-free and quiet, and no command makes LightningCLI
warn about its ``args`` (timings live in benchmarks/startup.py, never in a test)."""

from __future__ import annotations

import subprocess
import sys
import warnings
from pathlib import Path

import pytest

import zoo.cli
from zoo.__main__ import main as zoo_main

ROOT = Path(__file__).resolve().parents[1]
ARGS_WARNING = "args parameter is intended"


def _fresh_python(code: str) -> subprocess.CompletedProcess:
    """Runs ``code`` in a new interpreter from the repository root (a fresh ``sys.modules``)."""
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=False)


def test_checkpoints_list_imports_neither_torch_nor_lightning_and_prints_no_warning():
    code = (
        "import sys, zoo.__main__\n"
        "try:\n    zoo.__main__.main(['checkpoints', 'list'])\n"
        "except SystemExit as stop:\n    assert not stop.code, stop.code\n"
        "loaded = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'lightning'))\n"
        "assert not loaded, loaded\n"
    )
    done = _fresh_python(code)
    assert done.returncode == 0, done.stderr
    assert "digits-resnet32-teacher" in done.stdout
    assert done.stderr == ""


@pytest.mark.parametrize("command", ["fit", "validate", "test", "predict"])
def test_lightning_commands_do_not_pass_their_arguments_twice(command, monkeypatch, capsys):
    """``zoo <command>`` as the console script runs it: sys.argv holds the command line, and LightningCLI, which
    warns when it is also given ``args``, reads it from there."""
    monkeypatch.setattr(sys, "argv", ["zoo", command, "--help"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(SystemExit) as stop:
            zoo_main()
    assert stop.value.code == 0
    out, err = capsys.readouterr()
    assert "--model CONFIG" in out
    assert not [w for w in caught if ARGS_WARNING in str(w.message)]
    assert ARGS_WARNING not in err


def test_publish_evaluation_runs_lightning_cli_with_no_command_line_in_argv(monkeypatch, tmp_path):
    """``zoo checkpoints publish`` evaluates the run through ``zoo.cli.test_metrics`` while sys.argv holds the
    publish command: LightningCLI must then see no command line besides the ``args`` it is given."""
    seen = {}

    class Recorder:
        def __init__(self, args, **kwargs) -> None:
            seen["argv"], seen["args"] = list(sys.argv), args
            self.trainer = type("T", (), {"callback_metrics": {}})()

    monkeypatch.setattr(zoo.cli, "ZooCLI", Recorder)
    monkeypatch.setattr(sys, "argv", ["zoo", "checkpoints", "publish", "runs/x/version_0", "--name", "x"])
    assert zoo.cli.test_metrics(tmp_path / "config.yaml", tmp_path / "last.ckpt") == {}
    assert seen["argv"] == ["zoo"] and seen["args"][0] == "test"
    assert sys.argv[1] == "checkpoints"  # restored


def test_only_the_evaluation_only_exact_resume_hint_is_silenced():
    hint = ("Be aware that when using `ckpt_path`, callbacks used to create the checkpoint need to be provided "
            "during `Trainer` instantiation. Please add the following callbacks: {}.")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        zoo.cli._route_lightning_output()
        warnings.warn(hint.format("['ExactResume']"), UserWarning, stacklevel=1)
        warnings.warn(hint.format("['MyCallback', 'ExactResume']"), UserWarning, stacklevel=1)
    assert [str(w.message) for w in caught] == [hint.format("['MyCallback', 'ExactResume']")]


def test_the_cli_parser_imports_no_model_library():
    """`zoo fit --help` builds LightningCLI's parser from the zoo's classes; timm (which imports wandb) and the other
    model libraries wait for the first model that is built."""
    code = (
        "import sys, zoo.cli\n"
        "libraries = ('timm', 'wandb', 'open_clip', 'segmentation_models_pytorch')\n"
        "loaded = sorted(m for m in libraries if m in sys.modules)\n"
        "assert not loaded, loaded\n"
    )
    done = _fresh_python(code)
    assert done.returncode == 0, done.stderr
