r"""Curvature of a whole data set, accumulated one batch at a time.

Shared by :meth:`KronOperator.from_data <curvext.operators.KronOperator.from_data>`
and :meth:`DiagonalOperator.from_data
<curvext.operators.DiagonalOperator.from_data>`: run one backward pass per
batch ``(X, y)`` inside ``backpack(extension)``, read what it stored on the
parameters, and combine the batches so that the result for a data set split
into batches equals the result for the whole set in one batch.

**Normalisation.** A loss with ``reduction="mean"`` multiplies its sum over
samples by :math:`c = 1/d`, with :math:`d` its denominator (the number of
entries for ``MSELoss``/``BCEWithLogitsLoss``, the summed class weights of
the non-ignored targets for ``CrossEntropyLoss``); ``reduction="sum"`` has
:math:`c = 1`. On batch :math:`b` (:math:`N_b` samples, normalisation
:math:`c_b = 1/d_b`) the stored tensors are of two kinds:

- *loss-scaled* ones are :math:`c_b` times a sum over the batch's samples,
  :math:`T_b = c_b S_b`: the GGN diagonal, KFAC's output-side factor
  :math:`G` (type-2, MC and empirical), and the whole block of a parameter
  without Kronecker structure. Over the whole set,
  :math:`T = c \sum_b S_b = \sum_b (c / c_b)\, T_b`. For ``"mean"`` the
  denominators add up, :math:`1/c = \sum_b d_b`, so
  :math:`T = \sum_b d_b T_b / \sum_b d_b` (for equal-sized batches of
  ``MSELoss``, the plain mean of the :math:`T_b`); for ``"sum"``,
  :math:`T = \sum_b T_b`.
- *sample averages*, :math:`T_b = \frac{1}{N_b}\sum_{n \in b} t_n`: KFAC's
  input-side factor :math:`A` (averaged over samples and, for
  ``kfac_approx="expand"``, over the :math:`T` positions of a sample too,
  which must then be the same in every batch), and for
  ``fisher_type="forward-only"`` the identity standing in for :math:`G`.
  Over the whole set, :math:`T = \sum_b N_b T_b / \sum_b N_b`.

Monte-Carlo columns (``fisher_type="mc"``, ``mc_samples > 0``) are drawn
afresh per batch, so there the equality holds in expectation only.

**Side effects.** ``model`` and ``loss_fn`` are extended with
:func:`curvext.extend` (in place; extending twice is harmless). Each batch's
graph is freed by its own ``backward``; nothing is kept from earlier batches
but the running sums. The parameters' ``.grad`` and any attribute the
extension stores (``p.kfac``, ``p.ggn_diag``) are restored to what they were
before the call, also when a batch raises. Batches must already be on the
model's device and dtype.
"""

from __future__ import annotations

from typing import Iterable, List, Optional, Sequence, Tuple

from torch import Tensor, nn

from curvext.context import backpack
from curvext.extend import extend
from curvext.extensions.base import Extension, RunInfo
from curvext.extensions.ggn_diag import GGNDiag
from curvext.extensions.kfac import KFAC
from curvext.operators.base import collect_params, stored


class _ForData(Extension):
    """Mixin: an extension whose :meth:`finalize` also says which tensors are loss-scaled.

    :meth:`finalize` returns ``(value, loss_scaled)`` with ``loss_scaled`` one
    flag per tensor of ``value`` (a list of tensors, or one tensor); this
    method stores ``value`` as usual and keeps the flags and the run's
    :class:`RunInfo` for :func:`accumulate_over_data`.
    """

    def finalize_all(self, results, info: RunInfo) -> None:
        self.run_info = info
        self.loss_scaled = {id(param): flags for param, (_, flags) in results}
        super().finalize_all([(param, value) for param, (value, _) in results], info)


class _GGNDiagForData(_ForData, GGNDiag):
    def finalize(self, rule, name, partial, info):
        return super().finalize(rule, name, partial, info), (True,)


class _KFACForData(_ForData, KFAC):
    def finalize(self, rule, name, partial, info):
        output_factor = self.output_factor(rule, name, partial, info)
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


def _tqdm():
    try:
        from tqdm import tqdm
    except ImportError as error:
        raise ImportError(
            "progressbar=True needs tqdm, which is not installed: "
            "pip install tqdm, or pass progressbar=False."
        ) from error
    return tqdm


def accumulate_over_data(
    model: nn.Module,
    loss_fn: nn.Module,
    data: Iterable,
    extension: _ForData,
    params: Optional[Iterable[Tensor]],
    progressbar: bool,
    owner: str,
) -> Tuple[List[Tensor], List[List[Tensor]]]:
    """Run ``extension`` on every batch of ``data`` and combine (see module docstring).

    Args:
        model: The model; extended in place if it is not yet.
        loss_fn: A supported loss module with ``reduction="mean"`` or ``"sum"``.
        data: An iterable of ``(X, y)`` batches.
        extension: :class:`_GGNDiagForData` or :class:`_KFACForData`.
        params: The parameters to read (default: the model's trainable ones).
        progressbar: Show a ``tqdm`` progress bar over the batches.
        owner: The calling method, for error messages.

    Returns:
        The trainable parameters and, per parameter, the combined stored
        tensors (one for ``GGNDiag``, the factors for ``KFAC``).

    Raises:
        ValueError: If ``data`` is empty, a batch is not an ``(X, y)`` pair,
            or the loss reduction is neither ``"mean"`` nor ``"sum"``.
        ImportError: If ``progressbar=True`` and ``tqdm`` is not installed.
    """
    reduction = getattr(loss_fn, "reduction", None)
    if reduction not in ("mean", "sum"):
        raise ValueError(
            f"{owner}: loss_fn={type(loss_fn).__name__}(reduction={reduction!r}); "
            f"curvature over a data set needs reduction='mean' or 'sum'."
        )
    model, loss_fn = extend(model), extend(loss_fn)
    params = collect_params(
        model.parameters() if params is None else params, owner
    )
    batches = _tqdm()(data, desc=owner) if progressbar else data
    savefield = extension.savefield
    # every parameter the backward can touch, not only those read
    touched = list({id(p): p for p in [*model.parameters(), *params]}.values())
    saved = [(p, p.grad, p.__dict__.get(savefield, _MISSING)) for p in touched]

    totals: List[Optional[List[Tensor]]] = [None] * len(params)
    flags: List[Sequence[bool]] = [()] * len(params)
    # Σ_b d_b (used for "mean" only), Σ_b N_b
    scaled_total, samples_total, num_batches = 0.0, 0, 0
    try:
        for index, batch in enumerate(batches):
            X, y = _unpack(batch, index, owner)
            for param in touched:
                param.grad = None
                param.__dict__.pop(savefield, None)
            extension.run_info = None
            with backpack(extension):
                loss_fn(model(X), y).backward()
            info = extension.run_info
            if info is None:
                raise RuntimeError(
                    f"{owner}: the backward pass of batch {index} did not reach "
                    f"curvext's engine; is the loss computed by loss_fn from the "
                    f"output of model?"
                )
            # d_b = 1 / c_b; a batch whose targets are all ignored has c_b = 0
            # and contributes nothing
            denominator = 1.0 / info.normalization if info.normalization > 0 else 0.0
            scaled_weight = denominator if reduction == "mean" else 1.0
            scaled_total += scaled_weight
            samples_total += info.batch_size
            num_batches += 1
            for position, param in enumerate(params):
                values = stored(param, position, savefield, owner)
                values = [values] if isinstance(values, Tensor) else list(values)
                flags[position] = extension.loss_scaled[id(param)]
                weighted = [
                    value.detach() * (scaled_weight if scaled else info.batch_size)
                    for value, scaled in zip(values, flags[position])
                ]
                totals[position] = (
                    weighted
                    if totals[position] is None
                    else [t + w for t, w in zip(totals[position], weighted)]
                )
    finally:
        for param, grad, value in saved:
            param.grad = grad
            param.__dict__.pop(savefield, None)
            if value is not _MISSING:
                setattr(param, savefield, value)
    if num_batches == 0:
        raise ValueError(
            f"{owner}: `data` yielded no batch; pass a non-empty iterable of "
            f"(X, y) batches, e.g. a DataLoader over a non-empty data set."
        )
    scaled_norm = scaled_total if reduction == "mean" and scaled_total > 0 else 1.0
    combined = [
        [
            total / (scaled_norm if scaled else samples_total)
            for total, scaled in zip(block, block_flags)
        ]
        for block, block_flags in zip(totals, flags)
    ]
    return params, combined


_MISSING = object()


def _unpack(batch, index: int, owner: str):
    """``(X, y)`` of one batch, or an error naming the batch."""
    try:
        X, y = batch
    except (TypeError, ValueError):
        raise ValueError(
            f"{owner}: batch {index} of `data` is a {type(batch).__name__}, not an "
            f"(X, y) pair; `data` must yield (inputs, targets) pairs."
        ) from None
    return X, y


__all__ = ["accumulate_over_data"]
