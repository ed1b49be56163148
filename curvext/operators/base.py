r"""The interface every curvature operator shares.

A :class:`CurvatureOperator` is a symmetric ``[P, P]`` matrix over an ordered
list of parameters (``P`` their total number of entries, ordered as the
parameters were given, each flattened row-major as ``p.flatten()``). It
multiplies a flat vector ``[P]``, a matrix ``[P, M]`` or a list of tensors
shaped like the parameters, and measures itself (``diag``, ``trace``,
``logdet``, ``det``, ``frobenius_norm``) without forming the dense matrix
where its structure allows.

A subclass implements a small core on flat matrices: :meth:`_matmat`,
:meth:`to_dense`, :meth:`diag`, :meth:`_slogdet`, :meth:`frobenius_norm`,
the three arithmetic hooks (:meth:`_add_scalar`, :meth:`_scale`,
:meth:`_add_same`) and ``inverse``. The base class derives the three input
forms of ``@``, ``.T``, ``trace``, ``logdet``, ``det``, the operators ``+``,
``-``, ``*`` and :meth:`to_scipy` from them, and holds the argument checks
all operators share (:func:`check_damping`, :func:`as_scalar`).
"""

from __future__ import annotations

import math
import numbers
from typing import Iterable, List, Sequence, Tuple, Union

import numpy
import torch
from torch import Tensor

#: What ``@`` accepts and returns: ``[P]``, ``[P, M]`` or one tensor per parameter.
Operand = Union[Tensor, Sequence[Tensor]]


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


def collect_params(params: Iterable[Tensor], owner: str) -> List[Tensor]:
    """The trainable parameters of ``params`` in order (frozen ones carry nothing).

    Raises:
        ValueError: If none is left.

    Example:
        >>> len(collect_params(torch.nn.Linear(3, 2).parameters(), "Op"))
        2
    """
    params = [p for p in params if p.requires_grad]
    if not params:
        raise ValueError(
            f"{owner}: no parameter with requires_grad=True was given; pass "
            f"e.g. model.parameters()."
        )
    return params


def _extension_storing(attribute: str) -> str:
    """``"GGNDiag()"`` for ``"ggn_diag"``: the extension whose ``savefield`` it is."""
    import curvext.extensions  # noqa: F401  (registers every extension class)
    from curvext.extensions.base import Extension

    pending, names = list(Extension.__subclasses__()), []
    while pending:
        cls = pending.pop()
        pending.extend(cls.__subclasses__())
        if cls.savefield == attribute and cls.user_facing:
            names.append(f"{cls.__name__}()")
    return " or ".join(sorted(names))


def stored(param: Tensor, index: int, attribute: str, owner: str, extension: str = ""):
    """``param.<attribute>``, or an error naming the parameter and the extension to run.

    ``extension`` names the extension to run (e.g. ``"GGNEigen(eigenvectors=True)"``)
    where the attribute is not that extension's ``savefield``; by default it is
    looked up from the savefields.

    Raises:
        AttributeError: If the parameter has no such attribute.

    Example:
        >>> stored(torch.nn.Parameter(torch.zeros(2)), 0, "ggn_diag", "Op")
        ... # doctest: +NORMALIZE_WHITESPACE
        Traceback (most recent call last):
        ...
        AttributeError: Op: parameter 0 (shape (2,)) has no attribute 'ggn_diag':
        run GGNDiag() inside backpack(...) around loss.backward() first.
    """
    value = getattr(param, attribute, None)
    if value is None:
        extension = extension or _extension_storing(attribute)
        fix = (
            f"run {extension} inside backpack(...) around loss.backward() first"
            if extension
            else f"no curvext extension stores it; set p.{attribute} yourself"
        )
        raise AttributeError(
            f"{owner}: parameter {index} (shape {tuple(param.shape)}) has no "
            f"attribute {attribute!r}: {fix}."
        )
    return value


def combine_slogdets(
    signs: Sequence[Tensor], logabsdets: Sequence[Tensor]
) -> Tuple[Tensor, Tensor]:
    """The ``(sign, log|det|)`` of a block-diagonal matrix from those of its blocks."""
    return torch.stack(list(signs)).prod(), torch.stack(list(logabsdets)).sum()


def powered(values: Tensor, exponent: float, owner: str, what: str) -> Tensor:
    """``values ** exponent`` for the eigenvalues (or diagonal) ``values`` of an operator.

    Raises:
        ValueError: For a negative exponent with a zero entry (singular), or a
            fractional exponent with a negative entry (not real).

    Example:
        >>> powered(torch.tensor([4.0, 16.0]), -0.5, "Op.pow", "the diagonal").tolist()
        [0.5, 0.25]
    """
    exponent = as_scalar(exponent, f"{owner}: exponent")
    if exponent < 0 and (values == 0).any():
        raise ValueError(
            f"{owner}({exponent}): {what} has a zero entry (singular); add damping "
            f"first, e.g. (op + 1e-3).pow({exponent})."
        )
    if exponent != int(exponent) and (values < 0).any():
        raise ValueError(
            f"{owner}({exponent}): {what} has a negative entry, and its fractional "
            f"power is not real."
        )
    return values.pow(exponent)


def shapes_text(params: Sequence) -> str:
    """The shapes of ``params`` (tensors, or shapes) as the user would write them."""
    return "[" + ", ".join(str(tuple(getattr(p, "shape", p))) for p in params) + "]"


def operand_matrix(
    other, shapes: Sequence[Tuple[int, ...]], owner: str, what: str = "the parameters"
) -> Union[Tuple[Tensor, str], None]:
    """The operand of ``owner @ other`` as a matrix ``[D, M]``, and its form.

    ``other`` is a tensor ``[D]`` (form ``"vector"``) or ``[D, M]``
    (``"matrix"``), ``D`` the total size of the blocks ``shapes``, or a list
    of tensors shaped like the blocks (``"list"``, one vector, each block
    flattened row-major). :func:`operand_like` puts a product back into the form.

    Returns:
        ``(matrix, form)``, or ``None`` if ``other`` is neither a tensor nor a
        list of tensors (``__matmul__`` then returns ``NotImplemented``).

    Raises:
        ValueError: If the shapes do not fit, naming the expected ones (``what``
            says what the blocks are).

    Example:
        >>> blocks = [torch.ones(2, 3), torch.ones(2)]
        >>> matrix, form = operand_matrix(blocks, [(2, 3), (2,)], "Op")
        >>> matrix.shape, form
        (torch.Size([8, 1]), 'list')
    """
    dim = sum(math.prod(shape) for shape in shapes)
    if isinstance(other, Tensor):
        if other.ndim in (1, 2) and other.shape[0] == dim:
            return other.reshape(dim, -1), ("vector" if other.ndim == 1 else "matrix")
        raise ValueError(
            f"{owner} @ x: expected x of shape [{dim}] or [{dim}, M], got {list(other.shape)}."
        )
    if isinstance(other, (list, tuple)) and all(isinstance(t, Tensor) for t in other):
        if [tuple(t.shape) for t in other] != [tuple(shape) for shape in shapes]:
            raise ValueError(
                f"{owner} @ x: expected a list of {len(shapes)} tensors shaped like "
                f"{what}, {shapes_text(shapes)}, got {len(other)} shaped "
                f"{shapes_text(other)}."
            )
        return torch.cat([t.reshape(-1) for t in other]).unsqueeze(1), "list"
    return None


def operand_like(product: Tensor, form: str, shapes: Sequence[Tuple[int, ...]]) -> Operand:
    """A product ``[D', M]`` in the ``form`` :func:`operand_matrix` read.

    ``shapes`` are the blocks of the product's side (total size ``D'``).

    Example:
        >>> [t.shape for t in operand_like(torch.ones(3, 1), "list", [(1, 2), (1,)])]
        [torch.Size([1, 2]), torch.Size([1])]
    """
    if form == "matrix":
        return product
    if form == "vector":
        return product.squeeze(1)
    numels = [math.prod(shape) for shape in shapes]
    return [block.reshape(shape) for block, shape in zip(product.squeeze(1).split(numels), shapes)]


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
        from scipy.sparse.linalg import LinearOperator
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
    return LinearOperator(
        (rows, columns),
        matvec=forward,
        rmatvec=backward,
        matmat=forward,
        rmatmat=backward,
        dtype=numpy.float64,
    )


class CurvatureOperator:
    r"""A symmetric ``[P, P]`` curvature matrix over an ordered list of parameters.

    Attributes:
        params: The parameters, in the order of the rows (``P`` = their total
            number of entries, each flattened row-major).
        shape: ``(P, P)``.
        dtype: The dtype of products and measurements.
        device: Where the operator's tensors live and products are computed.

    Example:
        >>> from curvext.operators import DiagonalOperator
        >>> layer = torch.nn.Linear(2, 1)
        >>> layer.weight.ggn_diag, layer.bias.ggn_diag = torch.ones(1, 2), torch.ones(1)
        >>> op = 2 * DiagonalOperator.from_params(layer.parameters()) + 1
        >>> op.shape, op.trace().item()
        ((3, 3), 9.0)
        >>> [t.tolist() for t in op @ [torch.ones(1, 2), torch.ones(1)]]
        [[[3.0, 3.0]], [3.0]]
    """

    def __init__(self, params: Sequence[Tensor], dtype: torch.dtype, device: torch.device):
        self.params = list(params)
        self.dtype = dtype
        self.device = torch.device(device)
        self._numels = [p.numel() for p in self.params]
        dim = sum(self._numels)
        self.shape = (dim, dim)

    # ---- core: implemented by every subclass -------------------------------

    def _matmat(self, matrix: Tensor) -> Tensor:
        """``self @ matrix`` for ``matrix`` ``[P, M]`` on the operator's device."""
        raise NotImplementedError

    def to_dense(self) -> Tensor:
        """The matrix ``[P, P]`` (for small operators and tests)."""
        raise NotImplementedError

    def diag(self) -> Tensor:
        """The diagonal ``[P]``."""
        raise NotImplementedError

    def _slogdet(self) -> Tuple[Tensor, Tensor]:
        """``(sign, log|det|)`` as :func:`torch.linalg.slogdet` returns them."""
        raise NotImplementedError

    def frobenius_norm(self) -> Tensor:
        """The Frobenius norm ``sqrt(sum_ij A_ij^2)``."""
        raise NotImplementedError

    def _add_scalar(self, value: float) -> "CurvatureOperator":
        """``self + value * I``."""
        raise NotImplementedError

    def _scale(self, value: float) -> "CurvatureOperator":
        """``value * self``."""
        raise NotImplementedError

    def _add_same(self, other: "CurvatureOperator") -> "CurvatureOperator":
        """``self + other`` for ``other`` of the same class over the same parameters."""
        raise NotImplementedError

    def inverse(self, *args, **kwargs) -> "CurvatureOperator":
        """The (damped) inverse; each operator documents its damping options."""
        raise NotImplementedError

    # ---- derived ------------------------------------------------------------

    @property
    def T(self) -> "CurvatureOperator":
        """The transpose: the operator itself (curvature operators are symmetric)."""
        return self

    def trace(self) -> Tensor:
        """The trace, ``diag().sum()``."""
        return self.diag().sum()

    def logdet(self) -> Tensor:
        """``log det``; requires a positive determinant.

        Raises:
            ValueError: If the determinant is zero (singular operator) or
                negative: damp the operator first, e.g. ``(op + 1e-3).logdet()``.
        """
        sign, logabsdet = self._slogdet()
        if sign.item() <= 0:
            kind = "zero (the operator is singular)" if sign.item() == 0 else "negative"
            raise ValueError(
                f"{type(self).__name__}.logdet(): the determinant is {kind}; add "
                f"damping first, e.g. (op + 1e-3).logdet()."
            )
        return logabsdet

    def det(self) -> Tensor:
        """The determinant (``0`` if singular; may under/overflow: prefer ``logdet``)."""
        sign, logabsdet = self._slogdet()
        return sign * logabsdet.exp()

    def __matmul__(self, other: Operand) -> Operand:
        """``self @ other``, ``other`` ``[P]``, ``[P, M]`` or a list shaped like ``params``.

        The result has the form of ``other``. **Dtypes** (one rule for every
        operator): the product is computed in the operator's dtype (``other``
        is cast to it) and returned in ``torch.promote_types`` of the two, so
        a float32 operator times a float64 vector gives float64 with the
        operator's float32 accuracy, and a float64 operator times a float32
        vector computes in float64.

        Raises:
            ValueError: If ``other``'s shape is none of these (the message
                names the expected shapes).
        """
        shapes = [tuple(p.shape) for p in self.params]
        operand = operand_matrix(other, shapes, type(self).__name__)
        if operand is None:
            return NotImplemented
        matrix, form = operand
        result_dtype = torch.promote_types(self.dtype, matrix.dtype)
        product = self._matmat(matrix.to(self.dtype)).to(result_dtype)
        return operand_like(product, form, shapes)

    def _check_same(self, other: "CurvatureOperator") -> None:
        """Raise unless ``other`` has this class and these parameters, in order."""
        if type(other) is not type(self):
            raise ValueError(
                f"Cannot combine {type(self).__name__} with {type(other).__name__}: "
                f"+ and - need two operators of the same structure."
            )
        mismatch = len(other.params) != len(self.params) or any(
            a is not b for a, b in zip(self.params, other.params)
        )
        if mismatch:
            raise ValueError(
                f"Cannot combine two {type(self).__name__}s over different parameter "
                f"lists: {len(self.params)} parameters {shapes_text(self.params)} vs "
                f"{len(other.params)} parameters {shapes_text(other.params)} (they "
                f"must be the same tensors in the same order)."
            )

    def __add__(self, other) -> "CurvatureOperator":
        """``op + δ`` adds ``δ I`` (damping); ``op + other``: same structure and params."""
        if isinstance(other, CurvatureOperator):
            self._check_same(other)
            return self._add_same(other)
        try:
            return self._add_scalar(as_scalar(other, "The summand"))
        except TypeError:
            return NotImplemented

    __radd__ = __add__

    def __mul__(self, other) -> "CurvatureOperator":
        """``c * op`` for a real number ``c``."""
        try:
            return self._scale(as_scalar(other, "The factor"))
        except TypeError:
            return NotImplemented

    __rmul__ = __mul__

    def __neg__(self) -> "CurvatureOperator":
        return self._scale(-1.0)

    def __sub__(self, other) -> "CurvatureOperator":
        return self + (-other)

    def __rsub__(self, other) -> "CurvatureOperator":
        return (-self) + other

    def to_scipy(self):
        """A :class:`scipy.sparse.linalg.LinearOperator` (float64 NumPy in and out).

        Products are computed in torch on the operator's device and dtype, so
        ``scipy.sparse.linalg.eigsh`` and ``cg`` run on it.

        Example:
            >>> from scipy.sparse.linalg import eigsh
            >>> from curvext.operators import DiagonalOperator
            >>> p = torch.nn.Parameter(torch.zeros(4))
            >>> p.ggn_diag = torch.tensor([1.0, 4.0, 2.0, 3.0])
            >>> eigsh(DiagonalOperator.from_params([p]).to_scipy(), k=1)[0].round(6)
            array([4.])
        """
        return scipy_operator(self.shape, self._matmat, self._matmat, self.dtype, self.device)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(shape={self.shape}, params={len(self.params)}, "
            f"dtype={self.dtype}, device={self.device})"
        )


__all__ = ["CurvatureOperator", "check_damping", "as_scalar"]
