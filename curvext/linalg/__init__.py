r"""Matrix-free linear algebra on any square operator.

Everything here works on a curvext :class:`~curvext.operators.CurvatureOperator`,
a dense ``torch.Tensor`` ``[P, P]``, or any object with ``.shape == (P, P)``,
``.dtype``, ``.device`` and ``A @ X`` for ``X`` ``[P, M]``:

* :mod:`~curvext.linalg.trace`: :func:`hutchinson_trace`, :func:`hutchpp_trace`, :func:`xtrace`;
* :mod:`~curvext.linalg.diagonal`: :func:`hutchinson_diag`, :func:`xdiag`;
* :mod:`~curvext.linalg.norm`: :func:`hutchinson_squared_fro`;
* :mod:`~curvext.linalg.inverse`: :class:`CGInverse`, :class:`LSMRInverse`,
  :class:`NeumannInverse`;
* :mod:`~curvext.linalg.spectrum`: :func:`lanczos_spectrum`, :func:`lanczos_log_spectrum`,
  :class:`LanczosSpectrum`;
* :mod:`~curvext.linalg.eigen`: :func:`top_eigenpairs`;
* :class:`LinearOperator` (from :mod:`curvext.linear`): the root of every
  curvext operator with ``@``, the inverses here included.

>>> import torch
>>> from curvext.linalg import CGInverse, hutchinson_trace
>>> A = torch.diag(torch.tensor([1.0, 2.0, 4.0], dtype=torch.float64))
>>> hutchinson_trace(CGInverse(A, tol=1e-12), num_matvecs=3).item()  # Tr(A^-1)
1.75
"""

from curvext.linalg.checks import assert_is_square
from curvext.linalg.diagonal import hutchinson_diag, xdiag
from curvext.linalg.eigen import top_eigenpairs
from curvext.linalg.inverse import (
    CGInfo,
    CGInverse,
    LSMRInfo,
    LSMRInverse,
    NeumannInverse,
)
from curvext.linalg.norm import hutchinson_squared_fro
from curvext.linalg.spectrum import (
    LanczosSpectrum,
    lanczos_log_spectrum,
    lanczos_spectrum,
)
from curvext.linalg.trace import hutchinson_trace, hutchpp_trace, xtrace
from curvext.linear import LinearOperator

__all__ = [
    "hutchinson_trace",
    "hutchpp_trace",
    "xtrace",
    "hutchinson_diag",
    "xdiag",
    "hutchinson_squared_fro",
    "CGInverse",
    "CGInfo",
    "NeumannInverse",
    "LSMRInverse",
    "LSMRInfo",
    "assert_is_square",
    "lanczos_spectrum",
    "lanczos_log_spectrum",
    "LanczosSpectrum",
    "top_eigenpairs",
    "LinearOperator",
]
