r"""dattri's function-level Hessian API on plain callables, built on :mod:`torch.func`.

For a scalar function ``func`` of tensors and the argument
:math:`\theta` = ``x[argnums]``:

* :mod:`~curvext.functional.hvp`: :func:`hvp`, :func:`hvp_at_x`,
  :math:`\nabla^2_\theta f(x)\, v + \lambda v` (``"rev-rev"`` or ``"rev-fwd"``);
* :mod:`~curvext.functional.explicit`: :func:`ihvp_explicit`, :func:`ihvp_at_x_explicit`
  (dense Hessian and solve);
* :mod:`~curvext.functional.cg`: :func:`ihvp_cg`, :func:`ihvp_at_x_cg`;
* :mod:`~curvext.functional.arnoldi`: :func:`ihvp_arnoldi`, :func:`ihvp_at_x_arnoldi`;
* :mod:`~curvext.functional.lissa`: :func:`ihvp_lissa`, :func:`ihvp_at_x_lissa`.

As in dattri, the functions without ``_at_x`` return ``f(x, v)`` with ``x``
the tuple of ``func``'s positional arguments; ``ihvp_at_x_*`` take those
arguments as ``*x``, ``hvp_at_x`` as the tuple ``x``. The inverses take
``v`` ``[D]`` or ``[M, D]`` (one vector a row) and return its shape.

>>> import torch
>>> from curvext.functional import hvp_at_x, ihvp_at_x_cg
>>> f = lambda w: (w**4).sum() / 12  # Hessian diag(w^2)
>>> w = torch.tensor([1.0, 2.0], dtype=torch.float64)
>>> hvp_at_x(f, (w,))(torch.ones(2, dtype=torch.float64)).tolist()
[1.0, 4.0]
>>> ihvp_at_x_cg(f, w, max_iter=2)(torch.ones(2, dtype=torch.float64)).round(decimals=6).tolist()
[1.0, 0.25]
"""

from curvext.functional.arnoldi import ihvp_arnoldi, ihvp_at_x_arnoldi
from curvext.functional.cg import ihvp_at_x_cg, ihvp_cg
from curvext.functional.explicit import ihvp_at_x_explicit, ihvp_explicit
from curvext.functional.hvp import HessianVectorOperator, hvp, hvp_at_x
from curvext.functional.lissa import ihvp_at_x_lissa, ihvp_lissa

__all__ = [
    "hvp",
    "hvp_at_x",
    "HessianVectorOperator",
    "ihvp_explicit",
    "ihvp_at_x_explicit",
    "ihvp_cg",
    "ihvp_at_x_cg",
    "ihvp_arnoldi",
    "ihvp_at_x_arnoldi",
    "ihvp_lissa",
    "ihvp_at_x_lissa",
]
