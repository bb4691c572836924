"""Does the order of the teacher and student forwards matter? One KD step, teacher first vs student first.

resnet32x4 → resnet8x4, CIFAR-shaped batch of 64, SGD; the same math in both orders, interleaved over rounds
(5 timed steps after 2 warm-up steps each, a fresh student copy per round). Teacher first frees the teacher's
activations before the student's graph (and its saved activations) exists, which lowers peak memory and, on a
CPU, the allocator's page-fault work. The zoo's base training step runs the teacher first because of this.

    python benchmarks/teacher_order.py [--rounds 4]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from zoo.losses import KDLoss
from zoo.models.cifar.resnet import resnet8x4, resnet32x4


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()
    torch.manual_seed(0)
    student0 = resnet8x4(num_classes=100)
    teacher = resnet32x4(num_classes=100).eval().requires_grad_(False)
    x, y = torch.randn(64, 3, 32, 32), torch.randint(0, 100, (64,))
    kd = KDLoss(4.0)

    def make(order: str):
        student = copy.deepcopy(student0)
        opt = torch.optim.SGD(student.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)

        def step() -> None:
            if order == "teacher_first":
                with torch.no_grad():
                    t_logits = teacher(x)
                s_logits = student(x)
            else:
                s_logits = student(x)
                with torch.no_grad():
                    t_logits = teacher(x)
            loss = 0.1 * F.cross_entropy(s_logits, y) + 0.9 * kd(s_logits, t_logits)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        return step

    results: dict[str, list[float]] = {"teacher_first": [], "student_first": []}
    for r in range(args.rounds):
        for order, values in results.items():
            step = make(order)
            step(), step()
            start = time.perf_counter()
            for _ in range(5):
                step()
            values.append(64 * 5 / (time.perf_counter() - start))
        print(r, {k: round(v[-1], 1) for k, v in results.items()}, flush=True)
    med = {k: statistics.median(v) for k, v in results.items()}
    print(f"images/s (median of {args.rounds} rounds): teacher first {med['teacher_first']:.1f}, student first "
          f"{med['student_first']:.1f}, ratio {med['teacher_first'] / med['student_first']:.3f}")


if __name__ == "__main__":
    main()
