"""LightningModules, one file per method family, over one shared base (``zoo.methods.base``)."""

from zoo.methods.base import DistillationMethod, Outputs
from zoo.methods.classification import DKD, KD, Supervised
from zoo.methods.dhkd import DHKD
from zoo.methods.meal import MEALV2
from zoo.methods.nd import DKDND, KDND
from zoo.methods.trg import TRG

__all__ = ["DHKD", "DKD", "DKDND", "DistillationMethod", "KD", "KDND", "MEALV2", "Outputs", "Supervised", "TRG"]
