r"""Girard–Hutchinson trace estimation."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from curvext.linalg.sampling import column_dots, probed


def hutchinson_trace(
    A,
    num_matvecs: int,
    distribution: str = "rademacher",
    generator: Optional[torch.Generator] = None,
) -> Tensor:
    r"""Estimate :math:`\mathrm{Tr}(\mathbf{A})` from ``num_matvecs`` random probes.

    With probes :math:`\boldsymbol{\omega}_1, \dots, \boldsymbol{\omega}_k`
    (:math:`\mathbb{E}[\boldsymbol{\omega}\boldsymbol{\omega}^\top] = \mathbf{I}`),

    .. math::
        \widehat{\mathrm{Tr}}(\mathbf{A})
        = \frac{1}{k} \sum_{j=1}^k \boldsymbol{\omega}_j^\top \mathbf{A}
          \boldsymbol{\omega}_j,
        \qquad \mathbb{E}\bigl[\widehat{\mathrm{Tr}}\bigr] = \mathrm{Tr}(\mathbf{A}),

    with variance :math:`\frac{2}{k}(\|\mathbf{A}\|_F^2 - \sum_i A_{ii}^2)` for
    Rademacher and :math:`\frac{2}{k}\|\mathbf{A}\|_F^2` for Gaussian probes
    (symmetric :math:`\mathbf{A}`). All probes are multiplied in one ``A @ X``.

    Girard, D. (1989). A fast 'Monte-Carlo cross-validation' procedure for large
    least squares problems with noisy data. Numerische Mathematik.
    Hutchinson, M. F. (1989). A stochastic estimator of the trace of the influence
    matrix for Laplacian smoothing splines. Communications in Statistics.

    Args:
        A: A square ``[P, P]`` operator: a curvext operator, a tensor, or anything
            with ``.shape``, ``.dtype``, ``.device`` and ``A @ X`` for ``X`` ``[P, M]``.
        num_matvecs: The number :math:`k \ge 1` of probes (= products with ``A``).
        distribution: ``"rademacher"`` (default) or ``"normal"``.
        generator: The random number generator for the probes (default: torch's
            global one).

    Returns:
        The estimate, a 0-d tensor.

    Raises:
        ValueError: If ``A`` is not square, ``num_matvecs < 1`` or the
            distribution is unknown.

    Example:
        >>> A = torch.diag(torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64))
        >>> hutchinson_trace(A, num_matvecs=4).item()  # exact for a diagonal A
        6.0
    """
    probes, products = probed(A, num_matvecs, distribution, generator, "hutchinson_trace")
    return column_dots(probes, products).sum() / num_matvecs
