r"""The second pass of EKFAC: the eigenvalues of the GGN block in KFAC's
eigenbasis (see :mod:`curvext.operators.ekfac` for the operator and the math).
"""

from __future__ import annotations

from typing import Dict, List, Sequence, cast

import torch
from torch import Tensor

from curvext.extensions.data_pass import DATA_PASS_COLUMNS, ForData
from curvext.extensions.kfac import KFAC, fisher_scaled
from curvext.kronecker import factor_transpose, kron_matmat
from curvext.rules.factored import sum_of_squares
from curvext.rules.families import Grads, OuterProductRule, PerSampleRule


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


class EKFACCorrections(ForData, KFAC):
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

    def reduce(self, rule: PerSampleRule, name: str, grads: Grads) -> Tensor:
        param = rule.param(name)
        eigenvectors = self.eigenvectors.get(id(param))
        if eigenvectors is None:  # a trainable parameter that was not asked for
            return torch.zeros((), dtype=param.dtype, device=param.device)
        if self._factored(rule, name, eigenvectors):
            return self._factored_corrections(
                cast(OuterProductRule, rule), name, grads, eigenvectors
            )

        def corrections(vectors):
            return eigenvalue_corrections(vectors.flatten(0, 1).flatten(1), eigenvectors)

        return rule.chunked(name, grads, corrections)

    @staticmethod
    def _factored(rule: PerSampleRule, name: str, eigenvectors: List[Tensor]) -> bool:
        """Whether the weight's vectors are one outer product per position (one group)."""
        return (
            rule.outer_product_vectors(name)
            and len(eigenvectors) == 2
            and cast(OuterProductRule, rule).inputs().shape[1] == 1
        )

    def _rotated_inputs(self, rule: OuterProductRule, input_basis: Tensor) -> Tensor:
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
        self, rule: OuterProductRule, name: str, grads: Grads, eigenvectors: List[Tensor]
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
                vectors = rule.outer(_rotate(column, grad_basis), input_side)
            elif rule.grad_first:  # [N, d_grad, d_in]
                vectors = _rotate(rule.outer(column, input_side), grad_basis)
            else:  # [N, d_in, d_grad]
                vectors = rule.outer(column, input_side) @ grad_basis
            squares = vectors.square_().sum(0)  # [d_out, d_in]
            total = squares if total is None else total.add_(squares)
        return total.flatten()

    def begin_data_pass(self) -> None:
        self.columns_per_backward = DATA_PASS_COLUMNS

    def finalize(self, rule, name, partial, info):
        self._rotated.pop(id(rule), None)
        return fisher_scaled(self.fisher_type, partial, info), (True,)


__all__ = ["EKFACCorrections", "eigenvalue_corrections"]
