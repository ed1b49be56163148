"""Curvature operators: what the backward pass stored, as matrices to multiply,
invert and measure.

>>> from curvext.operators import CurvatureOperator, DiagonalOperator, KronOperator
>>> from curvext.operators import BlockDiagonalOperator, KronDecomposed, LowRankOperator
>>> from curvext.operators import HessianOperator, GGNOperator, EFOperator
>>> from curvext.operators import EKFACOperator
>>> from curvext.operators import JacobianOperator, TransposedJacobianOperator
"""

from curvext.operators.base import CurvatureOperator, check_damping
from curvext.operators.block import BlockDiagonalOperator
from curvext.operators.diagonal import DiagonalOperator
from curvext.operators.ekfac import EKFACOperator
from curvext.operators.jacobian import JacobianOperator, TransposedJacobianOperator
from curvext.operators.kron import KronDecomposed, KronEigenOperator, KronOperator
from curvext.operators.lowrank import LowRankOperator
from curvext.operators.matrix_free import EFOperator, GGNOperator, HessianOperator
from curvext.operators.submatrix import Submatrix

__all__ = [
    "CurvatureOperator",
    "DiagonalOperator",
    "KronOperator",
    "KronEigenOperator",
    "KronDecomposed",
    "EKFACOperator",
    "LowRankOperator",
    "BlockDiagonalOperator",
    "HessianOperator",
    "GGNOperator",
    "EFOperator",
    "JacobianOperator",
    "TransposedJacobianOperator",
    "check_damping",
    "Submatrix",
]
