r"""Inverse Hessian-vector products through the dense Hessian.

.. math::
    \mathrm{ihvp}(x, v) = \bigl(\nabla^2_\theta f(x) + \lambda I\bigr)^{-1} v,

with the ``[D, D]`` Hessian from :func:`torch.func.hessian` and one
:func:`torch.linalg.solve` for all ``M`` vectors. Exact, :math:`O(D^2)`
memory: a reference for the matrix-free methods on small problems.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor
from torch.func import hessian

from curvext.functional._checks import as_rows, at_each_x, check_argnums, flat_dim


def ihvp_explicit(func: Callable, argnums: int = 0, regularization: float = 0.0) -> Callable:
    r"""The exact :math:`(\nabla^2_\theta f(x) + \lambda I)^{-1} v` by a dense solve.

    dattri's ``ihvp_explicit``. The returned function takes ``x`` (the tuple
    of ``func``'s arguments, ``x[argnums]`` a vector ``[D]``) and ``v``
    ``[D]`` or ``[M, D]`` (one vector a row) and returns the same shape.

    Args:
        func: A function of tensors returning a single-element tensor.
        argnums: Which argument :math:`\theta` (default ``0``).
        regularization: :math:`\lambda`, added to the Hessian's diagonal (default ``0.0``).

    Returns:
        ``ihvp_func(x, v)``.

    Raises:
        ValueError: If ``x[argnums]`` is not a vector or ``v`` has the wrong shape.

    Example:
        >>> import torch
        >>> f = lambda w: (torch.tensor([1.0, 4.0], dtype=w.dtype) * w**2).sum()  # H = diag(2, 8)
        >>> w = torch.zeros(2, dtype=torch.float64)
        >>> ihvp_explicit(f)((w,), torch.ones(2, dtype=torch.float64)).tolist()
        [0.5, 0.125]
    """
    return at_each_x(
        ihvp_at_x_explicit,
        func,
        "ihvp_explicit",
        argnums=argnums,
        regularization=regularization,
    )


def ihvp_at_x_explicit(
    func: Callable, *x: Tensor, argnums: int = 0, regularization: float = 0.0
) -> Callable:
    r"""The exact inverse Hessian-vector product at fixed ``x``; the Hessian is formed once.

    dattri's ``ihvp_at_x_explicit``: ``x`` are ``func``'s positional arguments.

    Args:
        func: A function of tensors returning a single-element tensor.
        *x: ``func``'s positional arguments; ``x[argnums]`` a vector ``[D]``.
        argnums: Which argument :math:`\theta` (default ``0``).
        regularization: :math:`\lambda` (default ``0.0``).

    Returns:
        ``ihvp_func(v)`` for ``v`` ``[D]`` or ``[M, D]``, returning the same shape.

    Example:
        >>> import torch
        >>> f = lambda w: (w**2).sum()  # H = 2 I
        >>> ihvp = ihvp_at_x_explicit(f, torch.zeros(2, dtype=torch.float64), regularization=2.0)
        >>> ihvp(torch.ones(2, dtype=torch.float64)).tolist()
        [0.25, 0.25]
    """
    owner = "ihvp_at_x_explicit"
    index = check_argnums(argnums, x, owner)
    dim = flat_dim(x, index, owner)
    matrix = hessian(func, argnums=index)(*x)
    matrix = matrix + regularization * torch.eye(dim, dtype=matrix.dtype, device=matrix.device)

    def ihvp_func(v: Tensor) -> Tensor:
        rows = as_rows(v, dim, owner)
        return torch.linalg.solve(matrix, rows.T).T.reshape(v.shape)

    return ihvp_func
