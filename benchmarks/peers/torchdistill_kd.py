"""Peer baseline: one Hinton-KD training step through torchdistill's own ``DistillationBox``.

Builds torchdistill's single-stage ``DistillationBox`` (via ``torchdistill.core.distillation.get_distillation_box``)
around already-built teacher/student models, with the loss taken from torchdistill's loss registry
(``WeightedSumLoss`` wrapping the mid-level ``KDLoss``) and the optimizer built by torchdistill's optimizer registry
(``SGD``). The returned callable runs exactly one iteration of the body of ``train_one_epoch`` in torchdistill's
``examples/torchvision/image_classification.py``::

    loss = box.forward_process(sample_batch, targets, supp_dict)
    box.post_forward_process(loss=loss)

The box's ``train_data_loader`` (a ``TensorDataset`` holding the one in-memory batch) is built but *bypassed*: each
call reuses the stored batch tensors, as the zoo's Lightning variant iterates over one in-memory batch, so per-step
timings exclude DataLoader overhead.

Loss convention: torchdistill's ``KDLoss`` is ``alpha * CE + beta * T^2 * KL(p_t^T || p_s^T)`` with
``beta = 1 - alpha`` by default, i.e. its ``alpha`` weights the *hard* (CE) term, the opposite of the zoo's
``(1 - alpha) * CE + alpha * T^2 * KL``. The KL is ``nn.KLDivLoss(reduction='batchmean')`` on
``log_softmax(s / T)`` vs ``softmax(t / T)``; CE uses ``reduction='mean'``. To get the zoo's loss we pass
torchdistill ``alpha = 1 - alpha`` and ``beta = alpha`` explicitly (checked numerically in the self-check below).

torchdistill never puts the teacher in eval mode (its default pre-epoch process only calls ``student.train()``), so
the teacher is set to eval mode here after the box is built; it is frozen by torchdistill (``requires_grad: False``)
and run under ``torch.no_grad()`` by the box.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.utils.data import SequentialSampler, TensorDataset
from torchdistill.core.distillation import DistillationBox, get_distillation_box


def build_torchdistill_kd_config(
    batch_size: int, temperature: float, alpha: float, lr: float, momentum: float, weight_decay: float
) -> dict:
    """torchdistill ``train_config`` for single-stage Hinton KD (no wrappers, no hooks, no scheduler)."""
    return {
        "num_epochs": 1,
        "train_data_loader": {
            "dataset_id": "train",
            "sampler": {"class_or_func": SequentialSampler, "kwargs": {}},
            "kwargs": {"batch_size": batch_size, "num_workers": 0},
        },
        # no 'wrapper' -> no DP/DDP; 1.1.5 has no default forward_proc (older versions fell back to forward_batch_only)
        "teacher": {
            "forward_proc": "forward_batch_only",
            "sequential": [],
            "requires_grad": False,
            "frozen_modules": [],
        },
        "student": {
            "forward_proc": "forward_batch_only",
            "sequential": [],
            "requires_grad": True,
            "frozen_modules": [],
        },
        "optimizer": {"key": "SGD", "kwargs": {"lr": lr, "momentum": momentum, "weight_decay": weight_decay}},
        "criterion": {
            "key": "WeightedSumLoss",
            "kwargs": {
                "sub_terms": {
                    "kd": {
                        "criterion": {
                            "key": "KDLoss",
                            "kwargs": {
                                "student_module_path": ".",
                                "student_module_io": "output",
                                "teacher_module_path": ".",
                                "teacher_module_io": "output",
                                # torchdistill's alpha weights CE, beta weights T^2 * KL:
                                # zoo's (1 - alpha) * CE + alpha * T^2 * KL
                                "temperature": temperature,
                                "alpha": 1.0 - alpha,
                                "beta": alpha,
                                "reduction": "batchmean",
                            },
                        },
                        "weight": 1.0,
                    }
                }
            },
        },
    }


def build_torchdistill_kd_step(
    teacher: nn.Module,
    student: nn.Module,
    images: Tensor,
    targets: Tensor,
    *,
    temperature: float = 4.0,
    alpha: float = 0.9,
    lr: float = 0.05,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    device: str = "cpu",
) -> Callable[[], None]:
    """Return a callable doing one torchdistill KD iteration (forward_process + post_forward_process) on one batch.

    The box is available as ``step.box`` (e.g. for ``step.box.optimizer`` or ``step.box.criterion``).
    """
    logging.getLogger("torchdistill").setLevel(logging.WARNING)  # torchdistill's loggers are children of this one
    dev = torch.device(device)
    images, targets = images.to(dev), targets.to(dev)
    config = build_torchdistill_kd_config(len(images), temperature, alpha, lr, momentum, weight_decay)
    box = get_distillation_box(
        teacher,
        student,
        {"train": TensorDataset(images, targets)},
        config,
        device=dev,
        device_ids=None,
        distributed=False,
        lr_factor=1,
    )
    assert type(box) is DistillationBox and box.teacher_model is teacher and box.student_model is student
    box.pre_epoch_process(epoch=0)  # clears io dicts, student.train()
    box.teacher_model.eval()  # not done by torchdistill itself
    supp_dict: dict = {}

    def step() -> None:
        # Data loader bypassed on purpose: same in-memory batch every call (see module docstring).
        loss = box.forward_process(images, targets, supp_dict)
        box.post_forward_process(loss=loss)

    step.box = box  # type: ignore[attr-defined]
    return step


if __name__ == "__main__":
    import torch.nn.functional as F

    from zoo.models.cifar.resnet import resnet8x4, resnet32x4

    torch.manual_seed(0)
    T, ALPHA = 4.0, 0.9
    teacher, student = resnet32x4(num_classes=100), resnet8x4(num_classes=100)
    x, y = torch.randn(64, 3, 32, 32), torch.randint(0, 100, (64,))
    step = build_torchdistill_kd_step(teacher, student, x, y, temperature=T, alpha=ALPHA)
    box = step.box
    assert not teacher.training and student.training
    assert not any(p.requires_grad for p in teacher.parameters())
    assert sum(p.numel() for g in box.optimizer.param_groups for p in g["params"]) == sum(
        p.numel() for p in student.parameters()
    )
    print(
        "optimizer:",
        type(box.optimizer).__name__,
        {k: box.optimizer.defaults[k] for k in ("lr", "momentum", "weight_decay")},
    )
    print("criterion:", box.criterion)

    s0 = [p.detach().clone() for p in student.parameters()]
    t0 = [t.detach().clone() for t in teacher.state_dict().values()]
    for _ in range(3):
        step()
    s_changed = sum(not torch.equal(a, b) for a, b in zip(s0, student.parameters()))
    t_same = all(torch.equal(a, b) for a, b in zip(t0, teacher.state_dict().values()))
    print(f"(a) student params changed: {s_changed}/{len(s0)} tensors")
    print(f"(b) teacher state (params + BN buffers) unchanged: {t_same}")
    assert s_changed == len(s0) and t_same

    # (c) torchdistill's full loss path on one batch vs the zoo's formula on the same logits.
    td_loss = box.forward_process(x, y, {}).detach()
    box.optimizer.zero_grad()
    with torch.no_grad():
        s, t = student(x), teacher(x)  # student in train mode: BN uses batch stats, so logits are reproducible
        ce = F.cross_entropy(s, y)
        kl = F.kl_div(F.log_softmax(s / T, dim=1), F.log_softmax(t / T, dim=1), reduction="batchmean", log_target=True)
        zoo_loss = (1 - ALPHA) * ce + ALPHA * T**2 * kl
    print(f"(c) torchdistill KD loss = {td_loss.item():.6f}, zoo formula = {zoo_loss.item():.6f}")
    assert torch.allclose(td_loss, zoo_loss, rtol=1e-5, atol=1e-6)
    print("self-check passed")
