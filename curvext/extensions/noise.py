r"""Gradient-noise statistics from the individual gradients of one batch.

With :math:`g_n` the individual gradients of a backward pass (curvext's
convention: they sum to the batch gradient :math:`g = \sum_n g_n`), the
per-sample gradients on the scale of :math:`g` are :math:`N g_n` (for
``reduction="mean"`` and a loss without inner averaging, :math:`\nabla
\ell_n`), their mean is :math:`g`, and

.. math::
    \text{sample\_grad\_norm\_sq} &= \tfrac{1}{N} \textstyle\sum_n \|N g_n\|^2
        = N \sum_n \|g_n\|^2, \\
    \text{grad\_variance} &= \tfrac{N}{N-1} \big(\text{sample\_grad\_norm\_sq}
        - \|g\|^2\big) = \tfrac{1}{N-1} \textstyle\sum_n \|N g_n - g\|^2,

the unbiased estimate of :math:`\operatorname{tr}\Sigma`, the trace of the
covariance of a per-sample gradient. ``noise_scale`` is
:math:`\operatorname{tr}\Sigma / \|g\|^2`, the plug-in estimate from one batch
of the "simple noise scale" :math:`B_\text{simple}` of McCandlish et al.
(2018), "An empirical model of large-batch training": the batch size at which
the gradient noise is as large as the gradient. A single batch's estimate is
noisy; average it over steps before reading it.

:class:`GradientNoise` computes the two sums it needs per parameter
(:math:`\|\sum_n g_n\|^2` and :math:`\sum_n \|g_n\|^2`, in float64) in the
backward pass, from the same "loss gradient" column as ``BatchL2Grad``; the
statistics of a set of parameters add them up. It keeps them to itself: it sets no
attribute on the parameters, so it can run next to ``BatchGrad``,
``BatchL2Grad`` or ``Variance``.
"""

from __future__ import annotations

import math
from typing import Dict, Iterable, List, Optional, Tuple

import torch
from torch import Tensor

from curvext.extensions.base import GRADIENT, Extension, RunInfo
from curvext.rules.families import Grads, PerSampleRule


class GradientNoise(Extension):
    """Squared norms of the batch gradient and of the individual gradients, kept internally.

    After the backward pass, :meth:`statistics` sums them over any set of
    parameters into the statistics of this module's docstring.

    Example:
        >>> import torch
        >>> from curvext import backpack, extend
        >>> model = extend(torch.nn.Linear(3, 2))
        >>> loss_fn = extend(torch.nn.MSELoss())
        >>> loss = loss_fn(model(torch.randn(8, 3)), torch.randn(8, 2))
        >>> noise = GradientNoise()
        >>> with backpack(noise):
        ...     loss.backward()
        >>> stats = noise.statistics(model.parameters())
        >>> sorted(stats)
        ['grad_norm_sq', 'grad_variance', 'noise_scale', 'sample_grad_norm_sq']
        >>> grad_norm_sq = sum(float(p.grad.square().sum()) for p in model.parameters())
        >>> abs(stats["grad_norm_sq"] - grad_norm_sq) < 1e-6 * grad_norm_sq
        True
    """

    # never set on a parameter (finalize_all keeps the values); unique so that
    # the context's duplicate check never confuses it with a public extension
    savefield = "_curvext_monitor_gradient_noise"

    def __init__(self):
        self._values: Optional[Dict[int, Tensor]] = None
        self._batch_size: Optional[int] = None

    def column_set(self):
        return GRADIENT

    def reduce(self, rule: PerSampleRule, name: str, grads: Grads) -> Tensor:
        # the statistics of a set of parameters need only two sums per
        # parameter, reduced here in float64: ||sum_n g_n||^2 and sum_n ||g_n||^2
        # (one column: the gradient, so there is one chunk and no combining)
        return torch.stack(
            (
                rule.sum_norm_sq(name, grads)[0].double(),
                rule.batch_l2(name, grads).sum(dtype=torch.float64),
            )
        )

    def finalize_all(self, results: List[Tuple[Tensor, object]], info: RunInfo) -> None:
        self._values = {id(param): value for param, value in results if value is not None}
        self._batch_size = info.batch_size

    def statistics(self, params: Iterable[Tensor]) -> Dict[str, float]:
        """The noise statistics of the parameters ``params`` (floats).

        Parameters that the loss does not depend on contribute nothing.
        ``grad_variance`` and ``noise_scale`` are ``nan`` for a batch of one
        sample (and ``noise_scale`` for a zero gradient).
        """
        if self._values is None:
            raise RuntimeError(
                "GradientNoise has no result yet: call loss.backward() inside "
                "`with backpack(noise):` first."
            )
        values = [self._values[id(p)] for p in params if id(p) in self._values]
        grad_norm_sq, sum_l2 = torch.stack(values).sum(0).tolist() if values else (0.0, 0.0)
        batch = self._batch_size
        sample_grad_norm_sq = batch * sum_l2
        if batch > 1:
            grad_variance = batch / (batch - 1) * (sample_grad_norm_sq - grad_norm_sq)
        else:
            grad_variance = math.nan
        noise_scale = grad_variance / grad_norm_sq if grad_norm_sq > 0 else math.nan
        return {
            "grad_norm_sq": grad_norm_sq,
            "sample_grad_norm_sq": sample_grad_norm_sq,
            "grad_variance": grad_variance,
            "noise_scale": noise_scale,
        }

    @property
    def batch_size(self) -> Optional[int]:
        """``N`` of the latest backward pass (``None`` before one)."""
        return self._batch_size

    def __repr__(self) -> str:
        return "GradientNoise()"


__all__ = ["GradientNoise"]
