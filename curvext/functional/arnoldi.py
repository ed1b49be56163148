r"""Inverse Hessian-vector products in the top eigenspace found by Arnoldi iteration.

Arnoldi iteration (here on a symmetric matrix, so Lanczos with full
re-orthogonalisation) from a random start :math:`q_0` builds an orthonormal
basis :math:`Q_k` of the Krylov space
:math:`\mathrm{span}\{q_0, Hq_0, \dots, H^{k-1}q_0\}` and the projection
:math:`T_k = Q_k^\top H Q_k`. The ``top_k`` eigenpairs
:math:`(\lambda_i, Q_k s_i)` of :math:`T_k` with the largest :math:`|\lambda_i|`
approximate those of :math:`H = \nabla^2_\theta f(x) + \lambda I`, and

.. math::
    H^{-1} v \approx \sum_{i=1}^{\mathrm{top\_k}} \frac{u_i^\top v}{\lambda_i}\, u_i,
    \qquad u_i = Q_k s_i .

With ``max_iter > D`` and ``top_k = D`` the result is exact.

Schioppa, A., Zablotskaia, P., Vilar, D., & Sokolov, A. (2022). Scaling up
influence functions. AAAI.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

from curvext.functional._checks import at_each_x, check_mode
from curvext.functional.hvp import HessianVectorOperator
from curvext.linalg.checks import assert_positive_int, check_positive


def ihvp_arnoldi(
    func: Callable,
    argnums: int = 0,
    max_iter: int = 100,
    top_k: int = 100,
    norm_constant: float = 1.0,
    tol: float = 1e-7,
    mode: str = "rev-fwd",
    regularization: float = 0.0,
) -> Callable:
    r""":math:`(\nabla^2_\theta f(x) + \lambda I)^{-1} v` in the top Arnoldi eigenspace.

    dattri's ``ihvp_arnoldi``; the returned ``ihvp_func(x, v)`` takes the
    tuple of ``func``'s arguments and ``v`` ``[D]`` or ``[M, D]``, and runs
    the iteration at that ``x``. See :func:`ihvp_at_x_arnoldi` for the arguments.

    Example:
        >>> import torch
        >>> f = lambda w: (torch.tensor([1.0, 2.0, 4.0], dtype=w.dtype) * w**2).sum() / 2
        >>> ihvp = ihvp_arnoldi(f, max_iter=4, top_k=3)
        >>> w = torch.zeros(3, dtype=torch.float64)
        >>> ihvp((w,), torch.ones(3, dtype=torch.float64)).round(decimals=6).tolist()
        [1.0, 0.5, 0.25]
    """
    check_mode(mode, "ihvp_arnoldi")

    return at_each_x(
        ihvp_at_x_arnoldi,
        func,
        "ihvp_arnoldi",
        argnums=argnums,
        max_iter=max_iter,
        top_k=top_k,
        norm_constant=norm_constant,
        tol=tol,
        mode=mode,
        regularization=regularization,
    )


def ihvp_at_x_arnoldi(
    func: Callable,
    *x: Tensor,
    argnums: int = 0,
    max_iter: int = 100,
    top_k: int = 100,
    norm_constant: float = 1.0,
    tol: float = 1e-7,
    mode: str = "rev-fwd",
    regularization: float = 0.0,
) -> Callable:
    r""":math:`(\nabla^2_\theta f(x) + \lambda I)^{-1} v` in the top Arnoldi eigenspace at
    fixed ``x``.

    The iteration runs once, when this function is called (from a random
    start drawn with the global generator); the returned function only
    projects onto the ``top_k`` eigenvectors.

    Args:
        func: A function of tensors returning a single-element tensor.
        *x: ``func``'s positional arguments; ``x[argnums]`` a vector ``[D]``.
        argnums: Which argument :math:`\theta` (default ``0``).
        max_iter: Krylov dimension plus one (capped at ``D + 1``; default ``100``).
        top_k: How many eigenpairs of largest magnitude to keep (default ``100``;
            fewer are kept when the Krylov space is smaller).
        norm_constant: The norm the basis vectors are stored with (dattri's
            and jax-influence's guard against tiny components in very high
            dimension); the result does not depend on it in exact arithmetic
            (default ``1.0``).
        tol: The iteration stops early once the new direction's norm (relative
            to ``norm_constant``) falls below ``tol``: the Krylov space is
            invariant (default ``1e-7``).
        mode: ``"rev-fwd"`` (default, dattri's) or ``"rev-rev"``.
        regularization: :math:`\lambda` (default ``0.0``).

    Returns:
        ``ihvp_func(v)`` for ``v`` ``[D]`` or ``[M, D]``, returning the same
        shape. It has ``eigenvalues`` ``[k]`` and ``eigenvectors`` ``[k, D]``
        (orthonormal rows) as attributes.

    Raises:
        ValueError: For an unknown ``mode``, ``max_iter < 2``, ``top_k < 1``,
            a non-positive ``norm_constant``, a non-vector ``x[argnums]`` or a
            badly shaped ``v``.

    Example:
        >>> import torch
        >>> f = lambda w: (torch.tensor([1.0, 2.0, 4.0], dtype=w.dtype) * w**2).sum() / 2
        >>> ihvp = ihvp_at_x_arnoldi(f, torch.zeros(3, dtype=torch.float64), max_iter=4, top_k=1)
        >>> ihvp.eigenvalues.round(decimals=6).tolist()  # keeps only the largest
        [4.0]
    """
    owner = "ihvp_at_x_arnoldi"
    max_iter = assert_positive_int(max_iter, "max_iter", owner, minimum=2)
    top_k = assert_positive_int(top_k, "top_k", owner)
    scale = check_positive(norm_constant, "norm_constant", owner)
    operator = HessianVectorOperator(func, x, argnums, mode, regularization, owner=owner)
    eigenvalues, eigenvectors = _arnoldi_eigenpairs(operator, max_iter, top_k, scale, tol)

    def ihvp_func(v: Tensor) -> Tensor:
        rows = operator.rows(v)
        coefficients = (rows @ eigenvectors.T) / eigenvalues
        return (coefficients @ eigenvectors).reshape(v.shape)

    ihvp_func.eigenvalues, ihvp_func.eigenvectors = eigenvalues, eigenvectors
    return ihvp_func


def _remove_components(direction: Tensor, rows: Tensor, column: Tensor, scale: float) -> Tensor:
    """``direction`` minus its projections onto ``rows`` ``[k, D]`` (of norm ``scale``).

    The coefficients are added to ``column`` ``[k]`` (of the projection matrix).
    """
    coefficients = (rows @ direction).div_(scale**2)
    column += coefficients.to(column.device)
    return torch.addmv(direction, rows.T, coefficients, alpha=-1.0)


def _arnoldi_eigenpairs(
    operator: HessianVectorOperator, max_iter: int, top_k: int, scale: float, tol: float
):
    """The ``top_k`` Ritz pairs ``([k], [k, D])`` by largest magnitude, eigenvectors orthonormal."""
    num_steps = min(operator.dim + 1, max_iter)
    start = torch.rand(operator.dim, dtype=operator.dtype, device=operator.device)
    # one preallocated [num_steps, D] basis: its leading rows are a view, never re-stacked
    basis = torch.empty(num_steps, operator.dim, dtype=operator.dtype, device=operator.device)
    basis[0] = start.mul_(scale / start.norm())
    projection = torch.zeros(num_steps, num_steps - 1, dtype=operator.dtype)
    columns = num_steps - 1
    for step in range(num_steps - 1):
        direction = operator @ basis[step]
        # the symmetric three-term recurrence (the last two vectors: all that exact
        # arithmetic needs), then classical Gram-Schmidt against the whole basis,
        # repeated while a pass removes more than 1 - 1/sqrt(2) of the norm (Daniel et
        # al., 1976): orthogonal to working precision with one pass over the basis
        recent = max(step - 1, 0)
        direction = _remove_components(
            direction, basis[recent : step + 1], projection[recent : step + 1, step], scale
        )
        for _ in range(3):
            norm_before = direction.norm()
            direction = _remove_components(
                direction, basis[: step + 1], projection[: step + 1, step], scale
            )
            if direction.norm() > norm_before / math.sqrt(2):
                break
        norm = direction.norm() / scale
        if norm < tol:
            columns = step + 1
            break
        projection[step + 1, step] = norm
        torch.div(direction, norm, out=basis[step + 1])
    square = projection[:columns, :columns].to(operator.device)
    ritz_values, ritz_vectors = torch.linalg.eigh(0.5 * (square + square.T))
    keep = ritz_values.abs().argsort()[-top_k:]
    eigenvectors = (ritz_vectors[:, keep].T @ basis[:columns]).div_(scale)
    return ritz_values[keep], eigenvectors
