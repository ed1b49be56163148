r"""XDiag: exchangeable diagonal estimation (Epperly, Tropp & Webber, 2024)."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from curvext.linalg.sampling import sum_column_products
from curvext.linalg.trace.epperly2024xtrace import LeaveOneOut, exchangeable_sketch


def xdiag(
    A,
    num_matvecs: int,
    distribution: str = "rademacher",
    generator: Optional[torch.Generator] = None,
) -> Tensor:
    r"""Estimate :math:`\mathrm{diag}(\mathbf{A})` with XDiag.

    The diagonal analogue of :func:`~curvext.linalg.trace.xtrace`: with
    :math:`m = k/2` probes and :math:`\mathbf{Q}_i` an orthonormal basis of
    :math:`\mathbf{A}\boldsymbol{\Omega}_{-i}`, it averages the :math:`m`
    unbiased estimates

    .. math::
        \widehat{\mathrm{diag}}_i
        = \mathrm{diag}(\mathbf{Q}_i\mathbf{Q}_i^\top \mathbf{A})
        + \boldsymbol{\omega}_i \odot (\mathbf{I} - \mathbf{Q}_i\mathbf{Q}_i^\top)
          \mathbf{A}\boldsymbol{\omega}_i ,

    all from one QR decomposition :math:`\mathbf{A}\boldsymbol{\Omega} =
    \mathbf{Q}\mathbf{R}` and :math:`\mathbf{Q}^\top\mathbf{A} =
    (\mathbf{A}^\top\mathbf{Q})^\top`, i.e. two batched products (one with
    ``A``, one with ``A.T``; the same for curvext's symmetric operators). It is
    exact when :math:`\mathrm{rank}(\mathbf{A}) < m`.

    Epperly, E. N., Tropp, J. A., & Webber, R. J. (2024). XTrace: Making the most
    of every sample in stochastic trace estimation. SIAM Journal on Matrix
    Analysis and Applications. https://arxiv.org/abs/2301.07825

    Args:
        A: A square ``[P, P]`` operator with ``A.T`` (a curvext operator, a
            tensor, or anything with ``.shape``, ``.dtype``, ``.device``, ``.T``
            and ``A @ X``).
        num_matvecs: The budget :math:`k` of products: even, at least ``4`` and
            at most ``2 P``.
        distribution: ``"rademacher"`` (default, the paper's choice) or ``"normal"``.
        generator: The random number generator (default: torch's global one).

    Returns:
        The estimate ``[P]``.

    Raises:
        ValueError: If ``A`` is not square, ``num_matvecs`` is odd, below ``4``
            or above ``2 P``, or the distribution is unknown.

    Example:
        >>> u = torch.tensor([[1.0], [2.0], [0.0], [2.0]], dtype=torch.float64)
        >>> xdiag(u @ u.T, num_matvecs=4).round(decimals=8).tolist()  # rank 1 < 2
        [1.0, 4.0, 0.0, 4.0]
    """
    A, probes, sketch, basis, triangular = exchangeable_sketch(
        A, num_matvecs, distribution, generator, "xdiag"
    )
    transposed_products = A.transposed_matmul(basis)  # (Q^T A)^T
    leave_one_out = LeaveOneOut(triangular)
    # mean_i diag(Q_i Q_i^T A) = diag(Q (mean_i Π_i) Q^T A)
    subspace_diag = sum_column_products(basis @ leave_one_out.mean(), transposed_products)
    products_off_basis = sketch - basis @ leave_one_out.apply(basis.T @ sketch)
    return subspace_diag.add_(
        sum_column_products(probes, products_off_basis), alpha=1 / probes.shape[1]
    )
