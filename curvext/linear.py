r"""The root of everything in curvext that multiplies with ``@``.

:class:`LinearOperator` is a ``[rows, columns]`` matrix known only through its
products: the curvature operators of :mod:`curvext.operators`, the
matrix-free inverses of :mod:`curvext.linalg` and the view its estimators
take of any operator, :class:`~curvext.operators.Submatrix` and
:class:`~curvext.functional.HessianVectorOperator`. A subclass implements
:meth:`LinearOperator._matmat` on a matrix ``[columns, M]``; the root derives
``@`` on ``[columns]`` and ``[columns, M]`` (the shape check, the device and
the dtype rule) and :meth:`LinearOperator.to_scipy`.

This module is a leaf (torch, NumPy and the standard library only), so
:mod:`curvext.operators` and :mod:`curvext.linalg` both build on it without
importing each other. It also holds the helpers they share: the scalar checks
:func:`as_scalar` and :func:`check_damping`, :func:`as_matrix` and
:func:`scipy_operator`.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Optional, Tuple

import numpy
import torch
from torch import Tensor


def as_scalar(value, what: str = "scalar") -> float:
    """A real finite number (Python number, NumPy scalar or 0-d tensor) as ``float``.

    Raises:
        TypeError: If ``value`` is not a real scalar.
        ValueError: If it is NaN or infinite.

    Example:
        >>> as_scalar(torch.tensor(2.5))
        2.5
    """
    if isinstance(value, Tensor) and value.numel() == 1 and not value.is_complex():
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{what} must be a real number, got {value!r}.")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{what} must be finite, got {value}.")
    return value


def check_damping(damping, what: str = "damping") -> float:
    """Validate a damping value: a finite number ``>= 0``, returned as ``float``.

    Raises:
        ValueError: If ``damping`` is negative, NaN or infinite (or not a number).

    Example:
        >>> check_damping(1e-3)
        0.001
        >>> check_damping(-1.0)
        Traceback (most recent call last):
        ...
        ValueError: damping must be a finite number >= 0, got -1.0.
    """
    try:
        value = as_scalar(damping, what)
    except (TypeError, ValueError):
        value = math.nan
    if not value >= 0.0:
        raise ValueError(f"{what} must be a finite number >= 0, got {damping!r}.")
    return value


def as_matrix(operand, columns: int, owner: str) -> Tensor:
    """``operand`` ``[columns]`` or ``[columns, M]`` as a matrix ``[columns, M]``.

    Raises:
        ValueError: For anything else, naming ``owner`` and the expected shapes.

    Example:
        >>> as_matrix(torch.ones(4), 4, "Op").shape
        torch.Size([4, 1])
        >>> as_matrix(torch.ones(3, 2, 1), 3, "Op")
        Traceback (most recent call last):
        ...
        ValueError: Op @ x: expected x of shape [3] or [3, M], got [3, 2, 1].
    """
    if isinstance(operand, Tensor) and operand.ndim in (1, 2) and operand.shape[0] == columns:
        return operand.reshape(columns, -1)
    shape = list(operand.shape) if isinstance(operand, Tensor) else type(operand).__name__
    raise ValueError(
        f"{owner} @ x: expected x of shape [{columns}] or [{columns}, M], got {shape}."
    )


def scipy_operator(shape, matmat, rmatmat, dtype: torch.dtype, device: torch.device):
    """A :class:`scipy.sparse.linalg.LinearOperator` ``shape`` (float64 NumPy in and out).

    ``matmat`` and ``rmatmat`` multiply by the operator and its transpose in
    torch (``[D, M]`` to ``[rows, M]``); operands are moved to ``dtype`` on
    ``device``, products back to float64 NumPy of the operand's form.

    Example:
        >>> A = torch.tensor([[1.0, 2.0, 0.0], [0.0, 1.0, 1.0]])
        >>> A_np = scipy_operator(A.shape, A.matmul, A.T.matmul, A.dtype, A.device)
        >>> A_np.matvec([1.0, 1.0, 1.0]).tolist(), A_np.rmatvec([1.0, 0.0]).tolist()
        ([3.0, 2.0], [1.0, 2.0, 0.0])
    """
    try:
        from scipy.sparse.linalg import LinearOperator as ScipyLinearOperator
    except ImportError as error:  # pragma: no cover - scipy is a test extra
        raise ImportError(
            "scipy.sparse.linalg is needed here (to_scipy(), LSMRInverse): pip install scipy"
        ) from error

    def numpy_product(product, rows: int):
        def multiply(array):
            array = numpy.asarray(array)
            matrix = torch.as_tensor(array, dtype=dtype, device=device)
            result = product(matrix.reshape(matrix.shape[0], -1))
            result = result.detach().to("cpu", torch.float64).numpy()
            return result.reshape((rows,) + array.shape[1:])

        return multiply

    rows, columns = (int(size) for size in shape)
    forward, backward = numpy_product(matmat, rows), numpy_product(rmatmat, columns)
    return ScipyLinearOperator(
        (rows, columns),
        matvec=forward,
        rmatvec=backward,
        matmat=forward,
        rmatmat=backward,
        dtype=numpy.float64,
    )


class LinearOperator:
    r"""A ``[rows, columns]`` matrix that multiplies with ``@``.

    ``A @ x`` for ``x`` ``[columns]`` gives ``[rows]``, ``A @ X`` for ``X``
    ``[columns, M]`` gives ``[rows, M]`` (the ``M`` columns in one product).
    A subclass implements :meth:`_matmat` on ``[columns, M]``; it may accept
    further operand forms through the hooks :meth:`_parse_operand` and
    :meth:`_format_result` (the curvature operators also take a list of
    tensors shaped like their parameters) and define ``.T`` where it knows its
    transpose.

    **Dtypes** (one rule for every operator): the operand is moved to the
    operator's device and cast to its dtype, the product is computed there
    and returned in ``torch.promote_types`` of the two dtypes, so a float32
    operator times a float64 vector gives float64 with the operator's float32
    accuracy, and a float64 operator times a float32 vector computes in float64.

    Args:
        shape: ``(rows, columns)``.
        dtype: The dtype products are computed in.
        device: Where products are computed.

    Attributes:
        shape: ``(rows, columns)``, Python ints.
        dtype: The dtype products are computed in.
        device: Where products are computed (a :class:`torch.device`).

    Example:
        >>> class Doubling(LinearOperator):
        ...     def _matmat(self, matrix):
        ...         return 2 * matrix
        >>> A = Doubling((3, 3), torch.float32, "cpu")
        >>> (A @ torch.ones(3, dtype=torch.float64)).tolist(), (A @ torch.ones(3, 2)).shape
        ([2.0, 2.0, 2.0], torch.Size([3, 2]))
        >>> A @ torch.ones(4)
        Traceback (most recent call last):
        ...
        ValueError: Doubling @ x: expected x of shape [3] or [3, M], got [4].
    """

    def __init__(self, shape: Tuple[int, int], dtype: torch.dtype, device: torch.device):
        rows, columns = shape
        self.shape = (int(rows), int(columns))
        self.dtype = dtype
        self.device = torch.device(device)

    def _matmat(self, matrix: Tensor) -> Tensor:
        """``self @ matrix`` ``[rows, M]`` for ``matrix`` ``[columns, M]`` in
        the operator's dtype on its device."""
        raise NotImplementedError

    def _rmatmat(self, matrix: Tensor) -> Tensor:
        """``self^T @ matrix`` ``[columns, M]`` for ``matrix`` ``[rows, M]``, through ``.T``.

        Raises:
            TypeError: If the operator has no ``.T``.
        """
        transpose = getattr(self, "T", None)
        if transpose is None:
            raise TypeError(
                f"{type(self).__name__} has no .T: products with its transpose are not defined."
            )
        return transpose._matmat(matrix)

    def _parse_operand(self, other) -> Optional[Tuple[Tensor, Any]]:
        """``(matrix [columns, M], form)`` for the operand of ``self @ other``.

        ``form`` is whatever :meth:`_format_result` needs to give the product
        the operand's form (here ``"vector"`` or ``"matrix"``). A subclass
        returns ``None`` for an operand it leaves to ``other.__rmatmul__``.

        Raises:
            ValueError: If ``other`` is not a tensor ``[columns]`` or ``[columns, M]``.
        """
        matrix = as_matrix(other, self.shape[1], type(self).__name__)
        return matrix, ("vector" if other.ndim == 1 else "matrix")

    def _format_result(self, product: Tensor, form) -> Any:
        """The product ``[rows, M]`` in the operand's ``form``."""
        return product.squeeze(1) if form == "vector" else product

    def _result_dtype(self, operand_dtype: torch.dtype) -> torch.dtype:
        """The dtype of ``self @ other`` for an operand of ``operand_dtype``."""
        return torch.promote_types(self.dtype, operand_dtype)

    def __matmul__(self, other):
        """``self @ other`` for ``other`` ``[columns]`` or ``[columns, M]`` (and the
        forms a subclass adds); the result has the operand's form.

        Raises:
            ValueError: If ``other``'s shape does not fit (the message names the
                operator and the expected shapes).
        """
        operand = self._parse_operand(other)
        if operand is None:
            return NotImplemented
        matrix, form = operand
        if matrix.is_complex():  # the cast to a real dtype would drop the imaginary part
            raise TypeError(
                f"{type(self).__name__} @ x: x is complex ({matrix.dtype}); the operator is "
                "real: multiply x.real and x.imag separately."
            )
        result_dtype = self._result_dtype(matrix.dtype)
        product = self._matmat(matrix.to(self.device, self.dtype)).to(result_dtype)
        return self._format_result(product, form)

    def to_scipy(self):
        """A :class:`scipy.sparse.linalg.LinearOperator` (float64 NumPy in and out).

        Products are computed in torch on the operator's device and dtype, so
        ``scipy.sparse.linalg.eigsh``, ``cg`` or ``lsmr`` run on it (products
        with the transpose need ``.T``).

        Example:
            >>> from scipy.sparse.linalg import eigsh
            >>> from curvext.operators import DiagonalOperator
            >>> p = torch.nn.Parameter(torch.zeros(4))
            >>> p.ggn_diag = torch.tensor([1.0, 4.0, 2.0, 3.0])
            >>> eigsh(DiagonalOperator.from_params([p]).to_scipy(), k=1)[0].round(6)
            array([4.])
        """
        return scipy_operator(self.shape, self._matmat, self._rmatmat, self.dtype, self.device)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(shape={self.shape}, dtype={self.dtype}, device={self.device})"
        )


__all__ = ["LinearOperator", "as_matrix", "as_scalar", "check_damping", "scipy_operator"]
