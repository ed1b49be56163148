"""The gradient-noise statistics logged by :class:`~curvext.monitor.EigenLogger`;
the extension lives in :mod:`curvext.extensions.noise`."""

from curvext.extensions.noise import GradientNoise

__all__ = ["GradientNoise"]
