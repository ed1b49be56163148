r"""Symmetric factorisation of the GGN: the per-sample vectors themselves.

``p.sqrt_ggn`` is ``[K, N, *p.shape]`` and, with
``V = p.sqrt_ggn.flatten(0, 1).flatten(1)``, ``V.T @ V`` is the GGN block of
``p`` (exact: ``K`` is the rank of the loss Hessian of a sample, ``C - 1``
per position for cross-entropy and one per output entry for MSE and BCE) or
its MC estimate (``K = mc_samples``).
"""

from __future__ import annotations

from curvext.extensions.base import Combine, Extension, check_mc_samples, ggn_columns


class SqrtGGN(Extension):
    """Per-sample square-root vectors of the GGN, ``p.sqrt_ggn``.

    Args:
        mc_samples: 0 (default) for the exact square root, ``M > 0`` for ``M``
            Monte-Carlo samples.

    Example:
        >>> import torch
        >>> from curvext import backpack, extend
        >>> model = extend(torch.nn.Linear(3, 5))
        >>> loss_fn = extend(torch.nn.CrossEntropyLoss())
        >>> loss = loss_fn(model(torch.randn(4, 3)), torch.tensor([0, 1, 4, 2]))
        >>> with backpack(SqrtGGN()):
        ...     loss.backward()
        >>> model.weight.sqrt_ggn.shape  # [classes - 1, N, *p.shape]
        torch.Size([4, 4, 5, 3])
        >>> V = model.weight.sqrt_ggn.flatten(0, 1).flatten(1)
        >>> (V.T @ V).shape  # the GGN block of the weight
        torch.Size([15, 15])
    """

    savefield = "sqrt_ggn"
    combine = Combine.CAT

    def __init__(self, mc_samples: int = 0):
        self.mc_samples = check_mc_samples(type(self).__name__, mc_samples)

    def column_set(self):
        return ggn_columns(self.mc_samples)

    def reduce(self, rule, name, grads):
        return rule.per_sample(name, grads)
