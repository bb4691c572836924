"""LightningModules, one file per method family, over one shared base (``zoo.methods.base``)."""

from zoo.methods.base import DistillationMethod, Outputs
from zoo.methods.classification import DKD, KD, Supervised

__all__ = ["DKD", "DistillationMethod", "KD", "Outputs", "Supervised"]
