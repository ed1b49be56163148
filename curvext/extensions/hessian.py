r"""The loss Hessian: its diagonal (summed or per sample) and block products.

:math:`\mathrm{diag}(H) = \mathrm{diag}(G) + \sum_a \mathrm{diag}(J_a^\top
\operatorname{diag}(g_a \odot \phi_a''(x_a)) J_a)`: the exact GGN diagonal
plus the second-order terms of the curved elementwise operations ``a``
between the parameters and the loss (``tanh``, ``sigmoid``, GELU, SiLU,
softplus, ELU, ``exp``, ...), which :mod:`curvext.rules.curvature` finds in
the autograd graph. Operations whose second-order term is not elementwise
(softmax or normalisation of a tensor that depends on parameters, a product
of two tensors one parameter reaches both of) are refused by name.

The block products (BackPACK's ``HMP`` and ``PCHMP``) keep the Gram factors
of the same columns, the second-order terms split by sign, and multiply
after the backward pass.
"""

from __future__ import annotations

from typing import Callable, Optional, Tuple

from torch import Tensor

from curvext.extensions.base import EXACT, RESIDUAL, Combine, Extension, RunInfo
from curvext.extensions.ggn_mp import block_product
from curvext.rules.families import Grads, GramRule, PerSampleRule


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

    #: Whether the diagonals are per sample (``BatchDiagHessian``).
    per_sample = False

    # Linear/Conv layers with one position add up the squared output sides
    # (``rule.diag_weights``, [N, groups, out]) over all columns and terms and
    # form the [N, out, in] diagonal once, in ``finalize``
    def reduce(self, rule: PerSampleRule, name: str, grads: Grads) -> Tensor:
        if rule.compact_diag(name):
            return rule.diag_weights(name, grads)
        return rule.batch_diag(name, grads) if self.per_sample else rule.diag(name, grads)

    def reduce_residual(
        self, rule: PerSampleRule, name: str, positive: Grads, negative: Grads
    ) -> Tensor:
        if rule.compact_diag(name):
            return rule.diag_weights(name, positive) - rule.diag_weights(name, negative)
        return rule.signed_diag(name, positive, negative, self.per_sample)

    def reduce_curvature(
        self, rule: PerSampleRule, name: str, curvature: Tensor
    ) -> Optional[Tensor]:
        if rule.compact_diag(name):
            return rule.curvature_weights(name, curvature)
        return rule.output_curvature_diag(name, curvature, self.per_sample)

    def finalize(
        self,
        rule: PerSampleRule,
        name: str,
        partial: Tuple[Tensor, Optional[Tensor]],
        info: RunInfo,
    ) -> Tensor:
        ggn, residual = partial
        total = ggn if residual is None else ggn + residual
        if rule.compact_diag(name):
            return rule.diag_from_weights(name, total, self.per_sample)
        return total


class BatchDiagHessian(DiagHessian):
    """Per-sample Hessian diagonals ``p.batch_hessian_diag``, ``[N, *p.shape]``.

    Those of the samples' terms ``c ℓ_n`` of the loss (``c`` its
    normalisation); they sum over ``N`` to ``DiagHessian``'s result.
    BackPACK: ``BatchDiagHessian``, ``p.diag_h_batch``.
    """

    savefield = "batch_hessian_diag"
    per_sample = True


class HMP(Extension):
    r"""``p.hmp(M)``: the parameter's Hessian block times ``M`` ``[V, *p.shape]``.

    The exact diagonal block of the loss Hessian (the GGN's plus the
    second-order terms that :class:`DiagHessian` adds, with the same
    refusals), as a function stored on each parameter after the backward
    pass; like :class:`~curvext.extensions.GGNMP` it keeps the pushed-back
    columns (one per output entry of every curved op, besides the loss's),
    not the graph. BackPACK: ``HMP``, ``p.hmp``.

    Example:
        >>> import torch
        >>> from curvext import backpack, extend
        >>> model = extend(torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Sigmoid(),
        ...                                    torch.nn.Linear(4, 2)))
        >>> loss_fn = extend(torch.nn.MSELoss())
        >>> loss = loss_fn(model(torch.randn(5, 3)), torch.randn(5, 2))
        >>> with backpack(HMP()):
        ...     loss.backward()
        >>> model[0].weight.hmp(torch.randn(7, 4, 3)).shape
        torch.Size([7, 4, 3])
    """

    savefield = "hmp"
    combine = Combine.CAT
    #: Weight of the negative second-order terms (-1: the Hessian).
    negative_weight = -1.0

    def column_sets(self) -> Tuple:
        return (EXACT, RESIDUAL)

    def reduce(self, rule: GramRule, name: str, grads: Grads) -> Tensor:
        return rule.gram_factor(name, grads)

    def reduce_residual(
        self, rule: GramRule, name: str, positive: Grads, negative: Grads
    ) -> Tuple[Tensor, Tensor]:
        return rule.gram_factor(name, positive), rule.gram_factor(name, negative)

    def finalize(self, rule: GramRule, name: str, partial, info: RunInfo) -> Callable:
        ggn, residual = partial
        positive, negative = residual if residual is not None else (None, None)
        terms = [(ggn, 1.0), (positive, 1.0), (negative, self.negative_weight)]
        return block_product(self.savefield, rule, name, terms)


class PCHMP(HMP):
    r"""``p.pchmp(M)``: products with the positive-curvature Hessian block.

    The Hessian block with the negative second-order terms of the curved
    ops removed (``modify="clip"``: :math:`\max(d, 0)`) or made positive
    (``"abs"``: :math:`|d|`), ``d = g \phi''(x)`` per op output (Chen et al.,
    2018, BDA-PCH): positive semi-definite. BackPACK: ``PCHMP``, ``p.pchmp``.

    Args:
        modify: ``"clip"`` (default) or ``"abs"``.
    """

    savefield = "pchmp"

    def __init__(self, modify: str = "clip"):
        if modify not in ("clip", "abs"):
            raise ValueError(f'PCHMP(modify={modify!r}) is invalid: use "clip" or "abs".')
        self.modify = modify
        self.negative_weight = 0.0 if modify == "clip" else 1.0
