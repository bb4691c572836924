"""Loss modules: tensor in, tensor out; each docstring gives the formula and the paper."""

from zoo.losses.kd import DKDLoss, KDLoss

__all__ = ["DKDLoss", "KDLoss"]
