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

from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from curvext.context import backpack
from curvext.distributed import (
    all_reduce_sum,
    broadcast,
    check_same_on_ranks,
    fingerprint,
    raise_on_failure,
    resolve_ranks,
)
from curvext.engine import put_stored, take_stored
from curvext.extend import extend
from curvext.extensions.data_pass import ForData
from curvext.operators.base import collect_params, stored


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
    extension: ForData,
    params: Optional[Iterable[Tensor]],
    progressbar: bool,
    owner: str,
    distributed=None,
    check_data: Optional[Callable[[], None]] = None,
) -> Tuple[List[Tensor], List[List[Tensor]]]:
    """Run ``extension`` on every batch of ``data`` and combine (see module docstring).

    Args:
        model: The model; extended in place if it is not yet.
        loss_fn: A supported loss module with ``reduction="mean"`` or ``"sum"``.
        data: An iterable of ``(X, y)`` batches.
        extension: A :class:`~curvext.extensions.data_pass.ForData` extension
            (``GGNDiagForData``, ``KFACForData``, ``EKFACCorrections``).
        params: The parameters to read (default: the model's trainable ones).
        progressbar: Show a ``tqdm`` progress bar over the batches (on rank 0
            only, over a process group).
        owner: The calling method, for error messages.
        distributed: ``None`` (default): if a :mod:`torch.distributed` process
            group is initialised, ``data`` is this rank's shard and the sums
            are added over the ranks; ``False``: this rank's ``data`` only;
            ``True`` or a ``ProcessGroup``: over that group (see
            :mod:`curvext.distributed` and :func:`_sum_over_ranks`).
        check_data: A refusal of ``data`` to run before the pass (raising
            ``ValueError``); over a process group its error reaches every rank
            through the collectives instead of leaving the others waiting.

    Returns:
        The trainable parameters and, per parameter, the combined stored
        tensors (one for ``GGNDiag``, the factors for ``KFAC``).

    Raises:
        ValueError: If ``data`` is empty (on every rank), a batch is not an
            ``(X, y)`` pair, the loss reduction is neither ``"mean"`` nor
            ``"sum"``, or, over a process group, the ranks hold different
            parameters.
        RuntimeError: Over a process group, on every rank if another rank's
            pass over its shard raised.
        ImportError: If ``progressbar=True`` and ``tqdm`` is not installed.
    """
    reduction = getattr(loss_fn, "reduction", None)
    if reduction not in ("mean", "sum"):
        raise ValueError(
            f"{owner}: loss_fn={type(loss_fn).__name__}(reduction={reduction!r}); "
            f"curvature over a data set needs reduction='mean' or 'sum'."
        )
    if isinstance(model, nn.parallel.DistributedDataParallel):
        raise ValueError(
            f"{owner}: model is a DistributedDataParallel wrapper, whose gradient "
            f"synchronisation does not fit curvature passes; pass its .module "
            f"(curvext sums over the ranks itself, see distributed=)."
        )
    model, loss_fn = extend(model), extend(loss_fn)
    params = collect_params(model.parameters() if params is None else params, owner)
    ranks = resolve_ranks(distributed, owner)
    show_bar = progressbar and (ranks is None or ranks.rank == 0)
    # every parameter the backward can touch, not only those read
    touched = list({id(p): p for p in [*model.parameters(), *params]}.values())
    failure = None
    try:  # a refusal on one rank must not leave the others waiting in a collective
        if check_data is not None:
            check_data()
        batches = _tqdm()(data, desc=owner) if show_bar else data
        totals, flags, scaled_total, samples_total, num_batches = _local_sums(
            model, loss_fn, batches, extension, params, touched, owner
        )
    except Exception as error:
        if ranks is None:
            raise
        # join the collectives anyway, so that the other ranks raise too
        failure = error
        totals, flags = [None] * len(params), [()] * len(params)
        scaled_total, samples_total, num_batches = 0.0, 0, 0
    if ranks is not None:
        totals, flags, scaled_total, samples_total, num_batches = _sum_over_ranks(
            totals,
            flags,
            (scaled_total, samples_total, num_batches),
            failure,
            params,
            touched,
            ranks,
            owner,
        )
    if num_batches == 0:
        anywhere = "" if ranks is None else f" on any of the {ranks.world_size} ranks"
        raise ValueError(
            f"{owner}: `data` yielded no batch{anywhere}; pass a non-empty iterable "
            f"of (X, y) batches, e.g. a DataLoader over a non-empty data set."
        )
    scaled_norm = scaled_total if reduction == "mean" and scaled_total > 0 else 1.0
    normalised = set()  # ids of the sums divided already: a shared sum is divided once

    def normalise(total: Tensor, scaled: bool) -> Tensor:
        # in place: the sums are this function's own tensors
        if id(total) not in normalised:
            normalised.add(id(total))
            total.div_(scaled_norm if scaled else samples_total)
        return total

    combined = [
        [normalise(total, scaled) for total, scaled in zip(block, block_flags)]
        for block, block_flags in zip(totals, flags)
    ]
    return params, combined


_MISSING = object()


def _local_sums(model, loss_fn, batches, extension, params, touched, owner):
    """This process's sums over ``batches``: per parameter the weighted stored
    tensors and their flags, then ``Σ_b d_b`` (``"mean"``), ``Σ_b N_b`` and the
    number of batches. Restores ``.grad`` and the save field, also on errors."""
    reduction = loss_fn.reduction
    savefield = extension.savefield
    saved = [(p, p.grad, p.__dict__.get(savefield, _MISSING), take_stored(p)) for p in touched]
    extension.begin_data_pass()
    totals: List[Optional[List[Tensor]]] = [None] * len(params)
    flags: List[Sequence[bool]] = [()] * len(params)
    aliases: Dict[Tuple[int, int], Tuple[int, int]] = {}
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
                prediction = model(X)
                loss = loss_fn(prediction, y)
                # the engine runs when the backward reaches the prediction; the
                # parameters' gradients would be thrown away, so stop there
                torch.autograd.grad(loss, prediction)
            del prediction, loss
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
            batch_values = []
            for position, param in enumerate(params):
                values = stored(param, position, savefield, owner)
                batch_values.append([values] if isinstance(values, Tensor) else list(values))
                flags[position] = extension.loss_scaled[id(param)]
            accumulated = [
                [extension.accumulated(param, value) for value in values]
                for param, values in zip(params, batch_values)
            ]
            _add_batch(
                totals, aliases, batch_values, flags, scaled_weight, info.batch_size, accumulated
            )
            # freed now, before the next batch's allocations can split their memory
            del batch_values
            for param in touched:
                param.__dict__.pop(savefield, None)
    finally:
        for param, grad, value, results in saved:
            param.grad = grad
            put_stored(param, results)
            param.__dict__.pop(savefield, None)
            if value is not _MISSING:
                setattr(param, savefield, value)
    return totals, flags, scaled_total, samples_total, num_batches


def _add_batch(totals, aliases, batch_values, flags, scaled_weight, batch_size, accumulated=None):
    """Add one batch's stored tensors, weighted (see :func:`_local_sums`), to ``totals``.

    A tensor stored on two parameters (a weight's KFAC factor ``G`` is its
    bias's) gets one running sum, shared by both blocks: added once per
    batch, and, in :class:`~curvext.operators.KronOperator`, decomposed once.
    ``aliases`` maps ``(position, slot)`` of such a second occurrence to the
    first; a batch whose tensors are no longer shared there gets its own sum
    again (a copy of the shared sum so far). In place: no second copy of
    every factor per batch. ``accumulated[position][slot]``: the stored tensor
    is its own running sum already (see :meth:`ForData.accumulated`).
    """
    first = totals[0] is None
    if not first:
        for (position, slot), (source, source_slot) in list(aliases.items()):
            if batch_values[position][slot] is not batch_values[source][source_slot]:
                totals[position][slot] = totals[source][source_slot].clone()
                del aliases[position, slot]
    seen: Dict[int, Tuple[int, int]] = {}  # id of a stored tensor -> first (position, slot)
    for position, values in enumerate(batch_values):
        weights = [scaled_weight if scaled else batch_size for scaled in flags[position]]
        if first:
            totals[position] = [None] * len(values)
        for slot, (value, weight) in enumerate(zip(values, weights)):
            if first:
                source = seen.get(id(value))
                if source is not None and flags[source[0]][source[1]] == flags[position][slot]:
                    aliases[position, slot] = source
                    totals[position][slot] = totals[source[0]][source[1]]
                    continue
                seen[id(value)] = (position, slot)
                done = accumulated is not None and accumulated[position][slot]
                # the running sum itself (not a detached alias: later batches
                # recognise it by identity)
                totals[position][slot] = value if done else value.detach() * weight
            elif (position, slot) not in aliases and value is not totals[position][slot]:
                totals[position][slot].add_(value.detach(), alpha=weight)


def _layout(totals, flags) -> List[int]:
    """The shapes and flags of the sums, as ints: per parameter its number of
    tensors, then per tensor ``flag, ndim, *shape``."""
    layout: List[int] = []
    for block, block_flags in zip(totals, flags):
        layout.append(len(block))
        for total, scaled in zip(block, block_flags):
            layout += [int(scaled), total.ndim, *total.shape]
    return layout


def _zeros_of_layout(layout: List[int], params: Sequence[Tensor]):
    """Zero sums and their flags for a rank without batches, from another's :func:`_layout`."""
    totals, flags, position = [], [], 0
    for param in params:
        count, position = layout[position], position + 1
        block, block_flags = [], []
        for _ in range(count):
            scaled, ndim = layout[position], layout[position + 1]
            shape = layout[position + 2 : position + 2 + ndim]
            position += 2 + ndim
            block.append(torch.zeros(shape, dtype=param.dtype, device=param.device))
            block_flags.append(bool(scaled))
        totals.append(block)
        flags.append(tuple(block_flags))
    return totals, flags


def _sum_over_ranks(totals, flags, counts, failure, params, touched, ranks, owner):
    r"""Add the ranks' sums and counts (see :mod:`curvext.distributed`).

    Two collectives, three if some rank has no batch: an ``all_reduce`` of
    the per-rank header (failure flag, counts, the length of :func:`_layout`,
    a fingerprint of the parameters), a ``broadcast`` of the layout from the
    first rank with batches (only if some rank has none: it cannot know the
    shapes of the factors), and one ``all_reduce`` of all the sums in one
    flat buffer. Every rank takes the same decisions from the same header, so
    all make the same collectives (or all raise).
    """
    scaled_total, samples_total, num_batches = counts
    device = params[0].device
    layout = _layout(totals, flags) if num_batches else []
    header = torch.cat(
        [
            torch.tensor(
                [float(failure is not None), num_batches, samples_total, scaled_total, len(layout)],
                dtype=torch.float64,
                device=device,
            ),
            fingerprint(touched),
        ]
    )
    _, table = all_reduce_sum([], ranks, header, device)
    raise_on_failure(table[:, 0].tolist(), failure, owner)
    check_same_on_ranks(table[:, 5:7], "params", params[0].dtype, ranks, owner)
    batches_per_rank = [int(round(n)) for n in table[:, 1].tolist()]
    if sum(batches_per_rank) == 0:
        return totals, flags, 0.0, 0, 0
    with_data = [rank for rank, n in enumerate(batches_per_rank) if n > 0]
    lengths = {int(round(table[rank, 4].item())) for rank in with_data}
    if len(lengths) > 1:
        raise RuntimeError(
            f"{owner}: the ranks computed curvature blocks of different shapes "
            f"(layout lengths {sorted(lengths)}); every rank must run the same "
            f"model and arguments."
        )
    if len(with_data) < ranks.world_size:
        source = with_data[0]
        sent = (
            torch.tensor(layout, dtype=torch.int64, device=device)
            if layout
            else (torch.zeros(lengths.pop(), dtype=torch.int64, device=device))
        )
        (received,) = broadcast([sent], ranks, source)
        if not num_batches:
            totals, flags = _zeros_of_layout(received.tolist(), params)
    flat = [total for block in totals for total in block]
    sums, _ = all_reduce_sum(flat, ranks, torch.zeros(0, dtype=torch.float64), device)
    sums = iter(sums)
    reduced = [[next(sums) for _ in block] for block in totals]
    scaled_total, samples_total = table[:, 3].sum().item(), int(round(table[:, 2].sum().item()))
    return reduced, flags, scaled_total, samples_total, sum(batches_per_rank)


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
