"""KronDecomposed against dense matrices (float64) and against laplace-torch.

Dense references: each block is ``torch.kron`` of its factors (damped
variant: of ``F + δ^{1/k} I``) plus ``δ I``, raised to a power through its
own ``torch.linalg.eigh``; blocks joined with ``torch.block_diag``.
"""

import warnings

import pytest
import torch

from curvext.operators import KronDecomposed, KronEigenOperator, KronOperator
from tests.test_operators import kron, random_kron_params


def assert_close(actual, expected):
    torch.testing.assert_close(actual, expected, rtol=1e-8, atol=1e-10)


def matrix_power(matrix, exponent):
    values, vectors = torch.linalg.eigh(matrix)
    return vectors @ torch.diag(values**exponent) @ vectors.T


def dense_reference(params, deltas, damping=False, exponent=1.0):
    blocks = []
    for p, delta in zip(params, deltas):
        factors = p.kfac
        size = p.numel()
        if damping:
            root = delta ** (1.0 / len(factors))
            block = kron([f + root * torch.eye(f.shape[0]) for f in factors])
        else:
            block = kron(factors) + delta * torch.eye(size)
        blocks.append(matrix_power(block, exponent))
    return torch.block_diag(*blocks)


DELTAS = [torch.tensor(0.0), torch.tensor(0.7), torch.tensor([0.1, 2.0, 0.5])]


def as_list(deltas, count=3):
    return deltas.expand(count).tolist()


@pytest.mark.parametrize("damping", [False, True])
@pytest.mark.parametrize("deltas", DELTAS, ids=["zero", "scalar", "per-block"])
def test_against_dense(deltas, damping):
    params = random_kron_params()
    decomposed = KronOperator.from_params(params).decompose(damping=damping) + deltas
    assert isinstance(decomposed, KronDecomposed) and len(decomposed) == 3
    delta_list = as_list(deltas)
    torch.manual_seed(0)
    W = torch.randn(3, 2, 12)
    for exponent in [-1, -0.5, 1, 2]:
        dense = dense_reference(params, delta_list, damping, exponent)
        assert_close(decomposed.bmm(W, exponent), W @ dense)
        assert_close(decomposed.bmm(W[0], exponent), W[0] @ dense)
        assert_close(decomposed.bmm(W[0, 0], exponent), W[0, 0] @ dense)
        assert_close(decomposed.diag(exponent), dense.diagonal())
        assert_close(decomposed.to_matrix(exponent), dense)
    dense = dense_reference(params, delta_list, damping)
    assert_close(decomposed.bmm(W[0, 0]), W[0, 0] @ torch.linalg.inv(dense))  # default -1
    assert_close(decomposed.logdet(), torch.logdet(dense))
    assert_close(decomposed.inv_square_form(W), W @ torch.linalg.inv(dense) @ W.transpose(1, 2))
    # the CurvatureOperator interface
    assert_close(decomposed @ W[0].T, dense @ W[0].T)
    assert_close(decomposed.trace(), dense.trace())
    assert_close(decomposed.frobenius_norm(), torch.linalg.matrix_norm(dense))
    inverse = decomposed.inverse(damping=0.3)
    assert isinstance(inverse, KronEigenOperator)
    assert_close(inverse.to_dense(), torch.linalg.inv(dense + 0.3 * torch.eye(12)))


def test_scale_shift_and_arithmetic():
    params = random_kron_params()
    K = KronOperator.from_params(params)
    reference = dense_reference(params, [0.0] * 3)
    identity = torch.eye(12)
    assert_close((2.5 * K).decompose().to_matrix(), 2.5 * reference)
    assert_close((-2.5 * K).decompose().to_matrix(), -2.5 * reference)
    assert_close((K + 0.4).decompose().to_matrix(), reference + 0.4 * identity)
    assert_close((K + 0.4).decompose().deltas, torch.full((3,), 0.4))
    decomposed = K.decompose() + torch.tensor([0.1, 0.2, 0.3])
    with_deltas = dense_reference(params, [0.1, 0.2, 0.3])
    assert_close((3.0 * decomposed).to_matrix(), 3.0 * with_deltas)
    assert_close((decomposed - 0.05).to_matrix(), with_deltas - 0.05 * identity)
    assert isinstance(1.0 + decomposed, KronDecomposed)
    # damped: c (A + √δ) ⊗ (B + √δ) = (√c A + √(cδ)) ⊗ (√c B + √(cδ))
    damped = K.decompose(damping=True) + 0.5
    assert_close((2.0 * damped).to_matrix(), 2.0 * dense_reference(params, [0.5] * 3, damping=True))
    assert_close((2.0 * K).decompose(damping=True).to_matrix(), 2.0 * reference)


def test_deltas_keep_gradient_and_detach():
    params = random_kron_params()
    prior_precision = torch.tensor([0.5, 1.0, 2.0], requires_grad=True)
    decomposed = KronOperator.from_params(params).decompose() + prior_precision
    decomposed.logdet().backward()
    inverse = torch.linalg.inv(dense_reference(params, [0.5, 1.0, 2.0]))
    traces = [inverse[:6, :6].trace(), inverse[6:8, 6:8].trace(), inverse[8:, 8:].trace()]
    assert_close(prior_precision.grad, torch.stack(traces))
    assert decomposed.detach() is decomposed
    assert not decomposed.deltas.requires_grad and not decomposed.logdet().requires_grad


def test_laplace_torch_parity():
    pytest.importorskip("laplace")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from laplace.utils.matrix import Kron
        from laplace.utils.matrix import KronDecomposed as TheirKronDecomposed

    def theirs_with(kron, deltas, damping):
        # laplace-torch's `+` returns an undamped KronDecomposed, so the deltas
        # of its damped variant go to the constructor
        decomposed = kron.decompose()
        deltas = deltas.expand(len(decomposed)).clone()
        return TheirKronDecomposed(decomposed.eigenvectors, decomposed.eigenvalues, deltas, damping)

    params = random_kron_params()
    K = KronOperator.from_params(params)
    torch.manual_seed(1)
    W = torch.randn(3, 2, 12)
    for damping in [False, True]:
        for deltas in DELTAS:
            theirs = theirs_with(Kron([list(p.kfac) for p in params]), deltas, damping)
            ours = K.decompose(damping=damping) + deltas
            for exponent in [-1, -0.5, 1]:
                assert_close(ours.bmm(W, exponent), theirs.bmm(W, exponent))
                assert_close(ours.diag(exponent), theirs.diag(exponent))
                assert_close(ours.to_matrix(exponent), theirs.to_matrix(exponent))
            assert_close(ours.logdet(), theirs.logdet())
            assert_close(ours.inv_square_form(W), theirs.inv_square_form(W))
        # laplace-torch's Kron * c spreads c over the factors, as decompose() does
        assert_close(
            ((2.0 * K).decompose(damping=damping) + 0.3).to_matrix(),
            theirs_with(
                Kron([list(p.kfac) for p in params]) * 2.0, torch.tensor(0.3), damping
            ).to_matrix(),
        )


def test_bad_input():
    params = random_kron_params()
    K = KronOperator.from_params(params)
    decomposed = K.decompose()
    with pytest.raises(
        ValueError,
        match=r"deltas must be a scalar or have one entry per block \(3\), got shape \[2\]",
    ):
        decomposed + torch.ones(2)
    with pytest.raises(
        ValueError,
        match=r"deltas must be a scalar or have one entry per block \(3\), got shape \[3, 1\]",
    ):
        KronDecomposed(
            params, decomposed.eigenvectors, decomposed.factor_eigenvalues, torch.ones(3, 1)
        )
    with pytest.raises(ValueError, match="deltas must be finite"):
        decomposed + torch.tensor([1.0, torch.inf, 1.0])
    with pytest.raises(ValueError, match=r"KronDecomposed\(damping=True\): deltas must be >= 0"):
        K.decompose(damping=True) + torch.tensor(-0.1)
    with pytest.raises(
        ValueError, match=r"damping=True\) \* -2.0: the damped form needs a positive factor"
    ):
        -2.0 * K.decompose(damping=True)
    with pytest.raises(
        ValueError,
        match=(
            r"decompose\(damping=True\): block 0 \(parameter shape \(2, 3\)\) "
            r"has an identity term"
        ),
    ):
        (K + 0.1).decompose(damping=True)
    with pytest.raises(
        ValueError, match=r"bmm: expected W of shape \[batch, classes, 12\], got \[2, 3, 11\]"
    ):
        decomposed.bmm(torch.ones(2, 3, 11))
    with pytest.raises(
        ValueError, match=r"inv_square_form: expected W of shape \[batch, classes, 12\], got \[12\]"
    ):
        decomposed.inv_square_form(torch.ones(12))
    with pytest.raises(ValueError, match="Cannot add two KronDecomposed operators"):
        decomposed + K.decompose()
    with pytest.raises(
        ValueError,
        match=r"block 0 has eigenvectors \[\(2, 2\), \(3, 3\)\] for eigenvalues \[\(2,\), \(2,\)\]",
    ):
        KronDecomposed(
            params,
            decomposed.eigenvectors,
            [[torch.ones(2), torch.ones(2)], *decomposed.factor_eigenvalues[1:]],
        )
    with pytest.raises(
        ValueError, match=r"one list of factor eigenvectors .* \(3 parameters\), got 2 and 3"
    ):
        KronDecomposed(params, decomposed.eigenvectors[:2], decomposed.factor_eigenvalues)
    params[2].kfac = [torch.zeros(4, 4)]
    singular = KronOperator.from_params(params).decompose()
    with pytest.raises(
        ValueError,
        match=r"KronDecomposed\(-1.0\): block 2's spectrum has a zero entry \(singular\)",
    ):
        singular.bmm(torch.ones(1, 1, 12))
    with pytest.raises(ValueError, match="negative entry"):
        (singular - 1.0).diag(exponent=0.5)
    with pytest.raises(ValueError, match="determinant is zero"):
        singular.logdet()
    assert_close((singular + 1.0).diag(-1)[-4:], torch.ones(4))
