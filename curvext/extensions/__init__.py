"""Extensions: what to compute during ``loss.backward()``.

One file per family; each extension asks module rules for reductions and
never special-cases a module type.
"""

from curvext.extensions.base import Extension
from curvext.extensions.first_order import BatchGrad, BatchL2Grad, SumGradSquared, Variance
from curvext.extensions.ggn_diag import BatchGGNDiag, GGNDiag
from curvext.extensions.ggn_eigen import GGNEigen
from curvext.extensions.ggn_eigen_derivatives import DampedNewtonStep, GGNDirectionalDerivatives
from curvext.extensions.ggn_mp import GGNMP
from curvext.extensions.hessian import HMP, PCHMP, BatchDiagHessian, DiagHessian
from curvext.extensions.kfac import KFAC, KFRA
from curvext.extensions.sqrt_ggn import SqrtGGN

__all__ = [
    "Extension",
    "GGNDiag",
    "BatchGGNDiag",
    "DiagHessian",
    "BatchDiagHessian",
    "GGNEigen",
    "GGNDirectionalDerivatives",
    "DampedNewtonStep",
    "SqrtGGN",
    "GGNMP",
    "HMP",
    "PCHMP",
    "KFAC",
    "KFRA",
    "BatchGrad",
    "BatchL2Grad",
    "SumGradSquared",
    "Variance",
]
