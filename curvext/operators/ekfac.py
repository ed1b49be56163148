r"""Eigenvalue-corrected KFAC (EKFAC; George et al., 2018).

KFAC approximates the GGN block of a weight by :math:`G \otimes A`, whose
eigenbasis is :math:`Q = Q_G \otimes Q_A` (eigenvectors of the factors) and
whose eigenvalues are the products :math:`\lambda_G \lambda_A`. EKFAC keeps
the basis and re-fits the eigenvalues to the per-sample vectors
:math:`v_{nk}` (the columns of the chosen Fisher type, as matrices
:math:`V_{nk}` shaped like the factors):

.. math:: s = \sum_{n,k} \left(Q_G^\top V_{nk} Q_A\right)^{\odot 2}
    = \mathrm{diag}\!\left(Q^\top \Big(\sum_{n,k} v_{nk} v_{nk}^\top\Big) Q\right),

the diagonal of the GGN block in KFAC's eigenbasis, which minimises the
Frobenius distance to the GGN block among matrices :math:`Q\,\mathrm{diag}(s)\,
Q^\top`. The block is :math:`Q\,\mathrm{diag}(s)\,Q^\top`
(a :class:`~curvext.operators.KronEigenOperator`). Parameters with one
factor (biases: :math:`G`; normalisation layers and the generic rule: the
whole block) get :math:`s` in their own factor's eigenbasis the same way.

:math:`s` carries the loss's normalisation like KFAC's :math:`G` (the
columns include :math:`\sqrt{c}`), so batches combine as :math:`G` does
(:mod:`curvext.operators.data`): for ``reduction="mean"``,
:math:`s = \sum_b d_b s_b / \sum_b d_b`; for ``"sum"``, :math:`s = \sum_b s_b`.

The second pass never forms per-sample gradients for a ``Linear``/``Conv``
weight with one group: with one position (no weight sharing),
:math:`(Q_G^\top g\, a^\top Q_A)^{\odot 2} = (Q_G^\top g)^{\odot 2}
(Q_A^\top a)^{\odot 2\,\top}`, a product of two small squared projections;
with several positions the rotated vectors are formed one column at a time
(``[N, d_out, d_in]``). Other rules use their per-sample vectors, in chunks
of columns (:meth:`~curvext.rules.base.ModuleRule.per_sample`).
"""

from __future__ import annotations

from typing import Dict, Iterable, List, Optional, Sequence

import torch
from torch import Tensor, nn

from curvext.distributed import broadcast, resolve_ranks
from curvext.extensions.kfac import KFAC, fisher_scaled
from curvext.operators.data import (
    DATA_PASS_COLUMNS,
    _ForData,
    _KFACForData,
    accumulate_over_data,
)
from curvext.operators.kron import (
    KronEigenOperator,
    KronOperator,
    _cached,
    factor_eigh,
    factor_transpose,
    kron_matmat,
)
from curvext.rules.factored import FactoredRule, sum_of_squares

#: Fisher types EKFAC supports (``"forward-only"`` has no per-sample vectors).
EKFAC_FISHER_TYPES = ("type-2", "mc", "empirical")


def eigenvalue_corrections(vectors: Tensor, eigenvectors: Sequence[Tensor]) -> Tensor:
    r""":math:`\sum_m ((\otimes_j Q_j)^\top v_m)^{\odot 2}`, flat, for ``vectors`` ``[M, P]``.

    Example:
        >>> Q = torch.linalg.qr(torch.randn(6, 6)).Q
        >>> V = torch.randn(4, 6)
        >>> expected = (Q.T @ V.T @ V @ Q).diagonal()
        >>> torch.allclose(eigenvalue_corrections(V, [Q]), expected, atol=1e-5)
        True
    """
    rotated = kron_matmat([factor_transpose(q) for q in eigenvectors], vectors.T)
    return rotated.square_().sum(1)


def _rotate(sides: Tensor, basis: Tensor) -> Tensor:
    """``basisᵀ @ sides[n]`` for ``sides [N, d, T]``: one batched product into
    the result (an einsum copies ``sides`` to another layout first)."""
    return torch.bmm(basis.mT.expand(sides.shape[0], -1, -1), sides)


def _eigenvectors(factor: Tensor) -> Tensor:
    return factor_eigh(factor)[1]


class _EKFACCorrections(_ForData, KFAC):
    """Second pass of EKFAC: the corrected eigenvalues ``s`` of each parameter.

    Args:
        eigenvectors: Per parameter (keyed by ``id``), the eigenvectors of its
            KFAC factors, in the order of the factors.
        fisher_type, mc_samples, kfac_approx: As for :class:`KFAC`.
    """

    savefield = "_ekfac_corrections"

    def __init__(
        self,
        eigenvectors: Dict[int, List[Tensor]],
        fisher_type: str,
        mc_samples: int,
        kfac_approx: str,
    ):
        super().__init__(fisher_type, mc_samples, kfac_approx)
        self.eigenvectors = eigenvectors
        # id(rule) -> (its inputs, their rotation): see _rotated_inputs
        self._rotated: Dict[int, tuple] = {}

    def reduce(self, rule, name, grads):
        param = rule.param(name)
        eigenvectors = self.eigenvectors.get(id(param))
        if eigenvectors is None:  # a trainable parameter that was not asked for
            return torch.zeros((), dtype=param.dtype, device=param.device)
        if self._factored(rule, name, eigenvectors):
            return self._factored_corrections(rule, name, grads, eigenvectors)

        def corrections(vectors):
            return eigenvalue_corrections(vectors.flatten(0, 1).flatten(1), eigenvectors)

        return rule._chunked(name, grads, corrections)

    @staticmethod
    def _factored(rule, name: str, eigenvectors: List[Tensor]) -> bool:
        """Whether the weight's vectors are one outer product per position (one group)."""
        return (
            isinstance(rule, FactoredRule)
            and name != "bias"
            and len(eigenvectors) == 2
            and rule.inputs().shape[1] == 1
        )

    def _rotated_inputs(self, rule: FactoredRule, input_basis: Tensor) -> Tensor:
        """``Q_Aᵀ A`` ``[N, d_in, T]`` (for one position its squares ``[N, d_in]``),
        computed once per batch, not once per chunk of columns; dropped in
        :meth:`finalize`. The rotation replaces the rule's ``A`` (this pass
        reads no other), so the patches of a convolution are held once."""
        cached = self._rotated.get(id(rule))
        if cached is None or cached[0] is not rule.inputs():
            rotated = _rotate(rule.inputs()[:, 0], input_basis)
            rule.replace_inputs(rotated.unsqueeze(1))
            if rule.single_position():
                rotated = rotated[..., 0].square()
            cached = self._rotated[id(rule)] = (rule.inputs(), rotated)
        return cached[1]

    def _factored_corrections(
        self, rule: FactoredRule, name: str, grads, eigenvectors: List[Tensor]
    ) -> Tensor:
        r"""``s`` from the rotated sides ``Q_Gᵀ G`` and ``Q_Aᵀ A`` (no ``[K, N, P]``)."""
        grad_basis, input_basis = eigenvectors if rule.grad_first else reversed(eigenvectors)
        # [K, N, d_grad, T] and [N, d_in, T] (one group)
        grad_side = rule.grad_factor(name, grads)[:, :, 0]
        input_side = self._rotated_inputs(rule, input_basis)
        if rule.single_position():
            grad_side = torch.einsum("kndt,de->knet", grad_side, grad_basis)
            grad_squares = sum_of_squares(grad_side[..., 0])  # [N, d_grad]
            input_squares = input_side  # [N, d_in]
            pattern = "no,ni->oi" if rule.grad_first else "no,ni->io"
            return torch.einsum(pattern, grad_squares, input_squares).flatten()
        total = None
        # one column at a time, rotated only then: a rotated copy of all K
        # columns [K, N, d_grad, T] would be as large as the engine's gradients
        # the grad side is rotated before the outer product or after it,
        # whichever is smaller: Q_Gᵀ G [N, d_grad, T] or Q_Gᵀ (G Aᵀ Q_A)
        # [N, d_grad, d_in] (a conv layer with few input channels has T >> d_in)
        rotate_after = input_side.shape[1] <= input_side.shape[2]
        for column in grad_side:
            if not rotate_after:
                vectors = rule._outer(_rotate(column, grad_basis), input_side)
            elif rule.grad_first:  # [N, d_grad, d_in]
                vectors = _rotate(rule._outer(column, input_side), grad_basis)
            else:  # [N, d_in, d_grad]
                vectors = rule._outer(column, input_side) @ grad_basis
            squares = vectors.square_().sum(0)  # [d_out, d_in]
            total = squares if total is None else total.add_(squares)
        return total.flatten()

    def begin_data_pass(self) -> None:
        self.columns_per_backward = DATA_PASS_COLUMNS

    def finalize(self, rule, name, partial, info):
        self._rotated.pop(id(rule), None)
        return fisher_scaled(self.fisher_type, partial, info), (True,)


class EKFACOperator(KronEigenOperator):
    r"""EKFAC: block-diagonal :math:`\bigoplus_i Q_i \,\mathrm{diag}(s_i)\, Q_i^\top`.

    :math:`Q_i` is the Kronecker product of the eigenvectors of parameter
    :math:`i`'s KFAC factors and :math:`s_i` the GGN block's diagonal in
    that basis (see the module docstring). A :class:`KronEigenOperator`, so
    it multiplies, measures itself and inverts (``inverse(damping)``:
    :math:`Q (\mathrm{diag}(s) + \delta I)^{-1} Q^\top`) like one. Weight and
    bias are separate blocks (curvlinops' ``separate_weight_and_bias=True``).

    Args:
        params: The parameters (order = order of the blocks).
        eigenvectors: Per block, the orthogonal factors of its eigenbasis.
        eigenvalues: Per block, the corrected eigenvalues, flat.

    Example:
        >>> model = torch.nn.Sequential(
        ...     torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2)
        ... )
        >>> loss_fn = torch.nn.CrossEntropyLoss()
        >>> X, y = torch.randn(10, 3), torch.randint(0, 2, (10,))
        >>> E = EKFACOperator.from_data(model, loss_fn, [(X[:4], y[:4]), (X[4:], y[4:])])
        >>> E_full = EKFACOperator.from_data(model, loss_fn, [(X, y)])
        >>> E.shape, torch.allclose(E.to_dense(), E_full.to_dense(), atol=1e-6)
        ((26, 26), True)
        >>> (E.inverse(damping=1e-3) @ torch.ones(26)).shape
        torch.Size([26])
    """

    def _with_eigenvalues(self, eigenvalues: List[Tensor]) -> "EKFACOperator":
        return EKFACOperator(self.params, self.eigenvectors, eigenvalues)

    @classmethod
    def from_data(
        cls,
        model: nn.Module,
        loss_fn: nn.Module,
        data: Iterable,
        fisher_type: str = "type-2",
        mc_samples: int = 1,
        kfac_approx: str = "expand",
        progressbar: bool = False,
        params: Optional[Iterable[Tensor]] = None,
        distributed=None,
    ) -> "EKFACOperator":
        r"""EKFAC of a whole data set: two passes over ``data``.

        The first pass is :meth:`KronOperator.from_data` (the KFAC factors,
        whose eigenvectors give the basis); the second runs the engine on
        every batch again and accumulates the corrected eigenvalues
        :math:`s = \sum_{n,k} (Q_G^\top V_{nk} Q_A)^{\odot 2}`, combined over
        batches like KFAC's :math:`G` (so that a data set split into batches
        gives the result of one batch of the whole set).

        Args:
            model: The model, extended in place with :func:`curvext.extend`.
            loss_fn: ``MSELoss``, ``CrossEntropyLoss`` or ``BCEWithLogitsLoss``
                with ``reduction="mean"`` or ``"sum"``.
            data: An iterable of ``(X, y)`` batches that can be iterated twice
                (a list or a ``DataLoader``; not a generator).
            fisher_type: ``"type-2"`` (default), ``"mc"`` (fresh samples in
                each pass, as curvlinops) or ``"empirical"``.
            mc_samples: Monte-Carlo samples per batch for ``"mc"``.
            kfac_approx: ``"expand"`` (default) or ``"reduce"``: how the
                factors (hence the basis) treat weight sharing; the corrections
                always use the exact per-sample vectors.
            progressbar: Show a ``tqdm`` progress bar over each pass.
            params: The parameters, in block order (default: the model's
                trainable parameters).
            distributed: ``None`` (default): if a :mod:`torch.distributed`
                process group is initialised, ``data`` is this rank's shard and
                both passes sum over the ranks; ``False``: this rank's ``data``
                only; ``True`` or a ``ProcessGroup``: over that group (see
                :mod:`curvext.distributed`). Between the passes the eigenbasis
                of the summed factors is broadcast from rank 0 (one
                collective), so that every rank rotates into the same basis
                even where ``eigh`` could pick different eigenvectors of a
                repeated eigenvalue on different hardware.

        Raises:
            ValueError: For ``fisher_type="forward-only"`` or an unknown one,
                ``data`` that is an iterator (it would be exhausted after the
                first pass), and everything :meth:`KronOperator.from_data`
                raises.
        """
        owner = f"{cls.__name__}.from_data"
        if fisher_type not in EKFAC_FISHER_TYPES:
            raise ValueError(
                f"{owner}(fisher_type={fisher_type!r}): EKFAC needs per-sample "
                f"vectors; use one of {EKFAC_FISHER_TYPES}."
            )

        def refuse_iterator():
            if iter(data) is data:
                raise ValueError(
                    f"{owner}: `data` is an iterator ({type(data).__name__}), but "
                    f"EKFAC passes over the data twice; pass a list of (X, y) "
                    f"batches or a DataLoader."
                )

        # KronOperator.from_data's pass, with `distributed` passed on
        params, factors = accumulate_over_data(
            model,
            loss_fn,
            data,
            _KFACForData(fisher_type, mc_samples, kfac_approx),
            params,
            progressbar,
            owner,
            distributed,
            check_data=refuse_iterator,
        )
        kron = KronOperator(params, factors)
        decompositions = {}  # a factor shared by a weight and its bias: one eigh
        eigenvectors = [
            [_cached(decompositions, factor, _eigenvectors) for factor in block]
            for block in kron.factors
        ]
        params = kron.params
        # only the eigenvectors are needed from here on: the factors (as large)
        # are freed before the second pass
        del kron, factors, decompositions
        ranks = resolve_ranks(distributed, owner)
        if ranks is not None:
            flat = broadcast([q for block in eigenvectors for q in block], ranks, 0)
            flat = iter(flat)
            eigenvectors = [[next(flat) for _ in block] for block in eigenvectors]
        extension = _EKFACCorrections(
            {id(p): vectors for p, vectors in zip(params, eigenvectors)},
            fisher_type,
            mc_samples,
            kfac_approx,
        )
        params, corrections = accumulate_over_data(
            model,
            loss_fn,
            data,
            extension,
            params,
            progressbar,
            owner,
            distributed,
        )
        return cls(params, eigenvectors, [values for (values,) in corrections])


__all__ = ["EKFACOperator", "eigenvalue_corrections"]
