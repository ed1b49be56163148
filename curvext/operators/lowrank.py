r"""Low-rank curvature plus a multiple of the identity, from stored eigenpairs.

The operator over the parameters of one group is

.. math:: L = U M U^\top + \sigma I,

with :math:`U` ``[P, k]`` the group's eigenvectors as columns, :math:`M` a
symmetric ``[k, k]`` core (``diag(eigvals)`` for stored eigenpairs) and
:math:`\sigma` an identity term (from ``L + δ``). Everything is computed in
the ``k``-dimensional space with the Gram matrix :math:`C = U^\top U`
(``I`` for orthonormal eigenvectors; it is never assumed to be):

- the inverse by Woodbury's identity, :math:`(\tau I + U M U^\top)^{-1} =
  \tau^{-1} I - \tau^{-1} U M (\tau I + C M)^{-1} U^\top`, again a
  :class:`LowRankOperator` (no :math:`M^{-1}`, so zero eigenvalues are fine);
- :math:`\log\det` by the matrix determinant lemma, :math:`\det(\sigma I +
  U M U^\top) = \sigma^{P} \det(I + \sigma^{-1} M C)`;
- :math:`\lVert U M U^\top + \sigma I\rVert_F^2 = \mathrm{tr}(MCMC) + 2\sigma
  \,\mathrm{tr}(MC) + \sigma^2 P`.

For ``k < P`` and :math:`\sigma = 0` the operator is singular: ``logdet`` and
``inverse`` ask for damping.
"""

from __future__ import annotations

from typing import Iterable, List, Sequence, Tuple, Union

import torch
from torch import Tensor

from curvext.operators.base import (
    CurvatureOperator,
    as_scalar,
    check_damping,
    collect_params,
    shapes_text,
    stored,
)


class LowRankOperator(CurvatureOperator):
    r""":math:`U\,\mathrm{diag}(\lambda)\,U^\top + \sigma I` over one group of parameters.

    Args:
        params: The parameters of the group (order = order of the rows).
        eigvals: :math:`\lambda`, ``[k]``.
        eigvecs: One tensor ``[k, *p.shape]`` per parameter: its slice of the
            ``k`` eigenvectors (GGNEigen's ``p.ggn_eigvecs``). Concatenated
            over the parameters (``torch.cat([e.flatten(1) for e in eigvecs], 1)``)
            they are :math:`U^\top` ``[k, P]``.
        shift: :math:`\sigma` (default 0).

    Raises:
        ValueError: If ``eigvals`` is not flat or not finite, or an
            eigenvector tensor is not ``[k, *p.shape]`` (the message names the
            parameter).

    Example:
        >>> p = torch.nn.Parameter(torch.zeros(3))
        >>> L = LowRankOperator([p], torch.tensor([2.0]), [torch.tensor([[1.0, 0, 0]])])
        >>> L.diag().tolist(), L.trace().item()
        ([2.0, 0.0, 0.0], 2.0)
        >>> (L.inverse(damping=1.0) @ torch.ones(3)).round(decimals=4).tolist()  # (L + I)⁻¹ 1
        [0.3333, 1.0, 1.0]
        >>> (L + 1.0).logdet().item() == torch.tensor(3.0).log().item()
        True
    """

    def __init__(
        self,
        params: Sequence[Tensor],
        eigvals: Tensor,
        eigvecs: Sequence[Tensor],
        shift: float = 0.0,
    ):
        params, eigvecs = list(params), list(eigvecs)
        if not params or len(eigvecs) != len(params):
            raise ValueError(
                f"LowRankOperator: expected one eigenvector tensor [k, *p.shape] per "
                f"parameter ({len(params)} parameters), got {len(eigvecs)}."
            )
        if not isinstance(eigvals, Tensor) or eigvals.ndim != 1:
            shape = list(eigvals.shape) if isinstance(eigvals, Tensor) else eigvals
            raise ValueError(f"LowRankOperator: eigvals must be a flat tensor [k], got {shape}.")
        if not torch.isfinite(eigvals).all():
            raise ValueError("LowRankOperator: eigvals must be finite.")
        rank = eigvals.shape[0]
        for index, (param, vectors) in enumerate(zip(params, eigvecs)):
            if tuple(vectors.shape) != (rank, *param.shape):
                raise ValueError(
                    f"LowRankOperator: the eigenvectors of parameter {index} (shape "
                    f"{tuple(param.shape)}) have shape {tuple(vectors.shape)}; "
                    f"expected [k, *p.shape] = {(rank, *param.shape)} for the "
                    f"{rank} eigenvalues."
                )
        vectors = torch.cat([v.reshape(rank, -1) for v in eigvecs], dim=1)
        self._assign(params, vectors, torch.diag(eigvals.to(vectors.dtype)), shift)

    def _assign(self, params, vectors: Tensor, core: Tensor, shift: float) -> None:
        super().__init__(params, vectors.dtype, vectors.device)
        #: :math:`U^\top` ``[k, P]``.
        self.vectors = vectors
        #: :math:`M` ``[k, k]``, symmetric.
        self.core = core
        #: :math:`\sigma`.
        self.shift = as_scalar(shift, "LowRankOperator: shift")

    @classmethod
    def _assemble(cls, params, vectors: Tensor, core: Tensor, shift: float) -> "LowRankOperator":
        r""":math:`U M U^\top + \sigma I` from ``vectors`` :math:`U^\top` and ``core`` :math:`M`."""
        operator = cls.__new__(cls)
        operator._assign(params, vectors, core, shift)
        return operator

    @classmethod
    def from_params(
        cls, params: Iterable[Tensor]
    ) -> Union["LowRankOperator", "BlockDiagonalOperator"]:  # noqa: F821
        r"""The eigenpairs ``p.ggn_eigvals``/``p.ggn_eigvecs`` stored by ``GGNEigen``.

        Parameters holding the same ``p.ggn_eigvals`` tensor form one group
        (GGNEigen stores its group's eigenvalues on each of them). One group
        gives a :class:`LowRankOperator`; several give a
        :class:`~curvext.operators.BlockDiagonalOperator` of one
        :class:`LowRankOperator` per group, its rows in the order of ``params``
        (groups may interleave).

        Args:
            params: Parameters, e.g. ``model.parameters()``; those with
                ``requires_grad=False`` are skipped. Pass only parameters of
                GGNEigen's ``param_groups`` when it had some.

        Raises:
            AttributeError: If a parameter lacks ``p.ggn_eigvals`` (run
                ``GGNEigen()``) or ``p.ggn_eigvecs`` (run
                ``GGNEigen(eigenvectors=True)``).
            ValueError: If the stored shapes do not fit.

        Example:
            >>> from curvext import backpack, extend
            >>> from curvext.extensions import GGNEigen
            >>> model = extend(torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 2)))
            >>> loss_fn = extend(torch.nn.MSELoss())
            >>> loss = loss_fn(model(torch.randn(4, 3)), torch.randn(4, 2))
            >>> with backpack(GGNEigen(param_groups=[{"params": model[0].parameters()},
            ...                                       {"params": model[1].parameters()}])):
            ...     loss.backward()
            >>> L = LowRankOperator.from_params(model.parameters())
            >>> type(L).__name__, [type(b).__name__ for b in L.blocks], L.shape
            ('BlockDiagonalOperator', ['LowRankOperator', 'LowRankOperator'], (14, 14))
        """
        from curvext.operators.block import BlockDiagonalOperator

        owner = f"{cls.__name__}.from_params"
        params = collect_params(params, owner)
        groups = {}
        for index, param in enumerate(params):
            eigvals = stored(param, index, "ggn_eigvals", owner)
            eigvecs = stored(param, index, "ggn_eigvecs", owner, "GGNEigen(eigenvectors=True)")
            members = groups.setdefault(id(eigvals), (eigvals, [], []))
            members[1].append(param)
            members[2].append(eigvecs.detach())
        blocks = [
            cls(members, eigvals.detach(), eigvecs) for eigvals, members, eigvecs in groups.values()
        ]
        if len(blocks) == 1:
            return blocks[0]
        return BlockDiagonalOperator(blocks, params=params)

    @property
    def rank(self) -> int:
        """``k``, the number of columns of :math:`U`."""
        return self.vectors.shape[0]

    def eigvecs(self) -> List[Tensor]:
        r""":math:`U^\top` split into one ``[k, *p.shape]`` tensor per parameter."""
        return [
            block.reshape(self.rank, *p.shape)
            for block, p in zip(self.vectors.split(self._numels, dim=1), self.params)
        ]

    def _gram(self) -> Tensor:
        return self.vectors @ self.vectors.T

    def _matmat(self, matrix: Tensor) -> Tensor:
        return self.vectors.T @ (self.core @ (self.vectors @ matrix)) + self.shift * matrix

    def to_dense(self) -> Tensor:
        identity = torch.eye(self.shape[0], dtype=self.dtype, device=self.device)
        return self.vectors.T @ self.core @ self.vectors + self.shift * identity

    def diag(self) -> Tensor:
        # diag(U M Uᵀ)_a = Σ_ij U_ai M_ij U_aj
        return ((self.core @ self.vectors) * self.vectors).sum(0) + self.shift

    def _slogdet(self) -> Tuple[Tensor, Tensor]:
        size = self.shape[0]
        if self.shift == 0.0:
            if self.rank < size:
                zero = torch.zeros((), dtype=self.dtype, device=self.device)
                return zero, torch.full_like(zero, -torch.inf)
            return torch.linalg.slogdet(self.to_dense())
        # det(σ I_P + U M Uᵀ) = σ^P det(I_k + M C / σ)
        identity = torch.eye(self.rank, dtype=self.dtype, device=self.device)
        sign, logabsdet = torch.linalg.slogdet(identity + self.core @ self._gram() / self.shift)
        shift = torch.tensor(self.shift, dtype=self.dtype, device=self.device)
        return sign * shift.sign() ** size, logabsdet + size * shift.abs().log()

    def frobenius_norm(self) -> Tensor:
        core_gram = self.core @ self._gram()
        square = (
            (core_gram * core_gram.T).sum()
            + 2 * self.shift * core_gram.trace()
            + self.shift**2 * self.shape[0]
        )
        return square.clamp_min(0).sqrt()

    def _add_scalar(self, value: float) -> "LowRankOperator":
        return self._assemble(self.params, self.vectors, self.core, self.shift + value)

    def _scale(self, value: float) -> "LowRankOperator":
        return self._assemble(self.params, self.vectors, self.core * value, self.shift * value)

    def _add_same(self, other: "LowRankOperator") -> "LowRankOperator":
        """The sum: shared eigenvectors add their cores, others stack (rank adds up)."""
        shift = self.shift + other.shift
        if self.vectors.shape == other.vectors.shape and torch.equal(self.vectors, other.vectors):
            return self._assemble(self.params, self.vectors, self.core + other.core, shift)
        vectors = torch.cat([self.vectors, other.vectors])
        core = torch.block_diag(self.core, other.core)
        return self._assemble(self.params, vectors, core, shift)

    def inverse(self, damping: float = 0.0) -> "LowRankOperator":
        r""":math:`(U M U^\top + (\sigma + \delta) I)^{-1}` by Woodbury's identity.

        With :math:`\tau = \sigma + \delta`: :math:`\tau^{-1} I - \tau^{-1} U M
        (\tau I + C M)^{-1} U^\top`, a :class:`LowRankOperator` of the same rank.

        Args:
            damping: :math:`\delta \ge 0`; must be positive unless the operator
                already has an identity term (``(L + δ).inverse()``), since
                :math:`U M U^\top` alone is singular.

        Raises:
            ValueError: For a negative or non-finite ``damping``, or
                :math:`\sigma + \delta = 0` (singular), or a singular damped operator.

        Example:
            >>> p = torch.nn.Parameter(torch.zeros(2))
            >>> L = LowRankOperator([p], torch.tensor([3.0]), [torch.tensor([[0.0, 1.0]])])
            >>> L.inverse(damping=1.0).diag().tolist()
            [1.0, 0.25]
        """
        damping = check_damping(damping)
        total = self.shift + damping
        if total == 0.0:
            raise ValueError(
                f"LowRankOperator.inverse(damping={damping}): a rank-{self.rank} "
                f"operator on {self.shape[0]} parameters is singular; pass "
                f"damping > 0."
            )
        identity = torch.eye(self.rank, dtype=self.dtype, device=self.device)
        solved, info = torch.linalg.solve_ex(total * identity + self.core @ self._gram(), self.core)
        if info.item() != 0:
            raise ValueError(
                f"LowRankOperator.inverse(damping={damping}): the damped operator "
                f"is singular (shapes {shapes_text(self.params)})."
            )
        core = -(solved + solved.T) / (2 * total)
        return self._assemble(self.params, self.vectors, core, 1.0 / total)


__all__ = ["LowRankOperator"]
