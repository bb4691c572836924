"""Lightning callbacks shared by every method."""

from callbacks.gallery import PredictionGallery
from callbacks.monitor import DistillationMonitor
from callbacks.summary import FitSummary

__all__ = ["DistillationMonitor", "FitSummary", "PredictionGallery"]
