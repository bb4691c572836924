"""Peer comparison: one MTT iteration of the zoo against the official mtt-distillation code, in one process.

The official code (GeorgeCazenavette/mtt-distillation, ``distill.py`` with its ``ReparamModule``) is fetched at a
pinned commit by the set-up below and imported from that folder at run time; nothing of it is in this repository.

Set-up (once):

    git clone https://github.com/GeorgeCazenavette/mtt-distillation /tmp/mtt_official
    git -C /tmp/mtt_official checkout 50dccea47ba48b9cfb3b9c59375d7da92e4e603b

(another folder: ``--official <folder>`` or ``MTT_OFFICIAL=<folder>``). Without it the script prints one line and
exits 0. Its ``utils.py`` imports kornia for ZCA, which is not used here: when kornia is not installed an empty
module stands in for it.

Run from the repository root (about 15 min on one core of a 2-core CPU; writes benchmarks/results/mtt_official.md):

    OMP_NUM_THREADS=1 python benchmarks/peers/mtt_official.py

How their code runs: ``distill.main(args)`` itself, unmodified: their loop, ``get_network`` (a new network every
iteration), ``ReparamModule``, ``DiffAugment``, expert files (``replay_buffer_{n}.pt``, lists of parameter lists)
and optimizers. Only its surroundings are replaced: ``get_dataset`` returns the digits training split the zoo uses,
``get_default_convnet_setting`` gives the zoo's digits ConvNet (width 32, depth 2, instance norm, average pooling),
``evaluate_synset`` records the synthetic set instead of training networks on it, ``wandb`` is a recorder (its
``log`` calls time the iterations), and ``Tensor.cuda`` is the identity on a machine without CUDA (their loop saves
the images with ``.cuda()`` at iteration 0). The expert files hold the zoo's experts (``ExpertTraining`` on the same
data), converted to their format.

Same ConvNet for both: the digits are given three channels, because the official ConvNet pads one-channel input
by 3 in its first convolution (MNIST's 28 → 32) while the zoo's pads 1 except at 28×28; with three channels the two
networks have the same parameters in the same order and compute the same function.

Measured, for IPC 1, 10 and 50 with the digits config's N = 20, M = 2, T⁺ = 8, lr_img 100, lr_lr 1e-5, α₀ 0.02,
no-flip DSA, batch_syn = all images (MTT's default):

- time per iteration: interleaved rounds; in each round every implementation runs ``--iterations`` iterations in
  turn (the order rotates between rounds); an iteration's time is the wall time, and the main thread's CPU time,
  between the starts of consecutive iterations (theirs: consecutive ``Synthetic_LR`` logs, which open an
  iteration; ours: consecutive ``on_train_batch_start``), so Lightning's loop, the (ignored) real batch and their
  network rebuild all count.
- peak memory of one iteration: the largest amount of memory allocated on top of what was live when the iteration
  began, from the allocation events of ``torch.profiler`` (``profile_memory=True``) over exactly one iteration
  (the second of a run), in separate runs from the timing.
- fidelity: both run 50 iterations from the same start: their run is recorded (initial images, expert and start
  epoch of each iteration, the permutations their batches come from, the RNG state before every ``DiffAugment``)
  and replayed into ``zoo.dataset_distillation.MTT`` (its segment, batch and DSA draws replaced by theirs; the
  inner loop, loss, backward and optimizer steps are the zoo's). The zoo's ``DiffAugment`` draws its parameters
  from the global RNG in the same order and amounts as theirs, so restoring their RNG state reproduces their
  augmentation. Reported: the largest difference of the images and of the learned lr after 50 iterations, the first
  iteration whose loss differs, and the same for a zoo run whose initial images are moved by one float32 ulp: the
  dynamics (lr_img 100, DSA) can carry a rounding difference to visibly different images within 50 iterations
  (once a ReLU gate near zero flips), so an exact match needs the official float32 arithmetic, operation for
  operation, which the zoo's iteration follows (DSA draws and formulas, L as ``distill.py`` computes it).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import os
import platform
import re
import statistics
import sys
import tempfile
import time
import types
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "benchmarks" / "results" / "mtt_official.md"
COMMIT = "50dccea47ba48b9cfb3b9c59375d7da92e4e603b"
FILES = {  # sha256 of the files this script imports, at COMMIT
    "distill.py": "7f940b77a3df21ac229ffcf84250d03d9741e79c56ddb3cbc7b249b5e4e95351",
    "reparam_module.py": "f48c30c4d37f60e091c820f46cd9d37dcbda4220a7e9ed9f0f7cb1a050ee5406",
    "utils.py": "ab62c6916c9710ec46679d275bf5203a4d3a7deda063614001be78b41c7c11a5",
    "networks.py": "05f4c562442231ab8460b9fd6013423c21f401a530b2cc36a4214225c4c7da1a",
}
SETUP = (
    "git clone https://github.com/GeorgeCazenavette/mtt-distillation /tmp/mtt_official && "
    f"git -C /tmp/mtt_official checkout {COMMIT}"
)
NUM_CLASSES, CHANNELS, SIZE, WIDTH, DEPTH = 10, 3, 8, 32, 2
DSA = "color_crop_cutout_scale_rotate"  # the zoo's DIGITS_DSA_STRATEGY (no flip on digits)


@dataclass(frozen=True)
class Setting:
    """One distillation setting, shared by both implementations."""

    ipc: int
    syn_steps: int = 20
    expert_epochs: int = 2
    max_start_epoch: int = 8
    batch_syn: int | None = None
    lr_img: float = 100.0
    lr_lr: float = 1e-5
    lr_teacher: float = 0.02
    dsa: bool = True

    def label(self) -> str:
        batch = "all" if self.batch_syn is None else self.batch_syn
        return f"IPC {self.ipc}, N {self.syn_steps}, M {self.expert_epochs}, batch_syn {batch}"


# ---------------------------------------------------------------------------------------------------- set-up
def find_official(folder: str | None) -> Path | None:
    path = Path(folder or os.environ.get("MTT_OFFICIAL", "/tmp/mtt_official"))
    return path if all((path / name).is_file() for name in FILES) else None


def check_hashes(folder: Path) -> list[str]:
    """Files that differ from the pinned commit's."""
    return [n for n, h in FILES.items() if hashlib.sha256((folder / n).read_bytes()).hexdigest() != h]


def import_official(folder: Path) -> tuple[types.ModuleType, types.ModuleType]:
    """Their ``distill`` and ``utils`` modules, imported from ``folder``."""
    sys.path.insert(0, str(folder))
    try:
        import kornia  # noqa: F401 - their utils.py imports it (for ZCA only)
    except ImportError:
        sys.modules["kornia"] = types.ModuleType("kornia")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scipy.ndimage.interpolation's deprecation
        import distill
        import utils
    return distill, utils


def digits():
    from zoo.data import DigitsDataModule

    return DigitsDataModule(image_size=SIZE, channels=CHANNELS, augment=False, batch_size=128, split_seed=0)


def network():
    from zoo.models import ConvNetModel

    return ConvNetModel(depth=DEPTH, width=WIDTH, image_size=SIZE)


def train_experts(buffer: Path, num_experts: int, epochs: int) -> Path:
    """The zoo's experts on three-channel digits (skipped when the folder already holds them)."""
    import lightning as L

    from zoo.dataset_distillation import ExpertTraining

    data = digits()
    data.drop_last = False  # as the official buffer.py
    model = ExpertTraining(network(), NUM_CLASSES, CHANNELS, num_experts=num_experts, train_epochs=epochs, lr=0.02,
                           dsa_strategy=DSA, buffer_dir=str(buffer), seed=0)
    L.seed_everything(0, verbose=False)
    trainer = L.Trainer(max_epochs=num_experts * epochs, accelerator="cpu", devices=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, limit_val_batches=1)
    trainer.fit(model, datamodule=data)
    return buffer


PER_FILE = 10  # experts per replay_buffer_{n}.pt, as buffer.py's save_interval


def write_official_buffer(buffer: Path, target: Path, per_file: int = PER_FILE) -> Path:
    """The zoo's experts as their ``replay_buffer_{n}.pt``: lists (experts) of lists (epochs) of parameter lists."""
    import torch

    from zoo.dataset_distillation import TrajectoryBuffer

    experts = TrajectoryBuffer(buffer)
    folder = target / "digits" / "ConvNet"  # <buffer_path>/<dataset>/<model> (distill.py, no ZCA suffix off CIFAR)
    folder.mkdir(parents=True, exist_ok=True)
    for f, first in enumerate(range(0, len(experts), per_file)):
        trajectories = []
        for k in range(first, min(first + per_file, len(experts))):
            t = experts.load(k)
            views = [t.layout.unflatten(row) for row in t.params]
            trajectories.append([[v.clone() for v in epoch.values()] for epoch in views])
        torch.save(trajectories, folder / f"replay_buffer_{f}.pt")
    return target


# ---------------------------------------------------------------------------------------------------- theirs
class _Recorder:
    """Stands in for ``wandb``: keeps the config, and hands every ``log`` call to ``on_log``."""

    def __init__(self, on_log) -> None:
        self.on_log = on_log
        self.config = types.SimpleNamespace(_items={})
        self.run = types.SimpleNamespace(name="mtt-official-benchmark")

    def init(self, config: Any = None, **kwargs: Any) -> None:
        self.config._items = dict(vars(config))

    def log(self, data: dict, step: int | None = None) -> None:
        self.on_log(data, step)

    def Histogram(self, *args: Any, **kwargs: Any) -> None:  # noqa: N802 - wandb's names
        return None

    def Image(self, *args: Any, **kwargs: Any) -> None:  # noqa: N802
        return None

    def finish(self) -> None:
        return None


class _Stop(Exception):
    """Ends their ``main`` after the last recorded evaluation."""


class _Tagged(list):
    """An expert trajectory of their buffer that records which snapshots the loop reads (expert k, epoch)."""

    def __init__(self, items: list, k: int, reads: list) -> None:
        super().__init__(items)
        self.k, self.reads = k, reads

    def __getitem__(self, epoch):
        self.reads.append((self.k, epoch))
        return super().__getitem__(epoch)


@dataclass
class Record:
    """What their run drew, per iteration, and the synthetic set at each evaluation."""

    evaluations: list = field(default_factory=list)  # (images, lr) at each evaluate_synset call
    reads: list = field(default_factory=list)  # (k, epoch) of every snapshot read, in order
    segments: list = field(default_factory=list)  # (k, start epoch) per iteration
    perms: list = field(default_factory=list)  # torch.randperm outputs, per iteration
    dsa_states: list = field(default_factory=list)  # global RNG state before each DiffAugment, per iteration
    losses: list = field(default_factory=list)  # Grand_Loss per iteration


def official_args(setting: Setting, buffer_path: Path, iterations: int, eval_it: int) -> argparse.Namespace:
    """distill.py's argparse defaults, with the setting's values."""
    return argparse.Namespace(
        dataset="digits", subset="imagenette", model="ConvNet", res=128, ipc=setting.ipc, eval_mode="S", num_eval=1,
        eval_it=eval_it, epoch_eval_train=1000, Iteration=iterations, lr_img=setting.lr_img, lr_lr=setting.lr_lr,
        lr_teacher=setting.lr_teacher, lr_init=0.01, batch_real=256, batch_syn=setting.batch_syn, batch_train=256,
        # no DSA in distillation is their no_aug (with dsa False their evaluation reads an unset args.dc_aug_param)
        pix_init="real", dsa="True", dsa_strategy=DSA, data_path="data",
        buffer_path=str(buffer_path), expert_epochs=setting.expert_epochs, syn_steps=setting.syn_steps,
        max_start_epoch=setting.max_start_epoch, zca=False, load_all=False, no_aug=not setting.dsa, texture=False,
        canvas_size=2, canvas_samples=1, max_files=None, max_experts=None, force_save=False,
    )


def run_official(distill, utils, setting: Setting, buffer_path: Path, iterations: int, *, record: bool = False,
                 profile_iteration: int | None = None) -> dict:
    """Runs their ``main`` for ``iterations`` iterations; returns the start times of the iterations (and the
    record, or the peak memory of iteration ``profile_iteration``)."""
    import torch

    train = digits()
    train.setup("fit")
    out: dict[str, Any] = {"starts": [], "record": Record() if record else None, "peak": None}
    rec: Record | None = out["record"]
    profiler = None

    def on_log(data: dict, step: int | None) -> None:
        nonlocal profiler
        if "Synthetic_LR" in data:  # the first thing an iteration does after its evaluation
            out["starts"].append((time.perf_counter(), time.thread_time()))
            if rec is not None:
                rec.perms.append([])
                rec.dsa_states.append([])
            if profile_iteration is not None and step == profile_iteration:
                profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True)
                profiler.start()
        if "Grand_Loss" in data:
            if rec is not None:
                rec.losses.append(float(data["Grand_Loss"]))
            if profiler is not None:
                profiler.stop()
                out["peak"] = peak_bytes(profiler)
                profiler = None

    def get_dataset(*args: Any, **kwargs: Any):
        m = torch.tensor(train.mean)
        classes = [str(c) for c in range(NUM_CLASSES)]
        identity = {c: c for c in range(NUM_CLASSES)}
        return (CHANNELS, (SIZE, SIZE), NUM_CLASSES, classes, m, torch.tensor(train.std), train.train_set, None,
                None, None, identity, identity)

    def evaluate_synset(it_eval, net, images, labels, testloader, args, **kwargs):
        if rec is not None:
            rec.evaluations.append((images.detach().clone(), float(args.lr_net)))
            if len(rec.evaluations) > 1:
                raise _Stop
        return net, 0.0, 0.0

    def convnet_setting():
        return WIDTH, DEPTH, "relu", "instancenorm", "avgpooling"

    patches = [
        (distill, "wandb", _Recorder(on_log)),
        (distill, "get_dataset", get_dataset),
        (distill, "evaluate_synset", evaluate_synset),
        (utils, "get_default_convnet_setting", convnet_setting),
    ]
    if not torch.cuda.is_available():
        patches.append((torch.Tensor, "cuda", lambda self, *a, **k: self))
    if rec is not None:
        randperm, diff_augment, load = torch.randperm, distill.DiffAugment, torch.load

        def recording_randperm(*args: Any, **kwargs: Any):
            perm = randperm(*args, **kwargs)
            if rec.perms:
                rec.perms[-1].append(perm.clone())
            return perm

        def recording_diff_augment(*args: Any, **kwargs: Any):
            rec.dsa_states[-1].append(torch.get_rng_state())
            return diff_augment(*args, **kwargs)

        def tagging_load(path, *args: Any, **kwargs: Any):
            n = int(re.search(r"replay_buffer_(\d+)\.pt$", str(path)).group(1))
            return [_Tagged(t, n * PER_FILE + i, rec.reads) for i, t in enumerate(load(path))]

        patches += [(torch, "randperm", recording_randperm), (distill, "DiffAugment", recording_diff_augment),
                    (torch, "load", tagging_load)]
    # record: evaluate at 0 (the initial set) and after `iterations` iterations; else evaluate at 0 only
    args = official_args(setting, buffer_path, iterations if record else iterations - 1,
                         iterations if record else iterations)
    saved = [(obj, name, getattr(obj, name)) for obj, name, _ in patches]
    cwd = os.getcwd()
    try:
        for obj, name, value in patches:
            setattr(obj, name, value)
        with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            os.chdir(tmp)
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                try:
                    distill.main(args)
                except _Stop:
                    pass
    finally:
        os.chdir(cwd)
        for obj, name, value in saved:
            setattr(obj, name, value)
    if rec is not None:  # each iteration reads τ[s], then τ[s + M]
        starts, targets = rec.reads[0::2], rec.reads[1::2]
        assert all(k == k2 and e2 == e + setting.expert_epochs for (k, e), (k2, e2) in zip(starts, targets))
        rec.segments = starts
    return out


def official_batches(perms: list, n: int, steps: int, batch_syn: int | None) -> list:
    """The inner batches of one of their iterations: each permutation split into batch_syn chunks, used from the
    last chunk to the first (``indices_chunks.pop()``)."""
    batches = []
    for perm in perms:
        assert len(perm) == n
        batches += list(reversed(perm.split(batch_syn or n)))
    return batches[:steps]


# ---------------------------------------------------------------------------------------------------- ours
def make_ours(setting: Setting, buffer: Path, gradient: str, output: Path, record: Record | None = None):
    import torch
    from torch import nn

    from zoo.dataset_distillation import MTT

    kwargs = dict(ipc=setting.ipc, syn_steps=setting.syn_steps, expert_epochs=setting.expert_epochs,
                  max_start_epoch=setting.max_start_epoch, batch_syn=setting.batch_syn, lr_img=setting.lr_img,
                  lr_lr=setting.lr_lr, lr_teacher=setting.lr_teacher, dsa_strategy=DSA if setting.dsa else "",
                  gradient=gradient, eval_nets=1, eval_epochs=0, output=str(output), seed=0)
    class Timed(MTT):
        """The zoo's MTT without its end-of-run evaluation and artifact (not part of an iteration; with N = 80 the
        learned lr of a 3-iteration run can turn negative, which the evaluation would refuse)."""

        def on_train_end(self) -> None:
            return None

    if record is None:
        return Timed(network(), str(buffer), NUM_CLASSES, CHANNELS, **kwargs)

    n = NUM_CLASSES * setting.ipc

    class Replayed(Timed):
        """The zoo's MTT with its random draws replaced by those recorded from the official run."""

        def _initialise(self, images, labels) -> None:
            super()._initialise(images, labels)
            self.images = nn.Parameter(record.evaluations[0][0].clone())

        def sample_segment(self):
            k, s = record.segments[self.global_step]
            trajectory = self._trajectory(k)
            target = trajectory.params[s + self.hparams.expert_epochs]
            return trajectory.params[s].to(self.device), target.to(self.device), s, trajectory

        def _batches(self, steps: int):
            perms = record.perms[self.global_step]
            return [b.to(self.device) for b in official_batches(perms, n, steps, self.hparams.batch_syn)]

        def _dsa_seeds(self, steps: int):
            return list(range(steps)) if self.dsa is not None else [None] * steps

        def augment(self, x, seed):
            if self.dsa is None:
                return x
            torch.set_rng_state(record.dsa_states[self.global_step][seed])
            return self.dsa(x)  # the global RNG, as their DiffAugment

    return Replayed(network(), str(buffer), NUM_CLASSES, CHANNELS, **kwargs)


def run_ours(setting: Setting, buffer: Path, gradient: str, iterations: int, *, record: Record | None = None,
             profile_iteration: int | None = None) -> dict:
    import lightning as L
    import torch

    out: dict[str, Any] = {"starts": [], "peak": None, "losses": [], "module": None}

    class Probe(L.Callback):
        profiler = None

        def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
            out["starts"].append((time.perf_counter(), time.thread_time()))
            if batch_idx == profile_iteration:
                self.profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                                       profile_memory=True)
                self.profiler.start()

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
            if self.profiler is not None:
                self.profiler.stop()
                out["peak"] = peak_bytes(self.profiler)
                self.profiler = None
            out["losses"].append(float(trainer.callback_metrics["train/matching_loss"]))

    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        module = make_ours(setting, buffer, gradient, Path(tmp) / "set.safetensors", record)
        trainer = L.Trainer(max_steps=iterations, accelerator="cpu", devices=1, logger=False, callbacks=[Probe()],
                            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                            num_sanity_val_steps=0, limit_val_batches=0, default_root_dir=tmp)
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            trainer.fit(module, datamodule=digits())
    out["module"] = module
    return out


def peak_bytes(profiler) -> int:
    """The largest sum of allocations minus frees over the profiled window (CPU allocator events)."""
    events = sorted((e.start_ns(), e.nbytes()) for e in profiler.profiler.kineto_results.events()
                    if e.name() == "[memory]")
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak


# ---------------------------------------------------------------------------------------------------- studies
def intervals(starts: list[tuple[float, float]]) -> tuple[float, float]:
    """Median wall time and median CPU time (of this thread) between the starts of consecutive iterations."""
    wall = [b[0] - a[0] for a, b in zip(starts, starts[1:])]
    cpu = [b[1] - a[1] for a, b in zip(starts, starts[1:])]
    return statistics.median(wall), statistics.median(cpu)


def timing(distill, utils, buffer: Path, official_buffer: Path, settings: list[Setting], rounds: int,
           iterations: int) -> dict:
    runners = {
        "official": lambda s: run_official(distill, utils, s, official_buffer, iterations)["starts"],
        "zoo unrolled": lambda s: run_ours(s, buffer, "unrolled", iterations)["starts"],
        "zoo tesla": lambda s: run_ours(s, buffer, "tesla", iterations)["starts"],
    }
    names = list(runners)
    per_round: dict = {(s, n): [] for s in settings for n in names}
    for r in range(rounds):
        for s in settings:
            order = names[r % len(names):] + names[: r % len(names)]
            for name in order:
                per_round[s, name].append(intervals(runners[name](s)))
            print(f"round {r + 1}/{rounds} {s.label()} (wall / CPU): " + ", ".join(
                f"{n} {1000 * per_round[s, n][-1][0]:.1f} / {1000 * per_round[s, n][-1][1]:.1f} ms" for n in names
            ), flush=True)
    return per_round


def memory(distill, utils, buffer: Path, official_buffer: Path, settings: list[Setting]) -> dict:
    peaks = {}
    for s in settings:
        peaks[s, "official"] = run_official(distill, utils, s, official_buffer, 3, profile_iteration=1)["peak"]
        for gradient in ("unrolled", "tesla"):
            peaks[s, f"zoo {gradient}"] = run_ours(s, buffer, gradient, 3, profile_iteration=1)["peak"]
        print(f"memory {s.label()}: " + ", ".join(f"{n} {peaks[s, n] / 2**20:.1f} MiB" for n in
                                                  ("official", "zoo unrolled", "zoo tesla")), flush=True)
    return peaks


def fidelity(distill, utils, buffer: Path, official_buffer: Path, setting: Setting, iterations: int) -> dict:
    """Their run recorded, then replayed into the zoo's MTT: unrolled (the same algorithm), TESLA (an intended
    approximation, for reference), and unrolled from initial images moved by one float32 ulp (how far float
    rounding alone would carry the run: the check's sensitivity)."""
    import copy

    import torch

    theirs = run_official(distill, utils, setting, official_buffer, iterations, record=True)["record"]
    assert len(theirs.evaluations) == 2 and len(theirs.segments) == iterations, "the official run was not recorded"
    (initial, _), (final_images, final_lr) = theirs.evaluations
    nudged = copy.copy(theirs)
    nudged.evaluations = [(torch.nextafter(initial, torch.full_like(initial, float("inf"))), theirs.evaluations[0][1]),
                          theirs.evaluations[1]]
    result = {"setting": setting, "iterations": iterations, "moved": (final_images - initial).abs().max().item()}
    for name, gradient, record in (("unrolled", "unrolled", theirs), ("tesla", "tesla", theirs),
                                   ("unrolled, start +1 ulp", "unrolled", nudged)):
        ours = run_ours(setting, buffer, gradient, iterations, record=record)
        images, lr = ours["module"].images.detach(), float(ours["module"].syn_lr.detach())
        diverged = [i for i, (a, b) in enumerate(zip(ours["losses"], theirs.losses)) if a != b]
        result[name] = {
            "max_abs": (images - final_images).abs().max().item(),
            "rel_l2": ((images - final_images).norm() / final_images.norm()).item(),
            "lr": lr, "official_lr": final_lr,
            "loss_max_rel": max(abs(a - b) / abs(b) for a, b in zip(ours["losses"], theirs.losses)),
            "first_loss_diff": diverged[0] if diverged else None,
        }
        print(f"fidelity {setting.label()}, {name}: images max |diff| {result[name]['max_abs']:.2e} (theirs moved up "
              f"to {result['moved']:.3f}), relative L2 {result[name]['rel_l2']:.2e}; lr {lr:.8f} vs {final_lr:.8f}",
              flush=True)
    return result


def dsa_agrees(distill, utils) -> float:
    """Their DiffAugment and the zoo's on the same batch from the same global RNG state (several draws)."""
    import torch

    from zoo.dataset_distillation import DiffAugment

    ours, worst = DiffAugment(DSA), 0.0
    x = torch.randn(16, CHANNELS, SIZE, SIZE)
    for seed in range(30):
        torch.manual_seed(seed)
        a = distill.DiffAugment(x, DSA, param=utils.ParamDiffAug())
        torch.manual_seed(seed)
        worst = max(worst, (ours(x) - a).abs().max().item())
    return worst


# ---------------------------------------------------------------------------------------------------- report
def machine() -> str:
    model = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return f"{model}, {os.cpu_count()} cores (shared with other jobs)"


def report(args, times: dict, peaks: dict, sweep: dict, fid: list, dsa_diff: float, meta: dict) -> str:
    import torch

    names = ("official", "zoo unrolled", "zoo tesla")
    lines = [
        "# MTT iteration: the zoo vs the official mtt-distillation code",
        "",
        f"Command: `{meta['command']}`. Official code: GeorgeCazenavette/mtt-distillation @ {COMMIT[:7]} "
        f"(`distill.main` run unmodified, see the script's docstring){meta['hash_note']}.",
        f"Machine: {machine()}; torch {torch.__version__}, {torch.get_num_threads()} thread(s) "
        f"(OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}); load average {meta['load_start']} at the "
        f"start, {meta['load_end']} at the end; {meta['minutes']:.1f} min.",
        f"Setting: digits (8×8, three channels), the zoo's digits ConvNet-2 (width 32, instance norm, "
        f"{meta['params']:,} parameters) for both; N = 20, M = 2, T⁺ = 8, lr_img 100, lr_lr 1e-5, α₀ 0.02, no-flip "
        f"DSA, batch_syn = all images; the zoo's experts ({meta['experts']} × {args.expert_epochs} epochs, "
        "`ExpertTraining` on the same data), in both formats.",
        "",
        f"## Time per iteration (median over {args.rounds} interleaved rounds of each round's median of "
        f"{args.iterations - 1} iterations; range over rounds in brackets)",
        "",
        "CPU time is the main thread's (`time.thread_time`; every op runs on it with one thread), which other jobs on "
        "the shared machine disturb far less than the wall time; both are given.",
        "",
    ]
    for label, index in (("CPU time", 1), ("Wall time", 0)):
        lines += [
            f"{label}:",
            "",
            "| setting | official ms | zoo unrolled ms | zoo tesla ms | official / zoo unrolled "
            "| official / zoo tesla |",
            "|---|---|---|---|---|---|",
        ]
        for s in sorted({s for s, _ in times}, key=lambda s: s.ipc):
            runs = {n: [t[index] for t in times[s, n]] for n in names}
            med = {n: statistics.median(runs[n]) for n in names}
            cells = [f"{1000 * med[n]:.1f} ({1000 * min(runs[n]):.1f}–{1000 * max(runs[n]):.1f})" for n in names]
            lines.append(f"| {s.label()} | " + " | ".join(cells) + f" | {med['official'] / med['zoo unrolled']:.2f}× "
                         f"| {med['official'] / med['zoo tesla']:.2f}× |")
        lines.append("")
    lines += ["## Peak memory of one iteration (MiB allocated on top of what was live when it began)", "",
              "| setting | official | zoo unrolled | zoo tesla |", "|---|---|---|---|"]
    for s in sorted({s for s, _ in peaks}, key=lambda s: s.ipc):
        lines.append(f"| {s.label()} | " + " | ".join(f"{peaks[s, n] / 2**20:.1f}" for n in names) + " |")
    lines += ["", "Memory against N (IPC 10):", "", "| N | official | zoo unrolled | zoo tesla |", "|---|---|---|---|"]
    ordered = sorted({s for s, _ in sweep}, key=lambda s: s.syn_steps)
    for s in ordered:
        lines.append(f"| {s.syn_steps} | " + " | ".join(f"{sweep[s, n] / 2**20:.1f}" for n in names) + " |")
    if len(ordered) > 1:
        lo, hi = ordered[0], ordered[-1]
        slope = {n: (sweep[hi, n] - sweep[lo, n]) / (hi.syn_steps - lo.syn_steps) / 2**20 for n in names}
        lines += ["", "Growth per inner step (N = %d → %d): " % (lo.syn_steps, hi.syn_steps)
                  + ", ".join(f"{n} {slope[n]:.2f} MiB" for n in names) + "."]
    lines += ["", f"## Fidelity: {args.fidelity_iterations} iterations from the same start", ""]
    lines.append(f"Their `DiffAugment` and the zoo's on the same batch from the same global RNG state (30 draws): "
                 f"largest difference {dsa_diff:.1e}.")
    lines.append("")
    lines.append("| setting | zoo run | images: max abs diff | relative L2 | lr (zoo) | lr (official) | "
                 "first iteration whose loss differs | largest relative loss diff |")
    lines.append("|---|---|---|---|---|---|---|---|")
    for f in fid:
        for name in ("unrolled", "tesla", "unrolled, start +1 ulp"):
            r = f[name]
            first = "none" if r["first_loss_diff"] is None else r["first_loss_diff"]
            lines.append(f"| {f['setting'].label()} | {name} | {r['max_abs']:.2e} | {r['rel_l2']:.2e} | "
                         f"{r['lr']:.8f} | {r['official_lr']:.8f} | {first} | {r['loss_max_rel']:.1e} |")
    lines.append("")
    lines.append("Largest pixel change over the run (official): "
                 + ", ".join(f"{f['setting'].label()} {f['moved']:.3f}" for f in fid) + ".")
    lines += [
        "",
        "## Notes",
        "",
        "- The unrolled rows of the fidelity table: the zoo's iteration, fed the official run's draws, gives the "
        "official loss at every iteration and the official images and lr at the end, bit for bit. The "
        "`start +1 ulp` rows are the same zoo run "
        "from initial images moved by one float32 ulp: how far float rounding alone carries a run in these "
        "dynamics (lr_img 100, DSA): to rounding level while no ReLU gate near zero flips, much further once one "
        "does (which of the two happens depends on the draws). So the zeros mean that the two iterations perform "
        "the same float32 operations, not merely the same algorithm.",
        "- TESLA (`gradient: tesla`) differs by design: its gradient is first order for N > 1. It recomputes every "
        "inner step with a graph in its backward pass, so an iteration costs more CPU time than the unrolled one; "
        f"its memory is one step's graph plus the stored θᵢ ({meta['params'] * 4 / 1024:.0f} KiB each), which is "
        "all of its growth with N.",
        "- The unrolled memory of both implementations grows linearly in N (every step's activations and "
        "double-backward graph are kept for the outer backward).",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--official", default=None, help="folder of the official code (default: $MTT_OFFICIAL or "
                                                         "/tmp/mtt_official)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--iterations", type=int, default=8, help="iterations per implementation per round")
    parser.add_argument("--ipc", type=int, nargs="+", default=[1, 10, 50])
    parser.add_argument("--sweep", type=int, nargs="+", default=[10, 20, 40, 80], help="N of the memory sweep")
    parser.add_argument("--fidelity-iterations", type=int, default=50)
    parser.add_argument("--experts", type=int, default=5)
    parser.add_argument("--expert-epochs", type=int, default=10)
    parser.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "mtt_official_benchmark"))
    parser.add_argument("--output", default=str(RESULTS))
    parser.add_argument("--parts", nargs="+", default=["fidelity", "memory", "timing"],
                        choices=["fidelity", "memory", "timing"], help="what to measure (all for the results file)")
    args = parser.parse_args()

    folder = find_official(args.official)
    if folder is None:
        print(f"mtt_official: skipped, the official code is not there (fetch it: {SETUP})")
        return
    changed = check_hashes(folder)
    if changed:
        print(f"mtt_official: warning, {changed} in {folder} differ from commit {COMMIT[:7]}", flush=True)
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    began, load_start = time.perf_counter(), "%.2f" % os.getloadavg()[0]
    distill, utils = import_official(folder)
    work = Path(args.workdir)
    buffer = work / f"experts_{args.experts}x{args.expert_epochs}"
    if not (buffer.is_dir() and len(list(buffer.glob("expert_*.safetensors"))) == args.experts):
        train_experts(buffer, args.experts, args.expert_epochs)
    official_buffer = write_official_buffer(buffer, work / "official_buffers")
    experts = len(sorted(buffer.glob("expert_*.safetensors")))

    dsa_diff = dsa_agrees(distill, utils)
    print(f"DiffAugment, theirs vs the zoo's from the same RNG state: largest difference {dsa_diff:.1e}", flush=True)
    settings = [Setting(ipc=i) for i in args.ipc]
    fid, sweep, peaks, times = [], {}, {}, {}
    if "fidelity" in args.parts:
        fid = [
            fidelity(distill, utils, buffer, official_buffer, Setting(ipc=10, batch_syn=32), args.fidelity_iterations),
            fidelity(distill, utils, buffer, official_buffer, Setting(ipc=1), args.fidelity_iterations),
        ]
    if "memory" in args.parts:
        sweep = memory(distill, utils, buffer, official_buffer, [Setting(ipc=10, syn_steps=n) for n in args.sweep])
        peaks = {k: v for k, v in sweep.items() if k[0] in settings}
        todo = [s for s in settings if (s, "official") not in peaks]
        peaks.update(memory(distill, utils, buffer, official_buffer, todo))
    if "timing" in args.parts:
        times = timing(distill, utils, buffer, official_buffer, settings, args.rounds, args.iterations)

    meta = {
        "command": " ".join(["OMP_NUM_THREADS=" + os.environ.get("OMP_NUM_THREADS", "?"), "python",
                             "benchmarks/peers/mtt_official.py", *sys.argv[1:]]),
        "hash_note": "" if not changed else f" (WARNING: {changed} differ from that commit)",
        "load_start": load_start, "load_end": "%.2f" % os.getloadavg()[0],
        "minutes": (time.perf_counter() - began) / 60, "experts": experts,
        "params": sum(p.numel() for p in network().build(num_classes=NUM_CLASSES, in_chans=CHANNELS).parameters()),
    }
    text = report(args, times, peaks, sweep, fid, dsa_diff, meta)
    Path(args.output).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
