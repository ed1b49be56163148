"""Argument checks shared by :mod:`curvext.functional`.

Each helper raises with the offending value and the fix in the message.
"""

from __future__ import annotations

from typing import Callable, Tuple

from torch import Tensor

#: The two ways of nesting automatic differentiation for a Hessian-vector product.
MODES = ("rev-rev", "rev-fwd")


def check_mode(mode: str, owner: str) -> str:
    """``mode`` checked to be one of :data:`MODES`.

    Example:
        >>> check_mode("fwd-fwd", "hvp")
        Traceback (most recent call last):
        ...
        ValueError: hvp: mode must be 'rev-rev' or 'rev-fwd', got 'fwd-fwd'.
    """
    if mode not in MODES:
        raise ValueError(f"{owner}: mode must be 'rev-rev' or 'rev-fwd', got {mode!r}.")
    return mode


def as_arguments(x, owner: str) -> Tuple[Tensor, ...]:
    """The positional arguments of ``func``: a tuple of tensors (a lone tensor is wrapped)."""
    if isinstance(x, Tensor):
        return (x,)
    if not isinstance(x, (tuple, list)) or not all(isinstance(a, Tensor) for a in x):
        raise TypeError(
            f"{owner}: x must be a tuple of tensors (the positional arguments of "
            f"func), got {type(x).__name__}."
        )
    return tuple(x)


def at_each_x(at_x: Callable, func: Callable, owner: str, **options) -> Callable:
    """dattri's ``ihvp_<name>(func, ...)`` form of ``ihvp_at_x_<name>``: the
    returned ``ihvp_func(x, v)`` builds ``at_x(func, *x, **options)`` at the
    tuple of arguments ``x`` it is given and applies it to ``v``."""

    def ihvp_func(x, v: Tensor) -> Tensor:
        return at_x(func, *as_arguments(x, owner), **options)(v)

    return ihvp_func


def check_argnums(argnums, x: Tuple[Tensor, ...], owner: str) -> int:
    """``argnums`` checked to be an ``int`` indexing ``x``."""
    if isinstance(argnums, bool) or not isinstance(argnums, int):
        raise TypeError(
            f"{owner}: argnums must be a single int (flatten several arguments into "
            f"one vector first), got {argnums!r}."
        )
    if not -len(x) <= argnums < len(x):
        raise ValueError(
            f"{owner}: argnums={argnums} is out of range for func with {len(x)} "
            f"positional arguments."
        )
    return argnums % len(x)


def flat_dim(x: Tuple[Tensor, ...], argnums: int, owner: str) -> int:
    """``D`` for a 1-D argument ``x[argnums]`` ``[D]``: inverses need a square ``[D, D]`` Hessian.

    Example:
        >>> import torch
        >>> flat_dim((torch.zeros(2, 3),), 0, "ihvp_cg")  # doctest: +NORMALIZE_WHITESPACE
        Traceback (most recent call last):
        ...
        ValueError: ihvp_cg: the Hessian w.r.t. x[0] must be a square [D, D] matrix,
        so x[0] must be a vector [D], got shape [2, 3]; pass the flattened argument
        (e.g. torch.func's ravel of the parameters).
    """
    argument = x[argnums]
    if argument.ndim != 1:
        raise ValueError(
            f"{owner}: the Hessian w.r.t. x[{argnums}] must be a square [D, D] matrix, "
            f"so x[{argnums}] must be a vector [D], got shape {list(argument.shape)}; "
            f"pass the flattened argument (e.g. torch.func's ravel of the parameters)."
        )
    return argument.shape[0]


def as_rows(v: Tensor, dim: int, owner: str) -> Tensor:
    """``v`` ``[D]`` or ``[M, D]`` as ``[M, D]`` (dattri's layout: one vector a row).

    Example:
        >>> import torch
        >>> as_rows(torch.zeros(3, 2), 3, "ihvp_cg")
        Traceback (most recent call last):
        ...
        ValueError: ihvp_cg: expected v of shape [3] or [M, 3], got [3, 2].
    """
    if isinstance(v, Tensor) and v.ndim in (1, 2) and v.shape[-1] == dim:
        return v.reshape(-1, dim)
    shape = list(v.shape) if isinstance(v, Tensor) else type(v).__name__
    raise ValueError(f"{owner}: expected v of shape [{dim}] or [M, {dim}], got {shape}.")
