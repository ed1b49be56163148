"""BackPACK's ``backpack.hessianfree.hvp``: Hessian-vector products by double backward."""

from __future__ import annotations

from typing import List, Optional, Sequence, Union

import torch
from torch import Tensor

Tensors = Union[Tensor, Sequence[Tensor]]


def hessian_vector_product(
    f: Tensor,
    params: Tensors,
    v: Tensors,
    grad_params: Optional[Tensors] = None,
    detach: bool = True,
) -> List[Tensor]:
    """``H v`` with ``H`` the Hessian of the scalar ``f`` w.r.t. ``params``.

    Args:
        f: A scalar in the graph of ``params``.
        params: A tensor or a list of tensors.
        v: Shaped like ``params``.
        grad_params: The gradient of ``f`` w.r.t. ``params``, computed with
            ``create_graph=True`` (saves the first backward pass).
        detach: Detach the result from the graph (default ``True``).

    Returns:
        ``H v`` as a tuple shaped like ``params``.
    """
    params = [params] if isinstance(params, Tensor) else list(params)
    v = [v] if isinstance(v, Tensor) else list(v)
    if grad_params is None:
        grad_params = torch.autograd.grad(
            f, params, create_graph=True, retain_graph=True, materialize_grads=True
        )
    else:
        grad_params = [grad_params] if isinstance(grad_params, Tensor) else list(grad_params)
    products = torch.autograd.grad(
        grad_params, params, grad_outputs=v, retain_graph=True, materialize_grads=True
    )
    return tuple(p.detach() for p in products) if detach else products


__all__ = ["hessian_vector_product"]
