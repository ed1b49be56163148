"""What every extension declares: columns it needs, how it reduces them.

An extension never special-cases a module type. For every trainable
parameter in the graph it asks the parameter's module rule for one reduction
of the per-sample vectors of its column set (:meth:`Extension.reduce`),
combines the results of column chunks (summed, or concatenated for
``combine = Combine.CAT``), and turns them into the attribute stored on the
parameter (:meth:`Extension.finalize`). An extension whose result couples
parameters combines the finalised values of all parameters in
:meth:`Extension.finalize_all`.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any, List, Optional, Tuple

from torch import Tensor

from curvext.rules.families import Grads, PerSampleRule


class Combine(enum.Enum):
    """How an extension's partial results of column chunks combine."""

    SUM = "sum"  # added up (diagonals, factors, Gram blocks' sums)
    CAT = "cat"  # concatenated along the column axis (square roots, Gram factors)


@dataclass(frozen=True)
class ColumnSet:
    """Which loss-input columns an extension reduces.

    Attributes:
        kind: ``"exact"`` (the exact square root of the loss Hessian, ``K`` =
            the loss rule's ``num_exact_columns``), ``"mc"`` (``samples``
            Monte-Carlo columns), ``"grad"`` (the loss gradient, one column) or
            ``"residual"`` (the second-order terms of the graph's curved
            operations, pushed from each operation's input, not from the loss:
            no loss-input columns; see :mod:`curvext.rules.curvature`) or
            ``"average"`` (no columns: batch-averaged matrices, KFRA).
        samples: ``M`` for ``"mc"``; 0 otherwise.
    """

    kind: str
    samples: int = 0

    def size(self, loss) -> int:
        """Number of columns ``K`` of this set for the loss rule ``loss``."""
        if self.kind == "exact":
            return loss.num_exact_columns
        if self.kind in ("residual", "average"):
            return 0
        return self.samples if self.kind == "mc" else 1


#: The exact square root of the loss Hessian.
EXACT = ColumnSet("exact")
#: The gradient of the loss w.r.t. its input (first-order extensions).
GRADIENT = ColumnSet("grad")
#: The Hessian's second-order terms of curved operations (``tanh``, ...):
#: reduced twice per chunk, the engine subtracting the negative part.
RESIDUAL = ColumnSet("residual")
#: No columns: the batch-averaged curvature at each module output
#: (:mod:`curvext.recursion`, KFRA), read with :meth:`Extension.reduce_averaged`.
AVERAGED = ColumnSet("average")


def monte_carlo(samples: int) -> ColumnSet:
    """``samples`` Monte-Carlo columns (sampled labels of the predictive distribution)."""
    return ColumnSet("mc", samples)


@dataclass
class RunInfo:
    """Facts about the backward pass that finalisation may need.

    Attributes:
        batch_size: ``N``, the size of axis 0 of the loss input.
        normalization: ``c``, what the loss multiplies its sum over samples by.
        loss: The loss rule of the pass (:class:`curvext.losses.LossRule`:
            the loss input, its probabilities, exact and MC columns), during
            :meth:`Extension.finalize` and :meth:`Extension.finalize_all`
            only: the engine drops it afterwards, so that an extension keeping
            the ``RunInfo`` keeps no loss input alive.
    """

    batch_size: int
    normalization: float
    loss: Any = None


def check_mc_samples(owner: str, mc_samples: Any, minimum: int = 0) -> int:
    """Validate an ``mc_samples`` argument (an int ``>= minimum``)."""
    if isinstance(mc_samples, bool) or not isinstance(mc_samples, int) or mc_samples < minimum:
        meaning = "0 for exact, or " if minimum == 0 else ""
        raise ValueError(
            f"{owner}(mc_samples={mc_samples!r}) is invalid: use {meaning}a "
            f"positive number of Monte-Carlo samples."
        )
    return mc_samples


def ggn_columns(mc_samples: int) -> ColumnSet:
    """Column set of the exact GGN (0) or of its MC estimate (``M > 0``)."""
    return EXACT if mc_samples == 0 else monte_carlo(mc_samples)


class Extension:
    """Base class of all extensions.

    Attributes:
        savefield: Name of the attribute set on each parameter.
        combine: How partial results of column chunks combine:
            :attr:`Combine.SUM` or :attr:`Combine.CAT` (along the column axis).
    """

    savefield: str = ""
    combine: Combine = Combine.SUM
    #: Whether error messages may tell users to run this extension (the
    #: passes over a data set inside the operators are not for users).
    user_facing: bool = True
    #: Most columns the engine may backpropagate at once for this extension
    #: (``None``: the engine's byte budget decides); the data-set passes of
    #: KFAC/EKFAC set one column.
    columns_per_backward: Optional[int] = None
    #: Whether the extension is also computed on a backward pass that reaches
    #: no extended loss (first-order statistics of the gradient that arrives
    #: at the modules' outputs, as BackPACK's); the others need a loss.
    any_backward: bool = False
    #: What a first-order (``any_backward``) extension does where BatchNorm
    #: normalises with batch statistics (train mode), which couples the
    #: samples: ``"refuse"`` (curvext's) or ``"warn"`` (BackPACK's: compute
    #: from the gradient arriving at each module output, whose rows sum to the
    #: gradient but are not per-sample gradients, and warn).
    batch_statistics: str = "refuse"

    def column_set(self) -> Optional[ColumnSet]:
        """The columns this extension reduces, or ``None`` if it needs none."""
        raise NotImplementedError

    def column_sets(self) -> Tuple[ColumnSet, ...]:
        """Every column set this extension reduces (default: :meth:`column_set`).

        :meth:`reduce` is called with the columns of each set in turn, the
        partial results of each set are combined separately, and an extension
        with several sets receives in :meth:`finalize` a tuple of partials,
        one per set in this order (``None`` for a set without result).
        """
        key = self.column_set()
        return () if key is None else (key,)

    def reduce(self, rule: PerSampleRule, name: str, grads: Grads) -> Any:
        """Partial result for one chunk of columns (of one column set).

        ``rule`` answers the family of :mod:`curvext.rules.families` that the
        extension reads (every rule answers :class:`PerSampleRule`).
        """
        raise NotImplementedError

    def reduce_residual(
        self, rule: PerSampleRule, name: str, positive: Grads, negative: Grads
    ) -> Any:
        """Partial result for one chunk of :data:`RESIDUAL` columns.

        The Hessian's second-order terms are signed: ``positive`` holds the
        columns' gradients where the term is positive, ``negative`` where it
        is negative (each entry is in one of them). The default subtracts the
        two reductions (diagonals).
        """
        return self.reduce(rule, name, positive) - self.reduce(rule, name, negative)

    def reduce_curvature(self, rule: PerSampleRule, name: str, curvature: Tensor) -> Any:
        """Partial result of the :data:`RESIDUAL` term of an elementwise op
        applied directly to the output of ``rule``'s only call, from its
        diagonal curvature ``[N, *output]`` (no columns); ``None`` (the
        default) makes the engine push the columns instead."""
        return None

    #: The curvature the averaged recursion backpropagates for this
    #: extension's :data:`AVERAGED` set: ``"ggn"``, ``"hessian"``,
    #: ``"pch-abs"`` or ``"pch-clip"`` (see :class:`~curvext.extensions.KFRA`).
    averaged_curvature: str = "ggn"

    def reduce_averaged(self, rule: PerSampleRule, name: str, matrices: dict) -> Any:
        """Partial result of :data:`AVERAGED` from the batch-averaged curvature
        ``[D, D]`` at the output of each call of the graph (``id(call)`` →
        matrix, see :mod:`curvext.recursion`)."""
        raise NotImplementedError

    def finalize(self, rule: PerSampleRule, name: str, partial: Any, info: RunInfo) -> Any:
        """The value stored as ``p.<savefield>``."""
        return partial

    def finalize_all(self, results: List[Tuple[Tensor, Any]], info: RunInfo) -> None:
        """Store the finalised values; called once per backward pass.

        The engine calls it after :meth:`finalize` has run for every
        parameter, with ``(parameter, finalised value)`` in the engine's
        order. The default stores each value as ``p.<savefield>``. Extensions
        whose result couples parameters (eigenpairs of a GGN block spanning
        several parameters, say) override it: their :meth:`finalize` returns
        an intermediate per parameter, and this method combines them and sets
        the attributes.
        """
        for param, value in results:
            setattr(param, self.savefield, value)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({args})"


def sum_partials(first, second):
    """Add two partial results (tensors or tuples of tensors)."""
    if isinstance(first, tuple):
        return tuple(a + b for a, b in zip(first, second))
    return first + second


__all__ = [
    "Extension",
    "RunInfo",
    "ColumnSet",
    "Combine",
    "EXACT",
    "GRADIENT",
    "RESIDUAL",
    "AVERAGED",
    "monte_carlo",
]
