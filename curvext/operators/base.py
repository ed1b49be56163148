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
``-``, ``*`` from them; the root :class:`curvext.linear.LinearOperator`
derives the shape and dtype rules of ``@`` and :meth:`to_scipy`. The argument
checks all operators share (:func:`check_damping`, :func:`as_scalar`) and
:func:`scipy_operator` live in :mod:`curvext.linear` and are importable from
here too.
"""

from __future__ import annotations

import math
from typing import Iterable, List, Sequence, Tuple, Union

import torch
from torch import Tensor

from curvext.linear import (  # noqa: F401  (scipy_operator: re-exported for jacobian.py)
    LinearOperator,
    as_matrix,
    as_scalar,
    check_damping,
    scipy_operator,
)

#: What ``@`` accepts and returns: ``[P]``, ``[P, M]`` or one tensor per parameter.
Operand = Union[Tensor, Sequence[Tensor]]


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
        # curvext's own (the BackPACK compat classes store other names, some the same)
        own = cls.__module__.startswith("curvext.extensions")
        if cls.savefield == attribute and cls.user_facing and own:
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
        return as_matrix(other, dim, owner), ("vector" if other.ndim == 1 else "matrix")
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


class CurvatureOperator(LinearOperator):
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
        self._numels = [p.numel() for p in self.params]
        dim = sum(self._numels)
        super().__init__((dim, dim), dtype, device)

    # ---- core: implemented by every subclass -------------------------------

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

    def _parse_operand(self, other: Operand):
        """``[P]``, ``[P, M]`` or a list shaped like ``params`` (:func:`operand_matrix`);
        ``None`` (``@`` returns ``NotImplemented``) for anything else."""
        return operand_matrix(other, [tuple(p.shape) for p in self.params], type(self).__name__)

    def _format_result(self, product: Tensor, form: str) -> Operand:
        """The product in the form of the operand: ``[P]``, ``[P, M]`` or a list."""
        return operand_like(product, form, [tuple(p.shape) for p in self.params])

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

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(shape={self.shape}, params={len(self.params)}, "
            f"dtype={self.dtype}, device={self.device})"
        )


__all__ = ["CurvatureOperator", "check_damping", "as_scalar"]
