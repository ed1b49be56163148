r"""A block of rows and columns of an operator, as an operator.

:class:`Submatrix` multiplies with :math:`\mathbf{A}_{I,J}` by embedding the
vector into the column space of :math:`\mathbf{A}` and picking rows of the
product, so it never forms :math:`\mathbf{A}`.
"""

from __future__ import annotations

from typing import Sequence, Union

import torch
from torch import Tensor

from curvext.linear import LinearOperator

Indices = Union[Sequence[int], Tensor]


def _as_indices(indices: Indices, size: int, what: str) -> Tensor:
    """``indices`` as a 1-d ``int64`` tensor, checked to lie in ``[0, size)``."""
    try:
        index_tensor = torch.as_tensor(indices)
    except (TypeError, ValueError, RuntimeError) as error:
        raise ValueError(
            f"Submatrix: {what} must be a sequence of integers, got {indices!r}."
        ) from error
    if index_tensor.numel() == 0:
        raise ValueError(f"Submatrix: {what} is empty; select at least one index.")
    if (
        index_tensor.ndim != 1
        or index_tensor.dtype.is_floating_point
        or (index_tensor.dtype.is_complex or index_tensor.dtype == torch.bool)
    ):
        raise ValueError(
            f"Submatrix: {what} must be a 1-d sequence of integers, got "
            f"dtype {index_tensor.dtype} and shape {list(index_tensor.shape)}."
        )
    out_of_range = (index_tensor < 0) | (index_tensor >= size)
    if out_of_range.any():
        raise ValueError(
            f"Submatrix: {what} must lie in [0, {size}), got "
            f"{index_tensor[out_of_range][0].item()}."
        )
    return index_tensor.to(torch.int64)


class Submatrix(LinearOperator):
    r"""The rows ``row_idxs`` and columns ``col_idxs`` of an operator: :math:`\mathbf{A}_{I,J}`.

    .. math::
        \mathbf{A}_{I,J}\,\mathbf{x}
        = \bigl(\mathbf{A}\,\mathbf{E}_J\mathbf{x}\bigr)_I ,

    with :math:`\mathbf{E}_J` the embedding that puts entry :math:`j` of
    :math:`\mathbf{x}` at position ``col_idxs[j]`` (repeated indices add up,
    as the columns of :math:`\mathbf{A}_{I,J}` repeat). One product costs one
    ``A @ X`` with a matrix of the same number of columns.

    Args:
        A: The ``[N, P]`` operator: a curvext operator, a tensor, or anything
            with ``.shape``, ``.dtype``, ``.device`` and ``A @ X`` for ``X``
            ``[P, M]`` (and ``.T`` for :attr:`T`).
        row_idxs: The ``R`` rows to keep, integers in ``[0, N)`` (repeats allowed).
        col_idxs: The ``C`` columns to keep, integers in ``[0, P)``.

    Attributes:
        shape: ``(R, C)``.
        dtype: ``A``'s dtype.
        device: ``A``'s device.

    Raises:
        TypeError: If ``A`` has no ``.shape``, ``.dtype``, ``.device`` or ``@``.
        ValueError: If ``A`` is not 2-d, or the indices are empty, not
            integers or out of range.

    Example:
        >>> A = torch.arange(16.0).reshape(4, 4)
        >>> block = Submatrix(A, row_idxs=[0, 2], col_idxs=[1, 3])
        >>> block.shape, (block @ torch.ones(2)).tolist()
        ((2, 2), [4.0, 20.0])
        >>> torch.equal(block.to_dense(), A[[0, 2]][:, [1, 3]])
        True
    """

    def __init__(self, A, row_idxs: Indices, col_idxs: Indices):
        shape = getattr(A, "shape", None)
        missing = [name for name in ("dtype", "device") if not hasattr(A, name)]
        if shape is None or missing or not hasattr(A, "__matmul__"):
            raise TypeError(
                f"Submatrix: A must expose .shape, .dtype, .device and A @ X (a "
                f"curvext operator or a torch.Tensor), got {type(A).__name__}."
            )
        if len(tuple(shape)) != 2:
            raise ValueError(
                f"Submatrix: A must be a 2-d [N, P] operator, got shape {tuple(shape)}."
            )
        self._A = A
        self._outer_shape = tuple(int(size) for size in shape)
        device = torch.device(A.device)
        self.row_idxs = _as_indices(row_idxs, self._outer_shape[0], "row_idxs").to(device)
        self.col_idxs = _as_indices(col_idxs, self._outer_shape[1], "col_idxs").to(device)
        super().__init__((self.row_idxs.numel(), self.col_idxs.numel()), A.dtype, device)

    def _matmat(self, matrix: Tensor) -> Tensor:
        """``A[I, J] @ matrix`` ``[R, M]`` for ``matrix`` ``[C, M]``."""
        embedded = torch.zeros(
            self._outer_shape[1], matrix.shape[1], dtype=self.dtype, device=self.device
        ).index_add_(0, self.col_idxs, matrix)
        product = self._A @ embedded
        return product[self.row_idxs.to(product.device)]

    @property
    def T(self) -> "Submatrix":
        """``A[I, J]^T = (A^T)[J, I]``.

        Raises:
            TypeError: If ``A`` has no ``.T``.
        """
        transpose = getattr(self._A, "T", None)
        if transpose is None:
            raise TypeError(f"Submatrix.T: needs A.T, but {type(self._A).__name__} has no .T.")
        return Submatrix(transpose, self.col_idxs, self.row_idxs)

    def to_dense(self) -> Tensor:
        """The block ``[R, C]``, from ``C`` columns of the identity in one product."""
        return self @ torch.eye(self.shape[1], dtype=self.dtype, device=self.device)

    def __repr__(self) -> str:
        return (
            f"Submatrix(shape={self.shape}, of {type(self._A).__name__} "
            f"{self._outer_shape}, dtype={self.dtype})"
        )


__all__ = ["Submatrix"]
