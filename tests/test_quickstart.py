"""The quickstart, end to end through the `zoo` entry point, with fewer epochs."""

from pathlib import Path

from zoo.cli import main

ROOT = Path(__file__).resolve().parents[1]


def test_quickstart_runs_end_to_end(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    main(
        [
            "fit",
            "--config",
            "configs/quickstart.yaml",
            "--trainer.max_epochs=2",
            f"--trainer.default_root_dir={tmp_path}",
        ]
    )
    out = capsys.readouterr().out
    assert "hub:digits-resnet32-teacher" in out and "cifar:resnet8" in out
    assert "student–teacher top-1 agreement" in out
    run = tmp_path / "quickstart" / "version_0"
    assert (run / "config.yaml").is_file() and (run / "metrics.csv").is_file()
    header = (run / "metrics.csv").read_text().splitlines()[0]
    for column in (
        "train/loss_ce",
        "train/loss_kd",
        "val/acc",
        "val/agreement",
        "val/teacher_acc",
        "perf/images_per_sec",
        "perf/step_time",
        "perf/data_time",
    ):  # throughput is logged by default
        assert column in header
    # the saved config is the resolved one: interpolation applied after the command-line override
    assert "T_max: 2" in (run / "config.yaml").read_text()
    assert list((run / "checkpoints").glob("*.ckpt"))
