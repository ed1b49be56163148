r"""Hutchinson-type diagonal estimation (Bekas, Kokiopoulou & Saad, 2007)."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from curvext.linalg.sampling import probed, sum_column_products


def hutchinson_diag(
    A,
    num_matvecs: int,
    distribution: str = "rademacher",
    generator: Optional[torch.Generator] = None,
) -> Tensor:
    r"""Estimate :math:`\mathrm{diag}(\mathbf{A})` from ``num_matvecs`` random probes.

    .. math::
        \widehat{\mathrm{diag}}(\mathbf{A})
        = \frac{1}{k} \sum_{j=1}^k \boldsymbol{\omega}_j \odot
          \mathbf{A}\boldsymbol{\omega}_j,
        \qquad \mathbb{E}\bigl[\widehat{\mathrm{diag}}\bigr] = \mathrm{diag}(\mathbf{A}),

    since :math:`\mathbb{E}[\omega_a \omega_b] = \delta_{ab}`. Entry :math:`a`
    has variance :math:`\frac{1}{k}\sum_{b \ne a} A_{ab}^2` for Rademacher probes.
    All probes are multiplied in one ``A @ X``.

    Bekas, C., Kokiopoulou, E., & Saad, Y. (2007). An estimator for the diagonal
    of a matrix. Applied Numerical Mathematics.

    Args:
        A: A square ``[P, P]`` operator (a curvext operator, a tensor, or anything
            with ``.shape``, ``.dtype``, ``.device`` and ``A @ X``).
        num_matvecs: The number :math:`k \ge 1` of probes.
        distribution: ``"rademacher"`` (default) or ``"normal"``.
        generator: The random number generator (default: torch's global one).

    Returns:
        The estimate ``[P]``.

    Raises:
        ValueError: If ``A`` is not square, ``num_matvecs < 1`` or the
            distribution is unknown.

    Example:
        >>> A = torch.diag(torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64))
        >>> hutchinson_diag(A, num_matvecs=2).tolist()  # exact for a diagonal A
        [1.0, 2.0, 3.0]
    """
    probes, products = probed(A, num_matvecs, distribution, generator, "hutchinson_diag")
    return sum_column_products(probes, products).div_(num_matvecs)
