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
from curvext.distributed import resolve_ranks
from curvext.extend import extend
from curvext.extensions.data_pass import ForData
from curvext.kronecker import SharedFactors
from curvext.operators.base import collect_params, stored
from curvext.operators.passes import DataPass, kept_state


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
            :mod:`curvext.distributed` and :class:`~curvext.operators.passes.DataPass`).
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
    # every parameter the backward can touch, not only those read
    touched = list({id(p): p for p in [*model.parameters(), *params]}.values())
    data_pass = DataPass(
        data,
        owner,
        progressbar=progressbar,
        ranks=resolve_ranks(distributed, owner),
        reduction=reduction,
        same_on_ranks={"params": touched},
    )

    def local(data_pass: DataPass):
        if check_data is not None:
            check_data()
        with kept_state(touched, extension.savefield):
            return _local_sums(model, loss_fn, data_pass, extension, params, touched, owner)

    sums = data_pass.run(local, device=params[0].device)
    combined: List[List[Tensor]] = [[] for _ in params]
    entries: List[Tensor] = []
    for tag, total in sums:
        if tag >= 0:
            position, scaled = divmod(tag, 2)
            # in place: the sums are this function's own tensors
            total.div_(data_pass.loss_denominator if scaled else data_pass.num_samples)
        else:  # a shared factor: the sum of an earlier entry (normalised there)
            position, source = divmod(-1 - tag, _ALIAS_BASE)
            total = entries[source]
        entries.append(total)
        combined[position].append(total)
    return params, combined


#: Alias markers of :func:`_local_sums`: ``-1 - (position · _ALIAS_BASE + source)``.
_ALIAS_BASE = 2**24


def _local_sums(model, loss_fn, data_pass, extension, params, touched, owner):
    """This process's weighted sums over ``data_pass``, tagged ``2 · position +
    loss_scaled`` (position: the parameter's index in ``params``), a shared
    sum's later places as alias markers (negative tags, see below)."""
    savefield = extension.savefield
    extension.begin_data_pass()
    totals: List[Optional[List[Tensor]]] = [None] * len(params)
    flags: List[Sequence[bool]] = [()] * len(params)
    aliases: Dict[Tuple[int, int], Tuple[int, int]] = {}
    for index, X, y in data_pass:
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
        scaled_weight = data_pass.add_batch(info.batch_size, info.normalization)
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
    if totals[0] is None:
        return []
    # a sum shared by two blocks (a weight's and its bias's G) is sent once; its
    # second place gets an empty marker naming the first, so that it is shared
    # again after a sum over ranks (which returns new tensors) and on ranks
    # without batches (the markers travel in the layout)
    entries, index_of = [], {}
    for position, (block, block_flags) in enumerate(zip(totals, flags)):
        for slot, (total, scaled) in enumerate(zip(block, block_flags)):
            source = aliases.get((position, slot))
            if source is None:
                index_of[position, slot] = len(entries)
                entries.append((2 * position + int(scaled), total))
            else:
                marker = -1 - (position * _ALIAS_BASE + index_of[source])
                entries.append((marker, total.new_zeros(0)))
    return entries


def _add_batch(totals, aliases, batch_values, flags, scaled_weight, batch_size, accumulated=None):
    """Add one batch's stored tensors, weighted (see :func:`_local_sums`), to ``totals``.

    A factor shared by two parameters (a weight's KFAC factor ``G`` is its
    bias's; :class:`~curvext.kronecker.SharedFactors`) gets one running sum,
    shared by both blocks: added once per batch, and, in
    :class:`~curvext.operators.KronOperator`, decomposed once. ``aliases``
    maps ``(position, slot)`` of such a later holder to the first; a batch in
    which they are no longer shared gives the later one its own sum again (a
    copy of the shared sum so far). In place: no second copy of every factor
    per batch. ``accumulated[position][slot]``: the stored tensor is its own
    running sum already (see :meth:`ForData.accumulated`).
    """
    shared = SharedFactors(batch_values)
    first = totals[0] is None
    for (position, slot), source in list(aliases.items()):
        if shared.key(position, slot) != source:
            totals[position][slot] = totals[source[0]][source[1]].clone()
            del aliases[position, slot]
    for position, values in enumerate(batch_values):
        weights = [scaled_weight if scaled else batch_size for scaled in flags[position]]
        if first:
            totals[position] = [None] * len(values)
        for slot, (value, weight) in enumerate(zip(values, weights)):
            if first:
                source = shared.key(position, slot)
                same_kind = flags[source[0]][source[1]] == flags[position][slot]
                if source != (position, slot) and same_kind:
                    aliases[position, slot] = source
                    totals[position][slot] = totals[source[0]][source[1]]
                    continue
                # the running sum itself (not a detached alias: later batches
                # recognise it by identity)
                done = accumulated is not None and accumulated[position][slot]
                totals[position][slot] = value if done else value.detach() * weight
            elif (position, slot) not in aliases and value is not totals[position][slot]:
                totals[position][slot].add_(value.detach(), alpha=weight)


__all__ = ["accumulate_over_data"]
