r"""One view of every square linear operator :mod:`curvext.linalg` works on.

A curvext :class:`~curvext.operators.CurvatureOperator`, a dense
``torch.Tensor`` ``[P, P]``, or any object with ``.shape == (P, P)``,
``.dtype``, ``.device`` and ``A @ X`` for ``X`` ``[P, M]`` (the inverses of
this package included) is wrapped once by :func:`as_square_operator`; the
estimators then only call ``view @ X`` with a matrix of probe vectors.
"""

from __future__ import annotations

from torch import Tensor

from curvext.linalg.checks import assert_is_square
from curvext.linear import LinearOperator


class SquareOperator(LinearOperator):
    """A checked ``[P, P]`` operator: ``dim``, ``dtype``, ``device`` and ``@`` on ``[P, M]``.

    Args:
        A: The operator to wrap.
        owner: The function using it, for error messages.

    Example:
        >>> import torch
        >>> A = as_square_operator(torch.eye(3, dtype=torch.float64), "f")
        >>> A.dim, A.dtype, (A @ torch.ones(3, 2, dtype=torch.float64)).shape
        (3, torch.float64, torch.Size([3, 2]))
    """

    def __init__(self, A, owner: str):
        self.dim = assert_is_square(A, owner)
        missing = [name for name in ("dtype", "device") if not hasattr(A, name)]
        if missing or not hasattr(A, "__matmul__"):
            raise TypeError(
                f"{owner}: A must expose .shape, .dtype, .device and A @ X, got "
                f"{type(A).__name__} without {', '.join(missing) or '@'}."
            )
        super().__init__((self.dim, self.dim), A.dtype, A.device)
        self.operator, self.owner = A, owner

    def _matmat(self, matrix: Tensor) -> Tensor:
        """``A @ matrix`` for ``matrix`` ``[P, M]``."""
        product = self.operator @ matrix
        if not isinstance(product, Tensor) or product.shape != matrix.shape:
            raise TypeError(
                f"{self.owner}: A @ X must return a tensor of X's shape "
                f"{list(matrix.shape)}, got {getattr(product, 'shape', type(product))}."
            )
        return product

    def transposed_matmul(self, matrix: Tensor) -> Tensor:
        """``A^T @ matrix``, through ``A.T`` (curvext operators are symmetric)."""
        transpose = getattr(self.operator, "T", None)
        if transpose is None:
            raise TypeError(
                f"{self.owner}: needs products with A^T, but "
                f"{type(self.operator).__name__} has no .T."
            )
        return transpose @ matrix

    _rmatmat = transposed_matmul  # the root's hook, for to_scipy()


def as_square_operator(A, owner: str) -> SquareOperator:
    """Wrap ``A`` (checked to be square and to multiply matrices) for ``owner``.

    Raises:
        TypeError: If ``A`` lacks ``.shape``, ``.dtype``, ``.device`` or ``@``.
        ValueError: If ``A`` is not square.
    """
    if isinstance(A, SquareOperator):
        return A
    return SquareOperator(A, owner)
