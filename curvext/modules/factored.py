r"""Rules for layers whose per-sample vectors are sums of outer products.

For ``Linear``, ``ConvNd`` and ``ConvTransposeNd`` the per-sample vector of the
weight is

.. math:: v_{nk} = \sum_t G_{k,n,t} \otimes A_{n,t}

over positions ``t`` (tokens, spatial locations, and the calls of a tied
module, which act as extra positions) and per group, with ``G`` built from
the backpropagated columns and ``A`` from the layer input. The bias has
:math:`v_{nk} = \sum_t G_{k,n,t}`. Diagonals, Gram blocks and Kronecker
factors are then reductions of ``G`` and ``A`` that never form ``v`` when
there is one position.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import Tensor

from curvext.modules.base import ModuleRule
from curvext.recording import ModuleCall

KFAC_APPROXIMATIONS = ("expand", "reduce")


def _cat(parts: List[Tensor], dim: int) -> Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim)


class FactoredRule(ModuleRule):
    """Per-sample vectors as ``Σ_t G ⊗ A`` (see module docstring).

    Subclasses provide :meth:`input_side`, :meth:`grad_side` and
    :meth:`bias_side`.

    Attributes:
        grad_first: Whether the leading axis of the weight belongs to the
            output side (``[out, in, ...]``: Linear, Conv) or to the input
            side (``[in, out, ...]``: ConvTranspose).
    """

    grad_first = True

    def input_side(self, call: ModuleCall) -> Tensor:
        """``A [N, T, groups, d_in]`` of the weight."""
        raise NotImplementedError

    def grad_side(self, call: ModuleCall, grads: Tensor) -> Tensor:
        """``G [K, N, T, groups, d_grad]`` of the weight."""
        raise NotImplementedError

    def bias_side(self, call: ModuleCall, grads: Tensor) -> Tensor:
        """``G [K, N, T, 1, out]`` of the bias."""
        raise NotImplementedError

    def inputs(self) -> Tensor:
        """``A`` of all calls, concatenated along positions (computed once)."""
        if getattr(self, "_inputs", None) is None:
            self._inputs = _cat([self.input_side(c) for c in self.calls], dim=1)
        return self._inputs

    def factors(self, name: str, grads: List[Tensor]) -> Tuple[Tensor, Optional[Tensor]]:
        """``G`` and ``A`` (``None`` for the bias) with all calls as positions."""
        side = self.bias_side if name == "bias" else self.grad_side
        grad_side = _cat([side(c, g) for c, g in zip(self.calls, grads)], dim=2)
        return grad_side, (None if name == "bias" else self.inputs())

    def single_position(self) -> bool:
        """Whether ``T = 1`` (no weight sharing, one call)."""
        return self.inputs().shape[1] == 1

    def squares(self, name: str, grads: List[Tensor]) -> Tuple[Tensor, Optional[Tensor]]:
        r"""For ``T = 1``: :math:`\sum_k G^2` ``[N, groups, d_grad]`` and
        :math:`A^2` ``[N, groups, d_in]`` (``None`` for the bias).

        The first is shared by the weight and the bias of a layer whose bias
        sees the same columns (one pass over the columns for both).
        """
        side = self.bias_side if name == "bias" else self.grad_side
        key = (side.__func__, tuple(id(g) for g in grads))
        memo = getattr(self, "_squares_memo", None)
        if memo is None or memo[0] != key:
            grad_side = self.factors(name, grads)[0]
            squared = torch.linalg.vector_norm(grad_side[:, :, 0], dim=0).square()
            memo = (key, grads, squared)  # keep grads alive: their ids are the key
            self._squares_memo = memo
        if name == "bias":
            return memo[2], None
        if getattr(self, "_input_squares", None) is None:
            self._input_squares = self.inputs()[:, 0].square()
        return memo[2], self._input_squares

    def _to_param(self, name: str, vectors: Tensor, num_lead: int) -> Tensor:
        return vectors.reshape(*vectors.shape[:num_lead], *self.param(name).shape)

    def per_sample(self, name, grads):
        grad_side, input_side = self.factors(name, grads)
        if input_side is None:
            return self._to_param(name, grad_side.sum(2), 2)
        side = "kngoi" if self.grad_first else "kngio"
        vectors = torch.einsum(f"kntgo,ntgi->{side}", grad_side, input_side)
        return self._to_param(name, vectors, 2)

    def diag(self, name, grads):
        if not self.single_position():
            if name == "bias":
                grad_side = self.factors(name, grads)[0].sum(2)
                return self._to_param(name, grad_side.square().sum((0, 1)), 0)
            return super().diag(name, grads)
        grad_squares, input_squares = self.squares(name, grads)
        if input_squares is None:
            return self._to_param(name, grad_squares.sum(0), 0)
        side = "goi" if self.grad_first else "gio"
        diag = torch.einsum(f"ngo,ngi->{side}", grad_squares, input_squares)
        return self._to_param(name, diag, 0)

    def batch_diag(self, name, grads):
        if not self.single_position():
            if name == "bias":
                grad_side = self.factors(name, grads)[0].sum(2)
                return self._to_param(name, grad_side.square().sum(0), 1)
            return super().batch_diag(name, grads)
        grad_squares, input_squares = self.squares(name, grads)
        if input_squares is None:
            return self._to_param(name, grad_squares, 1)
        side = "ngoi" if self.grad_first else "ngio"
        diag = torch.einsum(f"ngo,ngi->{side}", grad_squares, input_squares)
        return self._to_param(name, diag, 1)

    def batch_l2(self, name, grads):
        if not self.single_position():
            if name == "bias":
                return self.factors(name, grads)[0].sum(2).square().sum((0, 2, 3))
            return super().batch_l2(name, grads)
        grad_squares, input_squares = self.squares(name, grads)
        if input_squares is None:
            return grad_squares.sum((1, 2))
        return (grad_squares.sum(-1) * input_squares.sum(-1)).sum(-1)

    def sample_sum(self, name, grads):
        grad_side, input_side = self.factors(name, grads)
        if input_side is None:
            return self._to_param(name, grad_side.sum((1, 2)), 1)
        side = "kgoi" if self.grad_first else "kgio"
        total = torch.einsum(f"kntgo,ntgi->{side}", grad_side, input_side)
        return self._to_param(name, total, 1)

    # KFAC. The factor over the weight's leading axis spans all groups; the
    # other one is shared by the groups (summed for gradients, averaged for
    # inputs), so that kron(*factors) matches p.flatten().
    def kfac_grad_factor(self, name, grads, approx):
        grad_side, _ = self.factors(name, grads)
        if approx == "reduce":
            grad_side = grad_side.sum(2, keepdim=True)
        if self.grad_first or name == "bias":
            flat = grad_side.flatten(3).flatten(0, 2)
        else:
            flat = grad_side.flatten(0, 3)
        return flat.T @ flat

    def kfac_grad_dim(self, name):
        shape = self.param(name).shape
        if self.grad_first or name == "bias":
            return shape[0]
        return shape[1:].numel()

    def kfac_input_factor(self, name, approx):
        if name == "bias":
            return None
        input_side = self.inputs()
        if approx == "reduce":
            input_side = input_side.mean(1, keepdim=True)
        if self.grad_first:
            flat = input_side.flatten(0, 2)
        else:
            flat = input_side.flatten(2).flatten(0, 1)
        return (flat.T @ flat) / flat.shape[0]

    def kfac_factors(self, name, grad_factor, approx):
        input_factor = self.kfac_input_factor(name, approx)
        if input_factor is None:
            return [grad_factor]
        if self.grad_first:
            return [grad_factor, input_factor]
        return [input_factor, grad_factor]
