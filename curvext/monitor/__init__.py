"""Eigenvalue logging during training.

>>> from curvext.monitor import EigenLogger, GradientNoise
"""

from curvext.monitor.logger import EigenLogger, plot_records
from curvext.monitor.noise import GradientNoise

__all__ = ["EigenLogger", "GradientNoise", "plot_records"]
