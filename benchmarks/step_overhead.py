"""Host-side cost of one training step with next to no compute: the zoo's KD step (Lightning) vs a hand-written loop.

Teacher and student are a 3→4 channel conv, a pooling and a linear layer (about 500 parameters), batch 8 of 3×32×32,
100 classes, one thread, so a step's time is its Python and dispatch cost: what a GPU step has to hide behind the
card's work. Each variant runs ``--rounds`` times, interleaved with the others (this machine's timings drift by tens of
per cent between runs); a round's time is its median step, and the table gives the median round and the range.
Variants: the hand-written KD loop, the zoo's ``KD`` online (teacher on the batch) and cached (the batch carries
stored top-10 probabilities, as a cached soft-label data set yields them). Then a cProfile of the online zoo step
gives the share of Lightning's ``self.log``, and ``timeit`` the step's training accuracy (100-class
``MetricCollection``) called as ``forward()`` against ``update()``, which the zoo uses since it logs per epoch only.

    python benchmarks/step_overhead.py [--rounds 5]     # about 1 min

Results: benchmarks/results/step_overhead.{json,md}.
"""

from __future__ import annotations

import cProfile
import json
import platform
import pstats
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from throughput_kd import _Repeat  # the in-memory loader of the throughput benchmark

from zoo.losses import KDLoss
from zoo.soft_labels import teacher_top_k

T, W_CE, W_KD, STEPS, SKIP = 4.0, 0.1, 0.9, 400, 50


def tiny() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 100))


def sgd(params) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=5e-4)


def loop_ms(x: torch.Tensor, y: torch.Tensor) -> float:
    torch.manual_seed(0)
    teacher, student = tiny().eval().requires_grad_(False), tiny()
    opt, kd_loss, times = sgd(student.parameters()), KDLoss(T), []
    for _ in range(STEPS):
        start = time.perf_counter()
        with torch.no_grad():
            zt = teacher(x)
        zs = student(x)
        loss = W_CE * F.cross_entropy(zs, y) + W_KD * kd_loss(zs, zt)
        opt.zero_grad()
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times[SKIP:])


def zoo_ms(batch, steps: int = STEPS) -> float:
    import lightning as L

    from zoo.methods import KD

    torch.manual_seed(0)
    method = KD(
        tiny(),
        tiny().eval().requires_grad_(False),
        temperature=T,
        ce_weight=W_CE,
        kd_weight=W_KD,
        num_classes=100,
        in_chans=3,
        optimizer=sgd,
    )
    ends: list[float] = []

    class Clock(L.Callback):
        def on_train_batch_end(self, *args) -> None:
            ends.append(time.perf_counter())

    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        callbacks=[Clock()],
    )
    batches = _Repeat(batch, None) if isinstance(batch, dict) else _Repeat(*batch)
    trainer.fit(method, train_dataloaders=torch.utils.data.DataLoader(batches, batch_size=None))
    return 1000 * statistics.median(b - a for a, b in zip(ends[SKIP:], ends[SKIP + 1 :]))


def metric_ms(rounds: int) -> dict[str, list[float]]:
    """ms per call of the training accuracy's forward() and update() on (8, 100) logits, ``rounds`` timeit rounds."""
    import timeit

    from torchmetrics import MetricCollection
    from torchmetrics.classification import MulticlassAccuracy

    metric = MetricCollection({"acc": MulticlassAccuracy(100, average="micro")}, prefix="train/")
    g = torch.Generator().manual_seed(0)
    z, y = torch.randn(8, 100, generator=g), torch.randint(0, 100, (8,), generator=g)
    out: dict[str, list[float]] = {"forward": [], "update": []}
    for _ in range(rounds):
        out["forward"].append(1000 * min(timeit.repeat(lambda: metric(z, y), number=200, repeat=5)) / 200)
        out["update"].append(1000 * min(timeit.repeat(lambda: metric.update(z, y), number=200, repeat=5)) / 200)
    return out


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    rounds = parser.parse_args().rounds
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(8, 3, 32, 32, generator=g), torch.randint(0, 100, (8,), generator=g)
    with torch.no_grad():
        prob, index = teacher_top_k(tiny()(x), T, 10)
    cached = {"image": x, "label": y, "soft_index": index, "soft_prob": prob}
    variants = {
        "loop_ms": lambda: loop_ms(x, y),
        "zoo_online_ms": lambda: zoo_ms((x, y)),
        "zoo_cached_ms": lambda: zoo_ms(cached),
    }
    per_round: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(rounds):
        for key, run in variants.items():
            per_round[key].append(run())
    results: dict = {k: statistics.median(v) for k, v in per_round.items()}
    results["rounds"] = per_round

    profile = cProfile.Profile()
    profile.enable()
    zoo_ms((x, y))
    profile.disable()
    stats = pstats.Stats(profile).stats  # {(file, line, name): (cc, nc, tottime, cumtime, callers)}
    step = next(v for k, v in stats.items() if k[0].endswith("zoo/methods/base.py") and k[2] == "training_step")
    log = next(v for k, v in stats.items() if k[0].endswith("lightning/pytorch/core/module.py") and k[2] == "log")
    results["profiled_steps"] = step[1]
    results["self_log_calls_per_step"] = log[1] / step[1]
    results["self_log_ms_per_call_profiled"] = 1000 * log[3] / log[1]
    results["training_step_ms_profiled"] = 1000 * step[3] / step[1]
    metric = metric_ms(rounds)
    results["train_metric_forward_ms"] = statistics.median(metric["forward"])
    results["train_metric_update_ms"] = statistics.median(metric["update"])
    results["machine"] = f"{platform.processor() or platform.machine()} CPU, 1 thread"
    results["torch"] = torch.__version__
    results["command"] = "python benchmarks/step_overhead.py" + (f" --rounds {rounds}" if rounds != 5 else "")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "step_overhead.json").write_text(json.dumps(results, indent=2))
    intro = (
        f"Host cost of one KD step with next to no compute (a round's time is its median of {STEPS - SKIP} steps; "
        f"median and range over {rounds} interleaved rounds); machine: "
        f"{results['machine']}; torch {results['torch']}; command: `{results['command']}`."
    )
    profiled = (
        f"cProfile of the online zoo step: `training_step` {results['training_step_ms_profiled']:.2f} ms, of which "
        f"{results['self_log_calls_per_step']:.0f} `self.log` calls at "
        f"{results['self_log_ms_per_call_profiled']:.2f} ms "
        "each (profiled times are inflated by the profiler)."
    )
    table = "\n".join(
        [
            intro,
            "",
            "| variant | ms / step | range |",
            "|---|---|---|",
            *(
                f"| {label} | {results[key]:.2f} | {min(per_round[key]):.2f}–{max(per_round[key]):.2f} |"
                for key, label in [
                    ("loop_ms", "hand-written loop"),
                    ("zoo_online_ms", "zoo KD, online"),
                    ("zoo_cached_ms", "zoo KD, cached soft labels in the batch"),
                ]
            ),
            "",
            profiled,
            "",
            (
                f"Training accuracy per step (timeit, median of {rounds} rounds): `forward()` "
                f"{results['train_metric_forward_ms']:.3f} ms, `update()` {results['train_metric_update_ms']:.3f} ms."
            ),
        ]
    )
    (RESULTS / "step_overhead.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
