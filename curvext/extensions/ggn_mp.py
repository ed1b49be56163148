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
from typing import Callable, Optional

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
        param = rule.param(name)
        shape, where = tuple(param.shape), f"{type(rule.module).__name__}.{name}"
        rule = _without_graph(rule)

        def ggnmp(matrix: Tensor) -> Tensor:
            # computed in the factor's dtype, returned in the promoted one (as `@`)
            single = tuple(matrix.shape) == shape
            matrices = matrix.unsqueeze(0) if single else matrix
            if matrices.dim() < 1 or tuple(matrices.shape[1:]) != shape:
                raise ValueError(
                    f"p.ggnmp of {where}: expected a tensor [V, *{list(shape)}] (or one "
                    f"vector {list(shape)}), got {list(matrix.shape)}."
                )
            if partial is None:  # the loss does not depend on the parameter
                return matrix.new_zeros(matrix.shape)
            matrices = matrices.to(partial.device)
            coefficients = rule.gram_dots(name, partial, matrices)  # [K N, V]
            product = rule.gram_vectors(name, partial, coefficients)
            product = product.to(torch.promote_types(partial.dtype, matrix.dtype))
            return product[0] if single else product

        return ggnmp


def _without_graph(rule: GramRule) -> GramRule:
    """A shallow copy of ``rule`` whose calls hold no autograd nodes: the
    function stored on the parameter keeps the layer's inputs, not the
    graph (nor, through its nodes, the other modules' calls)."""
    light = copy.copy(rule)
    light.calls = [dataclasses.replace(call, edges=[], input_nodes=[]) for call in rule.calls]
    return light


__all__ = ["GGNMP"]
