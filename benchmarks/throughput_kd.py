"""Training throughput of one KD step: distill-zoo (Lightning) vs torchdistill vs a hand-written loop vs the student.

Variants, all on the same teacher, student, batch and optimizer (SGD lr 0.05, momentum 0.9, wd 5e-4), in one
process, interleaved round by round so machine noise hits every variant alike:

    zoo_kd        (a) ``zoo.methods.KD`` through the Lightning ``Trainer`` (logging on, logger off)
    torchdistill  (b) torchdistill's ``DistillationBox`` with its ``KDLoss`` (benchmarks/peers/torchdistill_kd.py)
    loop_kd       (c) a minimal hand-written PyTorch loop doing the same math (the framework-overhead floor)
    student       (d) the student alone, cross-entropy, hand-written (the floor when teacher cost goes to zero)
    zoo_dkd / loop_dkd, zoo_nd / loop_nd: DKD and KD++ (ND) the same way (zoo method vs hand-written loop)
    zoo_kd_data / zoo_kd_cached: online KD vs cached soft labels (``soft_labels:``), both through a DataLoader
        over an in-memory data set with the pad-crop-flip augmentation (online: fresh draws; cached: replayed),
        so the data side is included; the cache is built once before timing (its time is reported apart).
    zoo_kd_cached_mem: ``zoo.methods.KD`` on the in-memory batch with the teacher's stored top-k probabilities in
        it (the batch a cached data set yields: image, label, soft_index, soft_prob), so the teacher never runs:
        the device-side step of cached training, without the CPU data path (as every in-memory variant).

Each round builds every variant afresh from the same initial student, runs ``--warmup`` untimed steps, then
``--steps`` timed steps; throughput is the median over ``--rounds`` rounds of images / window time. Peak memory:
each variant runs again in its own process for a few steps (peak RSS on CPU, ``torch.cuda.max_memory_allocated`` on
CUDA), next to an idle process that only built
the models and the batch.

    python benchmarks/throughput_kd.py                      # CPU, CIFAR resnet32x4 → resnet8x4, batch 64
    python benchmarks/throughput_kd.py --rounds 3 --steps 5 --variants zoo_kd loop_kd
    python benchmarks/throughput_kd.py --preset imagenet --device cuda --precision bf16-mixed --channels-last
    (benchmarks/gpu.sh runs the GPU table)

Results go to benchmarks/results/throughput_kd[_<tag>].{json,md}.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks" / "peers"))

VARIANTS = (
    "zoo_kd",
    "torchdistill",
    "loop_kd",
    "student",
    "zoo_dkd",
    "loop_dkd",
    "zoo_nd",
    "loop_nd",
    "zoo_kd_data",
    "zoo_kd_cached",
    "zoo_kd_cached_mem",
)
TOP_K = 10  # stored probabilities per view in zoo_kd_cached_mem
LR, MOMENTUM, WD = 0.05, 0.9, 5e-4
T, W_CE, W_KD = 4.0, 0.1, 0.9


# ----------------------------------------------------------------------------------------------- set-up
def build_models(args: argparse.Namespace) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    if args.device.startswith("cuda"):  # as timm's and torchdistill's training scripts do; shared by every variant
        torch.backends.cudnn.benchmark = True
    if args.preset == "cifar":
        from zoo.models.cifar.resnet import resnet8x4, resnet32x4

        teacher, student = resnet32x4(num_classes=100), resnet8x4(num_classes=100)
    else:
        import torchvision

        teacher, student = torchvision.models.resnet34(num_classes=1000), torchvision.models.resnet18(num_classes=1000)
    return teacher.to(args.device).eval().requires_grad_(False), student.to(args.device)


def make_batch(args: argparse.Namespace) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(0)
    size, classes = (32, 100) if args.preset == "cifar" else (224, 1000)
    x = torch.randn(args.batch, 3, size, size, generator=g)
    y = torch.randint(0, classes, (args.batch,), generator=g)
    return x.to(args.device), y.to(args.device)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def autocast(args: argparse.Namespace):
    if args.precision == "bf16-mixed":
        return torch.autocast(device_type=args.device.split(":")[0], dtype=torch.bfloat16)
    return nullcontext()


def sgd(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(
        [p for p in model.parameters() if p.requires_grad], lr=LR, momentum=MOMENTUM, weight_decay=WD
    )


# ----------------------------------------------------------------------------------------------- hand-written
def loop_runner(kind: str, teacher: nn.Module, student: nn.Module, x: Tensor, y: Tensor, args) -> Callable[[int], None]:
    """The same math as the zoo methods, with nothing around it: forward, loss, backward, step."""
    from zoo.losses import DKDLoss, KDLoss, NDLoss

    student = student.train()
    if args.channels_last:
        student = student.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    teacher_in = x
    opt = sgd(student)
    kd, dkd = KDLoss(T), DKDLoss(1.0, 8.0, T)
    nd = NDLoss(100 if args.preset == "cifar" else 1000, getattr(student, "num_features", 512))
    nd = nd.to(x.device)
    nd.set_centers(torch.randn_like(nd.centers))

    def step() -> None:
        with autocast(args):
            if kind == "loop_nd":
                with torch.no_grad():  # teacher first, as the zoo does (see DistillationMethod.training_step)
                    t_emb = teacher.forward_head(teacher.forward_features(teacher_in), pre_logits=True)
                    t_logits = teacher.get_classifier()(t_emb)
                emb = student.forward_head(student.forward_features(x), pre_logits=True)
                logits = student.get_classifier()(emb)
                loss = F.cross_entropy(logits, y) + 0.0 * 3.5 * kd(logits, t_logits) + 2.0 * nd(emb, t_emb, y)
            else:
                if kind == "student":
                    loss = F.cross_entropy(student(x), y)
                else:
                    with torch.no_grad():
                        t_logits = teacher(teacher_in)
                    logits = student(x)
                    if kind == "loop_kd":
                        loss = W_CE * F.cross_entropy(logits, y) + W_KD * kd(logits, t_logits)
                    else:
                        tckd, nckd = dkd.parts(logits, t_logits, y)
                        loss = F.cross_entropy(logits, y) + 1.0 * tckd + 8.0 * nckd
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def run(n: int) -> None:
        for _ in range(n):
            step()

    return run


def torchdistill_runner(teacher: nn.Module, student: nn.Module, x: Tensor, y: Tensor, args) -> Callable[[int], None]:
    from torchdistill_kd import build_torchdistill_kd_step

    step = build_torchdistill_kd_step(
        teacher, student, x, y, temperature=T, alpha=W_KD, lr=LR, momentum=MOMENTUM, weight_decay=WD, device=args.device
    )
    teacher.requires_grad_(False)

    def run(n: int) -> None:
        for _ in range(n):
            step()

    return run


# ----------------------------------------------------------------------------------------------- Lightning
class _Repeat(torch.utils.data.IterableDataset):
    """Yields the same in-memory batch forever (the trainer's ``max_steps`` ends the epoch)."""

    def __init__(self, x: Tensor | dict[str, Tensor], y: Tensor | None) -> None:
        self.x, self.y = x, y  # y None: x is a whole batch (a dict)

    def __iter__(self):
        while True:
            yield self.x if self.y is None else (self.x, self.y)


class _Window:
    """Callback: wall and thread CPU time from the end of batch ``warmup`` to the end of the last batch."""

    def __init__(self, warmup: int, device: str) -> None:
        import lightning as L

        outer = self

        class Cb(L.Callback):
            def on_train_batch_end(self, trainer, *a) -> None:
                if trainer.global_step in (warmup, trainer.max_steps):
                    sync(device)
                    now = (time.perf_counter(), time.thread_time())
                    if trainer.global_step == warmup:
                        outer.start = now
                    else:
                        outer.end = now

        self.callback, self.start, self.end = Cb(), (0.0, 0.0), (0.0, 0.0)


def timing_trainer(args: argparse.Namespace, steps: int, window: _Window):
    """A Lightning Trainer for ``args.warmup + steps`` steps that only trains: no logger, checkpoint, bar or val."""
    import lightning as L

    return L.Trainer(
        accelerator="gpu" if args.device.startswith("cuda") else "cpu",
        devices=1,
        max_steps=args.warmup + steps,
        precision=args.precision if args.precision != "fp32" else "32-true",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        callbacks=[window.callback],
    )


def _synthetic_datamodule(args, n_images: int = 512):
    """An in-memory CIFAR-shaped ZooDataModule whose augmentation (pad 4, crop, flip) can be replayed."""
    from zoo.data.base import ZooDataModule
    from zoo.data.transforms import PadCropFlip

    class _Augmented(torch.utils.data.Dataset):
        def __init__(self, images: Tensor, labels: Tensor, augment) -> None:
            self.images, self.labels, self.augment = images, labels, augment

        def __len__(self) -> int:
            return len(self.labels)

        def __getitem__(self, i: int):
            if self.augment is None:
                return self.images[i], self.labels[i]
            return self.augment.apply(self.images[i], self.augment.sample(1, torch.default_generator)[0]), self.labels[
                i
            ]

    class SyntheticCIFAR(ZooDataModule):
        num_classes, in_chans, mean, std = 100, 3, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)

        def setup(self, stage=None) -> None:
            g = torch.Generator().manual_seed(1)
            self.images = torch.randn(n_images, 3, 32, 32, generator=g)
            self.labels = torch.randint(0, 100, (n_images,), generator=g)
            self.augment = PadCropFlip(4, flip=True, fill=0.0)
            self.train_set = _Augmented(self.images, self.labels, self.augment)

        def replay_source(self):
            return _Augmented(self.images, self.labels, None), self.augment, None

        def _loader(self, dataset, train):
            return torch.utils.data.DataLoader(dataset, batch_size=self.batch_size, shuffle=True, drop_last=True)

    return SyntheticCIFAR(batch_size=args.batch)


def zoo_runner(kind: str, teacher: nn.Module, student: nn.Module, x: Tensor, y: Tensor, args, cache_dir: str):

    from zoo.methods import DKD, KD, KDND
    from zoo.soft_labels import SoftLabels

    common = {
        "num_classes": 100 if args.preset == "cifar" else 1000,
        "in_chans": 3,
        "optimizer": lambda params: torch.optim.SGD(params, lr=LR, momentum=MOMENTUM, weight_decay=WD),
        "channels_last": args.channels_last,
        "teacher_channels_last": args.channels_last,
        "teacher_compile": args.compile_teacher,
    }
    if kind in ("zoo_kd", "zoo_kd_data", "zoo_kd_cached_mem"):
        method = KD(student, teacher, temperature=T, ce_weight=W_CE, kd_weight=W_KD, **common)
    elif kind == "zoo_kd_cached":
        opts = SoftLabels(path=str(Path(cache_dir) / "soft_labels"), repeats=args.repeats)
        method = KD(student, teacher, temperature=T, ce_weight=W_CE, kd_weight=W_KD, soft_labels=opts, **common)
    elif kind == "zoo_dkd":
        method = DKD(student, teacher, temperature=T, alpha=1.0, beta=8.0, warmup_epochs=1, **common)
    else:
        method = KDND(student, teacher, temperature=T, warmup_epochs=1, **common)
        method.nd_loss.set_centers(torch.randn_like(method.nd_loss.centers))
    datamodule = _synthetic_datamodule(args) if kind in ("zoo_kd_data", "zoo_kd_cached") else None
    batches = _Repeat(x, y)
    if kind == "zoo_kd_cached_mem":  # what a cached data set yields: the stored top-k of softmax(z_t / T)
        from zoo.soft_labels import teacher_top_k

        with torch.no_grad(), autocast(args):
            prob, index = teacher_top_k(teacher(x), T, TOP_K)
        batches = _Repeat({"image": x, "label": y, "soft_index": index, "soft_prob": prob}, None)
    loader = torch.utils.data.DataLoader(batches, batch_size=None)
    state = {"window": None}

    def run(n: int) -> None:
        window = _Window(args.warmup, args.device)
        trainer = timing_trainer(args, n, window)
        if datamodule is not None:
            trainer.fit(method, datamodule=datamodule)
        else:
            trainer.fit(method, train_dataloaders=loader)
        state["window"] = window

    run.timed_window = lambda: state["window"].end[0] - state["window"].start[0]  # type: ignore[attr-defined]
    run.method = method  # type: ignore[attr-defined]
    return run


# ----------------------------------------------------------------------------------------------- measurement
def make_runner(kind: str, teacher, student, x, y, args, cache_dir: str):
    student = copy.deepcopy(student)
    if kind.startswith("zoo"):  # its own teacher copy: the zoo may convert it (channels-last, compile, taps)
        return zoo_runner(kind, copy.deepcopy(teacher), student, x, y, args, cache_dir)
    if kind == "torchdistill":
        return torchdistill_runner(teacher, student, x, y, args)
    return loop_runner(kind, teacher, student, x, y, args)


def time_window(kind: str, run, args) -> float:
    """Seconds of ``args.steps`` steps after ``args.warmup`` untimed ones."""
    if kind.startswith("zoo"):
        run(args.steps)
        return run.timed_window()
    run(args.warmup)
    sync(args.device)
    start = time.perf_counter()
    run(args.steps)
    sync(args.device)
    return time.perf_counter() - start


def peak_memory(kind: str, args) -> float:
    """Peak memory (MB) of ``kind`` running a few steps in a fresh process ("idle": models and batch only)."""
    cmd = [
        sys.executable,
        __file__,
        "--memory",
        kind,
        "--preset",
        args.preset,
        "--device",
        args.device,
        "--batch",
        str(args.batch),
        "--precision",
        args.precision,
        "--repeats",
        str(args.repeats),
    ]
    cmd += ["--channels-last"] if args.channels_last else []
    cmd += ["--compile-teacher"] if args.compile_teacher else []
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    lines = [line for line in out.stdout.splitlines() if line.startswith("PEAK ")]
    if out.returncode != 0 or not lines:
        raise RuntimeError(f"memory run of {kind} failed:\n{out.stderr[-2000:]}")
    return float(lines[-1].split()[1])


def memory_worker(kind: str, args) -> None:
    teacher, student = build_models(args)
    x, y = make_batch(args)
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    if kind != "idle":
        with tempfile.TemporaryDirectory() as tmp:
            args.warmup, args.steps = 1, 2
            run = make_runner(kind, teacher, student, x, y, args, tmp)
            time_window(kind, run, args)
    if args.device.startswith("cuda"):
        print(f"PEAK {torch.cuda.max_memory_allocated() / 2**20:.1f}")
    else:  # VmHWM: ru_maxrss would carry the parent's peak across fork + exec
        status = Path("/proc/self/status").read_text().splitlines()
        hwm = next((line.split()[1] for line in status if line.startswith("VmHWM:")), None)
        peak_kb = float(hwm) if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print(f"PEAK {peak_kb / 1024:.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=["cifar", "imagenet"], default="cifar")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=2, help="R of the cached variant")
    parser.add_argument("--precision", choices=["fp32", "bf16-mixed"], default="fp32")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--compile-teacher", action="store_true")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--tag", default="", help="suffix of the result files")
    parser.add_argument("--memory", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory:
        memory_worker(args.memory, args)
        return

    teacher, student = build_models(args)
    x, y = make_batch(args)
    results: dict = {"config": {k: v for k, v in vars(args).items() if k != "memory"}, "variants": {}}
    if "zoo_kd_cached_mem" in args.variants:
        results["config"]["top_k"] = TOP_K
    with tempfile.TemporaryDirectory() as tmp:
        if "zoo_kd_cached" in args.variants:  # one untimed fit builds the cache; timed fits reuse it
            began = time.perf_counter()
            make_runner("zoo_kd_cached", teacher, student, x, y, args, tmp)(1)
            results["cache_build_seconds"] = time.perf_counter() - began
        seconds: dict[str, list[float]] = {k: [] for k in args.variants}
        for r in range(args.rounds):
            for kind in args.variants:  # every round starts each variant from the same student weights
                runner = make_runner(kind, teacher, student, x, y, args, tmp)
                seconds[kind].append(time_window(kind, runner, args))
            print(
                f"round {r + 1}/{args.rounds}: "
                + ", ".join(f"{k} {args.batch * args.steps / s[-1]:.1f}" for k, s in seconds.items()),
                flush=True,
            )
    for kind, secs in seconds.items():
        ips = [args.batch * args.steps / s for s in secs]
        results["variants"][kind] = {
            "images_per_sec": ips,
            "median_images_per_sec": statistics.median(ips),
            "median_step_ms": 1000 * statistics.median(secs) / args.steps,
        }
    if not args.no_memory:
        results["idle_peak_mb"] = peak_memory("idle", args)
        for kind in args.variants:
            results["variants"][kind]["peak_mb"] = peak_memory(kind, args)
    results["ratios"] = ratios(results["variants"])
    device = (
        torch.cuda.get_device_name()
        if args.device.startswith("cuda")
        else (f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads")
    )
    results["machine"] = device
    results["torch"] = torch.__version__
    results["command"] = "python benchmarks/throughput_kd.py " + " ".join(sys.argv[1:])
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = "throughput_kd" + (f"_{args.tag}" if args.tag else "")
    (RESULTS / f"{stem}.json").write_text(json.dumps(results, indent=2))
    table = render(results, args)
    (RESULTS / f"{stem}.md").write_text(table)
    print(table)


RATIOS = {  # name: (a, b, step-time ratio?)
    "a/b throughput zoo_kd / torchdistill": ("zoo_kd", "torchdistill", False),
    "a/c step time zoo_kd / loop_kd": ("zoo_kd", "loop_kd", True),
    "a/d throughput zoo_kd / student": ("zoo_kd", "student", False),
    "step time zoo_dkd / loop_dkd": ("zoo_dkd", "loop_dkd", True),
    "step time zoo_nd / loop_nd": ("zoo_nd", "loop_nd", True),
    "throughput cached / online (with data)": ("zoo_kd_cached", "zoo_kd_data", False),
    "throughput cached (in memory) / online": ("zoo_kd_cached_mem", "zoo_kd", False),
    "throughput cached (in memory) / torchdistill": ("zoo_kd_cached_mem", "torchdistill", False),
}


def ratios(variants: dict) -> dict[str, dict[str, float]]:
    """Each ratio from the medians, and its median, min and max over rounds (the two ran back to back in a round)."""
    out = {}
    for name, (a, b, time_ratio) in RATIOS.items():
        if a not in variants or b not in variants:
            continue
        per_round = [
            (ib / ia if time_ratio else ia / ib)
            for ia, ib in zip(variants[a]["images_per_sec"], variants[b]["images_per_sec"])
        ]
        ma, mb = variants[a]["median_images_per_sec"], variants[b]["median_images_per_sec"]
        out[name] = {
            "of_medians": mb / ma if time_ratio else ma / mb,
            "round_median": statistics.median(per_round),
            "round_min": min(per_round),
            "round_max": max(per_round),
        }
    return out


def render(results: dict, args) -> str:
    cfg = results["config"]
    head = [
        f"KD step throughput, preset {cfg['preset']} (batch {cfg['batch']}), {cfg['precision']}"
        + (", channels-last" if cfg["channels_last"] else "")
        + (", compiled teacher" if cfg["compile_teacher"] else "")
        + f"; median of {cfg['rounds']} rounds × {cfg['steps']} steps after {cfg['warmup']} warm-up steps.",
        f"Command: `{results['command']}`; machine: {results['machine']}; torch {results['torch']}.",
        "",
        "| variant | images/s (median) | step ms | peak memory MB |",
        "|---|---|---|---|",
    ]
    for kind, v in results["variants"].items():
        peak = f"{v['peak_mb']:.0f}" if "peak_mb" in v else "—"
        head.append(f"| {kind} | {v['median_images_per_sec']:.1f} | {v['median_step_ms']:.1f} | {peak} |")
    if "idle_peak_mb" in results:
        head.append(f"| (idle: models and batch only) | — | — | {results['idle_peak_mb']:.0f} |")
    if "cache_build_seconds" in results:
        head.append("")
        head.append(
            f"Cache build (R = {cfg['repeats']}, 512 images, before timing): {results['cache_build_seconds']:.1f} s."
        )
    head += ["", "| ratio | of the medians | per round: median [min, max] |", "|---|---|---|"]
    head += [
        f"| {k} | {v['of_medians']:.3f} | {v['round_median']:.3f} [{v['round_min']:.3f}, {v['round_max']:.3f}] |"
        for k, v in results["ratios"].items()
    ]
    return "\n".join(head) + "\n"


if __name__ == "__main__":
    main()
