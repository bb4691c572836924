"""Dataset distillation by trajectory matching: MTT, DATM, AST.

Stage 1 trains expert networks on the real data and stores their per-epoch parameters (:class:`ExpertTraining`,
a ``zoo fit`` config); stage 2 learns a small synthetic set whose short training run matches a segment of an
expert's trajectory (:class:`MTT`, :class:`DATM`, :class:`AST`); the result is an artifact that
:class:`DistilledDataModule` serves to any zoo method.
"""

from zoo.dataset_distillation.augment import (
    DIGITS_DSA_STRATEGY,
    DSA_STRATEGY,
    DiffAugment,
    DSAParams,
    ZCAWhitening,
)
from zoo.dataset_distillation.buffer import (
    Trajectory,
    TrajectoryBuffer,
    load_trajectory,
    save_trajectory,
)
from zoo.dataset_distillation.distilled import (
    DistilledDataModule,
    load_distilled,
    save_distilled,
)
from zoo.dataset_distillation.evaluate import (
    EvalResult,
    evaluate_synthetic,
    soft_cross_entropy,
    train_on_set,
)
from zoo.dataset_distillation.experts import ExpertTraining
from zoo.dataset_distillation.functional import (
    ParamLayout,
    check_functional,
    functional_forward,
)
from zoo.dataset_distillation.methods import AST, DATM, MTT, TrajectoryMatching

__all__ = [
    "AST",
    "DATM",
    "DIGITS_DSA_STRATEGY",
    "DSA_STRATEGY",
    "MTT",
    "DSAParams",
    "DiffAugment",
    "DistilledDataModule",
    "EvalResult",
    "ExpertTraining",
    "ParamLayout",
    "Trajectory",
    "TrajectoryBuffer",
    "TrajectoryMatching",
    "ZCAWhitening",
    "check_functional",
    "evaluate_synthetic",
    "functional_forward",
    "load_distilled",
    "load_trajectory",
    "save_distilled",
    "save_trajectory",
    "soft_cross_entropy",
    "train_on_set",
]
