"""Loss modules: tensor in, tensor out; each docstring gives the formula and the paper."""

from zoo.losses.kd import DKDLoss, KDLoss
from zoo.losses.meal import LogitDiscriminator, MEALV2DiscriminatorLoss, SoftCrossEntropy
from zoo.losses.nd import NDLoss, NDProjector

__all__ = [
    "DKDLoss",
    "KDLoss",
    "LogitDiscriminator",
    "MEALV2DiscriminatorLoss",
    "NDLoss",
    "NDProjector",
    "SoftCrossEntropy",
]
