"""Lightning callbacks shared by every method."""

from callbacks.summary import FitSummary

__all__ = ["FitSummary"]
