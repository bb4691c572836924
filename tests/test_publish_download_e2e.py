"""Issue 3's end-to-end path: quickstart student → CheckpointPublisher → served on 127.0.0.1 → downloaded by name
through ZOO_CHECKPOINT_MIRROR → verified → identical predictions."""

import json
from pathlib import Path

import torch

from callbacks.publisher import CheckpointPublisher
from zoo import hub
from zoo.cli import ZooCLI
from zoo.hub_cli import main as checkpoints_main

ROOT = Path(__file__).resolve().parents[1]


def test_quickstart_student_published_served_downloaded_and_identical(tmp_path, monkeypatch, capsys, serve_folder):
    monkeypatch.chdir(ROOT)
    cli = ZooCLI(args=[
        "--config", "configs/quickstart.yaml", "--trainer.max_epochs=1", "--trainer.limit_train_batches=4",
        f"--trainer.default_root_dir={tmp_path / 'runs'}", "--summary.enabled=false",
    ], run=False)
    publisher = CheckpointPublisher("quickstart-student", out_dir=str(tmp_path / "served"))
    cli.trainer.callbacks.append(publisher)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    card = json.loads(Path(publisher.published["path"]).with_suffix(".json").read_text())

    registry = tmp_path / "registry.json"
    registry.write_text(json.dumps(hub.registry() + [card["entry"]]))
    monkeypatch.setattr(hub, "REGISTRY_FILE", registry)
    monkeypatch.setenv("ZOO_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("ZOO_CHECKPOINT_MIRROR", serve_folder(tmp_path / "served"))
    assert checkpoints_main(["download", "quickstart-student"]) == 0
    path = Path(capsys.readouterr().out.strip().splitlines()[-1])
    monkeypatch.delenv("ZOO_CHECKPOINT_MIRROR")  # from here on only the cache can deliver it
    assert path.parent == tmp_path / "home" / "checkpoints" and path.name == card["entry"]["file"]
    assert hub.sha256_file(path) == card["entry"]["sha256"]
    assert checkpoints_main(["verify", str(path)]) == 0

    model, meta = hub.load("quickstart-student")  # from the cache now: no mirror, and the entry lists no urls
    cli.datamodule.setup("validate")
    x, _ = next(iter(cli.datamodule.val_dataloader()))
    student = cli.model.student.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), student(x), rtol=0, atol=0)
    assert meta["mean"] == list(cli.datamodule.mean)
