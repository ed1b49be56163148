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

from typing import Iterable, List, Optional

from torch import Tensor, nn

from curvext.distributed import broadcast, resolve_ranks
from curvext.extensions.data_pass import KFACForData
from curvext.extensions.ekfac import EKFACCorrections, eigenvalue_corrections
from curvext.operators.data import accumulate_over_data
from curvext.operators.kron import (
    KronEigenOperator,
    KronOperator,
    _cached,
    factor_eigh,
)

#: Fisher types EKFAC supports (``"forward-only"`` has no per-sample vectors).
EKFAC_FISHER_TYPES = ("type-2", "mc", "empirical")


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
        >>> import torch
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
            KFACForData(fisher_type, mc_samples, kfac_approx),
            params,
            progressbar,
            owner,
            distributed,
            check_data=refuse_iterator,
        )
        kron = KronOperator(params, factors)
        decompositions = {}  # a factor shared by a weight and its bias: one eigh
        eigenvectors = [
            [
                _cached(decompositions, kron.shared.key(index, slot), lambda f=f: factor_eigh(f)[1])
                for slot, f in enumerate(block)
            ]
            for index, block in enumerate(kron.factors)
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
        extension = EKFACCorrections(
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
