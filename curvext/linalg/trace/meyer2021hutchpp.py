r"""Hutch++ trace estimation (Meyer, Musco, Musco & Woodruff, 2021)."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from curvext.linalg.adapter import as_square_operator
from curvext.linalg.checks import assert_num_matvecs, check_distribution
from curvext.linalg.sampling import column_dots, random_vectors


def hutchpp_trace(
    A,
    num_matvecs: int,
    distribution: str = "rademacher",
    generator: Optional[torch.Generator] = None,
) -> Tensor:
    r"""Estimate :math:`\mathrm{Tr}(\mathbf{A})` with Hutch++.

    A third of the budget, :math:`b = \lfloor k/3 \rfloor` probes
    :math:`\mathbf{S}`, finds an orthonormal basis :math:`\mathbf{Q}` of
    :math:`\mathbf{A}\mathbf{S}` (the dominant subspace); the trace on it is
    computed exactly and Hutchinson's estimator with the remaining
    :math:`g = k - 2b` probes :math:`\mathbf{G}` covers the complement,
    :math:`\mathbf{P} = \mathbf{I} - \mathbf{Q}\mathbf{Q}^\top`:

    .. math::
        \widehat{\mathrm{Tr}}(\mathbf{A})
        = \mathrm{Tr}(\mathbf{Q}^\top \mathbf{A} \mathbf{Q})
        + \frac{1}{g} \mathrm{Tr}\bigl(
            (\mathbf{P}\mathbf{G})^\top \mathbf{A} (\mathbf{P}\mathbf{G})\bigr).

    It is unbiased, its error decays as :math:`O(1/k)` instead of
    :math:`O(1/\sqrt{k})` for positive semi-definite :math:`\mathbf{A}`, and it
    is exact when :math:`\mathrm{rank}(\mathbf{A}) \le b`. The products are
    two ``A @ X`` calls: :math:`\mathbf{A}\mathbf{S}`, then
    :math:`\mathbf{A} [\mathbf{Q}, \mathbf{P}\mathbf{G}]`.

    Meyer, R. A., Musco, C., Musco, C., & Woodruff, D. P. (2021). Hutch++:
    Optimal stochastic trace estimation. Symposium on Simplicity in Algorithms
    (SOSA). https://arxiv.org/abs/2010.09649

    Args:
        A: A square ``[P, P]`` operator (a curvext operator, a tensor, or anything
            with ``.shape``, ``.dtype``, ``.device`` and ``A @ X``).
        num_matvecs: The budget :math:`k \ge 3` of products with ``A``; the
            basis has :math:`b = \lfloor k/3 \rfloor \le P` columns.
        distribution: ``"rademacher"`` (default) or ``"normal"``.
        generator: The random number generator (default: torch's global one).

    Returns:
        The estimate, a 0-d tensor.

    Raises:
        ValueError: If ``A`` is not square, ``num_matvecs < 3`` or
            ``num_matvecs // 3 > P``, or the distribution is unknown.

    Example:
        >>> u = torch.tensor([[1.0], [2.0], [0.0], [2.0]], dtype=torch.float64)
        >>> A = u @ u.T  # rank one: exact with a basis of one column
        >>> hutchpp_trace(A, num_matvecs=3).item()
        9.0
    """
    owner = "hutchpp_trace"
    A = as_square_operator(A, owner)
    num_matvecs = assert_num_matvecs(
        num_matvecs, owner, minimum=3, dim=A.dim, maximum=3 * A.dim + 2
    )
    check_distribution(distribution, owner)
    basis_size = num_matvecs // 3
    num_hutchinson = num_matvecs - 2 * basis_size
    sketch = random_vectors(A.dim, basis_size, distribution, A.dtype, A.device, generator)
    basis, _ = torch.linalg.qr(A @ sketch)
    del sketch
    # the second product's operand [Q, P G], filled in place (no concatenated copy)
    operand = torch.empty(A.dim, basis_size + num_hutchinson, dtype=A.dtype, device=A.device)
    operand[:, :basis_size] = basis
    basis, projected = operand[:, :basis_size], operand[:, basis_size:]
    projected.copy_(
        random_vectors(A.dim, num_hutchinson, distribution, A.dtype, A.device, generator)
    )
    projected.sub_(basis @ (basis.T @ projected))
    products = A @ operand
    basis_trace = column_dots(basis, products[:, :basis_size]).sum()
    rest_trace = column_dots(projected, products[:, basis_size:]).sum()
    return basis_trace + rest_trace / num_hutchinson
