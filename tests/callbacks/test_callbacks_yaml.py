"""The monitor and the gallery are configurable from the command line and from YAML (class_path / init_args)."""

from pathlib import Path

from PIL import Image

from callbacks import DistillationMonitor, PredictionGallery
from callbacks.gallery import LINE_HEIGHT, PAD
from zoo.cli import ZooCLI

ROOT = Path(__file__).resolve().parents[2]


def _callback(trainer, kind):
    (found,) = [cb for cb in trainer.callbacks if isinstance(cb, kind)]
    return found


def test_callbacks_from_the_command_line(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    cli = ZooCLI(
        args=[
            "fit",
            "--config",
            "configs/quickstart.yaml",
            "--trainer.fast_dev_run=true",
            "--trainer.callbacks+=callbacks.DistillationMonitor",
            "--trainer.callbacks+=callbacks.PredictionGallery",
            f"--trainer.default_root_dir={tmp_path}",
            "--trainer.log_every_n_steps=1",  # the quickstart's 10 would leave fast_dev_run's single step unlogged
        ]
    )
    trainer = cli.trainer
    _callback(trainer, DistillationMonitor)
    gallery = _callback(trainer, PredictionGallery)
    # fast_dev_run swaps the loggers for a dummy one (no log dir): the gallery falls back to default_root_dir
    assert Path(gallery.last_path) == tmp_path / "gallery" / "epoch_0.png"
    assert {"val/kl_teacher_student", "val/teacher_acc_once", "val/agreement"} <= set(trainer.callback_metrics)
    assert {"train/share_ce", "train/share_kd", "perf/images_per_sec", "perf/data_share"} <= set(trainer.logged_metrics)


def test_callbacks_from_yaml_with_init_args(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    extra = tmp_path / "callbacks.yaml"
    extra.write_text(
        "trainer:\n"
        "  max_epochs: 1\n"
        "  limit_train_batches: 2\n"
        "  limit_val_batches: 1\n"
        "  num_sanity_val_steps: 0\n"
        "  log_every_n_steps: 1\n"
        "  callbacks:\n"
        "    - class_path: callbacks.DistillationMonitor\n"
        "      init_args: {kl: false, throughput: false, log_every_n_steps: 2}\n"
        "    - class_path: callbacks.PredictionGallery\n"
        "      init_args: {num_images: 4, upscale: 2, class_names: [zero, one, two, three, four, five, six, seven,"
        " eight, nine]}\n"
    )
    cli = ZooCLI(
        args=[
            "fit",
            "--config",
            "configs/quickstart.yaml",
            "--config",
            str(extra),
            f"--trainer.default_root_dir={tmp_path}",
        ]
    )
    trainer = cli.trainer
    monitor, gallery = _callback(trainer, DistillationMonitor), _callback(trainer, PredictionGallery)
    assert (monitor.kl, monitor.throughput, monitor.log_every_n_steps) == (False, False, 2)
    assert gallery.class_names[9] == "nine"
    # the CSV run folder of ZooCLI: 2 × 2 tiles of 16×16 digits upscaled 2×, three caption lines
    png = tmp_path / "quickstart" / "version_0" / "gallery" / "epoch_0.png"
    with Image.open(png) as image:
        assert image.size == (2 * (32 + 2 * PAD), 2 * (32 + 3 * LINE_HEIGHT + 2 * PAD))
    header = (tmp_path / "quickstart" / "version_0" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"train/share_ce", "train/share_kd", "val/teacher_acc_once"} <= set(header)
    assert not {"val/kl_teacher_student", "perf/images_per_sec"} & set(header)
