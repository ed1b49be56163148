r"""Block-diagonal combination of curvature operators over disjoint parameters.

.. math:: B = \bigoplus_b A_b

for operators :math:`A_b` of any kind (e.g. a
:class:`~curvext.operators.KronOperator` for the convolutions and a
:class:`~curvext.operators.DiagonalOperator` for the normalisation layers).
Every measurement is the blocks' own: products and diagonals block by block,
:math:`\log\det B = \sum_b \log\det A_b`, :math:`\lVert B\rVert_F^2 = \sum_b
\lVert A_b\rVert_F^2`, the inverse block by block.
"""

from __future__ import annotations

import inspect
from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor

from curvext.operators.base import (
    CurvatureOperator,
    check_damping,
    combine_slogdets,
    shapes_text,
)


class BlockDiagonalOperator(CurvatureOperator):
    r"""The block-diagonal operator :math:`\bigoplus_b A_b` of operators over disjoint parameters.

    Args:
        operators: The blocks, each a :class:`CurvatureOperator`; no parameter
            may belong to two of them. All share one dtype and device.
        params: The order of the rows: a reordering of all the blocks'
            parameters (e.g. ``model.parameters()`` when the blocks interleave).
            Default: the blocks' parameters, block after block.

    Raises:
        ValueError: For no blocks, a parameter in two blocks (the message
            names it), blocks of different dtypes or devices, or ``params``
            that are not exactly the blocks' parameters.
        TypeError: If a block is not a :class:`CurvatureOperator`.

    Example:
        >>> from curvext.operators import DiagonalOperator, KronOperator
        >>> layer, norm = torch.nn.Linear(2, 2, bias=False), torch.nn.LayerNorm(2)
        >>> eye = torch.eye(2, dtype=torch.float64)
        >>> K = KronOperator([layer.weight], [[eye, 2 * eye]])
        >>> diagonal = torch.tensor([1.0, 2, 3, 4], dtype=torch.float64)
        >>> D = DiagonalOperator(list(norm.parameters()), diagonal)
        >>> B = BlockDiagonalOperator([K, D])
        >>> B.shape, B.trace().item(), B.inverse(damping=1.0).diag()[-2:].tolist()
        ((8, 8), 18.0, [0.25, 0.2])
    """

    def __init__(
        self,
        operators: Sequence[CurvatureOperator],
        params: Optional[Sequence[Tensor]] = None,
    ):
        blocks = list(operators)
        if not blocks:
            raise ValueError("BlockDiagonalOperator: expected at least one operator.")
        owner = {}
        for index, block in enumerate(blocks):
            if not isinstance(block, CurvatureOperator):
                raise TypeError(
                    f"BlockDiagonalOperator: block {index} is a {type(block).__name__}, "
                    f"not a CurvatureOperator."
                )
            if (block.dtype, block.device) != (blocks[0].dtype, blocks[0].device):
                raise ValueError(
                    f"BlockDiagonalOperator: block {index} has dtype {block.dtype} on "
                    f"{block.device}, block 0 {blocks[0].dtype} on {blocks[0].device}; "
                    f"convert them to one dtype and device."
                )
            for position, param in enumerate(block.params):
                if id(param) in owner:
                    first, first_position = owner[id(param)]
                    raise ValueError(
                        f"BlockDiagonalOperator: the parameter of shape "
                        f"{tuple(param.shape)} appears in two blocks (parameter "
                        f"{first_position} of block {first} and parameter {position} "
                        f"of block {index}); the blocks must cover disjoint parameters."
                    )
                owner[id(param)] = (index, position)
        block_params = [p for block in blocks for p in block.params]
        params = block_params if params is None else list(params)
        if len(params) != len(block_params) or {id(p) for p in params} != set(owner):
            raise ValueError(
                f"BlockDiagonalOperator: params must be the blocks' parameters in any "
                f"order, {len(block_params)} tensors {shapes_text(block_params)}; got "
                f"{len(params)} shaped {shapes_text(params)}."
            )
        super().__init__(params, blocks[0].dtype, blocks[0].device)
        self.blocks = blocks
        # rows of the blocks, block after block, as rows of self
        starts = torch.tensor([0, *self._numels]).cumsum(0).tolist()
        start_of = {id(p): start for p, start in zip(params, starts)}
        self._rows: Optional[Tensor] = None
        if any(a is not b for a, b in zip(params, block_params)):
            self._rows = torch.cat(
                [torch.arange(start_of[id(p)], start_of[id(p)] + p.numel()) for p in block_params]
            ).to(self.device)

    def _to_blocks(self, matrix: Tensor) -> Sequence[Tensor]:
        """The rows of ``matrix`` (in the order of ``params``) split by block."""
        if self._rows is not None:
            matrix = matrix[self._rows]
        return matrix.split([block.shape[0] for block in self.blocks])

    def _from_blocks(self, pieces: Sequence[Tensor]) -> Tensor:
        """Inverse of :meth:`_to_blocks`."""
        stacked = torch.cat(list(pieces))
        if self._rows is None:
            return stacked
        result = torch.empty_like(stacked)
        result[self._rows] = stacked
        return result

    def _matmat(self, matrix: Tensor) -> Tensor:
        return self._from_blocks(
            [block._matmat(piece) for block, piece in zip(self.blocks, self._to_blocks(matrix))]
        )

    def to_dense(self) -> Tensor:
        dense = torch.block_diag(*[block.to_dense() for block in self.blocks])
        if self._rows is None:
            return dense
        result = torch.empty_like(dense)
        result[self._rows.unsqueeze(1), self._rows.unsqueeze(0)] = dense
        return result

    def diag(self) -> Tensor:
        return self._from_blocks([block.diag() for block in self.blocks])

    def _slogdet(self) -> Tuple[Tensor, Tensor]:
        signs, logabsdets = zip(*[block._slogdet() for block in self.blocks])
        return combine_slogdets(signs, logabsdets)

    def frobenius_norm(self) -> Tensor:
        return torch.stack([block.frobenius_norm() for block in self.blocks]).norm()

    def _with_blocks(self, blocks) -> "BlockDiagonalOperator":
        return BlockDiagonalOperator(blocks, params=self.params)

    def _add_scalar(self, value: float) -> "BlockDiagonalOperator":
        return self._with_blocks([block + value for block in self.blocks])

    def _scale(self, value: float) -> "BlockDiagonalOperator":
        return self._with_blocks([block * value for block in self.blocks])

    def _add_same(self, other: "BlockDiagonalOperator") -> "BlockDiagonalOperator":
        """Block by block; the blocks must cover the same parameters in both."""
        same_split = len(self.blocks) == len(other.blocks) and all(
            len(a.params) == len(b.params) and all(x is y for x, y in zip(a.params, b.params))
            for a, b in zip(self.blocks, other.blocks)
        )
        if not same_split:
            raise ValueError(
                "Cannot add BlockDiagonalOperators whose blocks split the parameters "
                "differently: block b of one must cover the same parameters as "
                "block b of the other."
            )
        return self._with_blocks([a + b for a, b in zip(self.blocks, other.blocks)])

    def inverse(self, damping: float = 0.0, **options) -> "BlockDiagonalOperator":
        r""":math:`\bigoplus_b A_b^{-1}`, each block inverted with ``damping``.

        Args:
            damping: :math:`\delta \ge 0`, passed to every block's ``inverse``.
            **options: Further damping options (e.g. ``use_heuristic_damping``
                of :meth:`KronOperator.inverse`), passed to the blocks whose
                ``inverse`` takes them.

        Raises:
            ValueError: For a negative or non-finite ``damping``, an option no
                block takes, or a singular block (the block's own error).

        Example:
            >>> from curvext.operators import DiagonalOperator, KronOperator
            >>> w, b = torch.nn.Parameter(torch.zeros(2, 2)), torch.nn.Parameter(torch.zeros(2))
            >>> K = KronOperator([w], [[torch.eye(2), torch.eye(2)]])
            >>> B = BlockDiagonalOperator([K, DiagonalOperator([b], torch.ones(2))])
            >>> B.inverse(1.0, use_heuristic_damping=True).diag().round(decimals=4).tolist()
            [0.25, 0.25, 0.25, 0.25, 0.5, 0.5]
        """
        damping = check_damping(damping)
        accepted = [set(inspect.signature(block.inverse).parameters) for block in self.blocks]
        unknown = sorted(set(options) - set().union(*accepted))
        if unknown:
            raise ValueError(
                f"BlockDiagonalOperator.inverse: no block's inverse takes "
                f"{', '.join(unknown)} (blocks: "
                f"{', '.join(type(b).__name__ for b in self.blocks)})."
            )
        return self._with_blocks(
            [
                block.inverse(
                    damping=damping,
                    **{k: v for k, v in options.items() if k in names},
                )
                for block, names in zip(self.blocks, accepted)
            ]
        )

    def __repr__(self) -> str:
        blocks = ", ".join(type(b).__name__ for b in self.blocks)
        return f"{super().__repr__()[:-1]}, blocks=[{blocks}])"


__all__ = ["BlockDiagonalOperator"]
