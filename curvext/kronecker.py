r"""Kronecker products factor by factor, without forming them.

A factor is a square matrix, or a 1-D tensor: the diagonal of a diagonal
factor (``Embedding``'s KFAC input factor ``[V]``, an identity stored as
ones), never made dense. A leaf module: the operators and the extensions
(EKFAC) both use it.
"""

from __future__ import annotations

import functools
from typing import Dict, List, Sequence, Tuple

import torch
from torch import Tensor


def as_matrix(factor: Tensor) -> Tensor:
    """A factor as a matrix: a 1-D factor is the diagonal of a diagonal one
    (``Embedding``'s input factor ``[V]``), stored without its ``V²`` zeros."""
    return torch.diag(factor) if factor.dim() == 1 else factor


def factor_size(factor: Tensor) -> int:
    return factor.shape[0]


def factor_diagonal(factor: Tensor) -> Tensor:
    return factor if factor.dim() == 1 else factor.diagonal()


def factor_trace(factor: Tensor) -> Tensor:
    return factor.sum() if factor.dim() == 1 else factor.trace()


def factor_transpose(factor: Tensor) -> Tensor:
    return factor if factor.dim() == 1 else factor.T


def factor_eigh(factor: Tensor) -> Tuple[Tensor, Tensor]:
    """``(eigenvalues, eigenvectors)``; a diagonal factor's eigenvectors are
    the identity, stored as the diagonal factor of ones."""
    if factor.dim() == 1:
        return factor, torch.ones_like(factor)
    decomposition = torch.linalg.eigh(factor)
    return decomposition.eigenvalues, decomposition.eigenvectors


def factor_slogdet(factor: Tensor) -> Tuple[Tensor, Tensor]:
    if factor.dim() == 1:
        return factor.sign().prod(), factor.abs().log().sum()
    return tuple(torch.linalg.slogdet(factor))


def kron_matmat(factors: Sequence[Tensor], matrix: Tensor) -> Tensor:
    r""":math:`(F_1 \otimes \dots \otimes F_k) X` for ``X`` ``[d, M]``, factor by factor.

    A 1-D factor is a diagonal matrix (see :func:`as_matrix`).

    Example:
        >>> A, B, X = torch.randn(2, 2), torch.randn(3, 3), torch.randn(6, 4)
        >>> torch.allclose(kron_matmat([A, B], X), torch.kron(A, B) @ X, atol=1e-6)
        True
        >>> a = torch.rand(2)
        >>> torch.allclose(kron_matmat([a, B], X), torch.kron(torch.diag(a), B) @ X, atol=1e-6)
        True
    """
    columns = matrix.shape[-1]
    if len(factors) == 1:
        factor = factors[0]
        return factor.unsqueeze(1) * matrix if factor.dim() == 1 else factor @ matrix
    if len(factors) == 2 and all(f.dim() == 2 for f in factors):
        # one GEMM per factor, no copy for a single column: F₁ X is [n₁, n₂ M],
        # then every row block times F₂ᵀ
        first, second = factors
        rows, inner = first.shape[1], second.shape[1]
        left = (first @ matrix.reshape(rows, inner * columns)).reshape(-1, inner, columns)
        both = left.transpose(1, 2) @ second.T  # [n₁, M, n₂]
        return both.transpose(1, 2).reshape(-1, columns)
    tensor = matrix.reshape(*(factor_size(f) for f in factors), columns)
    for axis, factor in enumerate(factors):
        if factor.dim() == 1:
            shape = [1] * tensor.dim()
            shape[axis] = -1
            tensor = tensor * factor.view(shape)
        else:
            tensor = torch.tensordot(factor, tensor, dims=([1], [axis])).movedim(0, axis)
    return tensor.reshape(-1, columns)


def dense_kron(factors: Sequence[Tensor]) -> Tensor:
    """``torch.kron`` of one or more vectors (eigenvalues, diagonals)."""
    return functools.reduce(torch.kron, factors)


def dense_kron_matrix(factors: Sequence[Tensor]) -> Tensor:
    """``torch.kron`` of factors as matrices (1-D factors are diagonals)."""
    # torch.kron fails on some strides (eigh returns column-major vectors)
    return functools.reduce(torch.kron, [as_matrix(f).contiguous() for f in factors])


#: A factor's place in a list of Kronecker blocks: ``(block, slot)``.
Slot = Tuple[int, int]


class SharedFactors:
    """Which factors of a list of Kronecker blocks are one shared factor.

    KFAC gives a weight and its bias the same output-side factor ``G`` (the
    bias is the weight's column for a constant input); curvext stores that
    one tensor in both parameters' ``p.kfac`` lists, BackPACK-style. Where
    factors enter an operator or a data pass, this map is built once, and
    everything done per factor (a running sum over batches, an
    eigendecomposition, an inverse, π-damping) is done once per shared
    factor, found by its :meth:`key`, the first place it occurs.

    Args:
        blocks: Per block (parameter) its factors, e.g. ``[p.kfac for p in params]``.

    Example:
        >>> G, A = torch.eye(2), torch.eye(3)
        >>> shared = SharedFactors([[G, A], [G]])
        >>> shared.key(1, 0), shared.holders(1, 0)
        ((0, 0), [(0, 0), (1, 0)])
    """

    def __init__(self, blocks: Sequence[Sequence[Tensor]]):
        first: Dict[int, Slot] = {}  # identity of a factor -> its first slot; blocks hold them
        self._keys: Dict[Slot, Slot] = {}
        self._holders: Dict[Slot, List[Slot]] = {}
        for block_index, block in enumerate(blocks):
            for slot, factor in enumerate(block):
                key = first.setdefault(id(factor), (block_index, slot))
                self._keys[block_index, slot] = key
                self._holders.setdefault(key, []).append((block_index, slot))

    def key(self, block: int, slot: int) -> Slot:
        """The first slot holding the factor at ``(block, slot)`` (itself if unshared)."""
        return self._keys[block, slot]

    def holders(self, block: int, slot: int) -> List[Slot]:
        """Every slot holding the factor at ``(block, slot)``, in order."""
        return list(self._holders[self.key(block, slot)])
