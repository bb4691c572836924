"""Training speed of the segmentation distillation steps: CWD and MGD through the zoo (Lightning) vs a hand-written
PyTorch loop doing the same math on the same models, in one process, interleaved round by round.

Variants (each round builds every variant afresh from the same initial weights, runs ``--warmup`` untimed steps, then
``--steps`` timed ones on one in-memory batch; a variant's time is the median over ``--rounds`` rounds):

    zoo_cwd / loop_cwd   ``zoo.methods.CWD`` through the Lightning ``Trainer`` (logging on, logger off) / the loop:
                         student (upsampled and pre-upsampling logits), teacher under no_grad, CE (ignore 255) +
                         cwd_weight·CWD_τ on the pre-upsampling logits, zero_grad, backward, optimizer step
    zoo_mgd / loop_mgd   ``zoo.methods.MGD`` / the loop: CutMix of two unlabelled batches, the deep and wide teachers on
                         u₀, u₁, x and ū, the student on x and ū, the five terms of MGD (sup, pixel_l, pixel_u,
                         semantic, content)
    zoo_cwd_nocheck      ``zoo_cwd`` with the divergence check (one host read of the summed loss per step, a sync on
                         CUDA) replaced by a no-op: what that read costs (not run by default)

The hand loops call the smp network's encoder, decoder and head directly for the pre-upsampling logits and the
decoder feature; the zoo reads the same tensors through forward hooks (``zoo.teacher.FeatureTaps``). The loss modules
are the zoo's (``CWDLoss``, ``MGDSemanticLoss``, ``MGDContentLoss``, ``cutmix``), so both sides compute the same
numbers. Presets (models built without pretrained weights; timing does not depend on them):

    digits   the digit-scenes configs' models at their sizes: CWD DeepLabV3+ tu-resnet10t ← DeepLabV3+ tu-resnet26d,
             MGD adds the wide teacher U-Net tu-resnet18d (depth 3, decoder 256-128-64); 64×64, batch 16 (MGD: 16
             labelled + 2 × 16 unlabelled), 11 classes, AdamW lr 0.002 wd 1e-4 (configs/segmentation/digit_scenes)
    voc      the VOC recipes' models: CWD DeepLabV3 tu-resnet18d ← DeepLabV3 tu-resnet101d (output stride 8), batch 8;
             MGD DeepLabV3+ tu-resnet18d ← DeepLabV3+ tu-resnet101d and tu-wide_resnet50_2 (output stride 8), batch
             2 + 2 × 2; 21 classes, SGD lr 0.01 momentum 0.9 wd 1e-4 (configs/segmentation/voc); ``--size`` sets the
             crop (512 in the recipes)

    python benchmarks/throughput_seg.py                                  # CPU, digits preset (about 5 min)
    python benchmarks/throughput_seg.py --preset voc --size 128 --batch-scale 0.25 --rounds 3 --steps 3
    python benchmarks/throughput_seg.py --preset voc --device cuda --precision bf16-mixed --tag gpu  # in gpu.sh

Results: benchmarks/results/throughput_seg[_<tag>].{json,md}.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from throughput_kd import _Repeat, _Window, autocast, sync, timing_trainer

VARIANTS = ("zoo_cwd", "loop_cwd", "zoo_mgd", "loop_mgd", "zoo_cwd_nocheck")
IGNORE, TAU, CWD_WEIGHT = 255, 4.0, 3.0
SEMANTIC_WEIGHT, CONTENT_WEIGHT, PIXEL_WEIGHT = 0.002, 100.0, 1.0
PRESETS = {
    "digits": {
        "size": 64, "classes": 11, "cwd_batch": 16, "mgd_batch": 16,
        "cwd": (
            {"arch": "DeepLabV3Plus", "encoder": "tu-resnet10t"},
            {"arch": "DeepLabV3Plus", "encoder": "tu-resnet26d"},
        ),
        "mgd": (
            {"arch": "DeepLabV3Plus", "encoder": "tu-resnet10t"},
            {"arch": "DeepLabV3Plus", "encoder": "tu-resnet26d"},
            {"arch": "Unet", "encoder": "tu-resnet18d",
             "model_kwargs": {"encoder_depth": 3, "decoder_channels": [256, 128, 64]}},
        ),
        "optimizer": lambda params: torch.optim.AdamW(params, lr=0.002, weight_decay=1e-4),
    },
    "voc": {
        "size": 512, "classes": 21, "cwd_batch": 8, "mgd_batch": 2,
        "cwd": (
            {"arch": "DeepLabV3", "encoder": "tu-resnet18d", "model_kwargs": {"encoder_output_stride": 8}},
            {"arch": "DeepLabV3", "encoder": "tu-resnet101d", "model_kwargs": {"encoder_output_stride": 8}},
        ),
        "mgd": (
            {"arch": "DeepLabV3Plus", "encoder": "tu-resnet18d", "model_kwargs": {"encoder_output_stride": 8}},
            {"arch": "DeepLabV3Plus", "encoder": "tu-resnet101d", "model_kwargs": {"encoder_output_stride": 8}},
            {"arch": "DeepLabV3Plus", "encoder": "tu-wide_resnet50_2", "model_kwargs": {"encoder_output_stride": 8}},
        ),
        "optimizer": lambda params: torch.optim.SGD(params, lr=0.01, momentum=0.9, weight_decay=1e-4),
    },
}


# ----------------------------------------------------------------------------------------------- set-up
def build_models(args: argparse.Namespace, method: str) -> list[nn.Module]:
    """Student first, then the teacher(s) (frozen, eval), on the device, from seed 0."""
    from zoo.models import SMPModel

    torch.manual_seed(0)
    if args.device.startswith("cuda"):
        torch.backends.cudnn.benchmark = True
    models = [SMPModel(**cfg).build(args.preset_cfg["classes"], 3).to(args.device)
              for cfg in args.preset_cfg[method]]
    for teacher in models[1:]:
        teacher.eval().requires_grad_(False)
    return models


def make_batch(args: argparse.Namespace, method: str):
    g = torch.Generator().manual_seed(0)
    n, size, classes = args.batches[method], args.size, args.preset_cfg["classes"]

    def images() -> Tensor:
        return torch.randn(n, 3, size, size, generator=g).to(args.device)

    def labels() -> Tensor:
        y = torch.randint(0, classes, (n, size, size), generator=g)
        y[torch.rand(n, size, size, generator=g) < 0.05] = IGNORE
        return y.to(args.device)

    if method == "cwd":
        return images(), labels()
    labelled, unlabelled, mix = (images(), labels()), (images(), labels()), (images(), labels())
    return {"labelled": labelled, "unlabelled": unlabelled, "unlabelled_mix": mix}


def smp_parts(model: nn.Module, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """An smp network's upsampled logits, pre-upsampling logits and decoder feature, by calling its parts."""
    head = model.segmentation_head  # Sequential(conv, upsampling, activation)
    feature = model.decoder(model.encoder(x))
    logits = head[0](feature)
    return head[2](head[1](logits)), logits, feature


def _resize_like(logits: Tensor, target: Tensor) -> Tensor:
    if logits.shape[-2:] != target.shape[-2:]:
        logits = F.interpolate(logits, size=target.shape[-2:], mode="bilinear", align_corners=False)
    return logits


# ----------------------------------------------------------------------------------------------- hand-written
def loop_runner(method: str, models: list[nn.Module], batch, args) -> Callable[[int], None]:
    from zoo.data.mixing import BoxMaskGenerator, cutmix
    from zoo.losses.segmentation import CWDLoss, MGDContentLoss, MGDSemanticLoss

    student = models[0].train()
    opt = args.preset_cfg["optimizer"]([p for p in student.parameters() if p.requires_grad])
    cwd, semantic, content = CWDLoss(TAU), MGDSemanticLoss(reduction="sum"), MGDContentLoss()
    masks = BoxMaskGenerator(n_boxes=3, prop_range=(0.25, 0.5))

    def cwd_step() -> Tensor:
        x, y = batch
        out, logits, _ = smp_parts(student, x)  # student first, as SegmentationMethod.training_step
        with torch.no_grad():
            _, t_logits, _ = smp_parts(models[1], x)
        terms = [F.cross_entropy(_resize_like(out, y), y, ignore_index=IGNORE), CWD_WEIGHT * cwd(logits, t_logits)]
        return torch.stack(terms).sum()

    def mgd_step() -> Tensor:
        deep, wide = models[1], models[2]
        x, y = batch["labelled"]
        u0, u1 = batch["unlabelled"][0], batch["unlabelled_mix"][0]
        mask = masks.generate(len(u0), tuple(u0.shape[-2:])).to(u0)
        u_mix = cutmix(u0, u1, mask)
        with torch.no_grad():
            d0, d1 = deep(torch.cat([u0, u1])).chunk(2)
            w0, w1 = wide(torch.cat([u0, u1])).chunk(2)
            pseudo_d, pseudo_w = cutmix(d0, d1, mask).argmax(1), cutmix(w0, w1, mask).argmax(1)
            label_d, label_w = deep(x).argmax(1), wide(x).argmax(1)
            deep_mix = deep(u_mix)
            wide_mix = smp_parts(wide, u_mix)[2]
        logits_x, _, _ = smp_parts(student, x)
        logits_u, _, feature_u = smp_parts(student, u_mix)
        terms = [
            F.cross_entropy(_resize_like(logits_x, y), y, ignore_index=IGNORE),
            PIXEL_WEIGHT * (F.cross_entropy(logits_x, label_w) + F.cross_entropy(logits_x, label_d)),
            PIXEL_WEIGHT * (F.cross_entropy(logits_u, pseudo_w) + F.cross_entropy(logits_u, pseudo_d)),
            SEMANTIC_WEIGHT * semantic(logits_u, deep_mix),
            CONTENT_WEIGHT * content(feature_u, wide_mix),
        ]
        return torch.stack(terms).sum()

    loss_of = cwd_step if method == "cwd" else mgd_step

    def run(n: int) -> None:
        for _ in range(n):
            with autocast(args):
                loss = loss_of()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

    return run


# ----------------------------------------------------------------------------------------------- Lightning
def zoo_runner(kind: str, models: list[nn.Module], batch, args) -> Callable[[int], None]:

    import zoo.methods.base
    from zoo.methods import CWD, MGD

    common = {"num_classes": args.preset_cfg["classes"], "in_chans": 3, "optimizer": args.preset_cfg["optimizer"]}
    if kind.startswith("zoo_cwd"):
        method = CWD(models[0], models[1], temperature=TAU, cwd_weight=CWD_WEIGHT, **common)
    else:
        method = MGD(models[0], models[1], models[2], semantic_weight=SEMANTIC_WEIGHT, content_weight=CONTENT_WEIGHT,
                     pixel_weight=PIXEL_WEIGHT, **common)
    loader = torch.utils.data.DataLoader(_Repeat(batch, None) if isinstance(batch, dict) else _Repeat(*batch),
                                         batch_size=None)
    state = {}

    def run(n: int) -> None:
        window = _Window(args.warmup, args.device)
        trainer = timing_trainer(args, n, window)
        check = zoo.methods.base.check_finite_terms
        if kind == "zoo_cwd_nocheck":
            zoo.methods.base.check_finite_terms = lambda *a: None
        try:
            trainer.fit(method, train_dataloaders=loader)
        finally:
            zoo.methods.base.check_finite_terms = check
        state["window"] = window

    run.timed_window = lambda: tuple(  # type: ignore[attr-defined]
        b - a for a, b in zip(state["window"].start, state["window"].end)
    )
    return run


# ----------------------------------------------------------------------------------------------- measurement
def time_variant(kind: str, models: dict, batches: dict, args) -> tuple[float, float, float | None]:
    """Wall and thread CPU seconds of ``args.steps`` steps after ``args.warmup`` untimed ones, and the peak CUDA MB
    (None on CPU)."""
    method = "cwd" if "cwd" in kind else "mgd"
    fresh = [copy.deepcopy(m) for m in models[method]]
    cuda = args.device.startswith("cuda")
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    if kind.startswith("zoo"):
        run = zoo_runner(kind, fresh, batches[method], args)
        run(args.steps)
        seconds, cpu = run.timed_window()
    else:
        run = loop_runner(method, fresh, batches[method], args)
        run(args.warmup)
        sync(args.device)
        start, start_cpu = time.perf_counter(), time.thread_time()
        run(args.steps)
        sync(args.device)
        seconds, cpu = time.perf_counter() - start, time.thread_time() - start_cpu
    return seconds, cpu, (torch.cuda.max_memory_allocated() / 2**20 if cuda else None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="digits")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", choices=["fp32", "bf16-mixed"], default="fp32")
    parser.add_argument("--size", type=int, default=None, help="image side (default: the preset's)")
    parser.add_argument("--batch-scale", type=float, default=1.0,
                        help="multiplies the preset's batch sizes (at least 2: BatchNorm in training)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS[:4]), choices=list(VARIANTS))
    parser.add_argument("--tag", default="", help="suffix of the result files")
    args = parser.parse_args()
    args.preset_cfg = PRESETS[args.preset]
    args.size = args.size or args.preset_cfg["size"]
    args.batches = {m: max(2, round(args.preset_cfg[f"{m}_batch"] * args.batch_scale)) for m in ("cwd", "mgd")}
    load_before = os.getloadavg()
    began = time.time()
    methods = sorted({"cwd" if "cwd" in k else "mgd" for k in args.variants})
    models = {m: build_models(args, m) for m in methods}
    batches = {m: make_batch(args, m) for m in methods}
    seconds: dict[str, list[float]] = {k: [] for k in args.variants}
    cpu: dict[str, list[float]] = {k: [] for k in args.variants}
    peaks: dict[str, float] = {}
    for r in range(args.rounds):
        for kind in args.variants:
            secs, used, peak = time_variant(kind, models, batches, args)
            seconds[kind].append(secs)
            cpu[kind].append(used)
            if peak is not None:
                peaks[kind] = max(peaks.get(kind, 0.0), peak)
        print(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{k} {1000 * v[-1] / args.steps:.1f} ms"
                                                          for k, v in seconds.items()), flush=True)
    results: dict = {
        "config": {k: v for k, v in vars(args).items() if k not in ("preset_cfg",)},
        "models": {m: args.preset_cfg[m] for m in methods},
        "variants": {
            k: {
                "step_ms": [1000 * s / args.steps for s in v],
                "median_step_ms": 1000 * statistics.median(v) / args.steps,
                "cpu_step_ms": [1000 * s / args.steps for s in cpu[k]],
                "median_cpu_step_ms": 1000 * statistics.median(cpu[k]) / args.steps,
                **({"peak_mb": peaks[k]} if k in peaks else {}),
            }
            for k, v in seconds.items()
        },
        "ratios": {},
    }
    for zoo_kind, loop_kind in (("zoo_cwd", "loop_cwd"), ("zoo_mgd", "loop_mgd"), ("zoo_cwd_nocheck", "loop_cwd"),
                                ("zoo_cwd", "zoo_cwd_nocheck")):
        if zoo_kind in seconds and loop_kind in seconds:
            per_round = [a / b for a, b in zip(seconds[zoo_kind], seconds[loop_kind])]
            per_round_cpu = [a / b for a, b in zip(cpu[zoo_kind], cpu[loop_kind])]
            results["ratios"][f"{zoo_kind} / {loop_kind}"] = {
                "round_median": statistics.median(per_round), "round_min": min(per_round),
                "round_max": max(per_round),
                "of_medians": statistics.median(seconds[zoo_kind]) / statistics.median(seconds[loop_kind]),
                "cpu_round_median": statistics.median(per_round_cpu), "cpu_round_min": min(per_round_cpu),
                "cpu_round_max": max(per_round_cpu),
            }
    results["machine"] = (torch.cuda.get_device_name() if args.device.startswith("cuda")
                          else f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads")
    results["load_average"] = {"before": [round(v, 2) for v in load_before],
                               "after": [round(v, 2) for v in os.getloadavg()]}
    results["minutes"] = round((time.time() - began) / 60, 1)
    results["torch"] = torch.__version__
    results["command"] = "python benchmarks/throughput_seg.py " + " ".join(sys.argv[1:])
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = "throughput_seg" + (f"_{args.tag}" if args.tag else "")
    (RESULTS / f"{stem}.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    table = render(results, args)
    (RESULTS / f"{stem}.md").write_text(table + "\n")
    print(table)


def render(results: dict, args) -> str:
    load, cpu = results["load_average"], not args.device.startswith("cuda")
    head = [
        f"Segmentation distillation step, preset {args.preset} ({args.size}×{args.size}, batch CWD "
        f"{args.batches['cwd']}, MGD {args.batches['mgd']} labelled + 2 × {args.batches['mgd']} unlabelled), "
        f"{args.precision}; median of {args.rounds} interleaved rounds × {args.steps} steps after {args.warmup} "
        f"warm-up steps{', wall and thread CPU time' if cpu else ''}. Command: `{results['command'].strip()}`; "
        f"machine: {results['machine']}, 1-minute load average {load['before'][0]:.1f} before and "
        f"{load['after'][0]:.1f} after; torch {results['torch']} ({results['minutes']} min).",
        "",
        "| variant | wall ms / step (median) | range | CPU ms / step | peak MB |",
        "|---|---|---|---|---|",
    ]
    for kind, v in results["variants"].items():
        peak = f"{v['peak_mb']:.0f}" if "peak_mb" in v else "—"
        used = f"{v['median_cpu_step_ms']:.1f}" if cpu else "—"
        head.append(f"| {kind} | {v['median_step_ms']:.1f} | {min(v['step_ms']):.1f}–{max(v['step_ms']):.1f} | "
                    f"{used} | {peak} |")
    head += ["", "| step-time ratio | wall, per round: median [min, max] | wall, of the medians | CPU, per round |",
             "|---|---|---|---|"]
    for k, v in results["ratios"].items():
        used = f"{v['cpu_round_median']:.3f} [{v['cpu_round_min']:.3f}, {v['cpu_round_max']:.3f}]" if cpu else "—"
        head.append(f"| {k} | {v['round_median']:.3f} [{v['round_min']:.3f}, {v['round_max']:.3f}] | "
                    f"{v['of_medians']:.3f} | {used} |")
    return "\n".join(head)


if __name__ == "__main__":
    main()
