"""LowRankOperator against dense matrices built independently in float64.

Eigenpairs are random (orthonormal and not) or come from ``GGNEigen`` on a
tiny model, whose GGN is formed here with ``torch.func`` (``2 Jᵀ J`` for a
summed squared error).
"""

import pytest
import torch
from torch import nn
from torch.func import functional_call, jacrev

from curvext import backpack, extend
from curvext.extensions import GGNEigen
from curvext.operators import BlockDiagonalOperator, LowRankOperator


def assert_close(actual, expected, **kwargs):
    torch.testing.assert_close(actual, expected, rtol=1e-9, atol=1e-10, **kwargs)


def random_case(orthonormal=True, rank=3):
    """Two parameters (P = 9), rank-``rank`` eigenpairs and U ``[P, k]``."""
    torch.manual_seed(3)
    params = [nn.Parameter(torch.zeros(2, 3)), nn.Parameter(torch.zeros(3))]
    columns = torch.randn(9, rank)
    if orthonormal:
        columns = torch.linalg.qr(columns).Q
    eigvals = torch.rand(rank) + 0.5
    eigvecs = [columns[:6].T.reshape(rank, 2, 3), columns[6:].T.reshape(rank, 3)]
    dense = columns @ torch.diag(eigvals) @ columns.T
    return LowRankOperator(params, eigvals, eigvecs), dense


@pytest.mark.parametrize("orthonormal", [True, False])
def test_against_dense(orthonormal):
    op, dense = random_case(orthonormal)
    assert op.shape == (9, 9) and op.rank == 3 and op.dtype == torch.float64
    assert_close(op.to_dense(), dense)
    matrix = torch.randn(9, 4)
    assert_close(op @ matrix, dense @ matrix)
    assert_close(op @ matrix[:, 0], dense @ matrix[:, 0])
    as_list = [matrix[:6, 0].reshape(2, 3), matrix[6:, 0]]
    result = op.T @ as_list
    assert [r.shape for r in result] == [(2, 3), (3,)]
    assert_close(torch.cat([r.flatten() for r in result]), dense @ matrix[:, 0])
    assert_close(op.diag(), dense.diagonal())
    assert_close(op.trace(), dense.trace())
    assert_close(op.frobenius_norm(), torch.linalg.matrix_norm(dense))
    identity = torch.eye(9)
    for delta in [1e-3, 0.7]:
        damped = op + delta
        assert isinstance(damped, LowRankOperator) and damped.rank == 3
        assert_close(damped.to_dense(), dense + delta * identity)
        assert_close(damped.logdet(), torch.logdet(dense + delta * identity))
        assert_close(damped.det(), torch.det(dense + delta * identity))
        assert_close(damped.frobenius_norm(), torch.linalg.matrix_norm(dense + delta * identity))
        assert_close(damped.diag(), (dense + delta * identity).diagonal())
        inverse = op.inverse(damping=delta)
        assert isinstance(inverse, LowRankOperator) and inverse.rank == 3
        assert_close(inverse @ matrix, torch.linalg.solve(dense + delta * identity, matrix))
        assert_close(inverse.logdet(), -torch.logdet(dense + delta * identity))
        # an operator with an identity term inverts without further damping
        assert_close(damped.inverse().to_dense(), torch.linalg.inv(dense + delta * identity))
        assert_close(
            damped.inverse(damping=0.2).to_dense(),
            torch.linalg.inv(dense + (delta + 0.2) * identity),
        )


def test_arithmetic_keeps_structure():
    op, dense = random_case(orthonormal=False)
    identity = torch.eye(9)
    scaled = 2.5 * op - 0.1
    assert isinstance(scaled, LowRankOperator)
    assert_close(scaled.to_dense(), 2.5 * dense - 0.1 * identity)
    assert_close((-scaled).diag(), -(2.5 * dense - 0.1 * identity).diagonal())
    assert_close((op + op).to_dense(), 2 * dense)
    assert (op + op).rank == 3  # shared eigenvectors add their eigenvalues
    other = LowRankOperator(
        op.params, torch.tensor([2.0, 1.0]), [torch.randn(2, 2, 3), torch.randn(2, 3)]
    )
    other_dense = torch.cat([v.flatten(1) for v in other.eigvecs()], 1)
    other_dense = other_dense.T @ torch.diag(torch.tensor([2.0, 1.0])) @ other_dense
    summed = (op + 0.3) + (other + 0.2)
    assert summed.rank == 5
    assert_close(summed.to_dense(), dense + other_dense + 0.5 * identity)
    assert_close(
        summed.inverse().to_dense(), torch.linalg.inv(dense + other_dense + 0.5 * identity)
    )
    assert_close(summed.logdet(), torch.logdet(dense + other_dense + 0.5 * identity))


def test_scipy_cg_on_damped_inverse():
    cg = pytest.importorskip("scipy.sparse.linalg").cg
    op, dense = random_case()
    rhs = torch.randn(9)
    solution, info = cg((op + 0.5).to_scipy(), rhs.numpy(), rtol=1e-12, atol=0)
    assert info == 0
    assert_close(torch.as_tensor(solution), (op.inverse(damping=0.5) @ rhs))


def test_full_rank_without_damping():
    """k = P and no identity term: not singular, measured densely."""
    op, dense = random_case(orthonormal=True, rank=9)
    assert_close(op.logdet(), torch.logdet(dense))


# ---- GGNEigen eigenpairs -------------------------------------------------------


def tiny_model():
    torch.manual_seed(4)
    model = extend(nn.Sequential(nn.Linear(3, 2), nn.Tanh(), nn.Linear(2, 2)))
    X, y = torch.randn(4, 3), torch.randn(4, 2)
    return model, X, y


def dense_ggn(model, X):
    """``2 Σ_n J_nᵀ J_n`` for ``MSELoss(reduction="sum")``, rows in ``model.parameters()`` order."""
    names = [name for name, _ in model.named_parameters()]
    values = {name: p.detach() for name, p in model.named_parameters()}
    jacobians = jacrev(lambda v: functional_call(model, v, (X,)))(values)
    jacobian = torch.cat([jacobians[n].reshape(X.shape[0] * 2, -1) for n in names], 1)
    return 2 * jacobian.T @ jacobian


def run_ggn_eigen(model, X, y, extension):
    loss = extend(nn.MSELoss(reduction="sum"))(model(X), y)
    with backpack(extension):
        loss.backward()


def test_from_ggn_eigen_one_group():
    model, X, y = tiny_model()
    run_ggn_eigen(model, X, y, GGNEigen())
    op = LowRankOperator.from_params(model.parameters())
    assert isinstance(op, LowRankOperator)
    ggn = dense_ggn(model, X)
    tolerances = dict(rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(op.to_dense(), ggn, **tolerances)
    torch.testing.assert_close(op.diag(), ggn.diagonal(), **tolerances)
    identity = torch.eye(ggn.shape[0])
    torch.testing.assert_close(
        op.inverse(damping=1e-2).to_dense(), torch.linalg.inv(ggn + 1e-2 * identity), **tolerances
    )
    torch.testing.assert_close(
        (op + 1e-2).logdet(), torch.logdet(ggn + 1e-2 * identity), **tolerances
    )
    torch.testing.assert_close(op.frobenius_norm(), torch.linalg.matrix_norm(ggn), **tolerances)


def test_from_ggn_eigen_interleaved_groups_give_block_diagonal():
    model, X, y = tiny_model()
    weights = [model[0].weight, model[2].weight]
    biases = [model[0].bias, model[2].bias]
    run_ggn_eigen(model, X, y, GGNEigen(param_groups=[{"params": weights}, {"params": biases}]))
    op = LowRankOperator.from_params(model.parameters())
    assert isinstance(op, BlockDiagonalOperator)
    assert [type(b) for b in op.blocks] == [LowRankOperator] * 2
    assert all(a is b for a, b in zip(op.params, model.parameters()))
    ggn = dense_ggn(model, X)
    # rows in model.parameters() order: w0 (6), b0 (2), w2 (4), b2 (2)
    weight_rows = torch.cat([torch.arange(0, 6), torch.arange(8, 12)])
    bias_rows = torch.cat([torch.arange(6, 8), torch.arange(12, 14)])
    expected = torch.zeros_like(ggn)
    for rows in (weight_rows, bias_rows):
        expected[rows.unsqueeze(1), rows] = ggn[rows.unsqueeze(1), rows]
    tolerances = dict(rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(op.to_dense(), expected, **tolerances)
    vector = torch.randn(14)
    torch.testing.assert_close(op @ vector, expected @ vector, **tolerances)
    torch.testing.assert_close(op.diag(), expected.diagonal(), **tolerances)
    identity = torch.eye(14)
    torch.testing.assert_close(
        op.inverse(damping=0.1) @ vector,
        torch.linalg.solve(expected + 0.1 * identity, vector),
        **tolerances,
    )
    torch.testing.assert_close(
        (op + 0.1).logdet(), torch.logdet(expected + 0.1 * identity), **tolerances
    )


# ---- bad input --------------------------------------------------------------


def test_missing_attributes_name_parameter_and_extension():
    model, X, y = tiny_model()
    with pytest.raises(
        AttributeError,
        match=r"parameter 0 \(shape \(2, 3\)\) has no attribute 'ggn_eigvals': run GGNEigen\(\)",
    ):
        LowRankOperator.from_params(model.parameters())
    run_ggn_eigen(model, X, y, GGNEigen(eigenvectors=False))
    with pytest.raises(AttributeError, match=r"'ggn_eigvecs': run GGNEigen\(eigenvectors=True\)"):
        LowRankOperator.from_params(model.parameters())
    with pytest.raises(ValueError, match="no parameter with requires_grad=True"):
        LowRankOperator.from_params([])


def test_bad_constructor_input():
    op, _ = random_case()
    params, eigvecs = op.params, op.eigvecs()
    with pytest.raises(ValueError, match=r"eigvals must be a flat tensor \[k\], got \[3, 1\]"):
        LowRankOperator(params, torch.ones(3, 1), eigvecs)
    with pytest.raises(ValueError, match="eigvals must be finite"):
        LowRankOperator(params, torch.tensor([1.0, torch.nan, 1.0]), eigvecs)
    with pytest.raises(
        ValueError,
        match=r"one eigenvector tensor \[k, \*p.shape\] per parameter \(2 parameters\), got 1",
    ):
        LowRankOperator(params, torch.ones(3), eigvecs[:1])
    with pytest.raises(
        ValueError,
        match=(
            r"parameter 1 \(shape \(3,\)\) have shape \(2, 3\); "
            r"expected \[k, \*p.shape\] = \(3, 3\)"
        ),
    ):
        LowRankOperator(params, torch.ones(3), [eigvecs[0], eigvecs[1][:2]])
    with pytest.raises(ValueError, match=r"expected x of shape \[9\] or \[9, M\], got \[8\]"):
        op @ torch.ones(8)


def test_singular_and_bad_damping():
    op, _ = random_case()
    with pytest.raises(
        ValueError, match=r"a rank-3 operator on 9 parameters is singular; pass damping > 0"
    ):
        op.inverse()
    with pytest.raises(ValueError, match="determinant is zero"):
        op.logdet()
    assert op.det() == 0
    for damping in [-1.0, float("nan"), float("inf")]:
        with pytest.raises(ValueError, match="damping must be a finite number >= 0"):
            op.inverse(damping=damping)
    with pytest.raises(
        ValueError, match="Cannot combine two LowRankOperators over different parameter lists"
    ):
        op + random_case()[0]
