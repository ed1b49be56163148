r"""Random probe vectors :math:`\omega` with :math:`\mathbb{E}[\omega \omega^\top] = I`."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


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
        signs = torch.randint(0, 2, (dim, num), generator=generator, device=device)
        return (2 * signs - 1).to(dtype)
    return torch.randn(dim, num, generator=generator, dtype=dtype, device=device)
