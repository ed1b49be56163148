r"""Diagonal of the loss Hessian, summed over the batch or per sample.

:math:`\mathrm{diag}(H) = \mathrm{diag}(G) + \sum_a \mathrm{diag}(J_a^\top
\operatorname{diag}(g_a \odot \phi_a''(x_a)) J_a)`: the exact GGN diagonal
plus the second-order terms of the curved elementwise operations ``a``
between the parameters and the loss (``tanh``, ``sigmoid``, GELU, SiLU,
softplus, ELU, ``exp``, ...), which :mod:`curvext.rules.curvature` finds in
the autograd graph. Operations whose second-order term is not elementwise
(softmax or normalisation of a tensor that depends on parameters, a product
of two tensors one parameter reaches both of) are refused by name.
"""

from __future__ import annotations

from typing import Optional, Tuple

from torch import Tensor

from curvext.extensions.base import EXACT, RESIDUAL, Extension, RunInfo
from curvext.rules.families import Grads, PerSampleRule


class DiagHessian(Extension):
    """Hessian diagonal ``p.hessian_diag`` (shape of ``p``).

    The Hessian is that of the loss module's output (scaling the loss after
    it, as ``GradScaler`` does, changes nothing). BackPACK: ``DiagHessian``,
    ``p.diag_h``.

    Example:
        >>> import torch
        >>> from curvext import backpack, extend
        >>> model = extend(torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(),
        ...                                    torch.nn.Linear(4, 2)))
        >>> loss_fn = extend(torch.nn.CrossEntropyLoss())
        >>> loss = loss_fn(model(torch.randn(5, 3)), torch.tensor([0, 1, 1, 0, 1]))
        >>> with backpack(DiagHessian(), BatchDiagHessian()):
        ...     loss.backward()
        >>> weight = model[0].weight
        >>> weight.hessian_diag.shape, weight.batch_hessian_diag.shape
        (torch.Size([4, 3]), torch.Size([5, 4, 3]))
        >>> torch.allclose(weight.batch_hessian_diag.sum(0), weight.hessian_diag)
        True
    """

    savefield = "hessian_diag"

    def column_sets(self) -> Tuple:
        return (EXACT, RESIDUAL)

    def reduce(self, rule: PerSampleRule, name: str, grads: Grads) -> Tensor:
        return rule.diag(name, grads)

    def reduce_curvature(
        self, rule: PerSampleRule, name: str, curvature: Tensor
    ) -> Optional[Tensor]:
        return rule.output_curvature_diag(name, curvature, per_sample=False)

    def finalize(
        self,
        rule: PerSampleRule,
        name: str,
        partial: Tuple[Tensor, Optional[Tensor]],
        info: RunInfo,
    ) -> Tensor:
        ggn, residual = partial
        return ggn if residual is None else ggn + residual


class BatchDiagHessian(DiagHessian):
    """Per-sample Hessian diagonals ``p.batch_hessian_diag``, ``[N, *p.shape]``.

    Those of the samples' terms ``c ℓ_n`` of the loss (``c`` its
    normalisation); they sum over ``N`` to ``DiagHessian``'s result.
    BackPACK: ``BatchDiagHessian``, ``p.diag_h_batch``.
    """

    savefield = "batch_hessian_diag"

    def reduce(self, rule: PerSampleRule, name: str, grads: Grads) -> Tensor:
        return rule.batch_diag(name, grads)

    def reduce_curvature(
        self, rule: PerSampleRule, name: str, curvature: Tensor
    ) -> Optional[Tensor]:
        return rule.output_curvature_diag(name, curvature, per_sample=True)
