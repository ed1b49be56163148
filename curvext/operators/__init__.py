"""Curvature operators: what the backward pass stored, as matrices to multiply,
invert and measure.

>>> from curvext.operators import CurvatureOperator, DiagonalOperator, KronOperator
>>> from curvext.operators import BlockDiagonalOperator, KronDecomposed, LowRankOperator
"""

from curvext.operators.base import CurvatureOperator, check_damping
from curvext.operators.diagonal import DiagonalOperator
from curvext.operators.block import BlockDiagonalOperator
from curvext.operators.kron import KronDecomposed, KronEigenOperator, KronOperator
from curvext.operators.lowrank import LowRankOperator

__all__ = [
    "CurvatureOperator",
    "DiagonalOperator",
    "KronOperator",
    "KronEigenOperator",
    "KronDecomposed",
    "LowRankOperator",
    "BlockDiagonalOperator",
    "check_damping",
]
