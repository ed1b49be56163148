r"""First-order extensions: reductions of the individual gradients.

The individual gradient of sample ``n`` is the gradient of its term
:math:`c\,\ell_n` of the loss, so the individual gradients sum to ``p.grad``
(BackPACK's convention). They are the per-sample vectors of the single
column "loss gradient".

As BackPACK's, they are computed on any backward pass through extended
modules, with or without an extended loss (``out[:, i].sum().backward()``):
sample ``n`` is entry ``n`` of axis 0 of the modules' outputs, and its
individual gradient is the gradient of the backpropagated scalar through
sample ``n``'s entries of the outputs (no rescaling), so for a network that
does not mix samples they sum to ``p.grad``. ``Variance`` divides by that
``N``, as BackPACK does.
"""

from __future__ import annotations

from torch import Tensor

from curvext.extensions.base import GRADIENT, Extension, RunInfo
from curvext.rules.families import Grads, PerSampleRule


class _FirstOrder(Extension):
    any_backward = True

    def column_set(self):
        return GRADIENT


class BatchGrad(_FirstOrder):
    """Individual gradients ``p.grad_batch``, ``[N, *p.shape]``.

    Example:
        >>> import torch
        >>> from curvext import backpack, extend
        >>> model = extend(torch.nn.Linear(3, 2))
        >>> loss_fn = extend(torch.nn.MSELoss())
        >>> loss = loss_fn(model(torch.randn(4, 3)), torch.randn(4, 2))
        >>> with backpack(BatchGrad(), BatchL2Grad()):
        ...     loss.backward()
        >>> torch.allclose(model.weight.grad_batch.sum(0), model.weight.grad)
        True
        >>> model.weight.batch_l2.shape
        torch.Size([4])
    """

    savefield = "grad_batch"

    def reduce(self, rule: PerSampleRule, name: str, grads: Grads) -> Tensor:
        return rule.per_sample(name, grads)[0]


class BatchL2Grad(_FirstOrder):
    """Squared L2 norms of the individual gradients, ``p.batch_l2`` ``[N]``."""

    savefield = "batch_l2"

    def reduce(self, rule: PerSampleRule, name: str, grads: Grads) -> Tensor:
        return rule.batch_l2(name, grads)


class SumGradSquared(_FirstOrder):
    """Sum of squared individual gradients, ``p.sum_grad_squared`` (shape of ``p``)."""

    savefield = "sum_grad_squared"

    def reduce(self, rule: PerSampleRule, name: str, grads: Grads) -> Tensor:
        return rule.diag(name, grads)


class Variance(_FirstOrder):
    r"""Variance of the individual gradients, ``p.variance`` (shape of ``p``).

    :math:`\frac{1}{N}\sum_n g_n^2 - \big(\frac{1}{N}\sum_n g_n\big)^2` with
    :math:`g_n` the individual gradients (BackPACK's definition).
    """

    savefield = "variance"

    def reduce(self, rule: PerSampleRule, name: str, grads: Grads) -> Tensor:
        return rule.sample_sum(name, grads)[0], rule.diag(name, grads)

    def finalize(self, rule: PerSampleRule, name: str, partial: Tensor, info: RunInfo) -> Tensor:
        grad, sum_grad_squared = partial
        batch = info.batch_size
        return sum_grad_squared / batch - (grad / batch) ** 2
