"""Stage 1 of trajectory matching: train expert networks on real data and record their parameters every epoch.

MTT (Cazenavette et al., CVPR'22, arXiv 2203.11932, ``buffer.py``): each expert is a freshly initialised network
trained with plain SGD (lr 0.01, no momentum, no weight decay, batch 256, 50 epochs, DSA on every batch); its flat
parameters are saved before training (τ[0]) and after every epoch (τ[e]). AST (Shen et al., arXiv 2310.10541,
``buffer.py`` / ``utils.epoch_gp``) trains smoother experts with two extra terms, both optional here:

    loss = λ_e · CE(f(DSA(x)), y) + GP(x),   λ_e = 0.5 + 0.05·e for epochs e < 10, else 1   (``loss_decay``)
    GP(x) = 2 · mean_{b,h,w} (‖∂(Σ_{b,k} f_k(x_b)) / ∂x_{b,:,h,w}‖₂ − 1)²   (``gradient_penalty``)

with GP taken on the un-augmented batch.

Example (writes ``runs/dataset_distillation/digits/experts/expert_0000.safetensors`` ...)::

    zoo fit --config configs/dataset_distillation/digits/experts.yaml
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn
from torch.utils.data import DataLoader

from zoo.dataset_distillation.augment import DSA_STRATEGY, DiffAugment, ZCAWhitening
from zoo.dataset_distillation.buffer import (
    ZCA_FILE,
    expert_file,
    read_header,
    same_normalisation,
    save_trajectory,
)
from zoo.dataset_distillation.functional import ParamLayout, check_functional
from zoo.models.sources import ModelSource, build_model, source_from_config

__all__ = ["ExpertTraining", "input_gradient_penalty", "loss_decay_weight", "training_images"]

# Metadata fields that must agree for an existing expert file to count as done (the layout is compared as well).
_MATCH_FIELDS = (
    "network",
    "dataset",
    "zca",
    "dsa_strategy",
    "train_epochs",
    "lr",
    "momentum",
    "weight_decay",
    "lr_decay_epoch",
    "lr_decay_factor",
    "loss_decay",
    "gradient_penalty",
    "batch_size",
    "drop_last",
    "mean",
    "std",
)
# Fields that older expert files do not record: such a file is refused with a message of its own.
_LATER_FIELDS = {
    "drop_last": "with each epoch's last partial batch dropped",
    "mean": "so its input normalisation cannot be compared",
    "std": "so its input normalisation cannot be compared",
}


def loss_decay_weight(epoch: int) -> float:
    """AST's clipping-loss weight λ_e: 0.50, 0.55, ..., 0.95 in epochs 0–9 (0-based), then 1."""
    return 0.5 + 0.05 * epoch if epoch < 10 else 1.0


def input_gradient_penalty(net: nn.Module, x: Tensor, weight: float = 2.0) -> Tensor:
    """AST's input-gradient penalty: weight · mean over (b, h, w) of (‖∂(Σ logits)/∂x‖₂ over channels − 1)².

    Computed on ``x`` as given (AST uses the un-augmented batch), with ``create_graph`` so the penalty is
    differentiable in the network's parameters. ``weight`` is AST's ``LAMBDA`` (2).
    """
    x = x.detach().requires_grad_(True)
    (grad,) = torch.autograd.grad(net(x).sum(), x, create_graph=True)
    return weight * (grad.norm(p=2, dim=1) - 1).square().mean()


def training_images(datamodule: Any, batch_size: int = 512) -> Tensor:
    """All training images of a set-up data module, as its training loader yields them (for fitting ZCA).

    Uses the in-memory tensor of ``zoo.data`` tensor datasets (digits: un-shifted) when there is one, else one
    ordered pass over ``train_set`` (whose own augmentation should be off, as it is for experts).
    """
    dataset = datamodule.train_set
    images = getattr(dataset, "images", None)
    if isinstance(images, Tensor):
        return images
    workers = getattr(datamodule, "num_workers", 0)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers)
    return torch.cat([batch[0] for batch in loader])


class ExpertTraining(L.LightningModule):
    """Trains ``num_experts`` fresh networks one after another and saves each one's trajectory (MTT / AST experts).

    Epoch ``t`` of the run is epoch ``t % train_epochs`` of the ``t // train_epochs``-th expert still to train, so
    ``trainer.max_epochs`` must be ``num_experts × train_epochs`` (checked at fit start; YAML cannot multiply, so the
    configs write the product). Optimisation is manual: one SGD optimizer whose state is cleared whenever an expert
    starts (and when the lr decays, as the official code re-creates its optimizer).

    - Expert k starts from the network built under ``torch.manual_seed(seed + k)`` (the official ``get_network``
      reseeds from the clock; here an expert's initialisation is reproducible). Data order and DSA draws come from
      the run's global RNG (``seed_everything``).
    - τ[0] is recorded before the first step, τ[e] after epoch e; when the expert finishes, its
      ``expert_{k:04d}.safetensors`` is written atomically to ``buffer_dir`` (format:
      ``zoo.dataset_distillation.buffer``).
    - Resuming: rerun the same command. Experts whose files exist and match this run's network layout, data set,
      preprocessing and training hyper-parameters are skipped; an expert that was interrupted restarts from its
      seeded initialisation. A file that does not match stops the run with its name and the differing field.
      Lightning checkpoints are not used (configs set ``enable_checkpointing: false``).
    - ``zca``: a ``ZCAWhitening(eps=0.1)`` is fitted on the data module's training images (as the data module yields
      them: MTT whitens raw [0, 1] pixels, so set the CIFAR modules' ``normalize: false``), applied to every batch,
      and saved as ``<buffer_dir>/zca.safetensors``; an existing one is reused.
    - Logs ``train/loss`` (and ``train/loss_ce``, ``train/loss_gp``), ``train/acc``, ``train/lr``, ``train/expert``
      and the current expert's ``val/acc``/``val/loss`` on the data module's validation split every epoch.
    - Under ``trainer.fast_dev_run`` nothing is written to ``buffer_dir`` and existing experts are ignored.

    Args:
        network: the architecture (e.g. ``zoo.models.convnet.ConvNetModel``); must be buffer-free (no BatchNorm).
        num_classes, in_chans: linked from the data module by the CLI.
        num_experts: experts to train (MTT: 100).
        train_epochs: epochs per expert (MTT/AST: 50; the saved trajectory has train_epochs + 1 rows).
        lr, momentum, weight_decay: SGD (MTT: 0.01, 0, 0; AST: 0.003, 0.9, 1e-3).
        lr_decay_epoch: after the epoch with this 0-based index, the lr is multiplied by ``lr_decay_factor`` (the
            official ``if e in lr_schedule``): MTT ``--decay`` is ``train_epochs // 2 + 1`` with factor 0.1; AST
            always decays, factor 0.6 (26 for 50 epochs). ``None``: constant lr (MTT's default).
        lr_decay_factor: see ``lr_decay_epoch``.
        dsa_strategy: DSA families applied to every training batch (``""``: none; digits: no flip).
        zca: ZCA-whiten the images (see above).
        loss_decay: AST's λ_e weighting of the cross-entropy in the first 10 epochs.
        gradient_penalty: AST's input-gradient penalty (adds a double backward per step).
        buffer_dir: the folder the trajectories go to.
        seed: expert k is initialised from ``seed + k``.
    """

    def __init__(
        self,
        network: ModelSource,
        num_classes: int | None = None,
        in_chans: int | None = None,
        num_experts: int = 10,
        train_epochs: int = 15,
        lr: float = 0.01,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        lr_decay_epoch: int | None = None,
        lr_decay_factor: float = 0.1,
        dsa_strategy: str = DSA_STRATEGY,
        zca: bool = False,
        loss_decay: bool = False,
        gradient_penalty: bool = False,
        buffer_dir: str = "runs/dataset_distillation/digits/experts",
        seed: int = 0,
    ) -> None:
        super().__init__()
        if num_experts < 1 or train_epochs < 1:
            raise ValueError(
                f"ExpertTraining: num_experts ({num_experts}) and train_epochs ({train_epochs}) must be ≥ 1"
            )
        if not lr > 0 or not lr_decay_factor > 0 or momentum < 0 or weight_decay < 0:
            raise ValueError(
                f"ExpertTraining: lr ({lr}) and lr_decay_factor ({lr_decay_factor}) must be positive, momentum "
                f"({momentum}) and weight_decay ({weight_decay}) non-negative"
            )
        if lr_decay_epoch is not None and not 0 <= lr_decay_epoch < train_epochs:
            raise ValueError(
                f"ExpertTraining.lr_decay_epoch must be in [0, train_epochs) = [0, {train_epochs}) or null, got "
                f"{lr_decay_epoch}"
            )
        if isinstance(network, Mapping):  # a source stored as class_path/init_args
            network = source_from_config(network)
        self.automatic_optimization = False
        self.network = network
        self.save_hyperparameters(ignore=["network"])
        self.hparams["network"] = network.to_config() if isinstance(network, ModelSource) else type(network).__name__
        self.net = build_model(network, num_classes=num_classes, in_chans=in_chans)
        check_functional(self.net)
        self.layout = ParamLayout.from_module(self.net)
        # Stateless: kept out of the registered submodules (nothing of it belongs in state_dict or device moves).
        self._augment = (DiffAugment(dsa_strategy),)
        self.zca_transform: ZCAWhitening | None = None
        self.buffer_dir = Path(buffer_dir)
        self._dataset = "unknown"
        self._plan: list[int] = []
        self._current: int | None = None
        self._epoch_in_expert = 0
        self._trajectory: list[Tensor] = []
        self.finished: list[Path] = []

    # ------------------------------------------------------------------------------------------------ facts
    @property
    def augment(self) -> DiffAugment:
        """The DSA applied to every training batch (identity for ``dsa_strategy: ""``)."""
        return self._augment[0]

    def describe(self) -> dict[str, str]:
        """Names for the fit summary."""
        name = self.network.describe() if isinstance(self.network, ModelSource) else type(self.net).__name__
        return {"method": type(self).__name__, "student": name}

    def network_config(self) -> dict[str, Any]:
        """The network as class_path/init_args, with the data's num_classes/in_chans filled in."""
        if not isinstance(self.network, ModelSource):
            return {"class_path": type(self.net).__name__, "init_args": {}}
        config = self.network.to_config()
        args = dict(config["init_args"])
        for key in ("num_classes", "in_chans"):
            if key in args and args[key] is None:
                args[key] = getattr(self.net, key, None) or self.hparams[key]
        return {**config, "init_args": args}

    def expected_metadata(self) -> dict[str, Any]:
        """What every expert file of this run records (``expert``, ``expert_seed`` and ``val_acc`` are added)."""
        h = self.hparams
        name = self.network.describe() if isinstance(self.network, ModelSource) else type(self.net).__name__
        return {
            "network": name,
            "network_config": self.network_config(),
            "dataset": self._dataset,
            "zca": bool(h.zca),
            "dsa_strategy": h.dsa_strategy,
            "train_epochs": h.train_epochs,
            "lr": h.lr,
            "momentum": h.momentum,
            "weight_decay": h.weight_decay,
            "lr_decay_epoch": h.lr_decay_epoch,
            "lr_decay_factor": h.lr_decay_factor,
            "loss_decay": bool(h.loss_decay),
            "gradient_penalty": bool(h.gradient_penalty),
            "seed": h.seed,
            "batch_size": getattr(self._datamodule(), "batch_size", None),
            "drop_last": getattr(self._datamodule(), "drop_last", None),
            "mean": _as_list(getattr(self._datamodule(), "mean", None)),
            "std": _as_list(getattr(self._datamodule(), "std", None)),
        }

    def initial_parameters(self, k: int) -> Tensor:
        """Expert k's τ[0]: the flat parameters of a network built under ``torch.manual_seed(seed + k)`` (CPU)."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.hparams.seed + k)
            net = build_model(self.network, num_classes=self.hparams.num_classes, in_chans=self.hparams.in_chans)
        return self.layout.flatten(net).cpu()

    def lr_at(self, epoch: int) -> float:
        """The lr of the expert's 0-based epoch ``epoch``."""
        h = self.hparams
        decayed = h.lr_decay_epoch is not None and epoch > h.lr_decay_epoch
        return h.lr * h.lr_decay_factor if decayed else h.lr

    def _datamodule(self) -> Any:
        trainer = self._trainer
        return getattr(trainer, "datamodule", None) if trainer is not None else None

    def _fast_dev_run(self) -> bool:
        return bool(self._trainer is not None and self.trainer.fast_dev_run)

    # ------------------------------------------------------------------------------------------------ setup
    def setup(self, stage: str) -> None:
        dm = self._datamodule()
        if dm is not None:
            self._dataset = getattr(dm, "name", type(dm).__name__.lower())
            if self.augment.families and getattr(dm, "augment", False):
                raise ValueError(
                    f"ExpertTraining: the data module {type(dm).__name__} augments its training images itself "
                    "(data.init_args.augment: true) and the experts also use DSA (model.init_args.dsa_strategy); "
                    "set data.init_args.augment: false (or dsa_strategy: '' to use the data module's augmentation)"
                )
            if stage == "fit" and getattr(dm, "drops_partial_batch", False):
                rank_zero_warn(
                    "ExpertTraining: the training loader drops its last partial batch (data.init_args.drop_last: "
                    "true); the official MTT/DATM/AST buffer.py keeps it, set data.init_args.drop_last: false to match"
                )
            size = getattr(dm, "image_size", None)
            net_size = getattr(self.net, "image_size", None)
            if size is not None and net_size is not None and size != net_size:
                raise ValueError(
                    f"ExpertTraining: the network is built for {net_size}-pixel images "
                    f"(model.init_args.network.init_args.image_size) but the data has image_size {size}"
                )
        if self.hparams.zca and self.zca_transform is None:
            self.zca_transform = self._prepare_zca(dm, stage)

    def _prepare_zca(self, dm: Any, stage: str) -> ZCAWhitening:
        path = self.buffer_dir / ZCA_FILE
        if path.is_file():
            rank_zero_info(f"ExpertTraining: using the ZCA whitening of the existing buffer, {path}")
            return ZCAWhitening.load(path)
        if dm is None or stage != "fit":
            raise ValueError(
                f"ExpertTraining.zca: no {path} to load, and it can only be fitted at fit time on a data module's "
                "training images"
            )
        if getattr(dm, "normalize", False):
            rank_zero_warn(
                "ExpertTraining.zca: the data module normalises its images; MTT whitens raw [0, 1] pixels "
                "(data.init_args.normalize: false), which is what eps=0.1 is tuned for"
            )
        zca = ZCAWhitening(eps=0.1).fit(training_images(dm))
        if not self._fast_dev_run():
            zca.save(path)
        return zca

    def configure_optimizers(self) -> torch.optim.Optimizer:
        h = self.hparams
        return torch.optim.SGD(self.net.parameters(), lr=h.lr, momentum=h.momentum, weight_decay=h.weight_decay)

    def on_fit_start(self) -> None:
        trainer = self.trainer
        if trainer.world_size > 1:
            raise ValueError(
                "ExpertTraining trains one expert at a time on one device (trainer.devices: 1); for more throughput "
                "run several processes with different buffer_dir and seed"
            )
        needed = self.hparams.num_experts * self.hparams.train_epochs
        if not self._fast_dev_run() and trainer.max_epochs != needed:
            raise ValueError(
                f"ExpertTraining: trainer.max_epochs is {trainer.max_epochs}, but num_experts "
                f"({self.hparams.num_experts}) × train_epochs ({self.hparams.train_epochs}) needs "
                f"trainer.max_epochs: {needed}"
            )
        self._plan = self._plan_experts()
        done = self.hparams.num_experts - len(self._plan)
        if done:
            rank_zero_info(f"ExpertTraining: {done} experts already in {self.buffer_dir}; training {self._plan}")
        if not self._plan:
            trainer.should_stop = True

    def _plan_experts(self) -> list[int]:
        """The experts still to train (all of them under fast_dev_run); a mismatching file raises."""
        if self._fast_dev_run():
            return list(range(self.hparams.num_experts))
        expected = self.expected_metadata()
        todo = []
        for k in range(self.hparams.num_experts):
            path = expert_file(self.buffer_dir, k)
            if not path.is_file():
                todo.append(k)
                continue
            header = read_header(path)
            diff = header.layout.difference(self.layout)
            if diff is not None:
                raise ValueError(f"{path}: exists for another network (field 'layout': {diff}); {_ELSEWHERE}")
            if header.num_epochs != self.hparams.train_epochs:
                raise ValueError(
                    f"{path}: exists with {header.num_epochs} epochs (field 'train_epochs'), this run trains "
                    f"{self.hparams.train_epochs}; {_ELSEWHERE}"
                )
            for key in _MATCH_FIELDS:
                if key in _LATER_FIELDS and key not in header.metadata:
                    raise ValueError(
                        f"{path}: was trained before expert files recorded {key} (field {key!r}), "
                        f"{_LATER_FIELDS[key]}; this run has {key} = {expected[key]!r}; {_ELSEWHERE}"
                    )
                got = header.metadata.get(key)
                same = same_normalisation(got, expected[key]) if key in ("mean", "std") else got == expected[key]
                if not same:
                    raise ValueError(
                        f"{path}: exists with {key} = {header.metadata.get(key)!r}, this run has {expected[key]!r}; "
                        f"{_ELSEWHERE}"
                    )
        return todo

    # ------------------------------------------------------------------------------------------------ experts
    def _start_expert(self, k: int) -> None:
        init = self.initial_parameters(k)
        self.layout.load_into(self.net, init)
        self.optimizers().optimizer.state.clear()
        self._current = k
        self._trajectory = [init]

    def on_train_epoch_start(self) -> None:
        block, epoch = divmod(self.current_epoch, self.hparams.train_epochs)
        if block >= len(self._plan):
            self._current = None
            self.trainer.should_stop = True
            return
        k = self._plan[block]
        if epoch == 0:
            self._start_expert(k)
        elif self._current != k:
            raise RuntimeError(
                f"ExpertTraining: epoch {self.current_epoch} continues expert {k}, which was not started in this run; "
                "rerun the command without --ckpt_path (finished experts are skipped)"
            )
        self._epoch_in_expert = epoch
        optimizer = self.optimizers().optimizer
        h = self.hparams
        if h.lr_decay_epoch is not None and epoch == h.lr_decay_epoch + 1:
            optimizer.state.clear()  # the official code builds a new optimizer at the decay
        for group in optimizer.param_groups:
            group["lr"] = self.lr_at(epoch)

    def forward(self, x: Tensor) -> Tensor:
        """Logits of the current expert on preprocessed (ZCA-whitened when ``zca``) images."""
        return self.net(x)

    def _preprocess(self, x: Tensor) -> Tensor:
        if self.zca_transform is None:
            return x
        with torch.no_grad():
            return self.zca_transform(x)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor | None:
        if self._current is None:
            return None
        x, y = batch[0], batch[1]
        x = self._preprocess(x)
        logits = self.net(self.augment(x))
        weight = loss_decay_weight(self._epoch_in_expert) if self.hparams.loss_decay else 1.0
        terms = {"ce": weight * F.cross_entropy(logits, y)}
        if self.hparams.gradient_penalty:
            terms["gp"] = input_gradient_penalty(self.net, x)
        loss = sum(terms.values())
        optimizer = self.optimizers()
        optimizer.zero_grad()
        self.manual_backward(loss)
        optimizer.step()
        for name, value in terms.items():
            self.log(f"train/loss_{name}", value.detach())
        self.log("train/loss", loss.detach(), prog_bar=True)
        self.log("train/acc", (logits.argmax(1) == y).float().mean(), on_step=False, on_epoch=True)
        return loss.detach()

    def on_train_epoch_end(self) -> None:
        if self._current is None:
            return
        self._trajectory.append(self.layout.flatten(self.net).cpu())
        self.log("train/expert", float(self._current))
        self.log("train/lr", self.lr_at(self._epoch_in_expert))
        if self._epoch_in_expert == self.hparams.train_epochs - 1:
            self._finish_expert()

    def _finish_expert(self) -> None:
        k = self._current
        trajectory = torch.stack(self._trajectory)
        if not torch.isfinite(trajectory).all():
            rank_zero_warn(f"ExpertTraining: expert {k} diverged (non-finite parameters); lower model.init_args.lr")
        val = self.trainer.callback_metrics.get("val/acc")
        metadata = {
            **self.expected_metadata(),
            "expert": k,
            "expert_seed": self.hparams.seed + k,
            "val_acc": None if val is None else round(float(val), 6),
        }
        if not self._fast_dev_run():
            path = save_trajectory(expert_file(self.buffer_dir, k), trajectory, self.layout, metadata)
            self.finished.append(path)
            rank_zero_info(f"ExpertTraining: expert {k} saved to {path} (val/acc {metadata['val_acc']})")
        self._current, self._trajectory = None, []
        if k == self._plan[-1]:
            self.trainer.should_stop = True

    # ------------------------------------------------------------------------------------------------ evaluation
    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch[0], batch[1]
        logits = self.net(self._preprocess(x))
        self.log("val/loss", F.cross_entropy(logits, y))
        self.log("val/acc", (logits.argmax(1) == y).float().mean(), prog_bar=True)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        raise RuntimeError(
            "ExpertTraining does not resume from Lightning checkpoints: finished experts are files in "
            f"{self.buffer_dir} and rerunning the same command (without --ckpt_path) skips them"
        )


def _as_list(values: Any) -> list[float] | None:
    return None if values is None else [float(v) for v in values]


_ELSEWHERE = "point model.init_args.buffer_dir at another folder, or delete the file to retrain it"
