"""MTT, DATM and AST: the matching loss, its gradients, TESLA vs the unrolled gradient, configs end to end."""

import warnings
from pathlib import Path

import pytest
import torch
import yaml

from zoo.cli import ZooCLI
from zoo.dataset_distillation import (
    AST,
    DATM,
    MTT,
    DistilledDataModule,
    TrajectoryBuffer,
    functional_forward,
    load_distilled,
    soft_cross_entropy,
)
from zoo.models import ConvNetModel

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "configs" / "dataset_distillation" / "digits"
NETWORK = ConvNetModel(depth=2, width=32, image_size=8)


def make(cls, buffer: Path, real, **kwargs):
    """A method prepared as its setup would (no Trainer): buffer attached, synthetic set initialised."""
    args = {"ipc": 1, "syn_steps": 2, "expert_epochs": 2, "max_start_epoch": 2, "dsa_strategy": "", **kwargs}
    module = cls(NETWORK, str(buffer), num_classes=10, in_chans=1, **args)
    module._buffer = TrajectoryBuffer(buffer)
    module._initialise(*real)
    return module


def test_loss_is_exactly_zero_when_the_student_lands_on_the_target(buffers, real):
    module = make(MTT, buffers["experts"], real, syn_steps=1)
    module._batches = lambda steps: [torch.arange(len(module.images))] * steps  # a fixed batch order
    trajectory = module._trajectory(0)
    assert type(trajectory.params).__name__ == "LazyParams"  # snapshots are read from the file on demand
    start = trajectory.params[1]
    w = start.clone().requires_grad_(True)
    loss = soft_cross_entropy(functional_forward(module.net, module.layout, w, module.images), module.hard_labels)
    landed = (w - module.syn_lr * torch.autograd.grad(loss, w, create_graph=True)[0]).detach()  # as the method
    assert float(module.matching_loss(start, landed, 1, trajectory).detach()) == 0.0
    # and it is the normalised distance elsewhere: 1 when the student does not move (α = 0) from τ[s]
    with torch.no_grad():
        module.syn_lr.zero_()
    target = trajectory.params[3]
    assert float(module.matching_loss(start, target, 1, trajectory)) == pytest.approx(1.0, rel=1e-6)


def test_normalised_distance_is_distill_py_arithmetic(buffers, real):
    """L = ‖w − τ[s+M]‖² / ‖τ[s] − τ[s+M]‖², computed as distill.py does in float32 (each sum of squares an
    mse_loss(reduction="sum") over the number of parameters, then the ratio): the same inputs give the official
    code's loss bit for bit (benchmarks/peers/mtt_official.py replays 50 official iterations to 0 difference)."""
    module = make(MTT, buffers["experts"], real)
    n = module.layout.num_params
    w, start, target = torch.randn(3, n, generator=torch.Generator().manual_seed(0)).unbind()
    mse = torch.nn.functional.mse_loss
    assert torch.equal(module.normalised_distance(w, start, target),
                       mse(w, target, reduction="sum") / n / (mse(start, target, reduction="sum") / n))
    exact = ((w.double() - target.double()) ** 2).sum() / ((start.double() - target.double()) ** 2).sum()
    assert float(module.normalised_distance(w, start, target)) == pytest.approx(float(exact), rel=1e-6)


def test_gradients_reach_images_lr_and_soft_labels(buffers, real):
    module = make(DATM, buffers["experts"], real)
    start, target, s, trajectory = module.sample_segment()
    module.matching_loss(start, target, s, trajectory).backward()
    for name in ("images", "syn_lr", "label_logits"):
        grad = getattr(module, name).grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, name


def test_datm_initialises_soft_labels_from_experts_that_are_right(buffers, real):
    module = make(DATM, buffers["experts"], real)
    assert module.label_logits.shape == (10, 10)
    # images were chosen among those the first expert classifies correctly, so their soft labels agree with them
    assert (module.label_logits.argmax(-1) == module.hard_labels).float().mean() >= 0.9
    low, high = make(DATM, buffers["experts"], real, max_start_epoch=6, current_max_start_epoch=3).start_window()
    assert (low, high) == (0, 3)  # sequential generation starts at cur_max
    # the exact initial values: mean logits of the experts that are right ("correct") ...
    logits = [
        functional_forward(module.net, module.layout, module._trajectory(k).params[-1], module.images.detach())
        for k in range(len(module._buffer))
    ]
    right = [(z.argmax(-1) == module.hard_labels).float()[:, None] for z in logits]
    mean_right = sum(z * r for z, r in zip(logits, right)) / sum(right).clamp_min(1)
    has_right = sum(right) > 0
    torch.testing.assert_close(module.label_logits.detach()[has_right[:, 0]], mean_right[has_right[:, 0]])
    # ... and expert 0's logits, unfiltered, for real images (DATM.py's pix_init == "real" branch)
    plain = make(DATM, buffers["experts"], real, pix_init="real")
    expected = functional_forward(plain.net, plain.layout, plain._trajectory(0).params[-1], plain.images.detach())
    torch.testing.assert_close(plain.label_logits.detach(), expected)
    hp = DATM(NETWORK, str(buffers["experts"]), num_classes=10, in_chans=1).hparams  # utils/cfg.py and configs
    assert (hp.current_max_start_epoch, hp.expansion_end_iteration, hp.eval_batch_size) == (20, 3000, 128)


def test_ast_perturbs_only_conv_weights_relative_to_their_size(buffers, real):
    module = make(AST, buffers["experts_smooth"], real)
    flat = module._trajectory(0).params[0]
    perturbed = module._perturb(flat)
    before, after = module.layout.unflatten(flat), module.layout.unflatten(perturbed)
    for name, value in before.items():
        changed = not torch.equal(value, after[name])
        assert changed == (value.dim() == 4), name
        if value.dim() == 4:  # W + d⊙W with ‖d‖_F = 1: a relative change of at most max|d| ≤ 1
            assert ((after[name] - value).abs() <= value.abs() + 1e-7).all()


@pytest.mark.parametrize("steps", [1, 4])
def test_tesla_against_the_unrolled_gradient(buffers, real, steps):
    """TESLA recomputes one step at a time and drops the terms through ∂w_i/∂S_j (j < i).

    With one inner step there are no such terms and the two gradients agree to float precision. With more steps
    TESLA's gradient is first order: it also drops the dependence of each gᵢ on α through wᵢ. Measured here
    (4 steps, digits ConvNet-2, printed by the test): image-gradient cosine similarity 0.99+ with a relative
    difference of a few percent, and α's gradient about 1.4 % off.
    """
    grads = {}
    for mode in ("unrolled", "tesla"):
        torch.manual_seed(0)
        module = make(MTT, buffers["experts"], real, syn_steps=steps, gradient=mode, seed=3)
        module.manual_backward = lambda loss, **kwargs: loss.backward(**kwargs)
        start, target, s, trajectory = module.sample_segment()
        if mode == "tesla":
            loss = module.tesla_backward(start, target, s)
        else:
            loss = module.matching_loss(start, target, s, trajectory)
            loss.backward()
        grads[mode] = (float(loss), module.images.grad.clone(), module.syn_lr.grad.clone())
    (l_u, g_u, a_u), (l_t, g_t, a_t) = grads["unrolled"], grads["tesla"]
    assert l_u == pytest.approx(l_t, rel=1e-5)  # the same forward pass
    cosine = float(torch.nn.functional.cosine_similarity(g_u.flatten(), g_t.flatten(), dim=0))
    rel = float((g_u - g_t).norm() / g_u.norm())
    rel_alpha = float((a_u - a_t).abs() / a_u.abs())
    print(f"N={steps}: image gradients cosine {cosine:.5f}, relative difference {rel:.4f}; α {rel_alpha:.4f}")
    if steps == 1:
        torch.testing.assert_close(g_t, g_u, rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(a_t, a_u, rtol=1e-4, atol=1e-8)
    else:
        assert cosine > 0.99 and rel < 0.15 and rel_alpha < 0.05
        assert rel > 1e-6  # and it is an approximation: the dropped terms are not zero


def _peak_bytes(fn) -> int:
    """The most memory ``fn`` holds at once on top of what was live before it (the CPU allocator's events)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak


def test_tesla_memory_is_flat_in_the_number_of_inner_steps(buffers, real):
    """TESLA holds one step's graph at a time: from N = 2 to N = 10 inner steps its peak grows by the stored θᵢ only
    (P floats per step), while the unrolled gradient keeps every step's activations."""
    from zoo.dataset_distillation import DIGITS_DSA_STRATEGY

    growth = {}
    for mode in ("unrolled", "tesla"):
        peaks = []
        for steps in (2, 10):
            module = make(MTT, buffers["experts"], real, ipc=2, syn_steps=steps, gradient=mode,
                          dsa_strategy=DIGITS_DSA_STRATEGY)
            module.manual_backward = lambda loss, **kwargs: loss.backward(**kwargs)
            start, target, s, trajectory = module.sample_segment()
            if mode == "tesla":
                peaks.append(_peak_bytes(lambda: module.tesla_backward(start, target, s)))
            else:
                peaks.append(_peak_bytes(lambda: module.matching_loss(start, target, s, trajectory).backward()))
        growth[mode] = (peaks[1] - peaks[0]) / 8
    per_step = module.layout.num_params * 4  # one float32 parameter vector
    print(f"growth per inner step: unrolled {growth['unrolled'] / 1024:.0f} KiB, tesla "
          f"{growth['tesla'] / 1024:.0f} KiB, θ {per_step / 1024:.0f} KiB")
    assert growth["tesla"] < 1.5 * per_step
    assert growth["unrolled"] > 10 * per_step


def test_a_buffer_too_short_for_the_window_fails_clearly(buffers, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    with pytest.raises(ValueError, match="have 4 epochs"):
        ZooCLI(args=["fit", "--config", str(CONFIGS / "mtt.yaml"), f"--model.init_args.buffer_dir={buffers['experts']}",
                     "--trainer.max_steps=1", f"--trainer.default_root_dir={tmp_path}", "--trainer.logger=false"])


# the distillation configs (not the experts', nor train_on_*.yaml, which trains a network on a published set)
DIGITS_CONFIGS = sorted(
    p.name for p in CONFIGS.glob("*.yaml")
    if not p.name.startswith("experts") and yaml.safe_load(p.read_text())["model"]["class_path"].startswith(
        "zoo.dataset_distillation.")
)


@pytest.mark.parametrize("config", DIGITS_CONFIGS)
def test_digits_config_distils_a_few_iterations_and_publishes_a_loadable_set(config, buffers, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    raw = yaml.safe_load((CONFIGS / config).read_text())
    buffer = buffers[Path(raw["model"]["init_args"]["buffer_dir"]).name]
    out = tmp_path / "set.safetensors"
    cli = ZooCLI(
        args=[
            "fit", "--config", str(CONFIGS / config), f"--model.init_args.buffer_dir={buffer}",
            "--model.init_args.max_start_epoch=2", "--model.init_args.current_max_start_epoch=null",
            "--trainer.max_steps=2", "--model.init_args.eval_nets=2", "--model.init_args.eval_epochs=2",
            f"--model.init_args.output={out}", f"--trainer.default_root_dir={tmp_path}", "--summary.enabled=false",
        ]
    )
    model = cli.model
    assert cli.trainer.global_step == 2
    assert torch.isfinite(cli.trainer.logged_metrics["train/matching_loss"])
    artifact = load_distilled(out)
    ipc = raw["model"]["init_args"]["ipc"]
    assert artifact["images"].shape == (10 * ipc, 1, 8, 8)
    assert artifact["metadata"]["method"] == raw["model"]["class_path"].rsplit(".", 1)[-1]
    assert len(artifact["metadata"]["evaluation"]["accuracies"]) == 2
    assert artifact["lr"] == pytest.approx(float(model.syn_lr))
    assert list(Path(cli.trainer.log_dir).glob("synthetic_*.png"))
    if raw["model"]["class_path"].endswith("DATM"):
        assert artifact["labels"].shape == (10 * ipc, 10) and artifact["labels"].is_floating_point()


def test_datm_threshold_skips_the_update(buffers, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    cli = ZooCLI(
        args=[
            "--config", str(CONFIGS / "datm.yaml"), f"--model.init_args.buffer_dir={buffers['experts']}",
            "--model.init_args.max_start_epoch=2", "--model.init_args.loss_threshold=0.0", "--trainer.max_steps=2",
            "--model.init_args.eval_nets=1", "--model.init_args.eval_epochs=1",
            f"--model.init_args.output={tmp_path / 'set.safetensors'}", f"--trainer.default_root_dir={tmp_path}",
            "--summary.enabled=false",
        ],
        run=False,
    )
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    first = load_distilled(tmp_path / "set.safetensors")
    assert float(cli.trainer.logged_metrics["train/skipped"]) == 1.0
    model = cli.model
    # nothing moved: the images are still the real images they were initialised with
    dm = cli.datamodule
    train = torch.stack([dm.train_set[i][0] for i in range(len(dm.train_set))])
    assert all(any(torch.equal(img, t) for t in train) for img in first["images"])
    assert float(model.syn_lr) == pytest.approx(0.02)


def test_distilled_set_trains_a_zoo_method(buffers, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    out = tmp_path / "set.safetensors"
    ZooCLI(
        args=[
            "fit", "--config", str(CONFIGS / "mtt.yaml"), f"--model.init_args.buffer_dir={buffers['experts']}",
            "--model.init_args.max_start_epoch=2", "--trainer.max_steps=1", "--model.init_args.eval_nets=1",
            "--model.init_args.eval_epochs=1", f"--model.init_args.output={out}",
            f"--trainer.default_root_dir={tmp_path}", "--summary.enabled=false",
        ]
    )
    config = tmp_path / "train_on_set.yaml"
    config.write_text(yaml.safe_dump({
        "trainer": {"max_epochs": 2, "accelerator": "cpu", "logger": False, "enable_checkpointing": False,
                    "enable_progress_bar": False},
        "model": {"class_path": "zoo.methods.Supervised",
                  "init_args": {"student": {"class_path": "zoo.models.ConvNetModel",
                                            "init_args": {"depth": 2, "width": 32, "image_size": 8}}}},
        "data": {"class_path": "zoo.dataset_distillation.DistilledDataModule",
                 "init_args": {"path": str(out), "batch_size": 10,
                               "real": {"class_path": "zoo.data.DigitsDataModule",
                                        "init_args": {"image_size": 8, "channels": 1, "augment": False}}}},
    }))
    cli = ZooCLI(args=["fit", "--config", str(config), f"--trainer.default_root_dir={tmp_path}",
                       "--summary.enabled=false"])
    assert cli.trainer.global_step == 2 and "val/acc" in cli.trainer.logged_metrics
    assert isinstance(cli.datamodule, DistilledDataModule) and cli.datamodule.num_classes == 10
    # every synthetic image is trained on each epoch (MTT's evaluate_synset): 10 images at batch 4 are 3 batches
    for drop_last, batches in ((False, 3), (True, 2)):
        dm = DistilledDataModule(path=str(out), batch_size=4, **({"drop_last": True} if drop_last else {}))
        dm.setup("fit")
        assert len(dm.train_dataloader()) == batches


def test_evaluation_trains_at_the_learned_lr_times_eval_lr_factor(buffers, real, monkeypatch):
    from zoo.dataset_distillation import methods
    from zoo.dataset_distillation.evaluate import EvalResult

    seen = {}

    def fake_evaluate(build, images, labels, lr, *args, **kwargs):
        seen["lr"] = lr
        return EvalResult([0.5])

    monkeypatch.setattr(methods, "evaluate_synthetic", fake_evaluate)
    module = make(AST, buffers["experts_smooth"], real, lr_teacher=0.002, eval_lr_factor=10.0, eval_nets=1)
    module.real_test_batches = list
    module.log_grid = lambda: None
    module.evaluate()
    assert seen["lr"] == pytest.approx(0.02)
    with pytest.raises(ValueError, match="eval_lr_factor must be > 0"):
        make(MTT, buffers["experts"], real, eval_lr_factor=0.0)


def test_checkpoint_publisher_publishes_the_distilled_set(buffers, tmp_path, monkeypatch):
    from callbacks.publisher import CheckpointPublisher

    monkeypatch.chdir(ROOT)
    out = tmp_path / "set.safetensors"
    cli = ZooCLI(
        args=[
            "--config", str(CONFIGS / "mtt.yaml"), f"--model.init_args.buffer_dir={buffers['experts']}",
            "--model.init_args.max_start_epoch=2", "--trainer.max_steps=1", "--model.init_args.eval_nets=2",
            "--model.init_args.eval_epochs=1", f"--model.init_args.output={out}",
            f"--trainer.default_root_dir={tmp_path}", "--summary.enabled=false",
        ],
        run=False,
    )
    publisher = CheckpointPublisher("toy-mtt", out_dir=str(tmp_path / "pub"), urls=["https://example.invalid/zoo"])
    cli.trainer.callbacks.append(publisher)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    entry = publisher.published
    assert entry["task"] == "dataset-distillation" and entry["method"] == "MTT" and entry["eval_nets"] == 2
    assert Path(entry["path"]).read_bytes() == out.read_bytes()  # the run's artifact, as it is
    assert entry["urls"] == [f"https://example.invalid/zoo/{entry['file']}"]
    assert entry["config"].endswith("config.yaml") and Path(entry["config"]).is_file()
    assert entry["metrics"]["eval_acc_mean"] == round(cli.model.last_eval["eval/acc_mean"], 4)
    assert entry["command"] == f"zoo fit --config {entry['config']}"  # the fit alone, as for a student
    # a set on the output path that this run did not write is not published
    from zoo.dataset_distillation import save_distilled

    save_distilled(out, cli.model.images, cli.model.labels(), 0.01, {"iteration": 7})
    with pytest.raises(RuntimeError, match="set.safetensors is from iteration 7, not this run's 1"):
        publisher.publish(cli.trainer, cli.model)


def test_published_set_is_a_wandb_dataset_artifact(buffers, tmp_path, monkeypatch):
    """A real offline W&B run; the artifact handed to the run's log_artifact is checked (the run's log file is
    written asynchronously in 32 KB blocks, so reading records from it raced with the writer)."""
    from wandb.sdk.wandb_run import Run

    logged = []
    log_artifact = Run.log_artifact

    def spy(self, artifact, *args, **kwargs):
        logged.append((artifact.type, artifact.name))
        return log_artifact(self, artifact, *args, **kwargs)

    monkeypatch.setattr(Run, "log_artifact", spy)
    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("WANDB_MODE", "offline")
    extra = tmp_path / "wandb.yaml"
    extra.write_text(yaml.safe_dump({"trainer": {
        "logger": {"class_path": "lightning.pytorch.loggers.WandbLogger",
                   "init_args": {"project": "zoo-tests", "save_dir": str(tmp_path), "offline": True}},
        "callbacks": [{"class_path": "callbacks.publisher.CheckpointPublisher",
                       "init_args": {"name": "toy-mtt", "out_dir": str(tmp_path / "pub")}}],
    }}))
    cli = ZooCLI(
        args=[
            "--config", str(CONFIGS / "mtt.yaml"), "--config", str(extra),
            f"--model.init_args.buffer_dir={buffers['experts']}", "--model.init_args.max_start_epoch=2",
            "--trainer.max_steps=1", "--model.init_args.eval_nets=1", "--model.init_args.eval_epochs=1",
            f"--model.init_args.output={tmp_path / 'set.safetensors'}", f"--trainer.default_root_dir={tmp_path}",
            "--summary.enabled=false",
        ],
        run=False,
    )
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    from lightning.pytorch.loggers import WandbLogger

    next(lg for lg in cli.trainer.loggers if isinstance(lg, WandbLogger)).experiment.finish()
    assert logged == [("dataset", "toy-mtt")]
    assert list((tmp_path / "wandb").glob("offline-run-*/*.wandb"))  # the offline run was written


def test_evaluation_loop_follows_evaluate_synset(monkeypatch):
    """MTT's loop: epochs + 1 passes; after pass epochs//2 + 1 the lr drops ×0.1 in a new optimizer (momentum
    restarts)."""
    from zoo.dataset_distillation.evaluate import train_on_set

    seen = []
    step = torch.optim.SGD.step

    def spy(self, *args, **kwargs):
        param = self.param_groups[0]["params"][0]
        seen.append((self.param_groups[0]["lr"], "momentum_buffer" in self.state.get(param, {})))
        return step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.SGD, "step", spy)
    train_on_set(torch.nn.Linear(3, 2), torch.randn(4, 3), torch.tensor([0, 1, 0, 1]), lr=0.5, epochs=4, batch_size=4)
    assert seen == [(0.5, False), (0.5, True), (0.5, True), (0.5, True), (pytest.approx(0.05), False)]


def test_every_distillation_config_has_an_experts_config_long_enough():
    """Each config's start window fits the experts its buffer_dir holds (setup would refuse it at run time)."""
    experts, runs = {}, []
    for path in sorted((ROOT / "configs" / "dataset_distillation").rglob("*.yaml")):
        args = yaml.safe_load(path.read_text()).get("model", {}).get("init_args", {})
        if "train_epochs" in args:
            experts[args["buffer_dir"]] = args["train_epochs"]
        elif "max_start_epoch" in args:
            runs.append((path.name, path.parent.name, args))
    assert len(runs) >= 20
    for name, folder, args in runs:
        needed = args["max_start_epoch"] - 1 + args.get("expert_epochs", 2)
        assert args["buffer_dir"] in experts, f"{folder}/{name}: no experts config writes {args['buffer_dir']}"
        assert experts[args["buffer_dir"]] >= needed, f"{folder}/{name} needs {needed} expert epochs"


def test_every_distillation_config_preprocesses_as_its_experts():
    """Setup refuses experts of another DSA strategy or input normalisation: each shipped distillation config uses
    the DSA strategy and the data normalisation of the experts config that writes its buffer_dir."""
    from zoo.dataset_distillation import DSA_STRATEGY

    def preprocessing(raw: dict) -> tuple:
        args, data = raw["model"]["init_args"], raw["data"]
        keys = ("normalize", "mean", "std", "channels", "image_size", "split_seed")
        return args.get("dsa_strategy", DSA_STRATEGY), data["class_path"], {k: data["init_args"].get(k) for k in keys}

    experts, runs = {}, []
    for path in sorted((ROOT / "configs" / "dataset_distillation").rglob("*.yaml")):
        raw = yaml.safe_load(path.read_text())
        args = raw.get("model", {}).get("init_args", {})
        if "train_epochs" in args:
            experts[args["buffer_dir"]] = preprocessing(raw)
        elif "max_start_epoch" in args:
            runs.append((f"{path.parent.name}/{path.name}", args["buffer_dir"], preprocessing(raw)))
    assert len(runs) >= 20
    for name, buffer, setting in runs:
        assert setting == experts[buffer], f"{name} vs the experts of {buffer}"


def test_distillation_warns_about_experts_that_dropped_the_last_batch(buffers, tmp_path, monkeypatch):
    """Experts made before drop_last was recorded (or with it true) still distil, with a warning naming them."""
    import shutil

    from zoo.dataset_distillation.buffer import load_trajectory, save_trajectory

    monkeypatch.chdir(ROOT)
    old = tmp_path / "old_experts"
    shutil.copytree(buffers["experts"], old)
    first = load_trajectory(old / "expert_0000.safetensors")
    save_trajectory(old / "expert_0000.safetensors", first.params, first.layout,
                    {k: v for k, v in first.metadata.items() if k != "drop_last"})
    args = ["fit", "--config", str(CONFIGS / "mtt.yaml"), "--model.init_args.max_start_epoch=2",
            "--trainer.max_steps=1", "--model.init_args.eval_nets=1", "--model.init_args.eval_epochs=1",
            f"--trainer.default_root_dir={tmp_path}", "--summary.enabled=false", "--trainer.logger=false"]
    with pytest.warns(UserWarning,
                      match=r"MTT: 1 of the 2 experts in .*old_experts \(e\.g\. expert_0000\.safetensors\)"):
        ZooCLI(args=[*args, f"--model.init_args.buffer_dir={old}"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ZooCLI(args=[*args, f"--model.init_args.buffer_dir={buffers['experts']}"])
    assert not [w for w in caught if "last partial batch" in str(w.message)]


def _one_iteration(buffer: Path, tmp_path: Path, *extra: str) -> list[str]:
    return ["fit", "--config", str(CONFIGS / "mtt.yaml"), f"--model.init_args.buffer_dir={buffer}",
            "--model.init_args.max_start_epoch=2", "--trainer.max_steps=1", "--model.init_args.eval_nets=1",
            "--model.init_args.eval_epochs=1", f"--trainer.default_root_dir={tmp_path}", "--summary.enabled=false",
            "--trainer.logger=false", *extra]


def test_experts_of_another_dsa_strategy_or_normalisation_are_refused_at_setup(buffers, tmp_path, monkeypatch):
    """MTT (arXiv 2203.11932) matches trajectories only when the student sees the images the experts saw: a DSA
    strategy or an input normalisation that differs from the experts' stops the run at setup, in one line naming the
    file, the field and both values; a buffer from before mean/std were recorded gets its own message."""
    import re
    import shutil

    from zoo.data import DigitsDataModule
    from zoo.dataset_distillation.buffer import load_trajectory, save_trajectory

    monkeypatch.chdir(ROOT)
    with pytest.raises(ValueError, match=r"^\S*expert_0000\.safetensors: field 'dsa_strategy' is "
                                         r"'color_crop_cutout_scale_rotate' in the expert file but 'color_crop' in "
                                         r"this run; [^\n]*$"):
        ZooCLI(args=_one_iteration(buffers["experts"], tmp_path, "--model.init_args.dsa_strategy=color_crop"))
    expert_mean = TrajectoryBuffer(buffers["experts"]).headers[0].metadata["mean"]
    other = DigitsDataModule(image_size=8, channels=1, split_seed=1)  # another split: another train mean and std
    assert expert_mean != list(other.mean)
    with pytest.raises(ValueError, match=re.escape(
        f"expert_0000.safetensors: field 'mean' is {expert_mean!r} in the expert file but {list(other.mean)!r} in "
        "this run"
    )):
        ZooCLI(args=_one_iteration(buffers["experts"], tmp_path, "--data.init_args.split_seed=1"))
    old = tmp_path / "old_experts"
    shutil.copytree(buffers["experts"], old)
    first = load_trajectory(old / "expert_0001.safetensors")
    save_trajectory(old / "expert_0001.safetensors", first.params, first.layout,
                    {k: v for k, v in first.metadata.items() if k not in ("mean", "std")})
    with pytest.raises(ValueError, match=r"expert_0001\.safetensors: was written before expert files recorded the "
                                         r"input normalisation \(field 'mean'\)"):
        ZooCLI(args=_one_iteration(old, tmp_path))
