r"""Hutchinson-type estimation of the squared Frobenius norm."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from curvext.linalg.sampling import column_dots, probed


def hutchinson_squared_fro(
    A,
    num_matvecs: int,
    distribution: str = "rademacher",
    generator: Optional[torch.Generator] = None,
) -> Tensor:
    r"""Estimate :math:`\|\mathbf{A}\|_F^2 = \mathrm{Tr}(\mathbf{A}^\top\mathbf{A})`.

    Hutchinson's estimator applied to :math:`\mathbf{A}^\top\mathbf{A}`, which
    needs only products with :math:`\mathbf{A}`:

    .. math::
        \widehat{\|\mathbf{A}\|_F^2}
        = \frac{1}{k} \sum_{j=1}^k \|\mathbf{A}\boldsymbol{\omega}_j\|_2^2,
        \qquad \mathbb{E}\bigl[\widehat{\|\mathbf{A}\|_F^2}\bigr] = \|\mathbf{A}\|_F^2 .

    All probes are multiplied in one ``A @ X``.

    Hutchinson, M. F. (1989). A stochastic estimator of the trace of the influence
    matrix for Laplacian smoothing splines. Communications in Statistics.

    Args:
        A: A square ``[P, P]`` operator (a curvext operator, a tensor, or anything
            with ``.shape``, ``.dtype``, ``.device`` and ``A @ X``).
        num_matvecs: The number :math:`k \ge 1` of probes.
        distribution: ``"rademacher"`` (default) or ``"normal"``.
        generator: The random number generator (default: torch's global one).

    Returns:
        The estimate, a 0-d tensor.

    Raises:
        ValueError: If ``A`` is not square, ``num_matvecs < 1`` or the
            distribution is unknown.

    Example:
        >>> A = 2 * torch.eye(3, dtype=torch.float64)
        >>> hutchinson_squared_fro(A, num_matvecs=5).item()  # exact for A = c I
        12.0
    """
    probes, products = probed(A, num_matvecs, distribution, generator, "hutchinson_squared_fro")
    return column_dots(products, products).sum() / num_matvecs
