r"""Diagonal curvature :math:`D = \mathrm{diag}(d)` from what the backward stored.

Products, powers and inverses are entrywise; :math:`\log\det D = \sum_i \log
d_i`.
"""

from __future__ import annotations

from typing import Iterable, Optional, Tuple

import torch
from torch import Tensor

from curvext.operators.base import (
    CurvatureOperator,
    check_damping,
    collect_params,
    powered,
    stored,
)


class DiagonalOperator(CurvatureOperator):
    r"""A diagonal matrix :math:`\mathrm{diag}(d)` over an ordered list of parameters.

    Args:
        params: The parameters (order = order of the rows).
        diagonal: The diagonal, flat ``[P]`` (each parameter's entries
            row-major, parameters in order).

    Example:
        >>> layer = torch.nn.Linear(2, 1)
        >>> D = DiagonalOperator(list(layer.parameters()), torch.tensor([1.0, 4, 9]))
        >>> (D @ torch.ones(3)).tolist(), D.det().item(), (D ** 0.5).diag().tolist()
        ([1.0, 4.0, 9.0], 36.0, [1.0, 2.0, 3.0])
    """

    def __init__(self, params, diagonal: Tensor):
        super().__init__(params, diagonal.dtype, diagonal.device)
        if diagonal.shape != (self.shape[0],):
            raise ValueError(
                f"DiagonalOperator: the diagonal must be flat [{self.shape[0]}] for "
                f"these parameters, got {list(diagonal.shape)}."
            )
        self._diagonal = diagonal

    @classmethod
    def from_params(
        cls, params: Iterable[Tensor], attribute: str = "ggn_diag"
    ) -> "DiagonalOperator":
        """The diagonal stored as ``p.<attribute>`` on each trainable parameter.

        Args:
            params: Parameters, e.g. ``model.parameters()``; those with
                ``requires_grad=False`` are skipped (the engine stores nothing
                on them).
            attribute: ``"ggn_diag"`` (default), ``"sum_grad_squared"``,
                ``"variance"``, any attribute shaped like ``p``, or one shaped
                ``[N, *p.shape]`` (``"batch_ggn_diag"``), which is summed over ``N``.

        Raises:
            AttributeError: If a parameter lacks the attribute (the message
                names the parameter and the extension that stores it).
            ValueError: If an attribute has neither shape.

        Example:
            >>> from curvext import backpack, extend
            >>> from curvext.extensions import GGNDiag, BatchGGNDiag
            >>> model = extend(torch.nn.Linear(3, 2))
            >>> loss_fn = extend(torch.nn.MSELoss())
            >>> loss = loss_fn(model(torch.randn(5, 3)), torch.randn(5, 2))
            >>> with backpack(GGNDiag(), BatchGGNDiag()):
            ...     loss.backward()
            >>> D = DiagonalOperator.from_params(model.parameters())
            >>> D_sum = DiagonalOperator.from_params(model.parameters(), "batch_ggn_diag")
            >>> D.shape, torch.allclose(D.diag(), D_sum.diag())
            ((8, 8), True)
        """
        params = collect_params(params, f"{cls.__name__}.from_params")
        entries = []
        for index, param in enumerate(params):
            value = stored(param, index, attribute, f"{cls.__name__}.from_params")
            if tuple(value.shape[1:]) == tuple(param.shape) and value.ndim == param.ndim + 1:
                value = value.sum(0)
            elif value.shape != param.shape:
                raise ValueError(
                    f"{cls.__name__}.from_params: p.{attribute} of parameter {index} "
                    f"has shape {tuple(value.shape)}; expected the parameter's shape "
                    f"{tuple(param.shape)} or [N, *{tuple(param.shape)}]."
                )
            entries.append(value.detach().reshape(-1))
        return cls(params, torch.cat(entries))

    @classmethod
    def from_data(
        cls,
        model: torch.nn.Module,
        loss_fn: torch.nn.Module,
        data: Iterable,
        mc_samples: int = 0,
        progressbar: bool = False,
        params: Optional[Iterable[Tensor]] = None,
        distributed=None,
    ) -> "DiagonalOperator":
        r"""The GGN diagonal of a whole data set, one backward pass per batch.

        Runs ``GGNDiag(mc_samples)`` on every batch and combines the batch
        diagonals :math:`D_b` (each :math:`c_b` times a sum over the batch) as
        one batch of the whole set would give them:
        :math:`D = \sum_b d_b D_b / \sum_b d_b` for ``reduction="mean"``
        (:math:`d_b = 1/c_b` the batch's loss denominator) and
        :math:`D = \sum_b D_b` for ``"sum"`` (derivation:
        :mod:`curvext.operators.data`). Exact for ``mc_samples=0``, in
        expectation otherwise.

        Args:
            model: The model, extended in place with :func:`curvext.extend`
                if it is not yet.
            loss_fn: ``MSELoss``, ``CrossEntropyLoss`` or ``BCEWithLogitsLoss``
                with ``reduction="mean"`` or ``"sum"`` (extended likewise).
            data: Any iterable of ``(X, y)`` batches (a ``DataLoader``), on the
                model's device and dtype.
            mc_samples: 0 (default) for the exact GGN, ``M > 0`` for ``M``
                Monte-Carlo samples per batch.
            progressbar: Show a ``tqdm`` progress bar over the batches.
            params: The parameters, in order (default: the model's trainable
                parameters).
            distributed: ``None`` (default): if a :mod:`torch.distributed`
                process group is initialised, every rank passes over its own
                shard of the data and the diagonals are summed over the ranks
                (every rank gets the diagonal of the whole data set);
                ``False``: this rank's data only; ``True``: require a group;
                or a ``ProcessGroup`` (see :mod:`curvext.distributed` and
                ``docs/distributed.md``).

        Each batch's graph is freed by its backward pass; the parameters'
        ``.grad`` and ``p.ggn_diag`` are left as they were before the call.

        Raises:
            ValueError: For an empty ``data``, a batch that is not ``(X, y)``,
                a loss reduction other than ``"mean"``/``"sum"``, or an invalid
                ``mc_samples``.
            ImportError: If ``progressbar=True`` and ``tqdm`` is missing.

        Example:
            >>> model = torch.nn.Linear(3, 2)
            >>> loss_fn = torch.nn.MSELoss(reduction="sum")
            >>> X, y = torch.randn(10, 3), torch.randn(10, 2)
            >>> D = DiagonalOperator.from_data(model, loss_fn, [(X[:3], y[:3]), (X[3:], y[3:])])
            >>> D_full = DiagonalOperator.from_data(model, loss_fn, [(X, y)])
            >>> D.shape, torch.allclose(D.diag(), D_full.diag())
            ((8, 8), True)
        """
        from curvext.extensions.data_pass import GGNDiagForData
        from curvext.operators.data import accumulate_over_data

        params, diagonals = accumulate_over_data(
            model,
            loss_fn,
            data,
            GGNDiagForData(mc_samples),
            params,
            progressbar,
            f"{cls.__name__}.from_data",
            distributed,
        )
        return cls(params, torch.cat([d.reshape(-1) for (d,) in diagonals]))

    def _matmat(self, matrix: Tensor) -> Tensor:
        return self._diagonal.unsqueeze(1) * matrix

    def to_dense(self) -> Tensor:
        return torch.diag(self._diagonal)

    def diag(self) -> Tensor:
        return self._diagonal.clone()

    def _slogdet(self) -> Tuple[Tensor, Tensor]:
        return self._diagonal.sign().prod(), self._diagonal.abs().log().sum()

    def frobenius_norm(self) -> Tensor:
        return self._diagonal.norm()

    def _add_scalar(self, value: float) -> "DiagonalOperator":
        return DiagonalOperator(self.params, self._diagonal + value)

    def _scale(self, value: float) -> "DiagonalOperator":
        return DiagonalOperator(self.params, self._diagonal * value)

    def _add_same(self, other: "DiagonalOperator") -> "DiagonalOperator":
        return DiagonalOperator(self.params, self._diagonal + other._diagonal)

    def pow(self, exponent: float) -> "DiagonalOperator":
        r""":math:`\mathrm{diag}(d^{\,\mathrm{exponent}})`; also ``D ** exponent``.

        Raises:
            ValueError: For a negative exponent with a zero entry, or a
                fractional exponent with a negative entry.

        Example:
            >>> p = torch.nn.Parameter(torch.zeros(2))
            >>> D = DiagonalOperator([p], torch.tensor([4.0, 16.0]))
            >>> D.pow(-0.5).diag().tolist()
            [0.5, 0.25]
        """
        return DiagonalOperator(
            self.params,
            powered(self._diagonal, exponent, "DiagonalOperator.pow", "the diagonal"),
        )

    __pow__ = pow

    def inverse(self, damping: float = 0.0) -> "DiagonalOperator":
        r""":math:`(D + \delta I)^{-1}`.

        Args:
            damping: :math:`\delta \ge 0` added to every entry before inverting.

        Raises:
            ValueError: If ``damping`` is negative or not finite, or an entry of
                :math:`D + \delta I` is zero.

        Example:
            >>> p = torch.nn.Parameter(torch.zeros(2))
            >>> D = DiagonalOperator([p], torch.tensor([1.0, 3.0]))
            >>> D.inverse(damping=1.0).diag().tolist()
            [0.5, 0.25]
        """
        damping = check_damping(damping)
        damped = self._diagonal + damping
        if (damped == 0).any():
            raise ValueError(
                f"DiagonalOperator.inverse(damping={damping}): the operator is "
                f"singular (a zero entry); pass damping > 0."
            )
        return DiagonalOperator(self.params, damped.reciprocal())


__all__ = ["DiagonalOperator"]
