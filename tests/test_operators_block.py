"""BlockDiagonalOperator against ``torch.block_diag`` of independently built blocks (float64)."""

import pytest
import torch
from torch import nn

from curvext.operators import (
    BlockDiagonalOperator,
    DiagonalOperator,
    KronOperator,
    LowRankOperator,
)
from tests.test_operators import engine_model, kron, random_spd


def assert_close(actual, expected):
    torch.testing.assert_close(actual, expected, rtol=1e-9, atol=1e-10)


def mixed_case():
    """KFAC for a linear layer, a diagonal for a norm, low-rank for a free tensor."""
    torch.manual_seed(5)
    layer, norm, free = nn.Linear(3, 2), nn.LayerNorm(2), nn.Parameter(torch.zeros(4))
    G, A = random_spd(2), random_spd(3)
    kron_op = KronOperator([layer.weight, layer.bias], [[G, A], [G]])
    diagonal = torch.rand(4) + 0.5
    diag_op = DiagonalOperator(list(norm.parameters()), diagonal)
    columns = torch.linalg.qr(torch.randn(4, 2)).Q
    eigvals = torch.tensor([2.0, 0.5])
    low_op = LowRankOperator([free], eigvals, [columns.T]) + 0.3
    blocks = [
        kron([G, A]),
        G,
        torch.diag(diagonal),
        columns @ torch.diag(eigvals) @ columns.T + 0.3 * torch.eye(4),
    ]
    params = [layer.weight, layer.bias, *norm.parameters(), free]
    return BlockDiagonalOperator([kron_op, diag_op, low_op]), torch.block_diag(*blocks), params


def test_against_dense():
    op, dense, params = mixed_case()
    assert op.shape == (16, 16) and all(a is b for a, b in zip(op.params, params))
    assert_close(op.to_dense(), dense)
    matrix = torch.randn(16, 3)
    assert_close(op @ matrix, dense @ matrix)
    assert_close(op.T @ matrix[:, 0], dense @ matrix[:, 0])
    as_list = list(matrix[:, 1].split([p.numel() for p in params]))
    as_list = [t.reshape(p.shape) for t, p in zip(as_list, params)]
    assert_close(torch.cat([t.flatten() for t in op @ as_list]), dense @ matrix[:, 1])
    assert_close(op.diag(), dense.diagonal())
    assert_close(op.trace(), dense.trace())
    assert_close(op.frobenius_norm(), torch.linalg.matrix_norm(dense))
    assert_close(op.logdet(), torch.logdet(dense))
    assert_close(op.det(), torch.det(dense))


def test_arithmetic():
    op, dense, _ = mixed_case()
    identity = torch.eye(16)
    assert_close((2.0 * op - 0.1).to_dense(), 2.0 * dense - 0.1 * identity)
    assert_close((op + op).to_dense(), 2 * dense)
    assert isinstance(op + 1.0, BlockDiagonalOperator)
    assert [type(b) for b in (op + 1.0).blocks] == [type(b) for b in op.blocks]


def test_inverse_blockwise():
    op, dense, _ = mixed_case()
    kron_op, diag_op, low_op = op.blocks
    G, A = kron_op.factors[0]
    eye = torch.eye
    damping = 0.2
    expected = torch.block_diag(
        kron([torch.linalg.inv(G + damping * eye(2)), torch.linalg.inv(A + damping * eye(3))]),
        torch.linalg.inv(G + damping * eye(2)),
        torch.diag(1 / (diag_op.diag() + damping)),
        torch.linalg.inv(low_op.to_dense() + damping * eye(4)),
    )
    inverse = op.inverse(damping=damping)
    assert isinstance(inverse, BlockDiagonalOperator)
    assert_close(inverse.to_dense(), expected)
    # options go to the blocks that take them
    heuristic = op.inverse(damping, use_heuristic_damping=True)
    vector = torch.randn(16)
    assert_close(
        heuristic.blocks[0] @ vector[:8],
        kron_op.inverse(damping, use_heuristic_damping=True) @ vector[:8],
    )
    assert_close(heuristic.blocks[1].to_dense(), expected[8:12, 8:12])
    exact = op.inverse(damping, use_exact_damping=True)
    assert_close(exact.to_dense()[:6, :6], torch.linalg.inv(kron([G, A]) + damping * eye(6)))


def test_interleaved_parameter_order():
    op, dense, params = mixed_case()
    order = [params[4], params[0], params[2], params[1], params[3]]
    sizes = [p.numel() for p in params]
    starts = torch.tensor([0, *sizes]).cumsum(0)
    rows = torch.cat([torch.arange(starts[i], starts[i] + sizes[i]) for i in (4, 0, 2, 1, 3)])
    reordered = BlockDiagonalOperator(op.blocks, params=order)
    expected = dense[rows.unsqueeze(1), rows]
    assert_close(reordered.to_dense(), expected)
    matrix = torch.randn(16, 2)
    assert_close(reordered @ matrix, expected @ matrix)
    assert_close(reordered.diag(), expected.diagonal())
    assert_close(
        reordered.inverse(damping=0.1, use_exact_damping=True) @ matrix,
        torch.linalg.solve(expected + 0.1 * torch.eye(16), matrix),
    )
    assert_close(reordered.logdet(), torch.logdet(expected))
    assert_close((reordered + reordered).to_dense(), 2 * expected)


def test_engine_kfac_for_linear_and_diagonal_for_norm():
    model = engine_model()
    linear = [*model[0].parameters(), *model[3].parameters()]
    norm = list(model[1].parameters())
    op = BlockDiagonalOperator(
        [KronOperator.from_params(linear), DiagonalOperator.from_params(norm)],
        params=model.parameters(),
    )
    blocks = {id(p): kron(p.kfac) for p in linear}
    blocks.update({id(p): torch.diag(p.ggn_diag.flatten()) for p in norm})
    expected = torch.block_diag(*[blocks[id(p)] for p in model.parameters()])
    assert_close(op.to_dense(), expected)
    assert_close((op + 1e-2).logdet(), torch.logdet(expected + 1e-2 * torch.eye(expected.shape[0])))


def test_bad_input():
    op, _, params = mixed_case()
    kron_op, diag_op, low_op = op.blocks
    with pytest.raises(
        ValueError,
        match=(
            r"the parameter of shape \(2,\) appears in two blocks "
            r"\(parameter 1 of block 0 and parameter 0 of block 1\)"
        ),
    ):
        BlockDiagonalOperator([kron_op, KronOperator([params[1]], [[torch.eye(2)]])])
    with pytest.raises(ValueError, match="at least one operator"):
        BlockDiagonalOperator([])
    with pytest.raises(TypeError, match="block 1 is a Tensor, not a CurvatureOperator"):
        BlockDiagonalOperator([kron_op, torch.eye(2)])
    float32 = DiagonalOperator(diag_op.params, diag_op.diag().float())
    with pytest.raises(ValueError, match="block 1 has dtype torch.float32"):
        BlockDiagonalOperator([kron_op, float32])
    with pytest.raises(
        ValueError, match=r"params must be the blocks' parameters in any order, 5 tensors"
    ):
        BlockDiagonalOperator(op.blocks, params=params[:4])
    with pytest.raises(ValueError, match="no block's inverse takes use_magic"):
        op.inverse(0.1, use_magic=True)
    with pytest.raises(ValueError, match="damping must be a finite number >= 0"):
        op.inverse(-1.0)
    with pytest.raises(ValueError, match=r"a rank-2 operator on 4 parameters is singular"):
        BlockDiagonalOperator([diag_op, low_op - 0.3]).inverse()
    with pytest.raises(ValueError, match="split the parameters differently"):
        BlockDiagonalOperator([kron_op, diag_op]) + BlockDiagonalOperator(
            [
                KronOperator([params[0]], [kron_op.factors[0]]),
                BlockDiagonalOperator([KronOperator([params[1]], [kron_op.factors[1]]), diag_op]),
            ]
        )
    with pytest.raises(ValueError, match="Cannot combine BlockDiagonalOperator with KronOperator"):
        BlockDiagonalOperator([kron_op]) + kron_op
    with pytest.raises(ValueError, match=r"expected x of shape \[16\] or \[16, M\], got \[15\]"):
        op @ torch.ones(15)
