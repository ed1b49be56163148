r"""Inverse Hessian-vector products by conjugate gradients on Hessian-vector products.

Solves :math:`(\nabla^2_\theta f(x) + \lambda I)\, u = v` for all ``M``
right-hand sides at once with :class:`curvext.linalg.CGInverse`: every
iteration is one batched Hessian-vector product, the Hessian is never formed.

Hestenes, M. R., & Stiefel, E. (1952). Methods of conjugate gradients for
solving linear systems. Journal of Research of the National Bureau of Standards.
Koh, P. W., & Liang, P. (2017). Understanding black-box predictions via
influence functions. ICML.
"""

from __future__ import annotations

from typing import Callable

from torch import Tensor

from curvext.functional._checks import at_each_x, check_mode
from curvext.functional.hvp import HessianVectorOperator
from curvext.linalg.inverse import CGInverse


def ihvp_cg(
    func: Callable,
    argnums: int = 0,
    max_iter: int = 10,
    tol: float = 1e-7,
    mode: str = "rev-rev",
    regularization: float = 0.0,
) -> Callable:
    r""":math:`(\nabla^2_\theta f(x) + \lambda I)^{-1} v` by conjugate gradients.

    dattri's ``ihvp_cg``; the returned ``ihvp_func(x, v)`` takes the tuple of
    ``func``'s arguments and ``v`` ``[D]`` or ``[M, D]``. See
    :func:`ihvp_at_x_cg` for the arguments.

    Example:
        >>> import torch
        >>> A = torch.tensor([[4.0, 1.0], [1.0, 3.0]], dtype=torch.float64)
        >>> f = lambda w: 0.5 * w @ A @ w
        >>> w = torch.zeros(2, dtype=torch.float64)
        >>> u = ihvp_cg(f, max_iter=2)((w,), torch.tensor([1.0, 2.0], dtype=torch.float64))
        >>> u.round(decimals=6).tolist()
        [0.090909, 0.636364]
    """
    check_mode(mode, "ihvp_cg")

    return at_each_x(
        ihvp_at_x_cg,
        func,
        "ihvp_cg",
        argnums=argnums,
        max_iter=max_iter,
        tol=tol,
        mode=mode,
        regularization=regularization,
    )


def ihvp_at_x_cg(
    func: Callable,
    *x: Tensor,
    argnums: int = 0,
    max_iter: int = 10,
    tol: float = 1e-7,
    mode: str = "rev-rev",
    regularization: float = 0.0,
) -> Callable:
    r""":math:`(\nabla^2_\theta f(x) + \lambda I)^{-1} v` by conjugate gradients at fixed ``x``.

    CG needs :math:`\nabla^2_\theta f(x) + \lambda I` symmetric positive
    definite; a direction of non-positive curvature raises instead of
    iterating on (raise ``regularization``). Unlike dattri, ``tol`` is
    honoured: a column stops once :math:`\|r\| \le \mathrm{tol}\,\|v\|`;
    a column not converged after ``max_iter`` iterations warns
    (:class:`RuntimeWarning`) and returns its iterate. CG is exact after
    ``D`` iterations in exact arithmetic.

    Args:
        func: A function of tensors returning a single-element tensor.
        *x: ``func``'s positional arguments; ``x[argnums]`` a vector ``[D]``.
        argnums: Which argument :math:`\theta` (default ``0``).
        max_iter: The most CG iterations (default ``10``, dattri's).
        tol: Relative residual tolerance (default ``1e-7``).
        mode: ``"rev-rev"`` (default) or ``"rev-fwd"`` for the products.
        regularization: :math:`\lambda` (default ``0.0``).

    Returns:
        ``ihvp_func(v)`` for ``v`` ``[D]`` or ``[M, D]``, returning the same shape.

    Raises:
        ValueError: For an unknown ``mode``, a non-vector ``x[argnums]``, a
            badly shaped ``v``, or a Hessian found not positive definite.

    Example:
        >>> import torch
        >>> f = lambda w: (torch.arange(1.0, 4.0, dtype=w.dtype) * w**2).sum() / 2
        >>> ihvp = ihvp_at_x_cg(f, torch.zeros(3, dtype=torch.float64), max_iter=3)
        >>> ihvp(torch.ones(2, 3, dtype=torch.float64))[0].round(decimals=6).tolist()
        [1.0, 0.5, 0.333333]
    """
    operator = HessianVectorOperator(func, x, argnums, mode, regularization, owner="ihvp_at_x_cg")
    inverse = CGInverse(operator, tol=tol, max_iter=max_iter)

    def ihvp_func(v: Tensor) -> Tensor:
        rows = operator.rows(v)
        return (inverse @ rows.T).T.reshape(v.shape)

    return ihvp_func
