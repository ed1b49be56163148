"""BackPACK's ``backpack.hessianfree``: matrix-free products by automatic
differentiation, with BackPACK's signatures.

- ``hvp.hessian_vector_product(f, params, v)``: ``H v`` by double backward.
- ``rop.R_op(ys, xs, vs)`` / ``jacobian_vector_product``: ``J v`` (``J`` the
  Jacobian of ``ys`` w.r.t. ``xs``), by the double-backward trick.
- ``lop.L_op(ys, xs, ws)`` / ``transposed_jacobian_vector_product``: ``Jᵀ w``.
- ``ggnvp.ggn_vector_product(loss, output, model, v)`` and
  ``ggn_vector_product_from_plist``: ``Jᵀ H J v`` with ``H`` the Hessian of
  ``loss`` w.r.t. ``output``.

All return tuples shaped like the tensors they differentiate with respect
to (zeros where a tensor does not influence the output). For repeated
products on a data set, :class:`curvext.operators.GGNOperator` and
:class:`curvext.operators.HessianOperator` are faster.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

Tensors = Union[Tensor, Sequence[Tensor]]


def _as_list(tensors: Tensors) -> List[Tensor]:
    return [tensors] if isinstance(tensors, Tensor) else list(tensors)


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
    params = _as_list(params)
    if grad_params is None:
        grad_params = torch.autograd.grad(
            f, params, create_graph=True, retain_graph=True, materialize_grads=True
        )
    products = torch.autograd.grad(
        _as_list(grad_params),
        params,
        grad_outputs=_as_list(v),
        retain_graph=True,
        materialize_grads=True,
    )
    return tuple(p.detach() for p in products) if detach else products


def R_op(  # noqa: N802 - BackPACK's name
    ys: Tensors, xs: Tensors, vs: Tensors, retain_graph: bool = True, detach: bool = True
) -> Tuple[Tensor, ...]:
    """``J v``: the Jacobian of ``ys`` w.r.t. ``xs`` times ``vs`` (shaped like ``xs``).

    Reverse mode twice: ``u ↦ Jᵀ u`` is linear in a dummy ``u``, and its
    vector-Jacobian product with ``vs`` is ``J vs``.

    Returns:
        A tuple shaped like ``ys``.
    """
    ys = _as_list(ys)
    dummies = [torch.zeros_like(y, requires_grad=True) for y in ys]
    transposed = L_op(ys, xs, dummies, retain_graph=retain_graph, detach=False)
    return L_op(transposed, dummies, vs, retain_graph=True, detach=detach)


def L_op(  # noqa: N802 - BackPACK's name
    ys: Tensors, xs: Tensors, ws: Tensors, retain_graph: bool = True, detach: bool = True
) -> Tuple[Tensor, ...]:
    """``Jᵀ w``: ``ws`` (shaped like ``ys``) times the Jacobian of ``ys`` w.r.t. ``xs``.

    Returns:
        A tuple shaped like ``xs``.
    """
    products = torch.autograd.grad(
        _as_list(ys),
        _as_list(xs),
        grad_outputs=_as_list(ws),
        create_graph=True,
        retain_graph=retain_graph,
        allow_unused=True,
        materialize_grads=True,
    )
    return tuple(p.detach() for p in products) if detach else products


def jacobian_vector_product(
    f: Tensors, x: Tensors, v: Tensors, retain_graph: bool = True, detach: bool = True
) -> Tuple[Tensor, ...]:
    """``J v`` (:func:`R_op`)."""
    return R_op(f, x, v, retain_graph=retain_graph, detach=detach)


def transposed_jacobian_vector_product(
    f: Tensors, x: Tensors, v: Tensors, retain_graph: bool = True, detach: bool = True
) -> Tuple[Tensor, ...]:
    """``Jᵀ v`` (:func:`L_op`)."""
    return L_op(f, x, v, retain_graph=retain_graph, detach=detach)


def ggn_vector_product_from_plist(
    loss: Tensor, output: Tensor, plist: Sequence[Tensor], v: Tensors
) -> Tuple[Tensor, ...]:
    """``Jᵀ H J v`` for the GGN block of ``plist``.

    Args:
        loss: The scalar loss.
        output: The model output the loss was computed from.
        plist: The parameters (their block of the GGN).
        v: Shaped like ``plist``.

    Returns:
        A tuple shaped like ``plist``.
    """
    jv = R_op(output, plist, v)
    hjv = hessian_vector_product(loss, output, jv)
    return L_op(output, plist, hjv)


def ggn_vector_product(
    loss: Tensor, output: Tensor, model: nn.Module, v: Tensors
) -> Tuple[Tensor, ...]:
    """``Jᵀ H J v`` for the trainable parameters of ``model`` (in order)."""
    plist = [p for p in model.parameters() if p.requires_grad]
    return ggn_vector_product_from_plist(loss, output, plist, v)


__all__ = [
    "hessian_vector_product",
    "R_op",
    "L_op",
    "jacobian_vector_product",
    "transposed_jacobian_vector_product",
    "ggn_vector_product",
    "ggn_vector_product_from_plist",
]
