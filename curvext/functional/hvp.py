r"""Hessian-vector products of a plain function, by nested automatic differentiation.

For a scalar function :math:`f(x_0, \dots, x_{n-1})` and the argument
:math:`\theta = x_{\mathrm{argnums}}`,

.. math::
    \mathrm{hvp}(x, v) = \nabla^2_\theta f(x)\, v + \lambda v

without forming the Hessian (Pearlmutter, 1994): ``"rev-rev"`` takes the
vector-Jacobian product of the gradient, ``"rev-fwd"`` its Jacobian-vector
product (forward over reverse, less memory). :math:`\lambda` is the
``regularization``.

Pearlmutter, B. A. (1994). Fast exact multiplication by the Hessian.
Neural Computation.
"""

from __future__ import annotations

from typing import Callable, Tuple

from torch import Tensor
from torch.func import grad, jvp, vjp, vmap

from curvext.functional._checks import (
    as_arguments,
    as_rows,
    check_argnums,
    check_mode,
    flat_dim,
)
from curvext.linear import LinearOperator
from curvext.torch_quirks import load_forward_ad_quietly


def _product(grad_func, x: Tuple[Tensor, ...], argnums: int, mode: str):
    """``v -> H v`` at ``x`` (no regularization), linearising the gradient once for ``rev-rev``.

    Only ``x[argnums]`` is differentiated, the other arguments are constants:
    no products with the data are formed, and integer arguments (class labels)
    work. (dattri differentiates every argument, so it fails on integer ones.)
    """
    before, theta, after = x[:argnums], x[argnums], x[argnums + 1 :]

    def gradient(parameters: Tensor) -> Tensor:
        return grad_func(*before, parameters, *after)

    if mode == "rev-rev":
        _, vjp_fn = vjp(gradient, theta)
        return lambda v: vjp_fn(v)[0]
    load_forward_ad_quietly()
    return lambda v: jvp(gradient, (theta,), (v,))[1]


def hvp(
    func: Callable,
    argnums: int = 0,
    mode: str = "rev-rev",
    regularization: float = 0.0,
) -> Callable:
    r"""The Hessian-vector product :math:`(x, v) \mapsto \nabla^2_\theta f(x) v + \lambda v`.

    dattri's ``hvp``: the returned function takes ``x``, the tuple of
    ``func``'s positional arguments (a lone tensor is accepted too), and ``v``
    of the shape of ``x[argnums]``; it is a pure ``torch.func`` function, so
    ``vmap`` over ``x`` or ``v`` works.

    Args:
        func: A function of tensors returning a single-element tensor.
        argnums: Which positional argument :math:`\theta` the Hessian is taken
            with respect to (default ``0``).
        mode: ``"rev-rev"`` (reverse over reverse, default; works for every
            operator) or ``"rev-fwd"`` (forward over reverse; less memory).
        regularization: :math:`\lambda`, added as ``regularization * v``
            (default ``0.0``).

    Returns:
        ``hvp_func(x, v)`` returning :math:`\nabla^2_\theta f(x) v + \lambda v`,
        shaped like ``v``.

    Raises:
        ValueError: If ``mode`` is neither ``"rev-rev"`` nor ``"rev-fwd"``.

    Example:
        >>> import torch
        >>> f = lambda w, a: (a * w**2).sum()  # Hessian diag(2a)
        >>> w, a = torch.ones(3), torch.tensor([1.0, 2.0, 3.0])
        >>> hvp(f, mode="rev-fwd", regularization=1.0)((w, a), torch.ones(3)).tolist()
        [3.0, 5.0, 7.0]
    """
    check_mode(mode, "hvp")
    grad_func = grad(func, argnums=argnums)

    def hvp_func(x, v: Tensor) -> Tensor:
        arguments = as_arguments(x, "hvp")
        index = check_argnums(argnums, arguments, "hvp")
        return _product(grad_func, arguments, index, mode)(v) + regularization * v

    return hvp_func


def hvp_at_x(
    func: Callable,
    x,
    argnums: int = 0,
    mode: str = "rev-rev",
    regularization: float = 0.0,
) -> Callable:
    r"""The Hessian-vector product at a fixed point:
    :math:`v \mapsto \nabla^2_\theta f(x) v + \lambda v`.

    dattri's ``hvp_at_x``: with ``"rev-rev"`` the gradient is linearised once
    at ``x`` and every call only runs the backward pass of that linearisation.

    Args:
        func: A function of tensors returning a single-element tensor.
        x: The tuple of ``func``'s positional arguments (or a lone tensor).
        argnums: Which argument :math:`\theta` (default ``0``).
        mode: ``"rev-rev"`` (default) or ``"rev-fwd"``.
        regularization: :math:`\lambda` (default ``0.0``).

    Returns:
        ``hvp_func(v)`` for ``v`` shaped like ``x[argnums]``.

    Raises:
        ValueError: If ``mode`` is unknown or ``argnums`` out of range.

    Example:
        >>> import torch
        >>> f = lambda w: (w**3).sum() / 6  # Hessian diag(w)
        >>> hvp_at_x(f, (torch.tensor([1.0, 2.0]),))(torch.ones(2)).tolist()
        [1.0, 2.0]
    """
    check_mode(mode, "hvp_at_x")
    arguments = as_arguments(x, "hvp_at_x")
    index = check_argnums(argnums, arguments, "hvp_at_x")
    product = _product(grad(func, argnums=index), arguments, index, mode)
    return lambda v: product(v) + regularization * v


class HessianVectorOperator(LinearOperator):
    r""":math:`\nabla^2_\theta f(x) + \lambda I` at fixed ``x`` as a ``[D, D]`` operator.

    A :class:`~curvext.linear.LinearOperator`: ``.shape``, ``.dtype``,
    ``.device`` and ``@`` on ``[D]`` and ``[D, M]`` (the ``M`` products in one
    ``vmap``), so the solvers of :mod:`curvext.linalg` accept it.

    Args:
        func: A function of tensors returning a single-element tensor.
        x: The tuple of ``func``'s positional arguments; ``x[argnums]`` a vector ``[D]``.
        argnums: Which argument :math:`\theta` (default ``0``).
        mode: ``"rev-rev"`` (default) or ``"rev-fwd"``.
        regularization: :math:`\lambda` (default ``0.0``).
        owner: The public function using it, for error messages.

    Example:
        >>> import torch
        >>> H = HessianVectorOperator(lambda w: (w**2).sum(), (torch.ones(2),))
        >>> H.shape, (H @ torch.eye(2)).tolist()
        ((2, 2), [[2.0, 0.0], [0.0, 2.0]])
    """

    def __init__(
        self,
        func: Callable,
        x,
        argnums: int = 0,
        mode: str = "rev-rev",
        regularization: float = 0.0,
        owner: str = "HessianVectorOperator",
    ):
        check_mode(mode, owner)
        arguments = as_arguments(x, owner)
        index = check_argnums(argnums, arguments, owner)
        self.dim = flat_dim(arguments, index, owner)
        self.owner = owner
        super().__init__((self.dim, self.dim), arguments[index].dtype, arguments[index].device)
        self._product = hvp_at_x(func, arguments, index, mode, regularization)

    def _matmat(self, matrix: Tensor) -> Tensor:
        """``H @ matrix`` for ``matrix`` ``[D, M]`` (one column without ``vmap``, so a
        function ``vmap`` cannot batch still multiplies vectors)."""
        if matrix.shape[1] == 1:
            return self._product(matrix[:, 0]).unsqueeze(1)
        return vmap(self._product, in_dims=1, out_dims=1)(matrix)

    @property
    def T(self) -> "HessianVectorOperator":
        """The Hessian is symmetric."""
        return self

    def rows(self, v: Tensor) -> Tensor:
        """``v`` ``[D]`` or ``[M, D]`` checked and returned as ``[M, D]``."""
        return as_rows(v, self.dim, self.owner)
