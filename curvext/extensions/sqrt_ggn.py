r"""Symmetric factorisation of the GGN: the per-sample vectors themselves.

``p.sqrt_ggn`` is ``[K, N, *p.shape]`` and, with
``V = p.sqrt_ggn.flatten(0, 1).flatten(1)``, ``V.T @ V`` is the GGN block of
``p`` (exact, ``K`` = number of loss-Hessian columns per sample) or its MC
estimate (``K = mc_samples``).
"""

from __future__ import annotations

from curvext.extensions.base import Extension, check_mc_samples, ggn_columns


class SqrtGGN(Extension):
    """Per-sample square-root vectors of the GGN, ``p.sqrt_ggn``.

    Args:
        mc_samples: 0 (default) for the exact square root, ``M > 0`` for ``M``
            Monte-Carlo samples.
    """

    savefield = "sqrt_ggn"
    combine = "cat"

    def __init__(self, mc_samples: int = 0):
        self.mc_samples = check_mc_samples(type(self).__name__, mc_samples)

    def column_set(self):
        return ggn_columns(self.mc_samples)

    def reduce(self, rule, name, grads):
        return rule.per_sample(name, grads)
