r"""Norm estimators.

>>> from curvext.linalg.norm import hutchinson_squared_fro
"""

from curvext.linalg.norm.hutchinson import hutchinson_squared_fro

__all__ = ["hutchinson_squared_fro"]
