r"""Diagonal of the GGN, summed over the batch or per sample.

:math:`\mathrm{diag}(G) = \sum_{n,k} v_{nk}^2` with :math:`v_{nk}` the
per-sample vectors of the exact loss-Hessian square root
(``mc_samples=0``) or of ``mc_samples`` Monte-Carlo samples.
"""

from __future__ import annotations

from torch import Tensor

from curvext.extensions.base import Extension, check_mc_samples, ggn_columns
from curvext.rules.families import Grads, PerSampleRule


class GGNDiag(Extension):
    """GGN diagonal ``p.ggn_diag`` (shape of ``p``).

    Args:
        mc_samples: 0 (default) for the exact GGN, ``M > 0`` for a Monte-Carlo
            estimate with ``M`` samples from the model's predictive distribution.

    Example:
        >>> import torch
        >>> from curvext import backpack, extend
        >>> model = extend(torch.nn.Linear(3, 2))
        >>> loss_fn = extend(torch.nn.CrossEntropyLoss())
        >>> loss = loss_fn(model(torch.randn(4, 3)), torch.tensor([0, 1, 1, 0]))
        >>> with backpack(GGNDiag(), BatchGGNDiag()):
        ...     loss.backward()
        >>> model.weight.ggn_diag.shape, model.weight.batch_ggn_diag.shape
        (torch.Size([2, 3]), torch.Size([4, 2, 3]))
        >>> torch.allclose(model.weight.batch_ggn_diag.sum(0), model.weight.ggn_diag)
        True
    """

    savefield = "ggn_diag"

    def __init__(self, mc_samples: int = 0):
        self.mc_samples = check_mc_samples(type(self).__name__, mc_samples)

    def column_set(self):
        return ggn_columns(self.mc_samples)

    def reduce(self, rule: PerSampleRule, name: str, grads: Grads) -> Tensor:
        return rule.diag(name, grads)


class BatchGGNDiag(GGNDiag):
    """Per-sample GGN diagonals ``p.batch_ggn_diag``, ``[N, *p.shape]``.

    They sum over ``N`` to ``GGNDiag``'s result.
    """

    savefield = "batch_ggn_diag"

    def reduce(self, rule: PerSampleRule, name: str, grads: Grads) -> Tensor:
        return rule.batch_diag(name, grads)
