"""Eigenvalue logging during training.

>>> from curvext.monitor import EigenLogger, GradientNoise
"""

from curvext.extensions.noise import GradientNoise
from curvext.monitor.logger import EigenLogger, plot_records

__all__ = ["EigenLogger", "GradientNoise", "plot_records"]
