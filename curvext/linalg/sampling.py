r"""Random probe vectors :math:`\omega` with :math:`\mathbb{E}[\omega \omega^\top] = I`, and the
column-wise reductions the estimators apply to them and their products.

The reductions loop over the ``k`` columns instead of forming the elementwise
product ``[P, k]``: for a model-sized ``P`` that product is as large as the
probes themselves.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from curvext.linalg.adapter import as_square_operator
from curvext.linalg.checks import assert_positive_int, check_distribution


def random_vectors(
    dim: int,
    num: int,
    distribution: str,
    dtype: torch.dtype,
    device: torch.device,
    generator: Optional[torch.Generator] = None,
) -> Tensor:
    """``num`` probe vectors as the columns of a ``[dim, num]`` matrix.

    Args:
        dim: Their length ``P``.
        num: How many.
        distribution: ``"rademacher"`` (entries ``±1`` with equal probability)
            or ``"normal"`` (standard normal entries).
        dtype: Their dtype.
        device: Their device.
        generator: The random number generator (default: torch's global one).

    Example:
        >>> V = random_vectors(3, 2, "rademacher", torch.float64, torch.device("cpu"))
        >>> V.shape, bool((V.abs() == 1).all())
        (torch.Size([3, 2]), True)
    """
    if distribution == "rademacher":
        # drawn in ``dtype`` (the same draws as int64) and mapped to ±1 in place:
        # no int64 [dim, num] and no temporaries
        signs = torch.randint(0, 2, (dim, num), generator=generator, dtype=dtype, device=device)
        return signs.mul_(2).sub_(1)
    return torch.randn(dim, num, generator=generator, dtype=dtype, device=device)


def probed(
    A, num_matvecs: int, distribution: str, generator: Optional[torch.Generator], owner: str
) -> Tuple[Tensor, Tensor]:
    """The probes ``Ω [P, k]`` of a Hutchinson estimator and ``A Ω``, after its
    argument checks (``A`` square, ``num_matvecs`` a positive int, a known
    distribution; the errors name ``owner``)."""
    A = as_square_operator(A, owner)
    num_matvecs = assert_positive_int(num_matvecs, "num_matvecs", owner)
    check_distribution(distribution, owner)
    probes = random_vectors(A.dim, num_matvecs, distribution, A.dtype, A.device, generator)
    return probes, A @ probes


def column_dots(first: Tensor, second: Tensor) -> Tensor:
    r"""``[k]``: :math:`\mathbf{a}_j^\top \mathbf{b}_j` for the columns of ``first`` and
    ``second`` ``[P, k]``.

    ``(first * second).sum(0)`` without the ``[P, k]`` product.

    Example:
        >>> a = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
        >>> column_dots(a, a).tolist()
        [10.0, 20.0]
    """
    dtype = torch.promote_types(first.dtype, second.dtype)
    return torch.stack(
        [torch.dot(a.to(dtype), b.to(dtype)) for a, b in zip(first.unbind(1), second.unbind(1))]
    )


def sum_column_products(first: Tensor, second: Tensor) -> Tensor:
    r"""``[P]``: :math:`\sum_j \mathbf{a}_j \odot \mathbf{b}_j` for ``first`` and
    ``second`` ``[P, k]``.

    ``(first * second).sum(1)`` without the ``[P, k]`` product.

    Example:
        >>> a = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
        >>> sum_column_products(a, a).tolist()
        [5.0, 25.0]
    """
    total = torch.zeros(
        first.shape[0],
        dtype=torch.promote_types(first.dtype, second.dtype),
        device=first.device,
    )
    for a, b in zip(first.unbind(1), second.unbind(1)):
        total.addcmul_(a, b)
    return total
