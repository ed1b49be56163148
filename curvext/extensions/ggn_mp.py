r"""Products with a parameter's GGN block, after the backward pass (BackPACK's ``GGNMP``).

:math:`G_{pp} M = \sum_{n,k} v_{nk} (v_{nk}^\top M)` with :math:`v_{nk}` the
per-sample vectors of the parameter (exact loss-Hessian square root, or
``mc_samples`` Monte-Carlo columns). The backward pass keeps each
parameter's Gram factor (:class:`~curvext.rules.families.GramRule`: for
``Linear``/``Conv`` weights with one position the output side ``G`` alone,
the inputs being the layer's; otherwise the vectors ``[K, N, P]``); a
product is two contractions with it, never the ``[P, P]`` block.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Callable, List, Optional, Tuple

import torch
from torch import Tensor

from curvext.extensions.base import Combine, Extension, RunInfo, check_mc_samples, ggn_columns
from curvext.rules.families import Grads, GramRule


class GGNMP(Extension):
    r"""``p.ggnmp(M)``: the parameter's GGN block times ``M`` ``[V, *p.shape]``.

    After the backward pass every parameter holds a function ``p.ggnmp``
    that takes ``M`` ``[V, *p.shape]`` (or one vector ``p.shape``) and
    returns :math:`G_{pp} M` of the same shape: each slice along the leading
    axis multiplied by the parameter's diagonal block of the GGN (of the
    batch's loss, normalised as the loss is). It keeps the layer's inputs and
    the pushed-back columns (``K·N`` of them) alive until the next backward
    pass through the parameter, which removes it (not the autograd graph).

    Args:
        mc_samples: 0 (default) for the exact GGN, ``M > 0`` for a Monte-Carlo
            estimate with ``M`` samples.

    Example:
        >>> import torch
        >>> from curvext import backpack, extend
        >>> model = extend(torch.nn.Linear(3, 2))
        >>> loss_fn = extend(torch.nn.CrossEntropyLoss())
        >>> loss = loss_fn(model(torch.randn(4, 3)), torch.tensor([0, 1, 1, 0]))
        >>> with backpack(GGNMP()):
        ...     loss.backward()
        >>> model.weight.ggnmp(torch.randn(5, 2, 3)).shape
        torch.Size([5, 2, 3])
    """

    savefield = "ggnmp"
    combine = Combine.CAT

    def __init__(self, mc_samples: int = 0):
        self.mc_samples = check_mc_samples(type(self).__name__, mc_samples)

    def column_set(self):
        return ggn_columns(self.mc_samples)

    def reduce(self, rule: GramRule, name: str, grads: Grads) -> Tensor:
        return rule.gram_factor(name, grads)

    def finalize(
        self, rule: GramRule, name: str, partial: Optional[Tensor], info: RunInfo
    ) -> Callable[[Tensor], Tensor]:
        return block_product(self.savefield, rule, name, [(partial, 1.0)])


def block_product(
    attribute: str, rule: GramRule, name: str, terms: List[Tuple[Optional[Tensor], float]]
) -> Callable[[Tensor], Tensor]:
    r"""The function stored as ``p.<attribute>``: ``M [V, *p.shape]`` (or one
    vector) ↦ :math:`\sum_{(F, s)} s \sum_{nk} v_{nk} (v_{nk}^\top M)` over the
    Gram factors ``F`` of ``terms`` (``None``: no vectors) and their signs ``s``."""
    param = rule.param(name)
    shape, where = tuple(param.shape), f"{type(rule.module).__name__}.{name}"
    rule = _without_graph(rule)
    terms = [(factor, sign) for factor, sign in terms if factor is not None and sign != 0]

    def product(matrix: Tensor) -> Tensor:
        # computed in the factors' dtype, returned in the promoted one (as `@`)
        single = tuple(matrix.shape) == shape
        matrices = matrix.unsqueeze(0) if single else matrix
        if matrices.dim() < 1 or tuple(matrices.shape[1:]) != shape:
            raise ValueError(
                f"p.{attribute} of {where}: expected a tensor [V, *{list(shape)}] (or one "
                f"vector {list(shape)}), got {list(matrix.shape)}."
            )
        if not terms:  # the loss does not depend on the parameter
            return matrix.new_zeros(matrix.shape)
        total = None
        for factor, sign in terms:
            coefficients = rule.gram_dots(name, factor, matrices.to(factor.device))  # [K N, V]
            part = rule.gram_vectors(name, factor, coefficients)
            total = sign * part if total is None else total.add_(part, alpha=sign)
        total = total.to(torch.promote_types(terms[0][0].dtype, matrix.dtype))
        return total[0] if single else total

    return product


def _without_graph(rule: GramRule) -> GramRule:
    """A shallow copy of ``rule`` whose calls hold no autograd nodes: the
    function stored on the parameter keeps the layer's inputs, not the
    graph (nor, through its nodes, the other modules' calls)."""
    light = copy.copy(rule)
    light.calls = [dataclasses.replace(call, edges=[], input_nodes=[]) for call in rule.calls]
    return light


__all__ = ["GGNMP"]
