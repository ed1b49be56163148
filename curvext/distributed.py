r"""Data sets sharded over the ranks of a :mod:`torch.distributed` process group.

Every data-set computation of curvext (the products of
:class:`~curvext.operators.HessianOperator`,
:class:`~curvext.operators.GGNOperator` and
:class:`~curvext.operators.EFOperator`, hence every estimator and inverse
built on them, and ``from_data`` of the curvature operators) is a sum over
batches followed by a normalisation by sums of counts (module docstrings of
:mod:`curvext.operators.matrix_free` and :mod:`curvext.operators.data`).
With the data set split into shards, one per rank, each rank sums over its
own batches and one ``all_reduce`` adds the ranks' sums; counts and the
rank's consistency checks travel in the same flat buffer, so a product costs
exactly one collective, and every rank ends with the result one process
would get over the whole data set.

**Which group.** The argument ``distributed`` of those functions is

- ``None`` (default): reduce over the default process group if one is
  initialised (``torch.distributed.init_process_group``), else run locally;
- ``False``: never reduce; each rank computes over its own ``data`` only
  (independent per-rank computations inside an initialised group);
- ``True``: reduce over the default group; an error if none is initialised;
- a ``torch.distributed.ProcessGroup``: reduce over that group.

A group of one rank is the same as no group. Once reducing, *every* rank of
the group must make the same calls in the same order (an operator built or
multiplied on rank 0 only waits for the others forever; pass
``distributed=False`` there).

**Checks, in the same buffer.** Each rank writes into its own slot of the
buffer: whether its pass over its shard raised (then every rank raises
instead of waiting), its counts, and fingerprints
(:func:`fingerprint`) of the parameters and of the matrix multiplied, so
that ranks holding different parameters or multiplying different probe
vectors (ranks seeded differently) all raise instead of silently adding
unrelated products. The slots hold each number as two pieces of the buffer's
dtype, so counts are exact up to :math:`2^{48}` also in ``float32``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import reduce
from typing import Any, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

#: What the ``distributed`` argument accepts (see the module docstring).
DISTRIBUTED_CHOICES = (
    "None (reduce over the default process group if one is initialised), "
    "True (the default group, required), False (never reduce) or a "
    "torch.distributed.ProcessGroup"
)


def is_initialized() -> bool:
    """Whether a default :mod:`torch.distributed` process group is initialised.

    Example:
        >>> is_initialized()
        False
    """
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


@dataclass(frozen=True)
class Ranks:
    """The process group a computation reduces over, and this process's place in it."""

    group: Any
    rank: int
    world_size: int

    def global_rank(self, group_rank: int) -> int:
        """The default group's rank of the group's ``group_rank``."""
        import torch.distributed as dist

        return dist.get_global_rank(self.group, group_rank)


def resolve_ranks(distributed, owner: str) -> Optional[Ranks]:
    """The group to reduce over for ``distributed`` (module docstring), or ``None``.

    ``None`` means compute locally: ``distributed=False``, ``None`` without an
    initialised process group, or a group of one rank.

    Raises:
        ValueError: If ``distributed`` asks for a group but none is
            initialised, or this process is not a member of the group.
        TypeError: If ``distributed`` is none of the accepted values.

    Example:
        >>> resolve_ranks(None, "f") is None, resolve_ranks(False, "f") is None
        (True, True)
        >>> resolve_ranks(True, "f")  # doctest: +NORMALIZE_WHITESPACE
        Traceback (most recent call last):
        ...
        ValueError: f: distributed=True, but no torch.distributed process group is
        initialised; call torch.distributed.init_process_group(...) on every rank
        first (e.g. under torchrun), or pass distributed=None or False.
    """
    import torch.distributed as dist

    if distributed is False:
        return None
    # new_group returns NON_GROUP_MEMBER on the ranks it leaves out
    outside = dist.is_available() and distributed is dist.GroupMember.NON_GROUP_MEMBER
    is_group = outside or (dist.is_available() and isinstance(distributed, dist.ProcessGroup))
    if distributed is not None and distributed is not True and not is_group:
        raise TypeError(
            f"{owner}: distributed must be {DISTRIBUTED_CHOICES}, got {type(distributed).__name__}."
        )
    if not is_initialized():
        if distributed is None:
            return None
        what = "True" if distributed is True else "a ProcessGroup"
        raise ValueError(
            f"{owner}: distributed={what}, but no torch.distributed process group "
            f"is initialised; call torch.distributed.init_process_group(...) on "
            f"every rank first (e.g. under torchrun), or pass distributed=None or "
            f"False."
        )
    group = distributed if is_group else dist.group.WORLD
    rank = -1 if outside else dist.get_rank(group)
    if rank < 0:
        raise ValueError(
            f"{owner}: this process (global rank {dist.get_rank()}) is not a member "
            f"of the process group passed as distributed; pass a group it belongs "
            f"to, or distributed=False."
        )
    world_size = dist.get_world_size(group)
    return Ranks(group, rank, world_size) if world_size > 1 else None


def _weights(count: int, offset: int, dtype: torch.dtype, device, stream: int = 0) -> Tensor:
    """Fixed pseudo-random weights in ``[0.5, 1.5)``, ``[count]``, drawn on ``device``.

    Positive, so that a shift of many entries in one direction (a bias offset)
    adds up instead of cancelling; seeded by ``(stream, offset)`` only, so
    every rank draws the same ones.
    """
    generator = torch.Generator(device=device).manual_seed(1_000_003 * stream + offset + 1)
    return torch.rand(count, generator=generator, dtype=dtype, device=device) + 0.5


def fingerprint(tensors: Sequence[Tensor]) -> Tensor:
    r"""``[2]`` float64: a weighted sum of all entries and a bound on its size.

    For a matrix :math:`X` (``[R, C]``; other tensors are flattened into one
    column, one after the other) the first entry is :math:`w^\top X u` with
    fixed positive pseudo-random weights :math:`w, u`; two ranks whose tensors differ give
    different values unless by a coincidence of measure zero. The second is
    :math:`\|w\|\,\|X\|_F\,\|u\|`, which bounds the first, for a tolerance.
    Costs one product with ``X``, no copy of it.

    Example:
        >>> X = torch.randn(4, 3)
        >>> bool(fingerprint([X])[0] == fingerprint([X.clone()])[0])
        True
        >>> Y = X.clone(); Y[2, 1] += 1
        >>> bool(fingerprint([X])[0] == fingerprint([Y])[0])
        False
    """
    value, squared_norm, offset = 0.0, 0.0, 0
    for tensor in tensors:
        tensor = tensor.detach()
        matrix = tensor if tensor.ndim == 2 else tensor.reshape(-1, 1)
        # half precision: weights of large indices would be too coarse
        matrix = matrix.to(torch.promote_types(matrix.dtype, torch.float32))
        rows, columns = matrix.shape
        row_weights = _weights(rows, offset, matrix.dtype, matrix.device)
        column_weights = _weights(columns, 0, matrix.dtype, matrix.device, stream=1)
        value = value + (row_weights @ matrix @ column_weights).double()
        squared_norm = squared_norm + (
            row_weights.square().sum().double()
            * matrix.square().sum().double()
            * column_weights.square().sum().double()
        )
        offset += rows
    device = tensors[0].device if tensors else "cpu"
    return torch.stack(
        [
            torch.as_tensor(value, dtype=torch.float64, device=device),
            torch.as_tensor(squared_norm, dtype=torch.float64, device=device).sqrt(),
        ]
    )


def _buffer_dtype(tensors: Sequence[Tensor]) -> torch.dtype:
    """The dtype of the flat buffer: the tensors' common one, at least float32."""
    return reduce(torch.promote_types, [t.dtype for t in tensors], torch.float32)


def all_reduce_sum(
    tensors: Sequence[Tensor],
    ranks: Ranks,
    rank_values: Tensor,
    device=None,
) -> Tuple[List[Tensor], Tensor]:
    """Sum ``tensors`` over the ranks and gather each rank's ``rank_values``: one ``all_reduce``.

    The tensors are packed into one flat buffer (dtype: theirs, at least
    ``float32``) behind a table with one row per rank, in which only this
    rank's row is non-zero, so that after the sum every rank reads every
    rank's values. The table also carries each rank's buffer length, so that
    ranks passing different shapes raise instead of adding misaligned entries.

    Args:
        tensors: The tensors to sum (any shapes; the same on every rank).
        ranks: The group, from :func:`resolve_ranks`.
        rank_values: ``[K]``: this rank's values (counts, flags,
            :func:`fingerprint`), ``K`` the same on every rank; exact to
            about 48 bits.
        device: Where the buffer lives if ``tensors`` is empty (default: that
            of ``rank_values``).

    Returns:
        The sums (shapes and dtypes of ``tensors``), and ``[world_size, K]``
        float64 on the CPU: every rank's ``rank_values``.

    Raises:
        RuntimeError: If the ranks passed tensors of different total size.
    """
    import torch.distributed as dist

    device = tensors[0].device if tensors else (device or rank_values.device)
    dtype = _buffer_dtype(tensors)
    length = sum(t.numel() for t in tensors)
    row = torch.cat(
        [
            torch.tensor([float(length)], dtype=torch.float64, device=device),
            rank_values.detach().to(device, torch.float64).reshape(-1),
        ]
    )
    # two pieces per value: exact for float32 buffers up to ~2^48
    high = row.to(dtype)
    low = (row - high.double()).to(dtype)
    table = torch.zeros(ranks.world_size, row.numel(), 2, dtype=dtype, device=device)
    table[ranks.rank] = torch.stack([high, low], -1)
    buffer = torch.cat([table.reshape(-1), *[t.reshape(-1).to(dtype) for t in tensors]])
    dist.all_reduce(buffer, group=ranks.group)
    table_size = table.numel()
    values = buffer[:table_size].reshape(table.shape).double().sum(-1).cpu()
    lengths = values[:, 0].tolist()
    if len(set(lengths)) > 1:
        raise RuntimeError(
            f"all_reduce_sum: the ranks passed tensors of different sizes "
            f"({[int(n) for n in lengths]} entries per rank); every rank must "
            f"reduce the same shapes (the same parameters, the same number of "
            f"columns)."
        )
    sums, start = [], table_size
    for tensor in tensors:
        sums.append(buffer[start : start + tensor.numel()].reshape(tensor.shape).to(tensor.dtype))
        start += tensor.numel()
    return sums, values[:, 1:]


def broadcast(tensors: Sequence[Tensor], ranks: Ranks, source: int = 0) -> List[Tensor]:
    """Rank ``source``'s ``tensors`` on every rank: one ``broadcast`` of one flat buffer.

    Every rank passes tensors of the same shapes (its own values are
    replaced). ``source`` is the rank in ``ranks.group``.
    """
    import torch.distributed as dist

    dtype = reduce(torch.promote_types, [t.dtype for t in tensors])
    buffer = torch.cat([t.reshape(-1).to(dtype) for t in tensors])
    dist.broadcast(buffer, src=ranks.global_rank(source), group=ranks.group)
    results, start = [], 0
    for tensor in tensors:
        results.append(
            buffer[start : start + tensor.numel()].reshape(tensor.shape).to(tensor.dtype)
        )
        start += tensor.numel()
    return results


def raise_on_failure(failed: Sequence[float], failure: Optional[BaseException], owner: str) -> None:
    """Re-raise this rank's ``failure``, or raise because another rank failed.

    ``failed`` holds one flag per rank (read from :func:`all_reduce_sum`'s
    table); a rank whose pass over its shard raised still joins the
    collective, with its flag set, so that no rank waits for it forever.
    """
    if failure is not None:
        raise failure
    failed_ranks = [rank for rank, flag in enumerate(failed) if flag]
    if failed_ranks:
        raise RuntimeError(
            f"{owner}: rank(s) {failed_ranks} raised an error during their pass "
            f"over their shard of `data` (see their output); every rank stops "
            f"here instead of waiting for them."
        )


def check_same_on_ranks(
    fingerprints: Tensor, what: str, dtype: torch.dtype, ranks: Ranks, owner: str
) -> None:
    """Raise (on every rank alike) if some rank's ``what`` differs from rank 0's.

    Args:
        fingerprints: ``[world_size, 2]``: every rank's :func:`fingerprint`
            (from :func:`all_reduce_sum`'s table).
        what: ``"params"`` or ``"matrix"`` (the matrix multiplied), for the
            message and its advice.
        dtype: The dtype the fingerprints were computed in (for the tolerance).

    Raises:
        ValueError: If they differ.
    """
    values, bounds = fingerprints.T.tolist()
    different = disagreeing_ranks(values, bounds, dtype)
    if not different:
        return
    if what == "matrix":
        raise ValueError(
            f"{owner}: the matrix multiplied on rank(s) {different} differs from "
            f"rank 0's; with `data` sharded over {ranks.world_size} ranks every "
            f"rank must multiply the same matrix. Random probes (estimators, "
            f"Lanczos) must be drawn alike: seed every rank the same "
            f"(torch.manual_seed(seed) on each, or the same generator=), or pass "
            f"distributed=False for independent per-rank computations."
        )
    raise ValueError(
        f"{owner}: the parameters on rank(s) {different} differ from rank 0's; "
        f"with `data` sharded over {ranks.world_size} ranks every rank must hold "
        f"the same model. Broadcast it from rank 0 (DistributedDataParallel does; "
        f"or torch.distributed.broadcast each parameter), seed the initialisation "
        f"alike, or pass distributed=False for independent per-rank computations."
    )


def disagreeing_ranks(values: Sequence[float], bounds: Sequence[float], dtype) -> List[int]:
    """The ranks whose :func:`fingerprint` differs from rank 0's, beyond rounding.

    The tolerance, ``64 eps`` of the largest bound, covers ranks on different
    hardware summing in a different order; different random probes differ
    by far more.
    """
    tolerance = 64 * torch.finfo(dtype).eps * max(bounds)
    reference = values[0]
    return [
        rank
        for rank, value in enumerate(values)
        if not (
            value == reference  # also for identical infinities
            or abs(value - reference) <= tolerance
            or (math.isnan(value) and math.isnan(reference))
        )
    ]


__all__ = [
    "DISTRIBUTED_CHOICES",
    "Ranks",
    "all_reduce_sum",
    "broadcast",
    "check_same_on_ranks",
    "disagreeing_ranks",
    "fingerprint",
    "is_initialized",
    "raise_on_failure",
    "resolve_ranks",
]
