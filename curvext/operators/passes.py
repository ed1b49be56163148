r"""One pass over a data set, batch by batch: the frame every data-set computation shares.

Every computation of curvext over a data set — the ``from_data`` constructors
of the Kronecker and diagonal operators (:mod:`curvext.operators.data`), the
matrix-free products (:mod:`curvext.operators.matrix_free`) and the Jacobian
operators (:mod:`curvext.operators.jacobian`) — loops over ``(X, y)`` batches
and adds each batch's tensors into running sums. A subclass-free frame holds
what they share, written once:

- **batching**: iterating a :class:`DataPass` yields ``(index, X, y)``,
  naming a batch that is not an ``(X, y)`` pair, behind an optional ``tqdm``
  bar labelled with the pass (``"GGNOperator: A @ V, V [P, M]"``), shown on
  rank 0 only;
- **normalisation**: :meth:`DataPass.add_batch` counts the batch's samples
  :math:`N_b` and returns the weight of its loss-scaled tensors, the
  denominator :math:`d_b = 1/c_b` of a ``reduction="mean"`` loss (``0`` for a
  batch whose targets are all ignored) or ``1`` for ``"sum"``; after the pass
  :attr:`DataPass.loss_denominator` is :math:`\sum_b d_b` (``"mean"``; ``1``
  for ``"sum"``), what the weighted sum is divided by so that the result is
  that of one batch holding the whole data set;
- **torch.distributed**: :meth:`DataPass.run` runs this rank's pass and adds
  the sums and counts of every rank (:mod:`curvext.distributed`), checking
  that the ranks hold the same parameters (and multiply the same matrix); a
  rank whose pass raised still joins the collectives, so that every rank
  raises instead of waiting;
- **the checks after a pass**: no batch at all (or none on a second pass: a
  one-shot generator), and ``num_data`` against the samples counted;
- **determinism**: :func:`check_deterministic` multiplies one random matrix
  in two passes and raises if they differ;
- **state hygiene**: :func:`kept_state` restores the parameters' ``.grad``,
  an extension's attribute and curvext's stored results after a pass.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from curvext.distributed import (
    Ranks,
    all_reduce_sum,
    broadcast,
    check_same_on_ranks,
    fingerprint,
    raise_on_failure,
)
from curvext.engine import put_stored, take_stored

#: The running sums of a pass: tensors, each with an int tag that a rank
#: without batches receives with the shapes (e.g. which parameter it belongs to).
Sums = List[Tuple[int, Tensor]]


def tqdm_bar():
    """``tqdm.tqdm``, or an error saying how to install it or turn the bar off."""
    try:
        from tqdm import tqdm
    except ImportError as error:
        raise ImportError(
            "progressbar=True needs tqdm, which is not installed: pip install tqdm "
            "(or curvext's 'progress' extra), or pass progressbar=False."
        ) from error
    return tqdm


def unpack(batch, index: int, owner: str):
    """``(X, y)`` of one batch, or an error naming the batch."""
    try:
        X, y = batch
    except (TypeError, ValueError):
        raise ValueError(
            f"{owner}: batch {index} of `data` is a {type(batch).__name__}, not an "
            f"(X, y) pair; `data` must yield (inputs, targets) pairs."
        ) from None
    return X, y


class DataPass:
    """One pass over ``data`` (see the module docstring).

    Args:
        data: An iterable of ``(X, y)`` batches.
        owner: The caller, for messages and the progress bar (``"GGNOperator"``).
        label: What the pass computes, for the progress bar (``"A @ V, V [10, 2]"``).
        progressbar: Show a ``tqdm`` bar over the batches.
        ranks: The process group (:func:`curvext.distributed.resolve_ranks`),
            or ``None``: this process alone.
        reduction: The loss's ``"mean"`` or ``"sum"`` (normalisation), or
            ``None`` for a pass without a loss.
        num_data: The number of samples the pass must count (``None``: any).
        pass_index: ``0`` for the first pass over ``data``, more for later ones
            (an empty later pass is a one-shot generator).
        same_on_ranks: Tensors that must be the same on every rank, by name
            (``{"params": params, "matrix": [V]}``), checked in the pass's
            first collective.

    Attributes:
        num_batches, num_samples: Counted by :meth:`add_batch` (over all
            ranks after :meth:`run`).
    """

    def __init__(
        self,
        data: Iterable,
        owner: str,
        *,
        label: str = "",
        progressbar: bool = False,
        ranks: Optional[Ranks] = None,
        reduction: Optional[str] = None,
        num_data: Optional[int] = None,
        pass_index: int = 0,
        same_on_ranks: Optional[Dict[str, Sequence[Tensor]]] = None,
    ):
        self.data, self.owner, self.label = data, owner, label
        self.progressbar, self.ranks = progressbar, ranks
        self.reduction, self.num_data, self.pass_index = reduction, num_data, pass_index
        self.same_on_ranks = same_on_ranks or {}
        self.num_batches, self.num_samples = 0, 0
        self._denominator = 0.0  # Σ_b d_b ("mean") or the number of batches

    def __iter__(self) -> Iterator[Tuple[int, object, object]]:
        """``(index, X, y)`` per batch."""
        batches = self.data
        if self.progressbar and (self.ranks is None or self.ranks.rank == 0):
            description = f"{self.owner}: {self.label}" if self.label else self.owner
            batches = tqdm_bar()(batches, desc=description)
        for index, batch in enumerate(batches):
            X, y = unpack(batch, index, self.owner)
            yield index, X, y

    def add_batch(self, batch_size: int, normalization: float = 1.0) -> float:
        """Count one batch of ``batch_size`` samples whose loss carries
        ``normalization`` :math:`c_b`; return the weight :math:`d_b = 1/c_b`
        (``"mean"``; ``0`` if :math:`c_b = 0`) or ``1`` (``"sum"``, no loss) of
        its loss-scaled tensors."""
        weight = 1.0
        if self.reduction == "mean":
            weight = 1.0 / normalization if normalization > 0 else 0.0
        self._denominator += weight
        self.num_batches += 1
        self.num_samples += batch_size
        return weight

    @property
    def loss_denominator(self) -> float:
        """What the weighted sum of loss-scaled tensors is divided by:
        :math:`\\sum_b d_b` for ``"mean"`` (``1`` if that is ``0``), else ``1``."""
        if self.reduction == "mean" and self._denominator > 0:
            return self._denominator
        return 1.0

    def run(
        self,
        local: Callable[["DataPass"], Sums],
        zeros: Optional[Callable[[], Sums]] = None,
        device=None,
    ) -> Sums:
        """This rank's pass ``local(self)``, summed over the ranks, and the checks.

        ``local`` iterates ``self``, calls :meth:`add_batch` per batch and
        returns its running sums (empty if it saw no batch). Over a process
        group, a rank without batches contributes zeros: ``zeros()`` if the
        shapes are known without data (the sums then ride in the pass's one
        collective), else zeros of the shapes, dtypes and tags of the first
        rank with batches, on ``device``, after a second collective (and a
        third, the shapes, only if some rank has no batch). ``device``: where
        the collectives' buffers live (default: the sums' device, else the CPU).

        Raises:
            ValueError: If no rank saw a batch, or ``num_data`` disagrees with
                the samples counted; or what ``local`` raised (over a process
                group: on this rank; the others raise a RuntimeError naming it).
        """
        failure = None
        try:
            sums = local(self)
        except Exception as error:
            if self.ranks is None:
                raise
            # join the collectives anyway, so that the other ranks raise too
            failure, sums = error, []
            self.num_batches, self.num_samples, self._denominator = 0, 0, 0.0
        if self.ranks is not None:
            if not sums and zeros is not None:
                sums = zeros()
            sums = self._sum_over_ranks(sums, failure, zeros is not None, device)
        self._check_counts()
        return sums

    def _check_counts(self) -> None:
        ranks = self.ranks
        if self.num_batches == 0:
            anywhere = "" if ranks is None else f" on any of the {ranks.world_size} ranks"
            again = (
                " on its second pass: pass a re-iterable (a list or a DataLoader), "
                "not a one-shot generator"
                if self.pass_index > 0
                else "; pass a non-empty iterable of (X, y) batches, e.g. a DataLoader "
                "over a non-empty data set"
            )
            raise ValueError(f"{self.owner}: `data` yielded no batch{anywhere}{again}.")
        if self.num_data is not None and self.num_samples != self.num_data:
            where, whole = "", ""
            if ranks is not None:
                where = f", summed over the {ranks.world_size} ranks"
                whole = " (num_data is the size of the whole data set, all shards together)"
            raise ValueError(
                f"{self.owner}: num_data={self.num_data}, but a pass over `data` gave "
                f"{self.num_samples} samples{where}; pass the data set's size{whole} (or "
                f"leave it None)."
            )

    def _sum_over_ranks(self, sums: Sums, failure, shapes_known: bool, device) -> Sums:
        """Add the ranks' sums and counts: the header (failure flag, counts,
        the sums' layout length, the fingerprints of :attr:`same_on_ranks`)
        in one ``all_reduce``, with the sums themselves if ``shapes_known``;
        else, if some rank has no batch, a ``broadcast`` of the layout from
        the first rank with batches, then an ``all_reduce`` of the sums.
        Every rank takes the same decisions from the same header, so all
        make the same collectives (or all raise)."""
        ranks, owner = self.ranks, self.owner
        tensors = [tensor for _, tensor in sums]
        if device is None:
            device = tensors[0].device if tensors else torch.device("cpu")
        layout = [] if shapes_known or not self.num_batches else _layout(sums)
        counts = [float(failure is not None), self.num_batches, self.num_samples]
        header = torch.cat(
            [
                torch.tensor(
                    [*counts, self._denominator, len(layout)], dtype=torch.float64, device=device
                ),
                *[fingerprint(list(checked)) for checked in self.same_on_ranks.values()],
            ]
        )
        reduced, table = all_reduce_sum(tensors if shapes_known else [], ranks, header, device)
        raise_on_failure(table[:, 0].tolist(), failure, owner)
        for position, (name, checked) in enumerate(self.same_on_ranks.items()):
            columns = table[:, 5 + 2 * position : 7 + 2 * position]
            check_same_on_ranks(columns, name, checked[0].dtype, ranks, owner)
        batches_per_rank = [int(round(n)) for n in table[:, 1].tolist()]
        self.num_batches = sum(batches_per_rank)
        self.num_samples = int(round(table[:, 2].sum().item()))
        self._denominator = table[:, 3].sum().item()
        if shapes_known:
            return [(tag, total) for (tag, _), total in zip(sums, reduced)]
        if self.num_batches == 0:
            return []
        with_data = [rank for rank, n in enumerate(batches_per_rank) if n > 0]
        lengths = {int(round(table[rank, 4].item())) for rank in with_data}
        if len(lengths) > 1:
            raise RuntimeError(
                f"{owner}: the ranks computed sums of different shapes (layout lengths "
                f"{sorted(lengths)}); every rank must run the same model and arguments."
            )
        if len(with_data) < ranks.world_size:
            sent = torch.tensor(layout or [0] * lengths.pop(), dtype=torch.int64, device=device)
            (received,) = broadcast([sent], ranks, with_data[0])
            if not layout:
                sums = _zeros_of_layout(received.tolist(), device)
        reduced, _ = all_reduce_sum([tensor for _, tensor in sums], ranks, header[:0], device)
        return [(tag, total) for (tag, _), total in zip(sums, reduced)]


#: The dtypes a sum may have, by their index in a :func:`_layout`.
_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _layout(sums: Sums) -> List[int]:
    """The tags, dtypes and shapes of ``sums`` as ints: per tensor
    ``tag, dtype index, ndim, *shape``."""
    layout: List[int] = []
    for tag, tensor in sums:
        layout += [tag, _DTYPES.index(tensor.dtype), tensor.ndim, *tensor.shape]
    return layout


def _zeros_of_layout(layout: List[int], device) -> Sums:
    """Zero sums with another rank's :func:`_layout`."""
    sums, position = [], 0
    while position < len(layout):
        tag, dtype, ndim = layout[position : position + 3]
        shape = layout[position + 3 : position + 3 + ndim]
        position += 3 + ndim
        sums.append((tag, torch.zeros(shape, dtype=_DTYPES[dtype], device=device)))
    return sums


def assert_passes_agree(first: Tensor, second: Tensor, owner: str) -> None:
    """Raise unless two passes over ``data`` gave the same product (up to rounding).

    Raises:
        ValueError: Naming the likely causes (randomness in the model,
            BatchNorm in train mode, ``data`` changing between passes).
    """
    tolerance = math.sqrt(torch.finfo(first.dtype).eps)
    difference = (first - second).abs().max().item()
    scale = max(first.abs().max().item(), second.abs().max().item())
    if not difference <= tolerance * scale + tolerance * 1e-3:
        raise ValueError(
            f"{owner}: two passes over `data` gave different products (max "
            f"difference {difference:.3g}, largest entry {scale:.3g}), so the "
            f"operator is not one matrix. Likely causes: dropout or other "
            f"randomness in model (call model.eval()), BatchNorm in train mode, "
            f"or `data` yielding different batches each pass (random "
            f"augmentation, a sampler without a fixed order and drop_last). "
            f"Fix the cause, or pass check_deterministic=False."
        )


def check_deterministic(
    product: Callable[[Tensor, int, str], Tensor],
    size: int,
    dtype: torch.dtype,
    device,
    owner: str,
) -> None:
    """Multiply one random ``[size, 2]`` matrix (seeded, the same on every
    rank) in two passes, ``product(matrix, pass_index, label)``, and raise
    (:func:`assert_passes_agree`) if they differ. The second pass also
    catches a one-shot generator."""
    generator = torch.Generator().manual_seed(0)
    matrix = torch.randn(size, 2, generator=generator, dtype=torch.float64).to(device, dtype)
    first = product(matrix, 0, "determinism check, pass 1 of 2")
    second = product(matrix, 1, "determinism check, pass 2 of 2")
    assert_passes_agree(first, second, owner)


_MISSING = object()


@contextmanager
def kept_state(params: Iterable[Tensor], savefield: Optional[str] = None):
    """Run a pass with the parameters' ``.grad`` set to ``None``, and restore
    on exit (also when the pass raises) their ``.grad``, their attribute
    ``savefield`` (the extension's result, e.g. ``p.kfac``) and the results
    curvext's latest backward stored on them, so that a pass inside curvext
    leaves the user's state as it was."""
    params = list(params)
    saved = [
        (
            p,
            p.grad,
            _MISSING if savefield is None else p.__dict__.get(savefield, _MISSING),
            take_stored(p) if savefield is not None else None,
        )
        for p in params
    ]
    for p in params:
        p.grad = None
    try:
        yield
    finally:
        for p, grad, value, results in saved:
            p.grad = grad
            if savefield is None:
                continue
            put_stored(p, results)
            p.__dict__.pop(savefield, None)
            if value is not _MISSING:
                setattr(p, savefield, value)


__all__ = [
    "DataPass",
    "assert_passes_agree",
    "check_deterministic",
    "kept_state",
    "tqdm_bar",
    "unpack",
]
