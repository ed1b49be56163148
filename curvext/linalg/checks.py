r"""Argument checks shared by the estimators and inverses of :mod:`curvext.linalg`.

Each helper raises with the offending value and the fix in the message, and is
called at the top of the public function it guards.
"""

from __future__ import annotations

import math
import numbers

#: The probe distributions every estimator accepts.
DISTRIBUTIONS = ("rademacher", "normal")


def assert_is_square(A, owner: str) -> int:
    """The dimension ``P`` of a square ``[P, P]`` operator ``A``.

    Args:
        A: Anything with a ``.shape`` (a curvext operator or a tensor).
        owner: The calling function, for the message.

    Raises:
        TypeError: If ``A`` has no ``.shape``.
        ValueError: If ``A`` is not a square matrix.

    Example:
        >>> import torch
        >>> assert_is_square(torch.zeros(3, 3), "f")
        3
        >>> assert_is_square(torch.zeros(3, 4), "f")
        Traceback (most recent call last):
        ...
        ValueError: f: A must be a square [P, P] operator, got shape (3, 4).
    """
    shape = getattr(A, "shape", None)
    if shape is None:
        raise TypeError(
            f"{owner}: A must be a square linear operator with .shape, .dtype, "
            f".device and A @ X (a curvext operator or a torch.Tensor), got "
            f"{type(A).__name__}."
        )
    shape = tuple(shape)
    if len(shape) != 2 or shape[0] != shape[1]:
        raise ValueError(f"{owner}: A must be a square [P, P] operator, got shape {shape}.")
    return int(shape[0])


def assert_positive_int(value, what: str, owner: str, minimum: int = 1) -> int:
    """``value`` as ``int``, checked to be an integer ``>= minimum``.

    Raises:
        ValueError: If it is not an integer or smaller than ``minimum``.

    Example:
        >>> assert_positive_int(0, "num_matvecs", "hutchinson_trace")
        Traceback (most recent call last):
        ...
        ValueError: hutchinson_trace: num_matvecs must be an integer >= 1, got 0.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{owner}: {what} must be an integer >= {minimum}, got {value!r}.")
    return int(value)


def assert_num_matvecs(
    num_matvecs, owner: str, minimum: int, dim: int, multiple_of: int = 1, maximum=None
) -> int:
    """Check a ``num_matvecs`` budget against what the method needs.

    Args:
        num_matvecs: The budget the user asked for.
        owner: The calling function.
        minimum: The smallest budget the method works with.
        dim: The operator's dimension ``P`` (for the message on ``maximum``).
        multiple_of: The budget must be a multiple of this (``2`` for XTrace/XDiag).
        maximum: The largest budget the method works with, or ``None``.

    Raises:
        ValueError: Naming the minimum (or maximum, or the required multiple).

    Example:
        >>> assert_num_matvecs(2, "hutchpp_trace", minimum=3, dim=10)
        Traceback (most recent call last):
        ...
        ValueError: hutchpp_trace: num_matvecs must be at least 3, got 2.
    """
    if isinstance(num_matvecs, bool) or not isinstance(num_matvecs, numbers.Integral):
        raise ValueError(f"{owner}: num_matvecs must be an integer, got {num_matvecs!r}.")
    if num_matvecs < minimum:
        raise ValueError(f"{owner}: num_matvecs must be at least {minimum}, got {num_matvecs}.")
    if num_matvecs % multiple_of:
        raise ValueError(
            f"{owner}: num_matvecs must be a multiple of {multiple_of}, got "
            f"{num_matvecs}; use {num_matvecs - num_matvecs % multiple_of} or "
            f"{num_matvecs - num_matvecs % multiple_of + multiple_of}."
        )
    if maximum is not None and num_matvecs > maximum:
        raise ValueError(
            f"{owner}: num_matvecs must be at most {maximum} for an operator of "
            f"dimension {dim}, got {num_matvecs}."
        )
    return int(num_matvecs)


def check_distribution(distribution: str, owner: str) -> str:
    """Check that ``distribution`` is one of :data:`DISTRIBUTIONS`.

    Raises:
        ValueError: Naming the accepted values.

    Example:
        >>> check_distribution("uniform", "hutchinson_trace")
        Traceback (most recent call last):
        ...
        ValueError: hutchinson_trace: distribution must be 'rademacher' or 'normal', got 'uniform'.
    """
    if distribution not in DISTRIBUTIONS:
        raise ValueError(
            f"{owner}: distribution must be 'rademacher' or 'normal', got {distribution!r}."
        )
    return distribution


def check_positive(value, what: str, owner: str) -> float:
    """``value`` as ``float``, checked to be finite and ``> 0``.

    Raises:
        ValueError: Otherwise.

    Example:
        >>> check_positive(-1.0, "tol", "CGInverse")
        Traceback (most recent call last):
        ...
        ValueError: CGInverse: tol must be a finite number > 0, got -1.0.
    """
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    if isinstance(value, bool) or not (math.isfinite(number) and number > 0):
        raise ValueError(f"{owner}: {what} must be a finite number > 0, got {value!r}.")
    return number
