r"""XTrace: exchangeable trace estimation (Epperly, Tropp & Webber, 2024)."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from curvext.linalg.adapter import as_square_operator
from curvext.linalg.checks import assert_num_matvecs, check_distribution
from curvext.linalg.sampling import column_dots, random_vectors


def exchangeable_sketch(A, num_matvecs, distribution, generator, owner: str):
    """The start that XTrace and XDiag share: check the arguments, draw
    ``m = num_matvecs // 2`` probes ``Ω [P, m]`` and orthogonalise ``A Ω = Q R``.

    Returns:
        The adapted operator, ``Ω``, ``Q [P, m]`` and ``R [m, m]``.
    """
    A = as_square_operator(A, owner)
    num_matvecs = assert_num_matvecs(
        num_matvecs, owner, minimum=4, dim=A.dim, multiple_of=2, maximum=2 * A.dim
    )
    check_distribution(distribution, owner)
    probes = random_vectors(A.dim, num_matvecs // 2, distribution, A.dtype, A.device, generator)
    sketch = A @ probes
    basis, triangular = torch.linalg.qr(sketch)
    return A, probes, sketch, basis, triangular


class LeaveOneOut:
    r"""The projectors :math:`\boldsymbol{\Pi}_i` onto the span of :math:`\mathbf{R}` without
    column :math:`i`.

    For :math:`\mathbf{Y} = \mathbf{Q}\mathbf{R}` (``R`` ``[m, m]``), an
    orthonormal basis :math:`\mathbf{Q}_i` of :math:`\mathbf{Y}` without its
    :math:`i`-th column satisfies :math:`\mathbf{Q}_i\mathbf{Q}_i^\top =
    \mathbf{Q}\boldsymbol{\Pi}_i\mathbf{Q}^\top`. For invertible
    :math:`\mathbf{R}`, :math:`\boldsymbol{\Pi}_i = \mathbf{I} -
    \mathbf{s}_i\mathbf{s}_i^\top` with the unit vector
    :math:`\mathbf{s}_i \propto \mathbf{R}^{-\top}\mathbf{e}_i` (orthogonal to
    every column of :math:`\mathbf{R}` but the :math:`i`-th), an
    :math:`O(m^3)` computation. A numerically singular :math:`\mathbf{R}`
    (:math:`\mathbf{A}` of rank below :math:`m`, where XTrace and XDiag are
    exact) has no such :math:`\mathbf{s}_i`; the projectors then come from
    one batched SVD of the :math:`m` matrices :math:`\mathbf{R}_{-i}`, an
    :math:`O(m^4)` computation.

    Example:
        >>> R = torch.tensor([[1.0, 1.0], [0.0, 1.0]], dtype=torch.float64)
        >>> identity = torch.eye(2, dtype=torch.float64)
        >>> LeaveOneOut(R).apply(identity).round(decimals=6).tolist()  # Π_i e_i
        [[0.5, 0.0], [0.5, 0.0]]
    """

    def __init__(self, triangular: Tensor):
        size = triangular.shape[0]
        diagonal = triangular.diagonal().abs()
        rtol = 10 * size * torch.finfo(triangular.dtype).eps
        self.normals = self.projectors = None
        if diagonal.min() > rtol * diagonal.max():
            identity = torch.eye(size, dtype=triangular.dtype, device=triangular.device)
            normals = torch.linalg.solve_triangular(triangular, identity, upper=True).T
            self.normals = normals / normals.norm(dim=0, keepdim=True)
        else:
            indices = torch.arange(size, device=triangular.device)
            keep = indices.unsqueeze(0) != indices.unsqueeze(1)
            others = indices.expand(size, size)[keep].reshape(size, size - 1)
            without_column = triangular[:, others].permute(1, 0, 2)  # [i, m, m - 1]
            left, values, _ = torch.linalg.svd(without_column, full_matrices=False)
            left = left * (values > rtol * diagonal.max()).unsqueeze(1)
            self.projectors = left @ left.mT

    def apply(self, columns: Tensor) -> Tensor:
        r"""Column :math:`i` of ``columns`` ``[m, m]`` times :math:`\boldsymbol{\Pi}_i`."""
        if self.normals is not None:
            normals = self.normals
            return columns - normals * (normals * columns).sum(0, keepdim=True)
        return torch.einsum("iab,bi->ai", self.projectors, columns)

    def traces(self, matrix: Tensor) -> Tensor:
        r""":math:`\mathrm{Tr}(\mathbf{H}\boldsymbol{\Pi}_i)` for ``matrix``
        :math:`\mathbf{H}`, ``[m]``."""
        if self.normals is not None:
            return matrix.trace() - (self.normals * (matrix @ self.normals)).sum(0)
        return torch.einsum("ab,iba->i", matrix, self.projectors)

    def mean(self) -> Tensor:
        r""":math:`\frac{1}{m}\sum_i \boldsymbol{\Pi}_i` ``[m, m]``."""
        if self.normals is not None:
            size = self.normals.shape[0]
            identity = torch.eye(size, dtype=self.normals.dtype, device=self.normals.device)
            return identity - self.normals @ self.normals.T / size
        return self.projectors.mean(0)


def xtrace(
    A,
    num_matvecs: int,
    distribution: str = "rademacher",
    generator: Optional[torch.Generator] = None,
) -> Tensor:
    r"""Estimate :math:`\mathrm{Tr}(\mathbf{A})` with XTrace.

    Hutch++ uses some probes for a basis and others for Hutchinson's estimator;
    XTrace uses each of its :math:`m = k/2` probes :math:`\boldsymbol{\omega}_i`
    for both. With :math:`\mathbf{Q}_i` an orthonormal basis of
    :math:`\mathbf{A}\boldsymbol{\Omega}_{-i}` (all probes but the
    :math:`i`-th), it averages the :math:`m` unbiased estimates

    .. math::
        \widehat{\mathrm{Tr}}_i
        = \mathrm{Tr}(\mathbf{Q}_i^\top \mathbf{A} \mathbf{Q}_i)
        + \boldsymbol{\omega}_i^\top (\mathbf{I} - \mathbf{Q}_i\mathbf{Q}_i^\top)
          \mathbf{A} (\mathbf{I} - \mathbf{Q}_i\mathbf{Q}_i^\top)
          \boldsymbol{\omega}_i .

    All :math:`\mathbf{Q}_i` come from one QR decomposition
    :math:`\mathbf{A}\boldsymbol{\Omega} = \mathbf{Q}\mathbf{R}`, as
    :math:`\mathbf{Q}_i\mathbf{Q}_i^\top = \mathbf{Q}(\mathbf{I} -
    \mathbf{s}_i\mathbf{s}_i^\top)\mathbf{Q}^\top` with
    :math:`\mathbf{s}_i \propto \mathbf{R}^{-\top}\mathbf{e}_i`, so the
    products are two ``A @ X`` calls (:math:`\mathbf{A}\boldsymbol{\Omega}` and
    :math:`\mathbf{A}\mathbf{Q}`). The estimate is exact when
    :math:`\mathrm{rank}(\mathbf{A}) < m`. This is the basic estimator
    (Algorithm 1.2), without the normalisation of the "improved" variant.

    Epperly, E. N., Tropp, J. A., & Webber, R. J. (2024). XTrace: Making the most
    of every sample in stochastic trace estimation. SIAM Journal on Matrix
    Analysis and Applications. https://arxiv.org/abs/2301.07825

    Args:
        A: A square ``[P, P]`` operator (a curvext operator, a tensor, or anything
            with ``.shape``, ``.dtype``, ``.device`` and ``A @ X``).
        num_matvecs: The budget :math:`k` of products with ``A``: even,
            at least ``4`` and at most ``2 P``.
        distribution: ``"rademacher"`` (default) or ``"normal"``.
        generator: The random number generator (default: torch's global one).

    Returns:
        The estimate, a 0-d tensor.

    Raises:
        ValueError: If ``A`` is not square, ``num_matvecs`` is odd, below ``4``
            or above ``2 P``, or the distribution is unknown.

    Example:
        >>> u = torch.tensor([[1.0], [2.0], [0.0], [2.0]], dtype=torch.float64)
        >>> A = u @ u.T  # rank one < m = 2 test vectors: exact
        >>> round(xtrace(A, num_matvecs=4).item(), 8)
        9.0
    """
    A, probes, sketch, basis, triangular = exchangeable_sketch(
        A, num_matvecs, distribution, generator, "xtrace"
    )
    basis_products = A @ basis
    projected = basis.T @ basis_products
    leave_one_out = LeaveOneOut(triangular)
    # Tr(Q_i^T A Q_i) = Tr(Q^T A Q Π_i)
    subspace_traces = leave_one_out.traces(projected)
    # (I - Q_i Q_i^T) A (I - Q_i Q_i^T) ω_i for all i at once, Q_i Q_i^T = Q Π_i Q^T
    products_off_basis = sketch - basis_products @ leave_one_out.apply(basis.T @ probes)
    products_off_basis = products_off_basis - basis @ leave_one_out.apply(
        basis.T @ products_off_basis
    )
    corrections = column_dots(probes, products_off_basis)
    return (subspace_traces + corrections).mean()
