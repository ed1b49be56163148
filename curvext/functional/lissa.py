r"""Inverse Hessian-vector products by LiSSA, a stochastic Neumann series.

With Hessians :math:`H_t` of ``func`` on random mini-batches of the data,
LiSSA runs the recursion

.. math::
    u_0 = v, \qquad
    u_{t+1} = v + (1 - \delta)\, u_t - \frac{H_t u_t}{s},

and returns :math:`u_T / s`, averaged over ``num_repeat`` runs. In
expectation its fixed point is :math:`(\delta I + H/s)^{-1} v / s =
(s\delta I + H)^{-1} v` for the full-data Hessian :math:`H` (``func`` a mean
over its batch), reached when all eigenvalues of
:math:`(1-\delta) I - H/s` lie in :math:`(-1, 1)`: choose the scaling
:math:`s` above half the largest eigenvalue of :math:`H`.

Agarwal, N., Bullins, B., & Hazan, E. (2017). Second-order stochastic
optimization for machine learning in linear time. JMLR.
Koh, P. W., & Liang, P. (2017). Understanding black-box predictions via
influence functions. ICML.
"""

from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch
from torch import Tensor
from torch.func import grad, vmap

from curvext.functional._checks import (
    as_arguments,
    as_rows,
    check_argnums,
    check_mode,
    flat_dim,
)
from curvext.functional.hvp import _product
from curvext.linalg.checks import assert_positive_int, check_positive


def ihvp_lissa(
    func: Callable,
    argnums: int = 0,
    batch_size: int = 1,
    num_repeat: int = 1,
    recursion_depth: int = 5000,
    damping: float = 0.0,
    scaling: float = 50.0,
    collate_fn: Optional[Callable] = None,
    mode: str = "rev-rev",
) -> Callable:
    r""":math:`(s\delta I + H)^{-1} v` by the LiSSA recursion over mini-batches.

    dattri's ``ihvp_lissa``. The returned ``ihvp_func(x, v, in_dims=None)``
    takes ``x``, the tuple of ``func``'s arguments: the parameters
    ``x[argnums]`` (a vector ``[D]``) and data tensors with a sample dimension
    ``in_dims[i]``; every recursion step draws ``batch_size`` samples without
    replacement (``torch.randperm``, the global generator) and calls
    ``func`` on them (through ``collate_fn`` when given). ``in_dims`` defaults
    to ``0`` for every argument but ``x[argnums]`` (dattri's default of ``0``
    for all would subsample the parameters too); ``None`` marks an argument
    shared by all samples. ``v`` is ``[D]`` or ``[M, D]``; the ``M`` vectors
    share the sampled batches and their products run in one ``vmap``.

    Args:
        func: ``func(*x)``, a single-element tensor: the mean loss over the samples in ``x``.
        argnums: Which argument :math:`\theta` (default ``0``).
        batch_size: Samples per recursion step (default ``1``).
        num_repeat: Independent runs averaged (default ``1``).
        recursion_depth: Steps :math:`T` per run (default ``5000``).
        damping: :math:`\delta \in [0, 1)` (default ``0.0``).
        scaling: :math:`s > 0` (default ``50.0``).
        collate_fn: Maps the sampled tuple to the tuple ``func`` takes (default: none).
        mode: ``"rev-rev"`` (default) or ``"rev-fwd"``.

    Returns:
        ``ihvp_func(x, v, in_dims=None)``, shaped like ``v``.

    Raises:
        ValueError: For an unknown ``mode``, non-positive counts, a
            ``batch_size`` above the number of samples, data arguments whose
            sample dimensions differ, or a recursion that diverges (raise ``scaling``).

    Example:
        >>> import torch
        >>> A = torch.randn(20, 2, dtype=torch.float64)
        >>> f = lambda w, a: 0.5 * ((a @ w) ** 2).mean()  # H = A^T A / 20
        >>> w, v = torch.zeros(2, dtype=torch.float64), torch.ones(2, dtype=torch.float64)
        >>> u = ihvp_lissa(f, batch_size=20, recursion_depth=200, scaling=5.0)((w, A), v)
        >>> torch.allclose(u, torch.linalg.solve(A.T @ A / 20, v))
        True
    """
    owner = "ihvp_lissa"
    check_mode(mode, owner)
    batch_size = assert_positive_int(batch_size, "batch_size", owner)
    num_repeat = assert_positive_int(num_repeat, "num_repeat", owner)
    recursion_depth = assert_positive_int(recursion_depth, "recursion_depth", owner)
    scaling = check_positive(scaling, "scaling", owner)
    if not 0.0 <= damping < 1.0:
        raise ValueError(f"{owner}: damping must lie in [0, 1), got {damping}.")

    def ihvp_func(x, v: Tensor, in_dims: Optional[Tuple] = None) -> Tensor:
        arguments = as_arguments(x, owner)
        index = check_argnums(argnums, arguments, owner)
        rows = as_rows(v, flat_dim(arguments, index, owner), owner)
        dims = _sample_dims(arguments, index, in_dims)
        num_samples = _num_samples(arguments, dims)
        if batch_size > num_samples:
            raise ValueError(
                f"{owner}: batch_size={batch_size} exceeds the {num_samples} samples in x."
            )
        grad_func = grad(func, argnums=index)
        estimates = []
        for _ in range(num_repeat):
            estimate = rows.detach().clone()
            for _ in range(recursion_depth):
                chosen = torch.randperm(num_samples)[:batch_size]
                batch = tuple(
                    a if d is None else a.index_select(d, chosen.to(a.device))
                    for a, d in zip(arguments, dims)
                )
                if collate_fn is not None:
                    batch = tuple(collate_fn(batch))
                product = vmap(_product(grad_func, batch, index, mode))(estimate)
                estimate = rows + (1 - damping) * estimate - product / scaling
            if not torch.isfinite(estimate).all():
                raise ValueError(
                    f"{owner}: the recursion diverged; scaling={scaling:g} must exceed "
                    f"half the largest Hessian eigenvalue (raise scaling or damping)."
                )
            estimates.append(estimate / scaling)
        return torch.stack(estimates).mean(0).reshape(v.shape)

    return ihvp_func


def ihvp_at_x_lissa(
    func: Callable,
    *x: Tensor,
    in_dims: Optional[Tuple] = None,
    argnums: int = 0,
    batch_size: int = 1,
    num_repeat: int = 1,
    recursion_depth: int = 5000,
    damping: float = 0.0,
    scaling: float = 50.0,
    collate_fn: Optional[Callable] = None,
    mode: str = "rev-rev",
) -> Callable:
    r"""LiSSA (:func:`ihvp_lissa`) with ``func``'s arguments ``*x`` fixed.

    Returns:
        ``ihvp_func(v)`` for ``v`` ``[D]`` or ``[M, D]``, returning the same shape.

    Example:
        >>> import torch
        >>> f = lambda w, a: 0.5 * ((a * w) ** 2).mean(0).sum()  # H = diag(mean a^2)
        >>> a = torch.full((4, 2), 2.0, dtype=torch.float64)
        >>> ihvp = ihvp_at_x_lissa(f, torch.zeros(2, dtype=torch.float64), a,
        ...                        batch_size=2, recursion_depth=100, scaling=4.0)
        >>> ihvp(torch.ones(2, dtype=torch.float64)).round(decimals=6).tolist()
        [0.25, 0.25]
    """
    solver = ihvp_lissa(
        func,
        argnums,
        batch_size,
        num_repeat,
        recursion_depth,
        damping,
        scaling,
        collate_fn,
        mode,
    )
    return lambda v: solver(x, v, in_dims=in_dims)


def _sample_dims(arguments, index: int, in_dims) -> Tuple[Optional[int], ...]:
    if in_dims is None:
        return tuple(None if i == index else 0 for i in range(len(arguments)))
    if len(in_dims) != len(arguments):
        raise ValueError(
            f"ihvp_lissa: in_dims has {len(in_dims)} entries, x has {len(arguments)} "
            f"arguments; give one sample dimension (or None) per argument."
        )
    return tuple(in_dims)


def _num_samples(arguments, dims) -> int:
    sizes = {i: a.shape[d] for i, (a, d) in enumerate(zip(arguments, dims)) if d is not None}
    if not sizes:
        return 1
    if len(set(sizes.values())) > 1:
        raise ValueError(
            f"ihvp_lissa: the data arguments disagree on the number of samples "
            f"(argument: size {sizes}); give matching in_dims."
        )
    return next(iter(sizes.values()))
