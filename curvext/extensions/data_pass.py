"""Extensions of the passes over a data set (``from_data`` of the operators).

Each stores, next to its value, which of its tensors carry the loss's
normalisation, so that :func:`curvext.operators.data.accumulate_over_data`
can combine the batches as one batch of the whole data set would give them.
"""

from __future__ import annotations

from typing import Dict, Optional, cast

from torch import Tensor

from curvext.extensions.base import Extension, RunInfo
from curvext.extensions.ggn_diag import GGNDiag
from curvext.extensions.kfac import KFAC
from curvext.rules.families import KroneckerRule, OuterProductRule, PerSampleRule

#: Columns per batched backward in the KFAC/EKFAC passes over a data set (read
#: by the engine as ``columns_per_backward``). Their reductions are sums of
#: small Gram matrices, as cheap per column in one chunk as in many, and one
#: column at a time holds the least memory (curvlinops does the same). Measured
#: on CPU, type-2 KFAC over 10 batches of 128 (9 columns): benchmark MLP 84 ms,
#: 10.6 MB peak with all columns at once, 111 ms, 6.2 MB one at a time
#: (curvlinops 219 ms, 7.9 MB); the CNN takes one column per chunk anyway
#: (engine's byte budget). Other extensions batch their columns (GGNDiag on the
#: MLP is 2.7x slower one column at a time).
DATA_PASS_COLUMNS = 1


class ForData(Extension):
    """Mixin: an extension whose :meth:`finalize` also says which tensors are loss-scaled.

    :meth:`finalize` returns ``(value, loss_scaled)`` with ``loss_scaled`` one
    flag per tensor of ``value`` (a list of tensors, or one tensor); this
    method stores ``value`` as usual and keeps the flags and the run's
    :class:`RunInfo` for :func:`curvext.operators.data.accumulate_over_data`.
    """

    user_facing = False

    def begin_data_pass(self) -> None:
        """Called by :func:`curvext.operators.data.accumulate_over_data` before its first batch."""

    def accumulated(self, param: Tensor, value: Tensor) -> bool:
        """Whether ``value``, stored on ``param``, is already its running sum
        over the batches, weighted as
        :func:`curvext.operators.data.accumulate_over_data` weights it (it is
        then neither copied nor added again)."""
        return False

    def finalize_all(self, results, info: RunInfo) -> None:
        self.run_info = info
        self.loss_scaled = {id(param): flags for param, (_, flags) in results}
        super().finalize_all([(param, value) for param, (value, _) in results], info)


class GGNDiagForData(ForData, GGNDiag):
    def finalize(self, rule: PerSampleRule, name: str, partial: Tensor, info: RunInfo):
        return super().finalize(rule, name, partial, info), (True,)


class KFACForData(ForData, KFAC):
    r"""KFAC whose input factors ``A`` of ``Linear``/``Conv`` weights are, within
    :func:`curvext.operators.data.accumulate_over_data`, their running sums over the batches,
    :math:`\sum_b N_b A_b`, accumulated in place (the first batch's is
    computed weighted): no copy of ``A`` per batch,
    whose allocation and release fragmented the heap (peak memory grew by one
    ``A`` per batch)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # id(param) -> running sum of N_b A_b; None: plain per-batch factors
        # (the extension used outside accumulate_over_data, by the Laplace backend)
        self.input_sums: Optional[Dict[int, Tensor]] = None

    def begin_data_pass(self) -> None:
        self.input_sums = {}
        self.columns_per_backward = DATA_PASS_COLUMNS

    def accumulated(self, param: Tensor, value: Tensor) -> bool:
        return self.input_sums is not None and self.input_sums.get(id(param)) is value

    def finalize(self, rule: KroneckerRule, name: str, partial, info: RunInfo):
        output_factor = self.output_factor(rule, name, partial, info)
        param = rule.param(name)
        if self.input_sums is not None and rule.outer_product_vectors(name):
            rule = cast(OuterProductRule, rule)
            input_sum = self.input_sums.get(id(param))
            factors = rule.kfac_factors(
                name,
                output_factor,
                self.kfac_approx,
                input_sum=input_sum,
                weight=info.batch_size,
            )
            if input_sum is None:
                self.input_sums[id(param)] = factors[1 if rule.grad_first else 0]
        else:
            factors = rule.kfac_factors(name, output_factor, self.kfac_approx)
        if self.fisher_type == "forward-only":  # G = I: nothing carries the loss scale
            return factors, (False,) * len(factors)
        # the output-side factor's position differs (first for Linear, last
        # for ConvTranspose/Embedding): find it by identity
        flags = tuple(factor is output_factor for factor in factors)
        if sum(flags) != 1:
            raise RuntimeError(
                f"KronOperator.from_data: the rule of {type(rule.module).__name__} "
                f"returned KFAC factors without the output-side factor it was "
                f"given, so batches cannot be combined; this is a bug in curvext."
            )
        return factors, flags


__all__ = ["DATA_PASS_COLUMNS", "ForData", "GGNDiagForData", "KFACForData"]
