"""LightningModules, one file per method family, over one shared base (``zoo.methods.base``)."""

from zoo.methods.base import DistillationMethod, Outputs
from zoo.methods.classification import DKD, KD, Supervised
from zoo.methods.meal import MEALV2
from zoo.methods.nd import DKDND, KDND

__all__ = ["DKD", "DKDND", "DistillationMethod", "KD", "KDND", "MEALV2", "Outputs", "Supervised"]
