"""Host-side cost of one training step with next to no compute: the zoo's KD step (Lightning) vs a hand-written loop,
and the bound Lightning's own loop puts under any LightningModule.

Teacher and student are a 3→4 channel conv, a pooling and a linear layer (about 500 parameters), batch 8 of 3×32×32,
100 classes, one thread, so a step's time is its Python and dispatch cost: what a GPU step has to hide behind the
card's work. Each variant runs ``--rounds`` times, interleaved with the others (this machine's timings drift by tens of
per cent between runs, more when other jobs share its cores); a round's time is its median step, and the table gives
the median round and the range, of the wall time and of the thread's CPU time (``time.thread_time``: the host work
itself, which other jobs on the cores do not stretch; the fairer measure on a shared machine). Variants:

    loop             the hand-written KD loop (teacher under no_grad, student, CE + KD, zero_grad, backward, SGD step)
    zoo_online       ``zoo.methods.KD`` through the Lightning ``Trainer`` (logging on, logger off, no progress bar)
    zoo_cached       the same with the batch carrying stored top-10 probabilities, as a cached soft-label set yields
    lightning_same   a plain ``LightningModule`` doing the loop's math with no ``self.log`` and no metric: the floor
                     of any LightningModule step (Lightning's hooks, closure and optimizer wrapper around the math)
    lightning_noop   a ``LightningModule`` whose ``training_step`` returns None: Lightning's loop alone

Then a cProfile of the online zoo step gives its ``self.log`` calls per step (Lightning writes a training step's
values every ``log_every_n_steps`` = 50 steps, so the zoo logs on those steps and the last of an epoch or fit), and
``timeit`` the per-step pieces: the divergence check (one host read of the summed loss) and the training accuracy's
``update()`` against ``forward()``.

    python benchmarks/step_overhead.py [--rounds 7]     # about 2 min

Results: benchmarks/results/step_overhead.{json,md}.
"""

from __future__ import annotations

import cProfile
import json
import os
import platform
import pstats
import statistics
import sys
import time
import timeit
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
LABELS = {
    "loop_ms": "hand-written loop",
    "zoo_online_ms": "zoo KD, online",
    "zoo_cached_ms": "zoo KD, cached soft labels in the batch",
    "lightning_same_ms": "LightningModule, the loop's math, no logging (Lightning's floor)",
    "lightning_noop_ms": "LightningModule, training_step returns None (Lightning's loop alone)",
}


def tiny() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 100))


def sgd(params) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=5e-4)


def loop_ms(x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """Median wall and CPU ms of a hand-written step."""
    torch.manual_seed(0)
    teacher, student = tiny().eval().requires_grad_(False), tiny()
    opt, kd_loss, times, cpu = sgd(student.parameters()), KDLoss(T), [], []
    for _ in range(STEPS):
        start, start_cpu = time.perf_counter(), time.thread_time()
        with torch.no_grad():
            zt = teacher(x)
        zs = student(x)
        loss = W_CE * F.cross_entropy(zs, y) + W_KD * kd_loss(zs, zt)
        opt.zero_grad()
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - start)
        cpu.append(time.thread_time() - start_cpu)
    return 1000 * statistics.median(times[SKIP:]), 1000 * statistics.median(cpu[SKIP:])


def fit_ms(module, batch, steps: int = STEPS) -> tuple[float, float]:
    """Median wall and CPU ms between consecutive ``on_train_batch_end`` calls of ``steps`` Lightning steps."""
    import lightning as L

    ends: list[tuple[float, float]] = []

    class Clock(L.Callback):
        def on_train_batch_end(self, *args) -> None:
            ends.append((time.perf_counter(), time.thread_time()))

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
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(batches, batch_size=None))
    pairs = list(zip(ends[SKIP:], ends[SKIP + 1 :]))
    wall, cpu = (1000 * statistics.median(b[i] - a[i] for a, b in pairs) for i in (0, 1))
    return wall, cpu


def zoo_method():
    from zoo.methods import KD

    torch.manual_seed(0)
    return KD(
        tiny(),
        tiny().eval().requires_grad_(False),
        temperature=T,
        ce_weight=W_CE,
        kd_weight=W_KD,
        num_classes=100,
        in_chans=3,
        optimizer=sgd,
    )


def zoo_ms(batch, steps: int = STEPS) -> tuple[float, float]:
    return fit_ms(zoo_method(), batch, steps)


def plain_module(noop: bool):
    """The loop's math as a LightningModule (``noop``: a training_step that returns None, so no backward or step)."""
    import lightning as L

    class Plain(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.teacher, self.student, self.kd_loss = tiny().eval().requires_grad_(False), tiny(), KDLoss(T)

        def training_step(self, batch, batch_idx):
            if noop:
                return None
            x, y = batch
            with torch.no_grad():
                zt = self.teacher(x)
            zs = self.student(x)
            return W_CE * F.cross_entropy(zs, y) + W_KD * self.kd_loss(zs, zt)

        def configure_optimizers(self):
            return sgd(self.student.parameters())

    return Plain()


def pieces_us(x: torch.Tensor, y: torch.Tensor, rounds: int) -> dict[str, float]:
    """µs per call (best of 5 × 500, median over ``rounds``) of the step's host pieces."""
    from torchmetrics import MetricCollection
    from torchmetrics.classification import MulticlassAccuracy

    from zoo.divergence import check_finite_terms

    z = tiny()(x).detach()
    terms = {"ce": F.cross_entropy(z, y), "kd": KDLoss(T)(z, z.flip(0))}
    total = torch.stack(list(terms.values())).sum()
    checked = MetricCollection({"acc": MulticlassAccuracy(100, average="micro")}, prefix="train/")
    unchecked = MetricCollection({"acc": MulticlassAccuracy(100, average="micro", validate_args=False)}, prefix="t/")
    calls = {
        "divergence_check_us": lambda: check_finite_terms(terms, total, 0),
        "train_metric_forward_us": lambda: checked(z, y),
        "train_metric_update_us": lambda: checked.update(z, y),
        "train_metric_update_unchecked_us": lambda: unchecked.update(z, y),
    }
    out: dict[str, list[float]] = {k: [] for k in calls}
    for _ in range(rounds):
        for key, call in calls.items():
            out[key].append(1e6 * min(timeit.repeat(call, number=500, repeat=5)) / 500)
    return {k: statistics.median(v) for k, v in out.items()}


def profile_zoo(batch) -> dict[str, float]:
    """cProfile of 400 online zoo steps: ``self.log`` calls per step, and profiled ms of the step and of the logs."""
    profile = cProfile.Profile()
    profile.enable()
    zoo_ms(batch)
    profile.disable()
    stats = pstats.Stats(profile).stats  # {(file, line, name): (cc, nc, tottime, cumtime, callers)}
    step = next(v for k, v in stats.items() if k[0].endswith("methods/classification.py") and k[2] == "training_step")
    log = next(v for k, v in stats.items() if k[0].endswith("lightning/pytorch/core/module.py") and k[2] == "log")
    return {
        "profiled_steps": step[1],
        "self_log_calls_per_step": log[1] / step[1],
        "self_log_ms_per_call_profiled": 1000 * log[3] / log[1],
        "self_log_ms_per_step_profiled": 1000 * log[3] / step[1],
        "training_step_ms_profiled": 1000 * step[3] / step[1],
    }


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=7)
    rounds = parser.parse_args().rounds
    torch.set_num_threads(1)
    load_before = os.getloadavg()
    began = time.time()
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(8, 3, 32, 32, generator=g), torch.randint(0, 100, (8,), generator=g)
    with torch.no_grad():
        prob, index = teacher_top_k(tiny()(x), T, 10)
    cached = {"image": x, "label": y, "soft_index": index, "soft_prob": prob}
    variants = {
        "loop_ms": lambda: loop_ms(x, y),
        "zoo_online_ms": lambda: zoo_ms((x, y)),
        "zoo_cached_ms": lambda: zoo_ms(cached),
        "lightning_same_ms": lambda: fit_ms(plain_module(noop=False), (x, y)),
        "lightning_noop_ms": lambda: fit_ms(plain_module(noop=True), (x, y)),
    }
    per_round: dict[str, list[float]] = {k: [] for k in variants}
    per_round_cpu: dict[str, list[float]] = {k: [] for k in variants}
    for r in range(rounds):
        for key, run in variants.items():
            wall, cpu = run()
            per_round[key].append(wall)
            per_round_cpu[key].append(cpu)
        print(f"round {r + 1}/{rounds} (wall / CPU ms): "
              + ", ".join(f"{k} {v[-1]:.3f} / {per_round_cpu[k][-1]:.3f}" for k, v in per_round.items()), flush=True)
    results: dict = {k: statistics.median(v) for k, v in per_round.items()}
    results["cpu"] = {k: statistics.median(v) for k, v in per_round_cpu.items()}
    results["rounds"], results["rounds_cpu"] = per_round, per_round_cpu

    def ratios(table: dict[str, list[float]]) -> dict[str, dict[str, float]]:
        """Per-round ratios (the two ran back to back in a round): median and range."""
        ratio = lambda a, b: [p / q for p, q in zip(table[a], table[b])]
        return {
            name: {"median": statistics.median(v), "min": min(v), "max": max(v)}
            for name, v in {
                "zoo_online / loop": ratio("zoo_online_ms", "loop_ms"),
                "zoo_cached / loop": ratio("zoo_cached_ms", "loop_ms"),
                "lightning_same / loop": ratio("lightning_same_ms", "loop_ms"),
                "zoo_online / lightning_same": ratio("zoo_online_ms", "lightning_same_ms"),
            }.items()
        }

    results["ratios"], results["ratios_cpu"] = ratios(per_round), ratios(per_round_cpu)
    results.update(profile_zoo((x, y)))
    results.update(pieces_us(x, y, rounds))
    results["machine"] = f"{platform.processor() or platform.machine()} CPU ({os.cpu_count()} cores), 1 thread"
    results["load_average"] = {"before": [round(v, 2) for v in load_before],
                               "after": [round(v, 2) for v in os.getloadavg()]}
    results["minutes"] = round((time.time() - began) / 60, 1)
    results["torch"] = torch.__version__
    results["command"] = "OMP_NUM_THREADS=1 python benchmarks/step_overhead.py" + (
        f" --rounds {rounds}" if rounds != 7 else ""
    )
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "step_overhead.json").write_text(json.dumps(results, indent=2) + "\n")
    table = render(results, rounds)
    (RESULTS / "step_overhead.md").write_text(table + "\n")
    print(table)


def render(results: dict, rounds: int) -> str:
    r, c = results, results["cpu"]
    load = r["load_average"]
    intro = (
        f"Host cost of one KD step with next to no compute (a round's time is its median of {STEPS - SKIP} steps; "
        f"median and range over {rounds} interleaved rounds, of the wall time and of the thread's CPU time); machine: "
        f"{r['machine']}, 1-minute load average {load['before'][0]:.1f} before and {load['after'][0]:.1f} after the "
        f"run (other jobs shared the cores); torch {r['torch']}; command: `{r['command']}` ({r['minutes']} min)."
    )

    def span(table: dict[str, list[float]], key: str) -> str:
        return f"{min(table[key]):.2f}–{max(table[key]):.2f}"

    rows = [
        f"| {label} | {r[key]:.2f} ({span(r['rounds'], key)}) | {r[key] / r['loop_ms']:.2f} | "
        f"{c[key]:.2f} ({span(r['rounds_cpu'], key)}) | {c[key] / c['loop_ms']:.2f} |"
        for key, label in LABELS.items()
    ]

    def per_round(q: dict) -> str:
        z, b = q["zoo_online / loop"], q["lightning_same / loop"]
        return (
            f"zoo online ÷ hand loop {z['median']:.2f} [{z['min']:.2f}, {z['max']:.2f}], zoo cached ÷ hand loop "
            f"{q['zoo_cached / loop']['median']:.2f}, Lightning's floor ÷ hand loop {b['median']:.2f} "
            f"[{b['min']:.2f}, {b['max']:.2f}], zoo online ÷ Lightning's floor "
            f"{q['zoo_online / lightning_same']['median']:.2f}"
        )

    return "\n".join(
        [
            intro,
            "",
            "| variant | wall ms / step (range) | ÷ hand loop | CPU ms / step (range) | ÷ hand loop |",
            "|---|---|---|---|---|",
            *rows,
            "",
            f"Per-round ratios, median [min, max]. Wall time: {per_round(r['ratios'])}. CPU time: "
            f"{per_round(r['ratios_cpu'])}. A LightningModule doing nothing but the loop's math costs the floor's "
            f"ratio: Lightning's hooks, closure and optimizer wrapper ({c['lightning_same_ms'] - c['loop_ms']:.2f} ms "
            "of CPU a step here) bound any Lightning step on this machine.",
            "",
            f"cProfile of the online zoo step: `training_step` {r['training_step_ms_profiled']:.2f} ms, with "
            f"{r['self_log_calls_per_step']:.2f} `self.log` calls per step "
            f"({r['self_log_ms_per_call_profiled']:.2f} ms each; profiled times are inflated by the profiler). The "
            "loss terms are logged on the steps whose values Lightning keeps (every `log_every_n_steps`-th, the "
            "last of an epoch or of the fit) and the training accuracy's metric object once an epoch.",
            "",
            f"Per-step host pieces (timeit, median of {rounds} rounds): divergence check (one host read of the "
            f"summed loss) {r['divergence_check_us']:.1f} µs; training accuracy `forward()` "
            f"{r['train_metric_forward_us']:.1f} µs, `update()` {r['train_metric_update_us']:.1f} µs, `update()` "
            f"without argument checks (what the zoo runs) {r['train_metric_update_unchecked_us']:.1f} µs.",
        ]
    )


if __name__ == "__main__":
    main()
