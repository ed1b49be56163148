"""Curvature operators: what the backward pass stored, as matrices to multiply,
invert and measure.

>>> from curvext.operators import CurvatureOperator, DiagonalOperator, KronOperator
"""

from curvext.operators.base import CurvatureOperator, check_damping
from curvext.operators.diagonal import DiagonalOperator
from curvext.operators.kron import KronEigenOperator, KronOperator

__all__ = [
    "CurvatureOperator",
    "DiagonalOperator",
    "KronOperator",
    "KronEigenOperator",
    "check_damping",
]
