"""Trajectory matching: MTT, DATM and AST as LightningModules whose learnable thing is a synthetic set.

One ``training_step`` is one outer iteration (the real loader's batch is ignored; ``trainer.max_steps`` is the number
of iterations). The synthetic images S, the learnable inner learning rate α and, for DATM, the label logits ℓ are
parameters of one SGD optimizer with a parameter group each (lr_img / lr_lr / lr_y), stepped by hand. Every random
draw of an iteration (expert, start epoch, synthetic batches, DSA parameters, AST's perturbation) comes from the
module's own generator (``seed``), whose state a checkpoint carries next to S, α, ℓ and their momentum: a run resumed
from a checkpoint (``zoo fit ... --ckpt_path``) continues exactly as the uninterrupted run (on CPU, with
``trainer.deterministic: true``). The network is only an architecture: its
forward runs with ``torch.func.functional_call`` on a flat parameter vector (``zoo.dataset_distillation.functional``),
starting from an expert's checkpoint τ[s] of the buffer written by ``ExpertTraining``.

Matching loss (MTT, Cazenavette et al., CVPR'22, ``distill.py``):

    w₀ = τ[s],  w_{n+1} = w_n − α ∇_w ℓ(f_{w_n}(DSA(S_b)), y_b)   (n < N, create_graph)
    L = ‖w_N − τ[s+M]‖² / ‖τ[s] − τ[s+M]‖²

backpropagated through the N unrolled steps into S and α (``gradient="unrolled"``, exact), or with TESLA's
recomputation (``gradient="tesla"``, Cui et al., ICML'23), which keeps one step in memory. TESLA drops the terms
through ∂w_i/∂S_j (j < i) that the unrolled gradient keeps: with N = 1 the two are equal; for N > 1 TESLA is a
first-order approximation (``tests/dataset_distillation`` measures the difference).
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn

from zoo.dataset_distillation.augment import DSA_STRATEGY, DiffAugment
from zoo.dataset_distillation.buffer import Trajectory, TrajectoryBuffer
from zoo.dataset_distillation.distilled import save_distilled
from zoo.dataset_distillation.evaluate import evaluate_synthetic, soft_cross_entropy
from zoo.dataset_distillation.functional import (
    ParamLayout,
    check_functional,
    functional_forward,
)
from zoo.models.sources import ModelSource, build_model

__all__ = ["AST", "DATM", "MTT", "TrajectoryMatching"]

_STATE_KEY = "trajectory_matching"  # the checkpoint entry of on_save_checkpoint


def _collect(dataset: Any, batch_size: int = 512) -> tuple[Tensor, Tensor]:
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False)
    xs, ys = zip(*[(x, y) for x, y in loader])
    return torch.cat(xs), torch.cat(ys)


class TrajectoryMatching(L.LightningModule):
    """MTT's outer loop with the options DATM and AST add; :class:`MTT`, :class:`DATM` and :class:`AST` set defaults.

    Args:
        network: the architecture the experts were trained with (e.g. ``zoo.models.ConvNetModel``); no BatchNorm.
        buffer_dir: the experts' folder (``ExpertTraining.buffer_dir``).
        num_classes, in_chans: linked from the data module by the CLI.
        ipc: synthetic images per class.
        syn_steps: N, inner SGD steps on the synthetic set.
        expert_epochs: M, expert epochs matched.
        max_start_epoch: T⁺; start epochs s are drawn from [min_start_epoch, T⁺) (upper bound exclusive, as the code).
        min_start_epoch: lower end of the start window (DATM).
        lr_img, lr_lr: learning rates of the images and of α (SGD, momentum ``img_momentum``).
        lr_teacher: α's initial value (the experts' lr).
        img_momentum: momentum of the image and α updates (0.5).
        batch_syn: synthetic mini-batch per inner step (``None``: all of S); fresh permutations are cycled.
        dsa_strategy: DSA families used on every inner batch and in evaluation (fresh parameters every call).
        pix_init: ``real`` (random real images of each class), ``noise``, ``correct`` (DATM: real images the
            experts classify correctly) or ``kmeans`` (AST: the image nearest each of IPC k-means centres of an
            expert's logits).
        min_syn_lr: floor on α after each step (``None``: never clamped, as the official code).
        gradient: ``unrolled`` (exact) or ``tesla`` (constant memory; plain inner SGD only).
        soft_labels: learn label logits (DATM), initialised from the experts' logits.
        lr_y: learning rate of the label logits (SGD, momentum 0.9).
        loss_threshold: skip the update when L exceeds it (DATM); ``None`` never skips.
        sequential_generation: widen the start window over time (DATM): U = min(T⁺, cur + ⌊(T⁺ − cur)·it/E⌋).
        current_max_start_epoch, expansion_end_iteration: cur and E of sequential generation.
        inner_momentum: momentum of the inner SGD (AST 0.9; MTT/DATM 0).
        balance_loss: AST's start-epoch dependent scaling of the inner CE.
        intermediate_matching: AST's extra terms at inner steps k·⌊N/M⌋ against τ[s+k] (weight 1, or k/M with
            ``adaptive_intermediate``).
        weight_perturbation: AST's relative perturbation of the start point's conv weights (α_p; 0 = off).
        eval_every: evaluate every this many iterations (and at the end); 0 = only at the end.
        eval_nets, eval_epochs, eval_batch_size: the evaluation protocol (5 nets × 300 epochs on digits; the spec
            recommends 1000 epochs for CIFAR).
        eval_lr_factor: evaluation networks train at ``eval_lr_factor × α`` (1, the official codes). The protocol
            trains them with momentum 0.9; an α learned with plain inner SGD (MTT, DATM) then takes steps ~10× as
            large in evaluation, while an α learned with AST's inner momentum 0.9 already includes the momentum
            gain and is ~10× smaller, so its evaluation is colder. ``1 / (1 − inner_momentum)`` puts an AST set on
            MTT's footing (docs/faithfulness.md#dataset-distillation).
        output: path of the distilled-set artifact (default: ``<log_dir>/distilled.safetensors``).
        seed: seeds the module's generator, the source of every random draw of the iteration (experts, start
            epochs, synthetic batches, one DSA seed per inner step, AST's perturbation); checkpoints carry its state.
    """

    def __init__(
        self,
        network: ModelSource,
        buffer_dir: str,
        num_classes: int | None = None,
        in_chans: int | None = None,
        *,
        ipc: int = 1,
        syn_steps: int = 20,
        expert_epochs: int = 2,
        max_start_epoch: int = 8,
        min_start_epoch: int = 0,
        lr_img: float = 100.0,
        lr_lr: float = 1e-5,
        lr_teacher: float = 0.01,
        img_momentum: float = 0.5,
        batch_syn: int | None = None,
        dsa_strategy: str = DSA_STRATEGY,
        pix_init: Literal["real", "noise", "correct", "kmeans"] = "real",
        min_syn_lr: float | None = None,
        gradient: Literal["unrolled", "tesla"] = "unrolled",
        soft_labels: bool = False,
        lr_y: float = 2.0,
        loss_threshold: float | None = None,
        sequential_generation: bool = False,
        current_max_start_epoch: int | None = None,
        expansion_end_iteration: int = 1000,
        inner_momentum: float = 0.0,
        balance_loss: bool = False,
        intermediate_matching: bool = False,
        adaptive_intermediate: bool = False,
        weight_perturbation: float = 0.0,
        eval_every: int = 0,
        eval_nets: int = 5,
        eval_epochs: int = 300,
        eval_batch_size: int = 256,
        eval_lr_factor: float = 1.0,
        output: str | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if isinstance(network, ModelSource):
            self.hparams["network"] = network.to_config()
        if eval_lr_factor <= 0:
            raise ValueError(f"{type(self).__name__}.eval_lr_factor must be > 0, got {eval_lr_factor}")
        if not 0 <= min_start_epoch < max_start_epoch:
            raise ValueError(
                f"{type(self).__name__}: need 0 ≤ min_start_epoch < max_start_epoch, got {min_start_epoch}, "
                f"{max_start_epoch}"
            )
        if gradient not in ("unrolled", "tesla"):
            raise ValueError(f"{type(self).__name__}.gradient must be 'unrolled' or 'tesla', got {gradient!r}")
        if gradient == "tesla" and (inner_momentum or intermediate_matching):
            raise ValueError(
                f"{type(self).__name__}: gradient='tesla' needs plain inner SGD (no inner_momentum, no "
                "intermediate_matching): its closed form θ_N = θ₀ − αΣg holds only then"
            )
        if pix_init not in ("real", "noise", "correct", "kmeans"):
            raise ValueError(f"{type(self).__name__}.pix_init: unknown {pix_init!r}")
        self.automatic_optimization = False
        self.source = network
        self.buffer_dir = buffer_dir
        self.num_classes = num_classes or 10
        net = build_model(network, num_classes=self.num_classes, in_chans=in_chans)
        check_functional(net)
        self._net = [net]  # an architecture only: never trained, never in the state dict or the optimizer
        self.layout = ParamLayout.from_module(net)
        self.dsa = DiffAugment(dsa_strategy) if dsa_strategy else None
        self.syn_lr = nn.Parameter(torch.tensor(float(lr_teacher)))
        self.images = nn.Parameter(torch.empty(0))  # shaped and filled in setup (from the real data)
        self.label_logits = nn.Parameter(torch.empty(0)) if soft_labels else None
        self.register_buffer("hard_labels", torch.empty(0, dtype=torch.long))
        self._generator = torch.Generator().manual_seed(seed)
        self._buffer: TrajectoryBuffer | None = None
        self._cache: dict[int, Trajectory] = {}
        self.zca = None
        self.last_eval: dict[str, float] = {}

    # ------------------------------------------------------------------------------------------- setup
    @property
    def net(self) -> nn.Module:
        return self._net[0]

    def setup(self, stage: str) -> None:
        if stage != "fit" or self.images.numel():
            return
        datamodule = self.trainer.datamodule
        self._buffer = TrajectoryBuffer(self.buffer_dir)
        self._buffer.check(
            self.layout,
            dataset=getattr(datamodule, "name", None),
            dsa_strategy=self.hparams.dsa_strategy,
            mean=getattr(datamodule, "mean", None),
            std=getattr(datamodule, "std", None),
        )
        dropped = [h.path.name for h in self._buffer.headers if h.metadata.get("drop_last") is not False]
        if dropped:
            rank_zero_warn(
                f"{type(self).__name__}: {len(dropped)} of the {len(self._buffer)} experts in {self.buffer_dir} (e.g. "
                f"{dropped[0]}) were trained dropping each epoch's last partial batch, or do not record it; the "
                "official buffer.py keeps it (retrain them with data.init_args.drop_last: false to match)"
            )
        needed = self.hparams.max_start_epoch - 1 + self.hparams.expert_epochs
        if self._buffer.num_epochs < needed:
            raise ValueError(
                f"{type(self).__name__}: the experts in {self.buffer_dir} have {self._buffer.num_epochs} epochs, but "
                f"max_start_epoch {self.hparams.max_start_epoch} and expert_epochs {self.hparams.expert_epochs} need "
                f"{needed}"
            )
        self.zca = self._buffer.zca()
        images, labels = self.real_train()
        self._initialise(images, labels)

    def real_train(self) -> tuple[Tensor, Tensor]:
        """The real training images (ZCA-whitened when the experts were) and labels."""
        images, labels = _collect(self.trainer.datamodule.train_set)
        if self.zca is not None:
            with torch.no_grad():
                images = self.zca(images)
        return images, labels

    def real_test_batches(self) -> list[tuple[Tensor, Tensor]]:
        dm = self.trainer.datamodule
        dataset = dm.test_set if dm.test_set is not None else dm.val_set
        images, labels = _collect(dataset)
        if self.zca is not None:
            with torch.no_grad():
                images = self.zca(images)
        return [(images[i : i + 512], labels[i : i + 512]) for i in range(0, len(images), 512)]

    def _expert_logits(self, trajectory: Trajectory, images: Tensor, epoch: int = -1) -> Tensor:
        flat = trajectory.params[epoch]
        with torch.no_grad():
            return torch.cat(
                [
                    functional_forward(self.net, self.layout, flat, images[i : i + 512])
                    for i in range(0, len(images), 512)
                ]
            )

    def _initialise(self, images: Tensor, labels: Tensor) -> None:
        ipc, init = self.hparams.ipc, self.hparams.pix_init
        g = self._generator
        chosen = []
        for c in range(self.num_classes):
            idx = (labels == c).nonzero().flatten()
            if len(idx) < ipc:
                raise ValueError(f"{type(self).__name__}.ipc={ipc}: class {c} has only {len(idx)} training images")
            idx = idx[torch.randperm(len(idx), generator=g)]
            if init == "correct":
                idx = self._correctly_classified(images, idx, c, ipc)
            elif init == "kmeans":
                idx = self._kmeans_representatives(images, idx, ipc)
            chosen.append(idx[:ipc])
        chosen_idx = torch.cat(chosen)
        syn = images[chosen_idx].clone()
        if init == "noise":
            syn = torch.randn(syn.shape, generator=g)
        self.images = nn.Parameter(syn)
        self.hard_labels = torch.arange(self.num_classes).repeat_interleave(ipc)
        if self.label_logits is not None:
            self.label_logits = nn.Parameter(self._initial_label_logits(syn))

    def _correctly_classified(self, images: Tensor, idx: Tensor, c: int, ipc: int) -> Tensor:
        """DATM: the first ``ipc`` images (in random order) that expert 0's last checkpoint classifies as ``c``."""
        keep: list[int] = []
        for k in range(len(self._buffer)):
            preds = self._expert_logits(self._trajectory(k), images[idx]).argmax(-1)
            keep += [i for i in idx[preds == c].tolist() if i not in keep]
            if len(keep) >= ipc:
                break
        if len(keep) < ipc:  # no expert gets enough of them right: fill with the other images of the class
            keep += [i for i in idx.tolist() if i not in keep][: ipc - len(keep)]
        return torch.tensor(keep[:ipc], dtype=torch.long)

    def _kmeans_representatives(self, images: Tensor, idx: Tensor, ipc: int) -> Tensor:
        """AST (paper form): k-means with k = IPC on a random expert's last-checkpoint logits; nearest image per centre.

        The official code clusters into 10 groups and takes int(IPC/10) images of each, which selects nothing for
        IPC < 10; the paper's form is used instead.
        """
        from sklearn.cluster import KMeans

        expert = int(torch.randint(len(self._buffer), (1,), generator=self._generator))
        logits = self._expert_logits(self._trajectory(expert), images[idx]).double().numpy()
        km = KMeans(n_clusters=ipc, random_state=0, n_init=10).fit(logits)
        picks: list[int] = []
        for centre in km.cluster_centers_:
            order = ((logits - centre) ** 2).sum(1).argsort()
            picks.append(next(int(idx[j]) for j in order if int(idx[j]) not in picks))
        return torch.tensor(picks, dtype=torch.long)

    def _initial_label_logits(self, syn: Tensor) -> Tensor:
        """DATM: per image, the mean logits of the experts (last checkpoint) that classify it correctly when the
        images were chosen that way (``pix_init="correct"``), else expert 0's last-checkpoint logits, unfiltered
        (``DATM.py``'s ``pix_init == "real"`` branch)."""
        if self.hparams.pix_init != "correct":
            return self._expert_logits(self._trajectory(0), syn).float()
        total = torch.zeros(len(syn), self.num_classes)
        count = torch.zeros(len(syn), 1)
        fallback = None
        for k in range(len(self._buffer)):
            logits = self._expert_logits(self._trajectory(k), syn).float()
            fallback = logits if fallback is None else fallback
            ok = (logits.argmax(-1) == self.hard_labels).float().unsqueeze(1)
            total += logits * ok
            count += ok
        return torch.where(count > 0, total / count.clamp_min(1), fallback)

    def _trajectory(self, k: int) -> Trajectory:
        """Expert ``k`` with its snapshots read from the file on demand (a buffer never has to fit in RAM)."""
        if k not in self._cache:
            self._cache[k] = self._buffer.load(k, lazy=True)
        return self._cache[k]

    # ------------------------------------------------------------------------------------------- optimisation
    def configure_optimizers(self) -> torch.optim.Optimizer:
        hp = self.hparams
        groups = [
            {"params": [self.images], "lr": hp.lr_img, "momentum": hp.img_momentum},
            {"params": [self.syn_lr], "lr": hp.lr_lr, "momentum": hp.img_momentum},
        ]
        if self.label_logits is not None:
            groups.append({"params": [self.label_logits], "lr": hp.lr_y, "momentum": 0.9})
        return torch.optim.SGD(groups, lr=hp.lr_img)

    def on_fit_start(self) -> None:
        self.net.to(self.device)

    def labels(self) -> Tensor:
        return self.label_logits if self.label_logits is not None else self.hard_labels

    def start_window(self) -> tuple[int, int]:
        hp = self.hparams
        upper = hp.max_start_epoch
        if hp.sequential_generation:
            cur = hp.current_max_start_epoch if hp.current_max_start_epoch is not None else hp.max_start_epoch
            grown = cur + math.floor((hp.max_start_epoch - cur) * self.global_step / max(hp.expansion_end_iteration, 1))
            upper = min(hp.max_start_epoch, grown)
        return hp.min_start_epoch, max(upper, hp.min_start_epoch + 1)

    def inner_loss(self, logits: Tensor, target: Tensor, start: int) -> Tensor:
        loss = soft_cross_entropy(logits, target)
        if self.hparams.balance_loss:
            h = self.hparams.max_start_epoch // 2
            loss = loss * math.log(start - h + 8, 5) if start >= h else loss / math.log(h - start + 8, 5)
        return loss

    def _perturb(self, flat: Tensor) -> Tensor:
        """AST: W ← W + α_p·d⊙W for every 4-D weight, d ~ N(0, I) normalised to unit Frobenius norm."""
        parts = list(self.layout.unflatten(flat.clone()).items())
        out = []
        for _, p in parts:
            if p.dim() == 4:
                d = torch.randn(p.shape, generator=self._generator).to(p)
                p = p + self.hparams.weight_perturbation * (d / d.norm()) * p
            out.append(p.reshape(-1))
        return torch.cat(out)

    def _dsa_seeds(self, steps: int) -> list[int | None]:
        """One seed per inner step for its DSA parameters (drawn from the module's generator, so a checkpoint
        carries them; TESLA replays a step's augmentation from its seed)."""
        if self.dsa is None:
            return [None] * steps
        return torch.randint(2**62, (steps,), generator=self._generator).tolist()

    def augment(self, x: Tensor, seed: int | None) -> Tensor:
        """DSA on one inner batch, its parameters drawn from a CPU generator seeded with ``seed``: an inner step never
        waits for the GPU to read a draw back, and a CPU run and a GPU run draw the same parameters."""
        if self.dsa is None:
            return x
        return self.dsa(x, generator=torch.Generator().manual_seed(seed))

    def _batches(self, steps: int) -> list[Tensor]:
        n = len(self.images)
        size = self.hparams.batch_syn or n
        out: list[Tensor] = []
        while len(out) < steps:
            out.extend(torch.randperm(n, generator=self._generator).split(size))
        return [b.to(self.device) for b in out[:steps]]

    def sample_segment(self) -> tuple[Tensor, Tensor, int, Trajectory]:
        k = int(torch.randint(len(self._buffer), (1,), generator=self._generator))
        low, high = self.start_window()
        s = int(torch.randint(low, high, (1,), generator=self._generator))
        trajectory = self._trajectory(k)
        start = trajectory.params[s].to(self.device)
        target = trajectory.params[s + self.hparams.expert_epochs].to(self.device)
        return start, target, s, trajectory

    def normalised_distance(self, w: Tensor, start: Tensor, target: Tensor) -> Tensor:
        """‖w − τ[s+M]‖² / ‖τ[s] − τ[s+M]‖², in ``distill.py``'s float arithmetic (each sum of squares is an
        ``mse_loss(reduction="sum")`` divided by the number of parameters, then the ratio is taken), so that an
        iteration reproduces the official code's float32 results bit for bit (``benchmarks/peers/mtt_official.py``)."""
        n = self.layout.num_params
        return F.mse_loss(w, target, reduction="sum") / n / (F.mse_loss(start, target, reduction="sum") / n)

    def matching_loss(self, start: Tensor, target: Tensor, s: int, trajectory: Trajectory) -> Tensor:
        """The unrolled matching loss L (and AST's intermediate terms); differentiable w.r.t. S, α and ℓ."""
        hp = self.hparams
        w = start.clone().requires_grad_(True)
        labels = self.labels()
        velocity = None
        checkpoints = {}
        marks = {k * (hp.syn_steps // hp.expert_epochs): k for k in range(1, hp.expert_epochs)}
        batches = self._batches(hp.syn_steps)
        seeds = self._dsa_seeds(hp.syn_steps)
        for n, (b, seed) in enumerate(zip(batches, seeds), start=1):
            x = self.augment(self.images[b], seed)
            loss = self.inner_loss(functional_forward(self.net, self.layout, w, x), labels[b], s)
            g = torch.autograd.grad(loss, w, create_graph=True)[0]
            if hp.inner_momentum:
                velocity = g if velocity is None else hp.inner_momentum * velocity + g
                g = velocity
            w = w - self.syn_lr * g
            if hp.intermediate_matching and n in marks:
                checkpoints[marks[n]] = w
        total = self.normalised_distance(w, start, target)
        for k, wk in checkpoints.items():
            tk = trajectory.params[s + k].to(self.device)
            beta = k / hp.expert_epochs if hp.adaptive_intermediate else 1.0
            total = total + beta * ((wk - tk) ** 2).sum() / ((start - tk) ** 2).sum()
        return total

    def tesla_backward(self, start: Tensor, target: Tensor, s: int) -> Tensor:
        """TESLA: forward without a graph, then one recomputed step at a time; fills the gradients, returns L.

        With θ_N = θ₀ − αG and G = Σᵢ gᵢ, L = ‖θ_N − θ*‖²/D, so ∂L/∂gᵢ = −2α(θ_N − θ*)/D for every i: each step's
        gradient is recomputed at its stored wᵢ (with its stored augmentation seed) and ⟨∂L/∂gᵢ, gᵢ⟩ is
        backpropagated into S (and ℓ); ∂L/∂α = −2⟨θ_N − θ*, G⟩/D.
        """
        hp = self.hparams
        labels = self.labels()
        alpha = self.syn_lr.detach()
        steps = []
        w = start.clone()
        grad_sum = torch.zeros_like(start)
        batches = self._batches(hp.syn_steps)
        for b, seed in zip(batches, self._dsa_seeds(hp.syn_steps)):
            w_req = w.detach().requires_grad_(True)
            x = self.augment(self.images.detach()[b], seed)
            loss = self.inner_loss(functional_forward(self.net, self.layout, w_req, x), labels.detach()[b], s)
            g = torch.autograd.grad(loss, w_req)[0]
            steps.append((w.detach(), b, seed))
            grad_sum += g
            w = w - alpha * g
        denom = ((start - target) ** 2).sum()
        residual = w - target
        loss = (residual**2).sum() / denom
        upstream = -2 * alpha * residual / denom
        # only S (and ℓ) receive gradients: without `inputs`, every stored wᵢ would also get a .grad (N·P floats)
        learnable = [p for p in (self.images, self.label_logits) if p is not None and p.requires_grad]
        for w_i, b, seed in steps:
            w_req = w_i.requires_grad_(True)
            x = self.augment(self.images[b], seed)
            inner = self.inner_loss(functional_forward(self.net, self.layout, w_req, x), labels[b], s)
            g = torch.autograd.grad(inner, w_req, create_graph=True)[0]
            self.manual_backward((upstream * g).sum(), inputs=learnable)
        self.syn_lr.grad = (-2 * (residual * grad_sum).sum() / denom).reshape(self.syn_lr.shape)
        return loss.detach()

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        optimizer = self.optimizers()
        optimizer.zero_grad(set_to_none=True)
        start, target, s, trajectory = self.sample_segment()
        if self.hparams.weight_perturbation:
            start = self._perturb(start)
        if self.hparams.gradient == "tesla":
            loss = self.tesla_backward(start, target, s)
        else:
            loss = self.matching_loss(start, target, s, trajectory)
            self.manual_backward(loss)
        skipped = self.hparams.loss_threshold is not None and float(loss) > self.hparams.loss_threshold
        if skipped:
            optimizer.zero_grad(set_to_none=True)  # DATM: discard this iteration (a step with no gradients is a no-op)
        optimizer.step()
        if self.hparams.min_syn_lr is not None:
            with torch.no_grad():
                self.syn_lr.clamp_(min=self.hparams.min_syn_lr)
        self.log("train/matching_loss", loss.detach(), prog_bar=True)
        self.log("train/syn_lr", self.syn_lr.detach())
        self.log("train/start_epoch", float(s))
        self.log("train/skipped", float(skipped))
        return loss.detach()

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Adds the generator's state (and the evaluation history) to the checkpoint, so a resume is exact."""
        checkpoint[_STATE_KEY] = {"generator": self._generator.get_state(), "last_eval": dict(self.last_eval)}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get(_STATE_KEY)
        if state is None:
            rank_zero_warn(
                f"{type(self).__name__}: the checkpoint has no generator state (written before checkpoints carried "
                f"it); the resumed run draws its experts, start epochs, batches and DSA afresh from seed "
                f"{self.hparams.seed}, so it will not equal an uninterrupted run"
            )
            return
        self._generator.set_state(state["generator"])
        self.last_eval = dict(state.get("last_eval", {}))

    def describe(self) -> dict[str, str]:
        """Names for the fit summary: the synthetic set takes the student's place."""
        ipc = self.hparams.ipc
        return {"method": type(self).__name__, "student": f"synthetic set, {ipc} image(s) per class"}

    # ------------------------------------------------------------------------------------------- evaluation
    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        every = self.hparams.eval_every
        if every and self.global_step % every == 0 and self.global_step < (self.trainer.max_steps or -1):
            self.evaluate()

    def on_train_end(self) -> None:
        self.evaluate(final=True)
        self.save(self.output_path())

    def build_eval_net(self) -> nn.Module:
        return build_model(self.source, num_classes=self.num_classes, in_chans=self.images.shape[1])

    def evaluate(self, final: bool = False) -> dict[str, float]:
        """Trains ``eval_nets`` fresh networks on the current set with the learned lr; logs their test accuracy."""
        hp = self.hparams
        began = time.perf_counter()
        result = evaluate_synthetic(
            self.build_eval_net,
            self.images.detach(),
            self.labels().detach(),
            float(self.syn_lr.detach()) * hp.eval_lr_factor,
            self.real_test_batches,
            num_nets=hp.eval_nets,
            seed=hp.seed + 1000,
            epochs=hp.eval_epochs,
            batch_size=hp.eval_batch_size,
            augment=self.dsa,
        )
        metrics = {"eval/acc_mean": result.mean, "eval/acc_std": result.std, "eval/syn_lr": float(self.syn_lr.detach())}
        best = max(self.last_eval.get("eval/best_over_checkpoints_mean", 0.0), result.mean)
        metrics["eval/best_over_checkpoints_mean"] = best
        seconds = time.perf_counter() - began + self.last_eval.get("seconds_total", 0.0)
        self.last_eval = {
            **metrics, "accuracies": result.accuracies, "iteration": self.global_step, "seconds_total": seconds
        }
        for logger in self.loggers:
            logger.log_metrics(metrics, step=self.global_step)
        self.log_grid()
        return metrics

    def log_grid(self) -> None:
        """Saves a PNG grid of the synthetic images (un-whitened) in the log folder; W&B also receives it."""
        import torchvision

        images = self.images.detach().cpu()
        if self.zca is not None:
            images = self.zca.inverse(images)
        lo, hi = images.amin(dim=(1, 2, 3), keepdim=True), images.amax(dim=(1, 2, 3), keepdim=True)
        images = (images - lo) / (hi - lo).clamp_min(1e-8)
        grid = torchvision.utils.make_grid(images, nrow=self.hparams.ipc if self.hparams.ipc > 1 else self.num_classes)
        folder = Path(self.trainer.log_dir or ".")
        folder.mkdir(parents=True, exist_ok=True)
        torchvision.utils.save_image(grid, folder / f"synthetic_{self.global_step:06d}.png")
        from lightning.pytorch.loggers import WandbLogger

        for logger in self.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_image("synthetic", [grid], step=self.global_step)

    def output_path(self) -> Path:
        if self.hparams.output:
            return Path(self.hparams.output)
        return Path(self.trainer.log_dir or ".") / "distilled.safetensors"

    def save(self, path: str | Path) -> Path:
        """Writes the distilled set (images, labels, learned lr, ZCA, config and last evaluation) atomically."""
        dm = self.trainer.datamodule if self._trainer is not None else None
        metadata = {
            "method": type(self).__name__,
            "dataset": getattr(dm, "name", None),
            "num_classes": self.num_classes,
            "ipc": self.hparams.ipc,
            "iteration": self.global_step,
            "network": self.source.describe() if isinstance(self.source, ModelSource) else str(self.source),
            "hparams": dict(self.hparams),
            "mean": list(getattr(dm, "mean", []) or []),
            "std": list(getattr(dm, "std", []) or []),
            "evaluation": self.last_eval,
        }
        return save_distilled(path, self.images, self.labels(), float(self.syn_lr.detach()), metadata, zca=self.zca)


class MTT(TrajectoryMatching):
    """Matching Training Trajectories (Cazenavette et al., CVPR'22): real init, hard labels, plain inner SGD."""


class DATM(TrajectoryMatching):
    """Difficulty-Aligned Trajectory Matching (Guo et al., ICLR'24; NUS-HPC-AI-Lab/DATM ``distill/DATM.py``).

    MTT plus: learnable soft labels initialised from the experts' logits, images that the experts classify
    correctly as initialisation, a start window [min, max) that follows IPC, sequential generation (on by default,
    as ``utils/cfg.py``) and skipping iterations whose loss exceeds ``loss_threshold`` (1.0). The soft labels start
    as the mean logits of the experts that classify the image correctly (``pix_init="correct"``, the code's
    ``samples_predicted_correctly``) or as expert 0's last-checkpoint logits otherwise (the code's ``real`` branch).
    Defaults follow ``utils/cfg.py`` and the official configs: cur 20, E 3000 for sequential generation, and
    evaluation batches of 128 (every config's ``batch_train``).
    """

    def __init__(
        self,
        network: ModelSource,
        buffer_dir: str,
        num_classes: int | None = None,
        in_chans: int | None = None,
        *,
        soft_labels: bool = True,
        pix_init: Literal["real", "noise", "correct", "kmeans"] = "correct",
        loss_threshold: float | None = 1.0,
        sequential_generation: bool = True,
        current_max_start_epoch: int | None = 20,
        expansion_end_iteration: int = 3000,
        eval_batch_size: int = 128,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            network, buffer_dir, num_classes, in_chans, soft_labels=soft_labels, pix_init=pix_init,
            loss_threshold=loss_threshold, sequential_generation=sequential_generation,
            current_max_start_epoch=current_max_start_epoch, expansion_end_iteration=expansion_end_iteration,
            eval_batch_size=eval_batch_size, **kwargs,
        )


class AST(TrajectoryMatching):
    """Alignment with Smooth Experts (Shen et al., arXiv 2310.10541; AST-Alignment-with-Smooth-Expert ``distill.py``).

    MTT plus: inner-loop momentum 0.9, k-means representative initialisation, the balanced inner loss, intermediate
    matching and a relative perturbation (α_p = 1) of the start point's conv weights. Use experts trained with
    ``ExpertTraining(loss_decay=true, gradient_penalty=true, momentum=0.9, ...)`` (the smooth experts).
    """

    def __init__(
        self,
        network: ModelSource,
        buffer_dir: str,
        num_classes: int | None = None,
        in_chans: int | None = None,
        *,
        inner_momentum: float = 0.9,
        pix_init: Literal["real", "noise", "correct", "kmeans"] = "kmeans",
        balance_loss: bool = True,
        intermediate_matching: bool = True,
        weight_perturbation: float = 1.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            network, buffer_dir, num_classes, in_chans, inner_momentum=inner_momentum, pix_init=pix_init,
            balance_loss=balance_loss, intermediate_matching=intermediate_matching,
            weight_perturbation=weight_perturbation, **kwargs,
        )
